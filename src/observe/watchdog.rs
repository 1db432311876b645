//! The systemd watchdog (SPEC §10): `WATCHDOG=1` from the plan loop while
//! it turns, so a stalled loop stops pinging and systemd restarts the daemon.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::observe::metrics::Metrics;

/// systemd watchdog pings, sent from the plan loop while it turns.
pub struct Watchdog {
    interval: Option<Duration>,
    start: Instant,
    last_ms: AtomicU64,
}

impl Watchdog {
    /// Reads `WATCHDOG_USEC` (and `WATCHDOG_PID`, which, when set, must be
    /// this process, as libsystemd's `sd_watchdog_enabled` checks); pings at
    /// half of it.
    pub fn from_env() -> Self {
        let usec = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .filter(|u| *u > 0);
        let pid_ok = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .is_none_or(|p| p == std::process::id());
        Watchdog {
            interval: usec
                .filter(|_| pid_ok)
                .map(|u| Duration::from_micros(u / 2)),
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    /// Sends `WATCHDOG=1` when half the watchdog period has passed since the
    /// last one. Called by the plan loop on every turn, so a stalled loop
    /// stops pinging and systemd restarts the daemon.
    pub fn ping(&self, metrics: &Metrics) {
        let Some(iv) = self.interval else { return };
        let now = self.start.elapsed().as_millis() as u64;
        let last = self.last_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= iv.as_millis() as u64 || last == 0 {
            self.last_ms.store(now.max(1), Ordering::Relaxed);
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
            metrics.watchdog_pings_total.inc();
        }
    }
}
