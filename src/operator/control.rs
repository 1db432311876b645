//! The operator's trading state (SPEC §12): reading it (`states`),
//! changing it (`change`; both re-exported here), and following its
//! changes.
//!
//! Keys: `quantum:p33:trading_state` (global) and
//! `quantum:p33:trading_state:<symbol>` (overrides); stream
//! `quantum:stream:p33.control` (one entry per change). The state takes
//! effect inside the permit write script (`src/redis/scripts/write_permits.lua`),
//! not here: this module changes it (for `ctl`), reports it (metrics,
//! `ctl status`) and logs every change the daemon sees (the follower, one
//! group per instance so every instance logs every change).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::redis::store::Conn;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::domain::TradingState;
use crate::observe::metrics::Metrics;
use crate::redis::keys::{self, CONTROL_STREAM};
use crate::redis::store;
use crate::redis::stream::{BatchHandler, Entry, GroupReader};
use crate::text::clip;

pub use super::change::{
    apply_change, restore, tighten_symbol, Change, ControlEntry, Via, AUTO_ACTOR, CONTROL_ERROR,
    NO_LIBRARY_ERROR,
};
pub use super::states::{read_global, read_keys, read_overrides, read_states, States};
pub use crate::gate::known::NO_OVERRIDE;

/// How long the override gauge waits before counting `n` overrides again:
/// 5 s, or one override per ms beyond 5,000 (50 s for 50,000), so that a
/// flood of override keys costs Redis about 1,000 keys a second, not
/// 10,000 (SPEC §11). The global state is read every turn regardless.
pub fn overrides_period(n: usize) -> Duration {
    Duration::from_millis(u64::try_from(n).unwrap_or(u64::MAX)).max(Duration::from_secs(5))
}

/// The last `n` control entries, newest first.
pub async fn last_entries(
    con: &mut Conn,
    n: usize,
) -> Result<Vec<ControlEntry>, redis::RedisError> {
    let v: redis::Value = redis::cmd("XREVRANGE")
        .arg(CONTROL_STREAM)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(n)
        .query_async(con)
        .await?;
    Ok(crate::redis::stream::parse_entries(&v)
        .into_iter()
        .filter_map(|e| Some(ControlEntry::from_fields(&e.id, e.fields.as_ref()?)))
        .collect())
}

/// Whether the throttle latch (SPEC §13) holds the global state: the
/// daemon's own record of tripping it (`quantum:p33:latch`, which only the
/// write script sets and an operator's global change deletes) exists and
/// the global state is not ACTIVE. A control entry naming `p33-auto` as its
/// actor proves nothing: anyone who can write the stream can write that.
pub async fn latch_tripped(
    con: &mut Conn,
    global: TradingState,
) -> Result<bool, redis::RedisError> {
    let exists: bool = redis::cmd("EXISTS")
        .arg(keys::LATCH)
        .query_async(con)
        .await?;
    Ok(exists && global != TradingState::Active)
}

/// The follower: logs each change at WARN, ACKs it, refreshes the gauges.
struct Follower {
    group: String,
    refresh: Arc<Notify>,
    /// Told of every entry, so what it knows follows at once.
    guardian: Arc<crate::gate::known::KnownState>,
    cfg: Arc<Config>,
    config_hash: String,
}

/// Index members a revocation takes per script call at most.
pub const REVOKE_STEP: usize = 200;

/// The script time a revocation step may use, µs: the step ends early
/// once it has used it, whatever the load (`p33-bench --halt` measures it).
pub const REVOKE_STEP_BUDGET_US: u64 = 3_000;

/// The actor of a revocation's confirmation entry.
pub const REVOKE_ACTOR: &str = "p33-revoke@";

/// The error code of the revocation script's refusal (a key it must write
/// cannot take it): nothing was revoked.
pub const REVOKE_ERROR: &str = "P33REVOKE";

