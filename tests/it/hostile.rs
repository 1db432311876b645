//! Interop with the real pipeline and hostile input (issue 9): each test is
//! one numbered break, driven through the real daemon, a private Redis and
//! (where the exchange is involved) the fake exchange.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(10);
const KEY: &str = "hostile-key";
const SECRET: &str = "hostile-secret";

fn close_plan<'a>(id: &'a str, symbol: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("plan_id", id),
        ("symbol", symbol),
        ("decision", "EXECUTE"),
        ("action", "FULL_CLOSE_PROPOSED"),
        ("reduceOnly", "true"),
    ]
}

fn open_plan<'a>(id: &'a str, symbol: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("plan_id", id),
        ("symbol", symbol),
        ("decision", "EXECUTE"),
        ("action", "OPEN_LONG"),
        ("reduceOnly", "false"),
    ]
}

fn hgetall(con: &mut redis::Connection, key: &str) -> HashMap<String, String> {
    redis::cmd("HGETALL").arg(key).query(con).unwrap()
}

fn hset(con: &mut redis::Connection, key: &str, pairs: &[(&str, &str)]) {
    let mut c = redis::cmd("HSET");
    c.arg(key);
    for (k, v) in pairs {
        c.arg(*k).arg(*v);
    }
    let _: () = c.query(con).unwrap();
}

fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Item 1 of issue 9: `ts_epoch` is written in whole seconds (the pipeline's Python readers
/// call `int()` on it), `ts_epoch_ms` carries the precision, and the daemon
/// judges plans on what it wrote.
#[test]
fn snapshots_carry_whole_second_ts_epoch_and_ts_epoch_ms() {
    let mut t = spawn_daemon(
        Opts::env_allowlist("BTCUSDT")
            .exchange(KEY, SECRET)
            .set("P33_CANONICAL_POSITIONS", "true")
            .deferred(),
    );
    t.fx().control(
        "/control/positions",
        json!([{"symbol": "BTCUSDT", "positionAmt": "0.5"}]),
    );
    t.start();
    t.wait_log("ready: reading plans", T);
    let snap = wait_for("a snapshot", T, || {
        let h = hgetall(&mut t.con, "quantum:position:snapshot:BTCUSDT");
        h.contains_key("ts_epoch").then_some(h)
    });
    assert!(is_digits(&snap["ts_epoch"]), "{snap:?}");
    assert!(is_digits(&snap["ts_epoch_ms"]), "{snap:?}");
    let s: u64 = snap["ts_epoch"].parse().unwrap();
    let ms: u64 = snap["ts_epoch_ms"].parse().unwrap();
    assert_eq!(s, ms / 1000, "{snap:?}");
    let canon = hgetall(&mut t.con, "quantum:state:positions:BTCUSDT");
    assert!(is_digits(&canon["ts_epoch"]), "{canon:?}");
    push_plan(&mut t.con, &close_plan("ts-close", "BTCUSDT"));
    let p = wait_permit(&mut t.con, "ts-close");
    assert_eq!(p["allow"], true, "{p}");
    assert_eq!(p["safe_qty"], 0.5, "{p}");
}

/// Item 2 of issue 9: The apply layer's `side=CLOSE` (with `reduceOnly=true`) is a close.
#[test]
fn side_close_from_the_apply_layer_is_a_close() {
    let mut t = spawn_daemon(Opts::env_allowlist("ETHUSDT,SOLUSDT").deferred());
    set_snapshot(&mut t.con, "ETHUSDT", "-1.5", now());
    set_snapshot(&mut t.con, "SOLUSDT", "0", now());
    t.start();
    t.wait_log("ready: reading plans", T);
    let mut close = open_plan("side-close", "ETHUSDT");
    close.extend([("side", "CLOSE"), ("reduceOnly", "true")]);
    push_plan(&mut t.con, &close);
    let mut flat = open_plan("side-close-flat", "SOLUSDT");
    flat.extend([("side", "close"), ("reduceOnly", "true")]);
    push_plan(&mut t.con, &flat);
    let p = wait_permit(&mut t.con, "side-close");
    assert_eq!(p["allow"], true, "{p}");
    assert_eq!(p["reason"], "sanity_checks_passed", "{p}");
    assert_eq!(p["safe_qty"], 1.5, "{p}");
    let p = wait_permit(&mut t.con, "side-close-flat");
    assert_eq!(p["reason"], "no_position", "{p}");
}

/// Item 3 of issue 9: The intent executor's result shape (`details` JSON, no
/// `steps_results`) reaches the ledger metadata; orders that did not fill
/// are skipped without a "malformed" WARN.
#[test]
fn executor_results_with_details_reach_the_ledger() {
    let mut t = spawn_daemon(Opts::env_allowlist("ETHUSDT").deferred());
    t.start();
    t.wait_log("ready: reading plans", T);
    let xadd = |con: &mut redis::Connection, plan: &str, details: &str| {
        let _: String = redis::cmd("XADD")
            .arg("quantum:stream:apply.result")
            .arg("*")
            .arg("plan_id")
            .arg(plan)
            .arg("symbol")
            .arg("ETHUSDT")
            .arg("executed")
            .arg("true")
            .arg("details")
            .arg(details)
            .query(con)
            .unwrap();
    };
    xadd(
        &mut t.con,
        "exec-new",
        r#"{"order_id": 1, "filled_qty": "0", "side": "SELL", "order_status": "NEW"}"#,
    );
    xadd(
        &mut t.con,
        "exec-1",
        r#"{"order_id": 4711, "filled_qty": "0.75", "side": "SELL", "order_status": "FILLED"}"#,
    );
    let h = wait_for("ledger metadata", T, || {
        let h = hgetall(&mut t.con, "quantum:position:ledger:ETHUSDT");
        h.contains_key("last_order_id").then_some(h)
    });
    assert_eq!(h["last_order_id"], "4711");
    assert_eq!(h["last_result_plan_id"], "exec-1");
    assert_eq!(h["last_executed_qty"], "0.75");
    assert_eq!(h["last_order_side"], "SELL");
    assert!(!h.contains_key("last_known_amt") && !h.contains_key("last_side"));
    t.wait_metric("p33_ledger_updates_total{outcome=\"skipped\"}", 1.0);
    assert!(t.grep("malformed apply.result").is_empty());
}

/// Item 4 (Redis side) of issue 9: Absurd numbers in snapshot and ledger are denials, never
/// a panic that would replay on every restart.
#[test]
fn absurd_numbers_in_redis_are_denied_and_the_daemon_lives() {
    let mut t = spawn_daemon(Opts::env_allowlist("AAAUSDT,BBBUSDT,CCCUSDT,DDDUSDT").deferred());
    let n = now();
    set_snapshot(&mut t.con, "AAAUSDT", "1e27", n);
    set_snapshot(&mut t.con, "BBBUSDT", "79228162514264337593543950335", n);
    set_snapshot(&mut t.con, "CCCUSDT", "0.5", n);
    hset(
        &mut t.con,
        "quantum:position:ledger:CCCUSDT",
        &[("last_known_amt", "-79228162514264337593543950335")],
    );
    set_snapshot(&mut t.con, "DDDUSDT", "0.5", n);
    create_plan_group(&mut t.con, "0");
    for (id, sym) in [
        ("huge-a", "AAAUSDT"),
        ("huge-b", "BBBUSDT"),
        ("huge-c", "CCCUSDT"),
    ] {
        push_plan(&mut t.con, &close_plan(id, sym));
    }
    t.start();
    for (id, reason) in [
        ("huge-a", "invalid_exchange_snapshot"),
        ("huge-b", "invalid_exchange_snapshot"),
        ("huge-c", "invalid_ledger"),
    ] {
        let p = wait_permit(&mut t.con, id);
        assert_eq!(p["reason"], reason, "{id}: {p}");
    }
    push_plan(&mut t.con, &close_plan("healthy", "DDDUSDT"));
    assert_eq!(wait_permit(&mut t.con, "healthy")["allow"], true);
    assert!(t.is_running());
    assert!(t.grep("panicked").is_empty());
    assert_eq!(pending(&mut t.con, PLAN_STREAM, "p33"), 0);
}

/// Item 4 (exchange side) and 13 of issue 9: Duplicated one-way rows, amounts at
/// `Decimal::MAX`, a step of 1e-28 and `Retry-After: 18446744073709551615`
/// neither panic nor get summed: the symbols are denied, the step falls
/// back, the hold is capped at 300 s.
#[test]
fn hostile_exchange_replies_never_panic() {
    let mut t = spawn_daemon(
        Opts::env_allowlist("DUPUSDT,MAXUSDT,BTCUSDT")
            .exchange(KEY, SECRET)
            .deferred(),
    );
    let max = "79228162514264337593543950335";
    t.fx().control(
        "/control/positions",
        json!([
            {"symbol": "DUPUSDT", "positionAmt": "1"},
            {"symbol": "DUPUSDT", "positionAmt": "2"},
            {"symbol": "MAXUSDT", "positionAmt": max},
            {"symbol": "MAXUSDT", "positionAmt": max},
            {"symbol": "BTCUSDT", "positionAmt": "0.0375"}
        ]),
    );
    t.fx()
        .control("/control/steps", json!({"BTCUSDT": "1e-28"}));
    t.start();
    t.wait_log("ready: reading plans", T);
    wait_for("snapshots", T, || {
        let h = hgetall(&mut t.con, "quantum:position:snapshot:BTCUSDT");
        h.contains_key("ts_epoch").then_some(())
    });
    for sym in ["DUPUSDT", "MAXUSDT"] {
        let h = hgetall(&mut t.con, &format!("quantum:position:snapshot:{sym}"));
        assert_eq!(h["side"], "HEDGED", "{sym}: {h:?}");
    }
    t.wait_log("duplicate one-way rows with different amounts", T);
    push_plan(&mut t.con, &close_plan("dup", "DUPUSDT"));
    push_plan(&mut t.con, &close_plan("max", "MAXUSDT"));
    push_plan(&mut t.con, &close_plan("btc", "BTCUSDT"));
    assert_eq!(
        wait_permit(&mut t.con, "dup")["reason"],
        "invalid_exchange_snapshot"
    );
    assert_eq!(
        wait_permit(&mut t.con, "max")["reason"],
        "invalid_exchange_snapshot"
    );
    let p = wait_permit(&mut t.con, "btc");
    assert_eq!(p["safe_qty"], 0.037, "the 1e-28 step is ignored: {p}");
    t.fx().control(
        "/control/mode",
        json!({"rate_limit_s": 1, "retry_after": "18446744073709551615"}),
    );
    let line = t.wait_log("rate limited", T);
    assert!(line.contains("300s"), "{line}");
    push_plan(&mut t.con, &close_plan("after-429", "BTCUSDT"));
    assert_eq!(wait_permit(&mut t.con, "after-429")["allow"], true);
    assert!(t.grep("panicked").is_empty());
}

/// Item 13 of issue 9: `Retry-After` of a billion seconds holds requests for 300 s, not for
/// decades.
#[test]
fn retry_after_of_a_billion_seconds_is_capped_at_300() {
    let mut t = spawn_daemon(
        Opts::env_allowlist("BTCUSDT")
            .exchange(KEY, SECRET)
            .deferred(),
    );
    t.fx().control(
        "/control/positions",
        json!([{"symbol": "BTCUSDT", "positionAmt": "1"}]),
    );
    t.start();
    t.wait_metric("p33_snapshot_cycle_seconds_count", 1.0);
    t.fx().control(
        "/control/mode",
        json!({"rate_limit_s": 1, "retry_after": "1000000000"}),
    );
    let line = t.wait_log("rate limited", T);
    assert!(line.contains("retry after 300s"), "{line}");
    t.wait_metric("p33_exchange_requests_total{outcome=\"held_back\"}", 1.0);
}

/// Item 5 of issue 9: A 100 MB positionRisk body fails the cycle at the 16 MiB cap without
/// costing the memory; the next normal reply is used.
#[test]
fn a_100_mb_position_risk_body_is_refused_without_the_memory() {
    let mut t = spawn_daemon(
        Opts::env_allowlist("BTCUSDT")
            .exchange(KEY, SECRET)
            .deferred(),
    );
    t.fx().control(
        "/control/positions",
        json!([{"symbol": "BTCUSDT", "positionAmt": "1"}]),
    );
    t.fx()
        .control("/control/mode", json!({"pad_bytes": 100 * 1024 * 1024}));
    t.start();
    t.wait_log("exceeds the 16 MiB cap", Duration::from_secs(20));
    let status = std::fs::read_to_string(format!("/proc/{}/status", t.pid())).unwrap();
    let hwm_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(hwm_kb < 100 * 1024, "peak RSS {hwm_kb} kB");
    assert!(hgetall(&mut t.con, "quantum:position:snapshot:BTCUSDT").is_empty());
    t.fx().control("/control/mode", json!({"pad_bytes": 0}));
    wait_for("a snapshot after the cap", T, || {
        let h = hgetall(&mut t.con, "quantum:position:snapshot:BTCUSDT");
        (h.get("position_amt").map(String::as_str) == Some("1")).then_some(())
    });
}

/// Item 6 of issue 9: Redis restarted empty: the group is recreated at the last entry this
/// process finished, so plans published before the recreation get permits.
#[test]
fn redis_restarted_empty_loses_no_plan() {
    let mut t = spawn_daemon(
        Opts::env_allowlist("BTCUSDT")
            .set("P33_STALE_THRESHOLD_SEC", "600")
            .deferred(),
    );
    set_snapshot(&mut t.con, "BTCUSDT", "1", now());
    t.start();
    t.wait_log("ready: reading plans", T);
    push_plan(&mut t.con, &close_plan("before", "BTCUSDT"));
    wait_permit(&mut t.con, "before");
    // Frozen, the daemon cannot recreate the group before the plans land.
    t.signal("STOP");
    t.redis.restart_empty();
    t.con = t.redis.con();
    set_snapshot(&mut t.con, "BTCUSDT", "1", now());
    let ids: Vec<String> = (0..50).map(|i| format!("after-{i}")).collect();
    for id in &ids {
        push_plan(&mut t.con, &close_plan(id, "BTCUSDT"));
    }
    t.signal("CONT");
    for id in &ids {
        let p = wait_for(&format!("permit {id}"), Duration::from_secs(20), || {
            read_permit(&mut t.con, id)
        });
        assert_eq!(p["allow"], true, "{id}: {p}");
    }
    assert_eq!(pending(&mut t.con, PLAN_STREAM, "p33"), 0);
}

/// Item 7 of issue 9: One XADD with a future ID makes every later auto ID "young": such
/// plans are denied `plan_from_future`, never judged as fresh.
#[test]
fn a_future_stream_id_is_denied_plan_from_future() {
    let mut t = spawn_daemon(Opts::env_allowlist("BTCUSDT").deferred());
    set_snapshot(&mut t.con, "BTCUSDT", "1", now());
    t.start();
    t.wait_log("ready: reading plans", T);
    let mut c = redis::cmd("XADD");
    c.arg(PLAN_STREAM).arg("9999999999999-0");
    for (k, v) in close_plan("future", "BTCUSDT") {
        c.arg(k).arg(v);
    }
    let _: String = c.query(&mut t.con).unwrap();
    let later = push_plan(&mut t.con, &close_plan("after-future", "BTCUSDT"));
    assert!(later.starts_with("9999999999999-"), "{later}");
    for id in ["future", "after-future"] {
        let p = wait_permit(&mut t.con, id);
        assert_eq!(p["reason"], "plan_from_future", "{id}: {p}");
        assert!(p["context"]["skew_seconds"].as_f64().unwrap() > 1e9, "{p}");
    }
}

/// Item 8 of issue 9: A reused plan_id never overwrites its permit (in one batch or later),
/// and a plan_id that is not UTF-8 is malformed, never repaired into a key.
#[test]
fn a_reused_plan_id_never_overwrites_its_permit() {
    let mut t = spawn_daemon(
        Opts::env_allowlist("XRPUSDT,BTCUSDT")
            .set("P33_STALE_THRESHOLD_SEC", "600")
            .deferred(),
    );
    let n = now();
    set_snapshot(&mut t.con, "XRPUSDT", "100", n);
    set_snapshot(&mut t.con, "BTCUSDT", "1", n);
    create_plan_group(&mut t.con, "0");
    // One batch: the first entry is denied position_exists, the next two
    // would be allowed.
    push_plan(&mut t.con, &open_plan("dup-1", "XRPUSDT"));
    push_plan(&mut t.con, &close_plan("dup-1", "BTCUSDT"));
    push_plan(&mut t.con, &close_plan("dup-1", "BTCUSDT"));
    let _: String = redis::cmd("XADD")
        .arg(PLAN_STREAM)
        .arg("*")
        .arg("plan_id")
        .arg(&b"bad\xff\xfeid"[..])
        .arg("symbol")
        .arg("BTCUSDT")
        .arg("decision")
        .arg("EXECUTE")
        .arg("action")
        .arg("FULL_CLOSE_PROPOSED")
        .arg("reduceOnly")
        .arg("true")
        .query(&mut t.con)
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (counts, listener) = count_permit_sets(&t.redis, stop.clone());
    t.start();
    t.wait_metric("p33_plans_total{outcome=\"duplicate_plan_id\"}", 2.0);
    t.wait_metric("p33_plans_total{outcome=\"malformed\"}", 1.0);
    let p = wait_permit(&mut t.con, "dup-1");
    assert_eq!(
        p["reason"], "position_exists",
        "the first decision stands: {p}"
    );
    // Counted after being logged; the log reaches the test a moment later.
    wait_for("two duplicate plan_id lines", T, || {
        (t.grep("duplicate plan_id").len() == 2).then_some(())
    });
    wait_for("one not-UTF-8 line", T, || {
        (t.grep("not valid UTF-8").len() == 1).then_some(())
    });
    // Later, in its own batch: still the first decision.
    push_plan(&mut t.con, &close_plan("dup-1", "BTCUSDT"));
    t.wait_metric("p33_plans_total{outcome=\"duplicate_plan_id\"}", 3.0);
    assert_eq!(
        wait_permit(&mut t.con, "dup-1")["reason"],
        "position_exists"
    );
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("quantum:permit:p33:*")
        .query(&mut t.con)
        .unwrap();
    assert_eq!(keys, vec!["quantum:permit:p33:dup-1".to_string()]);
    stop.store(true, Ordering::SeqCst);
    listener.join().unwrap();
    assert_eq!(counts.lock().unwrap().get("dup-1"), Some(&1));
    assert_eq!(pending(&mut t.con, PLAN_STREAM, "p33"), 0);
}

/// Item 9 of issue 9: Universe meta numbers that are NaN are `parse_error` (the next tier
/// applies) and the refresher does not spin.
#[test]
fn universe_meta_nan_is_a_parse_error_and_the_refresher_does_not_spin() {
    let mut t = spawn_daemon(
        Opts::default()
            .set("P33_ALLOWLIST_SOURCE", "universe")
            .deferred(),
    );
    let n = now();
    set_universe(&mut t.con, &["BTCUSDT"], n, 0);
    set_last_ok(&mut t.con, &["ETHUSDT"], n);
    t.start();
    t.wait_log("P3.3 allowlist source=universe", T);
    hset(
        &mut t.con,
        "quantum:cfg:universe:meta",
        &[("asof_epoch", "NaN")],
    );
    let change = t.wait_log("source changed: universe -> last_ok", T);
    assert!(change.contains("parse_error"), "{change}");
    // The refresh period is 1 s: three more resolutions prove it looked.
    let first = t.log_count();
    wait_for("three more resolutions", T, || {
        let l = t.lines.lock().unwrap();
        let more = l[first..]
            .iter()
            .filter(|x| x.contains("P3.3 allowlist source=last_ok"))
            .count();
        (more >= 3).then_some(())
    });
    let total = t.grep("P3.3 allowlist source=").len();
    assert!(total < 12, "{total} resolutions: the refresher spins");
    // Back to a good universe, then meta count=NaN.
    set_universe(&mut t.con, &["BTCUSDT"], now(), 0);
    let from = t.log_count();
    t.wait_log_after(from, "P3.3 allowlist source=universe", T);
    hset(&mut t.con, "quantum:cfg:universe:meta", &[("count", "NaN")]);
    let from = t.log_count();
    let change = t.wait_log_after(from, "source changed: universe -> last_ok", T);
    assert!(change.contains("parse_error"), "count=NaN: {change}");
}

/// Item 10 of issue 9: A flood of the metrics port (more connections than the daemon's
/// open-files limit allows) does not starve the plan path, and a slowloris
/// connection is closed after the header timeout.
#[test]
fn a_flooded_metrics_port_does_not_starve_the_plan_path() {
    let mut t = spawn_daemon(
        Opts::env_allowlist("BTCUSDT")
            .set("P33_STALE_THRESHOLD_SEC", "600")
            .set("P33_LOG_LEVEL", "INFO")
            .nofile(600),
    );
    set_snapshot(&mut t.con, "BTCUSDT", "1", now());
    t.wait_log("ready: reading plans", T);
    // 800 connections from a thread: past the 512 the daemon serves and
    // the kernel backlog, connects wait (that is the point), so the test
    // does not wait for them.
    let addr: std::net::SocketAddr = t.metrics_addr.parse().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let flooder = std::thread::spawn(move || {
        let mut held = Vec::new();
        for _ in 0..800 {
            if stop2.load(Ordering::SeqCst) {
                break;
            }
            if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                held.push(s);
            }
        }
        while !stop2.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
        held.len()
    });
    let pid = t.pid();
    let fds = move || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|r| r.count())
            .unwrap_or(0)
    };
    wait_for("the daemon to hold 512 connections", T, || {
        (fds() >= 512).then_some(())
    });
    // Every Redis connection has to be made anew: with the descriptors gone
    // to the flood, this is where the plan path starved.
    t.redis.restart();
    t.con = t.redis.con();
    push_plan(&mut t.con, &close_plan("flooded", "BTCUSDT"));
    let p = wait_for("a permit while flooded", Duration::from_secs(20), || {
        read_permit(&mut t.con, "flooded")
    });
    assert_eq!(p["allow"], true, "{p}");
    assert!(fds() < 600, "descriptors left for the plan path");
    stop.store(true, Ordering::SeqCst);
    let held = flooder.join().unwrap();
    assert!(held > 512, "the flood held {held} connections");
    // Slowloris: headers that never finish are cut at the 10 s timeout.
    let mut s = TcpStream::connect(&t.metrics_addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    // The client gives up after 30 s: an Ok here is the server closing it.
    let mut buf = Vec::new();
    let r = s.read_to_end(&mut buf);
    assert!(r.is_ok(), "the server closed the connection: {r:?}");
    let (status, body) = t.get("/metrics");
    assert_eq!(status, 200);
    assert!(body.contains("p33_plans_total"));
}

