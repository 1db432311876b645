//! `ORDER_TRADE_UPDATE` (SPEC §19): what the exchange did to an order —
//! above all the fills it made on its own (a liquidation, an
//! auto-deleverage, a settlement, a stop or take-profit order). Pure: a
//! frame's `o` object in, a checked [`OrderUpdate`] out.
//!
//! Checked against Binance's documentation (USDⓈ-M futures, user data
//! streams, "Event: Order Update", read with the search tool): execution
//! type `x` is `NEW`, `CANCELED`, `CALCULATED` ("Liquidation Execution"),
//! `EXPIRED`, `TRADE` or `AMENDMENT`; the client order id `c` starts with
//! `autoclose-` for a liquidation order, is `adl_autoclose` for an ADL
//! order and starts with `settlement_autoclose-` for a settlement (delisting
//! or delivery); order types `o`/`ot` include `STOP`, `STOP_MARKET`,
//! `TAKE_PROFIT`, `TAKE_PROFIT_MARKET`, `TRAILING_STOP_MARKET` and
//! `LIQUIDATION`. Quantities and prices are strings, the order id `i` a
//! number.

use rust_decimal::Decimal;
use serde_json::Value;

use super::positions::Leg;
use crate::redis::keys::valid_symbol;

/// Why a fill happened, checked in this order (SPEC §19).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cause {
    /// Auto-deleverage: `c` = `adl_autoclose`.
    Adl,
    /// `x` = `CALCULATED`, `c` starting `autoclose-`, or `o` =
    /// `LIQUIDATION`.
    Liquidation,
    /// `c` starting `settlement_autoclose-`.
    Settlement,
    /// `ot` = `STOP_MARKET`, `STOP` or `TRAILING_STOP_MARKET`.
    Stop,
    /// `ot` = `TAKE_PROFIT_MARKET` or `TAKE_PROFIT`.
    TakeProfit,
    /// Any other order (ours, through the executor).
    Order,
}

impl Cause {
    /// Every cause, for the metrics.
    pub const ALL: [Cause; 6] = [
        Cause::Adl,
        Cause::Liquidation,
        Cause::Settlement,
        Cause::Stop,
        Cause::TakeProfit,
        Cause::Order,
    ];

    /// The `cause` field's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Adl => "adl",
            Cause::Liquidation => "liquidation",
            Cause::Settlement => "settlement",
            Cause::Stop => "stop",
            Cause::TakeProfit => "take_profit",
            Cause::Order => "order",
        }
    }

    /// Whether the exchange closed the position on its own.
    pub fn by_exchange(self) -> bool {
        self != Cause::Order
    }
}

/// The cause of a fill from its execution type, client order id, order
/// type and original order type.
pub fn cause(x: &str, c: &str, o: &str, ot: &str) -> Cause {
    if c == "adl_autoclose" {
        Cause::Adl
    } else if x == "CALCULATED" || c.starts_with("autoclose-") || o == "LIQUIDATION" {
        Cause::Liquidation
    } else if c.starts_with("settlement_autoclose-") {
        Cause::Settlement
    } else if matches!(ot, "STOP_MARKET" | "STOP" | "TRAILING_STOP_MARKET") {
        Cause::Stop
    } else if matches!(ot, "TAKE_PROFIT_MARKET" | "TAKE_PROFIT") {
        Cause::TakeProfit
    } else {
        Cause::Order
    }
}

/// One `ORDER_TRADE_UPDATE`, within bounds.
#[derive(Debug, Clone, PartialEq)]
pub struct OrderUpdate {
    /// `E`.
    pub event_ms: u64,
    /// `T`.
    pub tx_ms: u64,
    /// `o.s`.
    pub symbol: String,
    /// `BUY` or `SELL`.
    pub side: String,
    /// `o.ps` (`BOTH` when absent).
    pub leg: Leg,
    /// The execution type `x`.
    pub execution: String,
    /// `l`: the last fill's quantity.
    pub last_qty: Decimal,
    /// `ap`: the average price.
    pub avg_price: String,
    /// `i`.
    pub order_id: u64,
    /// `c`, cut to 64 characters and escaped.
    pub client_order_id: String,
    /// `ot` (the original type; `o` when absent).
    pub order_type: String,
    /// `rp`.
    pub realized_pnl: String,
    /// Why the fill happened ([`cause`]).
    pub cause: Cause,
}

