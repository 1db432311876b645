//! The decision record (SPEC §14): what the record of each finished plan
//! holds, built before the write. The write script (`write_permits.lua`)
//! XADDs it to `quantum:stream:p33.decisions` in the same call that writes
//! the permit and ACKs the entry, and fills in what only it knows: the final
//! outcome and reason when a guard (hold, trading state, limit) turned an
//! allow into a deny, and what those guards read.

use serde_json::{json, Value};

// (`json!` only for the rare records; the per-plan ones are built by hand.)
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::domain::dec_str;
use crate::gate::rules::{CooldownInput, Decision, Inputs, LedgerInput, Plan, SnapshotInput};
use crate::text::clip;

/// The fields the daemon knows of a record before the write.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Record {
    /// The plan's id (cut to 64 characters for a malformed entry).
    pub plan_id: String,
    /// The symbol (cut to 64 characters when not allowlisted).
    pub symbol: String,
    /// `skip_decision`, `not_allowlisted`, `malformed`, or empty for an
    /// evaluated plan (the script decides allow/deny and the dry-run prefix).
    pub outcome: &'static str,
    /// The rules' reason (the script replaces it when a guard decided).
    pub reason: String,
    /// The safe quantity of an allow, else empty.
    pub safe_qty: String,
    /// JSON of the plan fields the rules read.
    pub plan: String,
    /// JSON of everything the decision read (an object; the script adds
    /// what its guards read before the closing brace).
    pub inputs: String,
}

/// A float as JSON, in its shortest form that reads back to the same value
/// (so a replay judges on exactly the numbers the rules saw).
fn num(f: f64) -> String {
    Value::from(f).to_string()
}

/// A string as a JSON string literal.
fn js(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string())
}

/// The JSON of the plan fields the rules read. (Built by hand, not through
/// a `Value` tree: it is on the hot path of every plan.)
pub fn plan_json(p: &Plan) -> String {
    format!(
        r#"{{"decision":"{}","action":{},"reduce_only":{},"side":"{}","entry_ms":{}}}"#,
        p.kind.as_str(),
        js(&clip(&p.action)),
        p.reduce_only,
        format!("{:?}", p.side).to_ascii_uppercase(),
        p.entry_ms
    )
}

