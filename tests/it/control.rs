//! The operator's trading state (SPEC §12): `ctl` against the real daemon
//! and a private Redis — halt, reduce, resume, symbol overrides, fail-closed
//! values, the control entries, the WARN line, the gauges, and the atomic
//! guarantee that no allow is written after a halt returned.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::common::*;

const T: Duration = Duration::from_secs(10);

fn close(id: &str, symbol: &str) -> Vec<(&'static str, String)> {
    vec![
        ("plan_id", id.to_string()),
        ("symbol", symbol.to_string()),
        ("decision", "EXECUTE".to_string()),
        ("action", "FULL_CLOSE_PROPOSED".to_string()),
        ("reduceOnly", "true".to_string()),
    ]
}

fn push(t: &mut TestDaemon, fields: Vec<(&'static str, String)>) {
    let f: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    t.push_plan(&f);
}

fn open(id: &str, symbol: &str) -> Vec<(&'static str, String)> {
    vec![
        ("plan_id", id.to_string()),
        ("symbol", symbol.to_string()),
        ("decision", "EXECUTE".to_string()),
        ("action", "OPEN_LONG".to_string()),
        ("reduceOnly", "false".to_string()),
    ]
}

/// The binary with the daemon's environment (any subcommand).
fn ctl_like(t: &TestDaemon, args: &[&str]) -> (Option<i32>, String, String) {
    let env: Vec<(&str, &str)> = t
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    run_once(args, &env)
}

fn daemon() -> TestDaemon {
    let mut t = spawn_daemon(
        Opts::env_allowlist("BTCUSDT,ETHUSDT")
            .set("P33_STALE_THRESHOLD_SEC", "600")
            .deferred(),
    );
    let n = now();
    t.snapshot("BTCUSDT", "0.5", n);
    t.snapshot("ETHUSDT", "0", n);
    t.start_ready();
    t
}

#[test]
fn halt_reduce_and_resume_take_effect_and_are_recorded() {
    let mut t = daemon();
    push(&mut t, open("before-open", "ETHUSDT"));
    assert_eq!(t.wait_permit("before-open")["allow"], true);

    let out = ctl_ok(&t, &["halt", "--reason", "runaway strategy"]);
    assert!(out.contains("global ACTIVE -> HALTED"), "{out}");
    push(&mut t, close("halted-close", "BTCUSDT"));
    push(&mut t, open("halted-open", "ETHUSDT"));
    let mut rc = close("halted-reconcile", "BTCUSDT");
    rc[2].1 = "RECONCILE_CLOSE".into();
    push(&mut t, rc);
    for id in ["halted-close", "halted-open", "halted-reconcile"] {
        let p = t.wait_permit(id);
        assert_eq!(p["allow"], false, "{id}: {p}");
        assert_eq!(p["reason"], "trading_halted", "{id}: {p}");
        assert_eq!(p["context"]["scope"], "global", "{id}: {p}");
    }
    // A plan_id with JSON's special characters is escaped in the deny.
    let odd = r#"odd"id\x%1"#;
    push(&mut t, close(odd, "BTCUSDT"));
    let p = t.wait_permit(odd);
    assert_eq!(p["plan_id"], odd, "{p}");
    assert_eq!(p["reason"], "trading_halted", "{p}");
    assert_eq!(p["symbol"], "BTCUSDT", "{p}");
    let line = t.wait_log("P3.3 trading state global ACTIVE -> HALTED", T);
    assert!(line.contains("WARN"), "{line}");
    assert!(
        line.contains("(reason=runaway strategy, actor=alice@"),
        "{line}"
    );
    t.wait_metric("p33_trading_state{state=\"HALTED\"}", 1.0);
    assert_eq!(t.metric("p33_trading_state{state=\"ACTIVE\"}"), Some(0.0));
    t.wait_metric(
        "p33_permit_deny_total{reason=\"trading_halted\",symbol=\"BTCUSDT\"}",
        2.0,
    );

    ctl_ok(&t, &["reduce", "--reason", "let positions close"]);
    push(&mut t, close("reducing-close", "BTCUSDT"));
    push(&mut t, open("reducing-open", "ETHUSDT"));
    let p = t.wait_permit("reducing-close");
    assert_eq!(p["allow"], true, "closes go on while reducing: {p}");
    let p = t.wait_permit("reducing-open");
    assert_eq!(p["reason"], "trading_reducing", "{p}");
    assert_eq!(p["context"]["scope"], "global", "{p}");

    ctl_ok(&t, &["resume", "--reason", "all clear"]);
    push(&mut t, open("resumed-open", "ETHUSDT"));
    assert_eq!(t.wait_permit("resumed-open")["allow"], true);
    t.wait_log("P3.3 trading state global REDUCING -> ACTIVE", T);
    t.wait_metric("p33_trading_state{state=\"ACTIVE\"}", 1.0);

    // The record: one entry per change, newest last, with every field.
    let v: redis::Value = redis::cmd("XRANGE")
        .arg("quantum:stream:p33.control")
        .arg("-")
        .arg("+")
        .query(&mut t.con)
        .unwrap();
    // The changes, and after the halt and the reduce one confirmation each
    // of the daemon's revocation (SPEC §12).
    let (entries, confirmations): (Vec<_>, Vec<_>) =
        position_state_brain::redis::stream::parse_entries(&v)
            .into_iter()
            .partition(|e| e.fields.as_ref().is_some_and(|f| !f.contains_key("ref")));
    assert_eq!(entries.len(), 3);
    assert_eq!(confirmations.len(), 2);
    let f = entries[0].fields.as_ref().unwrap();
    assert_eq!(f["scope"], "global");
    assert_eq!(f["symbol"], "");
    assert_eq!(f["from"], "ACTIVE");
    assert_eq!(f["to"], "HALTED");
    assert_eq!(f["reason"], "runaway strategy");
    assert!(f["actor"].starts_with("alice@"), "{f:?}");
    let ts: i64 = f["ts"].parse().expect("ts in whole seconds");
    assert!((ts as f64 - now()).abs() < 60.0);
    let last = entries[2].fields.as_ref().unwrap();
    assert_eq!(
        (last["from"].as_str(), last["to"].as_str()),
        ("REDUCING", "ACTIVE")
    );
}

#[test]
fn a_symbol_override_is_the_stricter_state_and_resume_removes_it() {
    let mut t = daemon();
    ctl_ok(
        &t,
        &["halt", "--symbol", "BTCUSDT", "--reason", "bad fills"],
    );
    push(&mut t, close("sym-btc", "BTCUSDT"));
    push(&mut t, open("sym-eth", "ETHUSDT"));
    let p = t.wait_permit("sym-btc");
    assert_eq!(p["reason"], "trading_halted");
    assert_eq!(p["context"]["scope"], "symbol");
    assert_eq!(
        t.wait_permit("sym-eth")["allow"],
        true,
        "other symbols trade"
    );
    t.wait_log("P3.3 trading state symbol:BTCUSDT NONE -> HALTED", T);
    t.wait_metric("p33_symbol_overrides{state=\"HALTED\"}", 1.0);

    // A global REDUCING is milder than the symbol's HALTED: HALTED stands.
    ctl_ok(&t, &["reduce", "--reason", "calm down"]);
    push(&mut t, close("sym-btc-2", "BTCUSDT"));
    assert_eq!(t.wait_permit("sym-btc-2")["context"]["scope"], "symbol");

    ctl_ok(&t, &["resume", "--symbol", "BTCUSDT", "--reason", "fixed"]);
    let exists: i64 = redis::cmd("EXISTS")
        .arg("quantum:p33:trading_state:BTCUSDT")
        .query(&mut t.con)
        .unwrap();
    assert_eq!(exists, 0, "resume of a symbol deletes its key");
    push(&mut t, close("sym-btc-3", "BTCUSDT"));
    assert_eq!(
        t.wait_permit("sym-btc-3")["allow"],
        true,
        "a close goes on under the global REDUCING"
    );
    let out = ctl_ok(&t, &["status"]);
    assert!(out.contains("trading state   REDUCING (set)"), "{out}");
    assert!(out.contains("overrides       none"), "{out}");
    assert!(out.contains("symbol:BTCUSDT HALTED -> NONE"), "{out}");
    let json: Value = serde_json::from_str(&ctl_ok(&t, &["status", "--json"])).unwrap();
    assert_eq!(json["global"], "REDUCING");
    // The running instance's own view (it reports itself every 5 s).
    let inst = &json["instances"][0];
    assert_eq!(inst["source"], "env", "{json}");
    assert_eq!(inst["consumer"], "p33-test", "{json}");
    let changes = json["control"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| !e["actor"].as_str().unwrap_or("").starts_with("p33-revoke@"))
        .count();
    assert_eq!(changes, 3, "{json}");
    assert_eq!(json["latch_tripped"], false);
}

#[test]
fn unknown_values_and_wrong_types_are_halted() {
    let mut t = daemon();
    let _: () = redis::cmd("SET")
        .arg("quantum:p33:trading_state")
        .arg("paused")
        .query(&mut t.con)
        .unwrap();
    push(&mut t, close("garbage", "BTCUSDT"));
    let p = t.wait_permit("garbage");
    assert_eq!(p["reason"], "trading_halted", "{p}");
    assert_eq!(p["context"]["scope"], "global");
    let _: () = redis::cmd("SET")
        .arg("quantum:p33:trading_state")
        .arg(" active ")
        .query(&mut t.con)
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg("quantum:p33:trading_state:BTCUSDT")
        .arg("state")
        .arg("ACTIVE")
        .query(&mut t.con)
        .unwrap();
    push(&mut t, close("wrong-type", "BTCUSDT"));
    push(&mut t, open("any-case", "ETHUSDT"));
    let p = t.wait_permit("wrong-type");
    assert_eq!(p["reason"], "trading_halted", "{p}");
    assert_eq!(p["context"]["scope"], "symbol");
    assert_eq!(
        t.wait_permit("any-case")["allow"],
        true,
        "' active ' is ACTIVE"
    );
    t.wait_metric("p33_symbol_overrides{state=\"HALTED\"}", 1.0);
}

#[test]
fn the_default_state_applies_while_the_key_is_missing() {
    let mut t = spawn_daemon(
        Opts::env_allowlist("BTCUSDT")
            .set("P33_STALE_THRESHOLD_SEC", "600")
            .set("P33_DEFAULT_TRADING_STATE", "halted")
            .deferred(),
    );
    t.snapshot("BTCUSDT", "0.5", now());
    t.start_ready();
    push(&mut t, close("default-halted", "BTCUSDT"));
    assert_eq!(t.wait_permit("default-halted")["reason"], "trading_halted");
    let out = ctl_ok(&t, &["resume", "--reason", "start trading"]);
    assert!(out.contains("global HALTED -> ACTIVE"), "{out}");
    push(&mut t, close("after-resume", "BTCUSDT"));
    assert_eq!(t.wait_permit("after-resume")["allow"], true);

    let (code, _, err) = run_once(
        &["--check-config"],
        &[
            ("P33_SNAPSHOT_SOURCE", "external"),
            ("P33_DEFAULT_TRADING_STATE", "PAUSED"),
        ],
    );
    assert_eq!(code, Some(78), "{err}");
    assert!(err.contains("P33_DEFAULT_TRADING_STATE"), "{err}");
}

#[test]
fn ctl_says_what_is_wrong_with_exit_codes() {
    let t = daemon();
    let (code, _, err) = ctl(&t, &["halt"]);
    assert_eq!(code, Some(64), "missing --reason is a usage error: {err}");
    assert!(err.contains("--reason"), "{err}");
    let (code, _, err) = ctl(&t, &["pause", "--reason", "x"]);
    assert_eq!(code, Some(64), "{err}");
    let (code, _, err) = ctl(&t, &["halt", "--symbol", "btc-usdt", "--reason", "x"]);
    assert_eq!(code, Some(64), "{err}");
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}/0");
    let (code, out, err) = run_once(
        &["ctl", "status"],
        &[
            ("REDIS_URL", url.as_str()),
            ("P33_SNAPSHOT_SOURCE", "external"),
        ],
    );
    assert_eq!(code, Some(1), "{out}{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains("cannot reach Redis"), "{err}");
    let (code, _, err) = run_once(
        &["ctl", "status"],
        &[("REDIS_URL", url.as_str()), ("P33_POLL_SEC", "abc")],
    );
    assert_eq!(code, Some(78), "a bad configuration: {err}");
    assert_eq!(
        redis::cmd("EXISTS")
            .arg("quantum:p33:trading_state")
            .query::<i64>(&mut t.redis.con())
            .unwrap(),
        0,
        "nothing was changed"
    );
}

/// Plans flow at a few hundred per second while `ctl halt` runs: not one
/// permit with `allow: true` is SET after the command returned. Keyspace
/// events arrive in the order Redis executed the commands, so every permit
/// SET after the state key's SET must be a deny.
#[test]
fn no_allow_is_written_after_a_halt_returned() {
    let mut t = daemon();
    let events: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let listener = {
        let mut con = t.redis.con();
        let (events, stop) = (events.clone(), stop.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let h = std::thread::spawn(move || {
            con.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let mut ps = con.as_pubsub();
            ps.psubscribe("__keyspace@0__:quantum:p*").unwrap();
            tx.send(()).unwrap();
            while !stop.load(Ordering::SeqCst) {
                if let Ok(m) = ps.get_message() {
                    let event: String = m.get_payload().unwrap_or_default();
                    if event == "set" {
                        let key = m.get_channel_name().trim_start_matches("__keyspace@0__:");
                        events.lock().unwrap().push(key.to_string());
                    }
                }
            }
        });
        rx.recv().unwrap();
        h
    };
    let pushing = Arc::new(AtomicBool::new(true));
    let pusher = {
        let mut con = t.redis.con();
        let pushing = pushing.clone();
        std::thread::spawn(move || {
            let mut i = 0u32;
            while pushing.load(Ordering::SeqCst) && i < 20_000 {
                let id = format!("flow-{i}");
                let f = close(&id, "BTCUSDT");
                let f: Vec<(&str, &str)> = f.iter().map(|(k, v)| (*k, v.as_str())).collect();
                push_plan(&mut con, &f);
                i += 1;
                std::thread::sleep(Duration::from_millis(3));
            }
        })
    };
    wait_for("allows flowing", T, || {
        (events.lock().unwrap().len() >= 100).then_some(())
    });
    let out = ctl_ok(&t, &["halt", "--reason", "atomic test"]);
    assert!(out.contains("-> HALTED"), "{out}");
    let at_return = events.lock().unwrap().len();
    wait_for("permits written after the halt", T, || {
        (events.lock().unwrap().len() >= at_return + 100).then_some(())
    });
    pushing.store(false, Ordering::SeqCst);
    pusher.join().unwrap();
    stop.store(true, Ordering::SeqCst);
    listener.join().unwrap();
    let ev = events.lock().unwrap().clone();
    let halt_at = ev
        .iter()
        .position(|k| k == "quantum:p33:trading_state")
        .expect("the state key's SET was seen");
    assert!(halt_at <= at_return, "the SET came before ctl returned");
    let mut reasons: HashMap<String, usize> = HashMap::new();
    let mut allows_before = 0;
    for (i, key) in ev.iter().enumerate() {
        let Some(id) = key.strip_prefix("quantum:permit:p33:") else {
            continue;
        };
        let p = read_permit(&mut t.con, id).expect("permits live 60 s");
        if i < halt_at {
            // An allow written before the halt was revoked by it since.
            allows_before += usize::from(p["allow"] == true || p["context"]["revoked"] == true);
        } else {
            assert_eq!(p["allow"], false, "{id} written after the halt: {p}");
            *reasons
                .entry(p["reason"].as_str().unwrap_or("").to_string())
                .or_default() += 1;
        }
    }
    assert!(allows_before >= 50, "allows flowed before: {allows_before}");
    assert!(
        reasons.get("trading_halted").copied().unwrap_or(0) >= 100,
        "{reasons:?}"
    );
}

fn redis_cmd(t: &mut TestDaemon, args: &[&str]) -> redis::RedisResult<redis::Value> {
    let mut c = redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    c.query(&mut t.con)
}

const CONTROL: &str = "quantum:stream:p33.control";

#[test]
fn a_change_whose_control_entry_cannot_be_written_changes_nothing() {
    let mut t = daemon();
    for (name, breaker) in [
        ("a string", vec!["SET", CONTROL, "x"]),
        (
            "at its last possible ID",
            vec![
                "XADD",
                CONTROL,
                "18446744073709551615-18446744073709551615",
                "f",
                "v",
            ],
        ),
    ] {
        redis_cmd(&mut t, &["DEL", CONTROL]).unwrap();
        redis_cmd(&mut t, &breaker).unwrap();
        for args in [
            vec!["halt", "--reason", "test"],
            vec!["reduce", "--symbol", "BTCUSDT", "--reason", "test"],
        ] {
            let (code, out, err) = ctl(&t, &args);
            assert_eq!(code, Some(1), "{name} {args:?}: {out}{err}");
            assert!(
                err.contains("nothing was changed") && err.contains(CONTROL),
                "{name}: {err}"
            );
            for key in [
                "quantum:p33:trading_state",
                "quantum:p33:trading_state:BTCUSDT",
            ] {
                let v: Option<String> = redis::cmd("GET").arg(key).query(&mut t.con).unwrap();
                assert_eq!(v, None, "{name} {args:?}: {key} unchanged");
            }
        }
    }
}

#[test]
fn ctl_the_gauge_and_the_write_script_read_a_state_value_alike() {
    let mut t = daemon();
    // A no-break space is no blank to the script: HALTED; so is a byte
    // that is not UTF-8.
    for (name, value) in [
        ("no-break space", "ACTIVE\u{a0}".as_bytes().to_vec()),
        ("Latin-1 byte", b"ACTIVE\xe9".to_vec()),
    ] {
        let _: () = redis::cmd("SET")
            .arg("quantum:p33:trading_state")
            .arg(&value)
            .query(&mut t.con)
            .unwrap();
        let id = format!("nbsp-{}", name.len());
        push(&mut t, close(&id, "BTCUSDT"));
        assert_eq!(t.wait_permit(&id)["reason"], "trading_halted", "{name}");
        let out = ctl_ok(&t, &["status"]);
        assert!(out.contains("trading state   HALTED"), "{name}: {out}");
        let (_, json, _) = ctl(&t, &["status", "--json"]);
        let v: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["global"], "HALTED", "{name}");
        t.wait_metric("p33_trading_state{state=\"HALTED\"}", 1.0);
        assert_eq!(t.metric("p33_trading_state{state=\"ACTIVE\"}"), Some(0.0));
    }
}

#[test]
fn a_forged_p33_auto_entry_is_no_tripped_latch() {
    let mut t = daemon();
    // Anyone who can write the stream can name p33-auto as the actor.
    ctl_ok(&t, &["reduce", "--reason", "operator"]);
    redis_cmd(
        &mut t,
        &[
            "XADD", CONTROL, "*", "scope", "global", "symbol", "", "from", "ACTIVE", "to",
            "REDUCING", "reason", "forged", "actor", "p33-auto", "ts", "1",
        ],
    )
    .unwrap();
    t.wait_log("reason=forged, actor=p33-auto", T);
    let out = ctl_ok(&t, &["status"]);
    assert!(out.contains("throttle latch  not tripped"), "{out}");
    let (_, json, _) = ctl(&t, &["status", "--json"]);
    let v: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["latch_tripped"], false, "{v}");
    assert_eq!(t.metric("p33_throttle_latch_tripped"), Some(0.0));
}

