//! `position-state-brain ctl`: the operator's kill switch (SPEC §12), run
//! with the daemon's own environment.
//!
//! `ctl status [--json]` prints the global trading state, every symbol
//! override, each running instance as it reports itself (its own allowlist,
//! mode, pending entries, last plan, Redis master), whether
//! the throttle latch holds the state, and the last 10 control entries.
//! `ctl halt|reduce|resume [--symbol S] --reason TEXT` changes the state:
//! one transaction of the key and its control entry. Exit 0 on success, 1
//! when Redis cannot be reached (one line), 64 on a usage error (clap), 78
//! on a bad configuration (like the daemon).

use std::time::Duration;

use serde_json::json;

use crate::config::Config;
use crate::operator::control::{self, Change, ControlEntry, States};
use crate::redis::store;
use crate::text::clip;

/// `ctl`'s arguments.
#[derive(Debug, clap::Args)]
pub struct CtlArgs {
    /// What to do.
    #[command(subcommand)]
    pub verb: Verb,
}

/// A `ctl` verb.
#[derive(Debug, clap::Subcommand)]
pub enum Verb {
    /// Print the trading state, overrides, the running instances, latch and the
    /// last 10 control entries.
    Status {
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Kill switch: every allow (reconcile closes too) becomes a deny.
    Halt(ChangeArgs),
    /// Reduce only: opens are denied; closes go on.
    Reduce(ChangeArgs),
    /// Back to ACTIVE (global), or remove a symbol's override.
    Resume(ChangeArgs),
}

/// The arguments of a change.
#[derive(Debug, clap::Args)]
pub struct ChangeArgs {
    /// One symbol instead of the global state, upper-cased like the
    /// allowlist (checked after parsing, so that a bad value is not echoed
    /// whole).
    #[arg(long)]
    pub symbol: Option<String>,
    /// Why (recorded in the control entry; required, with a word in it).
    #[arg(long, value_parser = parse_reason)]
    pub reason: String,
}

/// Why a `--symbol` is no symbol (the value cut and escaped), if it is not.
fn check_symbol(s: &str) -> Result<(), String> {
    match crate::redis::keys::symbol_problem(s) {
        None => Ok(()),
        Some(why) => Err(format!("{:?} is not a symbol: {why}", clip(s))),
    }
}

/// A reason must say something: blank or empty is a usage error.
fn parse_reason(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        Err("the reason must hold a word (it is recorded in the control entry)".into())
    } else {
        Ok(s.to_string())
    }
}

/// Who made a change: `$SUDO_USER` or `$USER`, `@` the host name.
fn actor() -> String {
    let user = std::env::var("SUDO_USER")
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(|| std::env::var("USER").ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| "unknown".to_string());
    format!("{user}@{}", crate::config::hostname())
}

/// Runs `ctl`; returns the exit code.
pub async fn run(cfg: &Config, mut args: CtlArgs) -> i32 {
    if let Verb::Halt(a) | Verb::Reduce(a) | Verb::Resume(a) = &mut args.verb {
        // Upper-cased like the allowlist: `--symbol solusdt` is SOLUSDT.
        a.symbol = a.symbol.as_deref().map(str::to_ascii_uppercase);
        if let Some(Err(why)) = a.symbol.as_deref().map(check_symbol) {
            eprintln!("ctl: --symbol {why}");
            return 64;
        }
    }
    let mut con = match store::Redis::new(cfg.redis.clone())
        .connect_once(Duration::from_secs(5))
        .await
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ctl: cannot reach Redis at {}: {e}", cfg.redis.display());
            return 1;
        }
    };
    let changing = !matches!(args.verb, Verb::Status { .. });
    let outcome = match args.verb {
        Verb::Status { json } => status(cfg, &mut con, json).await.map(|()| 0),
        Verb::Halt(a) => change(cfg, &mut con, Change::Halt, a).await,
        Verb::Reduce(a) => change(cfg, &mut con, Change::Reduce, a).await,
        Verb::Resume(a) => change(cfg, &mut con, Change::Resume, a).await,
    };
    match outcome {
        Ok(code) => code,
        Err(e) if e.code() == Some(control::CONTROL_ERROR) => {
            eprintln!(
                "ctl: the control entry cannot be written ({}); nothing was changed",
                clip(e.detail().unwrap_or(""))
            );
            1
        }
        Err(e) if e.code() == Some(control::NO_LIBRARY_ERROR) => {
            eprintln!(
                "ctl: {}; nothing was changed. Start a gate (it installs the library within a second), or, while none can run, `ctl halt` works without it",
                clip(e.detail().unwrap_or(""))
            );
            1
        }
        Err(e) if e.code() == Some("NOPERM") => {
            let user = cfg.redis.user_shown();
            let needs = if changing {
                "a change needs the ACL user p33-ops (REDIS_USERNAME=p33-ops)"
            } else {
                "status needs read access to quantum:* (p33-read or p33-ops)"
            };
            eprintln!(
                "ctl: Redis user {user} is not allowed to do this ({}); nothing was changed: {needs}",
                clip(&e.to_string())
            );
            1
        }
        Err(e) => {
            eprintln!("ctl: Redis error: {e}");
            1
        }
    }
}

