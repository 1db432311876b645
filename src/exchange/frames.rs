//! User data stream frames (SPEC §16, §19): the text of one WebSocket
//! message into a checked event — an `ACCOUNT_UPDATE` whose every position
//! entry is within bounds, an `ORDER_TRADE_UPDATE`, `listenKeyExpired` —
//! or the reason it is out of bounds (which ends the connection). Pure.

use serde_json::Value;

use crate::domain::parse_amount;
use crate::redis::keys::valid_symbol;

use super::book::{AccountUpdate, EventLeg};
use super::orders::{parse_order_update, OrderUpdate};
use super::positions::Leg;

/// One frame, read.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// An `ACCOUNT_UPDATE` whose every position entry is within bounds.
    Account(AccountUpdate),
    /// An `ORDER_TRADE_UPDATE` within bounds (SPEC §19).
    Order(Box<OrderUpdate>),
    /// `listenKeyExpired`.
    KeyExpired,
    /// Any other JSON object (another event, a reply): ignored.
    Other,
    /// Not JSON, not an object, or an `ACCOUNT_UPDATE` or
    /// `ORDER_TRADE_UPDATE` with anything out of bounds: why, for the WARN
    /// (raw values cut and escaped).
    Invalid(String),
}

impl Frame {
    /// The `type` label of `p33_position_stream_events_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Account(_) => "account_update",
            Frame::Order(_) => "order_trade_update",
            Frame::KeyExpired => "listen_key_expired",
            Frame::Other => "other",
            Frame::Invalid(_) => "invalid",
        }
    }
}

fn clip(s: &str) -> String {
    crate::text::clip(s).into_owned()
}

/// A text field of a position entry, cut to 64 characters (a number is
/// taken as its text; absent is "0").
fn text_field(e: &Value, k: &str) -> Result<String, String> {
    match e.get(k) {
        Some(Value::String(s)) => Ok(clip(s)),
        Some(Value::Number(n)) => Ok(n.to_string()),
        None | Some(Value::Null) => Ok("0".into()),
        Some(_) => Err(format!("{k} is not a string")),
    }
}

fn event_leg(e: &Value) -> Result<EventLeg, String> {
    let symbol = match e.get("s") {
        Some(Value::String(s)) if valid_symbol(s) => s.clone(),
        Some(Value::String(s)) => return Err(format!("symbol {:?} is not a symbol", clip(s))),
        _ => return Err("a position entry without a symbol".into()),
    };
    let amt = match e.get("pa") {
        Some(Value::String(s)) => parse_amount(s)
            .ok_or_else(|| format!("{symbol}: pa {:?} is not a number within ±1e12", clip(s)))?,
        _ => return Err(format!("{symbol}: pa is not a string")),
    };
    let leg = match e.get("ps") {
        None => Leg::Both,
        Some(Value::String(s)) => Leg::parse(Some(s))
            .ok_or_else(|| format!("{symbol}: ps {:?} is not BOTH, LONG or SHORT", clip(s)))?,
        Some(_) => return Err(format!("{symbol}: ps is not a string")),
    };
    Ok(EventLeg {
        entry_price: text_field(e, "ep").map_err(|w| format!("{symbol}: {w}"))?,
        unrealized_pnl: text_field(e, "up").map_err(|w| format!("{symbol}: {w}"))?,
        symbol,
        leg,
        amt,
    })
}