impl OrderUpdate {
    /// Whether it reports a fill (`x` = `TRADE` or `CALCULATED`).
    pub fn is_fill(&self) -> bool {
        matches!(self.execution.as_str(), "TRADE" | "CALCULATED")
    }
}

/// The longest text of an enumerated field taken (`x`, `o`, `ot`, `S`).
const WORD_MAX: usize = 32;

/// The client order id is cut, not refused, to this many characters.
pub const CLIENT_ID_MAX_CHARS: usize = 64;

fn text<'a>(o: &'a serde_json::Map<String, Value>, k: &str) -> Result<&'a str, String> {
    match o.get(k) {
        Some(Value::String(s)) => Ok(s),
        None => Err(format!("o.{k} is missing")),
        Some(_) => Err(format!("o.{k} is not a string")),
    }
}

fn word<'a>(o: &'a serde_json::Map<String, Value>, k: &str) -> Result<&'a str, String> {
    let s = text(o, k)?;
    if s.len() > WORD_MAX || !s.bytes().all(|b| b.is_ascii_uppercase() || b == b'_') {
        return Err(format!("o.{k} {:?} is not a word", crate::text::clip(s)));
    }
    Ok(s)
}

/// A decimal string within ±1e12 (a quantity or a price).
fn number(o: &serde_json::Map<String, Value>, k: &str) -> Result<Decimal, String> {
    let s = text(o, k)?;
    crate::domain::parse_amount(s).ok_or_else(|| {
        format!(
            "o.{k} {:?} is not a number within ±1e12",
            crate::text::clip(s)
        )
    })
}

