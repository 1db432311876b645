//! `p33-bench`: drives the real daemon with plans and measures permits.
//!
//! Starts a private `redis-server` on a free loopback port and the daemon
//! binary next to this one (external snapshot mode, so the exchange plays no
//! part), seeds a universe of `--symbols` symbols and fresh snapshots, then
//! XADDs plans — a mix of closes, opens, denials, other decisions and
//! non-allowlisted symbols — and timestamps each permit as it appears
//! (keyspace notifications). Afterwards it checks that every expected permit
//! arrived exactly once with the expected allow/deny and reason, and prints
//! one JSON line per run.
//!
//! With `--exchange` the daemon runs in binance mode against the project's
//! fake exchange (positions served by it, the user data stream on unless
//! `--env P33_POSITION_STREAM=off`), so the stream's cost on the plan path
//! can be measured.
//!
//! `--fills N` is the position-latency mode (SPEC §16): against the fake
//! exchange, N position changes on `--fill-symbols` symbols at `--fill-rate`
//! per second, each timed from the change until the snapshot in Redis shows
//! it, first with the stream on, then with `P33_POSITION_STREAM=off`, in the
//! same run; plans at `--rate` (default 50/s) meanwhile give the decision
//! input age (`p33_decision_input_age_seconds`).
//!
//! `--events N` is the position-events mode (SPEC §19): against the fake
//! exchange with the stream on, N plans flat out while fills flow at
//! `--fill-rate` per second, with `P33_POSITION_EVENTS` on, off, off, on in
//! one run; plan throughput per phase, and each fill timed from the call
//! that makes it until its `kind=position` entry is read.
//!
//! Usage:
//!   p33-bench --events 100000 [--fill-rate 20] [--fill-symbols 10]
//!   p33-bench [--plans 100000] [--rate 0] [--symbols 566] [--log-level INFO] [--instances 1] [--sentinel] [--exchange]
//!   p33-bench --fills 300 [--fill-rate 20] [--fill-symbols 10] [--rate 50]
//!   --rate 0 sends as fast as possible (throughput); --rate N offers N plans/s (latency).

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use position_state_brain::keys;
use serde_json::{json, Value};

/// Drives the real daemon with plans and measures permits (one JSON line).
#[derive(Debug, clap::Parser)]
#[command(name = "p33-bench")]
struct Args {
    /// Plans to send.
    #[arg(long, default_value_t = 100_000)]
    plans: usize,
    /// Plans per second offered; 0 sends as fast as possible (throughput).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Universe size (rounded down to an even number, at least 2).
    #[arg(long, default_value_t = 566)]
    symbols: usize,
    /// The daemon's P33_LOG_LEVEL.
    #[arg(long, default_value = "INFO")]
    log_level: String,
    /// One more variable for the daemon, VAR=VALUE (repeatable), e.g.
    /// `--env P33_MAX_OPENS=1000000/1s`.
    #[arg(long = "env", value_parser = parse_var)]
    env: Vec<(String, String)>,
    /// Instead of the daemon, run a consumer that does only the Redis work a
    /// plan needs (XREADGROUP, the state read, SET + XACK): no rules, no
    /// record, no logging. The ceiling Redis allows on this machine.
    #[arg(long, conflicts_with = "instances")]
    null: bool,
    /// Daemons consuming in the one group (distinct consumer names), as
    /// several instances on one Redis would.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    instances: u16,
    /// Start a Redis Sentinel watching the bench's Redis and have the
    /// daemons find it through REDIS_SENTINELS (the cost of following a
    /// master), instead of REDIS_URL.
    #[arg(long, conflicts_with = "null")]
    sentinel: bool,
    /// Load deploy/redis/users.acl into the bench's Redis and run the
    /// daemons as the ACL user p33 (the cost of the ACL checks).
    #[arg(long, conflicts_with = "null")]
    acl: bool,
    /// Run the daemons in binance mode against the fake exchange (which
    /// holds the positions the plans expect) instead of external snapshots.
    #[arg(long, conflicts_with = "null")]
    exchange: bool,
    /// Position-latency mode: this many position changes, timed to the
    /// snapshot, with the stream on and then off.
    #[arg(long, default_value_t = 0, conflicts_with_all = ["null", "instances", "sentinel"])]
    fills: usize,
    /// Position changes per second in `--fills` mode.
    #[arg(long, default_value_t = 20.0)]
    fill_rate: f64,
    /// Symbols the changes rotate over in `--fills` mode.
    #[arg(long, default_value_t = 10)]
    fill_symbols: usize,
    /// Halt mode (SPEC §12): this many outstanding allows indexed, then
    /// `ctl halt`; measures the revocation's time, each of its script calls
    /// (SLOWLOG) and the worst PING another client saw meanwhile.
    #[arg(long, default_value_t = 0, conflicts_with_all = ["null", "instances", "sentinel", "fills"])]
    halt: usize,
    /// Position-events mode (SPEC §19): this many plans, flat out, while
    /// `--fill-rate` fills a second flow through the user data stream, with
    /// `P33_POSITION_EVENTS` on, off, off, on (ABBA) in one run; and each
    /// fill timed to its `kind=position` entry.
    #[arg(long, default_value_t = 0, conflicts_with_all = ["null", "instances", "sentinel", "fills", "halt"])]
    events: usize,
    /// The daemon binary (default: the one next to this binary), e.g. an
    /// older build to compare with.
    #[arg(long)]
    daemon: Option<std::path::PathBuf>,
}

