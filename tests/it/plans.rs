//! Plans to permits through the real daemon and a private Redis: the
//! permits of SPEC §4–§6, crash safety, takeover, dry run, ledger metadata.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(10);

fn plan<'a>(
    id: &'a str,
    symbol: &'a str,
    decision: &'a str,
    action: &'a str,
    reduce: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("plan_id", id),
        ("symbol", symbol),
        ("decision", decision),
        ("action", action),
        ("reduceOnly", reduce),
        ("kill_score", "0.5"),
        ("steps", "[]"),
    ]
}

fn key_exists(con: &mut redis::Connection, key: &str) -> bool {
    redis::cmd("EXISTS").arg(key).query::<i64>(con).unwrap() == 1
}

#[test]
fn plans_of_every_kind_get_the_expected_permits() {
    let mut t = spawn_daemon(Opts::env_allowlist("BTCUSDT,ETHUSDT,SOLUSDT,XRPUSDT").deferred());
    let n = now();
    set_snapshot(&mut t.con, "BTCUSDT", "0.038", n);
    set_snapshot(&mut t.con, "ETHUSDT", "0", n);
    set_snapshot(&mut t.con, "SOLUSDT", "-2", n - 30.0);
    set_snapshot(&mut t.con, "XRPUSDT", "100", n);
    t.start();
    t.wait_log("ready: reading plans", T);

    push_plan(
        &mut t.con,
        &plan(
            "plan-partial-75",
            "BTCUSDT",
            "EXECUTE",
            "PARTIAL_75",
            "false",
        ),
    );
    push_plan(
        &mut t.con,
        &plan("plan-open-flat", "ETHUSDT", "EXECUTE", "OPEN_LONG", "false"),
    );
    push_plan(
        &mut t.con,
        &plan(
            "plan-stale",
            "SOLUSDT",
            "EXECUTE",
            "FULL_CLOSE_PROPOSED",
            "true",
        ),
    );
    push_plan(
        &mut t.con,
        &plan(
            "plan-close-flat",
            "ETHUSDT",
            "EXECUTE",
            "FULL_CLOSE_PROPOSED",
            "true",
        ),
    );
    push_plan(
        &mut t.con,
        &plan(
            "plan-open-exists",
            "XRPUSDT",
            "EXECUTE",
            "OPEN_LONG",
            "false",
        ),
    );
    let mut bad_side = plan("plan-bad-side", "XRPUSDT", "EXECUTE", "EXIT", "false");
    bad_side.push(("side", "SIDEWAYS"));
    push_plan(&mut t.con, &bad_side);
    push_plan(
        &mut t.con,
        &plan("plan-skip", "BTCUSDT", "SKIP", "HOLD", "false"),
    );
    push_plan(
        &mut t.con,
        &plan(
            "plan-not-allowed",
            "DOGEUSDT",
            "EXECUTE",
            "FULL_CLOSE_PROPOSED",
            "true",
        ),
    );
    push_plan(
        &mut t.con,
        &plan(
            "bad plan id",
            "BTCUSDT",
            "EXECUTE",
            "FULL_CLOSE_PROPOSED",
            "true",
        ),
    );
    push_plan(
        &mut t.con,
        &plan("plan-reconcile", "XRPUSDT", "RECONCILE_CLOSE", "", "false"),
    );

    let p = wait_permit(&mut t.con, "plan-partial-75");
    assert_eq!(p["allow"], true);
    assert_eq!(p["safe_qty"].to_string(), "0.028");
    assert_eq!(p["safe_close_qty"].to_string(), "0.028");
    assert_eq!(p["exchange_position_amt"].to_string(), "0.038");
    assert_eq!(p["reason"], "sanity_checks_passed");
    assert_eq!(p["symbol"], "BTCUSDT");
    assert_eq!(p["plan_id"], "plan-partial-75");
    assert!(p["created_at"].as_f64().unwrap() > n - 1.0);
    let mut keys: Vec<&String> = p.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "allow",
            "created_at",
            "exchange_position_amt",
            "ledger_amt",
            "plan_id",
            "reason",
            "safe_close_qty",
            "safe_qty",
            "symbol"
        ]
    );
    let ttl: i64 = redis::cmd("PTTL")
        .arg("quantum:permit:p33:plan-partial-75")
        .query(&mut t.con)
        .unwrap();
    assert!(ttl > 50_000 && ttl <= 60_000, "ttl {ttl}");

    let p = wait_permit(&mut t.con, "plan-open-flat");
    assert_eq!(
        (
            p["allow"].clone(),
            p["reason"].clone(),
            p["safe_qty"].to_string()
        ),
        (
            Value::Bool(true),
            Value::from("open_permit_granted"),
            "0".into()
        )
    );
    let p = wait_permit(&mut t.con, "plan-stale");
    assert_eq!(
        (p["allow"].clone(), p["reason"].clone()),
        (Value::Bool(false), Value::from("stale_exchange_state"))
    );
    assert!(p["context"]["age_seconds"].as_f64().unwrap() >= 30.0, "{p}");
    let p = wait_permit(&mut t.con, "plan-close-flat");
    assert_eq!(p["reason"], "no_position");
    let p = wait_permit(&mut t.con, "plan-open-exists");
    assert_eq!(p["reason"], "position_exists");
    assert_eq!(p["context"]["exchange_amt"].to_string(), "100");
    let p = wait_permit(&mut t.con, "plan-bad-side");
    assert_eq!(
        (p["reason"].clone(), p["context"]["field"].clone()),
        (Value::from("invalid_plan"), Value::from("side"))
    );
    let p = wait_permit(&mut t.con, "plan-reconcile");
    assert_eq!(
        (p["reason"].clone(), p["safe_qty"].to_string()),
        (Value::from("reconcile_close_bypass"), "100".into())
    );

    wait_drained(&mut t.con, "p33");
    for id in ["plan-skip", "plan-not-allowed", "bad plan id"] {
        assert!(read_permit(&mut t.con, id).is_none(), "no permit for {id}");
    }
    let allow = t.wait_log("BTCUSDT: P3.3 ALLOW plan plan-par", T);
    assert!(
        allow.contains("(safe_qty=0.028, exchange_amt=0.038)") && allow.contains("INFO"),
        "{allow}"
    );
    let deny = t.wait_log("ETHUSDT: P3.3 DENY plan plan-clo", T);
    assert!(
        deny.contains("reason=no_position context={\"exchange_amt\":0}") && deny.contains("WARN"),
        "{deny}"
    );
    let err = t.wait_log("malformed plan entry", T);
    assert!(err.contains("ERROR"), "{err}");
    t.wait_log(
        "DOGEUSDT: Not in allowlist (source=env) - ACK plan plan-not",
        T,
    );
    t.wait_log("Evaluating plan plan-par symbol=BTCUSDT decision=EXECUTE action=PARTIAL_75 reduceOnly=false", T);
    // An outcome is logged, then counted: wait for the counters to catch up.
    for (outcome, n) in [
        ("allow", 3.0),
        ("deny", 4.0),
        ("skip_decision", 1.0),
        ("not_allowlisted", 1.0),
        ("malformed", 1.0),
    ] {
        t.wait_metric(&format!("p33_plans_total{{outcome=\"{outcome}\"}}"), n);
    }
    assert_eq!(t.metric("p33_plans_total{outcome=\"allow\"}"), Some(3.0));
    assert_eq!(t.metric("p33_plans_total{outcome=\"deny\"}"), Some(4.0));
    assert_eq!(
        t.metric("p33_plans_total{outcome=\"skip_decision\"}"),
        Some(1.0)
    );
    assert_eq!(
        t.metric("p33_plans_total{outcome=\"not_allowlisted\"}"),
        Some(1.0)
    );
    assert_eq!(
        t.metric("p33_plans_total{outcome=\"malformed\"}"),
        Some(1.0)
    );
    assert_eq!(
        t.metric("p33_permit_deny_total{reason=\"stale_exchange_state\",symbol=\"SOLUSDT\"}"),
        Some(1.0)
    );
    assert_eq!(
        t.metric("p33_permit_allow_total{symbol=\"BTCUSDT\"}"),
        Some(1.0)
    );
    assert_eq!(t.metric("p33_permit_latency_seconds_count"), Some(7.0));
}

