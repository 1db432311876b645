//! Exchange-side closes for `quantum:stream:trade.closed` (SPEC §19): a
//! leg's change to flat joined with the fill that made it, when the fill's
//! cause is the exchange's own (a liquidation, an ADL, a settlement, a stop
//! or take-profit order). Pure: fills and changes in, closes out; no I/O,
//! no clock (the caller passes local milliseconds).
//!
//! The join: same symbol, same leg, and `T` within [`JOIN_MS`]. Binance
//! stamps the `ACCOUNT_UPDATE` and the `ORDER_TRADE_UPDATE` of one trade
//! with the same `T`, and sends them in either order. A change to flat
//! with a fill of its own `T` at hand is decided at once, whichever came
//! first; one with only fills of other times near it waits [`GRACE_MS`]
//! for its own (a stop that filled part of a leg, then the executor's
//! order that closed the rest, must not be taken for the stop's close),
//! then takes the nearest. A close by any other order (the executor's own)
//! is never written: intent_executor writes those itself.

use std::collections::VecDeque;

use rust_decimal::Decimal;

use super::book::LegChange;
use super::orders::{Cause, OrderUpdate};
use super::positions::Leg;

/// How far apart, exchange ms, a fill and a change to flat may be.
pub const JOIN_MS: u64 = 1_000;

/// How long, local ms, a change to flat waits for a fill of its own `T`
/// before the nearest fill within [`JOIN_MS`] decides it.
pub const GRACE_MS: u64 = 1_000;

/// How long, local ms, a fill waits for its change to flat.
pub const FILL_KEEP_MS: u64 = 10_000;

/// Fills, and changes to flat, held at most (a flood drops the oldest).
pub const MAX_HELD: usize = 4_096;

/// One close for `quantum:stream:trade.closed`.
#[derive(Debug, Clone, PartialEq)]
pub struct TradeClosed {
    /// The symbol.
    pub symbol: String,
    /// The side closed: `LONG` or `SHORT`.
    pub side: &'static str,
    /// The leg's entry price before the close, as the exchange wrote it.
    pub entry_price: String,
    /// The closing order's average price.
    pub exit_price: String,
    /// The realized PnL of the closing order's fills, summed.
    pub realized_pnl: Decimal,
    /// Why the exchange closed it.
    pub cause: Cause,
    /// The closing order.
    pub order_id: u64,
}

/// What the entry's `source` says.
const SOURCE: &str = "position_state_brain";

/// What the entry's `model_id` says.
const MODEL_ID: &str = "exchange";

impl TradeClosed {
    /// The price move in percent as intent_executor computes it: (exit −
    /// entry) / entry × 100 for a long, the other way for a short, rounded
    /// to 2 places; 0 when either price is not above 0.
    pub fn pnl_percent(&self) -> f64 {
        let entry = crate::domain::parse_f64(&self.entry_price).unwrap_or(0.0);
        let exit = crate::domain::parse_f64(&self.exit_price).unwrap_or(0.0);
        if entry <= 0.0 || exit <= 0.0 {
            return 0.0;
        }
        let pct = if self.side == "LONG" {
            (exit - entry) / entry * 100.0
        } else {
            (entry - exit) / entry * 100.0
        };
        round2(pct)
    }

    /// The entry's fields in the pipeline's contract (quantum_trader's
    /// `TradeClosedEvent`, every value a string, in the formats
    /// intent_executor writes: `str(float)`, `utcnow().isoformat()`), at
    /// `now_ms` (local).
    pub fn fields(&self, now_ms: u64) -> Vec<(&'static str, String)> {
        let price = |s: &str| crate::text::py_float(crate::domain::parse_f64(s).unwrap_or(0.0));
        let pnl_usd = crate::domain::dec_str(self.realized_pnl)
            .parse::<f64>()
            .unwrap_or(0.0);
        vec![
            ("event_type", "trade.closed".to_string()),
            ("timestamp", crate::text::py_utc_isoformat(now_ms)),
            ("symbol", self.symbol.clone()),
            ("side", self.side.to_string()),
            ("entry_price", price(&self.entry_price)),
            ("exit_price", price(&self.exit_price)),
            ("pnl_percent", crate::text::py_float(self.pnl_percent())),
            // Unknown to the exchange: intent_executor's neutral values.
            ("confidence", "0.5".to_string()),
            ("model_id", MODEL_ID.to_string()),
            ("R_net", "0.0".to_string()),
            ("pnl_usd", crate::text::py_float(pnl_usd)),
            ("reason", self.cause.as_str().to_string()),
            ("order_id", self.order_id.to_string()),
            ("source", SOURCE.to_string()),
        ]
    }
}

