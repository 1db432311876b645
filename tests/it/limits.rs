//! Automatic limits (SPEC §13): open throttles counted inside the atomic
//! write — exactly N of M, closes never throttled, per symbol, a sliding
//! window, one budget for two daemons, the latch.

use std::time::Duration;

use serde_json::Value;

use crate::common::*;

const T: Duration = Duration::from_secs(10);
const FLAT: [&str; 8] = [
    "AAAUSDT", "BBBUSDT", "CCCUSDT", "DDDUSDT", "EEEUSDT", "FFFUSDT", "GGGUSDT", "HHHUSDT",
];

fn plan_fields(id: &str, symbol: &str, open: bool) -> Vec<(String, String)> {
    let (action, reduce) = if open {
        ("OPEN_LONG", "false")
    } else {
        ("FULL_CLOSE_PROPOSED", "true")
    };
    [
        ("plan_id", id),
        ("symbol", symbol),
        ("decision", "EXECUTE"),
        ("action", action),
        ("reduceOnly", reduce),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn push(con: &mut redis::Connection, id: &str, symbol: &str, open: bool) {
    let f = plan_fields(id, symbol, open);
    let f: Vec<(&str, &str)> = f.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    push_plan(con, &f);
}

/// A daemon whose allowlist holds eight flat symbols and BTCUSDT (a long).
fn limited(extra: &[(&str, &str)]) -> TestDaemon {
    let list = format!("BTCUSDT,{}", FLAT.join(","));
    let mut opts = Opts::env_allowlist(&list).set("P33_STALE_THRESHOLD_SEC", "600");
    for (k, v) in extra {
        opts = opts.set(k, v);
    }
    let mut t = spawn_daemon(opts.deferred());
    let n = now();
    t.snapshot("BTCUSDT", "0.5", n);
    for s in FLAT {
        t.snapshot(s, "0", n);
    }
    t.start_ready();
    t
}

fn reasons(t: &mut TestDaemon, ids: &[String]) -> Vec<String> {
    ids.iter()
        .map(|id| {
            let p = wait_permit(&mut t.con, id);
            p["reason"].as_str().unwrap_or("").to_string()
        })
        .collect()
}

#[test]
fn exactly_n_of_m_opens_are_allowed_and_closes_are_never_throttled() {
    let mut t = limited(&[("P33_MAX_OPENS", "3/60s")]);
    let ids: Vec<String> = (0..5).map(|i| format!("open-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        push(&mut t.con, id, FLAT[i], true);
    }
    let got = reasons(&mut t, &ids);
    assert_eq!(
        got,
        vec![
            "open_permit_granted",
            "open_permit_granted",
            "open_permit_granted",
            "throttled",
            "throttled"
        ]
    );
    let p = wait_permit(&mut t.con, "open-4");
    assert_eq!(
        p["context"],
        serde_json::json!({"scope": "global", "limit": 3, "window_s": 60})
    );
    push(&mut t.con, "close-btc", "BTCUSDT", false);
    assert_eq!(
        wait_permit(&mut t.con, "close-btc")["allow"],
        true,
        "exits are never blocked by entry limits"
    );
    t.wait_metric("p33_limit_denies_total{limit=\"max_opens\"}", 2.0);
}

#[test]
fn the_per_symbol_throttle_counts_each_symbol_alone() {
    let mut t = limited(&[("P33_MAX_OPENS_PER_SYMBOL", "1/60s")]);
    push(&mut t.con, "a-1", "AAAUSDT", true);
    push(&mut t.con, "a-2", "AAAUSDT", true);
    push(&mut t.con, "b-1", "BBBUSDT", true);
    let ids: Vec<String> = ["a-1", "a-2", "b-1"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(
        reasons(&mut t, &ids),
        vec!["open_permit_granted", "throttled", "open_permit_granted"]
    );
    let p = wait_permit(&mut t.con, "a-2");
    assert_eq!(p["context"]["scope"], "symbol", "{p}");
    assert_eq!(p["context"]["limit"], 1, "{p}");
    t.wait_metric(
        "p33_limit_denies_total{limit=\"max_opens_per_symbol\"}",
        1.0,
    );
}

#[test]
fn the_window_slides() {
    let mut t = limited(&[("P33_MAX_OPENS", "1/1s")]);
    push(&mut t.con, "w-0", "AAAUSDT", true);
    push(&mut t.con, "w-1", "BBBUSDT", true);
    let ids: Vec<String> = ["w-0", "w-1"].iter().map(|s| s.to_string()).collect();
    assert_eq!(
        reasons(&mut t, &ids),
        vec!["open_permit_granted", "throttled"]
    );
    // Opens keep coming; once the first leaves the window, one is allowed.
    let mut i = 2;
    // (wait_for fails the test if none ever is.)
    wait_for("an open allowed again", T, || {
        let id = format!("w-{i}");
        i += 1;
        push(&mut t.con, &id, FLAT[i % FLAT.len()], true);
        let p = wait_permit(&mut t.con, &id);
        if p["allow"] == true {
            return Some(());
        }
        assert_eq!(p["reason"], "throttled", "{p}");
        std::thread::sleep(Duration::from_millis(100));
        None
    });
}

#[test]
fn two_daemons_in_one_group_share_one_budget() {
    let mut t = limited(&[("P33_MAX_OPENS", "5/60s")]);
    let mut env2 = t.env.clone();
    env2.insert("P33_CONSUMER_NAME".into(), "p33-second".into());
    let second = Daemon::start(&env2);
    second.wait_log("ready: reading plans", T);
    let mut ids = Vec::new();
    for round in 0..3 {
        for (i, s) in FLAT.iter().enumerate() {
            let id = format!("two-{round}-{i}");
            push(&mut t.con, &id, s, true);
            ids.push(id);
            // Paced, so both blocked readers get entries (Redis serves
            // blocked consumers in turn).
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let permits: Vec<Value> = ids.iter().map(|id| wait_permit(&mut t.con, id)).collect();
    let allowed = permits.iter().filter(|p| p["allow"] == true).count();
    assert_eq!(allowed, 5, "two daemons, one budget of 5 in 60 s");
    let throttled = permits
        .iter()
        .filter(|p| p["reason"] == "throttled")
        .count();
    assert_eq!(throttled, ids.len() - 5);
    // Both read plans: each wrote some of the permits.
    for d in [&*t, &second] {
        wait_for("permit lines from both daemons", T, || {
            (!d.grep("P3.3 DENY plan").is_empty() || !d.grep("P3.3 ALLOW plan").is_empty())
                .then_some(())
        });
    }
}

#[test]
fn the_latch_sets_reducing_until_an_operator_resumes() {
    let mut t = limited(&[("P33_MAX_OPENS", "2/60s"), ("P33_THROTTLE_LATCH", "true")]);
    for (i, s) in FLAT.iter().take(3).enumerate() {
        push(&mut t.con, &format!("latch-{i}"), s, true);
    }
    let ids: Vec<String> = (0..3).map(|i| format!("latch-{i}")).collect();
    // The first two were granted; the latch's REDUCING then revokes such
    // outstanding opens (SPEC §12), so they may read trading_reducing.
    let granted: Vec<bool> = ids
        .iter()
        .map(|id| {
            let p = wait_permit(&mut t.con, id);
            p["allow"] == true || p["context"]["revoked"] == true
        })
        .collect();
    assert_eq!(granted, vec![true, true, false]);
    assert_eq!(wait_permit(&mut t.con, "latch-2")["reason"], "throttled");
    let state: String = redis::cmd("GET")
        .arg("quantum:p33:trading_state")
        .query(&mut t.con)
        .unwrap();
    assert_eq!(state, "REDUCING");
    let line = t.wait_log("P3.3 trading state global ACTIVE -> REDUCING", T);
    assert!(line.contains("actor=p33-auto"), "{line}");
    assert!(line.contains("P33_MAX_OPENS=2/60s"), "{line}");
    t.wait_metric("p33_throttle_latch_tripped", 1.0);
    push(&mut t.con, "latch-after", "DDDUSDT", true);
    assert_eq!(
        wait_permit(&mut t.con, "latch-after")["reason"],
        "trading_reducing"
    );
    push(&mut t.con, "latch-close", "BTCUSDT", false);
    assert_eq!(wait_permit(&mut t.con, "latch-close")["allow"], true);
    let ops = ops_env(&t.env);
    let env: Vec<(&str, &str)> = ops.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (code, out, err) = run_once(&["ctl", "status"], &env);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("throttle latch  TRIPPED"), "{out}");
    let (code, out, err) = run_once(&["ctl", "resume", "--reason", "checked"], &env);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("global REDUCING -> ACTIVE"), "{out}");
}

#[test]
fn bad_limit_values_exit_78_naming_the_variable() {
    for (var, bad) in [
        ("P33_MAX_OPENS", "20"),
        ("P33_MAX_OPENS", "0/60s"),
        ("P33_MAX_OPENS_PER_SYMBOL", "2/0s"),
        ("P33_THROTTLE_LATCH", "maybe"),
    ] {
        let (code, _, err) = run_once(
            &["--check-config"],
            &[(var, bad), ("P33_SNAPSHOT_SOURCE", "external")],
        );
        assert_eq!(code, Some(78), "{var}={bad}: {err}");
        assert!(err.contains(var), "{err}");
    }
}

#[test]
fn the_position_cap_counts_positions_and_opens_in_flight() {
    // BTCUSDT holds a position: one of the two allowed.
    let mut t = limited(&[("P33_MAX_OPEN_POSITIONS", "2")]);
    push(&mut t.con, "cap-a", "AAAUSDT", true);
    assert_eq!(wait_permit(&mut t.con, "cap-a")["allow"], true);
    push(&mut t.con, "cap-b", "BBBUSDT", true);
    let p = wait_permit(&mut t.con, "cap-b");
    assert_eq!(p["reason"], "max_open_positions", "{p}");
    assert_eq!(
        p["context"],
        serde_json::json!({"positions": 1, "in_flight": 1, "limit": 2}),
        "AAAUSDT was granted an open and is still flat"
    );
    // AAAUSDT fills: it now holds a position and is no longer in flight.
    t.snapshot("AAAUSDT", "1", now());
    let mut i = 0;
    let p = wait_for("the cap to see AAAUSDT's position", T, || {
        let id = format!("cap-c-{i}");
        i += 1;
        push(&mut t.con, &id, "CCCUSDT", true);
        let p = wait_permit(&mut t.con, &id);
        assert_eq!(p["reason"], "max_open_positions", "{p}");
        if p["context"]["positions"] == 2 {
            return Some(p);
        }
        std::thread::sleep(Duration::from_millis(200));
        None
    });
    assert_eq!(p["context"]["in_flight"], 0, "{p}");
    push(&mut t.con, "cap-close", "BTCUSDT", false);
    assert_eq!(
        wait_permit(&mut t.con, "cap-close")["allow"],
        true,
        "closes are never capped"
    );
    t.wait_metric("p33_limit_denies_total{limit=\"max_open_positions\"}", 2.0);
    let (code, _, err) = run_once(
        &["--check-config"],
        &[
            ("P33_MAX_OPEN_POSITIONS", "0"),
            ("P33_SNAPSHOT_SOURCE", "external"),
        ],
    );
    assert_eq!(code, Some(78), "{err}");
    assert!(err.contains("P33_MAX_OPEN_POSITIONS"), "{err}");
}

#[test]
fn a_snapshot_key_of_another_type_counts_as_a_position_for_the_cap() {
    // BTCUSDT holds a position; DDDUSDT's snapshot is a list, which cannot
    // say it is flat: the cap counts it (fail closed), the batch goes on.
    let mut t = limited(&[("P33_MAX_OPEN_POSITIONS", "2")]);
    let _: () = redis::cmd("DEL")
        .arg("quantum:position:snapshot:DDDUSDT")
        .query(&mut t.con)
        .unwrap();
    let _: () = redis::cmd("RPUSH")
        .arg("quantum:position:snapshot:DDDUSDT")
        .arg("x")
        .query(&mut t.con)
        .unwrap();
    push(&mut t.con, "wt-a", "AAAUSDT", true);
    let p = wait_permit(&mut t.con, "wt-a");
    assert_eq!(p["reason"], "max_open_positions", "{p}");
    assert_eq!(p["context"]["positions"], 2, "{p}");
}
