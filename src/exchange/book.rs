//! The position state (SPEC §16): every symbol's legs as last told by the
//! exchange, from positionRisk replies and `ACCOUNT_UPDATE` events alike,
//! each leg stamped with the exchange's own time of it. Pure: no I/O, no
//! clock; the stream task and the poller share one behind a lock.
//!
//! The order rule: an event is applied to a leg when its `T` is newer than
//! the leg's `updated_ms`; a REST row when its `updateTime` is not older.
//! A REST row that changes an amount the stream set is a missed event: a
//! [`Correction`].

use std::collections::{BTreeMap, HashMap};

use rust_decimal::Decimal;

use super::positions::{fold, Leg, LegState, Legs, Position};

/// Who set what a snapshot shows: the `feed` field (SPEC §16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    /// A positionRisk reply.
    Rest,
    /// The user data stream.
    Stream,
}

impl Feed {
    /// The word written to the snapshot hash.
    pub fn as_str(self) -> &'static str {
        match self {
            Feed::Rest => "rest",
            Feed::Stream => "stream",
        }
    }
}

/// One position entry of an `ACCOUNT_UPDATE` (`a.P[]`), already checked.
#[derive(Debug, Clone, PartialEq)]
pub struct EventLeg {
    /// `s`.
    pub symbol: String,
    /// `ps`.
    pub leg: Leg,
    /// `pa`.
    pub amt: Decimal,
    /// `ep`, cut to 64 characters.
    pub entry_price: String,
    /// `up`, cut to 64 characters.
    pub unrealized_pnl: String,
}

/// An `ACCOUNT_UPDATE` whose every position entry passed the bounds.
#[derive(Debug, Clone, PartialEq)]
pub struct AccountUpdate {
    /// `E`: when the exchange sent it, exchange clock, ms.
    pub event_ms: u64,
    /// `T`: the transaction's time, exchange clock, ms.
    pub tx_ms: u64,
    /// `a.P`.
    pub legs: Vec<EventLeg>,
}

/// A REST row that changed an amount the stream had set.
#[derive(Debug, Clone, PartialEq)]
pub struct Correction {
    /// The symbol.
    pub symbol: String,
    /// Its side.
    pub leg: Leg,
    /// What the stream had said.
    pub stream_amt: Decimal,
    /// What REST says.
    pub rest_amt: Decimal,
}

/// What applying an event did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Applied {
    /// Symbols whose legs changed state (sorted, once each).
    pub symbols: Vec<String>,
    /// Entries not newer than the state they would replace.
    pub stale: usize,
}

#[derive(Debug, Clone)]
struct Symbol {
    /// `Err` while the last REST rows of the symbol made no position.
    legs: Legs,
    /// Which legs the stream set and REST has not confirmed since.
    by_stream: BTreeMap<Leg, bool>,
    feed: Feed,
    /// Local time of the last applied update, ms.
    as_of_ms: u64,
}

/// Every symbol's legs.
#[derive(Debug, Default)]
pub struct Book {
    symbols: HashMap<String, Symbol>,
    /// Whether a positionRisk reply was applied: before that, no symbol's
    /// position is known (an absent symbol is not flat yet).
    rest_seen: bool,
}

impl Book {
    /// Whether a positionRisk reply has been applied.
    pub fn known(&self) -> bool {
        self.rest_seen
    }

