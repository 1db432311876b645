//! Lifecycle: start order, task supervision, signals, systemd (SPEC §10).
//!
//! Start: bind HTTP (busy port: fatal) → Redis (retry forever; with
//! sentinels, once they name a master) → consumer groups → first allowlist
//! resolution → `READY=1` → work. The tasks — HTTP, the sentinel follower
//! and its metrics, allowlist refresher, plan consumer, ledger follower,
//! control follower, exchange poller and step-size loader — share one
//! cancellation token. If any of
//! them ends before shutdown was asked for (a panic included), the others are
//! cancelled and [`run`] returns an error, so the process exits non-zero and
//! systemd restarts it: no task ever dies silently.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::http;
use crate::allowlist::{self, AllowlistHandle, Resolver};
use crate::config::Config;
use crate::exchange;
use crate::gate::{consumer, ledger};
use crate::observe::metrics::Metrics;
use crate::observe::watchdog::Watchdog;
use crate::operator::control;
use crate::redis::keys::{CONTROL_STREAM, PLAN_STREAM, RESULT_STREAM};
use crate::redis::{store, stream};

/// How long shutdown waits for tasks before giving up on them; SPEC §10 wants
/// the process gone within 5 s of SIGTERM.
pub const SHUTDOWN_GRACE: Duration = Duration::from_millis(4500);

/// The version and the git commit it was built from (`unknown` outside a
/// git checkout).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("P33_GIT_COMMIT"),
    ")"
);

/// Exit status of a usage error.
pub use crate::config::EXIT_USAGE;

/// The command line. Configuration comes from the environment only; the
/// variables are listed by `--check-config` and in the README.
#[derive(Debug, clap::Parser)]
#[command(
    name = "position-state-brain",
    version = VERSION,
    about = "P3.3 Position State Brain: the fail-closed pre-trade permit gate",
    after_help = "Configuration comes from the environment (see README.md, Configuration).\n\
                  Exit codes: 0 clean, 64 usage error, 78 configuration error, 1 other fatal error."
)]
pub struct Cli {
    /// Print the effective configuration (secrets redacted) and every
    /// warning start-up would give, then exit 0 (or 78 on an error).
    #[arg(long)]
    pub check_config: bool,
    /// A subcommand instead of running the daemon.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// What the binary does besides running the daemon.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// The trading state (kill switch): status, halt, reduce, resume.
    Ctl(crate::operator::ctl::CtlArgs),
    /// Why was this plan allowed or denied? Its decision record, in words.
    Explain {
        /// The plan's plan_id.
        plan_id: String,
    },
    /// What would a configuration change have done? Recorded decisions,
    /// decided again with the same rules.
    Replay(crate::operator::replay::ReplayArgs),
    /// The Redis ACL users' lines, with the SHA-256 of their passwords read
    /// from their files (never a password); `--pipeline` for the other
    /// services' users.
    Acl(crate::operator::acl::AclArgs),
}

/// Spawns `fut` as a named task whose end is reported to the supervisor.
fn spawn_named<F>(set: &mut JoinSet<&'static str>, name: &'static str, fut: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    set.spawn(async move {
        fut.await;
        name
    });
}

/// Cancels `shutdown` on SIGTERM (systemd stop) or SIGINT (Ctrl-C).
pub fn cancel_on_signals(shutdown: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let which = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        info!("{which} received: shutting down");
        shutdown.cancel();
    });
    Ok(())
}

