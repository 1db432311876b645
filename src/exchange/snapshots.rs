//! The snapshot writer (SPEC §7, §16): symbols' positions from the shared
//! [`Book`] into `quantum:position:snapshot:<symbol>` (and the canonical
//! hash), one pipeline per write. The poller and the stream task both write
//! through one [`Writer`]; a write reads the book under the writer's lock,
//! so the last write to land is always built from the newest state.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::allowlist::AllowlistHandle;
use crate::domain::{dec_str, PositionSide};
use crate::gate::steps::Positioned;
use crate::observe::metrics::Metrics;
use crate::redis::keys;

use super::book::{Book, Feed, LegChange};
use super::closes::{Closes, TradeClosed};
use super::machine::Phase;
use super::orders::{Cause, OrderUpdate};
use super::Position;

/// When a snapshot write says its position was current.
#[derive(Debug, Clone, Copy)]
pub enum Stamp {
    /// Now (a REST reply or an event just applied).
    Now,
    /// The stream is live and its last frame came at this time (local ms):
    /// each symbol is current as of then, or of its last update if later.
    LastFrame(u64),
}

/// The stream's state as others see it (`p33_position_stream_live`, the
/// instance report).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamState {
    /// `P33_POSITION_STREAM=off`, or external mode.
    Off,
    /// Configured, not live.
    Down,
    /// Reconciled and following.
    Live,
}

impl StreamState {
    /// The instance report's word.
    pub fn word(self) -> &'static str {
        match self {
            StreamState::Off => "off",
            StreamState::Down => "down",
            StreamState::Live => "live",
        }
    }
}

/// The shared position state and its writer.
pub struct Writer {
    book: Mutex<Book>,
    gate: tokio::sync::Mutex<()>,
    allowlist: AllowlistHandle,
    positioned: Positioned,
    metrics: Arc<Metrics>,
    source: &'static str,
    canonical: bool,
    dry_run: bool,
    /// `kind=position` entries on the positions stream (SPEC §19).
    position_events: bool,
    /// Exchange-side closes on `quantum:stream:trade.closed` (SPEC §19).
    trade_closed: bool,
    /// Fills and changes to flat not joined yet (never held across an
    /// await).
    closes: Mutex<Closes>,
    stream: AtomicU8,
    last_frame_ms: AtomicU64,
}

impl Writer {
    /// A writer for `cfg`'s snapshots; the stream is `Down` when configured.
    pub fn new(
        cfg: &crate::config::Config,
        allowlist: AllowlistHandle,
        positioned: Positioned,
        metrics: Arc<Metrics>,
    ) -> Writer {
        let w = Writer {
            book: Mutex::new(Book::default()),
            gate: tokio::sync::Mutex::new(()),
            allowlist,
            positioned,
            metrics,
            source: source_label(&cfg.exchange_base_url),
            canonical: cfg.canonical_positions,
            dry_run: cfg.dry_run,
            // A dry run writes nothing the pipeline reads (SPEC §14).
            position_events: cfg.position_events && !cfg.dry_run,
            trade_closed: cfg.trade_closed_events && !cfg.dry_run,
            closes: Mutex::new(Closes::default()),
            stream: AtomicU8::new(0),
            last_frame_ms: AtomicU64::new(0),
        };
        w.set_stream(if cfg.position_stream {
            StreamState::Down
        } else {
            StreamState::Off
        });
        // The changes feed both streams.
        w.book().record_changes(w.position_events || w.trade_closed);
        for c in Cause::ALL.into_iter().filter(|c| c.by_exchange()) {
            for result in ["written", "failed"] {
                w.metrics
                    .trade_closed_events_total
                    .with_label_values(&[c.as_str(), result]);
            }
        }
        w
    }

    /// The allowlist the writer writes for.
    pub fn allowlist(&self) -> &AllowlistHandle {
        &self.allowlist
    }

