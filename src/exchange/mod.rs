//! Exchange: Binance USDⓈ-M futures positions and step sizes (SPEC §7, §5).
//!
//! One signed `GET /fapi/v2/positionRisk` per cycle (every `P33_POLL_SEC`,
//! and at once when the allowlist gains symbols) → one pipeline writing
//! `quantum:position:snapshot:<symbol>` (and, with `P33_CANONICAL_POSITIONS`,
//! `quantum:state:positions:<symbol>`) for every allowlisted symbol, TTL 3600.
//! A failed cycle writes nothing. Step sizes come from the public
//! `GET /fapi/v1/exchangeInfo`, loaded at start and hourly, in both snapshot
//! modes. Both run as their own tasks: a slow exchange never delays plans.
//!
//! The parts: `rest.rs` (the signed client, capped bodies and waits),
//! `positions.rs` (a positionRisk reply into one position per symbol),
//! `snapshots.rs` (the snapshot writer), `step_table.rs` (step sizes); this
//! file runs the poller.

mod positions;
mod rest;
mod snapshots;
mod step_table;

pub use positions::{parse_positions, Position};
pub use rest::{
    parse_step_sizes, retry_after, sign, Client, ExchangeError, HTTP_TIMEOUT, MAX_BODY_BYTES,
    MAX_RETRY_AFTER,
};
pub use snapshots::{source_label, write_snapshots, SNAPSHOT_TTL_S};
pub use step_table::{load_saved_steps, run_step_sizes, STEP_REFRESH, STEP_RETRY};

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::allowlist::AllowlistHandle;
use crate::config::Config;
use crate::domain::{dec_str, PositionSide};
use crate::metrics::Metrics;
use crate::steps::Positioned;
use crate::store;

/// The shortest time between two polls triggered by allowlist gains.
pub const MIN_EXTRA_POLL_GAP: Duration = Duration::from_secs(1);

/// Polls positions until `cancel` fires: every `P33_POLL_SEC`, and at once
/// when `gained` changes (the allowlist gained symbols) — but such an extra
/// poll comes at least [`MIN_EXTRA_POLL_GAP`] after the previous one, so a
/// flapping universe cannot multiply the request rate (SPEC §7).
pub async fn run_poller(
    cfg: Arc<Config>,
    redis: store::Redis,
    allowlist: AllowlistHandle,
    positioned: Positioned,
    metrics: Arc<Metrics>,
    mut gained: watch::Receiver<u64>,
    cancel: CancellationToken,
) {
    let client = match Client::new(&cfg, metrics.clone()) {
        Ok(c) => c,
        Err(e) => {
            warn!("snapshots: cannot build the HTTP client: {e}; snapshots will age");
            return cancel.cancelled().await;
        }
    };
    let Some(mut con) = redis
        .connect("snapshot poller", Duration::from_secs(10), &cancel)
        .await
    else {
        return;
    };
    let source = source_label(&cfg.exchange_base_url);
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
        let allow = allowlist.load();
        let mut symbols: Vec<String> = allow.symbols.iter().cloned().collect();
        symbols.sort();
        if symbols.is_empty() {
            continue;
        }
        let started = Instant::now();
        let fetched = tokio::select! {
            _ = cancel.cancelled() => return,
            r = client.signed_get("/fapi/v2/positionRisk") => r.and_then(|v| parse_positions(&v)),
        };
        let positions = match fetched {
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
        let ts_ms = store::now_ms();
        let ts = ts_ms as f64 / 1000.0;
        // The position cap's view is the exchange's answer, whether or not
        // every hash below is written: a write that fails for one key (one
        // of another type) must not leave the cap counting an old view.
        positioned.set(
            symbols
                .iter()
                .filter(|s| {
                    positions
                        .get(*s)
                        .is_some_and(|p| p.side != PositionSide::None)
                })
                .cloned()
                .collect(),
        );
        // A dry run writes nothing the live pipeline reads (SPEC §14).
        let written = if cfg.dry_run {
            Ok(())
        } else {
            write_snapshots(
                &mut con,
                &symbols,
                &positions,
                ts_ms,
                source,
                cfg.canonical_positions,
            )
            .await
        };
        match written {
            Ok(()) => {
                if failures > 0 {
                    info!("snapshots: positionRisk recovered after {failures} failed cycle(s)");
                }
                failures = 0;
                let mut invalid = String::new();
                for s in &symbols {
                    if let Some(p) = positions.get(s).filter(|p| p.side == PositionSide::Hedged) {
                        let why = p
                            .problem
                            .unwrap_or("hedge-mode positions open on both sides");
                        invalid.push_str(&format!(" {s} ({why})"));
                    }
                }
                if invalid != warned_invalid {
                    if !invalid.is_empty() {
                        warn!("snapshots: written as HEDGED, plans denied:{invalid}");
                    }
                    warned_invalid = invalid;
                }
                for s in &symbols {
                    let amt = positions
                        .get(s)
                        .map_or(0.0, |p| dec_str(p.amt).parse().unwrap_or(0.0));
                    metrics.observe_snapshot(s, ts, amt);
                }
                let keep: HashSet<&str> = symbols.iter().map(String::as_str).collect();
                metrics.retain_snapshot_symbols(&|s| keep.contains(s));
                metrics
                    .snapshot_cycle_seconds
                    .observe(started.elapsed().as_secs_f64());
            }
            Err(e) => warn!("snapshots: writing {} hashes failed: {e}", symbols.len()),
        }
    }
}
