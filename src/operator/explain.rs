//! `position-state-brain explain PLAN_ID` (SPEC §14): finds the plan's
//! decision record — newest first, at most [`MAX_SCANNED`] records back — and
//! says in a few lines which rule decided, what it read and the permit it
//! wrote. Exit 0 when found, 1 when not (or Redis cannot be reached).

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;

use crate::config::Config;
use crate::redis::keys;
use crate::redis::store;
use crate::redis::stream::RangeCursor;
use crate::text::{clip, JSON_MAX_CHARS};

/// How far back `explain` looks.
pub const MAX_SCANNED: usize = 200_000;

/// The rules table (`docs/rules.md` shows it; a test keeps the two equal):
/// each reason a permit can carry, the row or guard that decides it, and
/// what that row says.
pub const RULES: [(&str, &str, &str); 26] = [
    (
        "plan_expired",
        "0",
        "the plan is older than P33_PLAN_MAX_AGE_S",
    ),
    (
        "plan_from_future",
        "0b",
        "the plan's stream ID is ahead of the clock",
    ),
    (
        "invalid_plan",
        "side",
        "the plan's side is not BUY/SELL/LONG/SHORT/CLOSE",
    ),
    ("no_exchange_snapshot", "1", "no exchange snapshot"),
    (
        "invalid_exchange_snapshot",
        "2",
        "the snapshot is invalid, from the future or hedged",
    ),
    (
        "stale_exchange_state",
        "3",
        "the snapshot is older than P33_STALE_THRESHOLD_SEC",
    ),
    (
        "reconcile_close_bypass",
        "4",
        "a reconcile close of a real, fresh position",
    ),
    (
        "no_position",
        "4/6",
        "a close (or reconcile close) with no position",
    ),
    (
        "open_permit_granted",
        "5",
        "an open while flat, out of cooldown",
    ),
    ("position_exists", "5b", "an open while a position exists"),
    ("invalid_ledger", "7", "the ledger amount is unusable"),
    (
        "reconcile_required_side_mismatch",
        "7",
        "ledger and exchange disagree on the side",
    ),
    (
        "reconcile_required_qty_mismatch",
        "7b",
        "ledger and exchange quantities differ beyond tolerance",
    ),
    (
        "cooldown_in_flight",
        "8",
        "the last execution is within P33_COOLDOWN_SEC",
    ),
    ("invalid_cooldown", "8", "the cooldown value is unusable"),
    (
        "safe_qty_below_step",
        "9",
        "the safe quantity rounds down to zero steps",
    ),
    (
        "sanity_checks_passed",
        "9",
        "a close that passed every check",
    ),
    (
        "reconcile_hold_active",
        "hold",
        "the reconcile hold (checked in the atomic write)",
    ),
    (
        "trading_halted",
        "state",
        "the trading state HALTED (the kill switch)",
    ),
    (
        "trading_reducing",
        "state",
        "the trading state REDUCING (opens denied)",
    ),
    (
        "trading_state_unknown",
        "state",
        "no gate has put the trading state in place on this Redis (quantum:p33:armed missing)",
    ),
    ("throttled", "limit", "an open throttle (P33_MAX_OPENS…)"),
    (
        "max_open_positions",
        "limit",
        "the position cap (P33_MAX_OPEN_POSITIONS)",
    ),
    (
        "invalid_guard_state",
        "limit",
        "a key a limit needs is unusable (another type, or a full stream)",
    ),
    (
        "duplicate_plan_id",
        "write",
        "a permit for this plan_id already existed: no second one",
    ),
    ("", "—", "no rule: the plan was not evaluated"),
];

/// Which rule of SPEC §5 (or guard of §12–§13) a reason comes from, in the
/// words of `docs/rules.md`.
pub fn rule_of(reason: &str) -> String {
    let (row, what) = RULES.iter().find(|(r, _, _)| *r == reason).map_or(
        ("—", "no rule: the plan was not evaluated"),
        |(_, row, what)| (*row, *what),
    );
    match row {
        "—" => what.to_string(),
        r if r.chars().next().is_some_and(|c| c.is_ascii_digit()) => format!("row {r}: {what}"),
        r => format!("{r}: {what}"),
    }
}