async fn change(
    cfg: &Config,
    con: &mut crate::redis::store::Conn,
    c: Change,
    a: ChangeArgs,
) -> Result<i32, redis::RedisError> {
    let (e, via) = control::apply_change(
        con,
        c,
        a.symbol.as_deref(),
        &a.reason,
        &actor(),
        cfg.default_trading_state,
    )
    .await?;
    if via == control::Via::PlainHalt {
        println!(
            "note: this Redis has no gate's function library (no gate has connected since it lost its data): the halt was written with plain commands; the first gate to connect installs the library"
        );
    }
    println!(
        "{} {} -> {} (entry {} in {})",
        e.scope_label(),
        e.from,
        e.to,
        e.id,
        crate::redis::keys::CONTROL_STREAM
    );
    // Where it was written, and whether any gate reads it (SPEC §12): a
    // halt sent to the wrong Redis is never taken for done.
    let at = redis_where(cfg, con).await;
    println!("redis: {at}");
    println!("{}", replicas(con).await);
    let names: Vec<String> = crate::operator::instance::read_all(con)
        .await?
        .ok
        .into_iter()
        .map(|(n, _)| clip(&n).into_owned())
        .collect();
    if names.is_empty() {
        println!(
            "WARNING: no running gate reads {}: no instance reported in the last 15 s; the change is written there, but nothing enforces it",
            redis_address(cfg, con)
        );
        return Ok(EXIT_NO_GATE);
    }
    println!(
        "instances: {} (reported in the last 15 s)",
        names.join(", ")
    );
    if c != Change::Resume {
        // The daemon revokes the allows not yet used (SPEC §12); say how
        // many, or that the ones written before stay valid until they expire.
        match confirmation(con, &e.id, REVOKE_WAIT).await? {
            Some(n) => println!("revoked {n} outstanding allows"),
            None => match progress(con, &e.id).await {
                // An instance is walking the allows in bounded steps.
                Some((who, n)) => println!(
                    "revoking: {n} so far ({who}, in steps of a few ms); the allows not yet revoked stay valid until revoked or expired (at most P33_PERMIT_TTL={} s); the change itself is in force",
                    cfg.permit_ttl.as_secs()
                ),
                None => println!(
                    "no running instance confirmed the revocation within {} s: the allows written before this change stay valid until they expire (at most P33_PERMIT_TTL={} s); the change itself is in force",
                    REVOKE_WAIT.as_secs(),
                    cfg.permit_ttl.as_secs()
                ),
            },
        }
    }
    Ok(0)
}

/// What the revocation of control entry `id` has done so far: the walking
/// instance and its count, from the marker it keeps (`<consumer> <n>`).
async fn progress(con: &mut crate::redis::store::Conn, id: &str) -> Option<(String, u64)> {
    let m: Option<String> = redis::cmd("GET")
        .arg(crate::redis::keys::revoked_marker(id))
        .query_async(con)
        .await
        .ok()
        .flatten();
    let m = m?;
    let mut words = m.split(' ');
    let who = clip(words.next()?).into_owned();
    let n = words.next()?.parse().ok()?;
    Some((who, n))
}

/// `ctl`'s exit code for a change written where no instance reported in
/// the last 15 s (SPEC §12).
pub const EXIT_NO_GATE: i32 = 3;

/// The Redis a command used, as `host:port/db` (never a password).
fn redis_address(cfg: &Config, con: &crate::redis::store::Conn) -> String {
    let shown = con.node_shown();
    let bare = shown
        .split_once("://")
        .map_or(shown, |(_, rest)| rest)
        .rsplit('@')
        .next()
        .unwrap_or(shown);
    // From the environment: cut and escaped like any echo (SPEC §11).
    let bare = clip(bare);
    if bare.contains('/') || bare.contains("?db=") {
        bare.into_owned()
    } else {
        format!("{bare}/{}", cfg.redis.db())
    }
}

