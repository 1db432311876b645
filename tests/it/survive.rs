//! The trading state survives Redis's own failures (SPEC §12): a halt is
//! lifted by a control entry and by nothing else — not a `FLUSHALL`, not a
//! Redis restarted without its data, not a `SET … ACTIVE` by hand, not a
//! daemon restarted into an empty Redis. And the marker: a Redis no gate
//! has armed permits nothing, and `/readyz` says so.

use std::time::Duration;

use crate::common::*;

const T: Duration = Duration::from_secs(10);
const STATE_KEY: &str = "quantum:p33:trading_state";

fn close(id: &str) -> Vec<(&'static str, String)> {
    vec![
        ("plan_id", id.to_string()),
        ("symbol", "BTCUSDT".to_string()),
        ("decision", "EXECUTE".to_string()),
        ("action", "FULL_CLOSE_PROPOSED".to_string()),
        ("reduceOnly", "true".to_string()),
    ]
}

fn push(t: &mut TestDaemon, id: &str) {
    let fields = close(id);
    let f: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    t.push_plan(&f);
}

fn daemon(extra: &[(&str, &str)]) -> TestDaemon {
    let mut o = Opts::env_allowlist("BTCUSDT")
        .set("P33_STALE_THRESHOLD_SEC", "600")
        .deferred();
    for (k, v) in extra {
        o = o.set(k, v);
    }
    let mut t = spawn_daemon(o);
    t.snapshot("BTCUSDT", "0.5", now());
    t.start_ready();
    t
}

fn get(t: &mut TestDaemon, key: &str) -> Option<String> {
    redis::cmd("GET").arg(key).query(&mut t.con).unwrap()
}

/// The restore entries on the control stream: (to, reason, actor).
fn restores(t: &mut TestDaemon) -> Vec<(String, String, String)> {
    let v: redis::Value = redis::cmd("XRANGE")
        .arg("quantum:stream:p33.control")
        .arg("-")
        .arg("+")
        .query(&mut t.con)
        .unwrap();
    let entries: Vec<(String, Vec<(String, String)>)> =
        redis::FromRedisValue::from_redis_value(&v).unwrap();
    entries
        .into_iter()
        .map(|(_, f)| f.into_iter().collect::<std::collections::HashMap<_, _>>())
        .filter(|f| {
            f.get("actor")
                .is_some_and(|a| a.starts_with("p33-restore@"))
        })
        .map(|f| (f["to"].clone(), f["reason"].clone(), f["actor"].clone()))
        .collect()
}

/// After Redis lost the halt: plans pushed at once are never allowed, the
/// key comes back HALTED through a restore entry, with the ERROR line, the
/// counter and the gauge.
fn assert_the_halt_comes_back(t: &mut TestDaemon, tag: &str, from_log: usize) {
    t.snapshot("BTCUSDT", "0.5", now());
    for i in 0..30 {
        push(t, &format!("{tag}-{i}"));
    }
    for i in 0..30 {
        let p = t.wait_permit(&format!("{tag}-{i}"));
        assert_eq!(p["allow"], false, "{tag}-{i}: {p}");
        assert_eq!(p["reason"], "trading_halted", "{tag}-{i}: {p}");
    }
    wait_for("the global key restored", T, || {
        (get(t, STATE_KEY).as_deref() == Some("HALTED")).then_some(())
    });
    t.wait_log_after(
        from_log,
        "P3.3 trading state global restored ACTIVE -> HALTED (the key was missing)",
        T,
    );
    let r = restores(t);
    let last = r.last().expect("a restore entry");
    assert_eq!(last.0, "HALTED");
    assert_eq!(last.1, "restored: the key was missing");
    assert!(get(t, "quantum:p33:armed").is_some(), "armed again");
    assert_eq!(t.metric("p33_trading_state{state=\"HALTED\"}"), Some(1.0));
}

#[test]
fn a_halt_survives_flushall_and_a_redis_restarted_without_its_data() {
    let mut t = daemon(&[]);
    push(&mut t, "before");
    assert_eq!(t.wait_permit("before")["allow"], true);
    ctl_ok(&t, &["halt", "--reason", "incident 42"]);

    let mark = t.log_count();
    let _: () = redis::cmd("FLUSHALL").query(&mut t.con).unwrap();
    assert_the_halt_comes_back(&mut t, "flushed", mark);
    assert!(
        t.metric("p33_trading_state_restored_total{scope=\"global\"}")
            .unwrap_or(0.0)
            >= 1.0
    );

    let mark = t.log_count();
    t.redis.restart_empty();
    t.con = t.redis.con();
    assert_the_halt_comes_back(&mut t, "restarted", mark);
    assert!(
        t.metric("p33_trading_state_restored_total{scope=\"global\"}")
            .unwrap_or(0.0)
            >= 2.0
    );

    // Only a control entry loosens. (The instance reports itself again
    // within 5 s of Redis losing its report: ctl says so until then.)
    t.wait_instance_report();
    let out = ctl_ok(&t, &["resume", "--reason", "incident over"]);
    assert!(out.contains("instances: p33-test"), "{out}");
    assert!(
        out.contains("redis: 127.0.0.1:") && out.contains("(master, user "),
        "{out}"
    );
    assert_eq!(
        get(&mut t, STATE_KEY).as_deref(),
        Some("ACTIVE"),
        "resume writes ACTIVE"
    );
    push(&mut t, "after-resume");
    assert_eq!(t.wait_permit("after-resume")["allow"], true);
    // ctl status shows the restores, with RFC 3339 UTC times.
    let out = ctl_ok(&t, &["status"]);
    let restore = out
        .lines()
        .find(|l| l.contains("restored: the key was missing"))
        .unwrap_or_else(|| panic!("{out}"));
    let time = restore.split_whitespace().next().unwrap();
    assert!(
        time.len() == 20 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
        "{restore}"
    );
    assert!(restore.contains("global ACTIVE -> HALTED"), "{restore}");
    assert!(!out.contains(" ts="), "{out}");
}

