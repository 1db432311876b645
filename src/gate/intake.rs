//! Intake (SPEC §4 steps 1–3, §5's inputs): an entry of the plan stream
//! to a plan, or why it gets no permit, and the raw state of the batch's
//! symbols read in one script call. The consumer's first half; the rules
//! judge what this returns.

use std::collections::HashMap;

use redis::Value;

use crate::allowlist::Allowlist;
use crate::gate::rules::{self, Inputs, Plan, PlanKind, PlanSide, Raw};
use crate::redis::keys;
use crate::redis::scripts;
use crate::redis::store::Conn;
use crate::redis::stream::{entry_ms, text, Entry};
use crate::text::clip;

/// The raw state of one symbol, as read (parsed by [`Inputs::parse`]).
#[derive(Debug, Default, Clone)]
pub struct SymbolState {
    /// `quantum:position:snapshot:<symbol>`.
    pub snapshot: Raw<HashMap<String, String>>,
    /// `quantum:position:ledger:<symbol>`.
    pub ledger: Raw<HashMap<String, String>>,
    /// `quantum:cooldown:last_exec_ts:<symbol>`.
    pub cooldown: Raw<String>,
}

impl SymbolState {
    /// The typed inputs of the rules.
    pub fn inputs(&self) -> Inputs {
        Inputs::parse(
            self.snapshot.as_ref(),
            self.ledger.as_ref(),
            self.cooldown.as_ref().map(String::as_str),
        )
    }
}

fn pairs(v: &Value) -> HashMap<String, String> {
    match v {
        Value::Array(kv) => kv
            .chunks_exact(2)
            .filter_map(|c| Some((text(&c[0])?, text(&c[1])?)))
            .collect(),
        _ => HashMap::new(),
    }
}

/// Reads snapshot, ledger and cooldown of every symbol in one round trip.
pub async fn read_state(
    con: &mut Conn,
    symbols: &[String],
) -> Result<HashMap<String, SymbolState>, redis::RedisError> {
    if symbols.is_empty() {
        return Ok(HashMap::new());
    }
    let mut ks = Vec::with_capacity(symbols.len() * 3);
    for s in symbols {
        ks.push(keys::snapshot(s));
        ks.push(keys::ledger(s));
        ks.push(keys::cooldown(s));
    }
    let v: Value = scripts::READ_STATE.invoke(con, &ks).await?;
    let Value::Array(rows) = v else {
        return Err(redis::RedisError::from((
            redis::ErrorKind::TypeError,
            "state script returned a non-array",
        )));
    };
    let mut out = HashMap::with_capacity(symbols.len());
    for (sym, row) in symbols.iter().zip(rows.iter()) {
        let Value::Array(f) = row else { continue };
        let t = |i: usize| f.get(i).and_then(text).unwrap_or_default();
        let raw = |ty: String, want: &str, value: &dyn Fn() -> String| match ty.as_str() {
            "none" => Raw::Missing,
            x if x == want => Raw::Present(value()),
            _ => Raw::WrongType(ty),
        };
        let hash = |ty: String, i: usize| match ty.as_str() {
            "none" => Raw::Missing,
            "hash" => Raw::Present(f.get(i).map(pairs).unwrap_or_default()),
            _ => Raw::WrongType(ty),
        };
        out.insert(
            sym.clone(),
            SymbolState {
                snapshot: hash(t(0), 1),
                ledger: hash(t(2), 3),
                cooldown: raw(t(4), "string", &|| t(5)),
            },
        );
    }
    Ok(out)
}

/// Why an entry gets no permit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filtered {
    /// Bad `plan_id`, fields that are not UTF-8, a deleted entry (ERROR line).
    Malformed(String),
    /// `decision` is not EXECUTE / RECONCILE_CLOSE.
    SkipDecision,
    /// Symbol not on the allowlist.
    NotAllowlisted,
}

/// `plan_id` rules of SPEC §4 step 1.
pub fn valid_plan_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && !id.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// The first eight characters of a plan id, for log lines.
pub fn id8(id: &str) -> &str {
    match id.char_indices().nth(8) {
        Some((i, _)) => &id[..i],
        None => id,
    }
}

/// Steps 1–3 of SPEC §4: a plan to evaluate, or why not.
pub fn classify(e: &Entry, allow: &Allowlist, now: f64) -> Result<Plan, Filtered> {
    let Some(f) = &e.fields else {
        return Err(Filtered::Malformed(
            "entry deleted from the stream while pending".into(),
        ));
    };
    if let Some(what) = &e.not_utf8 {
        return Err(Filtered::Malformed(format!("{what} is not valid UTF-8")));
    }
    let plan_id = f.get("plan_id").map(String::as_str).unwrap_or("");
    if !valid_plan_id(plan_id) {
        return Err(Filtered::Malformed(format!(
            "invalid plan_id {:?} (must be 1-128 bytes without whitespace or control characters)",
            clip(plan_id)
        )));
    }
    let Some(kind) = PlanKind::parse(f.get("decision").map(String::as_str).unwrap_or("")) else {
        return Err(Filtered::SkipDecision);
    };
    let symbol = f
        .get("symbol")
        .map(String::as_str)
        .unwrap_or("UNKNOWN")
        .to_string();
    if !allow.contains(&symbol, now) {
        return Err(Filtered::NotAllowlisted);
    }
    Ok(Plan {
        plan_id: plan_id.to_string(),
        symbol,
        kind,
        action: f.get("action").cloned().unwrap_or_default(),
        reduce_only: rules::parse_reduce_only(f.get("reduceOnly").map(String::as_str)),
        side: PlanSide::parse(f.get("side").map(String::as_str)),
        entry_ms: entry_ms(&e.id).unwrap_or(0),
    })
}