/// The JSON of the rules' inputs, with the allowlist source, the step and
/// `now`, and the rules' own outcome. (By hand, like [`plan_json`].)
pub fn inputs_json(
    inputs: &Inputs,
    step: rust_decimal::Decimal,
    step_fallback: bool,
    allowlist: &str,
    now: f64,
    decision: &Decision,
) -> String {
    let snapshot = match &inputs.snapshot {
        SnapshotInput::Missing => r#"{"missing":true}"#.to_string(),
        SnapshotInput::Invalid { field } => format!(r#"{{"invalid":"{field}"}}"#),
        SnapshotInput::Valid(s) => format!(
            r#"{{"amt":"{}","ts":{},"hedged":{}}}"#,
            dec_str(s.amt),
            num(s.ts),
            s.hedged
        ),
    };
    let ledger = match &inputs.ledger {
        LedgerInput::Absent => "null".to_string(),
        LedgerInput::Invalid { field, value } => {
            format!(r#"{{"invalid":"{field}","value":{}}}"#, js(value))
        }
        LedgerInput::Amount(a) => format!(r#"{{"amt":"{}"}}"#, dec_str(*a)),
    };
    let cooldown = match &inputs.cooldown {
        CooldownInput::Absent => "null".to_string(),
        CooldownInput::Invalid { value } => format!(r#"{{"invalid":{}}}"#, js(value)),
        CooldownInput::At(ms) => format!(r#"{{"ms":{}}}"#, num(*ms)),
    };
    format!(
        r#"{{"snapshot":{snapshot},"ledger":{ledger},"cooldown":{cooldown},"step":"{}","step_fallback":{step_fallback},"allowlist":"{allowlist}","now":{},"rules":"{}"}}"#,
        dec_str(step),
        num(now),
        rules_outcome(decision)
    )
}

/// `allow:<reason>` or `deny:<reason>`: the rules' own outcome.
pub fn rules_outcome(d: &Decision) -> String {
    match d {
        Decision::Allow(a) => format!("allow:{}", a.reason.as_str()),
        Decision::Deny(d) => format!("deny:{}", d.reason.as_str()),
    }
}

/// The record of an evaluated plan.
pub fn evaluated(plan: &Plan, decision: &Decision, inputs: String) -> Record {
    let (reason, safe_qty) = match decision {
        Decision::Allow(a) => (a.reason.as_str(), dec_str(a.safe_qty)),
        Decision::Deny(d) => (d.reason.as_str(), String::new()),
    };
    Record {
        plan_id: plan.plan_id.clone(),
        symbol: plan.symbol.clone(),
        outcome: "",
        reason: reason.to_string(),
        safe_qty,
        plan: plan_json(plan),
        inputs,
    }
}

/// The record of an entry finished without evaluation.
pub fn filtered(
    plan_id: &str,
    symbol: &str,
    outcome: &'static str,
    reason: &str,
    allowlist: &str,
    now: f64,
) -> Record {
    Record {
        plan_id: clip(plan_id).into_owned(),
        symbol: clip(symbol).into_owned(),
        outcome,
        reason: clip(reason).into_owned(),
        safe_qty: String::new(),
        plan: String::from("{}"),
        inputs: json!({"allowlist": allowlist, "now": (now * 1000.0).round() / 1000.0}).to_string(),
    }
}

/// A short hash of the configuration the rules and the guards use: two
/// records with the same hash were judged under the same settings.
pub fn config_hash(cfg: &Config) -> String {
    let text = format!(
        "stale={} cooldown={} tol={} max_age={} ttl={} default={} opens={:?} opens_sym={:?} cap={:?} latch={}",
        cfg.stale_threshold_s,
        cfg.cooldown_s,
        cfg.qty_tolerance_pct,
        cfg.plan_max_age_s,
        cfg.permit_ttl.as_millis(),
        cfg.default_trading_state.as_str(),
        cfg.max_opens.map(|r| r.to_string()),
        cfg.max_opens_per_symbol.map(|r| r.to_string()),
        cfg.max_open_positions,
        cfg.throttle_latch,
    );
    let digest = Sha256::digest(text.as_bytes());
    hex::encode(&digest[..6])
}

/// The variables the rules and limits read, as an instance reports them
/// (SPEC §14): what `replay` takes as its baseline. Never a secret.
pub const SETTINGS: [&str; 10] = [
    "P33_STALE_THRESHOLD_SEC",
    "P33_COOLDOWN_SEC",
    "P33_QTY_TOLERANCE_PCT",
    "P33_PLAN_MAX_AGE_S",
    "P33_PERMIT_TTL",
    "P33_DEFAULT_TRADING_STATE",
    "P33_MAX_OPENS",
    "P33_MAX_OPENS_PER_SYMBOL",
    "P33_MAX_OPEN_POSITIONS",
    "P33_THROTTLE_LATCH",
];

/// The rule and limit settings of `cfg` as `VAR=VALUE;…` (an empty value:
/// unset), in [`SETTINGS`]' order.
pub fn settings(cfg: &Config) -> String {
    let opt = |v: Option<String>| v.unwrap_or_default();
    let values = [
        cfg.stale_threshold_s.to_string(),
        cfg.cooldown_s.to_string(),
        cfg.qty_tolerance_pct.to_string(),
        cfg.plan_max_age_s.to_string(),
        cfg.permit_ttl.as_secs_f64().to_string(),
        cfg.default_trading_state.as_str().to_string(),
        opt(cfg.max_opens.map(|r| r.to_string())),
        opt(cfg.max_opens_per_symbol.map(|r| r.to_string())),
        opt(cfg.max_open_positions.map(|n| n.to_string())),
        cfg.throttle_latch.to_string(),
    ];
    SETTINGS
        .iter()
        .zip(values)
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(";")
}

/// A reported settings string back into pairs: only [`SETTINGS`] names,
/// each once; anything else is no settings at all (`None`).
pub fn parse_settings(s: &str) -> Option<Vec<(String, String)>> {
    let mut out: Vec<(String, String)> = Vec::new();
    for part in s.split(';') {
        let (k, v) = part.split_once('=')?;
        if !SETTINGS.contains(&k) || out.iter().any(|(n, _)| n == k) || v.len() > 64 {
            return None;
        }
        out.push((k.to_string(), v.to_string()));
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::rules::{Decision, Deny, PlanKind, PlanSide, Raw, Reason};
    use std::collections::HashMap;

    #[test]
    fn hand_built_json_parses_and_escapes() {
        let plan = Plan {
            plan_id: "p".into(),
            symbol: "BTCUSDT".into(),
            kind: PlanKind::Execute,
            action: "CLOSE \"now\" \\ please".into(),
            reduce_only: true,
            side: PlanSide::Close,
            entry_ms: 1_769_920_000_123,
        };
        let p: Value = serde_json::from_str(&plan_json(&plan)).unwrap();
        assert_eq!(p["action"], "CLOSE \"now\" \\ please");
        assert_eq!(p["side"], "CLOSE");
        let ledger: HashMap<String, String> =
            [("last_known_amt".to_string(), "x\"y\\z".to_string())].into();
        let inputs = Inputs::parse(Raw::Missing, Raw::Present(&ledger), Raw::Present("1e5"));
        let d = Decision::Deny(Deny {
            reason: Reason::NoExchangeSnapshot,
            context: serde_json::Map::new(),
        });
        let text = inputs_json(
            &inputs,
            rust_decimal::Decimal::new(1, 3),
            true,
            "env",
            1_769_920_000.5,
            &d,
        );
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["snapshot"]["missing"], true);
        assert_eq!(v["ledger"]["value"], "x\"y\\z");
        assert_eq!(v["cooldown"]["ms"], 100000.0);
        assert_eq!(v["rules"], "deny:no_exchange_snapshot");
        assert_eq!(v["now"], 1_769_920_000.5);
    }
}