#[test]
fn control_entries_cannot_forge_log_lines_or_paint_the_terminal() {
    let mut t = daemon();
    let evil = format!(
        "x\nP3.3 trading state global HALTED -> ACTIVE \u{1b}[2J{}",
        "y".repeat(3_000_000)
    );
    redis_cmd(
        &mut t,
        &[
            "XADD",
            CONTROL,
            "*",
            "scope",
            "global",
            "symbol",
            "",
            "from",
            "ACTIVE",
            "to",
            "HALTED\n",
            "reason",
            &evil,
            "actor",
            "mallory\u{1b}[31m",
            "ts",
            "1",
        ],
    )
    .unwrap();
    let line = t.wait_log("actor=mallory", T);
    assert!(line.contains("\\n") && line.contains("\\u{1b}"), "{line}");
    assert!(line.len() < 1000, "cut: {} bytes", line.len());
    assert!(
        t.grep("P3.3 trading state global HALTED -> ACTIVE").len() <= 1,
        "no forged line"
    );
    let out = ctl_ok(&t, &["status"]);
    assert!(!out.contains('\u{1b}'), "no escape reaches the terminal");
    assert!(out.len() < 10_000, "ctl status printed {} bytes", out.len());
    let (_, json, _) = ctl(&t, &["status", "--json"]);
    assert!(
        json.len() < 10_000,
        "ctl status --json printed {} bytes",
        json.len()
    );
}