/// Reads an `ORDER_TRADE_UPDATE` whose `E` and `T` were read and checked
/// already: its `o` object must be there, with every field typed as
/// Binance sends it (a quantity as a JSON number is out of bounds); the
/// client order id is cut to [`CLIENT_ID_MAX_CHARS`].
pub fn parse_order_update(
    obj: &serde_json::Map<String, Value>,
    event_ms: u64,
    tx_ms: u64,
) -> Result<OrderUpdate, String> {
    let Some(o) = obj.get("o").and_then(Value::as_object) else {
        return Err("without an object o".into());
    };
    let symbol = match o.get("s") {
        Some(Value::String(s)) if valid_symbol(s) => s.clone(),
        Some(Value::String(s)) => {
            return Err(format!("o.s {:?} is not a symbol", crate::text::clip(s)))
        }
        _ => return Err("o.s is missing or not a string".into()),
    };
    let side = word(o, "S")?;
    if side != "BUY" && side != "SELL" {
        return Err(format!("{symbol}: o.S {side:?} is not BUY or SELL"));
    }
    let execution = word(o, "x")?.to_string();
    let order_type = word(o, "o")?;
    let original = match o.get("ot") {
        None => order_type,
        Some(_) => word(o, "ot")?,
    };
    let leg = match o.get("ps") {
        None => Leg::Both,
        Some(Value::String(s)) => Leg::parse(Some(s)).ok_or_else(|| {
            format!(
                "{symbol}: o.ps {:?} is not BOTH, LONG or SHORT",
                crate::text::clip(s)
            )
        })?,
        Some(_) => return Err(format!("{symbol}: o.ps is not a string")),
    };
    let order_id = o
        .get("i")
        .and_then(Value::as_u64)
        .ok_or_else(|| format!("{symbol}: o.i is not a whole number"))?;
    let client = text(o, "c")?;
    let last_qty = number(o, "l").map_err(|w| format!("{symbol}: {w}"))?;
    if last_qty.is_sign_negative() {
        return Err(format!("{symbol}: o.l is negative"));
    }
    let avg_price = number(o, "ap").map_err(|w| format!("{symbol}: {w}"))?;
    let realized = match o.get("rp") {
        None => Decimal::ZERO,
        Some(_) => number(o, "rp").map_err(|w| format!("{symbol}: {w}"))?,
    };
    let cause = cause(&execution, client, order_type, original);
    Ok(OrderUpdate {
        event_ms,
        tx_ms,
        symbol,
        side: side.to_string(),
        leg,
        execution,
        last_qty,
        avg_price: crate::domain::dec_str(avg_price),
        order_id,
        client_order_id: crate::text::clip_to(client, CLIENT_ID_MAX_CHARS).into_owned(),
        order_type: original.to_string(),
        realized_pnl: crate::domain::dec_str(realized),
        cause,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn causes_are_checked_in_the_spec_order() {
        for (x, c, o, ot, want) in [
            ("TRADE", "adl_autoclose", "MARKET", "MARKET", Cause::Adl),
            // ADL wins over everything after it.
            (
                "CALCULATED",
                "adl_autoclose",
                "LIQUIDATION",
                "LIQUIDATION",
                Cause::Adl,
            ),
            ("CALCULATED", "x", "MARKET", "MARKET", Cause::Liquidation),
            (
                "TRADE",
                "autoclose-1700000000",
                "MARKET",
                "MARKET",
                Cause::Liquidation,
            ),
            (
                "TRADE",
                "web_1",
                "LIQUIDATION",
                "LIQUIDATION",
                Cause::Liquidation,
            ),
            (
                "TRADE",
                "settlement_autoclose-7",
                "MARKET",
                "MARKET",
                Cause::Settlement,
            ),
            ("TRADE", "ios_1", "MARKET", "STOP_MARKET", Cause::Stop),
            ("TRADE", "ios_1", "LIMIT", "STOP", Cause::Stop),
            ("TRADE", "x", "MARKET", "TRAILING_STOP_MARKET", Cause::Stop),
            (
                "TRADE",
                "x",
                "MARKET",
                "TAKE_PROFIT_MARKET",
                Cause::TakeProfit,
            ),
            ("TRADE", "x", "LIMIT", "TAKE_PROFIT", Cause::TakeProfit),
            ("TRADE", "p33-plan-1", "MARKET", "MARKET", Cause::Order),
            ("TRADE", "autoclose", "LIMIT", "LIMIT", Cause::Order),
        ] {
            assert_eq!(cause(x, c, o, ot), want, "{x} {c} {o} {ot}");
        }
    }

    fn frame(o: Value) -> serde_json::Map<String, Value> {
        json!({"e": "ORDER_TRADE_UPDATE", "E": 10, "T": 9, "o": o})
            .as_object()
            .unwrap()
            .clone()
    }

    fn stop_fill() -> Value {
        json!({"s": "BTCUSDT", "c": "web_abc", "S": "SELL", "o": "MARKET",
               "ot": "STOP_MARKET", "x": "TRADE", "X": "FILLED", "i": 8886774,
               "l": "0.002", "z": "0.002", "L": "60000", "ap": "60000.5",
               "T": 9, "ps": "BOTH", "rp": "-1.25"})
    }

    #[test]
    fn a_fill_is_read_whole() {
        let u = parse_order_update(&frame(stop_fill()), 10, 9).unwrap();
        assert!(u.is_fill());
        assert_eq!(u.cause, Cause::Stop);
        assert_eq!(
            (
                u.symbol.as_str(),
                u.side.as_str(),
                u.order_id,
                u.order_type.as_str()
            ),
            ("BTCUSDT", "SELL", 8886774, "STOP_MARKET")
        );
        assert_eq!(crate::domain::dec_str(u.last_qty), "0.002");
        assert_eq!(
            (u.avg_price.as_str(), u.realized_pnl.as_str()),
            ("60000.5", "-1.25")
        );
        let mut new = stop_fill();
        new["x"] = json!("NEW");
        assert!(!parse_order_update(&frame(new), 10, 9).unwrap().is_fill());
    }

    #[test]
    fn wrong_types_are_out_of_bounds_and_a_huge_client_id_is_cut() {
        for (field, value, why) in [
            ("l", json!(0.002), "o.l is not a string"),
            ("ap", json!("NaN"), "o.ap \"NaN\" is not a number"),
            ("i", json!("8886774"), "o.i is not a whole number"),
            ("s", json!("btcusdt"), "is not a symbol"),
            ("S", json!("HOLD"), "is not BUY or SELL"),
            ("x", json!("TRADE; DROP"), "is not a word"),
            ("ps", json!("UP"), "is not BOTH, LONG or SHORT"),
            ("l", json!("-1"), "negative"),
        ] {
            let mut o = stop_fill();
            o[field] = value;
            let e = parse_order_update(&frame(o), 10, 9).unwrap_err();
            assert!(e.contains(why), "{field}: {e}");
        }
        let no_o = json!({"e": "ORDER_TRADE_UPDATE", "E": 10, "T": 9});
        assert!(parse_order_update(no_o.as_object().unwrap(), 10, 9).is_err());
        let mut o = stop_fill();
        o["c"] = json!("x".repeat(1_000_000));
        let u = parse_order_update(&frame(o), 10, 9).unwrap();
        assert!(u.client_order_id.chars().count() <= CLIENT_ID_MAX_CHARS + 16);
    }
}
