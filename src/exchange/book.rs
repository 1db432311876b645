//! The position state (SPEC §16): every symbol's legs as last told by the
//! exchange, from positionRisk replies and `ACCOUNT_UPDATE` events alike,
//! each leg stamped with the exchange's own time of it. Pure: no I/O, no
//! clock; the stream task and the poller share one behind a lock.
//!
//! The order rule: an event is applied to a leg when its `T` is newer than
//! the leg's `updated_ms`; a REST row when its `updateTime` is not older.
//! A REST row that changes an amount the stream set is a missed event: a
//! [`Correction`]. No exchange time is trusted beyond the exchange's clock
//! as we know it: a time up to [`MAX_AHEAD_MS`] ahead is taken as now, a
//! later one is out of bounds when it is read (the frame is invalid, the
//! row's symbol is invalid), and two replies in a row that agree win over
//! the state whatever the times say.

use std::collections::{BTreeMap, HashMap, HashSet};

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
    /// `a.m` in lower case (`order`, `funding_fee`, `adjustment`, …): why
    /// the positions changed; `other` for anything that is not a word.
    pub reason: String,
}

impl AccountUpdate {
    /// About what the event costs in memory, bytes: what the buffer of a
    /// reconcile is bounded by (SPEC §16).
    pub fn weight(&self) -> usize {
        self.legs.iter().fold(std::mem::size_of::<Self>(), |n, l| {
            n.saturating_add(std::mem::size_of::<EventLeg>())
                .saturating_add(l.symbol.len())
                .saturating_add(l.entry_price.len())
                .saturating_add(l.unrealized_pnl.len())
        })
    }
}

/// A change of a leg's amount, for `quantum:stream:p33.positions`
/// (`kind=position`, SPEC §19): kept by the book until the snapshot write
/// that shows it takes it into the same `MULTI`.
#[derive(Debug, Clone, PartialEq)]
pub struct LegChange {
    /// The symbol.
    pub symbol: String,
    /// The leg.
    pub leg: Leg,
    /// The amount before.
    pub from: Decimal,
    /// The amount after.
    pub to: Decimal,
    /// The leg's entry price before the change, as the exchange wrote it
    /// (`0` when there was none): what a close's `trade.closed` entry
    /// carries (SPEC §19).
    pub entry_before: String,
    /// The symbol's side after it (`LONG`, `SHORT`, `FLAT`, `HEDGED`).
    pub side_after: &'static str,
    /// The event's `a.m` in lower case, or `reconcile` for REST.
    pub reason: String,
    /// `T` (or the row's `updateTime`), exchange ms.
    pub exchange_ms: u64,
    /// Who said it.
    pub feed: Feed,
}

/// Changes kept at most between two writes (a flood drops the oldest: the
/// snapshots stay right, only the record thins).
pub const MAX_PENDING_CHANGES: usize = 10_000;

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
    /// Entries of symbols not on the allowlist: dropped, never stored.
    pub dropped: usize,
}

/// How far ahead of our clock (corrected by the exchange's offset) an
/// exchange time may be before it is out of bounds (SPEC §16), ms.
pub const MAX_AHEAD_MS: u64 = 5_000;

/// When a reply or event is applied: our clock, and the exchange's clock as
/// we know it (ours corrected by the server-time offset), both ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clock {
    /// Local time, ms.
    pub local_ms: u64,
    /// The exchange's time now, as far as we know it, ms.
    pub exchange_ms: u64,
}

impl Clock {
    /// The latest exchange time that is not out of bounds.
    pub fn limit_ms(self) -> u64 {
        self.exchange_ms.saturating_add(MAX_AHEAD_MS)
    }
}

#[derive(Debug, Clone)]
struct Symbol {
    /// `Err` while the last REST rows of the symbol made no position.
    legs: Legs,
    /// Which legs the stream set and REST has not confirmed since.
    by_stream: BTreeMap<Leg, bool>,
    /// What the previous REST reply said of each leg's amount (a side it
    /// left out: 0): two replies in a row that agree win (SPEC §16).
    last_rest: BTreeMap<Leg, Decimal>,
    /// When each leg's state was set, local ms: only a reply asked after
    /// that can overrule it.
    set_at: BTreeMap<Leg, u64>,
    /// The connection whose event set each leg last (none once REST set
    /// it): another event of that connection with the same `T` follows it
    /// (SPEC §19: one update per fill of an order, often in one ms).
    event_conn: BTreeMap<Leg, u64>,
    feed: Feed,
    /// Local time of the last applied update, ms.
    as_of_ms: u64,
}

