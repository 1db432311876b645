//! Consumer: plans in, permits out (SPEC §4).
//!
//! Reads `quantum:stream:apply.plan` in group `p33` (own pending entries
//! first — at start and after every error — then new ones), claims entries
//! idle `P33_CLAIM_IDLE_S` on other consumers, filters them, reads the state
//! every plan of a batch needs in one script call
//! (`quantum:position:snapshot:<symbol>`, `quantum:position:ledger:<symbol>`,
//! `quantum:cooldown:last_exec_ts:<symbol>`), evaluates with [`rules`], and
//! writes all permits and ACKs of the batch in one script call
//! ([`permits::write_batch`]). So a batch costs a constant number of round
//! trips, and an entry whose state could not be read stays pending and is
//! evaluated again.

use std::sync::Arc;
use std::time::Duration;

use crate::redis::store::Conn;
use rust_decimal::prelude::ToPrimitive;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::allowlist::{Allowlist, AllowlistHandle};
use crate::config::Config;
use crate::config::SnapshotSource;
use crate::domain::PositionSide;
use crate::domain::{dec_str, fallback_step};
use crate::gate::permits::{self, Write, Written};
use crate::gate::record::{self, Record};
use crate::gate::rules::{self, Decision, LedgerInput, Plan, Raw, SnapshotInput};
use crate::gate::steps::{Positioned, StepSizes};
use crate::observe::metrics::Metrics;
use crate::observe::watchdog::Watchdog;
use crate::redis::keys::PLAN_STREAM;
use crate::redis::store;
use crate::redis::stream::{BatchHandler, Entry, GroupReader};
use crate::text::clip;

pub use super::intake::{classify, id8, read_state, valid_plan_id, Filtered, SymbolState};

/// Entries read per `XREADGROUP`.
pub const BATCH: usize = 256;
/// `BLOCK` of the read, ms; also bounds how long shutdown waits for a read.
const BLOCK_MS: u64 = 500;

/// The `outcome` label of `p33_plans_total`: every entry of a batch ends in
/// exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Label {
    /// An allow permit was written.
    Allow,
    /// A deny permit was written (a hold denial included).
    Deny,
    /// `decision` is not EXECUTE / RECONCILE_CLOSE: ACK, no permit.
    SkipDecision,
    /// The symbol is not on the allowlist: ACK, no permit.
    NotAllowlisted,
    /// A malformed entry: ACK, no permit, ERROR line.
    Malformed,
    /// Another consumer had already finished the entry (after a claim).
    Duplicate,
    /// A permit for the entry's `plan_id` already existed.
    DuplicatePlanId,
    /// Dry run: would have allowed.
    DryRunAllow,
    /// Dry run: would have denied.
    DryRunDeny,
}

impl Label {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Label::Allow => "allow",
            Label::Deny => "deny",
            Label::SkipDecision => "skip_decision",
            Label::NotAllowlisted => "not_allowlisted",
            Label::Malformed => "malformed",
            Label::Duplicate => "duplicate",
            Label::DuplicatePlanId => "duplicate_plan_id",
            Label::DryRunAllow => "dry_run_allow",
            Label::DryRunDeny => "dry_run_deny",
        }
    }
}

/// One evaluated plan, waiting for its write.
struct Evaluated {
    plan: Plan,
    decision: Decision,
    /// The record's `inputs` JSON (empty while the record is off).
    inputs: String,
}

/// What became of one entry of a batch, before the write.
enum Outcome {
    /// ACK only, and why.
    Filtered(Filtered),
    /// A permit to write.
    Evaluated(Evaluated),
}