    /// Applies a positionRisk reply (`rest`: each symbol's legs), asked at
    /// `asked_ms` (exchange clock) and applied at `now_ms` (local).
    ///
    /// With `force` (no stream) the reply replaces everything, as polling
    /// alone always did. Otherwise each leg is taken when its `updateTime` is
    /// not older than the state's; a symbol the reply leaves out is flat as
    /// of `asked_ms`; a symbol whose rows are invalid is invalid until a
    /// reply makes it valid again (fail closed).
    pub fn apply_rest(
        &mut self,
        rest: &HashMap<String, Legs>,
        asked_ms: u64,
        now_ms: u64,
        force: bool,
    ) -> Vec<Correction> {
        self.rest_seen = true;
        let mut corrections = Vec::new();
        if force {
            self.symbols = rest
                .iter()
                .map(|(s, legs)| {
                    let sym = Symbol {
                        legs: legs.clone(),
                        by_stream: BTreeMap::new(),
                        feed: Feed::Rest,
                        as_of_ms: now_ms,
                    };
                    (s.clone(), sym)
                })
                .collect();
            return corrections;
        }
        // Symbols known here but absent from the reply: flat as of asking.
        let absent: Vec<String> = self
            .symbols
            .keys()
            .filter(|s| !rest.contains_key(*s))
            .cloned()
            .collect();
        let flat_legs: Legs = Ok(BTreeMap::new());
        for (name, legs) in rest
            .iter()
            .map(|(s, l)| (s.clone(), l))
            .chain(absent.into_iter().map(|s| (s, &flat_legs)))
        {
            let sym = self.symbols.entry(name.clone()).or_insert_with(|| Symbol {
                legs: Ok(BTreeMap::new()),
                by_stream: BTreeMap::new(),
                feed: Feed::Rest,
                as_of_ms: now_ms,
            });
            let rest_legs = match legs {
                Err(problem) => {
                    sym.legs = Err(problem);
                    sym.by_stream.clear();
                    sym.feed = Feed::Rest;
                    sym.as_of_ms = now_ms;
                    continue;
                }
                Ok(l) => l,
            };
            // Invalid before: the valid reply starts the symbol afresh.
            let mut mine =
                std::mem::replace(&mut sym.legs, Ok(BTreeMap::new())).unwrap_or_default();
            // Every side either reply or state knows; a side the reply
            // leaves out is flat as of asking.
            let mut sides: Vec<Leg> = mine.keys().chain(rest_legs.keys()).copied().collect();
            sides.sort();
            sides.dedup();
            for side in sides {
                let told = rest_legs.get(&side).cloned().unwrap_or_else(|| LegState {
                    amt: Decimal::ZERO,
                    entry_price: "0".into(),
                    unrealized_pnl: "0".into(),
                    mark_price: mine
                        .get(&side)
                        .map_or_else(|| "0".into(), |l| l.mark_price.clone()),
                    leverage: mine
                        .get(&side)
                        .map_or_else(|| "0".into(), |l| l.leverage.clone()),
                    updated_ms: asked_ms,
                });
                let newer = mine
                    .get(&side)
                    .is_none_or(|l| told.updated_ms >= l.updated_ms);
                if let Some(l) = mine.get_mut(&side) {
                    // Mark price and leverage are REST's alone: always the
                    // latest reply's.
                    l.mark_price = told.mark_price.clone();
                    l.leverage = told.leverage.clone();
                }
                if !newer {
                    continue;
                }
                if sym.by_stream.remove(&side) == Some(true) {
                    if let Some(l) = mine.get(&side).filter(|l| l.amt != told.amt) {
                        corrections.push(Correction {
                            symbol: name.clone(),
                            leg: side,
                            stream_amt: l.amt,
                            rest_amt: told.amt,
                        });
                    }
                }
                mine.insert(side, told);
                sym.feed = Feed::Rest;
            }
            sym.legs = Ok(mine);
            sym.as_of_ms = now_ms;
        }
        corrections.sort_by(|a, b| (&a.symbol, a.leg).cmp(&(&b.symbol, b.leg)));
        corrections
    }

    /// Applies an event at `now_ms` (local): each entry whose `T` is newer
    /// than its leg's state. An entry for a symbol whose REST rows are
    /// invalid changes nothing: the symbol stays invalid until REST says
    /// otherwise.
    pub fn apply_event(&mut self, ev: &AccountUpdate, now_ms: u64) -> Applied {
        let mut out = Applied::default();
        for e in &ev.legs {
            let sym = self
                .symbols
                .entry(e.symbol.clone())
                .or_insert_with(|| Symbol {
                    legs: Ok(BTreeMap::new()),
                    by_stream: BTreeMap::new(),
                    feed: Feed::Stream,
                    as_of_ms: now_ms,
                });
            let Ok(legs) = &mut sym.legs else {
                out.stale += 1;
                continue;
            };
            if legs.get(&e.leg).is_some_and(|l| ev.tx_ms <= l.updated_ms) {
                out.stale += 1;
                continue;
            }
            // The event carries no mark price or leverage: the leg keeps
            // REST's, or the symbol's other leg's.
            let (mark, lev) = legs
                .get(&e.leg)
                .or_else(|| legs.values().next())
                .map_or_else(
                    || ("0".to_string(), "0".to_string()),
                    |l| (l.mark_price.clone(), l.leverage.clone()),
                );
            legs.insert(
                e.leg,
                LegState {
                    amt: e.amt,
                    entry_price: e.entry_price.clone(),
                    unrealized_pnl: e.unrealized_pnl.clone(),
                    mark_price: mark,
                    leverage: lev,
                    updated_ms: ev.tx_ms,
                },
            );
            sym.by_stream.insert(e.leg, true);
            sym.feed = Feed::Stream;
            sym.as_of_ms = now_ms;
            out.symbols.push(e.symbol.clone());
        }
        out.symbols.sort();
        out.symbols.dedup();
        out
    }