#[test]
fn no_permits_in_the_fail_closed_state() {
    let mut t = spawn_daemon(Opts::env_allowlist("").deferred());
    set_snapshot(&mut t.con, "BTCUSDT", "1", now());
    t.start();
    t.wait_log("source=none", T);
    push_plan(
        &mut t.con,
        &plan(
            "p-closed",
            "BTCUSDT",
            "EXECUTE",
            "FULL_CLOSE_PROPOSED",
            "true",
        ),
    );
    wait_drained(&mut t.con, "p33");
    assert!(read_permit(&mut t.con, "p-closed").is_none());
    t.wait_log("BTCUSDT: Not in allowlist (source=none)", T);
}

#[test]
fn reconcile_hold_turns_allows_into_denials_but_not_reconcile_close() {
    let mut t = spawn_daemon(Opts::env_allowlist("BTCUSDT,ETHUSDT").deferred());
    set_snapshot(&mut t.con, "BTCUSDT", "0.5", now());
    set_snapshot(&mut t.con, "ETHUSDT", "0", now());
    let _: () = redis::cmd("SET")
        .arg("quantum:reconcile:hold:BTCUSDT")
        .arg("1")
        .query(&mut t.con)
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg("quantum:reconcile:hold:ETHUSDT")
        .arg("by")
        .arg("p34")
        .query(&mut t.con)
        .unwrap();
    t.start();
    t.wait_log("ready: reading plans", T);
    push_plan(
        &mut t.con,
        &plan(
            "h-close",
            "BTCUSDT",
            "EXECUTE",
            "FULL_CLOSE_PROPOSED",
            "true",
        ),
    );
    push_plan(
        &mut t.con,
        &plan("h-open", "ETHUSDT", "EXECUTE", "OPEN", "false"),
    );
    push_plan(
        &mut t.con,
        &plan("h-reconcile", "BTCUSDT", "RECONCILE_CLOSE", "", "false"),
    );
    let p = wait_permit(&mut t.con, "h-close");
    assert_eq!(p["reason"], "reconcile_hold_active");
    assert_eq!(
        p["context"].to_string(),
        r#"{"exchange_amt":0.5,"ledger_amt":0,"p34_hold":"active"}"#
    );
    let p = wait_permit(&mut t.con, "h-open");
    assert_eq!(
        p["reason"], "reconcile_hold_active",
        "a hold of another type counts too"
    );
    let p = wait_permit(&mut t.con, "h-reconcile");
    assert_eq!(
        (p["allow"].clone(), p["reason"].clone()),
        (Value::Bool(true), Value::from("reconcile_close_bypass"))
    );
    t.wait_log(
        "BTCUSDT: P3.3 DENY plan h-close reason=reconcile_hold_active",
        T,
    );
    // An empty hold value is no hold.
    let _: () = redis::cmd("SET")
        .arg("quantum:reconcile:hold:BTCUSDT")
        .arg("")
        .query(&mut t.con)
        .unwrap();
    push_plan(
        &mut t.con,
        &plan(
            "h-close-2",
            "BTCUSDT",
            "EXECUTE",
            "FULL_CLOSE_PROPOSED",
            "true",
        ),
    );
    assert_eq!(
        wait_permit(&mut t.con, "h-close-2")["reason"],
        "sanity_checks_passed"
    );
}

