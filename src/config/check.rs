//! `--check-config` (SPEC §2): the effective configuration in table order
//! with secrets redacted, and every WARN about settings that cannot be
//! meant.

use super::credentials::is_placeholder;
use super::{Config, SnapshotSource};
use crate::redis::keys;
use crate::text::Secret;

impl Config {
    /// The effective configuration as `NAME=value` pairs in table order,
    /// secrets redacted, for `--check-config`.
    pub fn effective(&self) -> &[(&'static str, String)] {
        &self.shown
    }

    /// Every WARN start-up gives about the configuration itself: unknown
    /// `P33_*` names, legacy variables, and each tier-3 allowlist entry that
    /// will be dropped, by name and why.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if !self.legacy_present.is_empty() {
            w.push(format!(
                "ignoring legacy variables (no longer used): {}",
                self.legacy_present.join(", ")
            ));
        }
        if !self.unknown_p33.is_empty() {
            w.push(format!(
                "unknown P33_ variables (typo?), ignored: {}",
                self.unknown_p33.join(", ")
            ));
        }
        for s in &self.allowlist_env {
            if let Some(why) = keys::symbol_problem(s) {
                w.push(format!(
                    "P3.3 allowlist: tier-3 entry {:?} will be dropped: {why}",
                    crate::text::clip(s)
                ));
            }
        }
        for (set, meant) in &self.near_misses {
            w.push(format!(
                "{} is not a variable this daemon reads; did you mean {meant}?",
                crate::text::clip(set)
            ));
        }
        if self.both_key_kinds {
            w.push(
                "testnet and mainnet exchange credentials are both set: BINANCE_TESTNET_API_KEY/SECRET win; unset the ones not meant"
                    .to_string(),
            );
        }
        if self.snapshot_source == SnapshotSource::Binance
            && self.poll_interval.as_secs_f64() >= self.stale_threshold_s
        {
            w.push(format!(
                "P33_POLL_SEC={} is not below P33_STALE_THRESHOLD_SEC={}: every snapshot goes stale between polls and plans are denied stale_exchange_state",
                self.poll_interval.as_secs_f64(),
                self.stale_threshold_s
            ));
        }
        let placeholder = [
            ("REDIS_PASSWORD", self.redis.info.redis.password.as_deref()),
            (
                "REDIS_SENTINEL_PASSWORD",
                self.redis
                    .sentinel
                    .as_ref()
                    .and_then(|s| s.password.as_ref())
                    .map(Secret::expose),
            ),
        ];
        for (name, pw) in placeholder {
            if pw.is_some_and(is_placeholder) {
                w.push(format!(
                    "{name} is a shipped placeholder (CHANGE-ME…): anyone who read the package can log in as this user; choose a password and load the users with `position-state-brain acl` (SPEC §17)"
                ));
            }
        }
        if self.trade_closed_without_stream {
            w.push(
                "P33_TRADE_CLOSED_EVENTS=true does nothing without the user data stream (P33_SNAPSHOT_SOURCE=binance, P33_POSITION_STREAM=on): only the stream sees the fills that closed a position"
                    .to_string(),
            );
        }
        if !self.metrics_addr.is_loopback() {
            w.push(format!(
                "P33_METRICS_ADDR={} is not loopback: /metrics (positions, the allowlist) is reachable from other hosts; set 127.0.0.1, or allow only the Prometheus host to port {}",
                self.metrics_addr, self.metrics_port
            ));
        }
        w
    }
}

/// The Levenshtein distance of two short names (ASCII, bytes).
pub(super) fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}