impl Follower {
    /// A halt or reduce entry (not a confirmation): revokes the allows it
    /// makes void (SPEC §12), unless in dry run. `Ok(None)`: nothing to do,
    /// or another instance did it.
    async fn revoke(
        &self,
        con: &mut Conn,
        id: &str,
        f: &HashMap<String, String>,
    ) -> Result<Option<i64>, redis::RedisError> {
        let g = |k: &str| f.get(k).map_or("", String::as_str);
        let to = g("to").trim().to_ascii_uppercase();
        let halted = to == TradingState::Halted.as_str();
        if self.cfg.dry_run
            || !(halted || to == TradingState::Reducing.as_str())
            || f.contains_key("ref")
            || g("actor").starts_with(REVOKE_ACTOR)
        {
            return Ok(None);
        }
        let (scope, symbol) = match g("scope") {
            "global" => ("global", ""),
            "symbol" if keys::valid_symbol(g("symbol")) => ("symbol", g("symbol")),
            _ => return Ok(None),
        };
        let ttl_ms = u64::try_from(self.cfg.permit_ttl.as_millis()).unwrap_or(u64::MAX);
        // Only the index of the scope, and for a reduce only its opens: a
        // symbol halt never walks every allow of every symbol.
        let index = match (scope, halted) {
            ("symbol", true) => keys::allows_symbol(symbol),
            ("symbol", false) => keys::allows_symbol_opens(symbol),
            (_, true) => keys::ALLOWS.to_string(),
            (_, false) => keys::ALLOWS_OPENS.to_string(),
        };
        let state_key = if scope == "symbol" {
            keys::trading_state(symbol)
        } else {
            keys::TRADING_STATE.to_string()
        };
        let template = crate::gate::permits::revoked_template(halted, store::now_epoch());
        let actor = format!("{REVOKE_ACTOR}{}", self.cfg.consumer_name);
        let missing = if scope == "symbol" {
            NO_OVERRIDE
        } else {
            self.cfg.default_trading_state.as_str()
        };
        let mut total: i64 = 0;
        let mut first = true;
        // Bounded steps (SPEC §12): each script call takes at most
        // REVOKE_STEP members, so no other client waits for a big halt.
        loop {
            let (n, done): (i64, i64) = crate::redis::scripts::REVOKE
                .key(&index)
                .key(CONTROL_STREAM)
                .key(keys::revoked_marker(id))
                .key(keys::REVOCATIONS_STREAM)
                .key(&state_key)
                .arg(scope)
                .arg(symbol)
                .arg(&to)
                .arg(id)
                .arg(g("reason"))
                .arg(&actor)
                .arg(ttl_ms.saturating_mul(2).max(60_000))
                .arg(&template)
                .arg(self.cfg.decisions_maxlen)
                .arg(&self.config_hash)
                .arg(env!("CARGO_PKG_VERSION"))
                .arg(&self.cfg.consumer_name)
                .arg(missing)
                .arg(REVOKE_STEP)
                .arg(total)
                .arg(if first { "1" } else { "0" })
                .arg(REVOKE_STEP_BUDGET_US)
                .invoke_async(con)
                .await?;
            if n == -1 || (n == -2 && first) {
                return Ok(None);
            }
            if n == -2 {
                return Ok(Some(total));
            }
            total = total.saturating_add(n);
            first = false;
            if done == 1 {
                return Ok(Some(total));
            }
            tokio::task::yield_now().await;
        }
    }
}

