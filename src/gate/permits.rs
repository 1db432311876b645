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

use crate::config::Rate;
use crate::domain::dec_json;
use crate::domain::TradingState;
use crate::gate::record::Record;
use crate::gate::rules::{Allow, AllowReason, Decision, Deny, Reason};
use crate::redis::keys;

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

/// The deny a trading state turns an allow into (SPEC §12), as a template
/// for the whole batch: the write script puts the scope, the plan_id and
/// the symbol where the placeholders stand.
fn trading_deny_template(reason: Reason, now: f64) -> String {
    let context = match json!({ "scope": "__SCOPE__" }) {
        Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    deny_json("__PLAN__", "__SYMBOL__", &Deny { reason, context }, now)
}

/// The deny a halt (`trading_halted`) or a reduce (`trading_reducing`)
/// rewrites an outstanding allow into (SPEC §12): `{scope, revoked: true}`,
/// as a template for the revocation script.
pub fn revoked_template(halted: bool, now: f64) -> String {
    let mut context = serde_json::Map::new();
    context.insert("scope".into(), Value::from("__SCOPE__"));
    context.insert("revoked".into(), Value::from(true));
    let reason = if halted {
        Reason::TradingHalted
    } else {
        Reason::TradingReducing
    };
    deny_json("__PLAN__", "__SYMBOL__", &Deny { reason, context }, now)
}

/// The `throttled` deny of one throttle (SPEC §13), as a batch template.
fn throttled_template(scope: Scope, rate: Option<Rate>, now: f64) -> String {
    let Some(r) = rate else {
        return String::new();
    };
    deny_json("__PLAN__", "__SYMBOL__", &throttled_deny(scope, r), now)
}

/// The position cap's deny as a batch template (counts filled in by the
/// script).
fn cap_template(limit: Option<u32>, now: f64) -> String {
    let Some(limit) = limit else {
        return String::new();
    };
    let context = json!({
        "positions": "__POSITIONS__",
        "in_flight": "__INFLIGHT__",
        "limit": limit,
    });
    deny_json(
        "__PLAN__",
        "__SYMBOL__",
        &Deny {
            reason: Reason::MaxOpenPositions,
            context: match context {
                Value::Object(m) => m,
                _ => serde_json::Map::new(),
            },
        },
        now,
    )
}

/// The deny of a throttle: `throttled {scope, limit, window_s}`.
pub fn throttled_deny(scope: Scope, r: Rate) -> Deny {
    let w = r.window.as_secs_f64();
    let window_s = if w.fract() == 0.0 {
        json!(w as u64)
    } else {
        crate::domain::secs_json(w)
    };
    let context = json!({
        "scope": scope.as_str(),
        "limit": r.limit,
        "window_s": window_s,
    });
    Deny {
        reason: Reason::Throttled,
        context: match context {
            Value::Object(m) => m,
            _ => serde_json::Map::new(),
        },
    }
}

/// Which guards of the write script apply to a permit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// A deny: written as evaluated.
    Deny,
    /// An allow that closes: trading state (HALTED), then the hold.
    Close,
    /// An allow that opens: trading state (HALTED or REDUCING), then the hold.
    Open,
    /// A reconcile close: trading state (HALTED) only.
    ReconcileClose,
}

impl Guard {
    fn mode(self) -> &'static str {
        match self {
            Guard::Deny => "1",
            Guard::Close => "2",
            Guard::Open => "3",
            Guard::ReconcileClose => "4",
        }
    }
}

/// What to do with one stream entry.
#[derive(Debug, Clone)]
pub enum Write {
    /// ACK only (filtered, malformed).
    AckOnly {
        /// The stream entry to ACK.
        entry_id: String,
        /// Its decision record.
        record: Record,
    },
    /// ACK and write a permit, through the guards of `guard`.
    Permit {
        /// The stream entry to ACK.
        entry_id: String,
        /// The plan, for the permit key.
        plan_id: String,
        /// The symbol, for the hold and trading-state keys.
        symbol: String,
        /// Which guards apply.
        guard: Guard,
        /// The permit JSON as evaluated.
        body: String,
        /// The hold-deny JSON (empty when the hold does not apply).
        hold: String,
        /// Its decision record.
        record: Record,
    },
}

