//! Positions (SPEC §7, §11, §16): one per symbol, folded from its legs —
//! the one-way `BOTH` leg, or hedge mode's `LONG` and `SHORT` — whether the
//! legs came from a positionRisk reply or the user data stream. Hostile rows
//! make the symbol invalid, never a sum.

use std::collections::{BTreeMap, HashMap};

use rust_decimal::Decimal;
use serde_json::Value;

use crate::domain::{dec_str, parse_amount, parse_dec, PositionSide};

use super::ExchangeError;

/// One symbol's position as written to its snapshot hash.
#[derive(Debug, Clone, PartialEq)]
pub struct Position {
    /// Signed amount (0 when flat or invalid).
    pub amt: Decimal,
    /// The side written to the snapshot hash.
    pub side: PositionSide,
    /// `entryPrice`, as the exchange wrote it (cut to 64 characters).
    pub entry_price: String,
    /// `markPrice`, as the exchange wrote it.
    pub mark_price: String,
    /// `unRealizedProfit` (summed for a hedged symbol).
    pub unrealized_pnl: String,
    /// `leverage`, as the exchange wrote it.
    pub leverage: String,
    /// Why the rows of this symbol could not be taken as one position
    /// (written as `HEDGED`, so its plans are denied), for the WARN line.
    pub problem: Option<&'static str>,
}

impl Position {
    /// No position (a symbol absent from a successful reply).
    pub(crate) fn flat() -> Self {
        Position {
            amt: Decimal::ZERO,
            side: PositionSide::None,
            entry_price: "0".into(),
            mark_price: "0".into(),
            unrealized_pnl: "0".into(),
            leverage: "0".into(),
            problem: None,
        }
    }

    /// A symbol whose rows make no single position: written as `HEDGED`
    /// with amount 0, so every plan for it is denied (SPEC §7, §11).
    pub(crate) fn invalid(problem: &'static str) -> Self {
        Position {
            side: PositionSide::Hedged,
            problem: Some(problem),
            ..Position::flat()
        }
    }
}

/// A position side of the exchange: one-way mode's `BOTH`, hedge mode's
/// `LONG` and `SHORT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Leg {
    /// One-way mode.
    Both,
    /// Hedge mode, long side.
    Long,
    /// Hedge mode, short side.
    Short,
}

impl Leg {
    /// `positionSide`/`ps`: absent or `BOTH` (any case) is one-way; another
    /// word is no side of Binance's (`None`).
    pub fn parse(s: Option<&str>) -> Option<Leg> {
        match s {
            None => Some(Leg::Both),
            Some(s) if s.eq_ignore_ascii_case("BOTH") => Some(Leg::Both),
            Some(s) if s.eq_ignore_ascii_case("LONG") => Some(Leg::Long),
            Some(s) if s.eq_ignore_ascii_case("SHORT") => Some(Leg::Short),
            Some(_) => None,
        }
    }

    /// Binance's word for the side.
    pub fn as_str(self) -> &'static str {
        match self {
            Leg::Both => "BOTH",
            Leg::Long => "LONG",
            Leg::Short => "SHORT",
        }
    }
}

/// One leg of a symbol: what the exchange said of it, and when.
#[derive(Debug, Clone, PartialEq)]
pub struct LegState {
    /// Signed amount.
    pub amt: Decimal,
    /// Entry price, as the exchange wrote it (cut to 64 characters).
    pub entry_price: String,
    /// Unrealized PnL, as the exchange wrote it.
    pub unrealized_pnl: String,
    /// Mark price (REST only; the stream carries none).
    pub mark_price: String,
    /// Leverage (REST only).
    pub leverage: String,
    /// The exchange's time of this state, ms: an event's `T`, a REST row's
    /// `updateTime`.
    pub updated_ms: u64,
}

/// The legs of one symbol, or why its rows make none.
pub type Legs = Result<BTreeMap<Leg, LegState>, &'static str>;

/// A raw field of a row as a string, cut to 64 characters.
pub(crate) fn row_field(r: &Value, k: &str) -> String {
    let s = match r.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "0".into(),
        Some(other) => other.to_string(),
    };
    crate::text::clip(&s).into_owned()
}