#[test]
fn a_state_loosened_by_hand_is_never_in_force_and_is_put_back() {
    let mut t = daemon(&[]);
    ctl_ok(&t, &["halt", "--reason", "incident 43"]);
    ctl_ok(
        &t,
        &["halt", "--symbol", "BTCUSDT", "--reason", "this one too"],
    );
    let mark = t.log_count();
    // No control entry: a direct SET, and a symbol key deleted.
    let _: () = redis::cmd("SET")
        .arg(STATE_KEY)
        .arg("ACTIVE")
        .query(&mut t.con)
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(format!("{STATE_KEY}:BTCUSDT"))
        .query(&mut t.con)
        .unwrap();
    push(&mut t, "by-hand");
    let p = t.wait_permit("by-hand");
    assert_eq!(
        (p["allow"].clone(), p["reason"].clone()),
        (false.into(), "trading_halted".into()),
        "{p}"
    );
    wait_for("both keys restored", T, || {
        (get(&mut t, STATE_KEY).as_deref() == Some("HALTED")
            && get(&mut t, &format!("{STATE_KEY}:BTCUSDT")).as_deref() == Some("HALTED"))
        .then_some(())
    });
    t.wait_log_after(
        mark,
        "P3.3 trading state global restored ACTIVE -> HALTED (the key read ACTIVE without a control entry)",
        T,
    );
    t.wait_log_after(
        mark,
        "P3.3 trading state symbol:BTCUSDT restored NONE -> HALTED (the key was missing)",
        T,
    );
    assert_eq!(
        t.metric("p33_trading_state_restored_total{scope=\"symbol\"}"),
        Some(1.0)
    );
    // A stricter value by hand is enforced, and said.
    let _: () = redis::cmd("SET")
        .arg(format!("{STATE_KEY}:ETHUSDT"))
        .arg("REDUCING")
        .query(&mut t.con)
        .unwrap();
    t.wait_log_after(
        mark,
        "P3.3 trading state symbol:ETHUSDT: the key reads REDUCING without a control entry (known: NONE); enforced",
        T,
    );
}

#[test]
fn a_daemon_restarted_into_an_empty_redis_restores_the_halt_from_its_state_file() {
    let dir =
        std::env::temp_dir().join(format!("p33-state-{}-{}", free_port(), std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut t = daemon(&[("STATE_DIRECTORY", dir.to_str().unwrap())]);
    ctl_ok(&t, &["reduce", "--reason", "risk review"]);
    wait_for("the state file", T, || {
        let s = std::fs::read_to_string(dir.join("trading_state.json")).ok()?;
        s.contains("REDUCING").then_some(())
    });
    t.kill();
    t.redis.restart_empty();
    t.con = t.redis.con();
    t.snapshot("BTCUSDT", "0", now());
    t.start_ready();
    t.wait_log("trading state: known from", T);
    wait_for("the key restored", T, || {
        (get(&mut t, STATE_KEY).as_deref() == Some("REDUCING")).then_some(())
    });
    let open = [
        ("plan_id", "open-after"),
        ("symbol", "BTCUSDT"),
        ("decision", "EXECUTE"),
        ("action", "OPEN_LONG"),
        ("reduceOnly", "false"),
    ];
    t.push_plan(&open);
    assert_eq!(t.wait_permit("open-after")["reason"], "trading_reducing");
    assert_eq!(t.get("/readyz").0, 200);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_redis_no_gate_armed_permits_nothing_and_readyz_says_why() {
    let mut t = spawn_daemon(
        Opts::env_allowlist("BTCUSDT")
            .set("P33_STALE_THRESHOLD_SEC", "600")
            .unarmed()
            .deferred(),
    );
    t.snapshot("BTCUSDT", "0.5", now());
    t.start();
    // A first start waits for a peer that knows more, then arms.
    t.wait_log("waiting 2 s for a peer that knows more", T);
    let (code, body) = t.get("/readyz");
    assert_eq!((code, body.trim()), (503, "trading state unknown"));
    t.wait_log("trading state: armed Redis (at start)", T);
    wait_for("readyz 200", T, || {
        (t.get("/readyz").0 == 200).then_some(())
    });
    assert_eq!(t.metric("p33_trading_state_armed"), Some(1.0));
    // A dry-run instance knows no state of its own making and arms nothing;
    // a live one with the marker gone has its batch wait, then restores.
    let _: () = redis::cmd("DEL")
        .arg("quantum:p33:armed")
        .query(&mut t.con)
        .unwrap();
    push(&mut t, "unarmed");
    assert_eq!(
        t.wait_permit("unarmed")["allow"],
        true,
        "armed again, then judged"
    );
    assert!(get(&mut t, "quantum:p33:armed").is_some());
}

#[test]
fn readyz_is_503_while_fail_closed() {
    let t = spawn_daemon(Opts::default().set("P33_ALLOWLIST_SOURCE", "env"));
    t.wait_log("FAIL-CLOSED", T);
    let (code, body) = t.get("/readyz");
    assert_eq!((code, body.trim()), (503, "fail-closed: no allowlist"));
}