/// Runs the daemon until `shutdown` is cancelled (Ok) or a task fails (Err).
pub async fn run(
    cfg: Arc<Config>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    info!("P3.3_BUILD_TAG={}", env!("CARGO_PKG_VERSION"));
    info!("position-state-brain {VERSION}");
    for w in cfg.warnings() {
        warn!("{w}");
    }
    info!(
        "starting: redis={} group={} consumer={} snapshot_source={:?} allowlist_source={:?} dry_run={} log_filter={}",
        cfg.redis.display(),
        cfg.consumer_group,
        cfg.consumer_name,
        cfg.snapshot_source,
        cfg.allowlist_mode,
        cfg.dry_run,
        crate::text::clip_to(&crate::observe::telemetry::capped(&cfg.log_filter), 256)
    );
    // SIGHUP's default action kills the process: take it over before anything slow.
    let reload = Arc::new(Notify::new());
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;

    let listener = http::bind(SocketAddr::new(cfg.metrics_addr, cfg.metrics_port)).await?;
    let cancel = shutdown.child_token();
    let mut tasks: JoinSet<&'static str> = JoinSet::new();
    spawn_named(
        &mut tasks,
        "http",
        http::serve(listener, metrics.clone(), cancel.clone()),
    );
    {
        let reload = reload.clone();
        let cancel = cancel.clone();
        spawn_named(&mut tasks, "sighup", async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    s = hup.recv() => match s {
                        Some(()) => reload.notify_one(),
                        None => return cancel.cancelled().await,
                    },
                }
            }
        });
    }

    let redis = store::Redis::new(cfg.redis.clone());
    spawn_named(&mut tasks, "sentinel", redis.clone().follow(cancel.clone()));
    spawn_named(
        &mut tasks,
        "master-metrics",
        watch_master(redis.clone(), metrics.clone(), cancel.clone()),
    );
    let mut outcome =
        start_and_supervise(&cfg, &redis, &metrics, reload, &cancel, &mut tasks).await;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    cancel.cancel();
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        let mut panicked = None;
        while let Some(r) = tasks.join_next().await {
            if let Err(e) = r {
                if e.is_panic() {
                    panicked = Some(anyhow!("a task panicked during shutdown: {e}"));
                }
            }
        }
        panicked
    })
    .await;
    let timed_out = drained.is_err();
    if let Ok(Some(e)) = drained {
        if outcome.is_ok() {
            outcome = Err(e);
        }
    }
    if timed_out {
        warn!(
            "shutdown: tasks still running after {:?}; exiting anyway",
            SHUTDOWN_GRACE
        );
        tasks.abort_all();
    }
    match &outcome {
        Ok(()) => info!("stopped cleanly"),
        Err(e) => error!("stopping after a fatal error: {e:#}"),
    }
    outcome
}

/// Mirrors what the [`store::Redis`] knows into `p33_redis_master_known`,
/// `p33_redis_failovers_total` and `/readyz`.
async fn watch_master(redis: store::Redis, metrics: Arc<Metrics>, cancel: CancellationToken) {
    let mut changes = redis.watch();
    loop {
        let s = redis.status();
        metrics.set_master(s.master.is_some(), s.failovers);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = changes.changed() => {}
        }
    }
}

/// The Redis user lacks a right the daemon needs (a NOPERM at start): a
/// configuration error, exit 78, never retried.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NoPermission(pub String);

