//! The verdict is final (issue "The verdict is final"): a foreign permit
//! never stands in for ours, a broken guard key never makes a plan vanish,
//! a value read inside the write script never stalls Redis, and limits
//! configured differently on two instances never shorten each other.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;

const DECISIONS: &str = "quantum:stream:p33.decisions";
const MAX_ID: &str = "18446744073709551615-18446744073709551615";

fn cmd(con: &mut redis::Connection, args: &[&str]) -> redis::RedisResult<redis::Value> {
    let mut c = redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    c.query(con)
}

fn plan(id: &str, symbol: &str, open: bool) -> Vec<(&'static str, String)> {
    let (action, reduce) = if open {
        ("OPEN_LONG", "false")
    } else {
        ("FULL_CLOSE_PROPOSED", "true")
    };
    vec![
        ("plan_id", id.to_string()),
        ("symbol", symbol.to_string()),
        ("decision", "EXECUTE".to_string()),
        ("action", action.to_string()),
        ("reduceOnly", reduce.to_string()),
    ]
}

fn push(con: &mut redis::Connection, id: &str, symbol: &str, open: bool) -> String {
    let f = plan(id, symbol, open);
    let f: Vec<(&str, &str)> = f.iter().map(|(k, v)| (*k, v.as_str())).collect();
    push_plan(con, &f)
}

fn records(con: &mut redis::Connection) -> Vec<HashMap<String, String>> {
    let v = cmd(con, &["XRANGE", DECISIONS, "-", "+"]).unwrap();
    position_state_brain::redis::stream::parse_entries(&v)
        .into_iter()
        .filter_map(|e| e.fields)
        .collect()
}

fn record_of(con: &mut redis::Connection, plan_id: &str) -> HashMap<String, String> {
    wait_for(
        &format!("the record of {plan_id}"),
        Duration::from_secs(10),
        || {
            let r: Vec<_> = records(con)
                .into_iter()
                .filter(|r| r.get("plan_id").map(String::as_str) == Some(plan_id))
                .collect();
            assert!(r.len() <= 1, "one record of {plan_id}: {r:?}");
            r.into_iter().next()
        },
    )
}

/// A daemon with BTCUSDT long and AAAUSDT/BBBUSDT flat, fresh snapshots.
fn daemon(extra: &[(&str, &str)]) -> TestDaemon {
    let mut opts = Opts::env_allowlist("BTCUSDT,AAAUSDT,BBBUSDT")
        .set("P33_STALE_THRESHOLD_SEC", "600")
        .deferred();
    for (k, v) in extra {
        opts = opts.set(k, v);
    }
    let mut t = spawn_daemon(opts);
    let n = now();
    t.snapshot("BTCUSDT", "0.5", n);
    t.snapshot("AAAUSDT", "0", n);
    t.snapshot("BBBUSDT", "0", n);
    t.start_ready();
    t
}

#[test]
fn a_foreign_permit_hash_is_replaced_by_the_verdict_counted_and_logged() {
    let mut t = daemon(&[]);
    // The intent bridge's auto-permit, written before P3.3 decides.
    for id in ["bridge-open", "bridge-close"] {
        let key = format!("quantum:permit:p33:{id}");
        cmd(
            &mut t.con,
            &[
                "HSET",
                &key,
                "allow",
                "true",
                "safe_qty",
                "0",
                "reason",
                "auto_bypass_no_p33",
                "timestamp",
                "1769920000",
            ],
        )
        .unwrap();
        cmd(&mut t.con, &["EXPIRE", &key, "86400"]).unwrap();
    }
    // BTCUSDT holds a position: an open there is denied position_exists.
    push(&mut t.con, "bridge-open", "BTCUSDT", true);
    push(&mut t.con, "bridge-close", "BTCUSDT", false);
    let p = t.wait_permit("bridge-open");
    assert_eq!(
        p["allow"], false,
        "the verdict, not the bridge's allow: {p}"
    );
    assert_eq!(p["reason"], "position_exists", "{p}");
    let p = t.wait_permit("bridge-close");
    assert_eq!(p["reason"], "sanity_checks_passed", "{p}");
    let ttl: i64 = redis::cmd("TTL")
        .arg("quantum:permit:p33:bridge-open")
        .query(&mut t.con)
        .unwrap();
    assert!(
        (1..=60).contains(&ttl),
        "the permit TTL, not the bridge's: {ttl}"
    );
    t.wait_metric("p33_foreign_permits_total{type=\"hash\"}", 2.0);
    t.wait_log(
        "P3.3 replaced a foreign permit plan bridge-o type=hash reason=auto_bypass_no_p33",
        Duration::from_secs(5),
    );
    let r = record_of(&mut t.con, "bridge-open");
    let inputs: Value = serde_json::from_str(&r["inputs"]).unwrap();
    assert_eq!(
        inputs["guards"]["replaced_foreign"], "hash:auto_bypass_no_p33",
        "{inputs}"
    );
    assert_eq!(r["outcome"], "deny");
    // A verdict (a string) is still never overwritten.
    cmd(
        &mut t.con,
        &[
            "SET",
            "quantum:permit:p33:verdict",
            r#"{"allow":false,"reason":"first"}"#,
        ],
    )
    .unwrap();
    push(&mut t.con, "verdict", "BTCUSDT", false);
    let r = record_of(&mut t.con, "verdict");
    assert_eq!(r["outcome"], "duplicate_plan_id");
    assert_eq!(t.permit("verdict").unwrap()["reason"], "first");
    assert_eq!(t.pending("p33"), 0);
}

