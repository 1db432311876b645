//! The decision record (SPEC §14): one record per finished plan, written by
//! the same script call as the permit, for every outcome; none for an entry
//! another consumer finished; under 1 KiB; MAXLEN respected; 0 turns it
//! off; `explain` finds a plan and says why.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;

use crate::common::*;

const T: Duration = Duration::from_secs(10);
const DECISIONS: &str = "quantum:stream:p33.decisions";

fn records(con: &mut redis::Connection) -> Vec<HashMap<String, String>> {
    let v: redis::Value = redis::cmd("XRANGE")
        .arg(DECISIONS)
        .arg("-")
        .arg("+")
        .query(con)
        .unwrap();
    position_state_brain::redis::stream::parse_entries(&v)
        .into_iter()
        .filter_map(|e| e.fields)
        .collect()
}

fn by_plan(recs: &[HashMap<String, String>], plan_id: &str) -> HashMap<String, String> {
    let found: Vec<_> = recs.iter().filter(|r| r["plan_id"] == plan_id).collect();
    assert_eq!(found.len(), 1, "one record of {plan_id}: {recs:?}");
    found[0].clone()
}

fn env_of(t: &TestDaemon) -> Vec<(&str, &str)> {
    t.env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

#[test]
fn every_finished_plan_has_one_record_with_its_inputs() {
    let mut t = spawn_daemon(
        Opts::env_allowlist("BTCUSDT,ETHUSDT,SOLUSDT")
            .set("P33_STALE_THRESHOLD_SEC", "600")
            .deferred(),
    );
    let n = now();
    t.snapshot("BTCUSDT", "0.5", n);
    t.snapshot("ETHUSDT", "0", n);
    t.snapshot("SOLUSDT", "2", n);
    let _: () = redis::cmd("SET")
        .arg("quantum:reconcile:hold:SOLUSDT")
        .arg("1")
        .query(&mut t.con)
        .unwrap();
    t.start_ready();
    let plans: [&[(&str, &str)]; 6] = [
        &[
            ("plan_id", "r-allow"),
            ("symbol", "BTCUSDT"),
            ("decision", "EXECUTE"),
            ("action", "FULL_CLOSE_PROPOSED"),
            ("reduceOnly", "true"),
        ],
        &[
            ("plan_id", "r-deny"),
            ("symbol", "ETHUSDT"),
            ("decision", "EXECUTE"),
            ("action", "FULL_CLOSE_PROPOSED"),
            ("reduceOnly", "true"),
        ],
        &[
            ("plan_id", "r-held"),
            ("symbol", "SOLUSDT"),
            ("decision", "EXECUTE"),
            ("action", "PARTIAL_50"),
            ("reduceOnly", "true"),
        ],
        &[
            ("plan_id", "r-skip"),
            ("symbol", "BTCUSDT"),
            ("decision", "HOLD"),
        ],
        &[
            ("plan_id", "r-notlisted"),
            ("symbol", "DOGEUSDT"),
            ("decision", "EXECUTE"),
        ],
        &[("symbol", "BTCUSDT"), ("decision", "EXECUTE")],
    ];
    for p in plans {
        t.push_plan(p);
    }
    t.wait_metric("p33_plans_total{outcome=\"malformed\"}", 1.0);
    t.wait_permit("r-held");
    let recs = wait_for("six records", T, || {
        let r = records(&mut t.con);
        (r.len() == 6).then_some(r)
    });
    let r = by_plan(&recs, "r-allow");
    assert_eq!(r["outcome"], "allow");
    assert_eq!(r["reason"], "sanity_checks_passed");
    assert_eq!(r["safe_qty"], "0.5");
    assert_eq!(r["symbol"], "BTCUSDT");
    assert!(r["entry_id"].contains('-'));
    assert_eq!(r["consumer"], "p33-test");
    assert_eq!(r["config"].len(), 12);
    let inputs: Value = serde_json::from_str(&r["inputs"]).expect("inputs is JSON");
    assert_eq!(inputs["snapshot"]["amt"], "0.5");
    assert_eq!(inputs["allowlist"], "env");
    assert_eq!(inputs["rules"], "allow:sanity_checks_passed");
    assert_eq!(inputs["guards"]["state"], "ACTIVE");
    assert_eq!(inputs["guards"]["hold"], false);
    let plan: Value = serde_json::from_str(&r["plan"]).expect("plan is JSON");
    assert_eq!(plan["action"], "FULL_CLOSE_PROPOSED");

    let r = by_plan(&recs, "r-deny");
    assert_eq!(
        (r["outcome"].as_str(), r["reason"].as_str()),
        ("deny", "no_position")
    );
    assert_eq!(r["safe_qty"], "");

    let r = by_plan(&recs, "r-held");
    assert_eq!(
        (r["outcome"].as_str(), r["reason"].as_str()),
        ("deny", "reconcile_hold_active"),
        "the final reason is the permit's"
    );
    let inputs: Value = serde_json::from_str(&r["inputs"]).unwrap();
    assert_eq!(
        inputs["rules"], "allow:sanity_checks_passed",
        "and the rules' own"
    );
    assert_eq!(inputs["guards"]["hold"], true);

    assert_eq!(by_plan(&recs, "r-skip")["outcome"], "skip_decision");
    assert_eq!(by_plan(&recs, "r-notlisted")["outcome"], "not_allowlisted");
    assert_eq!(by_plan(&recs, "")["outcome"], "malformed");
    for r in &recs {
        let size: usize = r.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(size < 1024, "a record of {size} bytes: {r:?}");
    }

    // explain: found, in words; not found: exit 1.
    let env = env_of(&t);
    let (code, out, err) = run_once(&["explain", "r-held"], &env);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("outcome   deny: reconcile_hold_active"),
        "{out}"
    );
    assert!(out.contains("decided by hold: the reconcile hold"), "{out}");
    assert!(
        out.contains("the rules alone said allow:sanity_checks_passed"),
        "{out}"
    );
    assert!(
        out.contains("\"reason\":\"reconcile_hold_active\""),
        "the permit: {out}"
    );
    let (code, _, err) = run_once(&["explain", "no-such-plan"], &env);
    assert_eq!(code, Some(1));
    assert!(err.contains("no record of plan"), "{err}");
}

