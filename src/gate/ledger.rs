//! Ledger metadata: follows `quantum:stream:apply.result` (SPEC §8).
//!
//! Group `p33-ledger` (`p33-ledger-dryrun` in dry run, which writes nothing).
//! For an executed result with a non-empty `steps_results` list it writes the
//! last step's order metadata to `quantum:position:ledger:<symbol>`
//! (`last_order_id`, `last_result_plan_id`, `last_executed_qty`,
//! `last_order_side`, `updated_at`, EXPIRE 86400) and ACKs the entry in the
//! same script, so an entry is applied once across restarts. It never writes
//! `last_known_amt`, `ledger_amt` or `last_side`: the executor and the
//! reconcile service own them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::observe::metrics::Metrics;
use crate::redis::keys::{self, valid_symbol, RESULT_STREAM};
use crate::redis::store;
use crate::redis::stream::{BatchHandler, Entry, GroupReader};
use crate::text::clip;

/// Result entries per read.
const BATCH: usize = 64;
/// `BLOCK` of a read, ms.
const BLOCK_MS: u64 = 1000;

/// The metadata one result entry writes.
#[derive(Debug, Clone, PartialEq)]
pub struct LedgerMeta {
    /// The symbol (valid, so safe in a key).
    pub symbol: String,
    /// `last_order_id`.
    pub order_id: String,
    /// `last_result_plan_id`.
    pub plan_id: String,
    /// `last_executed_qty`.
    pub executed_qty: String,
    /// `last_order_side`: BUY or SELL.
    pub order_side: String,
}

/// What to do with one result entry.
#[derive(Debug, Clone, PartialEq)]
pub enum ResultAction {
    /// Write the metadata and ACK.
    Apply(LedgerMeta),
    /// Not executed: ACK quietly.
    Skip,
    /// Executed but unusable: ACK with a WARN naming why.
    Malformed(String),
}

fn field<'a>(v: &'a Value, names: &[&str]) -> Option<&'a Value> {
    names
        .iter()
        .find_map(|n| v.get(*n))
        .filter(|v| !v.is_null())
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Decides what a result entry means (pure).
pub fn interpret(fields: &HashMap<String, String>) -> ResultAction {
    let executed = matches!(
        fields.get("executed").map(|s| s.trim()),
        Some("true" | "True" | "TRUE" | "1")
    );
    if !executed {
        return ResultAction::Skip;
    }
    let Some(raw) = fields.get("steps_results") else {
        return match fields.get("details") {
            Some(details) => interpret_details(fields, details),
            None => ResultAction::Malformed("executed without steps_results or details".into()),
        };
    };
    let steps: Value = match parse_json(raw) {
        Ok(v) => v,
        Err(e) => return ResultAction::Malformed(format!("steps_results is not JSON: {e}")),
    };
    let Some(last) = steps.as_array().and_then(|a| a.last()) else {
        return ResultAction::Malformed("steps_results is not a non-empty list".into());
    };
    let symbol = fields
        .get("symbol")
        .cloned()
        .or_else(|| field(last, &["symbol"]).map(scalar))
        .unwrap_or_default();
    meta(
        fields,
        symbol,
        last,
        "last step",
        &["executed_qty", "executedQty", "qty", "quantity"],
    )
}

/// The largest `steps_results` / `details` JSON taken (an order result is a
/// few hundred bytes).
const MAX_JSON_BYTES: usize = 64 * 1024;

fn parse_json(raw: &str) -> Result<Value, String> {
    if raw.len() > MAX_JSON_BYTES {
        return Err(format!("{} bytes, more than {MAX_JSON_BYTES}", raw.len()));
    }
    serde_json::from_str(raw).map_err(|e| e.to_string())
}

/// The intent executor's shape: `details` is a JSON object with
/// `order_id`, `filled_qty` (else `qty`), `side` and `order_status`; only a
/// FILLED or PARTIALLY_FILLED order is an execution (SPEC §8).
fn interpret_details(fields: &HashMap<String, String>, raw: &str) -> ResultAction {
    let details: Value = match parse_json(raw) {
        Ok(v) if v.is_object() => v,
        Ok(_) => return ResultAction::Malformed("details is not a JSON object".into()),
        Err(e) => return ResultAction::Malformed(format!("details is not JSON: {e}")),
    };
    let status = field(&details, &["order_status", "status"])
        .map(scalar)
        .unwrap_or_default()
        .to_ascii_uppercase();
    match status.as_str() {
        "FILLED" | "PARTIALLY_FILLED" => {}
        "" => return ResultAction::Malformed("details has no order_status".into()),
        _ => return ResultAction::Skip,
    }
    let symbol = fields
        .get("symbol")
        .cloned()
        .or_else(|| field(&details, &["symbol"]).map(scalar))
        .unwrap_or_default();
    meta(
        fields,
        symbol,
        &details,
        "details",
        &["filled_qty", "executed_qty", "executedQty", "qty"],
    )
}