/// `x` rounded to 2 decimal places as Python's `round(x, 2)` does (the
/// exact binary value, ties to even), through Rust's exact formatting.
fn round2(x: f64) -> f64 {
    format!("{x:.2}").parse().unwrap_or(0.0)
}

#[derive(Debug, Clone)]
struct HeldFill {
    symbol: String,
    leg: Leg,
    tx_ms: u64,
    cause: Cause,
    order_id: u64,
    avg_price: String,
    realized: Decimal,
    seen_ms: u64,
}

#[derive(Debug, Clone)]
struct HeldFlat {
    symbol: String,
    leg: Leg,
    tx_ms: u64,
    side: &'static str,
    entry_before: String,
    seen_ms: u64,
}

/// The fills and changes to flat not joined yet.
#[derive(Debug, Default)]
pub struct Closes {
    fills: VecDeque<HeldFill>,
    flats: VecDeque<HeldFlat>,
}

impl Closes {
    /// A fill, seen at `now_ms` (local): the close it completes, if any. A
    /// later fill of an order held already adds to it (its realized PnL
    /// summed, its time and average price the latest).
    pub fn fill(&mut self, u: &OrderUpdate, now_ms: u64) -> Option<TradeClosed> {
        self.expire(now_ms);
        let realized = crate::domain::parse_amount(&u.realized_pnl).unwrap_or(Decimal::ZERO);
        let held = match self
            .fills
            .iter()
            .position(|f| f.order_id == u.order_id && f.symbol == u.symbol && f.leg == u.leg)
        {
            Some(i) => {
                let mut f = self.fills.remove(i)?;
                f.tx_ms = u.tx_ms;
                f.avg_price = u.avg_price.clone();
                f.realized = f.realized.checked_add(realized).unwrap_or(f.realized);
                f.seen_ms = now_ms;
                f
            }
            None => HeldFill {
                symbol: u.symbol.clone(),
                leg: u.leg,
                tx_ms: u.tx_ms,
                cause: u.cause,
                order_id: u.order_id,
                avg_price: u.avg_price.clone(),
                realized,
                seen_ms: now_ms,
            },
        };
        // A change to flat of this very T was waiting for it.
        if let Some(i) = self
            .flats
            .iter()
            .position(|c| c.symbol == held.symbol && c.leg == held.leg && c.tx_ms == held.tx_ms)
        {
            let flat = self.flats.remove(i)?;
            return join(&flat, &held);
        }
        push_bounded(&mut self.fills, held);
        None
    }

    /// A change of a leg's amount, seen at `now_ms` (local): the close it
    /// completes, if it is a change to flat and the fill of its own `T` is
    /// held already; otherwise it waits ([`Closes::due`]).
    pub fn change(&mut self, c: &LegChange, now_ms: u64) -> Option<TradeClosed> {
        self.expire(now_ms);
        if !c.to.is_zero() || c.from.is_zero() {
            return None;
        }
        let side = match c.leg {
            Leg::Long => "LONG",
            Leg::Short => "SHORT",
            Leg::Both if c.from.is_sign_positive() => "LONG",
            Leg::Both => "SHORT",
        };
        let flat = HeldFlat {
            symbol: c.symbol.clone(),
            leg: c.leg,
            tx_ms: c.exchange_ms,
            side,
            entry_before: c.entry_before.clone(),
            seen_ms: now_ms,
        };
        if let Some(i) = self
            .fills
            .iter()
            .position(|f| f.symbol == flat.symbol && f.leg == flat.leg && f.tx_ms == flat.tx_ms)
        {
            let fill = self.fills.remove(i)?;
            return join(&flat, &fill);
        }
        push_bounded(&mut self.flats, flat);
        None
    }