impl BatchHandler for Follower {
    async fn handle(&mut self, con: &mut Conn, entries: &[Entry]) -> Result<(), redis::RedisError> {
        for e in entries {
            let Some(f) = &e.fields else { continue };
            let entry = ControlEntry::from_fields(&e.id, f);
            // Known before anything else is done with it: a halt this
            // instance confirmed (below) is one it restores if Redis loses it.
            self.guardian.observe(&e.id, f);
            if entry.is_confirmation() {
                info!(
                    "P3.3 control: {} revoked {} allows (for {}, actor={})",
                    entry.scope_label(),
                    entry.revoked,
                    entry.reference,
                    entry.actor
                );
                continue;
            }
            warn!("{}", entry.log_line());
            match self.revoke(con, &e.id, f).await {
                Ok(Some(n)) => warn!(
                    "P3.3 revoked {n} outstanding allows after {} -> {} (control entry {})",
                    entry.scope_label(),
                    entry.to,
                    e.id
                ),
                Ok(None) => {}
                // A key the revocation must write is unusable: said, and
                // not retried for ever (the allows expire within the TTL).
                Err(err) if err.code() == Some(REVOKE_ERROR) => warn!(
                    "P3.3 cannot revoke the allows after control entry {}: {}; they stay valid until they expire",
                    e.id,
                    clip(err.detail().unwrap_or(""))
                ),
                Err(err) => return Err(err),
            }
        }
        let mut ack = redis::cmd("XACK");
        ack.arg(CONTROL_STREAM).arg(&self.group);
        for e in entries {
            ack.arg(&e.id);
        }
        let _: i64 = ack.query_async(con).await?;
        self.refresh.notify_one();
        self.guardian.wake();
        Ok(())
    }
}

/// Follows the control stream until `cancel` fires.
pub async fn run_follower(
    cfg: Arc<Config>,
    redis: store::Redis,
    refresh: Arc<Notify>,
    guardian: Arc<crate::gate::known::KnownState>,
    cancel: CancellationToken,
) {
    let reader = GroupReader {
        who: "control follower",
        what: "control",
        stream: CONTROL_STREAM,
        group: keys::control_group(&cfg.consumer_name),
        consumer: cfg.consumer_name.clone(),
        batch: 64,
        block: Duration::from_millis(1000),
        // The group is this instance's own: nothing to claim from others.
        claim_idle: Duration::from_secs(3600),
    };
    let mut handler = Follower {
        group: reader.group.clone(),
        refresh,
        guardian,
        config_hash: crate::gate::record::config_hash(&cfg),
        cfg,
    };
    reader.run(&redis, &mut handler, &cancel).await;
}

/// Keeps `p33_trading_state` and `p33_symbol_overrides` current: at once
/// when the follower saw a change, and every 5 s (a state set by hand,
/// without `ctl`, shows too). The global gauge shows the state in force:
/// the stricter of the key and what the guardian knows.
pub async fn run_state_metrics(
    cfg: Arc<Config>,
    redis: store::Redis,
    guardian: Arc<crate::gate::known::KnownState>,
    metrics: Arc<Metrics>,
    refresh: Arc<Notify>,
    cancel: CancellationToken,
) {
    let Some(mut con) = redis
        .connect("trading state", Duration::from_secs(5), &cancel)
        .await
    else {
        return;
    };
    let mut overrides: Vec<TradingState> = Vec::new();
    let mut next_count = tokio::time::Instant::now();
    loop {
        let read = async {
            // What is in force: the stricter of the key and the state the
            // control log confirmed (a key Redis lost reads the latter).
            let key = read_global(&mut con)
                .await?
                .unwrap_or(cfg.default_trading_state);
            let global = guardian.known().map_or(key, |k| k.global.max(key));
            if tokio::time::Instant::now() >= next_count {
                let all = read_overrides(&mut con).await?;
                overrides = all.iter().map(|(_, t)| *t).collect();
                guardian.set_seen_overrides(all);
                next_count = tokio::time::Instant::now() + overrides_period(overrides.len());
            }
            let latch = latch_tripped(&mut con, global).await?;
            Ok::<_, redis::RedisError>((global, latch))
        };
        match read.await {
            Ok((global, latch)) => {
                metrics.set_trading_state(global, &overrides);
                metrics.throttle_latch_tripped.set(i64::from(latch));
            }
            Err(e) => warn!("trading state: reading it failed: {e}"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = refresh.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}