/// The `--null` consumer: the daemon's Redis round trips, nothing else.
async fn null_consumer(
    mut con: redis::aio::MultiplexedConnection,
    universe: std::collections::HashSet<String>,
) -> anyhow::Result<()> {
    use position_state_brain::stream::parse_xread;
    loop {
        let v: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("p33")
            .arg("p33-null")
            .arg("COUNT")
            .arg(256)
            .arg("BLOCK")
            .arg(500)
            .arg("STREAMS")
            .arg(keys::PLAN_STREAM)
            .arg(">")
            .query_async(&mut con)
            .await?;
        let entries = parse_xread(&v);
        if entries.is_empty() {
            continue;
        }
        let permitted: Vec<(&str, &str)> = entries
            .iter()
            .filter_map(|e| {
                let f = e.fields.as_ref()?;
                let d = f.get("decision")?;
                let s = f.get("symbol")?;
                ((d == "EXECUTE" || d == "RECONCILE_CLOSE") && universe.contains(s))
                    .then_some((e.id.as_str(), f.get("plan_id")?.as_str()))
            })
            .collect();
        // The state read: snapshot, ledger and cooldown of each symbol.
        let mut state = redis::pipe();
        for e in &entries {
            if let Some(s) = e.fields.as_ref().and_then(|f| f.get("symbol")) {
                state
                    .cmd("HGETALL")
                    .arg(keys::snapshot(s))
                    .cmd("HGETALL")
                    .arg(keys::ledger(s))
                    .cmd("GET")
                    .arg(keys::cooldown(s));
            }
        }
        let _: redis::Value = state.query_async(&mut con).await?;
        let mut w = redis::pipe();
        w.atomic();
        for (id, plan_id) in &permitted {
            w.cmd("SET")
                .arg(keys::permit(plan_id))
                .arg(r#"{"allow":false,"reason":"null"}"#)
                .arg("EX")
                .arg(600)
                .ignore();
            w.cmd("XACK")
                .arg(keys::PLAN_STREAM)
                .arg("p33")
                .arg(*id)
                .ignore();
        }
        for e in &entries {
            if !permitted.iter().any(|(id, _)| *id == e.id) {
                w.cmd("XACK")
                    .arg(keys::PLAN_STREAM)
                    .arg("p33")
                    .arg(&e.id)
                    .ignore();
            }
        }
        w.query_async::<()>(&mut con).await?;
    }
}

fn parse_var(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not VAR=VALUE")),
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// What a plan should produce.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Expect {
    Permit(bool, &'static str),
    Nothing,
}

/// Plan `i`: fields and expectation. Even symbols hold a long position.
fn make_plan(i: usize, symbols: usize) -> (String, Vec<(&'static str, String)>, Expect) {
    let id = format!("bench-{i}");
    let k = (i * 7) % symbols;
    let long = |k: usize| k.is_multiple_of(2);
    let (k, decision, action, reduce, symbol, expect) = match i % 10 {
        0..=3 => {
            let k = if long(k) { k } else { (k + 1) % symbols };
            (
                k,
                "EXECUTE",
                "FULL_CLOSE_PROPOSED",
                "true",
                None,
                Expect::Permit(true, "sanity_checks_passed"),
            )
        }
        4 => {
            let k = if long(k) { (k + 1) % symbols } else { k };
            (
                k,
                "EXECUTE",
                "OPEN_LONG",
                "false",
                None,
                Expect::Permit(true, "open_permit_granted"),
            )
        }
        5 => {
            let k = if long(k) { (k + 1) % symbols } else { k };
            (
                k,
                "EXECUTE",
                "FULL_CLOSE_PROPOSED",
                "true",
                None,
                Expect::Permit(false, "no_position"),
            )
        }
        6 => {
            let k = if long(k) { k } else { (k + 1) % symbols };
            (
                k,
                "EXECUTE",
                "OPEN_LONG",
                "false",
                None,
                Expect::Permit(false, "position_exists"),
            )
        }
        7 => (k, "SKIP", "HOLD", "false", None, Expect::Nothing),
        8 => (
            k,
            "EXECUTE",
            "FULL_CLOSE_PROPOSED",
            "true",
            Some("NOTLISTEDUSDT".to_string()),
            Expect::Nothing,
        ),
        _ => {
            let k = if long(k) { k } else { (k + 1) % symbols };
            (
                k,
                "EXECUTE",
                "PARTIAL_75",
                "false",
                None,
                Expect::Permit(true, "sanity_checks_passed"),
            )
        }
    };
    // An odd symbol count would make the last symbol's neighbour wrap to 0.
    let symbol = symbol.unwrap_or_else(|| format!("SYM{k}USDT"));
    let fields = vec![
        ("plan_id", id.clone()),
        ("symbol", symbol),
        ("decision", decision.to_string()),
        ("action", action.to_string()),
        ("reduceOnly", reduce.to_string()),
        ("kill_score", "0.42".to_string()),
        ("timestamp", "0".to_string()),
    ];
    (id, fields, expect)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

struct Guard(Vec<std::process::Child>);
impl Drop for Guard {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts the fake exchange next to this binary; its address.
fn start_fake(guard: &mut Guard) -> anyhow::Result<String> {
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

const FAKE_KEY: &str = "bench-key";
const FAKE_SECRET: &str = "bench-secret";

/// The daemon's environment for binance mode against the fake exchange.
fn exchange_env(fake: &str) -> Vec<(String, String)> {
    vec![
        ("P33_SNAPSHOT_SOURCE".into(), "binance".into()),
        ("P33_EXCHANGE_BASE_URL".into(), format!("http://{fake}")),
        ("BINANCE_TESTNET_API_KEY".into(), FAKE_KEY.into()),
        ("BINANCE_TESTNET_API_SECRET".into(), FAKE_SECRET.into()),
    ]
}

/// Waits for a line in a daemon log; the line.
async fn wait_log(path: &std::path::Path, what: &str) -> anyhow::Result<String> {
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
fn histogram(text: &str, name: &str, q: f64, le: &str) -> (f64, f64) {
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
type Pending = Arc<Mutex<HashMap<String, Vec<(u64, Instant)>>>>;

/// The bench's private `redis-server` on loopback `port`, no persistence,
/// with `extra` arguments.
fn redis_server(
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
async fn private_redis(
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

/// `--fills`: position changes timed to the snapshot, stream on then off.
async fn fills_mode(args: &Args) -> anyhow::Result<()> {
    let mut guard = Guard(Vec::new());
    let (dir, url, client, mut con) = private_redis(&mut guard).await?;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg("Kh")
        .query_async(&mut con)
        .await?;
    let fake = start_fake(&mut guard)?;
    let http = reqwest::Client::new();
    let nsym = args.fill_symbols.max(1);
    let names: Vec<String> = (0..nsym).map(|k| format!("FILL{k}USDT")).collect();
    let mut amounts: Vec<u64> = vec![0; nsym];
    let rows = |amounts: &[u64]| {
        Value::Array(
            names
                .iter()
                .zip(amounts)
                .map(|(s, a)| json!({"symbol": s, "positionAmt": a.to_string(), "entryPrice": "100"}))
                .collect(),
        )
    };
    http.post(format!("http://{fake}/control/positions"))
        .body(rows(&amounts).to_string())
        .send()
        .await?;
    let plan_rate = if args.rate > 0.0 { args.rate } else { 50.0 };
    let mut phases = serde_json::Map::new();
    let daemon = std::env::current_exe()?.with_file_name("position-state-brain");
    let mut seq = 0u64;
    for (phase, stream) in [("stream", "on"), ("poll", "off")] {
        let log_path = dir.join(format!("daemon-{phase}.log"));
        let log = std::fs::File::create(&log_path)?;
        let mut child = Command::new(&daemon)
            .env_clear()
            .env("REDIS_URL", &url)
            .envs(exchange_env(&fake))
            .env("P33_POSITION_STREAM", stream)
            .env("P33_ALLOWLIST_SOURCE", "env")
            .env("P33_ALLOWLIST", names.join(","))
            .env("P33_METRICS_ADDR", "127.0.0.1")
            .env("P33_METRICS_PORT", "0")
            .env("P33_LOG_LEVEL", &args.log_level)
            .env("P33_CONSUMER_NAME", format!("p33-bench-{phase}"))
            .envs(args.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let metrics_line = wait_log(&log_path, "metrics listening on http://").await?;
        let metrics_addr = metrics_line
            .rsplit("http://")
            .next()
            .unwrap_or_default()
            .trim()
            .to_string();
        wait_log(&log_path, "ready: reading plans").await?;
        if stream == "on" {
            wait_log(&log_path, "position stream: live").await?;
        }
        // The snapshot amounts as they are written, by symbol.
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let seen: Arc<Mutex<Vec<f64>>> = Arc::new(Mutex::new(Vec::new()));
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub
            .psubscribe(format!("__keyspace@0__:{}*", keys::snapshot("")))
            .await?;
        let (pend, seen2) = (pending.clone(), seen.clone());
        let mut rcon = client.get_multiplexed_async_connection().await?;
        let listener = tokio::spawn(async move {
            let mut msgs = pubsub.on_message();
            while let Some(msg) = msgs.next().await {
                let at = Instant::now();
                let ch = msg.get_channel_name().to_string();
                let Some(key) = ch.split_once(':').map(|(_, k)| k.to_string()) else {
                    continue;
                };
                let sym = key.rsplit(':').next().unwrap_or_default().to_string();
                let amt: Option<String> = redis::cmd("HGET")
                    .arg(&key)
                    .arg("position_amt")
                    .query_async(&mut rcon)
                    .await
                    .unwrap_or(None);
                let Some(amt) = amt.and_then(|a| a.parse::<u64>().ok()) else {
                    continue;
                };
                let mut p = pend.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(q) = p.get_mut(&sym) {
                    let mut s = seen2.lock().unwrap_or_else(|e| e.into_inner());
                    q.retain(|(want, t0)| {
                        if amt >= *want {
                            s.push(at.duration_since(*t0).as_secs_f64() * 1000.0);
                            false
                        } else {
                            true
                        }
                    });
                }
            }
        });
        // Plans meanwhile: closes on the fill symbols.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sender = {
            let mut pcon = client.get_multiplexed_async_connection().await?;
            let (stop, names) = (stop.clone(), names.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let due = started + Duration::from_secs_f64(i as f64 / plan_rate);
                    tokio::time::sleep_until(due.into()).await;
                    let sym = &names[(i as usize) % names.len()];
                    let _: Result<String, _> = redis::cmd("XADD")
                        .arg(keys::PLAN_STREAM)
                        .arg("*")
                        .arg("plan_id")
                        .arg(format!("fill-plan-{i}-{}", started.elapsed().as_nanos()))
                        .arg("symbol")
                        .arg(sym)
                        .arg("decision")
                        .arg("EXECUTE")
                        .arg("action")
                        .arg("FULL_CLOSE_PROPOSED")
                        .arg("reduceOnly")
                        .arg("true")
                        .query_async(&mut pcon)
                        .await;
                    i += 1;
                }
            })
        };
        let started = Instant::now();
        for i in 0..args.fills {
            let due = started + Duration::from_secs_f64(i as f64 / args.fill_rate.max(0.1));
            tokio::time::sleep_until(due.into()).await;
            let k = i % nsym;
            seq += 1;
            amounts[k] = seq;
            pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(names[k].clone())
                .or_default()
                .push((seq, Instant::now()));
            http.post(format!("http://{fake}/control/positions"))
                .body(rows(&amounts).to_string())
                .send()
                .await?;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline
            && pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .any(|q| !q.is_empty())
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = sender.await;
        listener.abort();
        let scrape = http
            .get(format!("http://{metrics_addr}/metrics"))
            .send()
            .await?
            .text()
            .await?;
        let _ = child.kill();
        let _ = child.wait();
        let missing: usize = pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(Vec::len)
            .sum();
        let mut lat = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        lat.sort_by(|a, b| a.total_cmp(b));
        let (age_p99, age_within) =
            histogram(&scrape, "p33_decision_input_age_seconds", 0.99, "1.1");
        let (age_p50, _) = histogram(&scrape, "p33_decision_input_age_seconds", 0.5, "1.1");
        let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
        phases.insert(
            phase.to_string(),
            json!({
                "P33_POSITION_STREAM": stream,
                "fills_timed": lat.len(),
                "missing": missing,
                "p50_ms": r3(pct(&lat, 0.5)),
                "p99_ms": r3(pct(&lat, 0.99)),
                "max_ms": r3(lat.last().copied().unwrap_or(f64::NAN)),
                "decision_input_age_p50_s": r3(age_p50),
                "decision_input_age_p99_s": r3(age_p99),
                "decision_input_age_share_le_1_1s": r3(age_within),
            }),
        );
    }
    let out = json!({
        "mode": "positions",
        "fills": args.fills,
        "fill_rate_per_s": args.fill_rate,
        "fill_symbols": nsym,
        "plans_per_s": plan_rate,
        "env": args.env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        "stream": phases.get("stream"),
        "poll": phases.get("poll"),
    });
    println!("{out}");
    drop(guard);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `--events N`: N plans flat out while fills flow through the stream,
/// with `P33_POSITION_EVENTS` on, off, off, on; each fill timed from the
/// call that makes it to its `kind=position` entry.
async fn events_mode(args: &Args) -> anyhow::Result<()> {
    let mut guard = Guard(Vec::new());
    let (dir, url, client, mut con) = private_redis(&mut guard).await?;
    let fake = start_fake(&mut guard)?;
    let http = reqwest::Client::new();
    let nsym = args.fill_symbols.max(1);
    let names: Vec<String> = (0..nsym).map(|k| format!("FILL{k}USDT")).collect();
    let rows: Vec<Value> = names
        .iter()
        .map(|s| json!({"symbol": s, "positionAmt": "1", "entryPrice": "100"}))
        .collect();
    http.post(format!("http://{fake}/control/positions"))
        .body(Value::Array(rows).to_string())
        .send()
        .await?;
    let daemon = match &args.daemon {
        Some(d) => d.clone(),
        None => std::env::current_exe()?.with_file_name("position-state-brain"),
    };
    let mut seq = 1u64;
    let mut runs = Vec::new();
    let mut lat_all: Vec<f64> = Vec::new();
    for (n, events) in ["on", "off", "off", "on"].into_iter().enumerate() {
        let _: () = redis::cmd("FLUSHALL").query_async(&mut con).await?;
        let log_path = dir.join(format!("daemon-events-{n}.log"));
        let log = std::fs::File::create(&log_path)?;
        let mut child = Command::new(&daemon)
            .env_clear()
            .env("REDIS_URL", &url)
            .envs(exchange_env(&fake))
            .env("P33_POSITION_STREAM", "on")
            .env("P33_POSITION_EVENTS", events)
            .env("P33_ALLOWLIST_SOURCE", "env")
            .env("P33_ALLOWLIST", names.join(","))
            .env("P33_METRICS_ADDR", "127.0.0.1")
            .env("P33_METRICS_PORT", "0")
            .env("P33_LOG_LEVEL", &args.log_level)
            .env("P33_CONSUMER_NAME", format!("p33-bench-events-{n}"))
            .envs(args.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        wait_log(&log_path, "ready: reading plans").await?;
        wait_log(&log_path, "position stream: live").await?;
        // Each fill's (symbol, amount after) → when it was made; the
        // kind=position entries as they land.
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let seen: Arc<Mutex<Vec<f64>>> = Arc::new(Mutex::new(Vec::new()));
        let entries = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let reader = {
            let mut rcon = client.get_multiplexed_async_connection().await?;
            let (pend, seen, entries) = (pending.clone(), seen.clone(), entries.clone());
            tokio::spawn(async move {
                let mut last = "0-0".to_string();
                loop {
                    let r: redis::RedisResult<redis::streams::StreamReadReply> =
                        redis::cmd("XREAD")
                            .arg("BLOCK")
                            .arg(200)
                            .arg("STREAMS")
                            .arg(keys::POSITIONS_STREAM)
                            .arg(&last)
                            .query_async(&mut rcon)
                            .await;
                    let Ok(reply) = r else { continue };
                    let at = Instant::now();
                    for k in reply.keys {
                        for id in k.ids {
                            last = id.id.clone();
                            let field = |f: &str| id.get::<String>(f).unwrap_or_default();
                            if field("kind") != "position" {
                                continue;
                            }
                            entries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Ok(amt) = field("to_amt").parse::<u64>() else {
                                continue;
                            };
                            let mut p = pend.lock().unwrap_or_else(|e| e.into_inner());
                            if let Some(q) = p.get_mut(&field("symbol")) {
                                let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
                                q.retain(|(want, t0)| {
                                    if *want == amt {
                                        s.push(at.duration_since(*t0).as_secs_f64() * 1000.0);
                                        false
                                    } else {
                                        true
                                    }
                                });
                            }
                        }
                    }
                }
            })
        };
        // Fills at --fill-rate: a stop or an order of the executor's, in
        // turn, each moving one symbol's amount up by one.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let filler = {
            let (stop, names, pending, http, fake) = (
                stop.clone(),
                names.clone(),
                pending.clone(),
                http.clone(),
                fake.clone(),
            );
            let rate = args.fill_rate.max(0.1);
            let first = seq;
            tokio::spawn(async move {
                let started = Instant::now();
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let due = started + Duration::from_secs_f64(i as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                    let sym = names[(i as usize) % names.len()].clone();
                    let amt = first + i + 1;
                    pending
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .entry(sym.clone())
                        .or_default()
                        .push((amt, Instant::now()));
                    let cause = if i.is_multiple_of(2) { "stop" } else { "order" };
                    let _ = http
                        .post(format!("http://{fake}/control/stream"))
                        .body(
                            json!({"order": {"symbol": sym, "side": "BUY", "qty": "1",
                                             "price": "100", "amount_after": amt.to_string(),
                                             "cause": cause}})
                            .to_string(),
                        )
                        .send()
                        .await;
                    i += 1;
                }
                i
            })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        // The plans, flat out: closes on the fill symbols.
        let started = Instant::now();
        let mut pcon = client.get_multiplexed_async_connection().await?;
        for chunk in (0..args.events).collect::<Vec<_>>().chunks(500) {
            let mut p = redis::pipe();
            for i in chunk {
                p.cmd("XADD")
                    .arg(keys::PLAN_STREAM)
                    .arg("*")
                    .arg("plan_id")
                    .arg(format!("events-{n}-{i}"))
                    .arg("symbol")
                    .arg(&names[i % names.len()])
                    .arg("decision")
                    .arg("EXECUTE")
                    .arg("action")
                    .arg("FULL_CLOSE_PROPOSED")
                    .arg("reduceOnly")
                    .arg("true")
                    .ignore();
            }
            p.query_async::<()>(&mut pcon).await?;
        }
        // Done when the group has read every plan and none is pending.
        let deadline = Instant::now() + Duration::from_secs(600);
        let elapsed = loop {
            let groups: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(keys::PLAN_STREAM)
                .query_async(&mut con)
                .await?;
            let num = |g: &HashMap<String, redis::Value>, k: &str| match g.get(k) {
                Some(redis::Value::Int(n)) => *n,
                _ => -1,
            };
            let done = groups
                .iter()
                .any(|g| num(g, "entries-read") >= args.events as i64 && num(g, "pending") == 0);
            if done {
                break started.elapsed();
            }
            if Instant::now() > deadline {
                anyhow::bail!("the plans were not all finished within 600 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let fills = filler.await.unwrap_or(0);
        seq += fills + 1;
        // The last fills' entries, for up to 5 s.
        let wait_until = Instant::now() + Duration::from_secs(5);
        while events == "on"
            && Instant::now() < wait_until
            && pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .any(|q| !q.is_empty())
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        reader.abort();
        let _ = child.kill();
        let _ = child.wait();
        let mut lat = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        lat.sort_by(|a, b| a.total_cmp(b));
        lat_all.extend(&lat);
        let missing: usize = pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(Vec::len)
            .sum();
        let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
        runs.push(json!({
            "P33_POSITION_EVENTS": events,
            "plans_per_s": (args.events as f64 / elapsed.as_secs_f64()).round(),
            "fills": fills,
            "position_entries": entries.load(std::sync::atomic::Ordering::Relaxed),
            "fills_timed": lat.len(),
            "missing": if events == "on" { missing } else { 0 },
            "p50_ms": r3(pct(&lat, 0.5)),
            "p99_ms": r3(pct(&lat, 0.99)),
            "max_ms": r3(lat.last().copied().unwrap_or(f64::NAN)),
        }));
    }
    let mean = |w: &str| {
        let v: Vec<f64> = runs
            .iter()
            .filter(|r| r["P33_POSITION_EVENTS"] == w)
            .filter_map(|r| r["plans_per_s"].as_f64())
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let (on, off) = (mean("on"), mean("off"));
    lat_all.sort_by(|a, b| a.total_cmp(b));
    let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
    let out = json!({
        "mode": "position_events",
        "plans_per_phase": args.events,
        "fill_rate_per_s": args.fill_rate,
        "fill_symbols": nsym,
        "env": args.env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        "runs": runs,
        "plans_per_s_on": on.round(),
        "plans_per_s_off": off.round(),
        "on_over_off": r3(on / off),
        "fill_to_entry_p50_ms": r3(pct(&lat_all, 0.5)),
        "fill_to_entry_p99_ms": r3(pct(&lat_all, 0.99)),
        "fill_to_entry_max_ms": r3(lat_all.last().copied().unwrap_or(f64::NAN)),
    });
    println!("{out}");
    drop(guard);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `--halt N`: N allows indexed (10 symbols, half of them opens), the
/// daemon running, then `ctl halt` while another client pings.
async fn halt_mode(args: &Args) -> anyhow::Result<()> {
    let n = args.halt;
    let mut guard = Guard(Vec::new());
    let (dir, url, client, mut con) = private_redis(&mut guard).await?;
    let expiry = position_state_brain::store::now_ms() + 600_000;
    let seeded = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(10_000) {
        let mut p = redis::pipe();
        for &i in chunk {
            let sym = format!("S{}USDT", i % 10);
            let plan = format!("bulk-{i}");
            let open = i % 2 == 0;
            let body = json!({"allow": true, "plan_id": plan, "symbol": sym, "safe_qty": 0,
                "safe_close_qty": 0, "exchange_position_amt": 0, "ledger_amt": 0,
                "reason": if open { "open_permit_granted" } else { "sanity_checks_passed" },
                "created_at": 1.0});
            p.cmd("SET")
                .arg(keys::permit(&plan))
                .arg(body.to_string())
                .arg("PX")
                .arg(600_000)
                .ignore();
            p.cmd("ZADD")
                .arg(keys::ALLOWS)
                .arg(expiry)
                .arg(format!("{sym}|{plan}"))
                .ignore();
            p.cmd("ZADD")
                .arg(keys::allows_symbol(&sym))
                .arg(expiry)
                .arg(&plan)
                .ignore();
            if open {
                p.cmd("ZADD")
                    .arg(keys::ALLOWS_OPENS)
                    .arg(expiry)
                    .arg(format!("{sym}|{plan}"))
                    .ignore();
                p.cmd("ZADD")
                    .arg(keys::allows_symbol_opens(&sym))
                    .arg(expiry)
                    .arg(&plan)
                    .ignore();
            }
        }
        let _: () = p.query_async(&mut con).await?;
    }
    let seeded = seeded.elapsed();
    let _: () = redis::cmd("SET")
        .arg(keys::ARMED)
        .arg("bench")
        .query_async(&mut con)
        .await?;
    let bin = match &args.daemon {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name("position-state-brain"),
    };
    let env: Vec<(&str, String)> = vec![
        ("REDIS_URL", url.clone()),
        ("P33_METRICS_PORT", "0".into()),
        ("P33_METRICS_ADDR", "127.0.0.1".into()),
        ("P33_SNAPSHOT_SOURCE", "external".into()),
        ("P33_ALLOWLIST_SOURCE", "env".into()),
        ("P33_ALLOWLIST", "S0USDT".into()),
        ("P33_CONSUMER_NAME", "bench".into()),
        ("P33_LOG_LEVEL", "INFO".into()),
        ("P33_EXCHANGE_BASE_URL", "http://127.0.0.1:9".into()),
    ];
    let log = dir.join("daemon.log");
    let mut cmd = Command::new(&bin);
    cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::create(dir.join("daemon.err"))?);
    guard.0.push(cmd.spawn()?);
    wait_log(&log, "ready: reading plans").await?;
    for (k, v) in [
        ("slowlog-log-slower-than", "0"),
        ("slowlog-max-len", "1000000"),
    ] {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(k)
            .arg(v)
            .query_async(&mut con)
            .await?;
    }
    let _: () = redis::cmd("SLOWLOG")
        .arg("RESET")
        .query_async(&mut con)
        .await?;
    // Another client: one PING at a time, the worst wait kept.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pinger = {
        let stop = stop.clone();
        let mut pcon = client.get_multiplexed_async_connection().await?;
        // A PING answered BUSY (a script holds Redis) is asked again: the
        // wait counts until one is answered.
        tokio::spawn(async move {
            let (mut worst, mut pings, mut busy) = (Duration::ZERO, 0u64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let at = Instant::now();
                loop {
                    let r: redis::RedisResult<String> =
                        redis::cmd("PING").query_async(&mut pcon).await;
                    match r {
                        Ok(_) => break,
                        Err(_) => {
                            busy += 1;
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                }
                worst = worst.max(at.elapsed());
                pings += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            (worst, pings, busy)
        })
    };
    let started = Instant::now();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(&bin)
            .args(["ctl", "halt", "--reason", "bench"])
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
    })
    .await??;
    let ctl_s = started.elapsed().as_secs_f64();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    // The revocation is done when its confirmation is on the control stream.
    let revoked_s = loop {
        let v: redis::Value = match redis::cmd("XRANGE")
            .arg(keys::CONTROL_STREAM)
            .arg("-")
            .arg("+")
            .query_async(&mut con)
            .await
        {
            Ok(v) => v,
            // BUSY while one script walks them all (an older build).
            Err(e) if e.code() == Some("BUSY") => redis::Value::Nil,
            Err(e) => return Err(e.into()),
        };
        let done = position_state_brain::stream::parse_entries(&v)
            .into_iter()
            .filter_map(|e| e.fields)
            .any(|f| f.contains_key("ref"));
        if done {
            break started.elapsed().as_secs_f64();
        }
        if started.elapsed() > Duration::from_secs(300) {
            anyhow::bail!("no confirmation within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (worst, pings, busy) = pinger.await?;
    // Each script call of the revocation (its marker key is among its keys).
    let slow: redis::Value = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(1_000_000)
        .query_async(&mut con)
        .await?;
    let mut calls: Vec<f64> = Vec::new();
    if let redis::Value::Array(entries) = slow {
        for e in entries {
            let redis::Value::Array(f) = e else { continue };
            let (Some(redis::Value::Int(us)), Some(redis::Value::Array(cmd_args))) =
                (f.get(2), f.get(3))
            else {
                continue;
            };
            let words: Vec<String> = cmd_args
                .iter()
                .filter_map(|a| match a {
                    redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
                    _ => None,
                })
                .collect();
            let marker = keys::revoked_marker("");
            if words.iter().any(|w| w.starts_with(&marker)) {
                calls.push(*us as f64 / 1000.0);
            }
        }
    }
    calls.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        calls
            .get(((calls.len() as f64 * q).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!(
        "{}",
        json!({
            "mode": "halt",
            "allows": n,
            "seed_s": seeded.as_secs_f64(),
            "ctl_s": ctl_s,
            "revocation_s": revoked_s,
            "script_calls": calls.len(),
            "script_ms_max": pick(1.0),
            "script_ms_p99": pick(0.99),
            "script_ms_total": calls.iter().sum::<f64>(),
            "ping_worst_ms": worst.as_secs_f64() * 1000.0,
            "pings": pings,
            "ping_busy_replies": busy,
            "ctl_said": said.lines().filter(|l| l.contains("revok")).collect::<Vec<_>>().join(" | "),
        })
    );
    drop(guard);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    if args.fills > 0 {
        return fills_mode(&args).await;
    }
    if args.halt > 0 {
        return halt_mode(&args).await;
    }
    if args.events > 0 {
        return events_mode(&args).await;
    }
    let plans = args.plans;
    let rate = args.rate;
    let symbols = args.symbols.max(2) & !1;
    let log_level = args.log_level;
    let extra_env = args.env;
    let null = args.null;

    let port = free_port()?;
    let dir = std::env::temp_dir().join(format!("p33-bench-{port}"));
    std::fs::create_dir_all(&dir)?;
    let mut guard = Guard(Vec::new());
    let mut acl_args = Vec::new();
    if args.acl {
        // The gate's users, each with the password "bench-<user>".
        let mut text = String::new();
        for (user, rules) in position_state_brain::acl::USERS {
            let pw = position_state_brain::config::Secret::new(format!("bench-{user}"));
            text.push_str(&position_state_brain::acl::user_line(
                user,
                rules,
                Some(&pw),
            ));
            text.push('\n');
        }
        let path = dir.join("users.acl");
        std::fs::write(&path, text)?;
        acl_args = vec!["--aclfile".to_string(), path.to_string_lossy().into_owned()];
    }
    guard.0.push(redis_server(port, &dir, &acl_args)?);
    let url = format!("redis://127.0.0.1:{port}/0");
    let redis_env: Vec<(&str, String)> = if args.sentinel {
        let sport = free_port()?;
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {sport}\nbind 127.0.0.1\ndir {}\nsentinel monitor p33bench 127.0.0.1 {port} 1\n",
                dir.display()
            ),
        )?;
        guard.0.push(
            Command::new("redis-server")
                .arg(&conf)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .spawn()?,
        );
        vec![
            ("REDIS_SENTINELS", format!("127.0.0.1:{sport}")),
            ("REDIS_SENTINEL_MASTER", "p33bench".to_string()),
        ]
    } else {
        vec![("REDIS_URL", url.clone())]
    };
    let client = redis::Client::open(url.as_str())?;
    let mut con = loop {
        if let Ok(c) = client.get_multiplexed_async_connection().await {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg("K$")
        .query_async(&mut con)
        .await?;

    // Universe and snapshots.
    let now = position_state_brain::store::now_epoch();
    let names: Vec<String> = (0..symbols).map(|k| format!("SYM{k}USDT")).collect();
    let doc = json!({"symbols": names, "asof_epoch": now as i64, "source": "bench", "mode": "top", "filters": {}});
    let mut p = redis::pipe();
    p.cmd("SET")
        .arg(keys::UNIVERSE_ACTIVE)
        .arg(doc.to_string())
        .ignore();
    p.cmd("HSET")
        .arg(keys::UNIVERSE_META)
        .arg("stale")
        .arg(0)
        .arg("count")
        .arg(symbols)
        .arg("asof_epoch")
        .arg(now as i64)
        .ignore();
    for (k, s) in names.iter().enumerate() {
        let amt = if k.is_multiple_of(2) { "1.5" } else { "0" };
        p.cmd("HSET")
            .arg(keys::snapshot(s))
            .arg("position_amt")
            .arg(amt)
            .arg("side")
            .arg(if k.is_multiple_of(2) { "LONG" } else { "NONE" })
            .arg("ts_epoch")
            .arg(format!("{now:.3}"))
            .ignore();
    }
    p.query_async::<()>(&mut con).await?;

    if null {
        let _: redis::Value = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(keys::PLAN_STREAM)
            .arg("p33")
            .arg("$")
            .arg("MKSTREAM")
            .query_async(&mut con)
            .await?;
        let ncon = client.get_multiplexed_async_connection().await?;
        let universe = names.iter().cloned().collect();
        tokio::spawn(null_consumer(ncon, universe));
    } else {
        let daemon = std::env::current_exe()?.with_file_name("position-state-brain");
        let mut mode_env = vec![
            ("P33_SNAPSHOT_SOURCE".to_string(), "external".to_string()),
            (
                "P33_EXCHANGE_BASE_URL".to_string(),
                format!("http://127.0.0.1:{}", free_port()?),
            ),
        ];
        if args.exchange {
            // The fake exchange holds what the seeded snapshots said: even
            // symbols long 1.5, odd ones flat.
            let fake = start_fake(&mut guard)?;
            let rows: Vec<Value> = names
                .iter()
                .enumerate()
                .filter(|(k, _)| k.is_multiple_of(2))
                .map(|(_, s)| json!({"symbol": s, "positionAmt": "1.5"}))
                .collect();
            reqwest::Client::new()
                .post(format!("http://{fake}/control/positions"))
                .body(Value::Array(rows).to_string())
                .send()
                .await?;
            mode_env = exchange_env(&fake);
        }
        if args.acl {
            mode_env.push(("REDIS_USERNAME".into(), "p33".into()));
            mode_env.push(("REDIS_PASSWORD".into(), "bench-p33".into()));
        }
        for k in 0..args.instances {
            let log = std::fs::File::create(dir.join(format!("daemon-{k}.log")))?;
            guard.0.push(
                Command::new(&daemon)
                    .env_clear()
                    .envs(redis_env.iter().map(|(k, v)| (*k, v.as_str())))
                    .envs(mode_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                    .env("P33_METRICS_ADDR", "127.0.0.1")
                    .env("P33_METRICS_PORT", "0")
                    .env("P33_STALE_THRESHOLD_SEC", "600")
                    .env("P33_PLAN_MAX_AGE_S", "600")
                    .env("P33_PERMIT_TTL", "600")
                    .env("P33_COOLDOWN_SEC", "0")
                    .env("P33_LOG_LEVEL", &log_level)
                    .env("P33_CONSUMER_NAME", format!("p33-bench-{k}"))
                    .envs(extra_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                    .stdout(log.try_clone()?)
                    .stderr(log)
                    .spawn()?,
            );
        }
        // Ready once the group exists and the allowlist line was logged.
        for k in 0..args.instances {
            let log_path = dir.join(format!("daemon-{k}.log"));
            let start_wait = Instant::now();
            loop {
                let text = std::fs::read_to_string(&log_path).unwrap_or_default();
                if text.contains("ready: reading plans") {
                    break;
                }
                if start_wait.elapsed() > Duration::from_secs(30) {
                    anyhow::bail!("daemon {k} did not become ready:\n{text}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    // Permit arrivals, by plan id.
    let arrivals: Arc<Mutex<HashMap<String, (Instant, u32)>>> =
        Arc::new(Mutex::new(HashMap::new()));
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub
        .psubscribe(format!("__keyspace@0__:{}*", keys::PERMIT_PREFIX))
        .await?;
    let arr = arrivals.clone();
    let listener = tokio::spawn(async move {
        let mut stream = pubsub.on_message();
        while let Some(msg) = stream.next().await {
            let t = Instant::now();
            let payload: String = msg.get_payload().unwrap_or_default();
            if payload != "set" {
                continue;
            }
            let ch = msg.get_channel_name();
            if let Some(id) = ch.rsplit(keys::PERMIT_PREFIX).next() {
                let mut a = arr.lock().unwrap_or_else(|p| p.into_inner());
                let e = a.entry(id.to_string()).or_insert((t, 0));
                e.1 += 1;
            }
        }
    });

    let mut expected: HashMap<String, Expect> = HashMap::with_capacity(plans);
    let mut sent: HashMap<String, Instant> = HashMap::with_capacity(plans);
    let started = Instant::now();
    // Paced runs send one batch per millisecond, so high offered rates are
    // not limited by one round trip per plan.
    let chunk = if rate > 0.0 {
        ((rate / 1000.0).ceil() as usize).max(1)
    } else {
        200
    };
    let mut i = 0;
    while i < plans {
        let n = chunk.min(plans - i);
        let mut p = redis::pipe();
        let mut ids = Vec::with_capacity(n);
        for j in i..i + n {
            let (id, fields, exp) = make_plan(j, symbols);
            let mut c = redis::cmd("XADD");
            c.arg(keys::PLAN_STREAM).arg("*");
            for (k, v) in &fields {
                c.arg(*k).arg(v);
            }
            p.add_command(c).ignore();
            expected.insert(id.clone(), exp);
            ids.push(id);
        }
        if rate > 0.0 {
            let due = started + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let t = Instant::now();
        p.query_async::<()>(&mut con).await?;
        for id in ids {
            sent.insert(id, t);
        }
        i += n;
    }
    let want = expected
        .values()
        .filter(|e| matches!(e, Expect::Permit(..)))
        .count();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = arrivals.lock().unwrap_or_else(|p| p.into_inner()).len();
        if got >= want || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    listener.abort();
    let arrivals = arrivals.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let last = arrivals.values().map(|(t, _)| *t).max().unwrap_or(started);
    let elapsed = last.duration_since(started).as_secs_f64();

    // Check every permit: present once, right allow/deny and reason.
    let mut missing = 0usize;
    let mut unexpected = 0usize;
    let ids: Vec<&String> = expected.keys().collect();
    for batch in ids.chunks(1000) {
        let mut p = redis::pipe();
        for id in batch {
            p.cmd("GET").arg(keys::permit(id));
        }
        let vals: Vec<Option<String>> = p.query_async(&mut con).await?;
        for (id, v) in batch.iter().zip(vals) {
            let count = arrivals.get(*id).map_or(0, |a| a.1);
            match (expected[*id], v) {
                (Expect::Nothing, None) => {}
                (Expect::Nothing, Some(_)) => unexpected += 1,
                (Expect::Permit(..), None) => missing += 1,
                (Expect::Permit(allow, reason), Some(s)) => {
                    let j: Value = serde_json::from_str(&s).unwrap_or(Value::Null);
                    // The null consumer writes a placeholder: only count it.
                    let wrong = !null && (j["allow"] != allow || j["reason"] != reason);
                    if wrong || count != 1 {
                        unexpected += 1;
                    }
                }
            }
        }
    }
    let mut lat: Vec<f64> = arrivals
        .iter()
        .filter_map(|(id, (t, _))| Some(t.duration_since(*sent.get(id)?).as_secs_f64() * 1000.0))
        .collect();
    lat.sort_by(|a, b| a.total_cmp(b));
    let out = json!({
        "mode": if rate > 0.0 { "latency" } else { "throughput" },
        "null": (null),
        "instances": if null { 0 } else { args.instances },
        "sentinel": args.sentinel,
        "exchange": args.exchange,
        "acl": args.acl,
        "plans": plans,
        "permits_expected": want,
        "symbols": symbols,
        "offered_per_s": if rate > 0.0 { json!(rate) } else { Value::Null },
        "throughput_per_s": (plans as f64 / elapsed).round(),
        "p50_ms": (pct(&lat, 0.50) * 1000.0).round() / 1000.0,
        "p99_ms": (pct(&lat, 0.99) * 1000.0).round() / 1000.0,
        "max_ms": (lat.last().copied().unwrap_or(f64::NAN) * 1000.0).round() / 1000.0,
        "missing": missing,
        "unexpected": unexpected,
        "log_level": log_level,
        "env": extra_env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
    });
    println!("{out}");
    drop(guard);
    let _ = std::fs::remove_dir_all(&dir);
    if missing > 0 || unexpected > 0 {
        std::process::exit(1);
    }
    Ok(())
}