#[test]
fn maxlen_bounds_the_record_and_zero_turns_it_off() {
    let mut t = spawn_daemon(
        Opts::env_allowlist("BTCUSDT")
            .set("P33_DECISIONS_MAXLEN", "100")
            .deferred(),
    );
    t.start_ready();
    for i in 0..600 {
        t.push_plan(&[
            ("plan_id", &format!("m-{i}")),
            ("symbol", "DOGEUSDT"),
            ("decision", "EXECUTE"),
        ]);
    }
    t.wait_metric("p33_plans_total{outcome=\"not_allowlisted\"}", 600.0);
    let len: usize = redis::cmd("XLEN").arg(DECISIONS).query(&mut t.con).unwrap();
    // MAXLEN ~ trims whole macro nodes: about 100, never all 600.
    assert!((100..300).contains(&len), "{len} records kept");

    t.kill();
    let _: () = redis::cmd("DEL").arg(DECISIONS).query(&mut t.con).unwrap();
    t.env.insert("P33_DECISIONS_MAXLEN".into(), "0".into());
    t.start_ready();
    t.push_plan(&[
        ("plan_id", "off-1"),
        ("symbol", "DOGEUSDT"),
        ("decision", "EXECUTE"),
    ]);
    t.wait_metric("p33_plans_total{outcome=\"not_allowlisted\"}", 1.0);
    let exists: i64 = redis::cmd("EXISTS")
        .arg(DECISIONS)
        .query(&mut t.con)
        .unwrap();
    assert_eq!(exists, 0, "no record at all with P33_DECISIONS_MAXLEN=0");
}