    /// The book, locked (never across an await).
    pub fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The stream's state.
    pub fn stream(&self) -> StreamState {
        match self.stream.load(Ordering::Relaxed) {
            1 => StreamState::Down,
            2 => StreamState::Live,
            _ => StreamState::Off,
        }
    }

    /// Sets the stream's state (and `p33_position_stream_live`).
    pub fn set_stream(&self, s: StreamState) {
        let n = match s {
            StreamState::Off => 0,
            StreamState::Down => 1,
            StreamState::Live => 2,
        };
        self.stream.store(n, Ordering::Relaxed);
        self.metrics
            .position_stream_enabled
            .set(i64::from(s != StreamState::Off));
        self.metrics
            .position_stream_live
            .set(i64::from(s == StreamState::Live));
    }

    /// The phase of the machine, mirrored.
    pub fn set_phase(&self, p: Phase) {
        self.set_stream(if p == Phase::Live {
            StreamState::Live
        } else {
            StreamState::Down
        });
    }

    /// A frame (any, a pong included) came at `ms` (local).
    pub fn frame_at(&self, ms: u64) {
        self.last_frame_ms.store(ms, Ordering::Relaxed);
    }

    /// When the last frame came (local ms; 0: never).
    pub fn last_frame_ms(&self) -> u64 {
        self.last_frame_ms.load(Ordering::Relaxed)
    }

    /// Writes the snapshots of `only` (or, with `None`, of every
    /// allowlisted symbol) that are allowlisted, from the book, once a
    /// positionRisk reply has been applied; refreshes the position cap's
    /// view and the snapshot metrics. Returns how many were written. A dry
    /// run writes nothing (SPEC §14).
    pub async fn write(
        &self,
        con: &mut crate::redis::store::Conn,
        only: Option<&[String]>,
        stamp: Stamp,
    ) -> Result<usize, redis::RedisError> {
        let _gate = self.gate.lock().await;
        let allow = self.allowlist.load();
        let now = crate::redis::store::now_ms();
        let mut rows = Vec::new();
        let changes;
        {
            let mut book = self.book();
            if !book.known() {
                return Ok(0);
            }
            // A symbol that joined the allowlist after the last reply was
            // asked is not known yet (an event naming it before it joined
            // was dropped): written once a reply covers it.
            let wanted: Vec<&String> = match only {
                Some(list) => list
                    .iter()
                    .filter(|s| allow.symbols.contains(*s) && book.knows(s))
                    .collect(),
                None => allow.symbols.iter().filter(|s| book.knows(s)).collect(),
            };
            for sym in wanted {
                // A symbol no reply or event named is flat as of the reply
                // that left it out: no later than the last frame says.
                let (feed, as_of) = book.feed(sym).unwrap_or((Feed::Rest, 0));
                let ts_ms = match stamp {
                    Stamp::Now => now,
                    Stamp::LastFrame(f) => f.max(as_of),
                };
                rows.push((sym.clone(), book.position(sym), feed, ts_ms));
            }
            self.positioned.set(
                allow
                    .symbols
                    .iter()
                    .filter(|s| book.position(s).side != PositionSide::None)
                    .cloned()
                    .collect(),
            );
            // The changes these snapshots show go into the same MULTI.
            let written: HashSet<&str> = rows.iter().map(|r| r.0.as_str()).collect();
            changes = book.take_changes(&written);
        }
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        if rows.is_empty() {
            return Ok(0);
        }
        if !self.dry_run {
            let entries: &[LegChange] = if self.position_events { &changes } else { &[] };
            write_snapshots(con, &rows, entries, self.source, self.canonical).await?;
        }
        if self.trade_closed && !changes.is_empty() {
            let closed: Vec<TradeClosed> = {
                let mut j = self.closes();
                changes.iter().filter_map(|c| j.change(c, now)).collect()
            };
            self.publish_closes(con, closed).await;
        }
        for (sym, pos, _, ts_ms) in &rows {
            let amt = dec_str(pos.amt).parse().unwrap_or(0.0);
            self.metrics
                .observe_snapshot(sym, *ts_ms as f64 / 1000.0, amt);
        }
        if only.is_none() {
            let keep: HashSet<&str> = allow.symbols.iter().map(String::as_str).collect();
            self.metrics.retain_snapshot_symbols(&|s| keep.contains(s));
        }
        Ok(rows.len())
    }
}