/// `host:port/db (role, user U)`: where `ctl` wrote or read.
async fn redis_where(cfg: &Config, con: &mut crate::redis::store::Conn) -> String {
    let role: Result<redis::Value, _> = redis::cmd("ROLE").query_async(con).await;
    let role = match role {
        Ok(redis::Value::Array(v)) => match v.first() {
            Some(redis::Value::BulkString(b)) => clip(&String::from_utf8_lossy(b)).into_owned(),
            _ => "role unknown".into(),
        },
        _ => "role unknown".into(),
    };
    format!(
        "{} ({role}, user {})",
        redis_address(cfg, con),
        cfg.redis.user_shown()
    )
}

/// How long `ctl` waits for its change to reach the replicas (SPEC §12).
const REPLICA_WAIT: Duration = Duration::from_secs(1);

/// Waits up to [`REPLICA_WAIT`] for the change to reach every connected
/// replica (`WAIT`) and says how many of how many acknowledged it: a
/// failover to a replica that never had the change would lose it (the
/// daemons restore what they knew, but say so here too).
async fn replicas(con: &mut crate::redis::store::Conn) -> String {
    let info: Result<String, _> = redis::cmd("INFO").arg("replication").query_async(con).await;
    let connected = info.as_ref().ok().and_then(|i| {
        i.lines()
            .find_map(|l| l.strip_prefix("connected_slaves:"))
            .and_then(|n| n.trim().parse::<u64>().ok())
    });
    let Some(n) = connected else {
        return format!(
            "replicas: unknown ({})",
            info.err().map_or_else(
                || "no count in INFO".into(),
                |e| clip(&e.to_string()).into_owned()
            )
        );
    };
    if n == 0 {
        return "replicas: none connected (the change is on the master only: persistence must keep it)".into();
    }
    let acked: Result<u64, _> = redis::cmd("WAIT")
        .arg(n)
        .arg(REPLICA_WAIT.as_millis() as u64)
        .query_async(con)
        .await;
    match acked {
        Ok(a) if a >= n => format!("replicas: {a} of {n} acknowledged the change"),
        Ok(a) => format!(
            "replicas: {a} of {n} acknowledged the change within {} s (a failover now may lose it; the running gates restore what they know)",
            REPLICA_WAIT.as_secs()
        ),
        Err(e) => format!("replicas: {n} connected, WAIT failed: {}", clip(&e.to_string())),
    }
}

/// How long `ctl halt|reduce` waits for the revocation's confirmation.
const REVOKE_WAIT: Duration = Duration::from_secs(2);

/// The `revoked` count of the confirmation entry of control entry `id`,
/// read from the control stream until `wait` has passed.
async fn confirmation(
    con: &mut crate::redis::store::Conn,
    id: &str,
    wait: Duration,
) -> Result<Option<u64>, redis::RedisError> {
    let end = std::time::Instant::now() + wait;
    let mut last = id.to_string();
    loop {
        let left = end.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        let v: redis::Value = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(100)
            .arg("BLOCK")
            .arg(left.as_millis().max(1) as u64)
            .arg("STREAMS")
            .arg(crate::redis::keys::CONTROL_STREAM)
            .arg(&last)
            .query_async(con)
            .await?;
        for entry in crate::redis::stream::parse_xread(&v) {
            last = entry.id.clone();
            let Some(f) = entry.fields else { continue };
            if f.get("ref").map(String::as_str) == Some(id) {
                return Ok(Some(
                    f.get("revoked").and_then(|n| n.parse().ok()).unwrap_or(0),
                ));
            }
        }
    }
}

async fn status(
    cfg: &Config,
    con: &mut crate::redis::store::Conn,
    as_json: bool,
) -> Result<(), redis::RedisError> {
    let states = control::read_states(con, cfg.default_trading_state).await?;
    let entries = control::last_entries(con, 10).await?;
    // Each running instance's own view, never an allowlist resolved from
    // ctl's environment (SPEC §12).
    let reports = crate::operator::instance::read_all(con).await?;
    let instances = reports.ok;
    let latch = control::latch_tripped(con, states.global).await?;
    let at = redis_where(cfg, con).await;
    if as_json {
        let mut v = status_json(&states, &entries, &instances, latch);
        v["redis"] = json!(at);
        v["instance_reports_skipped"] = json!(reports.skipped);
        println!("{v}");
    } else {
        println!("redis           {at}");
        print!("{}", status_text(&states, &entries, &instances, latch, cfg));
        if reports.skipped > 0 {
            println!(
                "                {} instance report key(s) skipped: not well formed (a field missing or out of bounds, not UTF-8, another type)",
                reports.skipped
            );
        }
    }
    Ok(())
}