#[test]
fn an_expired_plan_is_denied_plan_expired() {
    let mut t = spawn_daemon(Opts::env_allowlist("BTCUSDT").deferred());
    set_snapshot(&mut t.con, "BTCUSDT", "1", now());
    create_plan_group(&mut t.con, "0");
    let old = format!("{}-0", ((now() - 120.0) * 1000.0) as u64);
    let mut c = redis::cmd("XADD");
    c.arg(PLAN_STREAM).arg(&old);
    for (k, v) in plan("p-old", "BTCUSDT", "EXECUTE", "FULL_CLOSE_PROPOSED", "true") {
        c.arg(k).arg(v);
    }
    let _: String = c.query(&mut t.con).unwrap();
    t.start();
    let p = wait_permit(&mut t.con, "p-old");
    assert_eq!(p["reason"], "plan_expired");
    assert!(
        p["context"]["age_seconds"].as_f64().unwrap() >= 120.0,
        "{p}"
    );
}

#[test]
fn sigkill_under_load_loses_no_plan_and_permits_none_twice() {
    let mut t = spawn_daemon(
        Opts::env_allowlist("BTCUSDT")
            .set("P33_STALE_THRESHOLD_SEC", "600")
            .set("P33_LOG_LEVEL", "INFO")
            .deferred(),
    );
    set_snapshot(&mut t.con, "BTCUSDT", "1", now());
    let stop = Arc::new(AtomicBool::new(false));
    let (counts, listener) = count_permit_sets(&t.redis, stop.clone());
    t.start();
    t.wait_log("ready: reading plans", T);
    let total = 3000;
    let mut ids = Vec::new();
    for i in 0..total {
        let id = format!("crash-{i}");
        push_plan(
            &mut t.con,
            &plan(&id, "BTCUSDT", "EXECUTE", "FULL_CLOSE_PROPOSED", "true"),
        );
        ids.push(id);
        if i % 500 == 250 {
            // SIGKILL mid-flow, restart with the same consumer name.
            t.restart();
        }
    }
    assert_each_permitted_once(&mut t.con, &counts, stop, listener, &ids, "crash-last");
}