async fn start_and_supervise(
    cfg: &Arc<Config>,
    redis: &store::Redis,
    metrics: &Arc<Metrics>,
    reload: Arc<Notify>,
    cancel: &CancellationToken,
    tasks: &mut JoinSet<&'static str>,
) -> anyhow::Result<()> {
    let Some(mut con) = redis
        .connect("control", Duration::from_secs(5), cancel)
        .await
    else {
        return Ok(());
    };
    // The groups come first, so plans published while we start are not skipped.
    let mut backoff = store::Backoff::default();
    loop {
        // What each call was, for a NOPERM: the user lacks a right the
        // daemon needs, which no retry will give it (exit 78, SPEC §17).
        let mut doing = String::new();
        let r = async {
            doing = format!("XGROUP CREATE {PLAN_STREAM} {}", cfg.consumer_group);
            stream::ensure_group(&mut con, PLAN_STREAM, &cfg.consumer_group, "$").await?;
            doing = format!("XINFO STREAM / XGROUP SETID {PLAN_STREAM}");
            stream::repair_group_ahead(&mut con, PLAN_STREAM, &cfg.consumer_group).await?;
            // The ledger and control streams are not the gate's own: one of
            // another type is said (their followers retry and say it again)
            // and the daemon starts all the same (SPEC §11).
            for (stream, group) in [
                (RESULT_STREAM, cfg.ledger_group().to_string()),
                (CONTROL_STREAM, crate::redis::keys::control_group(&cfg.consumer_name)),
            ] {
                doing = format!("XGROUP CREATE {stream} {group}");
                match stream::ensure_group(&mut con, stream, &group, "$").await {
                    Err(e) if e.code() == Some("WRONGTYPE") => warn!(
                        "redis: {stream} holds another type, not a stream: {} cannot follow it until it is deleted or repaired; starting without it",
                        if stream == CONTROL_STREAM {
                            "the control follower (states are still enforced; with P33_THROTTLE_LATCH opens are denied invalid_guard_state)"
                        } else {
                            "the ledger follower"
                        }
                    ),
                    r => r?,
                }
            }
            Ok::<(), redis::RedisError>(())
        }
        .await;
        match r {
            Ok(()) => break,
            Err(e) if e.code() == Some("NOPERM") => {
                let user = cfg.redis.user_shown();
                return Err(NoPermission(format!(
                    "redis: user {user} may not {doing} ({}): the daemon needs that command on that key; load the users `position-state-brain acl` prints (user p33; README \"Security\", /usr/share/doc/position-state-brain/README.md) or give the user that right",
                    crate::text::clip(&e.to_string())
                ))
                .into());
            }
            Err(e) => {
                warn!("redis: creating consumer groups failed: {e}; retrying");
                if !backoff.wait(cancel).await {
                    return Ok(());
                }
            }
        }
    }
    metrics.set_redis_up(true);
    metrics.set_group_ok(true);
    // The trading state first: it is known (from the state file, the keys
    // or, at a first start, after a peer had its chance) while the
    // allowlist resolves, and no plan is read before (SPEC §12).
    let guardian = Arc::new(crate::gate::known::KnownState::default());
    spawn_named(
        tasks,
        "state-guardian",
        crate::operator::guardian::run(
            cfg.clone(),
            redis.clone(),
            guardian.clone(),
            metrics.clone(),
            cancel.clone(),
        ),
    );

    let handle = AllowlistHandle::default();
    let mut resolver = Resolver::new(cfg.clone(), handle.clone(), metrics.clone());
    // The first resolution needs Redis's answer: a read error is no
    // resolution yet, and plans are not read before one (SPEC §3).
    let first = loop {
        if let Some(r) = resolver.refresh(Some(&mut con)).await {
            break r;
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(allowlist::NO_ANSWER_RETRY) => {}
        }
    };
    let steps = crate::gate::steps::StepSizes::default();
    // The saved step table before the first plan (SPEC §10): a plan pending
    // at restart is never judged on the 0.001 fallback for a symbol the
    // table knows while exchangeInfo is slow. The exchange refresh replaces
    // it when it answers.
    loop {
        match exchange::load_saved_steps(&mut con).await {
            Ok(t) => {
                if !t.is_empty() {
                    info!(
                        "step sizes: {} loaded from {} (until exchangeInfo answers)",
                        t.len(),
                        crate::redis::keys::STEP_SIZES
                    );
                    steps.set(t);
                }
                break;
            }
            Err(e) => {
                warn!(
                    "step sizes: reading {} failed: {e}; retrying",
                    crate::redis::keys::STEP_SIZES
                );
                if !backoff.wait(cancel).await {
                    return Ok(());
                }
            }
        }
    }
    let positioned = crate::gate::steps::Positioned::default();
    let (gained_tx, gained_rx) = tokio::sync::watch::channel(0u64);
    resolver.on_gain(gained_tx);

    spawn_named(
        tasks,
        "allowlist",
        allowlist::run_refresher(
            resolver,
            Some(con),
            first.expires_at,
            reload,
            cancel.clone(),
        ),
    );
    spawn_named(
        tasks,
        "step-sizes",
        exchange::run_step_sizes(
            cfg.clone(),
            redis.clone(),
            steps.clone(),
            metrics.clone(),
            cancel.clone(),
        ),
    );
    if cfg.snapshot_source == crate::config::SnapshotSource::Binance {
        let writer = Arc::new(exchange::Writer::new(
            cfg,
            handle.clone(),
            positioned.clone(),
            metrics.clone(),
        ));
        match exchange::Client::new(cfg, metrics.clone()) {
            Ok(client) => {
                let client = Arc::new(client);
                spawn_named(
                    tasks,
                    "snapshots",
                    exchange::run_poller(
                        cfg.clone(),
                        redis.clone(),
                        client.clone(),
                        writer.clone(),
                        metrics.clone(),
                        gained_rx,
                        cancel.clone(),
                    ),
                );
                if cfg.position_stream {
                    spawn_named(
                        tasks,
                        "position-stream",
                        exchange::Stream::new(cfg.clone(), client, writer, metrics.clone())
                            .run(redis.clone(), cancel.clone()),
                    );
                }
            }
            Err(e) => warn!("snapshots: cannot build the HTTP client: {e}; snapshots will age"),
        }
    }
    spawn_named(
        tasks,
        "ledger",
        ledger::run(cfg.clone(), redis.clone(), metrics.clone(), cancel.clone()),
    );
    let refresh = Arc::new(Notify::new());
    spawn_named(
        tasks,
        "instance",
        crate::operator::instance::run(
            cfg.clone(),
            redis.clone(),
            handle.clone(),
            metrics.clone(),
            cancel.clone(),
        ),
    );
    spawn_named(
        tasks,
        "control",
        control::run_follower(
            cfg.clone(),
            redis.clone(),
            refresh.clone(),
            guardian.clone(),
            cancel.clone(),
        ),
    );
    spawn_named(
        tasks,
        "trading-state",
        control::run_state_metrics(
            cfg.clone(),
            redis.clone(),
            guardian.clone(),
            metrics.clone(),
            refresh,
            cancel.clone(),
        ),
    );
    let watchdog = Arc::new(Watchdog::from_env());
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    // Plans wait until the trading state is known: what the write script
    // enforces beside the keys (SPEC §12).
    // Waiting is no stall: the watchdog is fed meanwhile (a state that
    // cannot be known — a broken state file and no peer — keeps the daemon
    // up and not ready, saying why, rather than in a restart loop).
    let waiting = async {
        loop {
            watchdog.ping(metrics);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    tokio::select! {
        _ = guardian.wait_known(cancel) => {}
        _ = waiting => {}
        r = supervise(tasks, cancel) => return r,
    }
    if cancel.is_cancelled() {
        return supervise(tasks, cancel).await;
    }
    spawn_named(
        tasks,
        "plans",
        consumer::run(
            cfg.clone(),
            redis.clone(),
            consumer::Consumer::new(
                cfg.clone(),
                handle,
                steps,
                positioned,
                guardian,
                metrics.clone(),
            ),
            metrics.clone(),
            watchdog,
            cancel.clone(),
        ),
    );
    info!("ready: reading plans from {PLAN_STREAM}");
    supervise(tasks, cancel).await
}

/// Waits for shutdown (Ok) or for the first task to end before it (Err): a
/// panic, or a task that returned although nothing asked it to.
pub async fn supervise(
    tasks: &mut JoinSet<&'static str>,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => Ok(()),
        ended = tasks.join_next() => match ended {
            Some(Err(e)) if e.is_panic() => Err(anyhow!("a task panicked: {e}")),
            // A task that ended because shutdown began is no failure.
            _ if cancel.is_cancelled() => Ok(()),
            Some(Ok(name)) => Err(anyhow!("task `{name}` stopped unexpectedly")),
            Some(Err(e)) => Err(anyhow!("a task failed: {e}")),
            None => Err(anyhow!("no task left running")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_or_returning_task_fails_the_daemon_and_shutdown_does_not() {
        let cancel = CancellationToken::new();
        let mut set = JoinSet::new();
        spawn_named(&mut set, "waits", {
            let c = cancel.clone();
            async move { c.cancelled().await }
        });
        spawn_named(&mut set, "boom", async { panic!("injected") });
        let e = supervise(&mut set, &cancel).await.unwrap_err();
        assert!(e.to_string().contains("panicked"), "{e}");

        let mut set = JoinSet::new();
        spawn_named(&mut set, "quits", async {});
        let e = supervise(&mut set, &cancel).await.unwrap_err();
        assert!(
            e.to_string().contains("task `quits` stopped unexpectedly"),
            "{e}"
        );

        let mut set = JoinSet::new();
        spawn_named(&mut set, "waits", {
            let c = cancel.clone();
            async move { c.cancelled().await }
        });
        cancel.cancel();
        assert!(supervise(&mut set, &cancel).await.is_ok());
    }

    #[test]
    fn cli_flags() {
        use clap::Parser;
        let p = |a: &[&str]| Cli::try_parse_from(std::iter::once("p").chain(a.iter().copied()));
        assert!(!p(&[]).unwrap().check_config);
        assert!(p(&["--check-config"]).unwrap().check_config);
        assert!(p(&["--frobnicate"]).is_err());
        assert_eq!(
            p(&["--version"]).unwrap_err().kind(),
            clap::error::ErrorKind::DisplayVersion
        );
    }
}