/// The running instances, by consumer name, as they report themselves.
type Instances = [(String, std::collections::HashMap<String, String>)];

/// One instance in a line of `ctl status` (every value cut and escaped).
fn instance_line(name: &str, f: &std::collections::HashMap<String, String>, now: u64) -> String {
    let g = |k: &str| clip(f.get(k).map_or("?", String::as_str)).into_owned();
    let last = match f.get("last_plan_at").and_then(|v| v.parse::<u64>().ok()) {
        Some(0) | None => "none yet".to_string(),
        Some(t) => format!(
            "{} ({} s ago)",
            crate::text::rfc3339(&t.to_string()),
            now.saturating_sub(t)
        ),
    };
    format!(
        "  {} {} v{} ({}) on {} pid {}: allowlist source={} count={}{} pending={} plans={} last plan {} position_stream={} canonical_positions={} redis_master={}\n",
        clip(name),
        g("mode"),
        g("version"),
        g("commit"),
        g("host"),
        g("pid"),
        g("source"),
        g("count"),
        if f.get("stale").map(String::as_str) == Some("1") {
            " (expired)"
        } else {
            ""
        },
        g("pending"),
        g("plans"),
        last,
        g("position_stream"),
        f.get("canonical_positions").map_or("unknown", String::as_str),
        g("redis_master"),
    )
}

fn status_json(
    s: &States,
    entries: &[ControlEntry],
    instances: &Instances,
    latch: bool,
) -> serde_json::Value {
    let instances: Vec<serde_json::Value> = instances
        .iter()
        .map(|(name, f)| {
            let mut o = serde_json::Map::new();
            o.insert("consumer".into(), json!(clip(name)));
            for (k, v) in f {
                o.insert(clip(k).into_owned(), json!(clip(v)));
            }
            serde_json::Value::Object(o)
        })
        .collect();
    json!({
        "global": s.global.as_str(),
        "global_key_set": s.global_set,
        "overrides": s.overrides.iter().map(|(sym, st)| json!({"symbol": sym, "state": st.as_str()})).collect::<Vec<_>>(),
        "instances": instances,
        "latch_tripped": latch,
        "control": entries,
    })
}

fn status_text(
    s: &States,
    entries: &[ControlEntry],
    instances: &Instances,
    latch: bool,
    cfg: &Config,
) -> String {
    let mut out = String::new();
    let how = if s.global_set {
        "set".to_string()
    } else {
        format!(
            "key missing: P33_DEFAULT_TRADING_STATE={}",
            cfg.default_trading_state.as_str()
        )
    };
    out.push_str(&format!("trading state   {} ({how})\n", s.global.as_str()));
    if s.overrides.is_empty() {
        out.push_str("overrides       none\n");
    } else {
        let list: Vec<String> = s
            .overrides
            .iter()
            .map(|(sym, st)| format!("{sym}={}", st.as_str()))
            .collect();
        out.push_str(&format!("overrides       {}\n", list.join(" ")));
    }
    if instances.is_empty() {
        out.push_str("instances       no instance running\n");
    } else {
        out.push_str(&format!("instances       {} running\n", instances.len()));
        let now = store::now_ms() / 1000;
        for (name, f) in instances {
            out.push_str(&instance_line(name, f, now));
        }
    }
    out.push_str(&format!(
        "throttle latch  {}\n",
        if latch {
            "TRIPPED: the daemon's throttle latch set REDUCING; `ctl resume --reason …` after checking"
        } else {
            "not tripped"
        }
    ));
    if entries.is_empty() {
        out.push_str("control log     (empty)\n");
    } else {
        out.push_str("control log     newest first\n");
        for e in entries {
            if e.is_confirmation() {
                out.push_str(&format!(
                    "  {}  {} revoked {} allows (for {})  by {}\n",
                    crate::text::rfc3339(&e.ts),
                    e.scope_label(),
                    crate::text::clip(&e.revoked),
                    crate::text::clip(&e.reference),
                    crate::text::clip(&e.actor)
                ));
                continue;
            }
            out.push_str(&format!(
                "  {}  {} {} -> {}  {}  by {}\n",
                crate::text::rfc3339(&e.ts),
                e.scope_label(),
                e.from,
                e.to,
                crate::text::clip(&e.reason),
                crate::text::clip(&e.actor)
            ));
        }
    }
    out
}