/// Folds one symbol's legs into its position. One non-zero leg is the
/// position (dust included: the rules decide what is flat); two are
/// `HEDGED` with the combined amount and PnL, so every plan is denied. A
/// flat symbol keeps the mark price and leverage the last positionRisk
/// reply gave (SPEC §19: P3.4 and the canonical hash read them for flat
/// symbols too).
pub fn fold(legs: &Legs) -> Position {
    let legs = match legs {
        Ok(l) => l,
        Err(problem) => return Position::invalid(problem),
    };
    let open: Vec<&LegState> = legs.values().filter(|l| !l.amt.is_zero()).collect();
    match open.as_slice() {
        [] => {
            let mut p = Position::flat();
            if let Some(l) = legs
                .values()
                .find(|l| parse_dec(&l.mark_price).is_some_and(|m| !m.is_zero()))
            {
                p.mark_price = l.mark_price.clone();
                p.leverage = l.leverage.clone();
            }
            p
        }
        [l] => Position {
            amt: l.amt,
            side: if l.amt.is_sign_positive() {
                PositionSide::Long
            } else {
                PositionSide::Short
            },
            entry_price: l.entry_price.clone(),
            mark_price: l.mark_price.clone(),
            unrealized_pnl: l.unrealized_pnl.clone(),
            leverage: l.leverage.clone(),
            problem: None,
        },
        [first, ..] => {
            let Some(amt) = open
                .iter()
                .try_fold(Decimal::ZERO, |acc, l| acc.checked_add(l.amt))
            else {
                return Position::invalid("hedge-mode amounts overflow");
            };
            let pnl = open
                .iter()
                .map(|l| parse_dec(&l.unrealized_pnl))
                .try_fold(Decimal::ZERO, |acc, p| acc.checked_add(p?))
                .map_or_else(|| "0".to_string(), dec_str);
            Position {
                amt,
                side: PositionSide::Hedged,
                entry_price: first.entry_price.clone(),
                mark_price: first.mark_price.clone(),
                unrealized_pnl: pnl,
                leverage: first.leverage.clone(),
                problem: None,
            }
        }
    }
}

/// One symbol's positionRisk rows → its legs. An amount that is not a
/// number within ±1e12, a side that is not Binance's, or two rows of one
/// side with different amounts make the symbol invalid; identical duplicate
/// rows are one. A row without `updateTime` (a number) counts as `asked_ms`,
/// the time the request was sent: the reply knew at least that much. An
/// `updateTime` later than `limit_ms` (the exchange's clock as we know it,
/// plus the tolerance) is out of bounds: the symbol is invalid (SPEC §16).
fn legs_of(rows: &[(Option<Decimal>, &Value)], asked_ms: u64, limit_ms: u64) -> Legs {
    let mut legs = BTreeMap::new();
    for (amt, r) in rows {
        let Some(amt) = amt else {
            return Err("positionAmt not a number within ±1e12");
        };
        let Some(leg) = Leg::parse(r.get("positionSide").and_then(Value::as_str)) else {
            return Err("positionSide is not BOTH, LONG or SHORT");
        };
        let updated_ms = r
            .get("updateTime")
            .and_then(Value::as_u64)
            .unwrap_or(asked_ms);
        if updated_ms > limit_ms {
            return Err("updateTime ahead of the exchange's clock");
        }
        let state = LegState {
            amt: *amt,
            entry_price: row_field(r, "entryPrice"),
            unrealized_pnl: row_field(r, "unRealizedProfit"),
            mark_price: row_field(r, "markPrice"),
            leverage: row_field(r, "leverage"),
            updated_ms,
        };
        if let Some(seen) = legs.insert(leg, state) {
            if seen.amt != *amt {
                return Err(if leg == Leg::Both {
                    "duplicate one-way rows with different amounts"
                } else {
                    "duplicate hedge rows with different amounts"
                });
            }
        }
    }
    Ok(legs)
}

/// What kind of JSON value `v` is, for an error message.
fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A positionRisk reply → each symbol's legs (see `legs_of`). A row
/// without a symbol, or with an amount that is not a string, fails the
/// whole reply: the position it holds could not be attributed, and an
/// absent symbol would read as flat. `limit_ms`: the latest `updateTime`
/// within bounds (see `legs_of`).
pub fn parse_rest_legs(
    v: &Value,
    asked_ms: u64,
    limit_ms: u64,
) -> Result<HashMap<String, Legs>, ExchangeError> {
    let rows = v
        .as_array()
        .ok_or_else(|| ExchangeError::Malformed("positionRisk reply is not a list".into()))?;
    let mut by_symbol: HashMap<&str, Vec<(Option<Decimal>, &Value)>> = HashMap::new();
    for r in rows {
        let Some(sym) = r.get("symbol").and_then(Value::as_str) else {
            return Err(ExchangeError::Malformed(
                "positionRisk row without a symbol".into(),
            ));
        };
        // Binance sends amounts as strings; a number (or anything else) is a
        // reply of another shape, and so doubtful: the cycle fails (§11).
        let amt = match r.get("positionAmt") {
            Some(Value::String(s)) => parse_amount(s),
            Some(other) => {
                return Err(ExchangeError::Malformed(format!(
                    "positionRisk row for {}: positionAmt is {}, not a string",
                    crate::text::clip(sym),
                    json_kind(other)
                )))
            }
            None => None,
        };
        by_symbol.entry(sym).or_default().push((amt, r));
    }
    Ok(by_symbol
        .into_iter()
        .map(|(sym, rows)| (sym.to_string(), legs_of(&rows, asked_ms, limit_ms)))
        .collect())
}