#[test]
fn ctl_refuses_a_blank_reason_and_does_not_echo_a_huge_symbol() {
    let t = daemon();
    for reason in ["", "   ", "\t"] {
        let (code, _, err) = ctl(&t, &["halt", "--reason", reason]);
        assert_eq!(code, Some(64), "{reason:?}: {err}");
        assert!(err.contains("reason"), "{err}");
    }
    let huge = "A".repeat(100_000);
    let (code, _, err) = ctl(&t, &["halt", "--symbol", &huge, "--reason", "x"]);
    assert_eq!(code, Some(64), "{}", err.len());
    assert!(err.len() < 2_000, "stderr is {} bytes", err.len());
    let env: Vec<(&str, &str)> = t
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let (code, _, err) = run_once(&["explain", &huge], &env);
    assert_eq!(code, Some(1), "{}", err.len());
    assert!(err.len() < 2_000, "explain's stderr is {} bytes", err.len());
}

#[test]
fn the_daemon_starts_with_the_control_stream_holding_a_string() {
    let mut t = spawn_daemon(
        Opts::env_allowlist("BTCUSDT")
            .set("P33_STALE_THRESHOLD_SEC", "600")
            .deferred(),
    );
    t.snapshot("BTCUSDT", "0.5", now());
    redis_cmd(&mut t, &["SET", CONTROL, "x"]).unwrap();
    t.start_ready();
    t.wait_log("holds another type, not a stream", T);
    push(&mut t, close("ctl-string", "BTCUSDT"));
    assert_eq!(t.wait_permit("ctl-string")["allow"], true);
    let (code, _) = t.get("/readyz");
    assert_eq!(code, 200);
}