/// Reads one text frame. An `ACCOUNT_UPDATE` is taken whole or not at all:
/// one entry out of bounds makes the frame invalid (never half-applied).
/// `limit_ms` is the latest exchange time within bounds
/// ([`super::Clock::limit_ms`]): an `E` or `T` beyond it makes the frame
/// invalid (SPEC §16), so no time ahead of the exchange's clock can pin a
/// position.
pub fn parse_frame(text: &str, limit_ms: u64) -> Frame {
    let v: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return Frame::Invalid(format!("not JSON ({e})")),
    };
    let Some(obj) = v.as_object() else {
        return Frame::Invalid("not a JSON object".into());
    };
    let name = match obj.get("e").and_then(Value::as_str) {
        Some(n @ ("ACCOUNT_UPDATE" | "ORDER_TRADE_UPDATE")) => n,
        Some("listenKeyExpired") => return Frame::KeyExpired,
        _ => return Frame::Other,
    };
    let time = |k: &str| obj.get(k).and_then(Value::as_u64);
    let (Some(event_ms), Some(tx_ms)) = (time("E"), time("T")) else {
        return Frame::Invalid(format!("{name} without numeric E and T"));
    };
    if tx_ms > limit_ms || event_ms > limit_ms {
        return Frame::Invalid(format!(
            "{name} E {event_ms} / T {tx_ms} more than {} s ahead of the exchange's clock ({})",
            super::MAX_AHEAD_MS / 1000,
            limit_ms.saturating_sub(super::MAX_AHEAD_MS)
        ));
    }
    if name == "ORDER_TRADE_UPDATE" {
        return match parse_order_update(obj, event_ms, tx_ms) {
            Ok(u) => Frame::Order(Box::new(u)),
            Err(why) => Frame::Invalid(format!("ORDER_TRADE_UPDATE {why}")),
        };
    }
    let Some(a) = obj.get("a").and_then(Value::as_object) else {
        return Frame::Invalid("ACCOUNT_UPDATE without an object a".into());
    };
    let entries = match a.get("P") {
        None => &Vec::new(),
        Some(Value::Array(p)) => p,
        Some(_) => return Frame::Invalid("ACCOUNT_UPDATE a.P is not a list".into()),
    };
    let mut legs = Vec::with_capacity(entries.len());
    for e in entries {
        match event_leg(e) {
            Ok(l) => legs.push(l),
            Err(why) => return Frame::Invalid(format!("ACCOUNT_UPDATE: {why}")),
        }
    }
    // Why: a.m in lower case, when it is a word (SPEC §19).
    let reason = match a.get("m").and_then(Value::as_str) {
        Some(m)
            if !m.is_empty()
                && m.len() <= 32
                && m.bytes().all(|b| b.is_ascii_alphabetic() || b == b'_') =>
        {
            m.to_ascii_lowercase()
        }
        _ => "other".to_string(),
    };
    Frame::Account(AccountUpdate {
        event_ms,
        tx_ms,
        legs,
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames() {
        let ok = r#"{"e":"ACCOUNT_UPDATE","E":1700000000100,"T":1700000000099,"a":{"m":"ORDER","B":[],"P":[
                {"s":"BTCUSDT","pa":"0.5","ep":"60000","up":"1.2","ps":"BOTH"},
                {"s":"ETHUSDT","pa":"-2","ep":"3000","up":"0","ps":"SHORT"}]}}"#;
        let Frame::Account(a) = parse_frame(ok, u64::MAX) else {
            panic!("{:?}", parse_frame(ok, u64::MAX))
        };
        assert_eq!(
            (a.event_ms, a.tx_ms, a.legs.len()),
            (1700000000100, 1700000000099, 2)
        );
        assert_eq!(
            (a.legs[1].leg, a.legs[1].amt.to_string()),
            (Leg::Short, "-2".into())
        );
        let cases: &[(&str, &str)] = &[
            (
                r#"{"e":"listenKeyExpired","E":1,"listenKey":"x"}"#,
                "listen_key_expired",
            ),
            (r#"{"e":"ORDER_TRADE_UPDATE","E":1}"#, "invalid"),
            (r#"{"e":"ORDER_TRADE_UPDATE","E":1,"T":1}"#, "invalid"),
            (
                r#"{"e":"ORDER_TRADE_UPDATE","E":1,"T":1,"o":{"s":"BTCUSDT","c":"x","S":"SELL","o":"MARKET","x":"TRADE","i":1,"l":0.5,"ap":"1"}}"#,
                "invalid",
            ),
            (
                r#"{"e":"ORDER_TRADE_UPDATE","E":1,"T":1,"o":{"s":"BTCUSDT","c":"x","S":"SELL","o":"MARKET","x":"TRADE","i":1,"l":"0.5","ap":"1"}}"#,
                "order_trade_update",
            ),
            (r#"{"result":null,"id":1}"#, "other"),
            (
                r#"{"e":"ACCOUNT_UPDATE","E":1,"T":1,"a":{"m":"DEPOSIT","B":[]}}"#,
                "account_update",
            ),
            ("{not json", "invalid"),
            ("[1,2]", "invalid"),
            (r#"{"e":"ACCOUNT_UPDATE","E":1,"a":{"P":[]}}"#, "invalid"),
            (
                r#"{"e":"ACCOUNT_UPDATE","E":1,"T":-5,"a":{"P":[]}}"#,
                "invalid",
            ),
            (
                r#"{"e":"ACCOUNT_UPDATE","E":1,"T":1,"a":{"P":{}}}"#,
                "invalid",
            ),
            (
                r#"{"e":"ACCOUNT_UPDATE","E":1,"T":1,"a":{"P":[{"s":"BTCUSDT","pa":"1e13","ps":"BOTH"}]}}"#,
                "invalid",
            ),
            (
                r#"{"e":"ACCOUNT_UPDATE","E":1,"T":1,"a":{"P":[{"s":"BTCUSDT","pa":1,"ps":"BOTH"}]}}"#,
                "invalid",
            ),
            (
                r#"{"e":"ACCOUNT_UPDATE","E":1,"T":1,"a":{"P":[{"s":"btc
    usdt","pa":"1"}]}}"#,
                "invalid",
            ),
            (
                r#"{"e":"ACCOUNT_UPDATE","E":1,"T":1,"a":{"P":[{"s":"BTCUSDT","pa":"1","ps":"UP"}]}}"#,
                "invalid",
            ),
        ];
        for (text, kind) in cases {
            assert_eq!(parse_frame(text, u64::MAX).kind(), *kind, "{text}");
        }
        // One bad entry spoils the frame: never half-applied.
        let half = r#"{"e":"ACCOUNT_UPDATE","E":1,"T":1,"a":{"P":[{"s":"BTCUSDT","pa":"1"},{"s":"ETHUSDT","pa":"NaN"}]}}"#;
        let Frame::Invalid(why) = parse_frame(half, u64::MAX) else {
            panic!()
        };
        assert!(why.contains("ETHUSDT"), "{why}");
        // A time beyond the exchange's clock (year 3000, u64::MAX, or just
        // past the limit) makes the frame invalid; at the limit it is read.
        for (e, t, kind) in [
            (1000u64, 32_503_680_000_000u64, "invalid"),
            (1000, u64::MAX, "invalid"),
            (1000, 10_001, "invalid"),
            (10_001, 1000, "invalid"),
            (10_000, 10_000, "account_update"),
        ] {
            let f = format!(r#"{{"e":"ACCOUNT_UPDATE","E":{e},"T":{t},"a":{{"P":[]}}}}"#);
            assert_eq!(parse_frame(&f, 10_000).kind(), kind, "{f}");
        }
    }
}