/// The plan consumer: configuration, shared tables, metrics, limits.
pub struct Consumer {
    /// The records' `config`: a short hash of the settings used.
    config_hash: String,
    cfg: Arc<Config>,
    allowlist: AllowlistHandle,
    steps: StepSizes,
    positioned: Positioned,
    /// The trading state this instance knows (SPEC §12).
    guardian: Arc<crate::gate::known::KnownState>,
    metrics: Arc<Metrics>,
    limits: rules::Limits,
    /// When the last foreign-permit WARN was logged, and how many were
    /// replaced since.
    foreign_log: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

/// At most one foreign-permit WARN per this period (SPEC §6).
const FOREIGN_WARN_EVERY: Duration = Duration::from_secs(10);

impl Consumer {
    /// A consumer for `cfg`.
    pub fn new(
        cfg: Arc<Config>,
        allowlist: AllowlistHandle,
        steps: StepSizes,
        positioned: Positioned,
        guardian: Arc<crate::gate::known::KnownState>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let limits = rules::Limits {
            stale_threshold_s: cfg.stale_threshold_s,
            cooldown_s: cfg.cooldown_s,
            qty_tolerance_pct: cfg.qty_tolerance_pct,
            plan_max_age_s: cfg.plan_max_age_s,
        };
        Consumer {
            config_hash: record::config_hash(&cfg),
            cfg,
            allowlist,
            steps,
            positioned,
            guardian,
            metrics,
            limits,
            foreign_log: std::sync::Mutex::new((None, 0)),
        }
    }

    /// A foreign permit (`<type>:<reason>`) was replaced by the verdict of
    /// `plan_id`: counted, and logged at most once per 10 s with the count
    /// since the last line.
    fn foreign_replaced(&self, plan_id: &str, foreign: &str) {
        let (ty, reason) = foreign.split_once(':').unwrap_or((foreign, "-"));
        // A type is one of Redis's few names (a module's at worst): the label
        // stays bounded, but is cut all the same.
        let label: String = ty
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .take(32)
            .collect();
        self.metrics
            .foreign_permits_total
            .with_label_values(&[&label])
            .inc();
        let now = std::time::Instant::now();
        let Ok(mut g) = self.foreign_log.lock() else {
            return;
        };
        g.1 += 1;
        if g.0
            .is_none_or(|last| now.duration_since(last) >= FOREIGN_WARN_EVERY)
        {
            warn!(
                "P3.3 replaced a foreign permit plan {} type={} reason={} ({} replaced since the last such line; another service is writing permits)",
                id8(plan_id),
                clip(ty),
                clip(reason),
                g.1
            );
            *g = (Some(now), 0);
        }
    }