/// A case: its name, the limits, the key broken and the command breaking it.
type BrokenCase<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str, &'a [&'a str]);

/// Each way a guard key can be broken, with the limits that need it.
#[test]
fn a_broken_counter_or_control_key_denies_opens_naming_it_and_loses_no_plan() {
    let cases: [BrokenCase; 4] = [
        (
            "global throttle as a hash",
            &[("P33_MAX_OPENS", "5/60s")],
            "quantum:p33:opens:60000ms",
            &["HSET", "quantum:p33:opens:60000ms", "a", "b"],
        ),
        (
            "per-symbol throttle as a list",
            &[("P33_MAX_OPENS_PER_SYMBOL", "5/60s")],
            "quantum:p33:opens:60000ms:AAAUSDT",
            &["RPUSH", "quantum:p33:opens:60000ms:AAAUSDT", "x"],
        ),
        (
            "position cap set as a string",
            &[("P33_MAX_OPEN_POSITIONS", "5")],
            "quantum:p33:open_positions",
            &["SET", "quantum:p33:open_positions", "x"],
        ),
        (
            "control stream as a string with the latch on",
            &[("P33_MAX_OPENS", "5/60s"), ("P33_THROTTLE_LATCH", "true")],
            "quantum:stream:p33.control",
            &["SET", "quantum:stream:p33.control", "x"],
        ),
    ];
    for (name, env, key, breaker) in cases {
        let mut t = daemon(env);
        cmd(&mut t.con, &["DEL", breaker[1]]).unwrap();
        cmd(&mut t.con, breaker).unwrap();
        push(&mut t.con, "open-a", "AAAUSDT", true);
        push(&mut t.con, "close-btc", "BTCUSDT", false);
        let p = t.wait_permit("open-a");
        assert_eq!(p["reason"], "invalid_guard_state", "{name}: {p}");
        assert_eq!(p["context"]["key"], key, "{name}: {p}");
        let p = t.wait_permit("close-btc");
        assert_eq!(p["allow"], true, "{name}: exits go on: {p}");
        for id in ["open-a", "close-btc"] {
            record_of(&mut t.con, id);
        }
        let r = record_of(&mut t.con, "open-a");
        assert_eq!(r["reason"], "invalid_guard_state", "{name}: {r:?}");
        assert_eq!(t.pending("p33"), 0, "{name}");
        t.wait_log(
            &format!("reason=invalid_guard_state context={{\"key\":\"{key}\"}}"),
            Duration::from_secs(5),
        );
        t.wait_metric(&format!("p33_guard_key_errors_total{{key=\"{key}\"}}"), 1.0);
        let state: Option<String> = redis::cmd("GET")
            .arg("quantum:p33:trading_state")
            .query(&mut t.con)
            .unwrap();
        assert_eq!(state, None, "{name}: no state change without its entry");
    }
}

#[test]
fn an_unusable_decision_stream_leaves_plans_pending_until_repaired() {
    for (name, breaker) in [
        ("a string", vec!["SET", DECISIONS, "x"]),
        (
            "at its last possible ID",
            vec!["XADD", DECISIONS, MAX_ID, "f", "v"],
        ),
    ] {
        let mut t = daemon(&[]);
        cmd(&mut t.con, &["DEL", DECISIONS]).unwrap();
        cmd(&mut t.con, &breaker).unwrap();
        let from = t.log_count();
        let ids: Vec<String> = (0..30).map(|i| format!("pend-{i}")).collect();
        for id in &ids {
            push(&mut t.con, id, "BTCUSDT", false);
        }
        // The daemon read plans (they are pending on it) and wrote nothing:
        // it retries its pending entries and reads no new ones meanwhile.
        t.wait_log_after(
            from,
            &format!("P3.3 cannot record decisions: {DECISIONS}"),
            Duration::from_secs(10),
        );
        assert!(t.pending("p33") >= 1, "{name}");
        for id in &ids {
            assert!(
                t.permit(id).is_none(),
                "{name}: no permit without its record"
            );
        }
        // Repaired: every plan gets its permit and its record.
        cmd(&mut t.con, &["DEL", DECISIONS]).unwrap();
        for id in &ids {
            assert_eq!(t.wait_permit(id)["allow"], true, "{name}");
        }
        wait_for("the group to drain", Duration::from_secs(10), || {
            (t.pending("p33") == 0).then_some(())
        });
        assert_eq!(records(&mut t.con).len(), 30, "{name}");
    }
}