/// What became of the permit of a record whose outcome wrote none, or
/// rewrote it: `None` for an evaluated allow or deny.
fn no_permit(outcome: &str) -> Option<&'static str> {
    Some(match outcome {
        "not_allowlisted" => "none was written: the symbol is not on the allowlist",
        "skip_decision" => "none was written: the decision is not EXECUTE or RECONCILE_CLOSE",
        "malformed" => "none was written: the entry is malformed",
        "duplicate_plan_id" => "none was written: a permit for this plan_id already existed",
        "dry_run_allow" | "dry_run_deny" => "none was written: a dry run writes no permit",
        "revoked" => "a halt rewrote the allow into a deny (revoked)",
        _ => return None,
    })
}

/// The shortest prefix of a plan_id that `explain` looks up as a prefix
/// (what the log lines show is 8 characters).
pub const MIN_PREFIX: usize = 8;

/// What the record search found.
#[derive(Debug, Clone, PartialEq)]
pub enum Found {
    /// The newest record of the one plan that matched.
    One(HashMap<String, String>),
    /// More than one plan_id starts with the prefix (up to 10 of them,
    /// newest first).
    Ambiguous(Vec<String>),
    /// No record holds that plan_id, or a plan_id starting with it.
    Nothing,
}

/// Finds the newest record of `query`: the plan_id itself, or, for a query
/// of at least [`MIN_PREFIX`] characters, the one plan_id among the
/// records searched that starts with it (SPEC §14).
pub async fn find(
    con: &mut crate::redis::store::Conn,
    query: &str,
) -> Result<Found, redis::RedisError> {
    // The live record first, then a dry run's (SPEC §14).
    match find_in(con, keys::DECISIONS_STREAM, query).await? {
        Found::Nothing => find_in(con, keys::DECISIONS_DRY_RUN, query).await,
        Found::One(mut r) => {
            // A halt's revocation is recorded on its own stream (SPEC §12).
            if !r.contains_key("revoked_at") {
                if let Some(id) = r.get("plan_id").cloned() {
                    if let Some(at) = revoked_at(con, &id).await? {
                        r.insert("revoked_at".into(), at);
                    }
                }
            }
            Ok(Found::One(r))
        }
        found => Ok(found),
    }
}

/// The record ID of the newest revocation of `plan_id`, if any (at most
/// [`MAX_SCANNED`] revocations back).
async fn revoked_at(
    con: &mut crate::redis::store::Conn,
    plan_id: &str,
) -> Result<Option<String>, redis::RedisError> {
    let mut pages = RangeCursor::newest_first(keys::REVOCATIONS_STREAM);
    let mut scanned = 0;
    while scanned < MAX_SCANNED {
        let entries = pages.next_page(con, 1000).await?;
        if entries.is_empty() {
            break;
        }
        for e in &entries {
            let hit = e.fields.as_ref().is_some_and(|f| {
                f.get("plan_id").map(String::as_str) == Some(plan_id)
                    && f.get("outcome").map(String::as_str) == Some("revoked")
            });
            if hit {
                return Ok(Some(e.id.clone()));
            }
        }
        scanned += entries.len();
    }
    Ok(None)
}

/// [`find`] in one stream.
async fn find_in(
    con: &mut crate::redis::store::Conn,
    stream: &'static str,
    query: &str,
) -> Result<Found, redis::RedisError> {
    let mut pages = RangeCursor::newest_first(stream);
    let by_prefix = query.chars().count() >= MIN_PREFIX;
    let mut first: Option<HashMap<String, String>> = None;
    let mut candidates: Vec<String> = Vec::new();
    let mut more = false;
    let mut scanned = 0;
    // A halt's revocation of a plan's allow, newest first: the decision
    // itself is the older record, which is what is explained.
    let mut revoked: HashMap<String, String> = HashMap::new();
    while scanned < MAX_SCANNED {
        let entries = pages.next_page(con, 1000).await?;
        if entries.is_empty() {
            break;
        }
        for e in &entries {
            let Some(f) = &e.fields else { continue };
            let Some(id) = f.get("plan_id") else { continue };
            if f.get("outcome").map(String::as_str) == Some("revoked") {
                revoked.entry(id.clone()).or_insert_with(|| e.id.clone());
                continue;
            }
            let with_id = || {
                let mut f = f.clone();
                f.insert("record_id".into(), e.id.clone());
                if let Some(r) = revoked.get(id) {
                    f.insert("revoked_at".into(), r.clone());
                }
                f
            };
            if id == query {
                return Ok(Found::One(with_id()));
            }
            if by_prefix && id.starts_with(query) && !candidates.contains(id) {
                if candidates.len() < 10 {
                    candidates.push(id.clone());
                } else {
                    more = true;
                }
                if first.is_none() {
                    first = Some(with_id());
                }
            }
        }
        scanned += entries.len();
    }
    Ok(match (candidates.len(), first) {
        (1, Some(r)) if !more => Found::One(r),
        (0, _) => Found::Nothing,
        _ => Found::Ambiguous(candidates),
    })
}