impl Symbol {
    fn new(feed: Feed, as_of_ms: u64) -> Symbol {
        Symbol {
            legs: Ok(BTreeMap::new()),
            by_stream: BTreeMap::new(),
            last_rest: BTreeMap::new(),
            set_at: BTreeMap::new(),
            event_conn: BTreeMap::new(),
            feed,
            as_of_ms,
        }
    }
}

/// A positionRisk reply to apply: each symbol's legs, when it was asked
/// (exchange clock, ms), and the allowlist when it was asked.
#[derive(Debug, Clone, Copy)]
pub struct Reply<'a> {
    /// Each symbol's legs.
    pub legs: &'a HashMap<String, Legs>,
    /// When the request was sent, exchange clock, ms.
    pub asked_ms: u64,
    /// When the request was sent, local clock, ms.
    pub asked_local_ms: u64,
    /// The symbols allowlisted when it was asked: what the reply covers.
    pub covers: &'a HashSet<String>,
}

/// Every allowlisted symbol's legs.
///
/// Memory is bounded by the allowlist, whatever the exchange sends: a
/// symbol is stored only while it is allowlisted (an event naming another
/// is dropped when it is read; SPEC §16). A symbol is *known* (its
/// snapshot may be written) only when the last applied reply was asked
/// while it was allowlisted: an event dropped before it joined the
/// allowlist is then reflected in a reply, never silently lost.
#[derive(Debug, Default)]
pub struct Book {
    symbols: HashMap<String, Symbol>,
    /// The symbols the last applied reply covers.
    covered: HashSet<String>,
    /// Whether a positionRisk reply was applied: before that, no symbol's
    /// position is known (an absent symbol is not flat yet).
    rest_seen: bool,
    /// Whether changes are kept for the positions stream (SPEC §19).
    record: bool,
    /// The changes not yet written, oldest first.
    changes: std::collections::VecDeque<LegChange>,
}

impl Book {
    /// Keeps every change of a leg's amount for the positions stream
    /// (`P33_POSITION_EVENTS`).
    pub fn record_changes(&mut self, on: bool) {
        self.record = on;
        if !on {
            self.changes.clear();
        }
    }

    /// Takes the changes of `symbols` kept so far, oldest first (the
    /// others stay for their own write).
    pub fn take_changes(&mut self, symbols: &HashSet<&str>) -> Vec<LegChange> {
        let (taken, kept): (Vec<LegChange>, Vec<LegChange>) = self
            .changes
            .drain(..)
            .partition(|c| symbols.contains(c.symbol.as_str()));
        self.changes.extend(kept);
        taken
    }

    /// Keeps one change (bounded: the oldest goes first).
    fn note(&mut self, change: LegChange) {
        if !self.record {
            return;
        }
        if self.changes.len() >= MAX_PENDING_CHANGES {
            self.changes.pop_front();
        }
        self.changes.push_back(change);
    }
    /// Whether a positionRisk reply has been applied.
    pub fn known(&self) -> bool {
        self.rest_seen
    }

    /// Whether a symbol's position is known: the last reply covers it.
    pub fn knows(&self, symbol: &str) -> bool {
        self.covered.contains(symbol)
    }

    /// How many symbols are stored (bounded by the allowlist).
    pub fn stored(&self) -> usize {
        self.symbols.len()
    }