/// The metadata of one execution from its order object (`last` step or
/// `details`); `what` names the object in WARN lines. Echoed values are cut.
fn meta(
    fields: &HashMap<String, String>,
    symbol: String,
    order: &Value,
    what: &str,
    qty_names: &[&str],
) -> ResultAction {
    if !valid_symbol(&symbol) {
        return ResultAction::Malformed(format!("invalid symbol {:?}", clip(&symbol)));
    }
    let side = field(order, &["side", "order_side"])
        .map(scalar)
        .unwrap_or_default()
        .to_ascii_uppercase();
    if side != "BUY" && side != "SELL" {
        return ResultAction::Malformed(format!("{what} side {:?} is not BUY/SELL", clip(&side)));
    }
    let Some(order_id) = field(order, &["order_id", "orderId"]).map(scalar) else {
        return ResultAction::Malformed(format!("{what} has no order_id"));
    };
    let executed_qty = field(order, qty_names).map(scalar).unwrap_or_default();
    ResultAction::Apply(LedgerMeta {
        symbol,
        order_id: clip(&order_id).into_owned(),
        plan_id: clip(fields.get("plan_id").map_or("", String::as_str)).into_owned(),
        executed_qty: clip(&executed_qty).into_owned(),
        order_side: side,
    })
}

/// The ledger follower as a handler of the shared group reader.
struct LedgerHandler {
    cfg: Arc<Config>,
    metrics: Arc<Metrics>,
}

impl BatchHandler for LedgerHandler {
    async fn handle(
        &mut self,
        con: &mut crate::redis::store::Conn,
        entries: &[Entry],
    ) -> Result<(), redis::RedisError> {
        let group = self.cfg.ledger_group();
        for e in entries {
            apply(con, &self.cfg, group, e, &self.metrics).await?;
        }
        Ok(())
    }
}

/// Runs the follower until `cancel` fires (see [`GroupReader::run`]): own
/// pending entries first, entries idle on other consumers claimed, a
/// vanished group recreated at the last entry finished here.
pub async fn run(
    cfg: Arc<Config>,
    redis: crate::redis::store::Redis,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let reader = GroupReader {
        who: "ledger follower",
        what: "apply.result",
        stream: RESULT_STREAM,
        group: cfg.ledger_group().to_string(),
        consumer: cfg.consumer_name.clone(),
        batch: BATCH,
        block: Duration::from_millis(BLOCK_MS),
        claim_idle: cfg.claim_idle,
    };
    let mut handler = LedgerHandler {
        cfg: cfg.clone(),
        metrics,
    };
    reader.run(&redis, &mut handler, &cancel).await;
}

