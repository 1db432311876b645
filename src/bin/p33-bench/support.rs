//! What every mode shares: a private Redis, the fake exchange, the daemon's
//! log, percentiles and histograms, and a guard that kills every child.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub(crate) fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub(crate) fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

pub(crate) struct Guard(pub(crate) Vec<std::process::Child>);
impl Drop for Guard {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts the fake exchange next to this binary; its address.
pub(crate) fn start_fake(guard: &mut Guard) -> anyhow::Result<String> {
    use std::io::BufRead;
    let bin = std::env::current_exe()?.with_file_name("fake-exchange");
    let mut child = Command::new(bin)
        .args([
            "--port",
            "0",
            "--api-key",
            FAKE_KEY,
            "--api-secret",
            FAKE_SECRET,
        ])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut out = std::io::BufReader::new(child.stdout.take().expect("piped"));
    guard.0.push(child);
    let mut line = String::new();
    out.read_line(&mut line)?;
    let addr = line
        .split("http://")
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("fake-exchange printed {line:?}"))?
        .trim()
        .to_string();
    std::thread::spawn(move || for _ in out.lines() {});
    Ok(addr)
}

pub(crate) const FAKE_KEY: &str = "bench-key";
pub(crate) const FAKE_SECRET: &str = "bench-secret";

/// The daemon's environment for binance mode against the fake exchange.
pub(crate) fn exchange_env(fake: &str) -> Vec<(String, String)> {
    vec![
        ("P33_SNAPSHOT_SOURCE".into(), "binance".into()),
        ("P33_EXCHANGE_BASE_URL".into(), format!("http://{fake}")),
        ("BINANCE_TESTNET_API_KEY".into(), FAKE_KEY.into()),
        ("BINANCE_TESTNET_API_SECRET".into(), FAKE_SECRET.into()),
    ]
}

/// Waits for a line in a daemon log; the line.
pub(crate) async fn wait_log(path: &std::path::Path, what: &str) -> anyhow::Result<String> {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.contains(what)) {
            return Ok(l.to_string());
        }
        if start.elapsed() > Duration::from_secs(30) {
            anyhow::bail!("no {what:?} in {}:\n{text}", path.display());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `q` quantile of a Prometheus histogram in a scrape, interpolated as
/// `histogram_quantile` does, and the share of observations ≤ `le`.
pub(crate) fn histogram(text: &str, name: &str, q: f64, le: &str) -> (f64, f64) {
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&format!("{name}_bucket{{le=\""))?;
            let (bound, count) = rest.split_once("\"} ")?;
            let b = if bound == "+Inf" {
                f64::INFINITY
            } else {
                bound.parse().ok()?
            };
            Some((b, count.trim().parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().map_or(0.0, |b| b.1);
    if total == 0.0 {
        return (f64::NAN, f64::NAN);
    }
    let share = buckets
        .iter()
        .find(|b| format!("{}", b.0) == le)
        .map_or(f64::NAN, |b| b.1 / total);
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(bound, count) in &buckets {
        if count >= rank {
            if bound.is_infinite() {
                return (prev.0, share);
            }
            let within = (rank - prev.1) / (count - prev.1).max(f64::MIN_POSITIVE);
            return (prev.0 + (bound - prev.0) * within, share);
        }
        prev = (bound, count);
    }
    (f64::NAN, share)
}

/// Changes not yet seen in a snapshot, by symbol: (amount, when made).
pub(crate) type Pending = Arc<Mutex<HashMap<String, Vec<(u64, Instant)>>>>;

/// The bench's private `redis-server` on loopback `port`, no persistence,
/// with `extra` arguments.
pub(crate) fn redis_server(
    port: u16,
    dir: &std::path::Path,
    extra: &[String],
) -> std::io::Result<std::process::Child> {
    Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(dir)
        .args(extra)
        .stdout(Stdio::null())
        .spawn()
}

/// A private Redis (no persistence) on a free loopback port, answering:
/// its data directory, URL, client and a connection.
pub(crate) async fn private_redis(
    guard: &mut Guard,
) -> anyhow::Result<(
    std::path::PathBuf,
    String,
    redis::Client,
    redis::aio::MultiplexedConnection,
)> {
    let port = free_port()?;
    let dir = std::env::temp_dir().join(format!("p33-bench-{port}"));
    std::fs::create_dir_all(&dir)?;
    guard.0.push(redis_server(port, &dir, &[])?);
    let url = format!("redis://127.0.0.1:{port}/0");
    let client = redis::Client::open(url.as_str())?;
    let con = loop {
        if let Ok(c) = client.get_multiplexed_async_connection().await {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    Ok((dir, url, client, con))
}

/// Starts the daemon in binance mode against the fake exchange, for the
/// symbols `names` (the env allowlist), logging to `log_path`, with `vars`
/// and the bench's `--env` on top; waits until it reads plans.
pub(crate) async fn start_exchange_daemon(
    daemon: &std::path::Path,
    url: &str,
    fake: &str,
    names: &[String],
    vars: &[(&str, &str)],
    args: &crate::Args,
    log_path: &std::path::Path,
) -> anyhow::Result<std::process::Child> {
    let log = std::fs::File::create(log_path)?;
    let child = Command::new(daemon)
        .env_clear()
        .env("REDIS_URL", url)
        .envs(exchange_env(fake))
        .env("P33_ALLOWLIST_SOURCE", "env")
        .env("P33_ALLOWLIST", names.join(","))
        .env("P33_METRICS_ADDR", "127.0.0.1")
        .env("P33_METRICS_PORT", "0")
        .env("P33_LOG_LEVEL", &args.log_level)
        .envs(vars.iter().copied())
        .envs(args.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    wait_log(log_path, "ready: reading plans").await?;
    Ok(child)
}

/// `symbol` was seen at `amt` at `at`: every change made to it that `amt`
/// shows (`shows(wanted)`) is timed into `seen`, ms, and let go.
pub(crate) fn time_changes(
    pending: &Pending,
    seen: &Mutex<Vec<f64>>,
    symbol: &str,
    at: Instant,
    shows: impl Fn(u64) -> bool,
) {
    let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(q) = p.get_mut(symbol) {
        let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
        q.retain(|(want, t0)| {
            if shows(*want) {
                s.push(at.duration_since(*t0).as_secs_f64() * 1000.0);
                false
            } else {
                true
            }
        });
    }
}

/// How many changes are not timed yet.
pub(crate) fn untimed(pending: &Pending) -> usize {
    pending
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .map(Vec::len)
        .sum()
}

/// Waits, up to `within`, until every change made is timed.
pub(crate) async fn wait_timed(pending: &Pending, within: Duration) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline && untimed(pending) > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