    /// Applies a positionRisk reply at `clock`; `now_allowed` is the
    /// allowlist now (a symbol in neither it nor the reply's is dropped).
    ///
    /// With `force` (no stream) the reply replaces everything, as polling
    /// alone always did. Otherwise each leg is taken when its `updateTime` is
    /// not older than the state's, or when this reply and the previous one
    /// agree on an amount the state does not hold (whatever the times say:
    /// the book can never be pinned); a symbol the reply leaves out is flat
    /// as of asking; a symbol whose rows are invalid is invalid until a
    /// reply makes it valid again (fail closed). No leg's time is ever
    /// later than the exchange's clock now.
    pub fn apply_rest(
        &mut self,
        reply: Reply<'_>,
        clock: Clock,
        force: bool,
        now_allowed: &HashSet<String>,
    ) -> Vec<Correction> {
        // A first reply, or a symbol first heard of, is no change: what
        // it says was so before this gate knew.
        let known_before = self.rest_seen;
        self.rest_seen = true;
        self.covered = reply.covers.clone();
        let asked_ms = reply.asked_ms.min(clock.exchange_ms);
        let keep = |s: &str| reply.covers.contains(s) || now_allowed.contains(s);
        let mut corrections = Vec::new();
        if force {
            self.symbols = reply
                .legs
                .iter()
                .filter(|(s, _)| keep(s))
                .map(|(s, legs)| {
                    let mut sym = Symbol::new(Feed::Rest, clock.local_ms);
                    sym.legs = clamped(legs.clone(), clock.exchange_ms);
                    (s.clone(), sym)
                })
                .collect();
            return corrections;
        }
        self.symbols.retain(|s, _| keep(s));
        let mut pending: Vec<LegChange> = Vec::new();
        let mut changed: Vec<LegChange> = Vec::new();
        // Symbols known here but absent from the reply: flat as of asking.
        let absent: Vec<String> = self
            .symbols
            .keys()
            .filter(|s| !reply.legs.contains_key(*s))
            .cloned()
            .collect();
        let flat_legs: Legs = Ok(BTreeMap::new());
        for (name, legs) in reply
            .legs
            .iter()
            .filter(|(s, _)| keep(s))
            .map(|(s, l)| (s.clone(), l))
            .chain(absent.into_iter().map(|s| (s, &flat_legs)))
        {
            let heard_before = known_before && self.symbols.contains_key(&name);
            let sym = self
                .symbols
                .entry(name.clone())
                .or_insert_with(|| Symbol::new(Feed::Rest, clock.local_ms));
            let rest_legs = match clamped(legs.clone(), clock.exchange_ms) {
                Err(problem) => {
                    sym.legs = Err(problem);
                    sym.by_stream.clear();
                    sym.last_rest.clear();
                    sym.set_at.clear();
                    sym.event_conn.clear();
                    sym.feed = Feed::Rest;
                    sym.as_of_ms = clock.local_ms;
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
            let previous = std::mem::take(&mut sym.last_rest);
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
                sym.last_rest.insert(side, told.amt);
                let held = mine.get(&side).map_or(Decimal::ZERO, |l| l.amt);
                let entry_before = mine
                    .get(&side)
                    .map_or_else(|| "0".to_string(), |l| l.entry_price.clone());
                let newer = mine
                    .get(&side)
                    .is_none_or(|l| told.updated_ms >= l.updated_ms);
                // Two replies in a row that agree, against a state set
                // before this one was asked (one asked before an event may
                // not know of it yet).
                let confirmed = !newer
                    && held != told.amt
                    && previous.get(&side) == Some(&told.amt)
                    && sym
                        .set_at
                        .get(&side)
                        .is_none_or(|t| *t < reply.asked_local_ms);
                if let Some(l) = mine.get_mut(&side) {
                    // Mark price and leverage are REST's alone: always the
                    // latest reply's.
                    l.mark_price = told.mark_price.clone();
                    l.leverage = told.leverage.clone();
                }
                if !newer && !confirmed {
                    continue;
                }
                let by_stream = sym.by_stream.remove(&side) == Some(true);
                if (by_stream || confirmed) && held != told.amt {
                    corrections.push(Correction {
                        symbol: name.clone(),
                        leg: side,
                        stream_amt: held,
                        rest_amt: told.amt,
                    });
                }
                if held != told.amt && heard_before {
                    changed.push(LegChange {
                        symbol: name.clone(),
                        leg: side,
                        from: held,
                        to: told.amt,
                        entry_before,
                        side_after: "",
                        reason: "reconcile".into(),
                        exchange_ms: told.updated_ms,
                        feed: Feed::Rest,
                    });
                }
                mine.insert(side, told);
                sym.set_at.insert(side, clock.local_ms);
                sym.event_conn.remove(&side);
                sym.feed = Feed::Rest;
            }
            sym.legs = Ok(mine);
            sym.as_of_ms = clock.local_ms;
            let side_after = side_word(&sym.legs);
            for mut c in changed.drain(..) {
                c.side_after = side_after;
                pending.push(c);
            }
        }
        for c in pending {
            self.note(c);
        }
        corrections.sort_by(|a, b| (&a.symbol, a.leg).cmp(&(&b.symbol, b.leg)));
        corrections
    }

    /// Applies an event read on connection `conn` at `clock`: each entry
    /// of an allowlisted symbol (`allowed`) whose `T` is newer than its
    /// leg's state, or equal to it when an earlier event of the same
    /// connection set the leg (Binance sends one update per fill of an
    /// order, often in the same millisecond, in order on one connection;
    /// SPEC §19). Across connections (a reconnect, a replacement's overlap
    /// that delivers an event twice) and against REST, only a newer `T`
    /// applies. Entries of other symbols are dropped, never stored. An entry for a symbol whose REST
    /// rows are invalid changes nothing: the symbol stays invalid until REST
    /// says otherwise. The event's time is taken no later than the
    /// exchange's clock now (the frame was checked against
    /// [`Clock::limit_ms`] when read).
    pub fn apply_event(
        &mut self,
        ev: &AccountUpdate,
        clock: Clock,
        allowed: &HashSet<String>,
        conn: u64,
    ) -> Applied {
        let mut out = Applied::default();
        let mut pending = Vec::new();
        let tx_ms = ev.tx_ms.min(clock.exchange_ms);
        for e in &ev.legs {
            if !allowed.contains(&e.symbol) {
                out.dropped += 1;
                continue;
            }
            let sym = self
                .symbols
                .entry(e.symbol.clone())
                .or_insert_with(|| Symbol::new(Feed::Stream, clock.local_ms));
            let Ok(legs) = &mut sym.legs else {
                out.stale += 1;
                continue;
            };
            let same_conn = sym.event_conn.get(&e.leg) == Some(&conn);
            if legs
                .get(&e.leg)
                .is_some_and(|l| tx_ms < l.updated_ms || (tx_ms == l.updated_ms && !same_conn))
            {
                out.stale += 1;
                continue;
            }
            // The event carries no mark price or leverage: the leg keeps
            // REST's, or the symbol's other leg's.
            let before = legs.get(&e.leg).map_or(Decimal::ZERO, |l| l.amt);
            let entry_before = legs
                .get(&e.leg)
                .map_or_else(|| "0".to_string(), |l| l.entry_price.clone());
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
                    updated_ms: tx_ms,
                },
            );
            sym.by_stream.insert(e.leg, true);
            sym.set_at.insert(e.leg, clock.local_ms);
            sym.event_conn.insert(e.leg, conn);
            sym.feed = Feed::Stream;
            sym.as_of_ms = clock.local_ms;
            out.symbols.push(e.symbol.clone());
            if before != e.amt {
                let side_after = side_word(&sym.legs);
                pending.push(LegChange {
                    symbol: e.symbol.clone(),
                    leg: e.leg,
                    from: before,
                    to: e.amt,
                    entry_before,
                    side_after,
                    reason: ev.reason.clone(),
                    // The event's own T (within bounds when read): what the
                    // fill's entry carries too, so the two join; the state
                    // keeps the clamped time.
                    exchange_ms: ev.tx_ms,
                    feed: Feed::Stream,
                });
            }
        }
        for c in pending {
            self.note(c);
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

/// The side word of a symbol's legs, for a change's `side_after`.
fn side_word(legs: &Legs) -> &'static str {
    match fold(legs).side {
        crate::domain::PositionSide::Long => "LONG",
        crate::domain::PositionSide::Short => "SHORT",
        crate::domain::PositionSide::None => "FLAT",
        crate::domain::PositionSide::Hedged => "HEDGED",
    }
}

/// Legs whose times are no later than `exchange_ms` (a row's `updateTime`
/// within the tolerance ahead is taken as now).
fn clamped(legs: Legs, exchange_ms: u64) -> Legs {
    legs.map(|mut l| {
        for s in l.values_mut() {
            s.updated_ms = s.updated_ms.min(exchange_ms);
        }
        l
    })
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
        super::super::positions::parse_rest_legs(&rows, 0, u64::MAX).unwrap()
    }