    /// Handles one batch: filter, read state, evaluate, write + ACK, then
    /// log and count each outcome. On a Redis error nothing was ACKed (the
    /// script is atomic), so every entry stays pending and is read again.
    pub async fn handle_batch(
        &self,
        con: &mut Conn,
        entries: &[Entry],
    ) -> Result<(), redis::RedisError> {
        if entries.is_empty() {
            return Ok(());
        }
        self.metrics.batch_size.observe(entries.len() as f64);
        let allow = self.allowlist.load();
        let read_at = store::now_epoch();
        let classified: Vec<Result<Plan, Filtered>> = entries
            .iter()
            .map(|e| classify(e, &allow, read_at))
            .collect();
        let mut symbols: Vec<String> = classified
            .iter()
            .filter_map(|c| c.as_ref().ok().map(|p| p.symbol.clone()))
            .collect();
        symbols.sort();
        symbols.dedup();
        let state = read_state(con, &symbols).await?;
        let now = store::now_epoch();
        let absent = SymbolState::default();
        let outcomes: Vec<Outcome> = classified
            .into_iter()
            .map(|c| match c {
                Err(f) => Outcome::Filtered(f),
                Ok(plan) => {
                    let st = state.get(&plan.symbol).unwrap_or(&absent);
                    debug!(
                        "Evaluating plan {} symbol={} decision={} action={} reduceOnly={}",
                        id8(&plan.plan_id),
                        plan.symbol,
                        plan.kind.as_str(),
                        clip(&plan.action),
                        plan.reduce_only
                    );
                    let (decision, inputs) = self.decide(&plan, st, now, allow.source.label());
                    Outcome::Evaluated(Evaluated {
                        plan,
                        decision,
                        inputs,
                    })
                }
            })
            .collect();
        let writes: Vec<Write> = entries
            .iter()
            .zip(&outcomes)
            .map(|(e, o)| match o {
                Outcome::Evaluated(ev) => {
                    let record = if self.cfg.decisions_maxlen > 0 {
                        record::evaluated(&ev.plan, &ev.decision, ev.inputs.clone())
                    } else {
                        Record::default()
                    };
                    Write::permit(
                        &e.id,
                        &ev.plan.plan_id,
                        &ev.plan.symbol,
                        &ev.decision,
                        now,
                        record,
                    )
                }
                Outcome::Filtered(f) => Write::AckOnly {
                    entry_id: e.id.clone(),
                    record: self.filtered_record(e, f, allow.source.label(), now),
                },
            })
            .collect();
        // The position cap needs to know who holds a position, but only
        // when the batch holds an open that may be granted.
        let opens = outcomes.iter().any(|o| {
            matches!(o, Outcome::Evaluated(ev) if matches!(&ev.decision,
                Decision::Allow(a) if a.reason == rules::AllowReason::OpenPermitGranted))
        });
        let positioned = if self.cfg.max_open_positions.is_some() && opens {
            self.positioned_now(con, &allow).await?
        } else {
            Arc::new(Vec::new())
        };
        let known = self.guardian.known();
        let batch = permits::Batch {
            stream: PLAN_STREAM,
            group: &self.cfg.consumer_group,
            ttl_ms: u64::try_from(self.cfg.permit_ttl.as_millis()).unwrap_or(u64::MAX),
            default_state: self.cfg.default_trading_state,
            known: known.as_deref(),
            dry_run: self.cfg.dry_run,
            now,
            max_opens: self.cfg.max_opens,
            max_opens_per_symbol: self.cfg.max_opens_per_symbol,
            latch: self.cfg.throttle_latch,
            max_open_positions: self.cfg.max_open_positions,
            positioned: &positioned,
            decisions_maxlen: self.cfg.decisions_maxlen,
            config_hash: &self.config_hash,
            version: env!("CARGO_PKG_VERSION"),
            consumer: &self.cfg.consumer_name,
        };
        let results = match permits::write_batch(con, batch, &writes).await {
            Ok(r) => r,
            Err(e) => {
                if e.code() == Some(permits::UNARMED_ERROR) {
                    // Redis lost the marker (its data?): the guardian puts
                    // the state back and arms; the batch waits for it.
                    self.guardian.wake();
                    warn!(
                        "P3.3 Redis is not armed ({}): {} plans stay pending until the trading state is restored",
                        clip(e.detail().unwrap_or("")),
                        entries.len()
                    );
                } else if e.code() == Some(permits::GUARD_ERROR) {
                    // Nothing was written: the batch stays pending.
                    let detail = e.detail().unwrap_or("");
                    let key = detail.split_whitespace().next().unwrap_or("?");
                    self.metrics
                        .guard_key_errors_total
                        .with_label_values(&[key])
                        .inc();
                    warn!(
                        "P3.3 cannot record decisions: {} - {} plans stay pending until it is repaired",
                        clip(detail),
                        entries.len()
                    );
                }
                return Err(e);
            }
        };
        let done = store::now_epoch();
        self.metrics
            .plans_done_at(store::now_ms(), entries.len() as u64);
        for ((e, o), res) in entries.iter().zip(&outcomes).zip(results) {
            let label = match o {
                Outcome::Filtered(f) => self.log_filtered(e, f, &allow),
                Outcome::Evaluated(ev) => {
                    if let Some(f) = &res.foreign {
                        self.foreign_replaced(&ev.plan.plan_id, f);
                    }
                    if let Written::InvalidGuardState(k) = res.written {
                        self.metrics
                            .guard_key_errors_total
                            .with_label_values(&[&k.name(&batch, &ev.plan.symbol)])
                            .inc();
                    }
                    self.log_evaluated(ev, res.written, done, &batch)
                }
            };
            self.metrics
                .plans_total
                .with_label_values(&[label.as_str()])
                .inc();
        }
        Ok(())
    }