impl Writer {
    fn closes(&self) -> MutexGuard<'_, Closes> {
        self.closes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fill of an allowlisted symbol: written to
    /// `quantum:stream:trade.closed` when it completes an exchange-side
    /// close (SPEC §19).
    pub async fn fill_closes(&self, con: &mut crate::redis::store::Conn, u: &OrderUpdate) {
        if !self.trade_closed {
            return;
        }
        let closed = self.closes().fill(u, crate::redis::store::now_ms());
        self.publish_closes(con, closed.into_iter().collect()).await;
    }

    /// The changes to flat whose own fill did not come within the grace:
    /// joined with the nearest (SPEC §19). About once a second.
    pub async fn due_closes(&self, con: &mut crate::redis::store::Conn) {
        if !self.trade_closed {
            return;
        }
        let closed = self.closes().due(crate::redis::store::now_ms());
        self.publish_closes(con, closed).await;
    }

    /// One `trade.closed` entry per close, each said and counted. A failed
    /// write is a WARN and `result=failed`: the positions stream still has
    /// the fill and the change.
    async fn publish_closes(&self, con: &mut crate::redis::store::Conn, closed: Vec<TradeClosed>) {
        for t in closed {
            let fields = t.fields(crate::redis::store::now_ms());
            let mut c = redis::cmd("XADD");
            c.arg(keys::TRADE_CLOSED_STREAM)
                .arg("MAXLEN")
                .arg("~")
                .arg(TRADE_CLOSED_MAXLEN)
                .arg("*");
            for (k, v) in &fields {
                c.arg(*k).arg(v);
            }
            let pnl = fields
                .iter()
                .find(|(k, _)| *k == "pnl_percent")
                .map_or("", |(_, v)| v.as_str());
            let result = match c.query_async::<String>(con).await {
                Ok(_) => {
                    tracing::info!(
                        "position stream: trade.closed for {} {} ({}, order {}): entry {} exit {} pnl {pnl}% realized {}",
                        t.symbol,
                        t.side,
                        t.cause.as_str(),
                        t.order_id,
                        crate::text::clip(&t.entry_price),
                        crate::text::clip(&t.exit_price),
                        dec_str(t.realized_pnl)
                    );
                    "written"
                }
                Err(e) => {
                    tracing::warn!(
                        "position stream: writing the {} close of {} (order {}) to {} failed: {e}",
                        t.cause.as_str(),
                        t.symbol,
                        t.order_id,
                        keys::TRADE_CLOSED_STREAM
                    );
                    "failed"
                }
            };
            self.metrics
                .trade_closed_events_total
                .with_label_values(&[t.cause.as_str(), result])
                .inc();
        }
    }
}

/// `quantum:stream:trade.closed`'s length, about: the longest any of its
/// writers keeps (the apply layer's 2000), so ours never trims theirs
/// sooner than they do.
pub const TRADE_CLOSED_MAXLEN: u64 = 2_000;

/// Snapshot and canonical hash lifetime, seconds.
pub const SNAPSHOT_TTL_S: i64 = 3600;

/// `binance_testnet` when the base URL's host contains `testnet`.
pub fn source_label(base_url: &str) -> &'static str {
    let host = url::Url::parse(base_url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_default();
    if host.contains("testnet") {
        "binance_testnet"
    } else {
        "binance"
    }
}

/// One snapshot to write: symbol, position, feed, time (local ms).
pub type Row = (String, Position, Feed, u64);

/// The positions stream's length, about (`MAXLEN ~`).
pub const POSITIONS_MAXLEN: u64 = 100_000;