/// `INFO commandstats`: calls per command, and all commands processed.
fn command_calls(con: &mut redis::Connection) -> (HashMap<String, u64>, u64) {
    let info: String = redis::cmd("INFO").arg("commandstats").query(con).unwrap();
    let mut calls = HashMap::new();
    for l in info.lines() {
        if let Some(rest) = l.strip_prefix("cmdstat_") {
            if let Some((name, stats)) = rest.split_once(':') {
                let n = stats
                    .split(',')
                    .find_map(|kv| kv.strip_prefix("calls="))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                calls.insert(name.to_string(), n);
            }
        }
    }
    let stats: String = redis::cmd("INFO").arg("stats").query(con).unwrap();
    let total = stats
        .lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    (calls, total)
}

#[test]
fn fifty_thousand_overrides_are_not_read_again_every_five_seconds() {
    let mut t = daemon();
    for chunk in 0..50 {
        let mut p = redis::pipe();
        for i in 0..1000 {
            p.cmd("SET")
                .arg(format!("quantum:p33:trading_state:S{chunk}X{i}USDT"))
                .arg("HALTED")
                .ignore();
        }
        let _: () = p.query(&mut t.con).unwrap();
    }
    // The refresh runs every 5 s; once it has counted them all, measure one.
    let end = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if t.metric("p33_symbol_overrides{state=\"HALTED\"}") == Some(50_000.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < end,
            "the gauge never counted 50,000"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, before) = command_calls(&mut t.con);
    // Evidence that the refresh ran meanwhile: a global state set by hand
    // (no control entry) reaches the gauge.
    let _: () = redis::cmd("SET")
        .arg("quantum:p33:trading_state")
        .arg("HALTED")
        .query(&mut t.con)
        .unwrap();
    t.wait_metric("p33_trading_state{state=\"HALTED\"}", 1.0);
    let (_, after) = command_calls(&mut t.con);
    // Reading 50,000 keys is at least 100,000 commands (inside a script or
    // not): the overrides were not read again within seconds.
    assert!(
        after - before < 5_000,
        "{} Redis commands for one refresh of the gauges",
        after - before
    );
    assert_eq!(
        t.metric("p33_symbol_overrides{state=\"HALTED\"}"),
        Some(50_000.0)
    );
}