#[test]
fn redis_killed_under_load_loses_no_plan() {
    let mut t = spawn_daemon(
        Opts::env_allowlist("BTCUSDT")
            .set("P33_STALE_THRESHOLD_SEC", "600")
            .set("P33_LOG_LEVEL", "INFO")
            .deferred(),
    );
    set_snapshot(&mut t.con, "BTCUSDT", "1", now());
    t.start();
    t.wait_log("ready: reading plans", T);
    let url = t.redis.url();
    let mut acked: Vec<String> = Vec::new();
    let mut i = 0;
    for round in 0..3 {
        // Produce for a while; only plans whose XADD Redis acknowledged count.
        for _ in 0..400 {
            let id = format!("rk-{i}");
            i += 1;
            if let Ok(mut c) = redis::Client::open(url.as_str()).and_then(|c| c.get_connection()) {
                let mut cmd = redis::cmd("XADD");
                cmd.arg(PLAN_STREAM).arg("*");
                for (k, v) in plan(&id, "BTCUSDT", "EXECUTE", "FULL_CLOSE_PROPOSED", "true") {
                    cmd.arg(k).arg(v);
                }
                if cmd.query::<String>(&mut c).is_ok() {
                    acked.push(id);
                }
            }
        }
        if round < 2 {
            t.redis.kill();
            std::thread::sleep(Duration::from_millis(500));
            t.redis.restart();
        }
    }
    t.con = t.redis.con();
    wait_for(
        "every acknowledged plan's permit",
        Duration::from_secs(40),
        || {
            acked
                .iter()
                .all(|id| key_exists(&mut t.con, &format!("quantum:permit:p33:{id}")))
                .then_some(())
        },
    );
    wait_drained(&mut t.con, "p33");
    assert!(acked.len() >= 1000, "produced {}", acked.len());
}

#[test]
fn entries_left_by_a_consumer_that_never_returns_are_claimed() {
    let mut t = spawn_daemon(
        Opts::env_allowlist("BTCUSDT")
            .set("P33_CLAIM_IDLE_S", "1")
            .deferred(),
    );
    set_snapshot(&mut t.con, "BTCUSDT", "1", now());
    create_plan_group(&mut t.con, "$");
    for i in 0..5 {
        push_plan(
            &mut t.con,
            &plan(
                &format!("orphan-{i}"),
                "BTCUSDT",
                "EXECUTE",
                "FULL_CLOSE_PROPOSED",
                "true",
            ),
        );
    }
    // A consumer reads them and dies.
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("p33")
        .arg("p33-dead-host")
        .arg("COUNT")
        .arg(10)
        .arg("STREAMS")
        .arg(PLAN_STREAM)
        .arg(">")
        .query(&mut t.con)
        .unwrap();
    assert_eq!(pending(&mut t.con, PLAN_STREAM, "p33"), 5);
    t.start();
    for i in 0..5 {
        assert_eq!(
            wait_permit(&mut t.con, &format!("orphan-{i}"))["allow"],
            true
        );
    }
    t.wait_log("claimed 5 plan entries", T);
    assert_eq!(pending(&mut t.con, PLAN_STREAM, "p33"), 0);
}