/// Item 11 of issue 9: A malformed `REDIS_URL` is named in the exit-78 line without its
/// password.
#[test]
fn a_malformed_redis_url_never_prints_its_password() {
    for url in [
        "redis//:hunter2@127.0.0.1:6390",
        ":hunter2@127.0.0.1",
        "redis://:hunter2@@127.0.0.1:badport",
    ] {
        let (code, out, err) = run_once(
            &["--check-config"],
            &[("REDIS_URL", url), ("P33_SNAPSHOT_SOURCE", "external")],
        );
        assert_eq!(code, Some(78), "{url}: {out}{err}");
        assert!(err.contains("REDIS_URL"), "{err}");
        assert!(
            !out.contains("hunter2") && !err.contains("hunter2"),
            "{url}: {out}{err}"
        );
    }
}

/// Item 12 of issue 9: A 1 MB cooldown, ledger, symbol or decision value is echoed cut to
/// 64 characters: no 1 MB permit, no 1 MB log line.
#[test]
fn echoed_values_are_cut_to_64_characters() {
    let mut t = spawn_daemon(Opts::env_allowlist("ETHUSDT,BTCUSDT").deferred());
    let n = now();
    let big = "7".repeat(1 << 20) + "x";
    set_snapshot(&mut t.con, "ETHUSDT", "0", n);
    set_snapshot(&mut t.con, "BTCUSDT", "1", n);
    let _: () = redis::cmd("SET")
        .arg("quantum:cooldown:last_exec_ts:ETHUSDT")
        .arg(&big)
        .query(&mut t.con)
        .unwrap();
    hset(
        &mut t.con,
        "quantum:position:ledger:BTCUSDT",
        &[("last_known_amt", &big)],
    );
    t.start();
    t.wait_log("ready: reading plans", T);
    push_plan(&mut t.con, &open_plan("echo-cooldown", "ETHUSDT"));
    push_plan(&mut t.con, &close_plan("echo-ledger", "BTCUSDT"));
    let mut long_action = open_plan("echo-action", "BTCUSDT");
    long_action[3] = ("action", big.as_str());
    push_plan(&mut t.con, &long_action);
    push_plan(&mut t.con, &close_plan("echo-symbol", &big));
    push_plan(
        &mut t.con,
        &[
            ("plan_id", "echo-skip"),
            ("symbol", "BTCUSDT"),
            ("decision", big.as_str()),
        ],
    );
    let p = wait_permit(&mut t.con, "echo-cooldown");
    assert_eq!(p["reason"], "invalid_cooldown");
    assert!(p.to_string().len() < 1024, "{} bytes", p.to_string().len());
    let p = wait_permit(&mut t.con, "echo-ledger");
    assert_eq!(p["reason"], "invalid_ledger");
    wait_permit(&mut t.con, "echo-action");
    assert!(p.to_string().len() < 1024, "{} bytes", p.to_string().len());
    t.wait_metric("p33_plans_total{outcome=\"not_allowlisted\"}", 1.0);
    t.wait_metric("p33_plans_total{outcome=\"skip_decision\"}", 1.0);
    let longest = t.lines.lock().unwrap().iter().map(String::len).max();
    assert!(
        longest.unwrap_or(0) < 2048,
        "a log line of {longest:?} bytes"
    );
}