impl Write {
    /// The write of an evaluated plan: its permit and every deny a guard of
    /// the write script may put in its place.
    pub fn permit(
        entry_id: &str,
        plan_id: &str,
        symbol: &str,
        d: &Decision,
        now: f64,
        record: Record,
    ) -> Write {
        let (guard, body, hold) = match d {
            Decision::Allow(a) => {
                let guard = match a.reason {
                    AllowReason::ReconcileCloseBypass => Guard::ReconcileClose,
                    AllowReason::OpenPermitGranted => Guard::Open,
                    AllowReason::SanityChecksPassed => Guard::Close,
                };
                let hold = if a.hold_applies {
                    deny_json(
                        plan_id,
                        symbol,
                        &hold_deny(a.exchange_amt, a.ledger_amt),
                        now,
                    )
                } else {
                    String::new()
                };
                (guard, allow_json(plan_id, symbol, a, now), hold)
            }
            Decision::Deny(dn) => (
                Guard::Deny,
                deny_json(plan_id, symbol, dn, now),
                String::new(),
            ),
        };
        Write::Permit {
            entry_id: entry_id.to_string(),
            plan_id: plan_id.to_string(),
            symbol: symbol.to_string(),
            guard,
            body,
            hold,
            record,
        }
    }
}

/// Which trading state decided: the global one or the symbol's override.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// `quantum:p33:trading_state`.
    Global,
    /// `quantum:p33:trading_state:<symbol>`.
    Symbol,
}

impl Scope {
    /// The deny context's `scope`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Global => "global",
            Scope::Symbol => "symbol",
        }
    }
}

/// A guard key of the write script that an open needs (SPEC §11).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardKey {
    /// The global throttle's sorted set.
    Opens,
    /// The symbol's throttle sorted set.
    OpensSymbol,
    /// The position cap's sorted set.
    OpenPositions,
    /// The control stream (the latch's entry).
    Control,
    /// The index of allows a halt revokes.
    Allows,
    /// The index of opening allows a global reduce revokes.
    AllowsOpens,
    /// The symbol's index of allows.
    AllowsSymbol,
    /// The symbol's index of opening allows.
    AllowsSymbolOpens,
}

impl GuardKey {
    /// The key's name in this batch.
    pub fn name(self, b: &Batch<'_>, symbol: &str) -> String {
        match self {
            GuardKey::Opens => opens_key(b),
            GuardKey::OpensSymbol => b.max_opens_per_symbol.map_or_else(
                || keys::unused(keys::opens_unused),
                |r| keys::opens_symbol(window_ms(r), symbol),
            ),
            GuardKey::OpenPositions => keys::OPEN_POSITIONS.to_string(),
            GuardKey::Control => keys::CONTROL_STREAM.to_string(),
            GuardKey::Allows => keys::ALLOWS.to_string(),
            GuardKey::AllowsOpens => keys::ALLOWS_OPENS.to_string(),
            GuardKey::AllowsSymbol => keys::allows_symbol(symbol),
            GuardKey::AllowsSymbolOpens => keys::allows_symbol_opens(symbol),
        }
    }
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
    /// ACKed and `trading_halted` written instead of the allow.
    TradingHalted(Scope),
    /// ACKed and `trading_reducing` written instead of the open.
    TradingReducing(Scope),
    /// ACKed and `trading_state_unknown` written instead of the decision:
    /// Redis is not armed (SPEC §12).
    StateUnknown,
    /// ACKed and `throttled` written instead of the open (SPEC §13).
    Throttled(Scope),
    /// ACKed and `invalid_guard_state` written instead of the open: a key
    /// a guard needs holds another type, or a stream cannot take an entry.
    InvalidGuardState(GuardKey),
    /// ACKed and `max_open_positions` written instead of the open, with
    /// the symbols in flight the script counted.
    MaxOpenPositions {
        /// Symbols granted an open within the TTL that hold none yet.
        in_flight: u32,
    },
}

