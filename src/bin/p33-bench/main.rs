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
//!   p33-bench --events 100000 [--rounds 1] [--fill-rate 20] [--fill-symbols 10]
//!   p33-bench [--plans 100000] [--rate 0] [--symbols 566] [--log-level INFO] [--instances 1] [--sentinel] [--exchange]
//!   p33-bench --fills 300 [--fill-rate 20] [--fill-symbols 10] [--rate 50]
//!   --rate 0 sends as fast as possible (throughput); --rate N offers N plans/s (latency).

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use position_state_brain::redis::keys;
use serde_json::{json, Value};

mod events;
mod fills;
mod halt;
mod support;

use events::events_mode;
use fills::fills_mode;
use halt::halt_mode;
use support::*;

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
    /// `--events` mode: the on, off, off, on phases this many times over
    /// (each phase's throughput on a shared machine varies more than the
    /// events cost; more rounds average it out).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=20))]
    rounds: u16,
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
    use position_state_brain::redis::stream::parse_xread;
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
        for (user, rules) in position_state_brain::operator::acl::USERS {
            let pw = position_state_brain::config::Secret::new(format!("bench-{user}"));
            text.push_str(&position_state_brain::operator::acl::user_line(
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
    let now = position_state_brain::redis::store::now_epoch();
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
