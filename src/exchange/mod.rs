//! Exchange (SPEC §5, §7, §16, §19): Binance USDⓈ-M futures positions —
//! polled, and live from the user data stream — written as the snapshots the
//! gate judges on, the positions stream and the pipeline's closed trades;
//! and the step sizes. It may import every stage but the app: the gate's
//! step table, the allowlist it writes for, the operator's control path (a
//! liquidation tightens its symbol), observability, configuration, Redis
//! and the vocabulary.
//!
//! One signed `GET /fapi/v2/positionRisk` per cycle (every `P33_POLL_SEC`,
//! and at once when the allowlist gains symbols) → one pipeline writing
//! `quantum:position:snapshot:<symbol>` (and, with `P33_CANONICAL_POSITIONS`,
//! `quantum:state:positions:<symbol>`) for every allowlisted symbol, TTL 3600.
//! A failed cycle writes nothing. Step sizes come from the public
//! `GET /fapi/v1/exchangeInfo`, loaded at start and hourly, in both snapshot
//! modes. Both run as their own tasks: a slow exchange never delays plans.
//!
//! With `P33_POSITION_STREAM=on` (SPEC §16) the user data stream feeds the
//! same state between polls, and polling becomes its reconcile.
//!
//! The parts: `rest.rs` (the signed client, capped bodies and waits, the
//! listenKey), `positions.rs` (rows and events into one position per
//! symbol), `book.rs` (the position state and its order rule),
//! `machine.rs` (the stream's states, pure), `orders.rs` (order updates and
//! their causes, pure), `closes.rs` (exchange-side closes joined from fills
//! and changes to flat, pure), `frames.rs` (a frame's text into a checked
//! event, pure), `user_stream.rs` (the WebSocket task), `snapshots.rs` (the snapshot writer), `step_table.rs`
//! (step sizes); this file runs the poller.

mod book;
mod closes;
mod frames;
mod machine;
mod orders;
mod positions;
mod rest;
mod snapshots;
mod step_table;
mod user_stream;

pub use book::{
    AccountUpdate, Applied, Book, Clock, Correction, EventLeg, Feed, LegChange, Reply,
    MAX_AHEAD_MS, MAX_PENDING_CHANGES,
};
pub use closes::{Closes, TradeClosed, FILL_KEEP_MS, GRACE_MS, JOIN_MS, MAX_HELD};
pub use frames::{parse_frame, Frame};
pub use machine::{
    backoff, Action, Input, Machine, Phase, Reason, BACKOFF_MAX, BACKOFF_MIN, MAX_BUFFERED,
    MAX_BUFFERED_BYTES, STEADY_AFTER,
};
pub use orders::{cause, parse_order_update, Cause, OrderUpdate, CLIENT_ID_MAX_CHARS};
pub use positions::{fold, parse_positions, parse_rest_legs, Leg, LegState, Legs, Position};
pub use rest::{
    parse_step_sizes, retry_after, sign, Client, ExchangeError, HTTP_TIMEOUT, MAX_BODY_BYTES,
    MAX_RETRY_AFTER,
};
pub use snapshots::{
    source_label, write_snapshots, Row, Stamp, StreamState, Writer, POSITIONS_MAXLEN,
    SNAPSHOT_TTL_S, TRADE_CLOSED_MAXLEN,
};
pub use step_table::{load_saved_steps, run_step_sizes, STEP_REFRESH, STEP_RETRY};
pub use user_stream::{
    Stream, CONNECT_TIMEOUT, MAX_FRAME_BYTES, PONG_DEADLINE, REPLACE_OVERLAP,
    RESTAMP_MAX_FRAME_AGE_MS,
};

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::domain::{dec_str, PositionSide};
use crate::observe::metrics::Metrics;
use crate::redis::store;

/// The shortest time between two polls triggered by allowlist gains.
pub const MIN_EXTRA_POLL_GAP: Duration = Duration::from_secs(1);

