//! Instances report themselves (SPEC §12): every running daemon writes the
//! hash `quantum:p33:instance:<consumer>` every 5 s with a TTL of 15 s, so
//! `ctl status` shows each instance's own view (its allowlist, mode, pending
//! entries, last plan, Redis master) rather than one `ctl` would resolve
//! from its own environment. A stopped instance's hash expires by itself.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::allowlist::AllowlistHandle;
use crate::config::Config;
use crate::observe::metrics::Metrics;
use crate::redis::keys;
use crate::redis::store;

/// How often an instance reports itself.
pub const EVERY: Duration = Duration::from_secs(5);
/// How long a report lives: three periods.
pub const TTL: Duration = Duration::from_secs(15);

/// What an instance knows of itself at one moment (the hash's fields).
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The package version.
    pub version: &'static str,
    /// The git commit.
    pub commit: &'static str,
    /// The host name.
    pub host: String,
    /// The process ID.
    pub pid: u32,
    /// When the process started, epoch s.
    pub started_at: u64,
    /// `live` or `dry_run`.
    pub mode: &'static str,
    /// The allowlist in force: its source, size, as-of time and whether it
    /// has expired (a universe list past `asof_epoch + MAX_AGE`).
    pub allowlist: (String, usize, Option<f64>, bool),
    /// The position stream (SPEC §16): `live`, `down` or `off`.
    pub position_stream: &'static str,
    /// Whether this instance writes the canonical hashes
    /// (`P33_CANONICAL_POSITIONS`, SPEC §19): `on` or `off`.
    pub canonical_positions: &'static str,
    /// The Redis master in use (`host:port`), or `none`.
    pub redis_master: String,
    /// This consumer's pending plan entries.
    pub pending: u64,
    /// Plans finished since start.
    pub plans: u64,
    /// When the last plan was finished, epoch s (0: none yet).
    pub last_plan_at: u64,
    /// The rule and limit settings (`VAR=VALUE;…`, never a secret): what
    /// `replay` takes as its baseline (SPEC §14).
    pub settings: String,
    /// Their short hash, as the records carry it.
    pub config: String,
}

impl Report {
    /// The hash's fields, in a fixed order.
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        let (source, count, asof, stale) = &self.allowlist;
        vec![
            ("version", self.version.to_string()),
            ("commit", self.commit.to_string()),
            ("host", self.host.clone()),
            ("pid", self.pid.to_string()),
            ("started_at", self.started_at.to_string()),
            ("mode", self.mode.to_string()),
            ("source", source.clone()),
            ("count", count.to_string()),
            (
                "asof_epoch",
                asof.map_or_else(String::new, |a| format!("{}", a.floor() as i64)),
            ),
            ("stale", u8::from(*stale).to_string()),
            ("position_stream", self.position_stream.to_string()),
            ("canonical_positions", self.canonical_positions.to_string()),
            ("redis_master", self.redis_master.clone()),
            ("pending", self.pending.to_string()),
            ("plans", self.plans.to_string()),
            ("last_plan_at", self.last_plan_at.to_string()),
            ("settings", self.settings.clone()),
            ("config", self.config.clone()),
        ]
    }
}

/// This consumer's pending entries on the plan stream.
async fn pending(con: &mut store::Conn, cfg: &Config) -> Result<u64, redis::RedisError> {
    let v: redis::Value = redis::cmd("XPENDING")
        .arg(keys::PLAN_STREAM)
        .arg(&cfg.consumer_group)
        .query_async(con)
        .await?;
    // The summary form: [count, min, max, [[consumer, count], ...]].
    let redis::Value::Array(parts) = v else {
        return Ok(0);
    };
    let Some(redis::Value::Array(consumers)) = parts.get(3) else {
        return Ok(0);
    };
    Ok(consumers
        .iter()
        .filter_map(|c| match c {
            redis::Value::Array(pair) => {
                let name = crate::redis::stream::text(pair.first()?)?;
                let n = crate::redis::stream::text(pair.get(1)?)?;
                (name == cfg.consumer_name)
                    .then(|| n.parse::<u64>().ok())
                    .flatten()
            }
            _ => None,
        })
        .sum())
}