#[test]
fn ctl_status_reads_overrides_while_they_change() {
    // An override deleted between two reads of it is simply gone: the
    // reader takes each key's TYPE and value in one MULTI.
    let t = daemon();
    let stop = Arc::new(AtomicBool::new(false));
    let env: Vec<(String, String)> = ops_env(&t.env).into_iter().collect();
    let flag = stop.clone();
    let changer = std::thread::spawn(move || {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut n = 0;
        while !flag.load(Ordering::SeqCst) {
            let verb = if n % 2 == 0 { "halt" } else { "resume" };
            let (code, out, err) = run_once(
                &["ctl", verb, "--symbol", "ETHUSDT", "--reason", "churn"],
                &env,
            );
            assert_eq!(code, Some(0), "{verb}: {out}{err}");
            n += 1;
        }
        n
    });
    for _ in 0..100 {
        let (code, out, err) = ctl(&t, &["status", "--json"]);
        assert_eq!(code, Some(0), "{out}{err}");
    }
    stop.store(true, Ordering::SeqCst);
    let changes = changer.join().unwrap();
    assert!(
        changes >= 2,
        "the overrides changed meanwhile ({changes} changes)"
    );
}

#[test]
fn ctl_explain_and_replay_need_no_exchange_settings() {
    let t = daemon();
    // The daemon's environment without any exchange secret, in binance mode,
    // with an exchange URL that would not even parse.
    let ops = ops_env(&t.env);
    let env: Vec<(&str, &str)> = ops
        .iter()
        .filter(|(k, _)| !k.starts_with("BINANCE_") && !k.starts_with("P33_EXCHANGE_"))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .chain([
            ("P33_SNAPSHOT_SOURCE", "binance"),
            ("P33_EXCHANGE_BASE_URL", "not a url"),
            ("USER", "alice"),
        ])
        .collect();
    for args in [
        &["ctl", "status"][..],
        &[
            "ctl",
            "halt",
            "--symbol",
            "ethusdt",
            "--reason",
            "no secret here",
        ],
        &["replay", "--last", "5"],
    ] {
        let (code, out, err) = run_once(args, &env);
        assert_eq!(code, Some(0), "{args:?}: {out}{err}");
    }
    let (code, _, err) = run_once(&["explain", "no-such-plan"], &env);
    assert_eq!(code, Some(1), "not found, not a configuration error: {err}");
    assert!(err.contains("no record"), "{err}");
    let v: Option<String> = redis::cmd("GET")
        .arg("quantum:p33:trading_state:ETHUSDT")
        .query(&mut t.redis.con())
        .unwrap();
    assert_eq!(v.as_deref(), Some("HALTED"), "--symbol ethusdt is ETHUSDT");
    // The daemon itself still requires them.
    let (code, _, err) = run_once(&["--check-config"], &env);
    assert_eq!(code, Some(78), "{err}");
}

/// Every permit key in Redis that holds an allow.
fn allows_in_redis(con: &mut redis::Connection) -> Vec<String> {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("quantum:permit:p33:*")
        .query(con)
        .unwrap();
    keys.into_iter()
        .filter(|k| {
            let v: Option<String> = redis::cmd("GET").arg(k).query(con).ok().flatten();
            v.is_some_and(|v| v.contains("\"allow\":true"))
        })
        .collect()
}