    /// The changes to flat that waited [`GRACE_MS`] for a fill of their own
    /// `T`: each joined with the nearest fill within [`JOIN_MS`] (the
    /// latest held on a tie), or given up when there is none. Call it about
    /// once a second.
    pub fn due(&mut self, now_ms: u64) -> Vec<TradeClosed> {
        self.expire(now_ms);
        let mut out = Vec::new();
        let mut waiting = VecDeque::with_capacity(self.flats.len());
        while let Some(flat) = self.flats.pop_front() {
            if now_ms.saturating_sub(flat.seen_ms) < GRACE_MS {
                waiting.push_back(flat);
                continue;
            }
            let nearest = self
                .fills
                .iter()
                .enumerate()
                .filter(|(_, f)| {
                    f.symbol == flat.symbol
                        && f.leg == flat.leg
                        && f.tx_ms.abs_diff(flat.tx_ms) <= JOIN_MS
                })
                .min_by_key(|(i, f)| (f.tx_ms.abs_diff(flat.tx_ms), usize::MAX - i))
                .map(|(i, _)| i);
            if let Some(fill) = nearest.and_then(|i| self.fills.remove(i)) {
                out.extend(join(&flat, &fill));
            }
        }
        self.flats = waiting;
        out
    }

    /// How many fills and changes to flat are held.
    #[cfg(test)]
    fn held(&self) -> (usize, usize) {
        (self.fills.len(), self.flats.len())
    }

    fn expire(&mut self, now_ms: u64) {
        self.fills
            .retain(|f| now_ms.saturating_sub(f.seen_ms) < FILL_KEEP_MS);
    }
}

fn push_bounded<T>(q: &mut VecDeque<T>, v: T) {
    if q.len() >= MAX_HELD {
        q.pop_front();
    }
    q.push_back(v);
}