impl Written {
    /// The decision that was written (or, in dry run, would have been):
    /// the evaluated one, or the deny a guard put in its place.
    pub fn effective(self, evaluated: &Decision, symbol: &str, b: &Batch<'_>) -> Decision {
        if self == Written::StateUnknown {
            return Decision::Deny(Deny {
                reason: Reason::TradingStateUnknown,
                context: serde_json::Map::new(),
            });
        }
        let Decision::Allow(a) = evaluated else {
            return evaluated.clone();
        };
        let trading = |reason, scope: Scope| {
            Decision::Deny(Deny {
                reason,
                context: match json!({ "scope": scope.as_str() }) {
                    Value::Object(m) => m,
                    _ => serde_json::Map::new(),
                },
            })
        };
        match self {
            Written::HoldDenied => Decision::Deny(hold_deny(a.exchange_amt, a.ledger_amt)),
            Written::InvalidGuardState(k) => Decision::Deny(broken_deny(&k.name(b, symbol))),
            Written::TradingHalted(s) => trading(Reason::TradingHalted, s),
            Written::TradingReducing(s) => trading(Reason::TradingReducing, s),
            Written::MaxOpenPositions { in_flight } => Decision::Deny(Deny {
                reason: Reason::MaxOpenPositions,
                context: match json!({
                    "positions": b.positioned.len(),
                    "in_flight": in_flight,
                    "limit": b.max_open_positions.unwrap_or(0),
                }) {
                    Value::Object(m) => m,
                    _ => serde_json::Map::new(),
                },
            }),
            Written::Throttled(s) => {
                let rate = match s {
                    Scope::Global => b.max_opens,
                    Scope::Symbol => b.max_opens_per_symbol,
                };
                match rate {
                    Some(r) => Decision::Deny(throttled_deny(s, r)),
                    None => trading(Reason::Throttled, s),
                }
            }
            _ => evaluated.clone(),
        }
    }
}

/// What a batch write needs besides its writes.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    /// The plan stream.
    pub stream: &'a str,
    /// The consumer group.
    pub group: &'a str,
    /// Permit TTL, ms.
    pub ttl_ms: u64,
    /// The global trading state while its key is missing.
    pub default_state: TradingState,
    /// The trading state this instance knows from the control log (SPEC
    /// §12): enforced beside the keys. `None`: it knows none.
    pub known: Option<&'a crate::gate::known::Known>,
    /// Decide, write nothing.
    pub dry_run: bool,
    /// `created_at` of the permits.
    pub now: f64,
    /// `P33_MAX_OPENS`.
    pub max_opens: Option<Rate>,
    /// `P33_MAX_OPENS_PER_SYMBOL`.
    pub max_opens_per_symbol: Option<Rate>,
    /// `P33_THROTTLE_LATCH`.
    pub latch: bool,
    /// `P33_MAX_OPEN_POSITIONS`.
    pub max_open_positions: Option<u32>,
    /// The allowlisted symbols holding a position now (for the cap).
    pub positioned: &'a [String],
    /// `P33_DECISIONS_MAXLEN`; 0: no record.
    pub decisions_maxlen: u32,
    /// The records' `config`, `version` and `consumer`.
    pub config_hash: &'a str,
    /// The daemon's version.
    pub version: &'a str,
    /// This consumer's name.
    pub consumer: &'a str,
}

/// The limit and window (ms) of a throttle for the script; 0: off.
fn rate_args(r: Option<Rate>) -> (u32, u64) {
    r.map_or((0, 0), |r| (r.limit, window_ms(r)))
}

/// A throttle's window in ms (the name of its sorted sets).
pub fn window_ms(r: Rate) -> u64 {
    u64::try_from(r.window.as_millis()).unwrap_or(u64::MAX)
}

/// The `invalid_guard_state` deny naming a broken key, as a batch template
/// (`__KEY__` where the key goes).
fn guard_template(now: f64) -> String {
    deny_json("__PLAN__", "__SYMBOL__", &broken_deny("__KEY__"), now)
}

/// The deny of an open whose guard key cannot be used (SPEC §11).
pub fn broken_deny(key: &str) -> Deny {
    let mut context = serde_json::Map::new();
    context.insert("key".into(), Value::from(key));
    Deny {
        reason: Reason::InvalidGuardState,
        context,
    }
}