#[test]
fn a_long_trading_state_value_is_halted_without_stalling_redis() {
    let mut t = daemon(&[]);
    // 51 KB of blanks around a word and one more byte: the old script's
    // trim ('^%s*(.-)%s*$') backtracked through the blanks at every one of
    // them, quadratic, with Redis answering no one meanwhile.
    let value = format!("{}ACTIVE{}x", " ".repeat(25_600), " ".repeat(25_600));
    let _: () = redis::cmd("SET")
        .arg("quantum:p33:trading_state")
        .arg(&value)
        .query(&mut t.con)
        .unwrap();
    let mut other = t.redis.con();
    other
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let start = Instant::now();
    push(&mut t.con, "long-state", "BTCUSDT", false);
    let p = t.wait_permit("long-state");
    assert_eq!(p["reason"], "trading_halted", "{p}");
    let _: String = redis::cmd("PING")
        .query(&mut other)
        .expect("Redis answers another client");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "the permit took {:?}",
        start.elapsed()
    );
    // The hold is read by its length, not its value.
    let _: () = redis::cmd("SET")
        .arg("quantum:p33:trading_state")
        .arg("ACTIVE")
        .query(&mut t.con)
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("quantum:reconcile:hold:BTCUSDT")
        .arg("x".repeat(1 << 20))
        .query(&mut t.con)
        .unwrap();
    push(&mut t.con, "long-hold", "BTCUSDT", false);
    assert_eq!(
        t.wait_permit("long-hold")["reason"],
        "reconcile_hold_active"
    );
}

#[test]
fn instances_with_different_throttle_windows_do_not_shorten_each_other() {
    // A allows 2 opens per 60 s, B 100 per 1 s, on one Redis, one at a time
    // (so each plan goes to the instance the test means).
    let mut t = daemon(&[("P33_MAX_OPENS", "2/60s")]);
    for (i, s) in ["AAAUSDT", "BBBUSDT"].iter().enumerate() {
        let id = format!("a-{i}");
        push(&mut t.con, &id, s, true);
        assert_eq!(t.wait_permit(&id)["allow"], true);
    }
    t.kill();
    // B's window is 1 s: it trims what is older than that, in its own set.
    std::thread::sleep(Duration::from_millis(1100));
    t.env.insert("P33_MAX_OPENS".into(), "100/1s".into());
    t.env.insert("P33_CONSUMER_NAME".into(), "p33-b".into());
    t.start_ready();
    push(&mut t.con, "b-0", "AAAUSDT", true);
    assert_eq!(t.wait_permit("b-0")["allow"], true);
    t.kill();
    t.env.insert("P33_MAX_OPENS".into(), "2/60s".into());
    t.env.insert("P33_CONSUMER_NAME".into(), "p33-a".into());
    t.start_ready();
    push(&mut t.con, "a-2", "BBBUSDT", true);
    let p = t.wait_permit("a-2");
    assert_eq!(
        p["reason"], "throttled",
        "A granted 2 in the last 60 s: B's shorter window must not trim them: {p}"
    );
}

#[test]
fn a_future_entry_then_the_stream_deleted_does_not_silence_the_gate() {
    let mut t = daemon(&[]);
    let mut c = redis::cmd("XADD");
    c.arg(PLAN_STREAM).arg("9999999999999-0");
    for (k, v) in plan("future", "BTCUSDT", false) {
        c.arg(k).arg(v);
    }
    let _: String = c.query(&mut t.con).unwrap();
    assert_eq!(t.wait_permit("future")["reason"], "plan_from_future");
    // The operator repairs the stream by deleting it.
    cmd(&mut t.con, &["DEL", PLAN_STREAM]).unwrap();
    push(&mut t.con, "after-repair", "BTCUSDT", false);
    assert_eq!(t.wait_permit("after-repair")["allow"], true);
    t.wait_log("ahead of the clock", Duration::from_secs(5));
    // A group left at a future ID (by an older build, or by hand) is moved
    // back at start, so a restart does not keep the gate silent.
    t.kill();
    cmd(
        &mut t.con,
        &["XGROUP", "SETID", PLAN_STREAM, "p33", "9999999999999-5"],
    )
    .unwrap();
    push(&mut t.con, "while-down", "BTCUSDT", false);
    t.start_ready();
    assert_eq!(t.wait_permit("while-down")["allow"], true);
    push(&mut t.con, "after-restart", "BTCUSDT", false);
    assert_eq!(t.wait_permit("after-restart")["allow"], true);
    t.wait_log("beyond the stream's last entry", Duration::from_secs(5));
}

