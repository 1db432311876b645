//! Rules: the pure evaluation of one plan (SPEC §5). No I/O, no clock.
//!
//! Raw values as read from Redis (the snapshot hash
//! `quantum:position:snapshot:<symbol>`, the ledger hash
//! `quantum:position:ledger:<symbol>`, the cooldown value
//! `quantum:cooldown:last_exec_ts:<symbol>`) are parsed by [`Inputs::parse`]
//! into typed inputs — each either the value or the denial it implies — and
//! [`evaluate`] takes the plan, those inputs, `now`, the limits and the
//! symbol's step size, and returns a [`Decision`]. Missing or doubtful input
//! is a denial: the gate fails closed. Quantities are [`Decimal`]s, rounded
//! down to whole steps, so JSON shows `0.028`, never `0.028000000000000004`.
//! The reconcile-hold check (turning an allow into a deny) happens inside the
//! atomic permit write, see `permits`.

use std::collections::HashMap;

use rust_decimal::prelude::FromPrimitive;
use rust_decimal::Decimal;
use serde_json::{json, Map, Value};

use crate::domain::{
    dec_json, dust, fallback_step, parse_amount, parse_f64, secs_json, PositionSide,
};
use crate::text::clip;

/// How far ahead of `now` a plan's entry ID or a snapshot may be, seconds.
pub const MAX_FUTURE_SKEW_S: f64 = 5.0;

/// The largest cooldown timestamp taken as real, ms (year 33658).
const MAX_COOLDOWN_MS: f64 = 1e15;

/// The `decision` field of a plan the rules evaluate (others are filtered
/// out before, SPEC §4 step 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanKind {
    /// `EXECUTE`: an open or a close, judged by every row.
    Execute,
    /// `RECONCILE_CLOSE`: row 4, needs only a real, fresh position.
    ReconcileClose,
}

impl PlanKind {
    /// `EXECUTE` / `RECONCILE_CLOSE`, else `None` (not evaluated).
    pub fn parse(decision: &str) -> Option<Self> {
        match decision {
            "EXECUTE" => Some(PlanKind::Execute),
            "RECONCILE_CLOSE" => Some(PlanKind::ReconcileClose),
            _ => None,
        }
    }

    /// The plan field's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PlanKind::Execute => "EXECUTE",
            PlanKind::ReconcileClose => "RECONCILE_CLOSE",
        }
    }
}

/// The plan's `side` field, parsed (SPEC §5 "A plan closes when…").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanSide {
    /// No `side`, or an empty one.
    Absent,
    /// `BUY` / `LONG`.
    Buy,
    /// `SELL` / `SHORT`.
    Sell,
    /// `CLOSE`: close in whatever direction the position requires.
    Close,
    /// Anything else: deny `invalid_plan`, never guessed.
    Invalid,
}

impl PlanSide {
    /// Parses the field, any case, blanks trimmed.
    pub fn parse(side: Option<&str>) -> Self {
        match side.map(|s| s.trim().to_ascii_uppercase()).as_deref() {
            None | Some("") => PlanSide::Absent,
            Some("BUY" | "LONG") => PlanSide::Buy,
            Some("SELL" | "SHORT") => PlanSide::Sell,
            Some("CLOSE") => PlanSide::Close,
            Some(_) => PlanSide::Invalid,
        }
    }
}

/// The plan fields the rules read.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The permit key's id (valid: 1-128 bytes, no blanks or controls).
    pub plan_id: String,
    /// An allowlisted symbol.
    pub symbol: String,
    /// EXECUTE or RECONCILE_CLOSE.
    pub kind: PlanKind,
    /// The `action` field (close actions, or anything else).
    pub action: String,
    /// The `reduceOnly` field, parsed.
    pub reduce_only: bool,
    /// The `side` field, parsed.
    pub side: PlanSide,
    /// Milliseconds part of the stream entry ID.
    pub entry_ms: u64,
}

/// `reduceOnly` is true for `true`/`1`/`yes` in any case.
pub fn parse_reduce_only(v: Option<&str>) -> bool {
    matches!(
        v.map(|s| s.trim().to_ascii_lowercase()).as_deref(),
        Some("true" | "1" | "yes")
    )
}

/// Thresholds from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `P33_STALE_THRESHOLD_SEC`.
    pub stale_threshold_s: f64,
    /// `P33_COOLDOWN_SEC`.
    pub cooldown_s: f64,
    /// `P33_QTY_TOLERANCE_PCT`.
    pub qty_tolerance_pct: f64,
    /// `P33_PLAN_MAX_AGE_S`.
    pub plan_max_age_s: f64,
}