/// Counts and says each correction: a REST reply that changed an amount
/// the stream had set is a missed event (SPEC §16).
pub(crate) fn report_corrections(metrics: &Metrics, corrections: &[Correction]) {
    for c in corrections {
        metrics.position_stream_corrections_total.inc();
        warn!(
            "position stream: positionRisk corrected {} {}: the stream said {}, REST says {} (a missed event)",
            crate::text::clip(&c.symbol),
            c.leg.as_str(),
            dec_str(c.stream_amt),
            dec_str(c.rest_amt)
        );
    }
}

/// Polls positions until `cancel` fires: every `P33_POLL_SEC`, and at once
/// when `gained` changes (the allowlist gained symbols) — but such an extra
/// poll comes at least [`MIN_EXTRA_POLL_GAP`] after the previous one, so a
/// flapping universe cannot multiply the request rate (SPEC §7). Each reply
/// goes into the writer's book (replacing it, without the stream; by the
/// order rule, with it) and every allowlisted snapshot is written from it.
pub async fn run_poller(
    cfg: Arc<Config>,
    redis: store::Redis,
    client: Arc<Client>,
    writer: Arc<Writer>,
    metrics: Arc<Metrics>,
    mut gained: watch::Receiver<u64>,
    cancel: CancellationToken,
) {
    let Some(mut con) = redis
        .connect("snapshot poller", Duration::from_secs(10), &cancel)
        .await
    else {
        return;
    };
    let mut tick = tokio::time::interval(cfg.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures = 0u64;
    let mut last_poll: Option<Instant> = None;
    // The symbols last named in the "plans denied" WARN: it is repeated only
    // when that set changes, not every cycle.
    let mut warned_invalid = String::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
            r = gained.changed() => {
                if r.is_err() { return cancel.cancelled().await; }
                if let Some(at) = last_poll.and_then(|t| t.checked_add(MIN_EXTRA_POLL_GAP)) {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep_until(at.into()) => {}
                    }
                }
                // Gains that came while waiting are covered by this poll.
                gained.borrow_and_update();
                info!("allowlist gained symbols: polling positions now");
            }
        }
        last_poll = Some(Instant::now());
        let allow = writer.allowlist().load();
        let mut symbols: Vec<String> = allow.symbols.iter().cloned().collect();
        symbols.sort();
        if symbols.is_empty() {
            continue;
        }
        let started = Instant::now();
        let asked = client.clock();
        let fetched = tokio::select! {
            _ = cancel.cancelled() => return,
            r = client.signed_get("/fapi/v2/positionRisk") => {
                r.and_then(|v| parse_rest_legs(&v, asked.exchange_ms, client.clock().limit_ms()))
            }
        };
        let legs = match fetched {
            Ok(p) => p,
            Err(e) => {
                failures += 1;
                if failures <= 3 || failures.is_multiple_of(20) {
                    warn!(
                        "snapshots: positionRisk failed ({failures} in a row): {e}; snapshots age"
                    );
                }
                continue;
            }
        };
        let reply = Reply {
            legs: &legs,
            asked_ms: asked.exchange_ms,
            asked_local_ms: asked.local_ms,
            covers: &allow.symbols,
        };
        let now_allowed = writer.allowlist().load();
        let corrections = writer.book().apply_rest(
            reply,
            client.clock(),
            !cfg.position_stream,
            &now_allowed.symbols,
        );
        report_corrections(&metrics, &corrections);
        match writer.write(&mut con, None, Stamp::Now).await {
            Ok(_) => {
                if failures > 0 {
                    info!("snapshots: positionRisk recovered after {failures} failed cycle(s)");
                }
                failures = 0;
                let mut invalid = String::new();
                {
                    let book = writer.book();
                    for s in &symbols {
                        let p = book.position(s);
                        if p.side == PositionSide::Hedged {
                            let why = p
                                .problem
                                .unwrap_or("hedge-mode positions open on both sides");
                            invalid.push_str(&format!(" {s} ({why})"));
                        }
                    }
                }
                if invalid != warned_invalid {
                    if !invalid.is_empty() {
                        warn!("snapshots: written as HEDGED, plans denied:{invalid}");
                    }
                    warned_invalid = invalid;
                }
                metrics
                    .snapshot_cycle_seconds
                    .observe(started.elapsed().as_secs_f64());
            }
            Err(e) => warn!("snapshots: writing {} hashes failed: {e}", symbols.len()),
        }
    }
}