/// SIGKILL and restart under load: exactly one record per finished plan,
/// none without its permit, none twice (one script writes both).
#[test]
fn sigkill_under_load_leaves_one_record_per_permit() {
    let mut t = spawn_daemon(
        Opts::env_allowlist("BTCUSDT")
            .set("P33_STALE_THRESHOLD_SEC", "600")
            .set("P33_LOG_LEVEL", "INFO")
            .deferred(),
    );
    t.snapshot("BTCUSDT", "1", now());
    t.start_ready();
    let total = 1500;
    for i in 0..total {
        let id = format!("k-{i}");
        t.push_plan(&[
            ("plan_id", &id),
            ("symbol", "BTCUSDT"),
            ("decision", "EXECUTE"),
            ("action", "FULL_CLOSE_PROPOSED"),
            ("reduceOnly", "true"),
        ]);
        if i % 500 == 250 {
            t.restart();
        }
    }
    wait_for("every plan finished", Duration::from_secs(30), || {
        let len: usize = redis::cmd("XLEN").arg(DECISIONS).query(&mut t.con).ok()?;
        (len >= total && t.pending("p33") == 0).then_some(())
    });
    let recs = records(&mut t.con);
    assert_eq!(recs.len(), total, "one record per plan, none twice");
    let mut seen = std::collections::HashSet::new();
    for r in &recs {
        assert!(seen.insert(r["plan_id"].clone()), "twice: {}", r["plan_id"]);
        assert!(
            read_permit(&mut t.con, &r["plan_id"]).is_some(),
            "a record without its permit: {}",
            r["plan_id"]
        );
    }
}

fn set_hash(con: &mut redis::Connection, key: &str, pairs: &[(&str, &str)]) {
    let mut c = redis::cmd("HSET");
    c.arg(key);
    for (k, v) in pairs {
        c.arg(*k).arg(*v);
    }
    let _: () = c.query(con).unwrap();
}

