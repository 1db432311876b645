//! The vocabulary every stage shares: bounded numbers from outside, clean
//! decimal output, position sides. No I/O; nothing here imports another
//! module of the crate but `text`.
//!
//! Numbers read from Redis, the exchange or a plan are parsed here, with
//! the bounds of SPEC §11, before any arithmetic: an absurd value is `None`
//! (and so a deny or a skipped symbol), never a panic.

use std::str::FromStr;

use rust_decimal::prelude::{FromPrimitive, ToPrimitive};
use rust_decimal::Decimal;
use serde_json::Value;

/// A position smaller than this is flat.
pub fn dust() -> Decimal {
    Decimal::new(1, 4)
}

/// The step used when the exchange did not give one for the symbol.
pub fn fallback_step() -> Decimal {
    Decimal::new(1, 3)
}

/// The largest position or ledger magnitude taken as real (SPEC §11 "Input
/// bounds"): anything above is an invalid value, never arithmetic input.
pub fn max_amount() -> Decimal {
    Decimal::from(1_000_000_000_000i64)
}

/// Whether a step size is usable: between 1e-12 and 1e9 (SPEC §11).
pub fn valid_step(step: Decimal) -> bool {
    step >= Decimal::new(1, 12) && step <= Decimal::from(1_000_000_000i64)
}

/// Parses a stored number: finite, decimal or scientific notation, within
/// what a [`Decimal`] holds (about ±7.9e28). Never panics.
pub fn parse_dec(s: &str) -> Option<Decimal> {
    let s = s.trim();
    if s.len() > 256 {
        return None;
    }
    let f: f64 = s.parse().ok()?;
    if !f.is_finite() || f.abs() >= 7.9e28 {
        return None;
    }
    Decimal::from_str(s)
        .ok()
        .or_else(|| {
            // `from_scientific` is only asked about exponents a Decimal can
            // hold; anything else goes through the (checked) float path.
            let exp = s
                .split(['e', 'E'])
                .nth(1)
                .and_then(|e| e.parse::<i32>().ok())?;
            (-28..=28)
                .contains(&exp)
                .then(|| Decimal::from_scientific(s).ok())
                .flatten()
        })
        .or_else(|| Decimal::from_f64(f))
}

/// A position or ledger amount: a number (as [`parse_dec`]) whose magnitude
/// is at most [`max_amount`].
pub fn parse_amount(s: &str) -> Option<Decimal> {
    parse_dec(s).filter(|d| d.abs() <= max_amount())
}

/// A finite float from a stored string of at most 256 bytes.
pub fn parse_f64(s: &str) -> Option<f64> {
    let s = s.trim();
    if s.len() > 256 {
        return None;
    }
    s.parse::<f64>().ok().filter(|f| f.is_finite())
}

/// A decimal as a JSON number with no binary-float noise: integers as
/// integers (`925`), others through their shortest round-trip form (`0.028`).
pub fn dec_json(d: Decimal) -> Value {
    let d = d.normalize();
    if d.fract().is_zero() {
        if let Some(i) = d.to_i64() {
            return Value::from(i);
        }
    }
    d.to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

/// A clean decimal string for log lines and hashes.
pub fn dec_str(d: Decimal) -> String {
    d.normalize().to_string()
}

/// Seconds rounded to milliseconds, as a JSON number (`null` if not finite).
pub fn secs_json(s: f64) -> Value {
    let r = (s * 1000.0).round() / 1000.0;
    serde_json::Number::from_f64(r).map_or(Value::Null, Value::Number)
}

/// The side of a position. Sides come from signs only, never from stored
/// side strings; `Hedged` is the exchange snapshot's word for a symbol
/// whose rows make no single position (SPEC §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PositionSide {
    /// Positive amount.
    Long,
    /// Negative amount.
    Short,
    /// Flat: below [`dust`].
    None,
    /// Both hedge-mode sides open, or rows that could not be taken as one.
    Hedged,
}

impl PositionSide {
    /// LONG / SHORT / NONE from a signed amount.
    pub fn of(amt: Decimal) -> Self {
        if amt.abs() < dust() {
            PositionSide::None
        } else if amt.is_sign_positive() {
            PositionSide::Long
        } else {
            PositionSide::Short
        }
    }

    /// The snapshot hash spelling (SPEC §7).
    pub fn as_str(self) -> &'static str {
        match self {
            PositionSide::Long => "LONG",
            PositionSide::Short => "SHORT",
            PositionSide::None => "NONE",
            PositionSide::Hedged => "HEDGED",
        }
    }
}