/// The record, in words.
pub fn describe(r: &HashMap<String, String>, permit: Option<&str>) -> String {
    // Every value a record holds is cut, then escaped, as any echo (SPEC
    // §14): a record is data, never terminal input, whoever wrote it.
    let g = |k: &str| clip(r.get(k).map_or("", String::as_str)).into_owned();
    let raw = |k: &str| r.get(k).map_or("", String::as_str);
    let s = |v: &Value| clip(v.as_str().unwrap_or("")).into_owned();
    let compact = |v: &Value| crate::text::clip_to(&compact(v), JSON_MAX_CHARS).into_owned();
    let inputs: Value = serde_json::from_str(raw("inputs")).unwrap_or(Value::Null);
    let plan: Value = serde_json::from_str(raw("plan")).unwrap_or(Value::Null);
    let mut out = String::new();
    out.push_str(&format!(
        "plan      {} {} (entry {}, recorded {} by {}, version {}, config {})\n",
        g("plan_id"),
        g("symbol"),
        g("entry_id"),
        g("record_id"),
        g("consumer"),
        g("version"),
        g("config")
    ));
    let qty = if g("safe_qty").is_empty() {
        String::new()
    } else {
        format!(" safe_qty={}", g("safe_qty"))
    };
    out.push_str(&format!(
        "outcome   {}: {}{qty}\n",
        g("outcome"),
        g("reason")
    ));
    let rule = match raw("outcome") {
        "not_allowlisted" | "skip_decision" | "malformed" => {
            format!("no rule: the plan was not evaluated ({})", g("outcome"))
        }
        _ => rule_of(raw("reason")),
    };
    out.push_str(&format!("decided by {rule}\n"));
    if let Some(rules) = inputs.get("rules").and_then(Value::as_str) {
        let own = rules.split_once(':').map_or(rules, |(_, r)| r);
        if own != raw("reason") {
            out.push_str(&format!(
                "          the rules alone said {}; a guard of the write changed it\n",
                clip(rules)
            ));
        }
    }
    if plan.get("decision").is_some() {
        out.push_str(&format!(
            "plan read decision={} action={} reduceOnly={} side={}\n",
            s(&plan["decision"]),
            s(&plan["action"]),
            compact(&plan["reduce_only"]),
            s(&plan["side"])
        ));
    }
    if inputs.get("snapshot").is_some() {
        let s = &inputs["snapshot"];
        let snap = if s.get("missing").is_some() {
            "none".to_string()
        } else if let Some(f) = s.get("invalid") {
            format!("invalid ({})", compact(f))
        } else {
            let age = inputs["now"].as_f64().unwrap_or(0.0) - s["ts"].as_f64().unwrap_or(0.0);
            format!(
                "position_amt {} ({:.1} s old{})",
                clip(s["amt"].as_str().unwrap_or("?")),
                age,
                if s["hedged"] == true { ", HEDGED" } else { "" }
            )
        };
        out.push_str(&format!("exchange  {snap}\n"));
        out.push_str(&format!(
            "ledger    {}   cooldown {}   step {}{}\n",
            compact(&inputs["ledger"]),
            compact(&inputs["cooldown"]),
            clip(inputs["step"].as_str().unwrap_or("?")),
            if inputs["step_fallback"] == true {
                " (the 0.001 fallback)"
            } else {
                ""
            }
        ));
    }
    if let Some(gd) = inputs.get("guards") {
        out.push_str(&format!("guards    {}\n", compact(gd)));
    }
    out.push_str(&format!(
        "allowlist source={} at now={}\n",
        clip(inputs["allowlist"].as_str().unwrap_or("?")),
        compact(&inputs["now"])
    ));
    let gone = match no_permit(raw("outcome")) {
        Some(why) if permit.is_none() => why,
        _ => "(no longer in Redis: consumed by the executor, or expired)",
    };
    let shown = permit.map(|p| crate::text::clip_to(p, JSON_MAX_CHARS).into_owned());
    out.push_str(&format!("permit    {}\n", shown.as_deref().unwrap_or(gone)));
    if let Some(at) = r.get("revoked_at") {
        out.push_str(&format!(
            "revoked   a halt rewrote this allow into a deny (record {})\n",
            clip(at)
        ));
    } else if permit.is_some_and(revoked_permit) {
        // The permit says so, though its revocation record was trimmed.
        out.push_str(
            "revoked   a halt rewrote this allow into a deny (the permit says so; its record is past the revocations' MAXLEN)\n",
        );
    }
    out
}