    /// A symbol's position (flat when the exchange never named it).
    pub fn position(&self, symbol: &str) -> Position {
        self.symbols
            .get(symbol)
            .map_or_else(Position::flat, |s| fold(&s.legs))
    }

    /// Who set a symbol's position, and when that was applied (local ms).
    pub fn feed(&self, symbol: &str) -> Option<(Feed, u64)> {
        self.symbols.get(symbol).map(|s| (s.feed, s.as_of_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::PositionSide;
    use serde_json::json;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn rest(rows: serde_json::Value) -> HashMap<String, Legs> {
        super::super::positions::parse_rest_legs(&rows, 0).unwrap()
    }

    fn ev(t: u64, legs: &[(&str, Leg, &str)]) -> AccountUpdate {
        AccountUpdate {
            event_ms: t + 1,
            tx_ms: t,
            legs: legs
                .iter()
                .map(|(s, l, a)| EventLeg {
                    symbol: s.to_string(),
                    leg: *l,
                    amt: d(a),
                    entry_price: "100".into(),
                    unrealized_pnl: "0".into(),
                })
                .collect(),
        }
    }

    fn amt(b: &Book, s: &str) -> (PositionSide, String) {
        let p = b.position(s);
        (p.side, crate::domain::dec_str(p.amt))
    }

    /// The order rule, as a table: start from REST (BTC 1 at t=100), then
    /// one step; the amount and feed that result.
    #[test]
    fn the_order_rule() {
        enum Step {
            Event(u64, &'static str),
            Rest(u64, &'static str),
        }
        let cases: &[(&str, Step, &str, Feed, usize)] = &[
            (
                "a newer event applies",
                Step::Event(101, "2"),
                "2",
                Feed::Stream,
                0,
            ),
            (
                "an event as old as the state is stale",
                Step::Event(100, "2"),
                "1",
                Feed::Rest,
                0,
            ),
            (
                "an older event is stale",
                Step::Event(50, "2"),
                "1",
                Feed::Rest,
                0,
            ),
            (
                "a REST row as old as the state applies",
                Step::Rest(100, "1"),
                "1",
                Feed::Rest,
                0,
            ),
            (
                "an older REST row is ignored",
                Step::Rest(99, "3"),
                "1",
                Feed::Rest,
                0,
            ),
            (
                "a newer REST row applies",
                Step::Rest(150, "3"),
                "3",
                Feed::Rest,
                0,
            ),
        ];
        for (name, step, want, feed, corrections) in cases {
            let mut b = Book::default();
            b.apply_rest(
                &rest(json!([{"symbol": "BTCUSDT", "positionAmt": "1", "updateTime": 100}])),
                90,
                1,
                false,
            );
            let c = match step {
                Step::Event(t, a) => {
                    b.apply_event(&ev(*t, &[("BTCUSDT", Leg::Both, a)]), 2);
                    0
                }
                Step::Rest(t, a) => b
                    .apply_rest(
                        &rest(json!([{"symbol": "BTCUSDT", "positionAmt": a, "updateTime": t}])),
                        t - 1,
                        2,
                        false,
                    )
                    .len(),
            };
            assert_eq!(
                crate::domain::dec_str(b.position("BTCUSDT").amt),
                *want,
                "{name}"
            );
            assert_eq!(b.feed("BTCUSDT").unwrap().0, *feed, "{name}");
            assert_eq!(c, *corrections, "{name}");
        }
    }

    #[test]
    fn a_rest_row_that_changes_what_the_stream_set_is_a_correction() {
        let mut b = Book::default();
        let r = |a: &str, t: u64| {
            rest(json!([{"symbol": "BTCUSDT", "positionAmt": a, "updateTime": t}]))
        };
        b.apply_rest(&r("0", 10), 5, 1, false);
        b.apply_event(&ev(20, &[("BTCUSDT", Leg::Both, "1")]), 2);
        // REST confirming the stream is no correction, and confirms it.
        assert!(b.apply_rest(&r("1", 20), 21, 3, false).is_empty());
        b.apply_event(&ev(30, &[("BTCUSDT", Leg::Both, "2")]), 4);
        // An event swallowed: REST knows of 40, the stream stopped at 30.
        let c = b.apply_rest(&r("5", 40), 41, 5, false);
        assert_eq!(
            c,
            vec![Correction {
                symbol: "BTCUSDT".into(),
                leg: Leg::Both,
                stream_amt: d("2"),
                rest_amt: d("5")
            }]
        );
        assert_eq!(amt(&b, "BTCUSDT"), (PositionSide::Long, "5".into()));
        // REST older than the stream's newest: no correction, no change.
        b.apply_event(&ev(50, &[("BTCUSDT", Leg::Both, "6")]), 6);
        assert!(b.apply_rest(&r("5", 40), 49, 7, false).is_empty());
        assert_eq!(amt(&b, "BTCUSDT"), (PositionSide::Long, "6".into()));
    }

    #[test]
    fn hedge_mode_legs_fold_like_rest_rows() {
        let mut b = Book::default();
        b.apply_rest(
            &rest(json!([
                {"symbol": "ETHUSDT", "positionAmt": "0", "positionSide": "LONG", "updateTime": 1, "markPrice": "3000"},
                {"symbol": "ETHUSDT", "positionAmt": "0", "positionSide": "SHORT", "updateTime": 1, "markPrice": "3000"}
            ])),
            1,
            1,
            false,
        );
        b.apply_event(&ev(10, &[("ETHUSDT", Leg::Short, "-2")]), 2);
        let p = b.position("ETHUSDT");
        assert_eq!((p.side, p.amt), (PositionSide::Short, d("-2")));
        assert_eq!(p.mark_price, "3000", "the event keeps REST's mark price");
        b.apply_event(&ev(11, &[("ETHUSDT", Leg::Long, "1")]), 3);
        assert_eq!(b.position("ETHUSDT").side, PositionSide::Hedged);
        b.apply_event(&ev(12, &[("ETHUSDT", Leg::Short, "0")]), 4);
        assert_eq!(amt(&b, "ETHUSDT"), (PositionSide::Long, "1".into()));
    }

    #[test]
    fn absent_and_invalid_symbols() {
        let mut b = Book::default();
        assert!(!b.known());
        b.apply_event(&ev(10, &[("SOLUSDT", Leg::Both, "3")]), 1);
        // A reply asked after the event that leaves the symbol out: flat.
        b.apply_rest(&rest(json!([])), 11, 2, false);
        assert!(b.known());
        assert_eq!(amt(&b, "SOLUSDT"), (PositionSide::None, "0".into()));
        // Asked before a newer event: the event stands.
        b.apply_event(&ev(20, &[("SOLUSDT", Leg::Both, "4")]), 3);
        b.apply_rest(&rest(json!([])), 15, 4, false);
        assert_eq!(amt(&b, "SOLUSDT"), (PositionSide::Long, "4".into()));
        // Invalid rows win over the stream until a valid reply.
        b.apply_rest(
            &rest(json!([{"symbol": "SOLUSDT", "positionAmt": "lots", "updateTime": 1}])),
            30,
            5,
            false,
        );
        assert_eq!(
            b.apply_event(&ev(40, &[("SOLUSDT", Leg::Both, "1")]), 6)
                .stale,
            1
        );
        assert_eq!(b.position("SOLUSDT").side, PositionSide::Hedged);
        b.apply_rest(
            &rest(json!([{"symbol": "SOLUSDT", "positionAmt": "1", "updateTime": 41}])),
            42,
            7,
            false,
        );
        assert_eq!(amt(&b, "SOLUSDT"), (PositionSide::Long, "1".into()));
    }

    #[test]
    fn without_the_stream_rest_replaces_everything() {
        let mut b = Book::default();
        b.apply_rest(
            &rest(json!([{"symbol": "BTCUSDT", "positionAmt": "1", "updateTime": 100}])),
            1,
            1,
            true,
        );
        // An older updateTime still replaces: polling alone, as before.
        b.apply_rest(
            &rest(json!([{"symbol": "BTCUSDT", "positionAmt": "2", "updateTime": 5}])),
            1,
            2,
            true,
        );
        assert_eq!(amt(&b, "BTCUSDT"), (PositionSide::Long, "2".into()));
        b.apply_rest(&rest(json!([])), 1, 3, true);
        assert_eq!(amt(&b, "BTCUSDT"), (PositionSide::None, "0".into()));
    }
}
