//! Permits: the JSON of SPEC §6 and the one atomic write that stores permits
//! and ACKs their plan entries.
//!
//! Keys: `quantum:permit:p33:<plan_id>` (string, `SET … PX ttl`),
//! `quantum:reconcile:hold:<symbol>` (read), and the plan stream's pending
//! entries list (`XACK`). A whole batch is one script call. For each entry
//! the script ACKs first and writes the permit only when the ACK removed a
//! pending entry: an entry that another consumer already handled (after a
//! claim) never gets a second permit. Allows other than a reconcile close are
//! turned into `reconcile_hold_active` denials when the hold key holds a
//! value, inside the same script, so the hold cannot change in between.

use rust_decimal::Decimal;
use serde_json::{json, Value};

use crate::domain::dec_json;
use crate::keys;
use crate::rules::{Allow, Deny, Reason};

/// `created_at`: epoch seconds as a float, rounded to microseconds.
fn created(now: f64) -> Value {
    json!((now * 1e6).round() / 1e6)
}

/// The allow permit of SPEC §6.
pub fn allow_json(plan_id: &str, symbol: &str, a: &Allow, now: f64) -> String {
    json!({
        "allow": true,
        "plan_id": plan_id,
        "symbol": symbol,
        "safe_qty": dec_json(a.safe_qty),
        "safe_close_qty": dec_json(a.safe_qty),
        "exchange_position_amt": dec_json(a.exchange_amt),
        "ledger_amt": dec_json(a.ledger_amt),
        "reason": a.reason.as_str(),
        "created_at": created(now),
    })
    .to_string()
}

/// The deny permit of SPEC §6.
pub fn deny_json(plan_id: &str, symbol: &str, d: &Deny, now: f64) -> String {
    json!({
        "allow": false,
        "plan_id": plan_id,
        "symbol": symbol,
        "reason": d.reason.as_str(),
        "context": Value::Object(d.context.clone()),
        "created_at": created(now),
    })
    .to_string()
}

/// The deny an allow becomes under a reconcile hold.
pub fn hold_deny(exchange_amt: Decimal, ledger_amt: Decimal) -> Deny {
    let context = json!({
        "exchange_amt": dec_json(exchange_amt),
        "ledger_amt": dec_json(ledger_amt),
        "p34_hold": "active",
    });
    Deny {
        reason: Reason::ReconcileHoldActive,
        context: match context {
            Value::Object(m) => m,
            _ => serde_json::Map::new(),
        },
    }
}

/// What to do with one stream entry.
#[derive(Debug, Clone)]
pub enum Write {
    /// ACK only (filtered, malformed, dry run).
    AckOnly {
        /// The stream entry to ACK.
        entry_id: String,
    },
    /// ACK and write `body`; with `hold`, write `hold_body` instead when the
    /// symbol's hold key holds a value.
    Permit {
        /// The stream entry to ACK.
        entry_id: String,
        /// The plan, for the permit key.
        plan_id: String,
        /// The symbol, for the hold key.
        symbol: String,
        /// The permit JSON as evaluated.
        body: String,
        /// The hold-deny JSON, when a hold would turn this allow into a deny.
        hold: Option<String>,
    },
}

/// What the script did with one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// The entry was not pending any more (handled elsewhere): nothing written.
    AlreadyAcked,
    /// ACKed, no permit (as asked).
    Acked,
    /// ACKed and the permit written as evaluated.
    Permit,
    /// ACKed and the hold denial written instead of the allow.
    HoldDenied,
    /// ACKed without a permit: a permit for this `plan_id` already exists
    /// (an earlier entry with the same id); the first decision stands.
    DuplicatePlanId,
}

/// Writes a batch atomically; one result per write, in order.
pub async fn write_batch(
    con: &mut redis::aio::ConnectionManager,
    stream: &str,
    group: &str,
    ttl_ms: u64,
    writes: &[Write],
) -> Result<Vec<Written>, redis::RedisError> {
    if writes.is_empty() {
        return Ok(Vec::new());
    }
    let mut inv = crate::scripts::WRITE_PERMITS.prepare_invoke();
    inv.arg(stream).arg(group).arg(ttl_ms);
    // Unused key slots still need a name; the ACK-only placeholder is never touched.
    for w in writes {
        match w {
            Write::AckOnly { entry_id } => {
                inv.key(keys::unused(keys::permit))
                    .key(keys::unused(keys::hold));
                inv.arg(entry_id).arg("0").arg("").arg("");
            }
            Write::Permit {
                entry_id,
                plan_id,
                symbol,
                body,
                hold,
            } => {
                inv.key(keys::permit(plan_id)).key(keys::hold(symbol));
                let mode = if hold.is_some() { "2" } else { "1" };
                inv.arg(entry_id)
                    .arg(mode)
                    .arg(body)
                    .arg(hold.as_deref().unwrap_or(""));
            }
        }
    }
    let codes: Vec<i64> = inv.invoke_async(con).await?;
    if codes.len() != writes.len() {
        return Err(script_error(format!(
            "write script returned {} results for {} entries",
            codes.len(),
            writes.len()
        )));
    }
    codes
        .into_iter()
        .map(|c| match c {
            0 => Ok(Written::AlreadyAcked),
            1 => Ok(Written::Acked),
            2 => Ok(Written::Permit),
            3 => Ok(Written::HoldDenied),
            4 => Ok(Written::DuplicatePlanId),
            other => Err(script_error(format!(
                "write script returned the unknown code {other}"
            ))),
        })
        .collect()
}

fn script_error(msg: String) -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::TypeError, "unexpected reply", msg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::AllowReason;
    use std::str::FromStr;

    #[test]
    fn allow_permit_has_exactly_the_spec_fields() {
        let a = Allow {
            reason: AllowReason::SanityChecksPassed,
            safe_qty: Decimal::from_str("0.028").unwrap(),
            exchange_amt: Decimal::from_str("0.038").unwrap(),
            ledger_amt: Decimal::ZERO,
            hold_applies: true,
        };
        let v: Value =
            serde_json::from_str(&allow_json("p1", "BTCUSDT", &a, 1769920000.25)).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(
            keys,
            vec![
                "allow",
                "created_at",
                "exchange_position_amt",
                "ledger_amt",
                "plan_id",
                "reason",
                "safe_close_qty",
                "safe_qty",
                "symbol"
            ]
        );
        assert_eq!(v["safe_qty"].to_string(), "0.028");
        assert_eq!(v["safe_close_qty"].to_string(), "0.028");
        assert_eq!(v["created_at"].as_f64(), Some(1769920000.25));
    }

    #[test]
    fn hold_deny_context() {
        let d = hold_deny(Decimal::from_str("-1.5").unwrap(), Decimal::ZERO);
        let v: Value = serde_json::from_str(&deny_json("p1", "ETHUSDT", &d, 1.0)).unwrap();
        assert_eq!(v["reason"], "reconcile_hold_active");
        assert_eq!(
            v["context"].to_string(),
            r#"{"exchange_amt":-1.5,"ledger_amt":0,"p34_hold":"active"}"#
        );
        assert_eq!(v["allow"], false);
    }
}