/// Whether a permit is a deny a halt wrote over an allow (`context.revoked`).
fn revoked_permit(permit: &str) -> bool {
    serde_json::from_str::<Value>(permit)
        .is_ok_and(|v| v["allow"] == false && v["context"]["revoked"] == true)
}

fn compact(v: &Value) -> String {
    match v {
        Value::Null => "none".to_string(),
        other => other.to_string(),
    }
}

/// Runs `explain`; returns the exit code.
pub async fn run(cfg: &Config, plan_id: &str) -> i32 {
    let mut con = match store::Redis::new(cfg.redis.clone())
        .connect_once(Duration::from_secs(5))
        .await
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "explain: cannot reach Redis at {}: {e}",
                cfg.redis.display()
            );
            return 1;
        }
    };
    let found = match find(&mut con, plan_id).await {
        Ok(f) => f,
        Err(e) => {
            eprintln!("explain: Redis error: {e}");
            return 1;
        }
    };
    let r = match found {
        Found::One(r) => r,
        Found::Ambiguous(ids) => {
            eprintln!(
                "explain: {:?} is the start of more than one plan_id; give more of it:",
                clip(plan_id)
            );
            for id in ids {
                eprintln!("  {}", clip(&id));
            }
            return 1;
        }
        Found::Nothing => {
            eprintln!(
                "explain: no record of plan {:?} (nor of a plan_id starting with it) in the last {MAX_SCANNED} records of {}",
                clip(plan_id),
                keys::DECISIONS_STREAM
            );
            return 1;
        }
    };
    let full = r.get("plan_id").cloned().unwrap_or_default();
    let permit: Option<String> = redis::cmd("GET")
        .arg(keys::permit(&full))
        .query_async(&mut con)
        .await
        .ok()
        .flatten();
    print!("{}", describe(&r, permit.as_deref()));
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rules_table_in_docs_is_the_one_the_code_uses() {
        let doc = include_str!("../../docs/rules.md");
        for (reason, row, what) in RULES {
            let line = if reason.is_empty() {
                format!("| {row} | — | {what} |")
            } else {
                format!("| {row} | `{reason}` | {what} |")
            };
            assert!(doc.contains(&line), "docs/rules.md lacks: {line}");
        }
        let rows = doc
            .lines()
            .filter(|l| l.starts_with("| ") && !l.starts_with("| row"))
            .count();
        assert_eq!(
            rows,
            RULES.len(),
            "docs/rules.md has rows the code does not"
        );
        // Every reason a permit can carry has its row.
        let reasons: Vec<&str> = crate::gate::rules::Reason::ALL
            .iter()
            .map(|r| r.as_str())
            .chain([
                "reconcile_close_bypass",
                "open_permit_granted",
                "sanity_checks_passed",
            ])
            .collect();
        for r in reasons {
            assert!(RULES.iter().any(|(x, _, _)| *x == r), "{r} has no row");
            assert!(!rule_of(r).starts_with("no rule"), "{r}");
        }
        assert_eq!(
            rule_of("reconcile_required_qty_mismatch"),
            "row 7b: ledger and exchange quantities differ beyond tolerance"
        );
        assert_eq!(
            rule_of("trading_halted"),
            "state: the trading state HALTED (the kill switch)"
        );
    }
}