    /// The allowlisted symbols holding a position: the poller's view in
    /// binance mode; in external mode (or before the first poll) one read
    /// of every allowlisted symbol's state (the state script), at most once
    /// a second.
    async fn positioned_now(
        &self,
        con: &mut Conn,
        allow: &Allowlist,
    ) -> Result<Arc<Vec<String>>, redis::RedisError> {
        let view = match self.cfg.snapshot_source {
            SnapshotSource::Binance => self.positioned.latest(),
            SnapshotSource::External => self.positioned.fresh(Duration::from_secs(1)),
        };
        if let Some(v) = view {
            return Ok(v);
        }
        let mut symbols: Vec<String> = allow.symbols.iter().cloned().collect();
        symbols.sort();
        // The batch's own state read, for every allowlisted symbol. A
        // snapshot key of another type cannot say the symbol is flat: it is
        // counted as positioned (fail closed), as is an unreadable amount.
        let state = read_state(con, &symbols).await?;
        let held: Vec<String> = symbols
            .into_iter()
            .filter(|s| match state.get(s).map(|st| &st.snapshot) {
                Some(Raw::Missing) => false,
                None | Some(Raw::WrongType(_)) => true,
                Some(Raw::Present(h)) => h.get("position_amt").is_some_and(|v| {
                    crate::domain::parse_amount(v)
                        .is_none_or(|a| PositionSide::of(a) != PositionSide::None)
                }),
            })
            .collect();
        self.positioned.set(held);
        Ok(self.positioned.latest().unwrap_or_default())
    }

    /// The rules' decision, and the record's `inputs` (when it is on).
    fn decide(
        &self,
        plan: &Plan,
        st: &SymbolState,
        now: f64,
        allowlist: &str,
    ) -> (Decision, String) {
        let sym = plan.symbol.as_str();
        let known = self.steps.get(sym);
        let step = match known {
            Some(s) => s,
            None => {
                self.metrics
                    .step_size_fallback_total
                    .with_label_values(&[sym])
                    .inc();
                if self.steps.warn_once(sym) {
                    warn!("{sym}: no step size known from exchangeInfo; using 0.001");
                }
                fallback_step()
            }
        };
        let inputs = st.inputs();
        if let SnapshotInput::Valid(s) = &inputs.snapshot {
            self.metrics
                .observe_snapshot(sym, s.ts, s.amt.to_f64().unwrap_or(0.0));
            // How old the position this decision reads is (SPEC §16).
            let age = now - s.ts;
            if age.is_finite() {
                self.metrics
                    .decision_input_age_seconds
                    .observe(age.max(0.0));
            }
        }
        if let LedgerInput::Amount(a) = &inputs.ledger {
            self.metrics
                .ledger_position_amt
                .with_label_values(&[sym])
                .set(a.to_f64().unwrap_or(0.0));
        }
        let decision = rules::evaluate(plan, &inputs, now, &self.limits, step);
        let json = if self.cfg.decisions_maxlen > 0 {
            record::inputs_json(&inputs, step, known.is_none(), allowlist, now, &decision)
        } else {
            String::new()
        };
        (decision, json)
    }

    /// The record of an entry finished without evaluation.
    fn filtered_record(&self, e: &Entry, f: &Filtered, allowlist: &str, now: f64) -> Record {
        if self.cfg.decisions_maxlen == 0 {
            return Record::default();
        }
        let field = |k: &str| {
            e.fields
                .as_ref()
                .and_then(|m| m.get(k))
                .map_or("", String::as_str)
        };
        let (outcome, reason) = match f {
            Filtered::Malformed(why) => (Label::Malformed, why.as_str()),
            Filtered::SkipDecision => (Label::SkipDecision, field("decision")),
            Filtered::NotAllowlisted => (Label::NotAllowlisted, ""),
        };
        record::filtered(
            field("plan_id"),
            field("symbol"),
            outcome.as_str(),
            reason,
            allowlist,
            now,
        )
    }