/// Folds a positionRisk reply into one position per symbol.
pub fn parse_positions(v: &Value) -> Result<HashMap<String, Position>, ExchangeError> {
    Ok(parse_rest_legs(v, 0, u64::MAX)?
        .into_iter()
        .map(|(sym, legs)| {
            let p = fold(&legs);
            (sym, p)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::str::FromStr;

    #[test]
    fn positions_one_way_and_hedge_mode() {
        let v = json!([
            {"symbol": "BTCUSDT", "positionAmt": "0.038", "positionSide": "BOTH", "entryPrice": "60000", "markPrice": "60100", "unRealizedProfit": "3.8", "leverage": "5"},
            {"symbol": "ETHUSDT", "positionAmt": "0", "positionSide": "LONG"},
            {"symbol": "ETHUSDT", "positionAmt": "-1.5", "positionSide": "SHORT", "entryPrice": "3000"},
            {"symbol": "SOLUSDT", "positionAmt": "2", "positionSide": "LONG"},
            {"symbol": "SOLUSDT", "positionAmt": "-1", "positionSide": "SHORT"},
            {"symbol": "XRPUSDT", "positionAmt": "0.000", "positionSide": "BOTH"}
        ]);
        let p = parse_positions(&v).unwrap();
        assert_eq!(
            (p["BTCUSDT"].side.as_str(), dec_str(p["BTCUSDT"].amt)),
            ("LONG", "0.038".into())
        );
        assert_eq!(
            (p["ETHUSDT"].side.as_str(), dec_str(p["ETHUSDT"].amt)),
            ("SHORT", "-1.5".into())
        );
        assert_eq!(p["SOLUSDT"].side, PositionSide::Hedged);
        assert_eq!(
            (p["XRPUSDT"].side.as_str(), dec_str(p["XRPUSDT"].amt)),
            ("NONE", "0".into())
        );
        assert!(parse_positions(&json!({"code": -1})).is_err());
    }

    #[test]
    fn hostile_position_rows_make_the_symbol_invalid_never_a_panic() {
        let v = json!([
            {"symbol": "DUPUSDT", "positionAmt": "79228162514264337593543950335", "positionSide": "BOTH"},
            {"symbol": "DUPUSDT", "positionAmt": "79228162514264337593543950335", "positionSide": "BOTH"},
            {"symbol": "TWINUSDT", "positionAmt": "1.5", "positionSide": "BOTH"},
            {"symbol": "TWINUSDT", "positionAmt": "1.5", "positionSide": "BOTH"},
            {"symbol": "SPLITUSDT", "positionAmt": "1.5"},
            {"symbol": "SPLITUSDT", "positionAmt": "2"},
            {"symbol": "HUGEUSDT", "positionAmt": "1e27"},
            {"symbol": "TEXTUSDT", "positionAmt": "lots"},
            {"symbol": "MISSINGUSDT"}
        ]);
        let p = parse_positions(&v).unwrap();
        assert_eq!(p["DUPUSDT"].side, PositionSide::Hedged);
        assert!(p["DUPUSDT"].problem.is_some());
        assert_eq!(
            (p["TWINUSDT"].side.as_str(), p["TWINUSDT"].amt),
            ("LONG", Decimal::from_str("1.5").unwrap())
        );
        assert_eq!(p["SPLITUSDT"].side, PositionSide::Hedged);
        assert_eq!(p["HUGEUSDT"].side, PositionSide::Hedged);
        assert_eq!(p["TEXTUSDT"].side, PositionSide::Hedged);
        assert_eq!(p["MISSINGUSDT"].side, PositionSide::Hedged);
        assert!(parse_positions(&json!([{"positionAmt": "1"}])).is_err());
        // An updateTime beyond the exchange's clock (year 3000, u64::MAX,
        // or just past the limit) makes its symbol invalid, no other.
        for t in [json!(32_503_680_000_000u64), json!(u64::MAX), json!(10_001)] {
            let v = json!([
                {"symbol": "OKUSDT", "positionAmt": "1", "updateTime": 10_000},
                {"symbol": "FUTUSDT", "positionAmt": "1", "updateTime": t}
            ]);
            let legs = parse_rest_legs(&v, 1, 10_000).unwrap();
            assert!(legs["OKUSDT"].is_ok(), "{t}");
            assert_eq!(
                fold(&legs["FUTUSDT"]).problem,
                Some("updateTime ahead of the exchange's clock"),
                "{t}"
            );
        }
        // Another shape than Binance's strings fails the whole reply.
        for amt in [json!(0.25), json!(null), json!(["1"]), json!(true)] {
            let v = json!([{"symbol": "OKUSDT", "positionAmt": "1"}, {"symbol": "NUMUSDT", "positionAmt": amt}]);
            let e = parse_positions(&v).unwrap_err().to_string();
            assert!(
                e.contains("NUMUSDT") && e.contains("not a string"),
                "{amt}: {e}"
            );
        }
    }
}