/// After a mixed run of the rule rows, `replay` without `--set` finds every
/// decision unchanged (the core is deterministic); a tighter stale
/// threshold turns exactly the plans judged on old snapshots into denies;
/// and replay writes nothing.
#[test]
fn replay_is_deterministic_and_answers_what_if() {
    let syms = "FRESHUSDT,OLDAUSDT,OLDBUSDT,FLATUSDT,MISMUSDT,SIDEUSDT,COOLUSDT,BADCUSDT,HOLDUSDT";
    let mut t = spawn_daemon(
        Opts::env_allowlist(syms)
            .set("P33_STALE_THRESHOLD_SEC", "600")
            .deferred(),
    );
    let n = now();
    t.snapshot("FRESHUSDT", "0.5", n);
    t.snapshot("OLDAUSDT", "0.5", n - 30.0);
    t.snapshot("OLDBUSDT", "-3", n - 40.0);
    t.snapshot("FLATUSDT", "0", n);
    t.snapshot("MISMUSDT", "1", n);
    set_hash(
        &mut t.con,
        "quantum:position:ledger:MISMUSDT",
        &[("last_known_amt", "0.5")],
    );
    t.snapshot("SIDEUSDT", "1", n);
    set_hash(
        &mut t.con,
        "quantum:position:ledger:SIDEUSDT",
        &[("last_known_amt", "-1")],
    );
    t.snapshot("COOLUSDT", "0", n);
    let _: () = redis::cmd("SET")
        .arg("quantum:cooldown:last_exec_ts:COOLUSDT")
        .arg(((n - 5.0) * 1000.0) as i64)
        .query(&mut t.con)
        .unwrap();
    t.snapshot("BADCUSDT", "0", n);
    let _: () = redis::cmd("SET")
        .arg("quantum:cooldown:last_exec_ts:BADCUSDT")
        .arg("soon")
        .query(&mut t.con)
        .unwrap();
    t.snapshot("HOLDUSDT", "2", n);
    let _: () = redis::cmd("SET")
        .arg("quantum:reconcile:hold:HOLDUSDT")
        .arg("1")
        .query(&mut t.con)
        .unwrap();
    t.start_ready();
    let close = |id: &'static str, s: &'static str| {
        vec![
            ("plan_id", id),
            ("symbol", s),
            ("decision", "EXECUTE"),
            ("action", "FULL_CLOSE_PROPOSED"),
            ("reduceOnly", "true"),
        ]
    };
    let open = |id: &'static str, s: &'static str| {
        vec![
            ("plan_id", id),
            ("symbol", s),
            ("decision", "EXECUTE"),
            ("action", "OPEN_LONG"),
            ("reduceOnly", "false"),
        ]
    };
    let mut plans = vec![
        close("d-fresh", "FRESHUSDT"),
        close("d-olda", "OLDAUSDT"),
        close("d-oldb", "OLDBUSDT"),
        close("d-flat", "FLATUSDT"),
        open("d-open", "FLATUSDT"),
        open("d-exists", "FRESHUSDT"),
        close("d-mism", "MISMUSDT"),
        close("d-side", "SIDEUSDT"),
        open("d-cool", "COOLUSDT"),
        open("d-badc", "BADCUSDT"),
        close("d-hold", "HOLDUSDT"),
    ];
    let mut rc = close("d-reconcile", "OLDAUSDT");
    rc[2] = ("decision", "RECONCILE_CLOSE");
    plans.push(rc);
    let mut partial = close("d-partial", "FRESHUSDT");
    partial[3] = ("action", "PARTIAL_75");
    plans.push(partial);
    for p in &plans {
        t.push_plan(p);
    }
    let ids: Vec<&str> = plans.iter().map(|p| p[0].1).collect();
    let permits: Vec<Value> = ids.iter().map(|id| t.wait_permit(id)).collect();
    let reasons: std::collections::HashSet<&str> = permits
        .iter()
        .filter_map(|p| p["reason"].as_str())
        .collect();
    assert!(reasons.len() >= 9, "a mixed run: {reasons:?}");
    wait_for("every record", T, || {
        (records(&mut t.con).len() >= plans.len()).then_some(())
    });
    let keys_before: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut t.con).unwrap();

    let env = env_of(&t);
    let (code, out, err) = run_once(&["replay", "--last", "100", "--json"], &env);
    assert_eq!(code, Some(0), "{out}{err}");
    let v: Value = serde_json::from_str(&out).expect("one JSON object");
    assert_eq!(v["replayed"], plans.len(), "{v}");
    assert_eq!(
        v["changes"]["unchanged"]["count"],
        plans.len(),
        "every decision replays unchanged: {v}"
    );
    // The other ways to pick records: by age, and the newest few.
    let (code, out, err) = run_once(&["replay", "--since", "1h", "--json"], &env);
    assert_eq!(code, Some(0), "{out}{err}");
    let v: Value = serde_json::from_str(&out).expect("one JSON object");
    assert_eq!(v["replayed"], plans.len(), "{v}");
    let (code, out, err) = run_once(&["replay", "--last", "4", "--json"], &env);
    assert_eq!(code, Some(0), "{out}{err}");
    let v: Value = serde_json::from_str(&out).expect("one JSON object");
    assert_eq!(v["replayed"], 4, "{v}");

    // A tighter stale threshold: the two closes judged on 30 s and 40 s old
    // snapshots (and the reconcile close on the 30 s one) become denies.
    let (code, out, err) = run_once(
        &[
            "replay",
            "--last",
            "100",
            "--set",
            "P33_STALE_THRESHOLD_SEC=10",
        ],
        &env,
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("allow to deny     3"), "{out}");
    assert!(
        out.contains(
            "d-olda OLDAUSDT: allow sanity_checks_passed qty 0.5 -> deny stale_exchange_state"
        ),
        "{out}"
    );
    assert!(out.contains("unchanged         10"), "{out}");

    let (code, _, err) = run_once(&["replay", "--set", "P33_STALE_THRESHOLD_SEC=abc"], &env);
    assert_eq!(code, Some(78), "a bad --set is a bad configuration: {err}");
    // A typo must never read as "no impact" (issue 22, item 6).
    for name in ["P33_QTY_TOLERANCE", "P33_POLL_SEC", "REDIS_URL"] {
        let (code, out, err) = run_once(&["replay", "--set", &format!("{name}=0.1")], &env);
        assert_eq!(code, Some(78), "--set {name}: {out}{err}");
        assert!(err.contains(name) && err.lines().count() == 1, "{err}");
    }
    let keys_after: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut t.con).unwrap();
    let (mut a, mut b) = (keys_before, keys_after);
    a.sort();
    b.sort();
    assert_eq!(a, b, "replay writes nothing");
}

