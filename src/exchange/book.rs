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
mod tests;