/// The batch's settings: the script's one JSON header (`ARGV[1]`).
/// `symbols`: the batch's evaluated symbols (their known overrides go in).
fn header(b: &Batch<'_>, symbols: &[&str]) -> String {
    let known_sym: serde_json::Map<String, Value> = b
        .known
        .map(|k| {
            symbols
                .iter()
                .filter_map(|s| {
                    k.overrides
                        .get(*s)
                        .map(|t| (s.to_string(), Value::from(t.as_str())))
                })
                .collect()
        })
        .unwrap_or_default();
    let (max_g, win_g) = rate_args(b.max_opens);
    let (max_s, win_s) = rate_args(b.max_opens_per_symbol);
    let latch_reason = b.max_opens.map_or_else(String::new, |r| {
        format!("throttle latch: more than P33_MAX_OPENS={r} opening allows")
    });
    json!({
        "stream": b.stream,
        "group": b.group,
        "ttl": b.ttl_ms,
        "default_state": b.default_state.as_str(),
        "known": b.known.map_or("", |k| k.global.as_str()),
        "known_id": b.known.map_or("", |k| k.last_id.as_str()),
        "known_sym": Value::Object(known_sym),
        // A dry run never arms Redis: it records what the state would do.
        "knows": b.known.is_some() && !b.dry_run,
        "unknown": deny_json(
            "__PLAN__",
            "__SYMBOL__",
            &Deny {
                reason: Reason::TradingStateUnknown,
                context: serde_json::Map::new(),
            },
            b.now
        ),
        "dry": b.dry_run,
        "halted": trading_deny_template(Reason::TradingHalted, b.now),
        "reducing": trading_deny_template(Reason::TradingReducing, b.now),
        "guard": guard_template(b.now),
        "max_g": max_g,
        "win_g": win_g,
        "max_s": max_s,
        "win_s": win_s,
        "throttled_g": throttled_template(Scope::Global, b.max_opens, b.now),
        "throttled_s": throttled_template(Scope::Symbol, b.max_opens_per_symbol, b.now),
        "latch": b.latch,
        "latch_reason": latch_reason,
        "cap": b.max_open_positions.unwrap_or(0),
        "positioned": b.positioned,
        "cap_tmpl": cap_template(b.max_open_positions, b.now),
        "maxlen": b.decisions_maxlen,
        "config": b.config_hash,
        "version": b.version,
        "consumer": b.consumer,
    })
    .to_string()
}

/// The error code of the script's refusal to write a batch whose record
/// stream cannot take the records (SPEC §11): nothing was written.
pub const GUARD_ERROR: &str = "P33GUARD";

/// The error code of the script's refusal to write a batch while Redis is
/// not armed and this instance knows the state (SPEC §12): nothing was
/// written; the batch stays pending until the guardian has restored the
/// keys and armed.
pub const UNARMED_ERROR: &str = "P33UNARMED";

/// The global throttle's key for this batch (an unused name while off).
fn opens_key(b: &Batch<'_>) -> String {
    b.max_opens.map_or_else(
        || keys::unused(keys::opens_unused),
        |r| keys::opens(window_ms(r)),
    )
}

/// What the script did with one entry, and the foreign permit it replaced
/// (`<type>:<reason>`), if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done {
    /// What was written.
    pub written: Written,
    /// A permit key of another type that was deleted and replaced.
    pub foreign: Option<String>,
}