#[test]
fn explain_finds_a_plan_from_the_prefix_a_log_line_shows() {
    let mut t = spawn_daemon(
        Opts::env_allowlist("BTCUSDT")
            .set("P33_STALE_THRESHOLD_SEC", "600")
            .deferred(),
    );
    t.snapshot("BTCUSDT", "0.5", now());
    t.start_ready();
    let close = |id: &str| -> Vec<(&str, String)> {
        vec![
            ("plan_id", id.to_string()),
            ("symbol", "BTCUSDT".to_string()),
            ("decision", "EXECUTE".to_string()),
            ("action", "FULL_CLOSE_PROPOSED".to_string()),
            ("reduceOnly", "true".to_string()),
        ]
    };
    for id in ["7f3c9a1e-aaaa", "5b5b5b5b-0001", "5b5b5b5b-0002"] {
        let f = close(id);
        let f: Vec<(&str, &str)> = f.iter().map(|(k, v)| (*k, v.as_str())).collect();
        t.push_plan(&f);
        t.wait_permit(id);
    }
    let f = close("not-listed-1");
    let mut f: Vec<(&str, &str)> = f.iter().map(|(k, v)| (*k, v.as_str())).collect();
    f[1].1 = "XRPUSDT";
    t.push_plan(&f);
    let line = t.wait_log("P3.3 ALLOW plan 7f3c9a1e", T);
    assert!(
        !line.contains("7f3c9a1e-aaaa"),
        "the log shows 8 characters: {line}"
    );
    let env = env_of(&t);
    let (code, out, err) = run_once(&["explain", "7f3c9a1e"], &env);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("7f3c9a1e-aaaa"), "{out}");
    assert!(
        out.contains("\"plan_id\":\"7f3c9a1e-aaaa\""),
        "its permit: {out}"
    );
    let (code, _, err) = run_once(&["explain", "5b5b5b5b"], &env);
    assert_eq!(code, Some(1), "ambiguous: {err}");
    assert!(
        err.contains("5b5b5b5b-0001") && err.contains("5b5b5b5b-0002"),
        "{err}"
    );
    let (code, _, err) = run_once(&["explain", "7f3c"], &env);
    assert_eq!(code, Some(1), "shorter than 8 is no prefix: {err}");
    // A plan that never got a permit says so, truthfully.
    let (code, out, err) = wait_for("the record of not-listed-1", T, || {
        let r = run_once(&["explain", "not-listed-1"], &env);
        (r.0 == Some(0)).then_some(r)
    });
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("decided by no rule: the plan was not evaluated (not_allowlisted)"),
        "{out}"
    );
    assert!(
        out.contains("none was written: the symbol is not on the allowlist"),
        "{out}"
    );
}

/// Issue 28 item 11 (SPEC §14): `explain` and `replay` print what a record
/// holds through the same cut and escape as every echo. A forged record with
/// a 1 MB value, ANSI escapes and a newline that would print a forged `P3.3`
/// line reaches the terminal as at most 64 (1 KiB for JSON) characters of
/// each value, with no control character.
#[test]
fn explain_and_replay_print_a_hostile_record_cut_and_escaped() {
    let mut t = spawn_daemon(Opts::env_allowlist("BTCUSDT"));
    let huge = "A".repeat(1_000_000);
    let evil = "x\u{1b}[31mRED\u{1b}[0m\nP3.3 ALLOW plan forged (safe_qty=999)";
    let inputs = format!(
        r#"{{"now":1,"allowlist":"{}","snapshot":{{"amt":"{}","ts":1}},"ledger":"{}","cooldown":null,"step":"0.001","guards":{{"state":"{}"}}}}"#,
        "\\u001b[2J", huge, "\\n\\nP3.3 forged", "\\u001b]0;pwned\\u0007"
    );
    let plan = r#"{"decision":"EXECUTE\u001b[31m","action":"FULL_CLOSE_PROPOSED","reduce_only":true,"side":"\nP3.3 forged"}"#;
    let _: String = redis::cmd("XADD")
        .arg("quantum:stream:p33.decisions")
        .arg("*")
        .arg("plan_id")
        .arg("hostile-record-1")
        .arg("entry_id")
        .arg(evil)
        .arg("symbol")
        .arg("BTCUSDT")
        .arg("outcome")
        .arg("allow")
        .arg("reason")
        .arg(format!("sanity_checks_passed{evil}"))
        .arg("safe_qty")
        .arg(&huge)
        .arg("plan")
        .arg(plan)
        .arg("inputs")
        .arg(&inputs)
        .arg("config")
        .arg(evil)
        .arg("version")
        .arg(&huge)
        .arg("consumer")
        .arg(evil)
        .query(&mut t.con)
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("quantum:permit:p33:hostile-record-1")
        .arg(format!("{{\"allow\":true,\"x\":\"{huge}\u{1b}[31m\"}}"))
        .query(&mut t.con)
        .unwrap();
    let env = env_of(&t);
    for args in [
        vec!["explain", "hostile-record-1"],
        vec!["replay", "--last", "10"],
        vec![
            "replay",
            "--last",
            "10",
            "--set",
            "P33_QTY_TOLERANCE_PCT=0.1",
        ],
    ] {
        let (_, out, err) = run_once(&args, &env);
        for text in [&out, &err] {
            assert!(
                !text.contains('\u{1b}'),
                "{args:?}: an escape reached the terminal"
            );
            assert!(
                !text.contains('\u{7}'),
                "{args:?}: a bell reached the terminal"
            );
            assert!(
                !text.lines().any(|l| l.starts_with("P3.3")),
                "{args:?}: a forged line: {text}"
            );
            assert!(
                text.len() < 20_000,
                "{args:?}: {} bytes printed",
                text.len()
            );
        }
    }
}