/// Why an allow was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllowReason {
    /// Row 4: RECONCILE_CLOSE on a real position.
    ReconcileCloseBypass,
    /// Row 5: an open while flat and out of cooldown.
    OpenPermitGranted,
    /// Row 9: a close that passed every check.
    SanityChecksPassed,
}

impl AllowReason {
    /// The permit's `reason` string.
    pub fn as_str(self) -> &'static str {
        match self {
            AllowReason::ReconcileCloseBypass => "reconcile_close_bypass",
            AllowReason::OpenPermitGranted => "open_permit_granted",
            AllowReason::SanityChecksPassed => "sanity_checks_passed",
        }
    }
}

/// Why a plan was denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Row 0: the plan's stream entry is older than `P33_PLAN_MAX_AGE_S`.
    PlanExpired,
    /// Row 0b: the plan's stream entry ID is more than 5 s ahead of `now`.
    PlanFromFuture,
    /// A `side` field that is not BUY/SELL/LONG/SHORT: never guessed.
    InvalidPlan,
    /// Row 1: no snapshot hash for the symbol.
    NoExchangeSnapshot,
    /// Row 2: a snapshot field missing, unparseable, non-finite, from the
    /// future, or a hedge-mode snapshot with both sides open.
    InvalidExchangeSnapshot,
    /// Row 3: the snapshot is older than `P33_STALE_THRESHOLD_SEC`.
    StaleExchangeState,
    /// Rows 4 and 6: a close (or reconcile close) with no position.
    NoPosition,
    /// Row 5b: an open while a position exists (it would add to it).
    PositionExists,
    /// Row 7: a ledger amount present but unparseable or non-finite.
    InvalidLedger,
    /// Row 7: ledger and exchange disagree on the side.
    ReconcileRequiredSideMismatch,
    /// Row 7b: ledger and exchange quantities differ beyond tolerance.
    ReconcileRequiredQtyMismatch,
    /// Row 8: the last execution is less than the cooldown ago.
    CooldownInFlight,
    /// Row 8: the cooldown value is present but unparseable.
    InvalidCooldown,
    /// Row 9: the safe quantity rounds down to zero steps.
    SafeQtyBelowStep,
    /// The reconcile hold is set (applied inside the atomic write).
    ReconcileHoldActive,
    /// The trading state is HALTED (applied inside the atomic write).
    TradingHalted,
    /// The trading state is REDUCING and the plan opens (atomic write).
    TradingReducing,
    /// No gate has put the trading state in place on this Redis (the
    /// marker `quantum:p33:armed` is missing: Redis lost its data, or no
    /// instance has armed it yet; SPEC §12).
    TradingStateUnknown,
    /// An open throttle is full (SPEC §13; counted in the atomic write).
    Throttled,
    /// The position cap is reached (SPEC §13; counted in the atomic write).
    MaxOpenPositions,
    /// A key a guard of the atomic write needs (a limit's counter, the
    /// control stream for the latch) holds another type or cannot take an
    /// entry: the open is denied rather than judged without it (SPEC §11).
    InvalidGuardState,
}

impl Reason {
    /// Every deny reason, in the order of the rules table.
    pub const ALL: [Reason; 21] = [
        Reason::PlanExpired,
        Reason::PlanFromFuture,
        Reason::InvalidPlan,
        Reason::NoExchangeSnapshot,
        Reason::InvalidExchangeSnapshot,
        Reason::StaleExchangeState,
        Reason::NoPosition,
        Reason::PositionExists,
        Reason::InvalidLedger,
        Reason::ReconcileRequiredSideMismatch,
        Reason::ReconcileRequiredQtyMismatch,
        Reason::CooldownInFlight,
        Reason::InvalidCooldown,
        Reason::SafeQtyBelowStep,
        Reason::ReconcileHoldActive,
        Reason::TradingHalted,
        Reason::TradingReducing,
        Reason::TradingStateUnknown,
        Reason::Throttled,
        Reason::MaxOpenPositions,
        Reason::InvalidGuardState,
    ];