/// Item 14 of issue 9: A flapping universe (gaining a symbol ten times a second) adds at
/// most one positionRisk poll per second.
#[test]
fn a_flapping_universe_adds_at_most_one_poll_per_second() {
    let mut t = spawn_daemon(
        Opts::env_allowlist("")
            .exchange(KEY, SECRET)
            .set("P33_ALLOWLIST_SOURCE", "universe")
            .set("P33_ALLOWLIST_REFRESH_S", "0.1")
            .set("P33_POLL_SEC", "60")
            .deferred(),
    );
    t.fx().control(
        "/control/positions",
        json!([{"symbol": "BTCUSDT", "positionAmt": "1"}]),
    );
    set_universe(&mut t.con, &["BTCUSDT"], now(), 0);
    t.start();
    t.wait_log("ready: reading plans", T);
    t.wait_metric("p33_snapshot_cycle_seconds_count", 1.0);
    let start = t.fx().count("/fapi/v2/positionRisk");
    let t0 = Instant::now();
    let mut flips = 0;
    while t0.elapsed() < Duration::from_secs(3) {
        let n = now();
        if flips % 2 == 0 {
            set_universe(&mut t.con, &["BTCUSDT", "ETHUSDT"], n, 0);
        } else {
            set_universe(&mut t.con, &["BTCUSDT"], n, 0);
        }
        flips += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let gains = t.grep("allowlist gained symbols").len();
    let polls = t.fx().count("/fapi/v2/positionRisk") - start;
    let secs = t0.elapsed().as_secs_f64();
    assert!(polls >= 1, "gains trigger polls");
    assert!(
        (polls as f64) <= secs + 1.0,
        "{polls} polls in {secs:.1} s for {gains} gains"
    );
}