/// Writes a batch atomically; one result per write, in order. In dry run
/// the guards decide but nothing is written.
pub async fn write_batch(
    con: &mut crate::redis::store::Conn,
    b: Batch<'_>,
    writes: &[Write],
) -> Result<Vec<Done>, redis::RedisError> {
    if writes.is_empty() {
        return Ok(Vec::new());
    }
    let mut inv = crate::redis::scripts::WRITE_PERMITS.prepare_invoke();
    inv.key(keys::TRADING_STATE)
        .key(opens_key(&b))
        .key(keys::CONTROL_STREAM)
        .key(keys::OPEN_POSITIONS)
        .key(keys::decisions(b.dry_run))
        .key(keys::LATCH)
        .key(keys::ALLOWS)
        .key(keys::ARMED)
        .key(keys::ALLOWS_OPENS);
    let symbols: Vec<&str> = writes
        .iter()
        .filter_map(|w| match w {
            Write::Permit { symbol, .. } => Some(symbol.as_str()),
            Write::AckOnly { .. } => None,
        })
        .collect();
    inv.arg(header(&b, &symbols));
    // Unused key slots still need a name; the ACK-only placeholder is never
    // touched, nor is the per-symbol throttle key while that throttle is off.
    let unused_opens = keys::unused(keys::opens_unused);
    for w in writes {
        match w {
            Write::AckOnly { entry_id, record } => {
                inv.key(keys::unused(keys::permit))
                    .key(keys::unused(keys::trading_state))
                    .key(&unused_opens)
                    .key(keys::unused(keys::allows_symbol))
                    .key(keys::unused(keys::allows_symbol_opens));
                inv.arg(entry_id).arg("0").arg("").arg("");
                if b.decisions_maxlen > 0 {
                    record_args(&mut inv, record);
                }
            }
            Write::Permit {
                entry_id,
                plan_id,
                symbol,
                guard,
                body,
                hold,
                record,
            } => {
                inv.key(keys::permit(plan_id))
                    .key(keys::trading_state(symbol));
                match b.max_opens_per_symbol {
                    Some(r) => inv.key(keys::opens_symbol(window_ms(r), symbol)),
                    None => inv.key(&unused_opens),
                };
                inv.key(keys::allows_symbol(symbol))
                    .key(keys::allows_symbol_opens(symbol));
                inv.arg(entry_id).arg(guard.mode()).arg(body).arg(hold);
                if b.decisions_maxlen > 0 {
                    record_args(&mut inv, record);
                }
            }
        }
    }
    let reply: Vec<redis::Value> = inv.invoke_async(con).await?;
    if reply.len() < writes.len() || !(reply.len() - writes.len()).is_multiple_of(2) {
        return Err(script_error(format!(
            "write script returned {} values for {} entries",
            reply.len(),
            writes.len()
        )));
    }
    let (codes, extra) = reply.split_at(writes.len());
    let mut done = codes
        .iter()
        .map(|v| match v {
            redis::Value::Int(c) => written_of(*c).map(|written| Done {
                written,
                foreign: None,
            }),
            other => Err(script_error(format!(
                "write script returned {other:?} for a code"
            ))),
        })
        .collect::<Result<Vec<Done>, _>>()?;
    for pair in extra.chunks_exact(2) {
        let (redis::Value::Int(i), redis::Value::BulkString(what)) = (&pair[0], &pair[1]) else {
            return Err(script_error(
                "write script returned a bad foreign permit".into(),
            ));
        };
        let slot = usize::try_from(*i)
            .ok()
            .and_then(|i| i.checked_sub(1))
            .and_then(|i| done.get_mut(i));
        if let Some(d) = slot {
            d.foreign = Some(String::from_utf8_lossy(what).into_owned());
        }
    }
    Ok(done)
}

/// What a code of the write script means.
fn written_of(c: i64) -> Result<Written, redis::RedisError> {
    Ok(match c {
        0 => Written::AlreadyAcked,
        1 => Written::Acked,
        2 => Written::Permit,
        3 => Written::HoldDenied,
        4 => Written::DuplicatePlanId,
        5 => Written::TradingHalted(Scope::Global),
        6 => Written::TradingHalted(Scope::Symbol),
        7 => Written::TradingReducing(Scope::Global),
        8 => Written::TradingReducing(Scope::Symbol),
        9 => Written::Throttled(Scope::Global),
        10 => Written::Throttled(Scope::Symbol),
        11 => Written::InvalidGuardState(GuardKey::Opens),
        12 => Written::InvalidGuardState(GuardKey::OpensSymbol),
        13 => Written::InvalidGuardState(GuardKey::OpenPositions),
        14 => Written::InvalidGuardState(GuardKey::Control),
        15 => Written::InvalidGuardState(GuardKey::Allows),
        16 => Written::StateUnknown,
        17 => Written::InvalidGuardState(GuardKey::AllowsOpens),
        18 => Written::InvalidGuardState(GuardKey::AllowsSymbol),
        19 => Written::InvalidGuardState(GuardKey::AllowsSymbolOpens),
        c if (1000..1_000_000).contains(&c) => Written::MaxOpenPositions {
            in_flight: (c - 1000) as u32,
        },
        other => {
            return Err(script_error(format!(
                "write script returned the unknown code {other}"
            )))
        }
    })
}

/// The seven record values of one entry (SPEC §14).
fn record_args(inv: &mut redis::ScriptInvocation<'_>, r: &Record) {
    inv.arg(&r.plan_id)
        .arg(&r.symbol)
        .arg(r.outcome)
        .arg(&r.reason)
        .arg(&r.safe_qty)
        .arg(&r.plan)
        .arg(&r.inputs);
}

fn script_error(msg: String) -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::TypeError, "unexpected reply", msg))
}

#[cfg(test)]
mod tests {
    use super::*;
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