/// The operator's trading state (SPEC §12), strictest last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TradingState {
    /// Normal: every rule applies, nothing more.
    Active,
    /// Reduce only: opening allows become `trading_reducing` denies.
    Reducing,
    /// Kill switch: every allow becomes a `trading_halted` deny.
    Halted,
}

impl TradingState {
    /// Every state, mildest first.
    pub const ALL: [TradingState; 3] = [
        TradingState::Active,
        TradingState::Reducing,
        TradingState::Halted,
    ];

    /// `ACTIVE` / `REDUCING` / `HALTED`, any case and blanks trimmed.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        TradingState::ALL
            .into_iter()
            .find(|t| s.eq_ignore_ascii_case(t.as_str()))
    }

    /// How a stored value reads: anything that is not a state is `HALTED`
    /// (fail closed).
    pub fn from_stored(s: &str) -> Self {
        Self::from_stored_bytes(s.as_bytes())
    }

    /// How a stored value reads, byte for byte as the scripts' `state_of`
    /// (`src/redis/scripts/common.lua`) reads it: more than 16 bytes, bytes that
    /// are not UTF-8, or anything but a state after trimming Lua's `%s`
    /// (ASCII space, `\t\n\v\f\r`; a no-break space is no blank) is
    /// `HALTED`.
    pub fn from_stored_bytes(b: &[u8]) -> Self {
        if b.len() > 16 {
            return TradingState::Halted;
        }
        let blank = |c: &u8| matches!(c, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r');
        let start = b.iter().position(|c| !blank(c)).unwrap_or(b.len());
        let end = b.iter().rposition(|c| !blank(c)).map_or(start, |i| i + 1);
        let word = &b[start..end.max(start)];
        TradingState::ALL
            .into_iter()
            .find(|t| word.eq_ignore_ascii_case(t.as_str().as_bytes()))
            .unwrap_or(TradingState::Halted)
    }

    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TradingState::Active => "ACTIVE",
            TradingState::Reducing => "REDUCING",
            TradingState::Halted => "HALTED",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_parse_within_bounds_and_print_clean() {
        let d = |s: &str| Decimal::from_str(s).unwrap();
        for (raw, want) in [
            ("0.028", Some("0.028")),
            ("5e-1", Some("0.5")),
            (" 12 ", Some("12")),
            ("1e-400", Some("0")),
            ("NaN", None),
            ("inf", None),
            ("1e29", None),
            ("abc", None),
        ] {
            assert_eq!(
                parse_dec(raw).map(dec_str),
                want.map(str::to_string),
                "{raw}"
            );
        }
        assert!(parse_amount("1e12").is_some());
        assert!(parse_amount("1000000000000.001").is_none());
        assert!(valid_step(d("0.000000000001")) && !valid_step(d("0.0000000000001")));
        assert!(!valid_step(Decimal::from(1_000_000_001i64)));
        assert_eq!(dec_json(d("0.0280")).to_string(), "0.028");
        assert_eq!(dec_json(d("925.000")).to_string(), "925");
        assert_eq!(PositionSide::of(d("-0.5")), PositionSide::Short);
        assert_eq!(PositionSide::of(d("0.00005")), PositionSide::None);
        assert_eq!(PositionSide::Hedged.as_str(), "HEDGED");
        assert_eq!(TradingState::parse(" halted "), Some(TradingState::Halted));
        assert_eq!(TradingState::from_stored("paused"), TradingState::Halted);
        assert_eq!(
            TradingState::from_stored("Reducing"),
            TradingState::Reducing
        );
        for (raw, want) in [
            (&b"ACTIVE"[..], TradingState::Active),
            (b" \t\x0bActive\r\n", TradingState::Active),
            (b"reducing", TradingState::Reducing),
            ("ACTIVE\u{a0}".as_bytes(), TradingState::Halted),
            (b"ACTIVE\xe9", TradingState::Halted),
            (b"   ACTIVE        x", TradingState::Halted),
            (b"      ACTIVE      ", TradingState::Halted),
            (b"", TradingState::Halted),
        ] {
            assert_eq!(TradingState::from_stored_bytes(raw), want, "{raw:?}");
        }
        assert!(TradingState::Halted > TradingState::Reducing);
        assert!(TradingState::Reducing > TradingState::Active);
    }
}