    /// The permit's `reason` string (and the metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::PlanExpired => "plan_expired",
            Reason::PlanFromFuture => "plan_from_future",
            Reason::InvalidPlan => "invalid_plan",
            Reason::NoExchangeSnapshot => "no_exchange_snapshot",
            Reason::InvalidExchangeSnapshot => "invalid_exchange_snapshot",
            Reason::StaleExchangeState => "stale_exchange_state",
            Reason::NoPosition => "no_position",
            Reason::PositionExists => "position_exists",
            Reason::InvalidLedger => "invalid_ledger",
            Reason::ReconcileRequiredSideMismatch => "reconcile_required_side_mismatch",
            Reason::ReconcileRequiredQtyMismatch => "reconcile_required_qty_mismatch",
            Reason::CooldownInFlight => "cooldown_in_flight",
            Reason::InvalidCooldown => "invalid_cooldown",
            Reason::SafeQtyBelowStep => "safe_qty_below_step",
            Reason::ReconcileHoldActive => "reconcile_hold_active",
            Reason::TradingHalted => "trading_halted",
            Reason::TradingReducing => "trading_reducing",
            Reason::TradingStateUnknown => "trading_state_unknown",
            Reason::Throttled => "throttled",
            Reason::MaxOpenPositions => "max_open_positions",
            Reason::InvalidGuardState => "invalid_guard_state",
        }
    }
}

/// An allow.
#[derive(Debug, Clone, PartialEq)]
pub struct Allow {
    /// Which row allowed it.
    pub reason: AllowReason,
    /// The quantity the executor may close, in whole steps (0 for opens).
    pub safe_qty: Decimal,
    /// Signed exchange amount (0 for opens, as in the original).
    pub exchange_amt: Decimal,
    /// Signed ledger amount (0 when there is none, and for opens).
    pub ledger_amt: Decimal,
    /// Whether a reconcile hold turns this allow into a deny (all but row 4).
    pub hold_applies: bool,
}

/// A denial, with the context the permit carries.
#[derive(Debug, Clone, PartialEq)]
pub struct Deny {
    /// Which row denied it.
    pub reason: Reason,
    /// The permit's `context` object.
    pub context: Map<String, Value>,
}

/// The outcome of evaluating one plan.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Write an allow permit (unless the hold turns it into a deny).
    Allow(Allow),
    /// Write a deny permit.
    Deny(Deny),
}

/// A value as read from Redis: missing, of another Redis type (named), or
/// present.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Raw<T> {
    #[default]
    /// The key does not exist.
    Missing,
    /// The key holds another Redis type (named).
    WrongType(String),
    /// The value.
    Present(T),
}

impl<T> Raw<T> {
    /// Borrows the present value.
    pub fn as_ref(&self) -> Raw<&T> {
        match self {
            Raw::Missing => Raw::Missing,
            Raw::WrongType(t) => Raw::WrongType(t.clone()),
            Raw::Present(v) => Raw::Present(v),
        }
    }

    /// Maps the present value.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Raw<U> {
        match self {
            Raw::Missing => Raw::Missing,
            Raw::WrongType(t) => Raw::WrongType(t),
            Raw::Present(v) => Raw::Present(f(v)),
        }
    }
}

/// The exchange snapshot of a symbol (rows 1–2), parsed.
#[derive(Debug, Clone, PartialEq)]
pub enum SnapshotInput {
    /// Row 1: no snapshot hash (or an empty one).
    Missing,
    /// Row 2: a field missing or unusable (`type` when the key is not a
    /// hash): `invalid_exchange_snapshot {field}`.
    Invalid {
        /// The snapshot field at fault (`type` for a wrong Redis type).
        field: &'static str,
    },
    /// A usable snapshot; `ts` and `hedged` are judged against `now` by the
    /// rules (rows 2–3).
    Valid(Snapshot),
}

/// A snapshot whose numbers parsed within bounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Snapshot {
    /// Signed position amount, |amt| ≤ 1e12.
    pub amt: Decimal,
    /// Snapshot time, epoch seconds (`ts_epoch_ms` preferred, SPEC §7).
    pub ts: f64,
    /// `side=HEDGED`: both hedge-mode sides open (row 2 denies).
    pub hedged: bool,
}

