//! Positions from a positionRisk reply (SPEC §7, §11): one per symbol,
//! hedge mode folded, hostile rows made invalid, never summed.

use std::collections::HashMap;

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
    fn invalid(problem: &'static str) -> Self {
        Position {
            side: PositionSide::Hedged,
            problem: Some(problem),
            ..Position::flat()
        }
    }
}

/// A raw field of a positionRisk row as a string, cut to 64 characters.
fn row_field(r: &Value, k: &str) -> String {
    let s = match r.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "0".into(),
        Some(other) => other.to_string(),
    };
    crate::text::clip(&s).into_owned()
}

/// One symbol's rows → its position. One-way mode has one `BOTH` row; hedge
/// mode a `LONG` and a `SHORT` row, of which one non-zero is the position
/// and two are `HEDGED`. An amount that is not a number or beyond 1e12, or
/// two one-way rows with different amounts, make the symbol invalid (never
/// a sum): its plans are denied.
fn fold_rows(rows: &[(Option<Decimal>, &Value)]) -> Position {
    let mut amts = Vec::with_capacity(rows.len());
    for (amt, r) in rows {
        match amt {
            Some(a) => amts.push((*a, *r)),
            None => return Position::invalid("positionAmt not a number within ±1e12"),
        }
    }
    let one_way = |r: &Value| {
        r.get("positionSide")
            .and_then(Value::as_str)
            .is_none_or(|s| s.eq_ignore_ascii_case("BOTH"))
    };
    let both: Vec<Decimal> = amts
        .iter()
        .filter(|(_, r)| one_way(r))
        .map(|(a, _)| *a)
        .collect();
    if both.windows(2).any(|w| w[0] != w[1]) {
        return Position::invalid("duplicate one-way rows with different amounts");
    }
    // Identical duplicate one-way rows are one position, not two.
    let mut seen_both = false;
    let open: Vec<(Decimal, &Value)> = amts
        .into_iter()
        .filter(|(_, r)| !one_way(r) || !std::mem::replace(&mut seen_both, true))
        .filter(|(a, _)| !a.is_zero())
        .collect();
    match open.as_slice() {
        [] => Position::flat(),
        [(amt, r)] => Position {
            amt: *amt,
            // Any non-zero row is a position, dust included: the rules
            // decide what is flat.
            side: if amt.is_sign_positive() {
                PositionSide::Long
            } else {
                PositionSide::Short
            },
            entry_price: row_field(r, "entryPrice"),
            mark_price: row_field(r, "markPrice"),
            unrealized_pnl: row_field(r, "unRealizedProfit"),
            leverage: row_field(r, "leverage"),
            problem: None,
        },
        [(_, r), ..] => {
            let Some(amt) = open
                .iter()
                .try_fold(Decimal::ZERO, |acc, (a, _)| acc.checked_add(*a))
            else {
                return Position::invalid("hedge-mode amounts overflow");
            };
            let pnl = open
                .iter()
                .map(|(_, r)| parse_dec(&row_field(r, "unRealizedProfit")))
                .try_fold(Decimal::ZERO, |acc, p| acc.checked_add(p?))
                .map_or_else(|| "0".to_string(), dec_str);
            Position {
                amt,
                side: PositionSide::Hedged,
                entry_price: row_field(r, "entryPrice"),
                mark_price: row_field(r, "markPrice"),
                unrealized_pnl: pnl,
                leverage: row_field(r, "leverage"),
                problem: None,
            }
        }
    }
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

/// Folds a positionRisk reply into one position per symbol (see
/// `fold_rows`). A row without a symbol fails the whole reply: the
/// position it holds could not be attributed, and an absent symbol would
/// read as flat.
pub fn parse_positions(v: &Value) -> Result<HashMap<String, Position>, ExchangeError> {
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
        .map(|(sym, rows)| (sym.to_string(), fold_rows(&rows)))
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