#[test]
fn dry_run_writes_no_permit_and_acks_in_its_own_group() {
    let mut t = spawn_daemon(
        Opts::env_allowlist("BTCUSDT")
            .set("P33_DRY_RUN", "true")
            .deferred(),
    );
    set_snapshot(&mut t.con, "BTCUSDT", "1", now());
    t.start();
    t.wait_log("ready: reading plans", T);
    push_plan(
        &mut t.con,
        &plan("dry-1", "BTCUSDT", "EXECUTE", "FULL_CLOSE_PROPOSED", "true"),
    );
    push_plan(
        &mut t.con,
        &plan("dry-2", "BTCUSDT", "EXECUTE", "OPEN", "false"),
    );
    t.wait_log("BTCUSDT: DRY-RUN would ALLOW plan dry-1", T);
    t.wait_log(
        "BTCUSDT: DRY-RUN would DENY plan dry-2 reason=position_exists",
        T,
    );
    wait_drained(&mut t.con, "p33-dryrun");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("quantum:permit:p33:*")
        .query(&mut t.con)
        .unwrap();
    assert!(keys.is_empty(), "{keys:?}");
}

#[test]
fn a_deleted_group_is_recreated_and_plans_keep_flowing() {
    let mut t = spawn_daemon(Opts::env_allowlist("BTCUSDT").deferred());
    set_snapshot(&mut t.con, "BTCUSDT", "1", now());
    t.start();
    t.wait_log("ready: reading plans", T);
    push_plan(
        &mut t.con,
        &plan("g-1", "BTCUSDT", "EXECUTE", "FULL_CLOSE_PROPOSED", "true"),
    );
    wait_permit(&mut t.con, "g-1");
    let _: () = redis::cmd("DEL")
        .arg(PLAN_STREAM)
        .query(&mut t.con)
        .unwrap();
    t.wait_log("plan consumer group missing", T);
    push_plan(
        &mut t.con,
        &plan("g-2", "BTCUSDT", "EXECUTE", "FULL_CLOSE_PROPOSED", "true"),
    );
    // The group is recreated at `$`: the entry added after it is read.
    wait_for(
        "permit g-2 (a plan published after the group came back)",
        T,
        || {
            if read_permit(&mut t.con, "g-2").is_some() {
                return Some(());
            }
            push_plan(
                &mut t.con,
                &plan("g-2", "BTCUSDT", "EXECUTE", "FULL_CLOSE_PROPOSED", "true"),
            );
            std::thread::sleep(Duration::from_millis(200));
            None
        },
    );
}