    fn log_filtered(&self, e: &Entry, f: &Filtered, allow: &Allowlist) -> Label {
        match f {
            Filtered::Malformed(why) => {
                error!("malformed plan entry {}: {why} - ACK, no permit", e.id);
                Label::Malformed
            }
            Filtered::SkipDecision => {
                let d = e.fields.as_ref().and_then(|f| f.get("decision"));
                debug!(
                    "plan entry {}: decision={} - ACK, no permit",
                    e.id,
                    d.map_or("<missing>".into(), |d| clip(d))
                );
                Label::SkipDecision
            }
            Filtered::NotAllowlisted => {
                let f = e.fields.as_ref();
                let sym = f
                    .and_then(|f| f.get("symbol"))
                    .map_or("UNKNOWN", String::as_str);
                let id = f.and_then(|f| f.get("plan_id")).map_or("", String::as_str);
                debug!(
                    "{}: Not in allowlist (source={}) - ACK plan {}",
                    clip(sym),
                    allow.source.label(),
                    id8(id)
                );
                Label::NotAllowlisted
            }
        }
    }

    fn log_evaluated(
        &self,
        ev: &Evaluated,
        res: Written,
        done: f64,
        batch: &permits::Batch<'_>,
    ) -> Label {
        let (sym, id) = (ev.plan.symbol.as_str(), id8(&ev.plan.plan_id));
        match res {
            Written::AlreadyAcked => {
                warn!("{sym}: plan {id} was already handled by another consumer; no second permit");
                return Label::Duplicate;
            }
            Written::DuplicatePlanId => {
                error!(
                    symbol = %sym,
                    plan_id = %ev.plan.plan_id,
                    "{sym}: duplicate plan_id {:?}: a permit for it already exists - ACK, no permit (the first decision stands)",
                    ev.plan.plan_id
                );
                return Label::DuplicatePlanId;
            }
            Written::Acked
            | Written::Permit
            | Written::HoldDenied
            | Written::TradingHalted(_)
            | Written::TradingReducing(_)
            | Written::StateUnknown
            | Written::Throttled(_)
            | Written::InvalidGuardState(_)
            | Written::MaxOpenPositions { .. } => {}
        }
        // What was written (in dry run: what would have been), guards included.
        let decision = &res.effective(&ev.decision, sym, batch);
        let limit = match res {
            Written::Throttled(permits::Scope::Global) => Some("max_opens"),
            Written::Throttled(permits::Scope::Symbol) => Some("max_opens_per_symbol"),
            Written::MaxOpenPositions { .. } => Some("max_open_positions"),
            _ => None,
        };
        if let Some(limit) = limit {
            self.metrics
                .limit_denies_total
                .with_label_values(&[limit])
                .inc();
        }
        if self.cfg.dry_run {
            return match decision {
                Decision::Allow(a) => {
                    info!(
                        "{sym}: DRY-RUN would ALLOW plan {id} (safe_qty={}, exchange_amt={}, reason={})",
                        dec_str(a.safe_qty),
                        dec_str(a.exchange_amt),
                        a.reason.as_str()
                    );
                    Label::DryRunAllow
                }
                Decision::Deny(d) => {
                    warn!(
                        "{sym}: DRY-RUN would DENY plan {id} reason={} context={}",
                        d.reason.as_str(),
                        serde_json::Value::Object(d.context.clone())
                    );
                    Label::DryRunDeny
                }
            };
        }
        let lat = done - ev.plan.entry_ms as f64 / 1000.0;
        self.metrics.permit_latency_seconds.observe(lat.max(0.0));
        match decision {
            Decision::Allow(a) => {
                info!(
                    symbol = %sym,
                    plan_id = %ev.plan.plan_id,
                    "{sym}: P3.3 ALLOW plan {id} (safe_qty={}, exchange_amt={})",
                    dec_str(a.safe_qty),
                    dec_str(a.exchange_amt)
                );
                self.metrics
                    .permit_allow_total
                    .with_label_values(&[sym])
                    .inc();
                Label::Allow
            }
            Decision::Deny(d) => {
                warn!(
                    symbol = %sym,
                    plan_id = %ev.plan.plan_id,
                    reason = d.reason.as_str(),
                    "{sym}: P3.3 DENY plan {id} reason={} context={}",
                    d.reason.as_str(),
                    serde_json::Value::Object(d.context.clone())
                );
                self.metrics
                    .permit_deny_total
                    .with_label_values(&[sym, d.reason.as_str()])
                    .inc();
                Label::Deny
            }
        }
    }
}

/// How often the INFO summary of outcomes is logged.
const SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// The once-a-minute INFO line (`P3.3 plans last 60s: allow=… deny=…
/// not_allowlisted=… skip=… malformed=…`), so an operator at INFO can see
/// that plans arrive and what became of them, the filtered ones included
/// (their own lines are DEBUG, SPEC §4).
struct Summary {
    next: std::time::Instant,
    last: [u64; 5],
}

impl Summary {
    const LABELS: [Label; 5] = [
        Label::Allow,
        Label::Deny,
        Label::NotAllowlisted,
        Label::SkipDecision,
        Label::Malformed,
    ];