    fn ev(t: u64, legs: &[(&str, Leg, &str)]) -> AccountUpdate {
        AccountUpdate {
            event_ms: t + 1,
            tx_ms: t,
            reason: "order".into(),
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

    fn all() -> HashSet<String> {
        ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
            .into_iter()
            .map(String::from)
            .collect()
    }

    fn clock(local_ms: u64) -> Clock {
        Clock {
            local_ms,
            exchange_ms: 1_000_000,
        }
    }

    /// A reply asked (locally) just before it is applied at `now`.
    fn rest_apply(
        b: &mut Book,
        legs: &HashMap<String, Legs>,
        asked_ms: u64,
        now: u64,
        force: bool,
    ) -> Vec<Correction> {
        rest_asked(b, legs, asked_ms, now.saturating_sub(1), now, force)
    }

    fn rest_asked(
        b: &mut Book,
        legs: &HashMap<String, Legs>,
        asked_ms: u64,
        asked_local_ms: u64,
        now: u64,
        force: bool,
    ) -> Vec<Correction> {
        let covers = all();
        let reply = Reply {
            legs,
            asked_ms,
            asked_local_ms,
            covers: &covers,
        };
        b.apply_rest(reply, clock(now), force, &covers)
    }

    fn event_apply(b: &mut Book, ev: &AccountUpdate, now: u64) -> Applied {
        b.apply_event(ev, clock(now), &all(), 1)
    }

    /// SPEC §19: Binance sends one `ACCOUNT_UPDATE` per fill of an order,
    /// often with one `T`: on one connection they apply in arrival order;
    /// the same `T` from another connection (a replacement's overlap
    /// delivers it twice) or against a REST row is stale.
    #[test]
    fn several_updates_with_one_t_apply_in_order_on_one_connection() {
        let mut b = Book::default();
        rest_apply(&mut b, &rest(json!([])), 1, 1, false);
        for (conn, t, amt, applied, want) in [
            (1, 10, "0.02", true, "0.02"),
            (1, 10, "0.04", true, "0.04"),
            (1, 10, "1", true, "1"),
            // The same event again on the replacement: already applied.
            (2, 10, "0.02", false, "1"),
            (2, 11, "0.5", true, "0.5"),
            // The old connection's late copy of an older fill.
            (1, 10, "0.04", false, "0.5"),
            (2, 11, "0.7", true, "0.7"),
        ] {
            let a = b.apply_event(
                &ev(t, &[("BTCUSDT", Leg::Both, amt)]),
                clock(2),
                &all(),
                conn,
            );
            assert_eq!(a.symbols.len() == 1, applied, "conn {conn} T {t} {amt}");
            assert_eq!(amt_of(&b, "BTCUSDT"), want, "after conn {conn} T {t} {amt}");
        }
        // REST sets the leg at T 20: an event with that T is stale, on any
        // connection; a newer one applies.
        let row = rest(json!([{"symbol": "BTCUSDT", "positionAmt": "3", "updateTime": 20}]));
        rest_apply(&mut b, &row, 25, 5, false);
        assert_eq!(amt_of(&b, "BTCUSDT"), "3");
        let a = b.apply_event(&ev(20, &[("BTCUSDT", Leg::Both, "2")]), clock(6), &all(), 2);
        assert_eq!((a.stale, amt_of(&b, "BTCUSDT")), (1, "3".to_string()));
        b.apply_event(&ev(21, &[("BTCUSDT", Leg::Both, "2")]), clock(7), &all(), 2);
        assert_eq!(amt_of(&b, "BTCUSDT"), "2");
    }

    fn amt_of(b: &Book, s: &str) -> String {
        amt(b, s).1
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
            rest_apply(
                &mut b,
                &rest(json!([{"symbol": "BTCUSDT", "positionAmt": "1", "updateTime": 100}])),
                90,
                1,
                false,
            );
            let c = match step {
                Step::Event(t, a) => {
                    event_apply(&mut b, &ev(*t, &[("BTCUSDT", Leg::Both, a)]), 2);
                    0
                }
                Step::Rest(t, a) => rest_apply(
                    &mut b,
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
        rest_apply(&mut b, &r("0", 10), 5, 1, false);
        event_apply(&mut b, &ev(20, &[("BTCUSDT", Leg::Both, "1")]), 2);
        // REST confirming the stream is no correction, and confirms it.
        assert!(rest_apply(&mut b, &r("1", 20), 21, 3, false).is_empty());
        event_apply(&mut b, &ev(30, &[("BTCUSDT", Leg::Both, "2")]), 4);
        // An event swallowed: REST knows of 40, the stream stopped at 30.
        let c = rest_apply(&mut b, &r("5", 40), 41, 5, false);
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
        // REST older than the stream's newest, asked before the event
        // came: no correction, no change, though it agrees with the reply
        // before it.
        event_apply(&mut b, &ev(50, &[("BTCUSDT", Leg::Both, "6")]), 6);
        assert!(rest_asked(&mut b, &r("5", 40), 49, 5, 7, false).is_empty());
        assert_eq!(amt(&b, "BTCUSDT"), (PositionSide::Long, "6".into()));
        // Asked after it, and still agreeing: the replies win.
        let c = rest_asked(&mut b, &r("5", 40), 49, 8, 9, false);
        assert_eq!(c.len(), 1);
        assert_eq!(amt(&b, "BTCUSDT"), (PositionSide::Long, "5".into()));
    }

    /// An exchange time ahead of the exchange's clock as we know it can
    /// never pin a leg: it is taken as now (beyond [`MAX_AHEAD_MS`] it never
    /// reaches the book: the reader rejects it), so later events apply; and
    /// two replies in a row that agree win whatever the times say.
    #[test]
    fn no_exchange_time_pins_a_leg() {
        let mut b = Book::default();
        let r = |a: &str, t: u64| {
            rest(json!([{"symbol": "BTCUSDT", "positionAmt": a, "updateTime": t}]))
        };
        rest_apply(&mut b, &r("1.5", 900_000), 999_000, 1, false);
        // 4 s ahead of the exchange clock (1_000_000): taken as 1_000_000.
        event_apply(&mut b, &ev(1_004_000, &[("BTCUSDT", Leg::Both, "1000")]), 2);
        assert_eq!(amt(&b, "BTCUSDT"), (PositionSide::Long, "1000".into()));
        // A real event a moment later applies.
        let later = Clock {
            local_ms: 3,
            exchange_ms: 1_000_500,
        };
        let a = b.apply_event(
            &ev(1_000_400, &[("BTCUSDT", Leg::Both, "2")]),
            later,
            &all(),
            1,
        );
        assert_eq!((a.stale, a.symbols.len()), (0, 1));
        assert_eq!(amt(&b, "BTCUSDT"), (PositionSide::Long, "2".into()));
        // A REST row ahead is taken as now too: the next real one applies.
        let mut b = Book::default();
        rest_apply(&mut b, &r("7", 1_004_999), 1_000_000, 5, false);
        assert_eq!(amt(&b, "BTCUSDT"), (PositionSide::Long, "7".into()));
        let c = rest_apply(&mut b, &r("1.5", 1_000_000), 1_000_000, 7, false);
        assert!(c.is_empty());
        assert_eq!(amt(&b, "BTCUSDT"), (PositionSide::Long, "1.5".into()));
        // Whatever the state's time, two replies that agree against it win.
        let mut stuck = Book::default();
        rest_apply(&mut stuck, &r("1000", 1_000_000), 1_000_000, 1, false);
        for (now, want) in [(3, "1000"), (5, "1.5")] {
            rest_apply(&mut stuck, &r("1.5", 10), 1_000_000, now, false);
            assert_eq!(
                amt(&stuck, "BTCUSDT"),
                (PositionSide::Long, want.into()),
                "at {now}"
            );
        }
    }

    /// Memory is bounded by the allowlist: a feed naming symbols that are
    /// not on it stores nothing, and a symbol that joins the allowlist is
    /// known only once a reply asked while it was on it has been applied.
    #[test]
    fn only_allowlisted_symbols_are_stored_and_known() {
        let mut b = Book::default();
        rest_apply(&mut b, &rest(json!([])), 1, 1, false);
        let names: Vec<String> = (0..50_000).map(|i| format!("X{i}USDT")).collect();
        let legs: Vec<(&str, Leg, &str)> =
            names.iter().map(|n| (n.as_str(), Leg::Both, "1")).collect();
        let a = event_apply(&mut b, &ev(10, &legs), 2);
        assert_eq!((a.dropped, a.symbols.len(), b.stored()), (50_000, 0, 0));
        assert!(b.knows("BTCUSDT") && !b.knows("X1USDT"));
        // A reply of every symbol stores only the allowlisted ones.
        let rows: Vec<serde_json::Value> = names
            .iter()
            .map(|n| json!({"symbol": n, "positionAmt": "1", "updateTime": 5}))
            .collect();
        rest_apply(&mut b, &rest(serde_json::Value::Array(rows)), 20, 3, false);
        assert_eq!(b.stored(), 0);
        // X1USDT joins: its events are stored from then on, but it is known
        // only after a reply that covers it.
        let mut now_allowed = all();
        now_allowed.insert("X1USDT".into());
        b.apply_event(
            &ev(30, &[("X1USDT", Leg::Both, "2")]),
            clock(4),
            &now_allowed,
            1,
        );
        assert!(!b.knows("X1USDT"));
        let covers = now_allowed.clone();
        let one = rest(json!([{"symbol": "X1USDT", "positionAmt": "2", "updateTime": 30}]));
        let reply = Reply {
            legs: &one,
            asked_ms: 31,
            asked_local_ms: 5,
            covers: &covers,
        };
        b.apply_rest(reply, clock(6), false, &now_allowed);
        assert!(b.knows("X1USDT"));
        assert_eq!(amt(&b, "X1USDT"), (PositionSide::Long, "2".into()));
        // Off the allowlist again: the next reply drops it.
        rest_apply(&mut b, &rest(json!([])), 40, 8, false);
        assert_eq!((b.stored(), b.knows("X1USDT")), (0, false));
    }

    #[test]
    fn hedge_mode_legs_fold_like_rest_rows() {
        let mut b = Book::default();
        rest_apply(
            &mut b,
            &rest(json!([
                {"symbol": "ETHUSDT", "positionAmt": "0", "positionSide": "LONG", "updateTime": 1, "markPrice": "3000"},
                {"symbol": "ETHUSDT", "positionAmt": "0", "positionSide": "SHORT", "updateTime": 1, "markPrice": "3000"}
            ])),
            1,
            1,
            false,
        );
        event_apply(&mut b, &ev(10, &[("ETHUSDT", Leg::Short, "-2")]), 2);
        let p = b.position("ETHUSDT");
        assert_eq!((p.side, p.amt), (PositionSide::Short, d("-2")));
        assert_eq!(p.mark_price, "3000", "the event keeps REST's mark price");
        event_apply(&mut b, &ev(11, &[("ETHUSDT", Leg::Long, "1")]), 3);
        assert_eq!(b.position("ETHUSDT").side, PositionSide::Hedged);
        event_apply(&mut b, &ev(12, &[("ETHUSDT", Leg::Short, "0")]), 4);
        assert_eq!(amt(&b, "ETHUSDT"), (PositionSide::Long, "1".into()));
    }

    #[test]
    fn absent_and_invalid_symbols() {
        let mut b = Book::default();
        assert!(!b.known());
        event_apply(&mut b, &ev(10, &[("SOLUSDT", Leg::Both, "3")]), 1);
        // A reply asked after the event that leaves the symbol out: flat.
        rest_apply(&mut b, &rest(json!([])), 11, 2, false);
        assert!(b.known());
        assert_eq!(amt(&b, "SOLUSDT"), (PositionSide::None, "0".into()));
        // Asked before a newer event: the event stands.
        event_apply(&mut b, &ev(20, &[("SOLUSDT", Leg::Both, "4")]), 3);
        rest_apply(&mut b, &rest(json!([])), 15, 4, false);
        assert_eq!(amt(&b, "SOLUSDT"), (PositionSide::Long, "4".into()));
        // Invalid rows win over the stream until a valid reply.
        rest_apply(
            &mut b,
            &rest(json!([{"symbol": "SOLUSDT", "positionAmt": "lots", "updateTime": 1}])),
            30,
            5,
            false,
        );
        assert_eq!(
            event_apply(&mut b, &ev(40, &[("SOLUSDT", Leg::Both, "1")]), 6).stale,
            1
        );
        assert_eq!(b.position("SOLUSDT").side, PositionSide::Hedged);
        rest_apply(
            &mut b,
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
        rest_apply(
            &mut b,
            &rest(json!([{"symbol": "BTCUSDT", "positionAmt": "1", "updateTime": 100}])),
            1,
            1,
            true,
        );
        // An older updateTime still replaces: polling alone, as before.
        rest_apply(
            &mut b,
            &rest(json!([{"symbol": "BTCUSDT", "positionAmt": "2", "updateTime": 5}])),
            1,
            2,
            true,
        );
        assert_eq!(amt(&b, "BTCUSDT"), (PositionSide::Long, "2".into()));
        rest_apply(&mut b, &rest(json!([])), 1, 3, true);
        assert_eq!(amt(&b, "BTCUSDT"), (PositionSide::None, "0".into()));
    }
}