/// Writes this instance's report every [`EVERY`] until `cancel`.
pub async fn run(
    cfg: Arc<Config>,
    redis: store::Redis,
    allowlist: AllowlistHandle,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let Some(mut con) = redis
        .connect("instance report", Duration::from_secs(5), &cancel)
        .await
    else {
        return;
    };
    let started_at = store::now_ms() / 1000;
    let host = crate::config::hostname();
    let key = keys::instance(&cfg.consumer_name);
    let mut failures = 0u64;
    loop {
        let a = allowlist.load();
        let now = store::now_epoch();
        // A failed count is reported as 0; the write below says why if
        // Redis is away.
        let pending = pending(&mut con, &cfg).await.unwrap_or(0);
        let report = Report {
            version: env!("CARGO_PKG_VERSION"),
            commit: env!("P33_GIT_COMMIT"),
            host: host.clone(),
            pid: std::process::id(),
            started_at,
            mode: if cfg.dry_run { "dry_run" } else { "live" },
            allowlist: (
                a.source.label().to_string(),
                a.symbols.len(),
                metrics.allowlist_asof(),
                a.expires_at.is_some_and(|e| now > e),
            ),
            position_stream: stream_word(&metrics),
            canonical_positions: if cfg.canonical_positions { "on" } else { "off" },
            redis_master: redis.status().master.unwrap_or_else(|| "none".into()),
            pending,
            plans: metrics.plans_finished(),
            last_plan_at: metrics.last_plan_ms() / 1000,
            settings: crate::gate::record::settings(&cfg),
            config: crate::gate::record::config_hash(&cfg),
        };
        let write = async {
            let mut fields = report.fields();
            fields.retain(|(_, v)| !v.is_empty());
            let mut p = redis::pipe();
            p.atomic()
                .del(&key)
                .ignore()
                .hset_multiple(&key, &fields)
                .ignore()
                .pexpire(&key, TTL.as_millis() as i64)
                .ignore();
            p.query_async::<()>(&mut con).await
        };
        match write.await {
            Ok(()) => failures = 0,
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(60) {
                    warn!("instance report: writing {key} failed: {e}");
                }
            }
        }
        // Every EVERY, and at once when the position stream goes live or
        // down: an operator's `ctl status` right after says what it is.
        let reported = stream_word(&metrics);
        let next = tokio::time::Instant::now() + EVERY;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep_until(next) => break,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    if stream_word(&metrics) != reported {
                        break;
                    }
                }
            }
        }
    }
}

/// The position stream's word (SPEC §16): `live`, `down` or `off`.
fn stream_word(metrics: &Metrics) -> &'static str {
    if metrics.position_stream_enabled.get() == 0 {
        "off"
    } else if metrics.position_stream_live.get() == 1 {
        "live"
    } else {
        "down"
    }
}

/// The reports read by [`read_all`]: the well-formed ones, sorted by
/// consumer name, and how many keys were skipped (SPEC §12).
#[derive(Debug, Default)]
pub struct Reports {
    /// Well-formed reports, by consumer name.
    pub ok: Vec<(String, HashMap<String, String>)>,
    /// Keys that are no report: a name or a value not UTF-8, a field
    /// missing or out of its bounds, another type, or past the cap.
    pub skipped: usize,
}

/// The most report keys read; more are counted as skipped.
pub const MAX_REPORT_KEYS: usize = 100_000;

/// Whether a report's fields are what a running instance writes: every
/// field present, numbers that are numbers, words from their sets, every
/// value at most 256 bytes without control characters.
pub fn well_formed(f: &HashMap<String, String>) -> bool {
    let digits = |k: &str| {
        f.get(k).is_some_and(|v| {
            !v.is_empty() && v.len() <= 20 && v.bytes().all(|b| b.is_ascii_digit())
        })
    };
    let one_of = |k: &str, set: &[&str]| f.get(k).is_some_and(|v| set.contains(&v.as_str()));
    let text = |k: &str| f.get(k).is_some_and(|v| !v.is_empty());
    f.len() <= 32
        && f.iter().all(|(k, v)| {
            let max = if k == "settings" { 1024 } else { 256 };
            k.len() <= 64 && v.len() <= max && !v.chars().any(char::is_control)
        })
        && [
            "pid",
            "started_at",
            "count",
            "pending",
            "plans",
            "last_plan_at",
        ]
        .into_iter()
        .all(digits)
        && ["version", "commit", "host", "source", "redis_master"]
            .into_iter()
            .all(text)
        && one_of("mode", &["live", "dry_run"])
        && one_of("stale", &["0", "1"])
        && one_of("position_stream", &["live", "down", "off"])
        // Absent from an older instance's report.
        && (!f.contains_key("canonical_positions") || one_of("canonical_positions", &["on", "off"]))
        && f.get("asof_epoch").is_none_or(|v| {
            v.is_empty() || (v.len() <= 20 && v.bytes().all(|b| b.is_ascii_digit()))
        })
}