/// The ledger amount of a symbol (row 7), parsed.
#[derive(Debug, Clone, PartialEq)]
pub enum LedgerInput {
    /// Neither `last_known_amt` nor `ledger_amt`: no ledger position, rows
    /// 7 and 7b are skipped (metadata alone is no position).
    Absent,
    /// Present but unusable (`type` when the key is not a hash):
    /// `invalid_ledger {field, value}` with the value cut to 64 characters.
    Invalid {
        /// `last_known_amt`, `ledger_amt` or `type`.
        field: &'static str,
        /// The raw value, cut to 64 characters.
        value: String,
    },
    /// The signed ledger amount, |amt| ≤ 1e12.
    Amount(Decimal),
}

/// The last-execution time of a symbol (row 8), parsed.
#[derive(Debug, Clone, PartialEq)]
pub enum CooldownInput {
    /// No key: no cooldown.
    Absent,
    /// Present but not a timestamp: `invalid_cooldown {value}` (cut).
    Invalid {
        /// The raw value, cut to 64 characters.
        value: String,
    },
    /// Epoch milliseconds.
    At(f64),
}

/// Everything the rules read besides the plan, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Inputs {
    /// Rows 1–3.
    pub snapshot: SnapshotInput,
    /// Row 7.
    pub ledger: LedgerInput,
    /// Row 8.
    pub cooldown: CooldownInput,
}

impl Inputs {
    /// Parses the raw values of one symbol.
    pub fn parse(
        snapshot: Raw<&HashMap<String, String>>,
        ledger: Raw<&HashMap<String, String>>,
        cooldown: Raw<&str>,
    ) -> Inputs {
        Inputs {
            snapshot: parse_snapshot(snapshot),
            ledger: parse_ledger(ledger),
            cooldown: parse_cooldown(cooldown),
        }
    }
}

/// The snapshot time, epoch seconds: `ts_epoch_ms` when present and valid,
/// else `ts_epoch` (whole or decimal seconds, SPEC §7).
pub fn snapshot_ts(snap: &HashMap<String, String>) -> Option<f64> {
    snap.get("ts_epoch_ms")
        .and_then(|v| parse_f64(v))
        .filter(|ms| *ms > 0.0 && *ms < 1e15)
        .map(|ms| ms / 1000.0)
        .or_else(|| snap.get("ts_epoch").and_then(|v| parse_f64(v)))
}

/// Rows 1–2 as far as they need no clock.
pub fn parse_snapshot(raw: Raw<&HashMap<String, String>>) -> SnapshotInput {
    let snap = match raw {
        Raw::Missing => return SnapshotInput::Missing,
        Raw::WrongType(_) => return SnapshotInput::Invalid { field: "type" },
        Raw::Present(s) if s.is_empty() => return SnapshotInput::Missing,
        Raw::Present(s) => s,
    };
    let Some(amt) = snap.get("position_amt").and_then(|v| parse_amount(v)) else {
        return SnapshotInput::Invalid {
            field: "position_amt",
        };
    };
    let Some(ts) = snapshot_ts(snap) else {
        return SnapshotInput::Invalid { field: "ts_epoch" };
    };
    let hedged = snap
        .get("side")
        .is_some_and(|s| s.trim().eq_ignore_ascii_case(PositionSide::Hedged.as_str()));
    SnapshotInput::Valid(Snapshot { amt, ts, hedged })
}

/// Row 7's ledger amount: `last_known_amt`, else `ledger_amt`.
pub fn parse_ledger(raw: Raw<&HashMap<String, String>>) -> LedgerInput {
    let l = match raw {
        Raw::Missing => return LedgerInput::Absent,
        Raw::WrongType(t) => {
            return LedgerInput::Invalid {
                field: "type",
                value: clip(&t).into_owned(),
            }
        }
        Raw::Present(l) => l,
    };
    let Some((field, raw)) = l
        .get("last_known_amt")
        .map(|v| ("last_known_amt", v))
        .or_else(|| l.get("ledger_amt").map(|v| ("ledger_amt", v)))
    else {
        return LedgerInput::Absent;
    };
    match parse_amount(raw) {
        Some(a) => LedgerInput::Amount(a),
        None => LedgerInput::Invalid {
            field,
            value: clip(raw).into_owned(),
        },
    }
}

/// Row 8's timestamp: epoch ms within [0, 1e15].
pub fn parse_cooldown(raw: Raw<&str>) -> CooldownInput {
    let v = match raw {
        Raw::Missing => return CooldownInput::Absent,
        Raw::WrongType(t) => {
            return CooldownInput::Invalid {
                value: clip(&format!("<{t}>")).into_owned(),
            }
        }
        Raw::Present(v) => v,
    };
    match parse_f64(v).filter(|ms| (0.0..=MAX_COOLDOWN_MS).contains(ms)) {
        Some(ms) => CooldownInput::At(ms),
        None => CooldownInput::Invalid {
            value: clip(v).into_owned(),
        },
    }
}

