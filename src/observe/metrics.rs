//! Metrics: one private Prometheus registry and typed handles (SPEC §9).
//!
//! The original daemon's names are kept as they were
//! (`p33_permit_allow_total{symbol}`, `p33_permit_deny_total{symbol,reason}`,
//! `p33_snapshot_age_seconds{symbol}`, `p33_ledger_position_amt{symbol}`,
//! `p33_exchange_position_amt{symbol}`); the rest are the additions SPEC §9
//! asks for. `main` builds one [`Metrics`] and passes it in, so every test
//! daemon has a fresh one. Also holds the readiness latches `/readyz` reads.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, Opts, Registry, TextEncoder,
};

/// The four allowlist sources, in tier order.
pub const SOURCES: [&str; 4] = ["universe", "last_ok", "env", "none"];

/// Every metric the daemon exports, plus readiness latches.
pub struct Metrics {
    registry: Registry,
    /// `p33_permit_allow_total{symbol}`.
    pub permit_allow_total: IntCounterVec,
    /// `p33_permit_deny_total{symbol,reason}`.
    pub permit_deny_total: IntCounterVec,
    /// `p33_snapshot_age_seconds{symbol}`.
    pub snapshot_age_seconds: GaugeVec,
    /// `p33_ledger_position_amt{symbol}`.
    pub ledger_position_amt: GaugeVec,
    /// `p33_exchange_position_amt{symbol}`.
    pub exchange_position_amt: GaugeVec,
    /// `p33_allowlist_source{source}`: 1 on the current source.
    pub allowlist_source: GaugeVec,
    /// `p33_allowlist_symbols`.
    pub allowlist_symbols: IntGauge,
    /// `p33_allowlist_age_seconds`.
    pub allowlist_age_seconds: Gauge,
    /// `p33_allowlist_resolutions_total{source}`.
    pub allowlist_resolutions_total: IntCounterVec,
    /// `p33_plans_total{outcome}`.
    pub plans_total: IntCounterVec,
    /// `p33_permit_latency_seconds`: entry ID time → permit written.
    pub permit_latency_seconds: Histogram,
    /// `p33_plan_batch_size`.
    pub batch_size: Histogram,
    /// `p33_redis_up`.
    pub redis_up: IntGauge,
    /// `p33_redis_master_known`: 1 while a master is known (always, without
    /// sentinels).
    pub redis_master_known: IntGauge,
    /// `p33_redis_failovers_total`: switches to another master (SPEC §15).
    pub redis_failovers_total: IntCounter,
    /// `p33_exchange_requests_total{outcome}`.
    pub exchange_requests_total: IntCounterVec,
    /// `p33_exchange_request_duration_seconds{endpoint}`.
    pub exchange_request_duration_seconds: HistogramVec,
    /// `p33_snapshot_cycle_seconds`.
    pub snapshot_cycle_seconds: Histogram,
    /// `p33_step_size_fallback_total{symbol}`.
    pub step_size_fallback_total: IntCounterVec,
    /// `p33_ledger_updates_total{outcome}`.
    pub ledger_updates_total: IntCounterVec,
    /// `p33_trading_state{state}`: 1 on the global trading state.
    pub trading_state: GaugeVec,
    /// `p33_symbol_overrides{state}`: symbols with an override, per state.
    pub symbol_overrides: GaugeVec,
    /// `p33_limit_denies_total{limit}` (SPEC §13).
    pub limit_denies_total: IntCounterVec,
    /// `p33_foreign_permits_total{type}`: permit keys of another type
    /// (another service's "permits") replaced by a verdict (SPEC §6).
    pub foreign_permits_total: IntCounterVec,
    /// `p33_guard_key_errors_total{key}`: opens denied, or batches left
    /// pending, because a key a guard needs was unusable (SPEC §11).
    pub guard_key_errors_total: IntCounterVec,
    /// `p33_throttle_latch_tripped`: 1 while the latch holds the state.
    pub throttle_latch_tripped: IntGauge,
    /// `p33_trading_state_restored_total{scope}`: state keys put back
    /// after Redis lost them or they were loosened without a control entry
    /// (SPEC §12).
    pub trading_state_restored_total: IntCounterVec,
    /// `p33_trading_state_armed`: 1 while Redis holds the marker that a
    /// gate put the trading state in place (SPEC §12).
    pub trading_state_armed: IntGauge,
    /// `p33_build_info{version,commit}`.
    pub build_info: GaugeVec,
    /// `p33_watchdog_pings_total`.
    pub watchdog_pings_total: IntCounter,
    /// `p33_position_stream_enabled`: 1 when the user data stream is
    /// configured (SPEC §16).
    pub position_stream_enabled: IntGauge,
    /// `p33_position_stream_live`: 1 while reconciled and following.
    pub position_stream_live: IntGauge,
    /// `p33_position_stream_events_total{type,result}`.
    pub position_stream_events_total: IntCounterVec,
    /// `p33_position_stream_reconnects_total{reason}`.
    pub position_stream_reconnects_total: IntCounterVec,
    /// `p33_position_stream_corrections_total`: REST changed an amount the
    /// stream had set (a missed event).
    pub position_stream_corrections_total: IntCounter,
    /// `p33_exchange_closes_total{cause}`: fills the exchange made on its
    /// own (SPEC §19), every cause exported at 0.
    pub exchange_closes_total: IntCounterVec,
    /// `p33_trade_closed_events_total{cause,result}`: exchange-side closes
    /// for `quantum:stream:trade.closed` (SPEC §19), `written` or `failed`.
    pub trade_closed_events_total: IntCounterVec,
    /// `p33_position_update_latency_seconds`: event `E` (on the local clock)
    /// → snapshot written.
    pub position_update_latency_seconds: Histogram,
    /// `p33_decision_input_age_seconds`: decision time − the snapshot's
    /// `ts_epoch_ms`.
    pub decision_input_age_seconds: Histogram,
    /// `ts_epoch` of the newest snapshot seen per symbol; ages are computed
    /// at scrape time so a stalled poller shows growing ages.
    snapshot_ts: Mutex<HashMap<String, f64>>,
    /// `asof_epoch` of the current universe-derived allowlist, if any.
    allowlist_asof: Mutex<Option<f64>>,
    /// When the last plan was finished, epoch ms (0: none yet).
    last_plan_ms: AtomicU64,
    /// Plans finished since start.
    plans_finished: AtomicU64,
    redis_ok: AtomicBool,
    master_known: AtomicBool,
    group_ok: AtomicBool,
    allowlist_loaded: AtomicBool,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    // Names are fixed at compile time and registered once per registry, so a
    // registration error is a programming error.
    r.register(Box::new(c.clone()))
        .expect("metric names are unique within the registry");
    c
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let r = Registry::new();
        let iv = |n: &str, h: &str, l: &[&str]| {
            reg(
                &r,
                IntCounterVec::new(Opts::new(n, h), l).expect("valid metric"),
            )
        };
        let gv = |n: &str, h: &str, l: &[&str]| {
            reg(&r, GaugeVec::new(Opts::new(n, h), l).expect("valid metric"))
        };
        let m = Metrics {
            permit_allow_total: iv("p33_permit_allow_total", "Permits written with allow=true.", &["symbol"]),
            permit_deny_total: iv(
                "p33_permit_deny_total",
                "Permits written with allow=false, by reason.",
                &["symbol", "reason"],
            ),
            snapshot_age_seconds: gv(
                "p33_snapshot_age_seconds",
                "Age of the newest exchange position snapshot seen for the symbol.",
                &["symbol"],
            ),
            ledger_position_amt: gv(
                "p33_ledger_position_amt",
                "Ledger position amount seen at the last evaluation (signed).",
                &["symbol"],
            ),
            exchange_position_amt: gv(
                "p33_exchange_position_amt",
                "Exchange position amount from the newest snapshot (signed).",
                &["symbol"],
            ),
            allowlist_source: gv(
                "p33_allowlist_source",
                "1 on the allowlist source in use, 0 on the other three.",
                &["source"],
            ),
            allowlist_symbols: reg(
                &r,
                IntGauge::new("p33_allowlist_symbols", "Symbols on the current allowlist.")
                    .expect("valid metric"),
            ),
            allowlist_age_seconds: reg(
                &r,
                Gauge::new(
                    "p33_allowlist_age_seconds",
                    "Age of the universe data behind the allowlist (0 for env and none).",
                )
                .expect("valid metric"),
            ),
            allowlist_resolutions_total: iv(
                "p33_allowlist_resolutions_total",
                "Allowlist resolutions, by the source chosen.",
                &["source"],
            ),
            plans_total: iv(
                "p33_plans_total",
                "Plans read from the stream, by outcome (allow, deny, skip_decision, not_allowlisted, malformed, dry_run_allow, dry_run_deny, duplicate).",
                &["outcome"],
            ),
            permit_latency_seconds: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "p33_permit_latency_seconds",
                        "Time from the plan's stream entry ID to its permit being written.",
                    )
                    .buckets(vec![
                        0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.2,
                        2.5, 5.0, 8.0, 15.0, 60.0,
                    ]),
                )
                .expect("valid metric"),
            ),
            batch_size: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new("p33_plan_batch_size", "Plans per stream read batch.")
                        .buckets(vec![1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0]),
                )
                .expect("valid metric"),
            ),
            redis_up: reg(
                &r,
                IntGauge::new("p33_redis_up", "1 while Redis answers the plan consumer.")
                    .expect("valid metric"),
            ),
            redis_master_known: reg(
                &r,
                IntGauge::new(
                    "p33_redis_master_known",
                    "1 while a Redis master is known (always 1 without sentinels).",
                )
                .expect("valid metric"),
            ),
            redis_failovers_total: reg(
                &r,
                IntCounter::new(
                    "p33_redis_failovers_total",
                    "Switches to another Redis master named by the sentinels.",
                )
                .expect("valid metric"),
            ),
            exchange_requests_total: iv(
                "p33_exchange_requests_total",
                "Exchange REST requests, by outcome.",
                &["outcome"],
            ),
            exchange_request_duration_seconds: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "p33_exchange_request_duration_seconds",
                        "Exchange REST request duration, by endpoint.",
                    )
                    .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
                    &["endpoint"],
                )
                .expect("valid metric"),
            ),
            snapshot_cycle_seconds: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "p33_snapshot_cycle_seconds",
                        "Duration of one successful snapshot cycle (request and Redis writes).",
                    )
                    .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
                )
                .expect("valid metric"),
            ),
            step_size_fallback_total: iv(
                "p33_step_size_fallback_total",
                "Evaluations that used the 0.001 fallback step size.",
                &["symbol"],
            ),
            ledger_updates_total: iv(
                "p33_ledger_updates_total",
                "apply.result entries handled by the ledger follower, by outcome.",
                &["outcome"],
            ),
            build_info: gv(
                "p33_build_info",
                "Build version and git commit; always 1.",
                &["version", "commit"],
            ),
            trading_state: gv(
                "p33_trading_state",
                "1 on the global trading state (ACTIVE, REDUCING, HALTED), 0 on the others.",
                &["state"],
            ),
            symbol_overrides: gv(
                "p33_symbol_overrides",
                "Symbols whose trading state is overridden, per state.",
                &["state"],
            ),
            throttle_latch_tripped: reg(
                &r,
                IntGauge::new(
                    "p33_throttle_latch_tripped",
                    "1 while the throttle latch holds the global state (set by p33-auto, not yet resumed).",
                )
                .expect("valid metric"),
            ),
            trading_state_restored_total: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "p33_trading_state_restored_total",
                        "Trading-state keys restored from the state the control log confirmed (Redis lost them, or they were loosened without a control entry), by scope.",
                    ),
                    &["scope"],
                )
                .expect("valid metric"),
            ),
            trading_state_armed: reg(
                &r,
                IntGauge::new(
                    "p33_trading_state_armed",
                    "1 while Redis holds the marker that a gate put the trading state in place; 0: no allow is written.",
                )
                .expect("valid metric"),
            ),
            limit_denies_total: iv(
                "p33_limit_denies_total",
                "Opening allows turned into denies by an automatic limit, by limit.",
                &["limit"],
            ),
            foreign_permits_total: iv(
                "p33_foreign_permits_total",
                "Permit keys of another type (another service's permits) replaced by a P3.3 verdict.",
                &["type"],
            ),
            guard_key_errors_total: iv(
                "p33_guard_key_errors_total",
                "Opens denied invalid_guard_state, or batches left pending, because a guard key was unusable.",
                &["key"],
            ),
            watchdog_pings_total: reg(
                &r,
                IntCounter::new("p33_watchdog_pings_total", "systemd WATCHDOG=1 notifications sent.")
                    .expect("valid metric"),
            ),
            position_stream_enabled: reg(
                &r,
                IntGauge::new(
                    "p33_position_stream_enabled",
                    "1 when the user data stream is configured (P33_POSITION_STREAM=on in binance mode).",
                )
                .expect("valid metric"),
            ),
            position_stream_live: reg(
                &r,
                IntGauge::new(
                    "p33_position_stream_live",
                    "1 while the user data stream is reconciled and followed; 0 otherwise.",
                )
                .expect("valid metric"),
            ),
            position_stream_events_total: iv(
                "p33_position_stream_events_total",
                "User data stream frames, by event type and what was done with them.",
                &["type", "result"],
            ),
            position_stream_reconnects_total: iv(
                "p33_position_stream_reconnects_total",
                "User data stream connections ended, by reason.",
                &["reason"],
            ),
            exchange_closes_total: iv(
                "p33_exchange_closes_total",
                "Fills the exchange made on its own (liquidation, adl, settlement, stop, take_profit).",
                &["cause"],
            ),
            trade_closed_events_total: iv(
                "p33_trade_closed_events_total",
                "Closes the exchange made, for quantum:stream:trade.closed, by cause and result (written, failed).",
                &["cause", "result"],
            ),
            position_stream_corrections_total: reg(
                &r,
                IntCounter::new(
                    "p33_position_stream_corrections_total",
                    "positionRisk replies that changed an amount the stream had set (missed events).",
                )
                .expect("valid metric"),
            ),
            position_update_latency_seconds: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "p33_position_update_latency_seconds",
                        "ACCOUNT_UPDATE event time (exchange clock, offset-corrected) to snapshot written.",
                    )
                    .buckets(vec![
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    ]),
                )
                .expect("valid metric"),
            ),
            decision_input_age_seconds: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "p33_decision_input_age_seconds",
                        "Age of the exchange snapshot a plan was judged on: decision time minus its ts_epoch_ms.",
                    )
                    // 1.1 s is a bucket bound: "p99 ≤ 1.1 s" is read
                    // off the buckets, not interpolated.
                    .buckets(vec![
                        0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0,
                        15.0, 30.0,
                    ]),
                )
                .expect("valid metric"),
            ),
            registry: r,
            snapshot_ts: Mutex::new(HashMap::new()),
            allowlist_asof: Mutex::new(None),
            last_plan_ms: AtomicU64::new(0),
            plans_finished: AtomicU64::new(0),
            redis_ok: AtomicBool::new(false),
            // Without sentinels the master is always known; with them the
            // lifecycle sets this before anything else can be ready.
            master_known: AtomicBool::new(true),
            group_ok: AtomicBool::new(false),
            allowlist_loaded: AtomicBool::new(false),
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), env!("P33_GIT_COMMIT")])
            .set(1.0);
        for s in SOURCES {
            m.allowlist_source.with_label_values(&[s]).set(0.0);
        }
        for scope in ["global", "symbol"] {
            m.trading_state_restored_total
                .with_label_values(&[scope])
                .inc_by(0);
        }
        for l in ["max_opens", "max_opens_per_symbol", "max_open_positions"] {
            m.limit_denies_total.with_label_values(&[l]).inc_by(0);
        }
        m.foreign_permits_total
            .with_label_values(&["hash"])
            .inc_by(0);
        m.guard_key_errors_total
            .with_label_values(&[crate::redis::keys::DECISIONS_STREAM])
            .inc_by(0);
        for t in crate::domain::TradingState::ALL {
            m.trading_state.with_label_values(&[t.as_str()]).set(0.0);
            m.symbol_overrides.with_label_values(&[t.as_str()]).set(0.0);
        }
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            m.registry
                .register(Box::new(pc))
                .expect("process collector registered once");
        }
        m
    }

    /// The trading-state gauges: 1 on the global state; overrides counted.
    pub fn set_trading_state(
        &self,
        global: crate::domain::TradingState,
        overrides: &[crate::domain::TradingState],
    ) {
        for t in crate::domain::TradingState::ALL {
            self.trading_state
                .with_label_values(&[t.as_str()])
                .set(if t == global { 1.0 } else { 0.0 });
            let n = overrides.iter().filter(|o| **o == t).count();
            self.symbol_overrides
                .with_label_values(&[t.as_str()])
                .set(n as f64);
        }
    }

    /// The allowlist's as-of time, epoch s, when the source has one.
    pub fn allowlist_asof(&self) -> Option<f64> {
        *lock(&self.allowlist_asof)
    }

    /// Plans finished since start (every outcome of `p33_plans_total`).
    pub fn plans_finished(&self) -> u64 {
        self.plans_finished.load(Ordering::Relaxed)
    }

    /// Notes that a batch of `n` plans was finished at `ms`.
    pub fn plans_done_at(&self, ms: u64, n: u64) {
        self.last_plan_ms.store(ms, Ordering::Relaxed);
        self.plans_finished.fetch_add(n, Ordering::Relaxed);
    }

    /// When the last plan was finished, epoch ms (0: none yet).
    pub fn last_plan_ms(&self) -> u64 {
        self.last_plan_ms.load(Ordering::Relaxed)
    }

    /// Sets the source gauge to 1 on `source` and 0 on the other three.
    pub fn set_allowlist(&self, source: &str, symbols: usize, asof: Option<f64>) {
        for s in SOURCES {
            self.allowlist_source
                .with_label_values(&[s])
                .set(if s == source { 1.0 } else { 0.0 });
        }
        self.allowlist_symbols.set(symbols as i64);
        self.allowlist_resolutions_total
            .with_label_values(&[source])
            .inc();
        *lock(&self.allowlist_asof) = asof;
        self.allowlist_loaded.store(true, Ordering::SeqCst);
    }

    /// Records the `ts_epoch` and amount of a snapshot seen for `symbol`.
    pub fn observe_snapshot(&self, symbol: &str, ts_epoch: f64, amt: f64) {
        let mut m = lock(&self.snapshot_ts);
        let e = m.entry(symbol.to_string()).or_insert(ts_epoch);
        if ts_epoch >= *e {
            *e = ts_epoch;
            self.exchange_position_amt
                .with_label_values(&[symbol])
                .set(amt);
        }
    }

    /// Forgets per-symbol snapshot series for symbols no longer allowlisted.
    pub fn retain_snapshot_symbols(&self, keep: &dyn Fn(&str) -> bool) {
        let mut m = lock(&self.snapshot_ts);
        m.retain(|s, _| {
            let k = keep(s);
            if !k {
                let _ = self.snapshot_age_seconds.remove_label_values(&[s]);
                let _ = self.exchange_position_amt.remove_label_values(&[s]);
            }
            k
        });
    }

    /// Records whether Redis answered the last request of the plan consumer.
    pub fn set_redis_up(&self, up: bool) {
        self.redis_up.set(up as i64);
        self.redis_ok.store(up, Ordering::SeqCst);
    }

    /// Records whether the plan consumer group is known to exist.
    pub fn set_group_ok(&self, ok: bool) {
        self.group_ok.store(ok, Ordering::SeqCst);
    }

    /// Records what the Redis handle knows of the master (SPEC §15).
    /// `failovers` is the running total of master switches.
    pub fn set_master(&self, known: bool, failovers: u64) {
        self.redis_master_known.set(i64::from(known));
        self.master_known.store(known, Ordering::SeqCst);
        let seen = self.redis_failovers_total.get();
        if failovers > seen {
            self.redis_failovers_total.inc_by(failovers - seen);
        }
    }

    /// `/readyz` (SPEC §9): `None` when ready — a master is known, Redis
    /// answers, the group exists, the allowlist holds at least one symbol
    /// and Redis is armed (§12); else why not.
    pub fn not_ready(&self) -> Option<&'static str> {
        if !self.master_known.load(Ordering::SeqCst) || !self.redis_ok.load(Ordering::SeqCst) {
            Some("redis down")
        } else if !self.group_ok.load(Ordering::SeqCst) {
            Some("group missing")
        } else if !self.allowlist_loaded.load(Ordering::SeqCst) || self.allowlist_symbols.get() < 1
        {
            Some("fail-closed: no allowlist")
        } else if self.trading_state_armed.get() != 1 {
            Some("trading state unknown")
        } else {
            None
        }
    }

    /// Whether `/readyz` answers 200.
    pub fn ready(&self) -> bool {
        self.not_ready().is_none()
    }

    /// The Prometheus text exposition, with ages computed for `now`.
    pub fn render(&self, now: f64) -> String {
        for (s, ts) in lock(&self.snapshot_ts).iter() {
            self.snapshot_age_seconds
                .with_label_values(&[s])
                .set((now - ts).max(0.0));
        }
        let age = lock(&self.allowlist_asof).map_or(0.0, |a| (now - a).max(0.0));
        self.allowlist_age_seconds.set(age);
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail on I/O; a failure would be a metric
        // family the encoder rejects, which the registry already validated.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!("metrics encoding failed: {e}");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// Locks a mutex, recovering the data if a panicking thread poisoned it: the
/// maps here hold plain numbers that no partial update can corrupt.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_gauge_is_one_on_exactly_one_source() {
        let m = Metrics::new();
        for s in SOURCES {
            m.set_allowlist(s, 3, None);
            let ones: Vec<&str> = SOURCES
                .iter()
                .copied()
                .filter(|x| m.allowlist_source.with_label_values(&[x]).get() == 1.0)
                .collect();
            assert_eq!(ones, vec![s]);
        }
    }

    #[test]
    fn render_includes_original_names_and_ages() {
        let m = Metrics::new();
        m.permit_allow_total.with_label_values(&["BTCUSDT"]).inc();
        m.observe_snapshot("BTCUSDT", 100.0, 0.5);
        m.set_allowlist("universe", 1, Some(90.0));
        let text = m.render(103.0);
        assert!(
            text.contains("p33_permit_allow_total{symbol=\"BTCUSDT\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("p33_snapshot_age_seconds{symbol=\"BTCUSDT\"} 3"),
            "{text}"
        );
        assert!(text.contains("p33_allowlist_age_seconds 13"), "{text}");
        assert!(
            text.contains(&format!(
                "p33_build_info{{commit=\"{}\",version=\"{}\"}} 1",
                env!("P33_GIT_COMMIT"),
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
    }
}