#[test]
fn ledger_follower_writes_metadata_once_and_keeps_the_executors_amount() {
    let mut t = spawn_daemon(Opts::env_allowlist("BTCUSDT").deferred());
    let ledger = "quantum:position:ledger:BTCUSDT";
    let _: () = redis::cmd("HSET")
        .arg(ledger)
        .arg("last_known_amt")
        .arg("-0.5")
        .arg("last_side")
        .arg("SHORT")
        .query(&mut t.con)
        .unwrap();
    t.start();
    t.wait_log("ready: reading plans", T);
    let steps = r#"[{"step":"close","order_id":98765,"side":"BUY","executed_qty":"0.25"}]"#;
    let _: String = redis::cmd("XADD")
        .arg("quantum:stream:apply.result")
        .arg("*")
        .arg("plan_id")
        .arg("res-1")
        .arg("symbol")
        .arg("BTCUSDT")
        .arg("executed")
        .arg("True")
        .arg("steps_results")
        .arg(steps)
        .query(&mut t.con)
        .unwrap();
    let _: String = redis::cmd("XADD")
        .arg("quantum:stream:apply.result")
        .arg("*")
        .arg("plan_id")
        .arg("res-bad")
        .arg("symbol")
        .arg("BTCUSDT")
        .arg("executed")
        .arg("1")
        .arg("steps_results")
        .arg("not json")
        .query(&mut t.con)
        .unwrap();
    let h: HashMap<String, String> = wait_for("ledger metadata", T, || {
        let h: HashMap<String, String> =
            redis::cmd("HGETALL").arg(ledger).query(&mut t.con).ok()?;
        h.contains_key("last_order_id").then_some(h)
    });
    assert_eq!(h["last_order_id"], "98765");
    assert_eq!(h["last_result_plan_id"], "res-1");
    assert_eq!(h["last_executed_qty"], "0.25");
    assert_eq!(h["last_order_side"], "BUY");
    assert_eq!(
        h["last_known_amt"], "-0.5",
        "the executor's signed amount is untouched"
    );
    assert_eq!(h["last_side"], "SHORT", "last_side is not ours to write");
    let ttl: i64 = redis::cmd("TTL").arg(ledger).query(&mut t.con).unwrap();
    assert!(ttl > 86_000, "{ttl}");
    t.wait_log("malformed apply.result", T);
    t.kill();
    t.start_ready();
    // Evidence the restarted follower read the stream: a later result is
    // applied; the earlier one, if it were replayed, would come first.
    let later: String = redis::cmd("XADD")
        .arg("quantum:stream:apply.result")
        .arg("*")
        .arg("plan_id")
        .arg("res-2")
        .arg("symbol")
        .arg("BTCUSDT")
        .arg("executed")
        .arg("true")
        .arg("steps_results")
        .arg(r#"[{"order_id":11111,"side":"SELL","executed_qty":"0.1"}]"#)
        .query(&mut t.con)
        .unwrap();
    wait_for("the later result applied", T, || {
        let id: Option<String> = redis::cmd("HGET")
            .arg(ledger)
            .arg("last_order_id")
            .query(&mut t.con)
            .ok()?;
        (id.as_deref() == Some("11111")).then_some(())
    });
    // Its log line follows the write; an earlier replay would precede it.
    t.wait_log(&format!("ledger metadata from result {later}"), T);
    let applied = t.grep("ledger metadata from result");
    assert_eq!(applied.len(), 1, "only the later result: {applied:?}");
    assert_eq!(
        pending(&mut t.con, "quantum:stream:apply.result", "p33-ledger"),
        0
    );
}

#[test]
fn the_ledger_follower_claims_results_left_by_a_consumer_that_never_returns() {
    let mut t = spawn_daemon(
        Opts::env_allowlist("BTCUSDT")
            .set("P33_CLAIM_IDLE_S", "0.5")
            .deferred(),
    );
    let stream = "quantum:stream:apply.result";
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg("p33-ledger")
        .arg("0")
        .arg("MKSTREAM")
        .query(&mut t.con)
        .unwrap();
    let _: String = redis::cmd("XADD")
        .arg(stream)
        .arg("*")
        .arg("plan_id")
        .arg("orphan")
        .arg("symbol")
        .arg("BTCUSDT")
        .arg("executed")
        .arg("true")
        .arg("details")
        .arg(r#"{"order_id": 77, "filled_qty": "0.1", "side": "BUY", "order_status": "FILLED"}"#)
        .query(&mut t.con)
        .unwrap();
    // Delivered to a consumer that dies before it ACKs.
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("p33-ledger")
        .arg("p33-gone")
        .arg("COUNT")
        .arg(10)
        .arg("STREAMS")
        .arg(stream)
        .arg(">")
        .query(&mut t.con)
        .unwrap();
    assert_eq!(pending(&mut t.con, stream, "p33-ledger"), 1);
    t.start();
    t.wait_log("claimed 1 apply.result entries", T);
    let h: HashMap<String, String> = wait_for("ledger metadata", T, || {
        let h: HashMap<String, String> = redis::cmd("HGETALL")
            .arg("quantum:position:ledger:BTCUSDT")
            .query(&mut t.con)
            .ok()?;
        h.contains_key("last_order_id").then_some(h)
    });
    assert_eq!(h["last_order_id"], "77");
    assert_eq!(h["last_result_plan_id"], "orphan");
    wait_for("nothing pending", T, || {
        (pending(&mut t.con, stream, "p33-ledger") == 0).then_some(())
    });
}

#[test]
fn json_logs_carry_symbol_and_plan_fields_and_text_lines_stay_exact() {
    let mut t = spawn_daemon(
        Opts::env_allowlist("BTCUSDT")
            .set("P33_LOG_FORMAT", "json")
            .deferred(),
    );
    set_snapshot(&mut t.con, "BTCUSDT", "0.5", now());
    t.start();
    t.wait_log("ready: reading plans", T);
    push_plan(
        &mut t.con,
        &plan(
            "json-plan-1",
            "BTCUSDT",
            "EXECUTE",
            "FULL_CLOSE_PROPOSED",
            "true",
        ),
    );
    let line = t.wait_log("P3.3 ALLOW plan", T);
    let v: Value = serde_json::from_str(&line).expect("one JSON object per line");
    assert_eq!(v["symbol"], "BTCUSDT", "{line}");
    // The whole plan_id, so a log line leads to `explain` (SPEC §14).
    assert_eq!(v["plan_id"], "json-plan-1", "{line}");
    assert_eq!(
        v["message"],
        "BTCUSDT: P3.3 ALLOW plan json-pla (safe_qty=0.5, exchange_amt=0.5)"
    );
    t.kill();
    t.env.insert("P33_LOG_FORMAT".into(), "text".into());
    t.start_ready();
    push_plan(
        &mut t.con,
        &plan(
            "text-plan-1",
            "BTCUSDT",
            "EXECUTE",
            "FULL_CLOSE_PROPOSED",
            "true",
        ),
    );
    let line = t.wait_log("P3.3 ALLOW plan", T);
    assert!(
        line.ends_with("BTCUSDT: P3.3 ALLOW plan text-pla (safe_qty=0.5, exchange_amt=0.5)"),
        "the text line is the SPEC's, no fields appended: {line}"
    );
}

#[test]
fn three_instances_in_one_group_with_one_killed_every_two_seconds_permit_each_plan_once() {
    // Three daemons, one group, one Redis (README "Several instances"). For
    // twenty seconds under load one of them is SIGKILLed every two seconds
    // and restarted a second later with the same consumer name: its pending
    // entries are replayed by itself or claimed by the others.
    let mut t = spawn_daemon(
        Opts::env_allowlist("BTCUSDT")
            .set("P33_STALE_THRESHOLD_SEC", "600")
            .set("P33_CLAIM_IDLE_S", "1")
            .set("P33_LOG_LEVEL", "INFO")
            .deferred(),
    );
    set_snapshot(&mut t.con, "BTCUSDT", "1", now());
    let stop = Arc::new(AtomicBool::new(false));
    let (counts, listener) = count_permit_sets(&t.redis, stop.clone());
    let env_of = |i: usize| {
        let mut e = t.env.clone();
        e.insert("P33_CONSUMER_NAME".into(), format!("p33-inst-{i}"));
        e
    };
    let mut daemons: Vec<Option<Daemon>> = (0..3)
        .map(|i| {
            let d = Daemon::start(&env_of(i));
            d.wait_log("ready: reading plans", T);
            Some(d)
        })
        .collect();

    // The producer: up to 250 plans a second until told to stop.
    let produced = Arc::new(Mutex::new(Vec::<String>::new()));
    let (p_stop, p_ids, mut p_con) = (
        Arc::new(AtomicBool::new(false)),
        produced.clone(),
        t.redis.con(),
    );
    let p_flag = p_stop.clone();
    let producer = std::thread::spawn(move || {
        let mut i = 0;
        while !p_flag.load(Ordering::SeqCst) {
            for _ in 0..25 {
                let id = format!("inst-{i}");
                i += 1;
                push_plan(
                    &mut p_con,
                    &plan(&id, "BTCUSDT", "EXECUTE", "FULL_CLOSE_PROPOSED", "true"),
                );
                p_ids.lock().unwrap().push(id);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let started = std::time::Instant::now();
    let mut victim = 0;
    let mut kills = 0;
    while started.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_secs(1));
        if let Some(mut d) = daemons[victim].take() {
            d.kill();
            kills += 1;
        }
        std::thread::sleep(Duration::from_secs(1));
        daemons[victim] = Some(Daemon::start(&env_of(victim)));
        victim = (victim + 1) % 3;
    }
    p_stop.store(true, Ordering::SeqCst);
    producer.join().unwrap();
    let ids = produced.lock().unwrap().clone();
    eprintln!("{kills} kills, {} plans", ids.len());
    assert!(kills >= 8, "{kills} kills");
    // About 250 a second for 20 s; fewer on a loaded machine, which is no
    // fault of the daemons (the producer is one round trip per plan).
    assert!(ids.len() >= 2000, "{} plans produced", ids.len());

    assert_each_permitted_once(&mut t.con, &counts, stop, listener, &ids, "inst-last");
    // All three were in the group.
    let consumers: redis::Value = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(PLAN_STREAM)
        .arg("p33")
        .query(&mut t.con)
        .unwrap();
    let text = format!("{consumers:?}");
    for i in 0..3 {
        assert!(text.contains(&format!("p33-inst-{i}")), "{text}");
    }
}