#[test]
fn a_halt_under_load_revokes_every_allow_not_yet_used() {
    let mut t = daemon();
    push(&mut t, close("pre-close", "BTCUSDT"));
    push(&mut t, open("pre-open", "ETHUSDT"));
    assert_eq!(t.wait_permit("pre-close")["allow"], true);
    assert_eq!(t.wait_permit("pre-open")["allow"], true);
    // A producer of closes all through the halt.
    let stop = Arc::new(AtomicBool::new(false));
    let (flag, mut con) = (stop.clone(), t.redis.con());
    let producer = std::thread::spawn(move || {
        let mut n = 0;
        while !flag.load(Ordering::SeqCst) {
            let f = close(&format!("load-{n}"), "BTCUSDT");
            let f: Vec<(&str, &str)> = f.iter().map(|(k, v)| (*k, v.as_str())).collect();
            push_plan(&mut con, &f);
            n += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        n
    });
    std::thread::sleep(Duration::from_millis(300));
    let out = ctl_ok(&t, &["halt", "--reason", "incident 4711"]);
    let n: u64 = out
        .lines()
        .find_map(|l| {
            l.strip_prefix("revoked ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("ctl says how many it revoked: {out}"));
    assert!(n >= 2, "{out}");
    let left = allows_in_redis(&mut t.con);
    assert!(left.is_empty(), "allows after ctl halt returned: {left:?}");
    stop.store(true, Ordering::SeqCst);
    let produced = producer.join().unwrap();
    assert!(produced > 20, "{produced} plans during the test");
    push(&mut t, close("after-halt", "BTCUSDT"));
    assert_eq!(t.wait_permit("after-halt")["reason"], "trading_halted");
    wait_for("the group to drain", T, || {
        (t.pending("p33") == 0).then_some(())
    });
    let left = allows_in_redis(&mut t.con);
    assert!(left.is_empty(), "allows written after the halt: {left:?}");
    let p = t.permit("pre-close").unwrap();
    assert_eq!(p["reason"], "trading_halted", "{p}");
    assert_eq!(
        p["context"],
        serde_json::json!({"scope": "global", "revoked": true})
    );
    let ttl: i64 = redis::cmd("PTTL")
        .arg("quantum:permit:p33:pre-close")
        .query(&mut t.con)
        .unwrap();
    assert!(ttl > 0, "the TTL is kept: {ttl}");
    t.wait_log("P3.3 revoked", T);
    // explain shows the decision, and that a halt revoked it.
    let (code, out, err) = ctl_like(&t, &["explain", "pre-close"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("outcome   allow"), "{out}");
    assert!(out.contains("revoked   a halt rewrote this allow"), "{out}");
    // Exactly one confirmation for the halt entry.
    let v: redis::Value = redis::cmd("XRANGE")
        .arg(CONTROL)
        .arg("-")
        .arg("+")
        .query(&mut t.con)
        .unwrap();
    let confirmations = position_state_brain::redis::stream::parse_entries(&v)
        .into_iter()
        .filter(|e| e.fields.as_ref().is_some_and(|f| f.contains_key("ref")))
        .count();
    assert_eq!(confirmations, 1);
}

#[test]
fn reduce_revokes_the_opening_allows_and_keeps_the_closes() {
    let mut t = daemon();
    push(&mut t, close("keep-close", "BTCUSDT"));
    push(&mut t, open("drop-open", "ETHUSDT"));
    assert_eq!(t.wait_permit("keep-close")["allow"], true);
    assert_eq!(t.wait_permit("drop-open")["allow"], true);
    let out = ctl_ok(&t, &["reduce", "--reason", "open nothing"]);
    assert!(out.contains("revoked 1 outstanding allows"), "{out}");
    assert_eq!(t.permit("keep-close").unwrap()["allow"], true);
    let p = t.permit("drop-open").unwrap();
    assert_eq!(p["reason"], "trading_reducing", "{p}");
    // With no daemon running, ctl says the allows stay valid.
    t.kill();
    let out = ctl_ok(&t, &["halt", "--reason", "nobody home"]);
    assert!(out.contains("stay valid until they expire"), "{out}");
}

#[test]
fn ctl_status_lists_each_running_instance_with_its_own_view() {
    let mut t = daemon();
    // A second instance with another allowlist, on the same Redis.
    let mut env2 = t.env.clone();
    env2.insert("P33_CONSUMER_NAME".into(), "p33-second".into());
    env2.insert("P33_ALLOWLIST".into(), "BTCUSDT".into());
    let second = Daemon::start(&env2);
    second.wait_log("ready: reading plans", T);
    // ctl's own environment says something else: it must not matter.
    let mut owned: Vec<(String, String)> = t.env.clone().into_iter().collect();
    owned.push(("P33_ALLOWLIST".into(), "AAAUSDT,BBBUSDT,CCCUSDT".into()));
    let env: Vec<(&str, &str)> = owned
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let (code, out, err) = wait_for("both instances reported", T, || {
        let r = run_once(&["ctl", "status"], &env);
        r.1.contains("instances       2 running").then_some(r)
    });
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("p33-test live"), "{out}");
    assert!(out.contains("p33-second live"), "{out}");
    assert!(
        out.contains("allowlist source=env count=2"),
        "the first's own: {out}"
    );
    assert!(
        out.contains("allowlist source=env count=1"),
        "the second's own: {out}"
    );
    assert!(!out.contains("count=3"), "never ctl's own allowlist: {out}");
    let (_, json, _) = run_once(&["ctl", "status", "--json"], &env);
    let v: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["instances"].as_array().map(Vec::len), Some(2), "{v}");
    drop(second);
    t.kill();
    // With none running (the reports expire 15 s after the last), ctl says
    // so: here the keys are removed as an expiry would.
    let mut con = t.redis.con();
    for k in [
        "quantum:p33:instance:p33-test",
        "quantum:p33:instance:p33-second",
    ] {
        let _: () = redis::cmd("DEL").arg(k).query(&mut con).unwrap();
    }
    let (_, out, _) = run_once(&["ctl", "status"], &env);
    assert!(out.contains("instances       no instance running"), "{out}");
}

#[test]
fn an_old_halt_entry_replayed_after_a_resume_revokes_nothing() {
    let mut t = daemon();
    push(&mut t, open("fresh-open", "ETHUSDT"));
    assert_eq!(t.wait_permit("fresh-open")["allow"], true);
    // A halt entry the follower sees while the state is ACTIVE again (as
    // when an instance replays an old pending entry after a crash, once the
    // operator had resumed): written by hand, with no state change, and
    // the resume after it in the same step (the control log the guardians
    // fold ends at ACTIVE, as it would after a real resume).
    let _: () = redis::cmd("MULTI").query(&mut t.con).unwrap();
    let _: () = redis::cmd("XADD")
        .arg(CONTROL)
        .arg("*")
        .arg("scope")
        .arg("global")
        .arg("symbol")
        .arg("")
        .arg("from")
        .arg("ACTIVE")
        .arg("to")
        .arg("HALTED")
        .arg("reason")
        .arg("old")
        .arg("actor")
        .arg("sre@host")
        .arg("ts")
        .arg("1")
        .query(&mut t.con)
        .unwrap();
    let _: () = redis::cmd("XADD")
        .arg(CONTROL)
        .arg("*")
        .arg("scope")
        .arg("global")
        .arg("symbol")
        .arg("")
        .arg("from")
        .arg("HALTED")
        .arg("to")
        .arg("ACTIVE")
        .arg("reason")
        .arg("resumed")
        .arg("actor")
        .arg("sre@host")
        .arg("ts")
        .arg("2")
        .query(&mut t.con)
        .unwrap();
    let _: Vec<String> = redis::cmd("EXEC").query(&mut t.con).unwrap();
    t.wait_log("reason=old, actor=sre@host", T);
    // Evidence the follower handled it: its group has nothing pending.
    wait_for("the control entry handled", T, || {
        (pending(&mut t.con, CONTROL, "p33-control:p33-test") == 0).then_some(())
    });
    assert_eq!(t.permit("fresh-open").unwrap()["allow"], true);
    assert!(t.grep("P3.3 revoked").is_empty());
}

/// SPEC §12, issue 26 item 6: a halt with about 350,000 allows indexed never
/// stalls Redis. The revocation walks the index in bounded steps: no script
/// call of it reaches the SLOWLOG's 100 ms (one call walked them all before:
/// 7 s, and every client got BUSY; each step has a 3 ms budget, and the
/// 100 ms here leaves room for a loaded CI machine), another client's PING
/// is answered throughout, `ctl halt` exits 0 saying what it knows, and in
/// the end every
/// allow is revoked with exactly one confirmation. A symbol halt with nothing
/// of its symbol to revoke walks only that symbol's (empty) index.
#[test]
fn a_halt_with_350000_allows_revokes_them_in_steps_that_never_stall_redis() {
    const N: usize = 350_000;
    let mut t = daemon();
    // The allows as the write script indexes them: 10 symbols, half opens.
    let expiry = (now() * 1000.0) as u64 + 600_000;
    let body = |plan: &str, sym: &str, open: bool| {
        format!(
            r#"{{"allow":true,"plan_id":"{plan}","symbol":"{sym}","safe_qty":0,"safe_close_qty":0,"exchange_position_amt":0,"ledger_amt":0,"reason":"{}","created_at":1.0}}"#,
            if open {
                "open_permit_granted"
            } else {
                "sanity_checks_passed"
            }
        )
    };
    for chunk in 0..(N / 10_000) {
        let mut p = redis::pipe();
        for i in chunk * 10_000..(chunk + 1) * 10_000 {
            let sym = format!("S{}USDT", i % 10);
            let plan = format!("bulk-{i}");
            let open = i % 2 == 0;
            p.cmd("SET")
                .arg(format!("quantum:permit:p33:{plan}"))
                .arg(body(&plan, &sym, open))
                .arg("PX")
                .arg(600_000)
                .ignore();
            p.cmd("ZADD")
                .arg("quantum:p33:allows")
                .arg(expiry)
                .arg(format!("{sym}|{plan}"))
                .ignore();
            p.cmd("ZADD")
                .arg(format!("quantum:p33:allows:{sym}"))
                .arg(expiry)
                .arg(&plan)
                .ignore();
            if open {
                p.cmd("ZADD")
                    .arg("quantum:p33:allows:opens")
                    .arg(expiry)
                    .arg(format!("{sym}|{plan}"))
                    .ignore();
                p.cmd("ZADD")
                    .arg(format!("quantum:p33:allows:{sym}:opens"))
                    .arg(expiry)
                    .arg(&plan)
                    .ignore();
            }
        }
        let _: () = p.query(&mut t.con).unwrap();
    }
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("slowlog-log-slower-than")
        .arg(100_000)
        .query(&mut t.con)
        .unwrap();
    let _: () = redis::cmd("SLOWLOG")
        .arg("RESET")
        .query(&mut t.con)
        .unwrap();
    // Another client pings all through the halt.
    let stop = Arc::new(AtomicBool::new(false));
    let (flag, mut con) = (stop.clone(), t.redis.con());
    let pinger = std::thread::spawn(move || {
        let mut worst = Duration::ZERO;
        let mut pings = 0u64;
        while !flag.load(Ordering::SeqCst) {
            let at = std::time::Instant::now();
            let _: String = redis::cmd("PING").query(&mut con).unwrap();
            worst = worst.max(at.elapsed());
            pings += 1;
            std::thread::sleep(Duration::from_millis(2));
        }
        (worst, pings)
    });
    // A symbol halt of a symbol with nothing to revoke, then the global one.
    let out = ctl_ok(
        &t,
        &["halt", "--symbol", "ETHUSDT", "--reason", "nothing here"],
    );
    assert!(out.contains("revoked 0 outstanding allows"), "{out}");
    let started = std::time::Instant::now();
    let out = ctl_ok(&t, &["halt", "--reason", "incident 350k"]);
    let ctl_took = started.elapsed();
    assert!(
        out.contains("revoked 350000 outstanding allows") || out.contains("revoking: "),
        "{out}"
    );
    assert!(
        ctl_took < Duration::from_secs(8),
        "ctl took {ctl_took:?}: {out}"
    );
    // Every allow revoked, with one confirmation.
    let confirmed = wait_for("the confirmation", Duration::from_secs(120), || {
        let v: redis::Value = redis::cmd("XRANGE")
            .arg(CONTROL)
            .arg("-")
            .arg("+")
            .query(&mut t.con)
            .unwrap();
        let found: Vec<HashMap<String, String>> =
            position_state_brain::redis::stream::parse_entries(&v)
                .into_iter()
                .filter_map(|e| e.fields)
                .filter(|f| {
                    f.get("kind").map(String::as_str) == Some("revoked") && f["scope"] == "global"
                })
                .collect();
        (!found.is_empty()).then_some(found)
    });
    assert_eq!(confirmed.len(), 1, "{confirmed:?}");
    assert_eq!(confirmed[0]["revoked"], N.to_string());
    assert!(
        !confirmed[0].contains_key("from"),
        "a confirmation changes no state"
    );
    stop.store(true, Ordering::SeqCst);
    let (worst, pings) = pinger.join().unwrap();
    assert!(pings > 100, "{pings} pings");
    let slow: redis::Value = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(128)
        .query(&mut t.con)
        .unwrap();
    let slow = format!("{slow:?}");
    assert!(
        !slow.to_ascii_uppercase().contains("EVALSHA"),
        "a script call took 100 ms or more: {slow}"
    );
    assert!(
        worst < Duration::from_millis(500),
        "a PING waited {worst:?}"
    );
    for i in [0usize, 1, 4242, N - 1] {
        let p = t.permit(&format!("bulk-{i}")).unwrap();
        assert_eq!(p["reason"], "trading_halted", "bulk-{i}: {p}");
        assert_eq!(p["context"]["revoked"], true);
    }
    eprintln!(
        "350,000 allows revoked; ctl took {ctl_took:?}; worst PING {worst:?} over {pings} pings"
    );
}

/// Issue 28 item 12 (SPEC §12, §14): a big halt never erases the record it
/// is about. With `P33_DECISIONS_MAXLEN=1000`, 3,000 allows revoked: the
/// revocations go to their own stream, and `explain` of the plan allowed
/// just before the halt still finds its decision and says a halt revoked
/// it (before, 3,000 `revoked` records pushed it out of the decision
/// stream and `explain` said `no record`).
#[test]
fn a_big_halt_keeps_the_decision_it_revokes_explainable() {
    let mut t = spawn_daemon(
        Opts::env_allowlist("BTCUSDT,ETHUSDT")
            .set("P33_STALE_THRESHOLD_SEC", "600")
            .set("P33_DECISIONS_MAXLEN", "1000")
            .deferred(),
    );
    t.snapshot("BTCUSDT", "0.5", now());
    t.snapshot("ETHUSDT", "0", now());
    t.start_ready();
    push(&mut t, close("the-last-allow", "BTCUSDT"));
    assert_eq!(t.wait_permit("the-last-allow")["allow"], true);
    let expiry = (now() * 1000.0) as u64 + 600_000;
    let mut p = redis::pipe();
    for i in 0..3000 {
        let plan = format!("many-{i}");
        p.cmd("SET")
            .arg(format!("quantum:permit:p33:{plan}"))
            .arg(format!(
                r#"{{"allow":true,"plan_id":"{plan}","symbol":"ETHUSDT","reason":"open_permit_granted"}}"#
            ))
            .arg("PX")
            .arg(600_000)
            .ignore();
        p.cmd("ZADD")
            .arg("quantum:p33:allows")
            .arg(expiry)
            .arg(format!("ETHUSDT|{plan}"))
            .ignore();
    }
    let _: () = p.query(&mut t.con).unwrap();
    let out = ctl_ok(&t, &["halt", "--reason", "big one"]);
    assert!(
        out.contains("revoked 3001 outstanding allows") || out.contains("revoking: "),
        "{out}"
    );
    wait_for("every allow revoked", T, || {
        let p = t.permit("many-2999")?;
        (p["reason"] == "trading_halted").then_some(())
    });
    let (code, out, err) = ctl_like(&t, &["explain", "the-last-allow"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("outcome   allow"), "{out}");
    assert!(out.contains("revoked   a halt rewrote this allow"), "{out}");
    let revocations: u64 = redis::cmd("XLEN")
        .arg("quantum:stream:p33.revocations")
        .query(&mut t.con)
        .unwrap();
    assert!(revocations >= 1000, "{revocations} revocation records");
}

/// Issue 28 item 13 (SPEC §12): 10,000 forged instance reports (a newline
/// in a field, a word that is no mode) and key names that are not UTF-8 hide
/// nothing. `ctl status` lists the running instance, counts the rest, and
/// exits 0 (before: it listed about a thousand forged ones and never the
/// real one, and a key name that is not UTF-8 made it exit 1).
#[test]
fn forged_instance_reports_never_hide_the_running_one() {
    let mut t = daemon();
    t.wait_instance_report();
    let mut p = redis::pipe();
    for i in 0..10_000 {
        p.cmd("HSET")
            .arg(format!("quantum:p33:instance:aaa-forged-{i:05}"))
            .arg("host")
            .arg("h\nP3.3 forged line")
            .arg("mode")
            .arg(if i % 2 == 0 { "live" } else { "evil" })
            .arg("version")
            .arg("9.9.9")
            .ignore();
    }
    let _: () = p.query(&mut t.con).unwrap();
    let _: () = redis::cmd("HSET")
        .arg(b"quantum:p33:instance:\xff\xfe".as_slice())
        .arg("host")
        .arg("x")
        .query(&mut t.con)
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(b"quantum:p33:trading_state:\xff".as_slice())
        .arg("HALTED")
        .query(&mut t.con)
        .unwrap();
    let (code, out, err) = ctl(&t, &["status"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("instances       1 running"), "{out}");
    assert!(out.contains("  p33-test live v"), "{out}");
    assert!(
        out.contains("10001 instance report key(s) skipped"),
        "{out}"
    );
    assert!(!out.contains("forged"), "{out}");
    let (code, out, err) = ctl(&t, &["status", "--json"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["instance_reports_skipped"], 10001);
    assert_eq!(v["instances"].as_array().map(Vec::len), Some(1));
}