/// A change to flat and its fill: a close when the exchange made it.
fn join(flat: &HeldFlat, fill: &HeldFill) -> Option<TradeClosed> {
    fill.cause.by_exchange().then(|| TradeClosed {
        symbol: flat.symbol.clone(),
        side: flat.side,
        entry_price: flat.entry_before.clone(),
        exit_price: fill.avg_price.clone(),
        realized_pnl: fill.realized,
        cause: fill.cause,
        order_id: fill.order_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::book::Feed;

    fn fill(sym: &str, leg: Leg, t: u64, cause: Cause, order: u64, rp: &str) -> OrderUpdate {
        OrderUpdate {
            event_ms: t + 1,
            tx_ms: t,
            symbol: sym.into(),
            side: "SELL".into(),
            leg,
            execution: "TRADE".into(),
            last_qty: Decimal::ONE,
            avg_price: "61000".into(),
            order_id: order,
            client_order_id: "web_1".into(),
            order_type: "STOP_MARKET".into(),
            realized_pnl: rp.into(),
            cause,
        }
    }

    fn change(sym: &str, leg: Leg, t: u64, from: &str, to: &str) -> LegChange {
        LegChange {
            symbol: sym.into(),
            leg,
            from: from.parse().unwrap(),
            to: to.parse().unwrap(),
            entry_before: "60000".into(),
            side_after: "FLAT",
            reason: "order".into(),
            exchange_ms: t,
            feed: Feed::Stream,
        }
    }

    /// One step of a table: a fill or a change, at a local time.
    enum Step {
        Fill(OrderUpdate),
        Change(LegChange),
        Tick,
    }

    /// A close as the table names it: symbol, side, cause, order.
    type Named = (String, &'static str, Cause, u64);

    /// Runs `steps` 100 ms apart (a Tick is 2 s on); the closes written.
    fn run(steps: Vec<Step>) -> Vec<Named> {
        let mut c = Closes::default();
        let mut now = 1_000_000u64;
        let mut out = Vec::new();
        for s in steps {
            now += 100;
            match s {
                Step::Fill(u) => out.extend(c.fill(&u, now)),
                Step::Change(ch) => out.extend(c.change(&ch, now)),
                Step::Tick => {
                    now += 2_000;
                    out.extend(c.due(now));
                }
            }
        }
        out.extend(c.due(now + 60_000));
        out.into_iter()
            .map(|t| (t.symbol, t.side, t.cause, t.order_id))
            .collect()
    }

    #[test]
    fn closes_are_joined_whichever_came_first_and_only_the_exchanges_are_written() {
        use Step::*;
        let b = "BTCUSDT";
        let rows: Vec<(&str, Vec<Step>, Vec<Named>)> = vec![
            (
                "account update first (Binance's usual order)",
                vec![
                    Change(change(b, Leg::Both, 500, "0.5", "0")),
                    Fill(fill(b, Leg::Both, 500, Cause::Stop, 7, "-1")),
                ],
                vec![(b.into(), "LONG", Cause::Stop, 7)],
            ),
            (
                "the fill first",
                vec![
                    Fill(fill(b, Leg::Both, 500, Cause::Liquidation, 8, "-9")),
                    Change(change(b, Leg::Both, 500, "-0.5", "0")),
                ],
                vec![(b.into(), "SHORT", Cause::Liquidation, 8)],
            ),
            (
                "the executor's own close is never written",
                vec![
                    Change(change(b, Leg::Both, 500, "0.5", "0")),
                    Fill(fill(b, Leg::Both, 500, Cause::Order, 9, "1")),
                    Tick,
                ],
                vec![],
            ),
            (
                "a stop that filled part, then the executor closed the rest",
                vec![
                    Change(change(b, Leg::Both, 400, "1", "0.5")),
                    Fill(fill(b, Leg::Both, 400, Cause::Stop, 10, "-1")),
                    Change(change(b, Leg::Both, 700, "0.5", "0")),
                    Fill(fill(b, Leg::Both, 700, Cause::Order, 11, "-1")),
                    Tick,
                ],
                vec![],
            ),
            (
                "a change that is not to flat, and a flip through zero is none",
                vec![
                    Change(change(b, Leg::Both, 500, "1", "0.5")),
                    Fill(fill(b, Leg::Both, 500, Cause::Stop, 12, "0")),
                    Change(change(b, Leg::Both, 600, "0", "1")),
                    Tick,
                ],
                vec![],
            ),
            (
                "times apart within 1 s join after the grace",
                vec![
                    Change(change(b, Leg::Both, 5_000, "0.5", "0")),
                    Fill(fill(b, Leg::Both, 5_800, Cause::TakeProfit, 13, "2")),
                    Tick,
                ],
                vec![(b.into(), "LONG", Cause::TakeProfit, 13)],
            ),
            (
                "more than 1 s apart: no join",
                vec![
                    Change(change(b, Leg::Both, 5_000, "0.5", "0")),
                    Fill(fill(b, Leg::Both, 6_001, Cause::Stop, 14, "2")),
                    Tick,
                ],
                vec![],
            ),
            (
                "another symbol or another leg never joins",
                vec![
                    Change(change(b, Leg::Long, 500, "1", "0")),
                    Fill(fill("ETHUSDT", Leg::Long, 500, Cause::Adl, 15, "0")),
                    Fill(fill(b, Leg::Short, 500, Cause::Adl, 16, "0")),
                    Tick,
                ],
                vec![],
            ),
            (
                "hedge mode: the leg is the side closed",
                vec![
                    Fill(fill(b, Leg::Short, 500, Cause::Adl, 17, "0")),
                    Change(change(b, Leg::Short, 500, "-2", "0")),
                ],
                vec![(b.into(), "SHORT", Cause::Adl, 17)],
            ),
            (
                "a REST correction to flat joins a held fill",
                vec![
                    Fill(fill(b, Leg::Both, 500, Cause::Settlement, 18, "0")),
                    Tick,
                    Change(change(b, Leg::Both, 500, "3", "0")),
                ],
                vec![(b.into(), "LONG", Cause::Settlement, 18)],
            ),
        ];
        for (what, steps, want) in rows {
            assert_eq!(run(steps), want, "{what}");
        }
    }

    #[test]
    fn an_orders_fills_sum_their_pnl_and_a_close_is_written_once() {
        let mut c = Closes::default();
        let b = "BTCUSDT";
        assert!(c
            .fill(&fill(b, Leg::Both, 400, Cause::Liquidation, 5, "-1.5"), 1)
            .is_none());
        assert!(c
            .fill(&fill(b, Leg::Both, 400, Cause::Liquidation, 5, "-2.25"), 2)
            .is_none());
        let t = c
            .change(&change(b, Leg::Both, 400, "0.3", "0"), 3)
            .expect("a close");
        assert_eq!(crate::domain::dec_str(t.realized_pnl), "-3.75");
        // The same change again (a replay, a second connection) finds no
        // fill: written once.
        assert!(c
            .change(&change(b, Leg::Both, 400, "0.3", "0"), 4)
            .is_none());
        assert!(c.due(10_000).is_empty());
        assert_eq!(c.held(), (0, 0));
    }

    #[test]
    fn the_fields_are_the_contracts_in_the_executors_formats() {
        let t = TradeClosed {
            symbol: "BTCUSDT".into(),
            side: "LONG",
            entry_price: "60000".into(),
            exit_price: "58712.4".into(),
            realized_pnl: "-12.875".parse().unwrap(),
            cause: Cause::Liquidation,
            order_id: 8_886_774,
        };
        let f: Vec<(&str, String)> = t.fields(1_765_130_222_123);
        let want: Vec<(&str, &str)> = vec![
            ("event_type", "trade.closed"),
            ("timestamp", "2025-12-07T17:57:02.123000"),
            ("symbol", "BTCUSDT"),
            ("side", "LONG"),
            ("entry_price", "60000.0"),
            ("exit_price", "58712.4"),
            // (58712.4 - 60000) / 60000 * 100 = -2.146 → -2.15
            ("pnl_percent", "-2.15"),
            ("confidence", "0.5"),
            ("model_id", "exchange"),
            ("R_net", "0.0"),
            ("pnl_usd", "-12.875"),
            ("reason", "liquidation"),
            ("order_id", "8886774"),
            ("source", "position_state_brain"),
        ];
        let got: Vec<(&str, &str)> = f.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(got, want);
        let short = TradeClosed {
            side: "SHORT",
            ..t.clone()
        };
        assert_eq!(short.pnl_percent(), 2.15);
        let unknown = TradeClosed {
            entry_price: "0".into(),
            ..t
        };
        assert_eq!(unknown.pnl_percent(), 0.0);
    }

    #[test]
    fn percentages_round_as_python_rounds() {
        // Each `want` is what python3's round(x, 2) gave.
        for (x, want) in [
            (0.125, 0.12),
            (0.375, 0.38),
            (2.675, 2.67),
            (-2.145, -2.15),
            (1.005, 1.0),
            (-0.005, -0.01),
            (0.5, 0.5),
        ] {
            assert_eq!(round2(x), want, "{x}");
        }
    }

    #[test]
    fn held_entries_are_bounded() {
        let mut c = Closes::default();
        for i in 0..(MAX_HELD as u64 + 50) {
            c.fill(
                &fill("BTCUSDT", Leg::Both, i * 5_000, Cause::Stop, i, "0"),
                0,
            );
            c.change(&change("ETHUSDT", Leg::Both, i * 5_000, "1", "0"), 0);
        }
        assert_eq!(c.held(), (MAX_HELD, MAX_HELD));
        // Fills are let go after FILL_KEEP_MS, changes after the grace.
        assert!(c.due(FILL_KEEP_MS).is_empty());
        assert_eq!(c.held(), (0, 0));
    }
}