async fn apply(
    con: &mut crate::redis::store::Conn,
    cfg: &Config,
    group: &str,
    e: &Entry,
    metrics: &Metrics,
) -> Result<(), redis::RedisError> {
    let action = match (&e.fields, &e.not_utf8) {
        (None, _) => ResultAction::Malformed("entry deleted while pending".into()),
        (Some(_), Some(what)) => ResultAction::Malformed(format!("{what} is not valid UTF-8")),
        (Some(f), None) => interpret(f),
    };
    let mut inv = crate::redis::scripts::APPLY_LEDGER.prepare_invoke();
    inv.arg(RESULT_STREAM).arg(group).arg(&e.id);
    let outcome = match (&action, cfg.dry_run) {
        (ResultAction::Apply(m), false) => {
            inv.key(keys::ledger(&m.symbol));
            inv.arg("1")
                .arg(&m.order_id)
                .arg(&m.plan_id)
                .arg(&m.executed_qty)
                .arg(&m.order_side)
                .arg(format!("{:.3}", store::now_epoch()));
            "applied"
        }
        (ResultAction::Apply(_), true) => {
            inv.key(keys::unused(keys::ledger)).arg("0");
            "dry_run"
        }
        (ResultAction::Skip, _) => {
            inv.key(keys::unused(keys::ledger)).arg("0");
            "skipped"
        }
        (ResultAction::Malformed(_), _) => {
            inv.key(keys::unused(keys::ledger)).arg("0");
            "malformed"
        }
    };
    let acked: i64 = inv.invoke_async(con).await?;
    if acked == 0 {
        debug!("apply.result {} was already acknowledged", e.id);
        return Ok(());
    }
    if acked == 2 {
        if let ResultAction::Apply(m) = &action {
            warn!(
                "{}: {} holds another type than a hash; result {} ACKed without ledger metadata",
                m.symbol,
                keys::ledger(&m.symbol),
                e.id
            );
        }
        metrics
            .ledger_updates_total
            .with_label_values(&["wrong_type"])
            .inc();
        return Ok(());
    }
    match &action {
        ResultAction::Apply(m) if !cfg.dry_run => info!(
            "{}: ledger metadata from result {} (order {} {} qty={})",
            m.symbol, e.id, m.order_id, m.order_side, m.executed_qty
        ),
        ResultAction::Apply(m) => info!(
            "{}: DRY-RUN would write ledger metadata from result {}",
            m.symbol, e.id
        ),
        ResultAction::Malformed(why) => warn!("malformed apply.result {}: {why} - ACK", e.id),
        ResultAction::Skip => debug!("apply.result {} not executed - ACK", e.id),
    }
    metrics
        .ledger_updates_total
        .with_label_values(&[outcome])
        .inc();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn interprets_results() {
        let steps = r#"[{"step":"open"},{"order_id":12345,"side":"sell","executed_qty":"0.028"}]"#;
        for (name, fields, want) in [
            (
                "executed true",
                f(&[
                    ("executed", "true"),
                    ("symbol", "BTCUSDT"),
                    ("plan_id", "p1"),
                    ("steps_results", steps),
                ]),
                "apply",
            ),
            (
                "executed True",
                f(&[
                    ("executed", "True"),
                    ("symbol", "BTCUSDT"),
                    ("steps_results", steps),
                ]),
                "apply",
            ),
            (
                "executed 1",
                f(&[
                    ("executed", "1"),
                    ("symbol", "BTCUSDT"),
                    ("steps_results", steps),
                ]),
                "apply",
            ),
            (
                "not executed",
                f(&[
                    ("executed", "false"),
                    ("symbol", "BTCUSDT"),
                    ("steps_results", steps),
                ]),
                "skip",
            ),
            ("no executed field", f(&[("symbol", "BTCUSDT")]), "skip"),
            (
                "empty steps",
                f(&[
                    ("executed", "true"),
                    ("symbol", "BTCUSDT"),
                    ("steps_results", "[]"),
                ]),
                "malformed",
            ),
            (
                "bad json",
                f(&[
                    ("executed", "true"),
                    ("symbol", "BTCUSDT"),
                    ("steps_results", "[{"),
                ]),
                "malformed",
            ),
            (
                "no steps",
                f(&[("executed", "true"), ("symbol", "BTCUSDT")]),
                "malformed",
            ),
            (
                "bad symbol",
                f(&[
                    ("executed", "true"),
                    ("symbol", "btc"),
                    ("steps_results", steps),
                ]),
                "malformed",
            ),
            (
                "bad side",
                f(&[
                    ("executed", "true"),
                    ("symbol", "BTCUSDT"),
                    ("steps_results", r#"[{"order_id":1,"side":"LONG"}]"#),
                ]),
                "malformed",
            ),
        ] {
            let got = match interpret(&fields) {
                ResultAction::Apply(_) => "apply",
                ResultAction::Skip => "skip",
                ResultAction::Malformed(_) => "malformed",
            };
            assert_eq!(got, want, "{name}");
        }
        let details = |status: &str| {
            format!(
                r#"{{"order_id": 987, "filled_qty": "0.5", "side": "BUY", "order_status": "{status}"}}"#
            )
        };
        for (status, want) in [
            ("FILLED", "apply"),
            ("PARTIALLY_FILLED", "apply"),
            ("NEW", "skip"),
            ("CANCELED", "skip"),
            ("REJECTED", "skip"),
        ] {
            let d = details(status);
            let got = match interpret(&f(&[
                ("executed", "true"),
                ("symbol", "ETHUSDT"),
                ("plan_id", "p9"),
                ("details", d.as_str()),
            ])) {
                ResultAction::Apply(m) => {
                    assert_eq!(
                        (
                            m.order_id.as_str(),
                            m.executed_qty.as_str(),
                            m.order_side.as_str()
                        ),
                        ("987", "0.5", "BUY")
                    );
                    "apply"
                }
                ResultAction::Skip => "skip",
                ResultAction::Malformed(w) => panic!("{status}: malformed {w}"),
            };
            assert_eq!(got, want, "{status}");
        }
        for (name, d) in [
            ("details not JSON", "{"),
            ("details a list", "[]"),
            (
                "details without status",
                r#"{"order_id": 1, "side": "BUY"}"#,
            ),
            (
                "details without order_id",
                r#"{"side": "BUY", "order_status": "FILLED"}"#,
            ),
            (
                "details side LONG",
                r#"{"order_id": 1, "side": "LONG", "order_status": "FILLED"}"#,
            ),
        ] {
            assert!(
                matches!(
                    interpret(&f(&[
                        ("executed", "true"),
                        ("symbol", "ETHUSDT"),
                        ("details", d)
                    ])),
                    ResultAction::Malformed(_)
                ),
                "{name}"
            );
        }
        let ResultAction::Apply(m) = interpret(&f(&[
            ("executed", "true"),
            ("symbol", "BTCUSDT"),
            ("plan_id", "p1"),
            ("steps_results", steps),
        ])) else {
            panic!("apply expected")
        };
        assert_eq!(
            m,
            LedgerMeta {
                symbol: "BTCUSDT".into(),
                order_id: "12345".into(),
                plan_id: "p1".into(),
                executed_qty: "0.028".into(),
                order_side: "SELL".into()
            }
        );
    }
}