/// Rounds `qty` down to a whole number of `step`s; zero when the step is
/// not positive or the arithmetic would overflow (which the input bounds
/// rule out, and which then denies `safe_qty_below_step`: fail closed).
pub fn floor_to_step(qty: Decimal, step: Decimal) -> Decimal {
    if step <= Decimal::ZERO {
        return Decimal::ZERO;
    }
    qty.checked_div(step)
        .and_then(|n| n.floor().checked_mul(step))
        .map_or(Decimal::ZERO, |d| d.normalize())
}

fn deny(reason: Reason, context: Value) -> Decision {
    let context = match context {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    Decision::Deny(Deny { reason, context })
}

/// Whether the plan closes (reduces) the position `amt`.
fn closes(plan: &Plan, amt: Decimal) -> bool {
    let a = plan.action.as_str();
    plan.reduce_only
        || matches!(a, "FULL_CLOSE_PROPOSED" | "PARTIAL_75" | "PARTIAL_50")
        || a.contains("CLOSE")
        || plan.side == PlanSide::Close
        || matches!(
            (plan.side, PositionSide::of(amt)),
            (PlanSide::Sell, PositionSide::Long) | (PlanSide::Buy, PositionSide::Short)
        )
}

/// The fraction of the position a close action asks for.
fn close_fraction(action: &str) -> Decimal {
    match action {
        "PARTIAL_75" => Decimal::new(75, 2),
        "PARTIAL_50" => Decimal::new(5, 1),
        _ => Decimal::ONE,
    }
}

/// Row 8: `Some(deny)` while in cooldown or when the value is unusable.
fn cooldown_check(cooldown: &CooldownInput, now: f64, lim: &Limits) -> Option<Decision> {
    let ms = match cooldown {
        CooldownInput::Absent => return None,
        CooldownInput::Invalid { value } => {
            return Some(deny(Reason::InvalidCooldown, json!({ "value": value })))
        }
        CooldownInput::At(ms) => *ms,
    };
    let since = now - ms / 1000.0;
    (since < lim.cooldown_s).then(|| {
        deny(
            Reason::CooldownInFlight,
            json!({
                "seconds_since_exec": secs_json(since),
                "cooldown_sec": secs_json(lim.cooldown_s),
                "last_exec_ts_ms": if ms.fract() == 0.0 { Value::from(ms as i64) } else { secs_json(ms) },
            }),
        )
    })
}

/// Evaluates one plan against the parsed inputs of its symbol (SPEC §5).
pub fn evaluate(plan: &Plan, inputs: &Inputs, now: f64, lim: &Limits, step: Decimal) -> Decision {
    // A key of the wrong Redis type is corruption: denied before anything,
    // whatever the plan.
    if inputs.snapshot == (SnapshotInput::Invalid { field: "type" }) {
        return deny(Reason::InvalidExchangeSnapshot, json!({ "field": "type" }));
    }
    if let LedgerInput::Invalid { field: "type", .. } = inputs.ledger {
        return deny(Reason::InvalidLedger, json!({ "field": "type" }));
    }
    // Row 0: expired plans are never judged on today's state.
    let age = now - plan.entry_ms as f64 / 1000.0;
    if age > lim.plan_max_age_s {
        return deny(
            Reason::PlanExpired,
            json!({ "age_seconds": secs_json(age) }),
        );
    }
    // Row 0b: a future entry ID would make every later auto ID look young.
    if -age > MAX_FUTURE_SKEW_S {
        return deny(
            Reason::PlanFromFuture,
            json!({ "skew_seconds": secs_json(-age) }),
        );
    }
    if plan.side == PlanSide::Invalid {
        return deny(Reason::InvalidPlan, json!({ "field": "side" }));
    }
    // Rows 1–2.
    let snap = match &inputs.snapshot {
        SnapshotInput::Missing => return deny(Reason::NoExchangeSnapshot, json!({})),
        SnapshotInput::Invalid { field } => {
            return deny(Reason::InvalidExchangeSnapshot, json!({ "field": field }))
        }
        SnapshotInput::Valid(s) => *s,
    };
    if snap.ts > now + MAX_FUTURE_SKEW_S {
        return deny(
            Reason::InvalidExchangeSnapshot,
            json!({ "field": "ts_epoch" }),
        );
    }
    if snap.hedged {
        return deny(Reason::InvalidExchangeSnapshot, json!({ "field": "side" }));
    }
    // Row 3.
    let snap_age = now - snap.ts;
    if snap_age > lim.stale_threshold_s {
        return deny(
            Reason::StaleExchangeState,
            json!({ "age_seconds": secs_json(snap_age) }),
        );
    }
    let ex = snap.amt;
    let abs_ex = ex.abs();
    let flat = abs_ex < dust();
    // Row 4: a reconcile close needs only a real, fresh position.
    if plan.kind == PlanKind::ReconcileClose {
        if flat {
            return deny(Reason::NoPosition, json!({ "exchange_amt": dec_json(ex) }));
        }
        let safe = floor_to_step(abs_ex, step);
        if safe.is_zero() {
            return deny(
                Reason::SafeQtyBelowStep,
                json!({ "requested": dec_json(abs_ex), "step": dec_json(step) }),
            );
        }
        return Decision::Allow(Allow {
            reason: AllowReason::ReconcileCloseBypass,
            safe_qty: safe,
            exchange_amt: ex,
            ledger_amt: Decimal::ZERO,
            hold_applies: false,
        });
    }
    if !closes(plan, ex) {
        // Rows 5 / 5b.
        if !flat {
            return deny(
                Reason::PositionExists,
                json!({ "exchange_amt": dec_json(ex) }),
            );
        }
        if let Some(d) = cooldown_check(&inputs.cooldown, now, lim) {
            return d;
        }
        return Decision::Allow(Allow {
            reason: AllowReason::OpenPermitGranted,
            safe_qty: Decimal::ZERO,
            exchange_amt: Decimal::ZERO,
            ledger_amt: Decimal::ZERO,
            hold_applies: true,
        });
    }
    // Row 6.
    if flat {
        return deny(Reason::NoPosition, json!({ "exchange_amt": dec_json(ex) }));
    }
    // Row 7: metadata alone is no ledger position.
    let ledger_amt = match &inputs.ledger {
        LedgerInput::Absent => Decimal::ZERO,
        LedgerInput::Invalid { field, value } => {
            return deny(
                Reason::InvalidLedger,
                json!({ "field": field, "value": value }),
            )
        }
        LedgerInput::Amount(la) => {
            let la = *la;
            let (es, ls) = (PositionSide::of(ex), PositionSide::of(la));
            if es != ls && es != PositionSide::None && ls != PositionSide::None {
                return deny(
                    Reason::ReconcileRequiredSideMismatch,
                    json!({ "exchange_side": es.as_str(), "ledger_side": ls.as_str() }),
                );
            }
            // Row 7b. Both amounts are bounded by `max_amount`, so this
            // cannot overflow; checked all the same, an overflow is a zero
            // tolerance (fail closed).
            let pct = Decimal::from_f64(lim.qty_tolerance_pct).unwrap_or(Decimal::ONE);
            let tolerance = abs_ex
                .checked_mul(pct)
                .and_then(|t| t.checked_div(Decimal::ONE_HUNDRED))
                .unwrap_or(Decimal::ZERO)
                .max(fallback_step());
            let diff = (abs_ex - la.abs()).abs();
            if diff > tolerance {
                return deny(
                    Reason::ReconcileRequiredQtyMismatch,
                    json!({
                        "exchange_amt": dec_json(ex),
                        "ledger_amt": dec_json(la),
                        "diff": dec_json(diff),
                        "tolerance": dec_json(tolerance),
                    }),
                );
            }
            la
        }
    };
    // Row 8.
    if let Some(d) = cooldown_check(&inputs.cooldown, now, lim) {
        return d;
    }
    // Row 9.
    let requested = abs_ex
        .checked_mul(close_fraction(&plan.action))
        .unwrap_or(Decimal::ZERO);
    let safe = floor_to_step(requested.min(abs_ex), step);
    if safe.is_zero() {
        return deny(
            Reason::SafeQtyBelowStep,
            json!({ "requested": dec_json(requested), "step": dec_json(step) }),
        );
    }
    Decision::Allow(Allow {
        reason: AllowReason::SanityChecksPassed,
        safe_qty: safe,
        exchange_amt: ex,
        ledger_amt,
        hold_applies: true,
    })
}

#[cfg(test)]
mod tests;