    fn new(metrics: &Metrics) -> Self {
        Summary {
            next: std::time::Instant::now() + SUMMARY_EVERY,
            last: Self::totals(metrics),
        }
    }

    fn totals(metrics: &Metrics) -> [u64; 5] {
        Self::LABELS.map(|l| metrics.plans_total.with_label_values(&[l.as_str()]).get())
    }

    /// The summary line when a period has passed since the last one.
    fn tick(&mut self, metrics: &Metrics, now: std::time::Instant) -> Option<String> {
        if now < self.next {
            return None;
        }
        self.next = now + SUMMARY_EVERY;
        let totals = Self::totals(metrics);
        let d: Vec<u64> = totals
            .iter()
            .zip(self.last)
            .map(|(t, l)| t.saturating_sub(l))
            .collect();
        self.last = totals;
        Some(format!(
            "P3.3 plans last {}s: allow={} deny={} not_allowlisted={} skip={} malformed={}",
            SUMMARY_EVERY.as_secs(),
            d[0],
            d[1],
            d[2],
            d[3],
            d[4]
        ))
    }
}

/// The plan consumer as a handler of the shared group reader: feeds the
/// systemd watchdog on every turn, logs the summary, and reports Redis and
/// group health.
struct PlanHandler {
    consumer: Consumer,
    metrics: Arc<Metrics>,
    watchdog: Arc<Watchdog>,
    summary: Summary,
}

impl BatchHandler for PlanHandler {
    async fn handle(&mut self, con: &mut Conn, entries: &[Entry]) -> Result<(), redis::RedisError> {
        self.consumer.handle_batch(con, entries).await
    }

    // Fed while Redis is away too: the loop is healthy, Redis is not, and
    // a restart would not bring Redis back.
    fn on_turn(&mut self) {
        self.watchdog.ping(&self.metrics);
        if let Some(line) = self.summary.tick(&self.metrics, std::time::Instant::now()) {
            info!("{line}");
        }
    }

    fn on_healthy(&mut self) {
        self.metrics.set_redis_up(true);
        self.metrics.set_group_ok(true);
    }

    fn on_error(&mut self, group_missing: bool) {
        if group_missing {
            self.metrics.set_group_ok(false);
        } else {
            self.metrics.set_redis_up(false);
        }
    }
}

/// Runs the plan loop until `cancel` fires (see [`GroupReader::run`]).
pub async fn run(
    cfg: Arc<Config>,
    redis: crate::redis::store::Redis,
    consumer: Consumer,
    metrics: Arc<Metrics>,
    watchdog: Arc<Watchdog>,
    cancel: CancellationToken,
) {
    let reader = GroupReader {
        who: "plan consumer",
        what: "plan",
        stream: PLAN_STREAM,
        group: cfg.consumer_group.clone(),
        consumer: cfg.consumer_name.clone(),
        batch: BATCH,
        block: Duration::from_millis(BLOCK_MS),
        claim_idle: cfg.claim_idle,
    };
    let mut handler = PlanHandler {
        consumer,
        summary: Summary::new(&metrics),
        metrics,
        watchdog,
    };
    reader.run(&redis, &mut handler, &cancel).await;
}

#[cfg(test)]
mod tests;