/// Every instance's report (`ctl status`): the well-formed ones, sorted by
/// consumer name, and a count of the rest. 10,000 forged reports never hide
/// a real one, and a key name that is not UTF-8 is counted, never an error.
pub async fn read_all(con: &mut store::Conn) -> Result<Reports, redis::RedisError> {
    let prefix = keys::instance("");
    let mut names: Vec<String> = Vec::new();
    let mut out = Reports::default();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(con)
            .await?;
        for raw in batch {
            match String::from_utf8(raw) {
                Ok(n) if names.len() < MAX_REPORT_KEYS => names.push(n),
                _ => out.skipped += 1,
            }
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    names.sort();
    names.dedup();
    // Read a page of reports per round trip; a key of another type, or a
    // value that is not UTF-8, is no report.
    for page in names.chunks(500) {
        let mut p = redis::pipe();
        for k in page {
            p.cmd("HGETALL").arg(k);
        }
        let replies: Vec<redis::Value> = match p.query_async(con).await {
            Ok(r) => r,
            Err(e) if e.code() == Some("WRONGTYPE") => {
                // One wrong-typed key fails a pipeline reply: read one by one.
                let mut v = Vec::new();
                for k in page {
                    v.push(
                        redis::cmd("HGETALL")
                            .arg(k)
                            .query_async::<redis::Value>(con)
                            .await
                            .unwrap_or(redis::Value::Nil),
                    );
                }
                v
            }
            Err(e) => return Err(e),
        };
        for (k, v) in page.iter().zip(replies) {
            let fields = match v {
                redis::Value::Array(items) if !items.is_empty() => {
                    let mut h = HashMap::new();
                    let mut utf8 = true;
                    for kv in items.chunks(2) {
                        match kv {
                            [redis::Value::BulkString(a), redis::Value::BulkString(b)] => {
                                match (std::str::from_utf8(a), std::str::from_utf8(b)) {
                                    (Ok(a), Ok(b)) => {
                                        h.insert(a.to_string(), b.to_string());
                                    }
                                    _ => utf8 = false,
                                }
                            }
                            _ => utf8 = false,
                        }
                    }
                    utf8.then_some(h)
                }
                redis::Value::Map(items) if !items.is_empty() => {
                    let mut h = HashMap::new();
                    let mut utf8 = true;
                    for (a, b) in items {
                        match (a, b) {
                            (redis::Value::BulkString(a), redis::Value::BulkString(b)) => {
                                match (String::from_utf8(a), String::from_utf8(b)) {
                                    (Ok(a), Ok(b)) => {
                                        h.insert(a, b);
                                    }
                                    _ => utf8 = false,
                                }
                            }
                            _ => utf8 = false,
                        }
                    }
                    utf8.then_some(h)
                }
                // Gone meanwhile (the TTL): no report, nothing skipped.
                redis::Value::Array(_) | redis::Value::Map(_) | redis::Value::Nil => continue,
                _ => None,
            };
            let name = &k[prefix.len()..];
            match fields {
                Some(h)
                    if well_formed(&h)
                        && !name.is_empty()
                        && name.len() <= 128
                        && !name.chars().any(char::is_control) =>
                {
                    out.ok.push((name.to_string(), h));
                }
                _ => out.skipped += 1,
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_has_the_fields_of_spec_12() {
        let r = Report {
            version: "1.2.3",
            commit: "abc",
            host: "h".into(),
            pid: 7,
            started_at: 100,
            mode: "live",
            allowlist: ("universe".into(), 566, Some(1769920585.9), false),
            position_stream: "off",
            canonical_positions: "on",
            redis_master: "127.0.0.1:6379".into(),
            pending: 2,
            plans: 9,
            last_plan_at: 1769920590,
            settings: "P33_STALE_THRESHOLD_SEC=7".into(),
            config: "abc123".into(),
        };
        let f: HashMap<_, _> = r.fields().into_iter().collect();
        for k in [
            "version",
            "commit",
            "host",
            "pid",
            "started_at",
            "mode",
            "source",
            "count",
            "asof_epoch",
            "stale",
            "position_stream",
            "canonical_positions",
            "redis_master",
            "pending",
            "plans",
            "last_plan_at",
        ] {
            assert!(f.contains_key(k), "{k}");
        }
        assert_eq!(f["asof_epoch"], "1769920585");
        assert_eq!(f["count"], "566");
        let owned: HashMap<String, String> =
            f.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        assert!(
            well_formed(&owned),
            "a report the daemon writes is well formed"
        );
        for (k, v) in [
            ("pid", "seven"),
            ("mode", "evil"),
            ("host", "h\nP3.3 forged"),
            ("stale", "2"),
            ("commit", ""),
            ("count", "1e3"),
        ] {
            let mut bad = owned.clone();
            bad.insert(k.into(), v.into());
            assert!(!well_formed(&bad), "{k}={v:?}");
        }
        let mut missing = owned.clone();
        missing.remove("plans");
        assert!(!well_formed(&missing));
    }
}