/// Writes the rows' snapshots in one pipeline; with `changes`, in one
/// `MULTI` with a `kind=position` entry per change (SPEC §19: the entry and
/// the snapshot that shows it land together, and the snapshot is never
/// held back for it).
pub async fn write_snapshots(
    con: &mut crate::redis::store::Conn,
    rows: &[Row],
    changes: &[super::book::LegChange],
    source: &str,
    canonical: bool,
) -> Result<(), redis::RedisError> {
    let mut p = redis::pipe();
    if !changes.is_empty() {
        p.atomic();
    }
    let now_s = (crate::redis::store::now_ms() / 1000).to_string();
    for c in changes {
        p.cmd("XADD")
            .arg(keys::POSITIONS_STREAM)
            .arg("MAXLEN")
            .arg("~")
            .arg(POSITIONS_MAXLEN)
            .arg("*")
            .arg("kind")
            .arg("position")
            .arg("symbol")
            .arg(&c.symbol)
            .arg("leg")
            .arg(c.leg.as_str())
            .arg("from_amt")
            .arg(dec_str(c.from))
            .arg("to_amt")
            .arg(dec_str(c.to))
            .arg("side_after")
            .arg(c.side_after)
            .arg("reason")
            .arg(&c.reason)
            .arg("exchange_ts_ms")
            .arg(c.exchange_ms)
            .arg("feed")
            .arg(c.feed.as_str())
            .arg("ts_epoch")
            .arg(&now_s)
            .ignore();
    }
    for (sym, pos, feed, ts_ms) in rows {
        // Whole seconds: the pipeline's Python readers call int() on it (§7).
        let ts = (ts_ms / 1000).to_string();
        let ts_ms = ts_ms.to_string();
        let key = keys::snapshot(sym);
        let amt = dec_str(pos.amt);
        p.cmd("HSET")
            .arg(&key)
            .arg("position_amt")
            .arg(&amt)
            .arg("side")
            .arg(pos.side.as_str())
            .arg("entry_price")
            .arg(&pos.entry_price)
            .arg("mark_price")
            .arg(&pos.mark_price)
            .arg("unrealized_pnl")
            .arg(&pos.unrealized_pnl)
            .arg("leverage")
            .arg(&pos.leverage)
            .arg("ts_epoch")
            .arg(&ts)
            .arg("ts_epoch_ms")
            .arg(&ts_ms)
            .arg("source")
            .arg(source)
            .arg("feed")
            .arg(feed.as_str())
            .ignore();
        p.cmd("EXPIRE").arg(&key).arg(SNAPSHOT_TTL_S).ignore();
        // The canonical hash knows LONG/SHORT/FLAT only: a hedged symbol is
        // left out rather than written with a side that would mislead.
        if canonical && pos.side != PositionSide::Hedged {
            let ckey = keys::canonical_position(sym);
            let side = match pos.side {
                PositionSide::Long => "LONG",
                PositionSide::Short => "SHORT",
                PositionSide::None | PositionSide::Hedged => "FLAT",
            };
            p.cmd("HSET")
                .arg(&ckey)
                .arg("symbol")
                .arg(sym)
                .arg("position_amt")
                .arg(&amt)
                .arg("side")
                .arg(side)
                .arg("quantity")
                .arg(dec_str(pos.amt.abs()))
                .arg("entry_price")
                .arg(&pos.entry_price)
                .arg("mark_price")
                .arg(&pos.mark_price)
                .arg("current_price")
                .arg(&pos.mark_price)
                .arg("unrealized_pnl")
                .arg(&pos.unrealized_pnl)
                .arg("leverage")
                .arg(&pos.leverage)
                .arg("ts_epoch")
                .arg(&ts)
                .arg("source")
                .arg("position_state_brain")
                .ignore();
            p.cmd("EXPIRE").arg(&ckey).arg(SNAPSHOT_TTL_S).ignore();
        }
    }
    p.query_async::<()>(con).await
}