#[test]
fn saved_step_sizes_judge_a_plan_pending_at_start_while_the_exchange_is_slow() {
    // An "exchange" that takes connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let mut t = spawn_daemon(
        Opts::env_allowlist("SOLUSDT")
            .set("P33_STALE_THRESHOLD_SEC", "600")
            .set("P33_EXCHANGE_BASE_URL", &url)
            .deferred(),
    );
    cmd(
        &mut t.con,
        &["HSET", "quantum:p33:step_sizes", "SOLUSDT", "1"],
    )
    .unwrap();
    t.snapshot("SOLUSDT", "6.5", now());
    create_plan_group(&mut t.con, "$");
    push(&mut t.con, "pending-close", "SOLUSDT", false);
    t.start_ready();
    let p = t.wait_permit("pending-close");
    assert_eq!(p["allow"], true, "{p}");
    assert_eq!(p["safe_qty"], 6, "whole steps of the saved 1: {p}");
    assert_eq!(
        t.metric("p33_step_size_fallback_total{symbol=\"SOLUSDT\"}"),
        None,
        "never judged on the fallback"
    );
    drop(silent);
}

/// Runs the binary with `env` plus one variable whose value is raw bytes.
fn run_with_bytes(
    args: &[&str],
    env: &[(&str, &str)],
    raw: (&str, &[u8]),
) -> (Option<i32>, String, String) {
    use std::os::unix::ffi::OsStrExt;
    let mut cmd = std::process::Command::new(DAEMON);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.env(raw.0, std::ffi::OsStr::from_bytes(raw.1));
    let out = cmd.args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_variable_that_is_not_utf8_is_ignored_or_a_named_config_error_never_a_panic() {
    let redis = Redis::start();
    let url = redis.url();
    let env = [
        ("REDIS_URL", url.as_str()),
        ("P33_SNAPSHOT_SOURCE", "external"),
        ("P33_ALLOWLIST_SOURCE", "env"),
        ("P33_ALLOWLIST", "BTCUSDT"),
    ];
    // Another service's variable: none of ours, ignored everywhere.
    for args in [
        &["ctl", "status"][..],
        &["replay", "--last", "5"],
        &["--check-config"],
    ] {
        let (code, out, err) = run_with_bytes(args, &env, ("OTHER_SERVICE_NOTE", b"caf\xe9"));
        assert_eq!(code, Some(0), "{args:?}: {out}{err}");
    }
    // One we read: exit 78, named, its value never printed.
    for args in [&["--check-config"][..], &["ctl", "status"], &[]] {
        let (code, out, err) = run_with_bytes(args, &env, ("REDIS_PASSWORD", b"s3cr\xe9t-hunter2"));
        assert_eq!(code, Some(78), "{args:?}: {out}{err}");
        assert!(
            err.contains("REDIS_PASSWORD") && err.contains("UTF-8"),
            "{err}"
        );
        assert!(!format!("{out}{err}").contains("hunter2"), "{out}{err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
    }
}

#[test]
fn a_ledger_key_of_another_type_is_said_and_the_follower_goes_on() {
    let mut t = daemon(&[]);
    cmd(
        &mut t.con,
        &["RPUSH", "quantum:position:ledger:AAAUSDT", "x"],
    )
    .unwrap();
    for (plan, symbol) in [("exec-a", "AAAUSDT"), ("exec-b", "BBBUSDT")] {
        cmd(
            &mut t.con,
            &[
                "XADD",
                "quantum:stream:apply.result",
                "*",
                "plan_id",
                plan,
                "symbol",
                symbol,
                "executed",
                "true",
                "details",
                r#"{"order_id": 7, "filled_qty": "1", "side": "BUY", "order_status": "FILLED"}"#,
            ],
        )
        .unwrap();
    }
    t.wait_log(
        "AAAUSDT: quantum:position:ledger:AAAUSDT holds another type than a hash",
        Duration::from_secs(10),
    );
    wait_for("BBBUSDT's metadata", Duration::from_secs(10), || {
        let h: HashMap<String, String> = redis::cmd("HGETALL")
            .arg("quantum:position:ledger:BBBUSDT")
            .query(&mut t.con)
            .ok()?;
        (h.get("last_result_plan_id").map(String::as_str) == Some("exec-b")).then_some(())
    });
    t.wait_metric("p33_ledger_updates_total{outcome=\"wrong_type\"}", 1.0);
    assert_eq!(
        pending(&mut t.con, "quantum:stream:apply.result", "p33-ledger"),
        0
    );
    assert!(t.grep("ledger follower: redis error").is_empty());
}