/// Issue 28 item 4 (SPEC §14): the baseline of `replay` is the running
/// instance's configuration, not the shell's. The daemon runs with
/// `P33_STALE_THRESHOLD_SEC=7` and denies a plan on an 8 s old snapshot;
/// `replay` from a shell without that variable (the default 10) takes the
/// instance's settings, says whose, and finds nothing changed (before: it
/// called the shell's 10 "the current configuration" and reported the deny
/// turned allow). `--from-env` takes the shell's, and counts the records
/// decided under another configuration.
#[test]
fn replay_takes_the_running_instances_settings_as_its_baseline() {
    let mut t = spawn_daemon(
        Opts::env_allowlist("BTCUSDT")
            .set("P33_STALE_THRESHOLD_SEC", "7")
            .deferred(),
    );
    t.snapshot("BTCUSDT", "0.5", now() - 8.0);
    t.start_ready();
    let close = [
        ("plan_id", "stale-by-7"),
        ("symbol", "BTCUSDT"),
        ("decision", "EXECUTE"),
        ("action", "FULL_CLOSE_PROPOSED"),
        ("reduceOnly", "true"),
    ];
    t.push_plan(&close);
    assert_eq!(
        t.wait_permit("stale-by-7")["reason"],
        "stale_exchange_state"
    );
    wait_for("the instance report with its settings", T, || {
        let s: Option<String> = redis::cmd("HGET")
            .arg("quantum:p33:instance:p33-test")
            .arg("settings")
            .query(&mut t.con)
            .unwrap();
        s.filter(|s| s.contains("P33_STALE_THRESHOLD_SEC=7"))
            .map(|_| ())
    });
    // The operator's shell: Redis settings only.
    let shell: Vec<(&str, &str)> = env_of(&t)
        .into_iter()
        .filter(|(k, _)| k.starts_with("REDIS_"))
        .collect();
    let (code, out, err) = run_once(&["replay", "--last", "10"], &shell);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("baseline: the settings of instance p33-test"),
        "{out}"
    );
    let (_, json, _) = run_once(&["replay", "--last", "10", "--json"], &shell);
    let v: Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(v["changes"]["deny_to_allow"]["count"], 0, "{v}");
    assert_eq!(v["other_config"], 0, "{v}");
    let (_, json, _) = run_once(&["replay", "--last", "10", "--json", "--from-env"], &shell);
    let v: Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(v["changes"]["deny_to_allow"]["count"], 1, "{v}");
    assert!(v["other_config"].as_u64().unwrap() >= 1, "{v}");
    assert!(
        v["baseline"].as_str().unwrap().contains("--from-env"),
        "{v}"
    );
    let (code, _, err) = run_once(&["replay", "--instance", "nobody"], &shell);
    assert_eq!(code, Some(1), "{err}");
}
