//! The operators' allowlist scenarios, start-up and lifecycle, against the
//! real binary and a private Redis.

use std::time::Duration;

use crate::common::*;

const T: Duration = Duration::from_secs(10);

#[test]
fn fresh_universe_resolves_to_source_universe() {
    let mut t = spawn_daemon(Opts::default().deferred());
    let asof = now() - 40.0;
    set_universe(&mut t.con, &["BTCUSDT", "ETHUSDT", "SOLUSDT"], asof, 0);
    t.start();
    let line = t.wait_log("P3.3 allowlist source=", T);
    let age = (now() - asof).floor() as i64;
    let want = format!(
        "P3.3 allowlist source=universe stale=0 count=3 asof_epoch={}",
        asof as i64
    );
    assert!(line.contains(&want), "{line}");
    let got_age: i64 = line
        .rsplit("age_s=")
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!((got_age - age).abs() <= 1, "{line}");
    assert!(line.contains(" INFO "), "logged at INFO: {line}");
    assert_eq!(
        t.metric("p33_allowlist_source{source=\"universe\"}"),
        Some(1.0)
    );
    assert_eq!(t.metric("p33_allowlist_symbols"), Some(3.0));
    // Ready once Redis is armed (SPEC §9, §12).
    wait_for("readyz 200", T, || {
        (t.get("/readyz").0 == 200).then_some(())
    });
}

#[test]
fn stale_meta_with_fresh_last_ok_resolves_to_last_ok() {
    let mut t = spawn_daemon(Opts::default().deferred());
    set_universe(&mut t.con, &["BTCUSDT", "ETHUSDT"], now() - 10.0, 1);
    let asof = now() - 20.0;
    set_last_ok(&mut t.con, &["BTCUSDT"], asof);
    t.start();
    let line = t.wait_log("P3.3 allowlist source=", T);
    assert!(
        line.contains(&format!(
            "P3.3 allowlist source=last_ok stale=1 count=1 asof_epoch={}",
            asof as i64
        )),
        "{line}"
    );
}

#[test]
fn last_ok_older_than_max_age_falls_back_to_env() {
    let mut t = spawn_daemon(Opts::default().set("P33_ALLOWLIST", "BTCUSDT").deferred());
    set_universe(&mut t.con, &["BTCUSDT"], now() - 10.0, 1);
    set_last_ok(&mut t.con, &["BTCUSDT"], now() - 301.0);
    t.start();
    let line = t.wait_log("P3.3 allowlist source=", T);
    assert!(
        line.ends_with("P3.3 allowlist source=env stale=env count=1 asof_epoch=static age_s=0"),
        "{line}"
    );
}

#[test]
fn nothing_anywhere_fails_closed_with_an_error_first() {
    let mut t = spawn_daemon(Opts::default().set("P33_ALLOWLIST", "").deferred());
    t.start();
    let line = t.wait_log("P3.3 allowlist source=", T);
    assert!(
        line.ends_with("P3.3 allowlist source=none stale=? count=0 asof_epoch=? age_s=?"),
        "{line}"
    );
    let lines = t.lines.lock().unwrap().clone();
    let err = lines
        .iter()
        .position(|l| l.contains("FAIL-CLOSED: No valid allowlist from any source!"))
        .expect("FAIL-CLOSED line");
    let none = lines
        .iter()
        .position(|l| l.contains("source=none"))
        .unwrap();
    assert!(err < none, "the ERROR comes before the none line");
    assert!(lines[err].contains("ERROR"), "{}", lines[err]);
    assert_eq!(t.metric("p33_allowlist_source{source=\"none\"}"), Some(1.0));
    assert_eq!(
        t.metric("p33_allowlist_source{source=\"universe\"}"),
        Some(0.0)
    );
}

#[test]
fn a_universe_that_turns_stale_is_dropped_within_one_refresh_period() {
    let mut t = spawn_daemon(Opts::default().set("P33_ALLOWLIST", "XRPUSDT").deferred());
    set_universe(&mut t.con, &["BTCUSDT", "ETHUSDT"], now() - 5.0, 0);
    t.start();
    t.wait_log("source=universe", T);
    let mark = t.log_count();
    let _: () = redis::cmd("HSET")
        .arg("quantum:cfg:universe:meta")
        .arg("stale")
        .arg("1")
        .query(&mut t.con)
        .unwrap();
    let line = t.wait_log_after(mark, "P3.3 allowlist source=env", Duration::from_secs(3));
    assert!(line.contains("count=1"), "{line}");
    let warn = t.wait_log_after(mark, "P3.3 allowlist source changed", T);
    assert!(
        warn.contains("universe -> env")
            && warn.contains("universe=stale")
            && warn.contains("last_ok=missing"),
        "{warn}"
    );
}

#[test]
fn universe_data_expiring_between_refreshes_is_dropped_at_its_expiry() {
    let mut t = spawn_daemon(
        Opts::default()
            .set("P33_UNIVERSE_MAX_AGE_S", "3")
            .set("P33_ALLOWLIST_REFRESH_S", "60")
            .deferred(),
    );
    // MAX_AGE 3 s, data 1 s old: expires in ~2 s, long before the 60 s refresh.
    let asof = now().floor() - 1.0;
    set_universe(&mut t.con, &["BTCUSDT"], asof, 0);
    t.start();
    t.wait_log("source=universe", T);
    // Dropped at its expiry, not at the next refresh: the wait (8 s) is
    // far shorter than the refresh period (60 s).
    let line = t.wait_log("P3.3 allowlist source=none", Duration::from_secs(8));
    assert!(line.contains("count=0"), "{line}");
    assert!(now() >= asof + 3.0, "not dropped before its expiry");
}

/// SPEC §3: a Redis that does not answer is no answer, not an empty one.
/// With the default 60 s refresh, Redis killed: the universe list stays in
/// force (no fallback to env), said once; restarted (with its data) and a
/// resolution asked at once on the dropped connection (SIGHUP): the read is
/// retried every second, and the first plan after Redis answers is
/// permitted within 2 s.
#[test]
fn redis_killed_and_restarted_keeps_the_allowlist_and_permits_within_two_seconds() {
    let mut t = spawn_daemon(
        Opts::default()
            .set("P33_ALLOWLIST", "SOLUSDT")
            .set("P33_ALLOWLIST_REFRESH_S", "60")
            .set("P33_STALE_THRESHOLD_SEC", "600")
            .deferred(),
    );
    set_universe(&mut t.con, &["BTCUSDT", "ETHUSDT"], now(), 0);
    set_snapshot(&mut t.con, "BTCUSDT", "0.5", now());
    t.start_ready();
    let close = |id: &'static str| {
        vec![
            ("plan_id", id),
            ("symbol", "BTCUSDT"),
            ("decision", "EXECUTE"),
            ("action", "FULL_CLOSE_PROPOSED"),
            ("reduceOnly", "true"),
        ]
    };
    t.push_plan(&close("before"));
    assert_eq!(t.wait_permit("before")["allow"], true);
    let mark = t.log_count();
    t.redis.kill();
    // A resolution asked while Redis is away: no answer, the list stays.
    t.signal("HUP");
    t.wait_log_after(mark, "allowlist: Redis read failed (", T);
    let line = t.wait_log_after(mark, ": keeping source=universe until it answers", T);
    assert!(line.contains(" WARN "), "{line}");
    wait_for("readyz 503 while Redis is down", T, || {
        (t.get("/readyz").0 == 503).then_some(())
    });
    assert!(t.is_running(), "the daemon never exits for Redis");
    t.redis.restart();
    let back = std::time::Instant::now();
    t.con = t.redis.con();
    // Asked again at once after the restart, on the dropped connection.
    t.signal("HUP");
    t.push_plan(&close("after"));
    let p = t.wait_permit("after");
    let took = back.elapsed();
    assert_eq!(p["allow"], true, "{p}");
    eprintln!("the first permit after Redis came back: {took:?}");
    assert!(
        took < Duration::from_secs(5),
        "the first permit after Redis came back took {took:?}"
    );
    let l = t.lines.lock().unwrap();
    assert!(
        !l[mark..]
            .iter()
            .any(|x| x.contains("P3.3 allowlist source=env")
                || x.contains("P3.3 allowlist source=none")),
        "the allowlist fell back while Redis did not answer"
    );
    drop(l);
    wait_for("readyz 200", T, || {
        (t.get("/readyz").0 == 200).then_some(())
    });
    assert_eq!(t.metric("p33_redis_up"), Some(1.0));
    assert_eq!(
        t.metric("p33_allowlist_source{source=\"universe\"}"),
        Some(1.0)
    );
}

#[test]
fn starts_without_redis_and_resolves_once_it_appears() {
    // The daemon is pointed at a free port where no Redis runs yet.
    let port = free_port();
    let mut d = spawn_daemon(
        Opts::default()
            .set("REDIS_URL", &format!("redis://127.0.0.1:{port}/0"))
            .deferred(),
    );
    d.start();
    d.wait_log("cannot connect", T);
    assert_eq!(d.get("/healthz").0, 200);
    assert_eq!(d.get("/readyz").0, 503);
    assert!(
        d.grep("P3.3 allowlist source=").is_empty(),
        "no resolution before Redis answers"
    );
    let child = std::process::Command::new("redis-server")
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
        // Under P33_IT_ACL the daemon logs in as p33: this server has the
        // users too.
        .args(if acl_mode() {
            vec![
                "--aclfile".to_string(),
                acl_file(&{
                    let dir = std::env::temp_dir().join(format!("p33-acl-late-{port}"));
                    std::fs::create_dir_all(&dir).unwrap();
                    dir
                })
                .to_string_lossy()
                .into_owned(),
            ]
        } else {
            Vec::new()
        })
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _k = Kill(child);
    d.wait_log("P3.3 allowlist source=none", Duration::from_secs(15));
    assert!(d.is_running());
}

#[test]
fn sighup_re_resolves_at_once() {
    let mut t = spawn_daemon(
        Opts::default()
            .set("P33_ALLOWLIST_REFRESH_S", "3600")
            .set("P33_ALLOWLIST", "BTCUSDT")
            .deferred(),
    );
    t.start();
    t.wait_log("source=env", T);
    set_universe(&mut t.con, &["BTCUSDT", "ETHUSDT"], now(), 0);
    let mark = t.log_count();
    t.signal("HUP");
    t.wait_log_after(mark, "P3.3 allowlist source=universe stale=0 count=2", T);
}

#[test]
fn sigterm_stops_cleanly_within_five_seconds() {
    let mut t = spawn_daemon(Opts::default().deferred());
    t.start();
    t.wait_log("ready: reading plans", T);
    let (code, took) = t.terminate();
    assert_eq!(code, Some(0), "clean exit");
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[test]
fn sigterm_while_redis_is_unreachable_still_exits_zero() {
    let port = free_port();
    let mut t = spawn_daemon(Opts::default().deferred());
    t.env
        .insert("REDIS_URL".into(), format!("redis://127.0.0.1:{port}/0"));
    t.start();
    t.wait_log("cannot connect", T);
    let (code, took) = t.terminate();
    assert_eq!(code, Some(0));
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[test]
fn bad_configuration_exits_78_naming_the_variable() {
    let (code, _, err) = run_once(
        &["--check-config"],
        &[("P33_POLL_SEC", "abc"), ("P33_SNAPSHOT_SOURCE", "external")],
    );
    assert_eq!(code, Some(78));
    assert!(err.contains("P33_POLL_SEC") && err.contains("abc"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    let (code, _, err) = run_once(
        &[],
        &[
            ("P33_LOG_FORMAT", "xml"),
            ("P33_SNAPSHOT_SOURCE", "external"),
        ],
    );
    assert_eq!(code, Some(78), "{err}");
}

#[test]
fn check_config_prints_the_effective_config_with_secrets_redacted() {
    let (code, out, err) = run_once(
        &["--check-config"],
        &[
            ("BINANCE_TESTNET_API_KEY", "k-very-secret"),
            ("BINANCE_TESTNET_API_SECRET", "s-very-secret"),
            ("REDIS_URL", "redis://:pw-very-secret@127.0.0.1:6390/1"),
            ("P33_POLL_SEC", "0.5"),
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("P33_POLL_SEC=0.5"), "{out}");
    assert!(out.contains("BINANCE_TESTNET_API_KEY=[redacted]"), "{out}");
    assert!(
        out.contains("REDIS_URL=redis://[redacted]@127.0.0.1:6390/1"),
        "{out}"
    );
    assert!(!out.contains("very-secret"), "{out}");
}

#[test]
fn missing_credentials_in_binance_mode_exit_78_and_external_mode_runs() {
    let (code, _, err) = run_once(&["--check-config"], &[]);
    assert_eq!(code, Some(78));
    assert!(
        err.contains("BINANCE_TESTNET_API_KEY") && err.contains("BINANCE_TESTNET_API_SECRET"),
        "{err}"
    );
    let (code, _, _) = run_once(&["--check-config"], &[("P33_SNAPSHOT_SOURCE", "external")]);
    assert_eq!(code, Some(0));
}

#[test]
fn version_and_help() {
    let (code, out, _) = run_once(&["--version"], &[]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("position-state-brain "), "{out}");
    assert!(out.contains("commit"), "{out}");
    let (code, out, _) = run_once(&["--help"], &[]);
    assert_eq!(code, Some(0));
    assert!(out.contains("--check-config"), "{out}");
    let (code, _, err) = run_once(&["--bogus"], &[]);
    assert_eq!(code, Some(64), "a usage error is 64: {err}");
}

#[test]
fn busy_metrics_port_exits_1_with_one_clear_line() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let t = spawn_daemon(
        Opts::default()
            .set("P33_METRICS_PORT", &port.to_string())
            .deferred(),
    );
    // Spawned without waiting for the metrics address it will never log.
    let mut d = Daemon::spawn(&t.env);
    assert_eq!(d.wait_exit(T), Some(1));
    d.wait_log(&format!("cannot bind the metrics port 127.0.0.1:{port}"), T);
}

#[test]
fn build_tag_and_legacy_variables_are_logged() {
    let mut t = spawn_daemon(
        Opts::default()
            .set("UNIVERSE_ENABLE", "true")
            .set("P33_TARGET_CYCLE_SEC", "3")
            .deferred(),
    );
    t.start();
    t.wait_log(&format!("P3.3_BUILD_TAG={}", env!("CARGO_PKG_VERSION")), T);
    let w = t.wait_log("ignoring legacy variables", T);
    assert!(
        w.contains("UNIVERSE_ENABLE") && w.contains("P33_TARGET_CYCLE_SEC") && w.contains("WARN"),
        "{w}"
    );
}

#[test]
fn json_log_format_keeps_the_allowlist_line_greppable() {
    let mut t = spawn_daemon(
        Opts::default()
            .set("P33_LOG_FORMAT", "json")
            .set("P33_ALLOWLIST", "BTCUSDT")
            .deferred(),
    );
    t.start();
    let line = t.wait_log("P3.3 allowlist source=env", T);
    let v: serde_json::Value = serde_json::from_str(&line).expect("JSON line");
    assert_eq!(
        v["message"],
        "P3.3 allowlist source=env stale=env count=1 asof_epoch=static age_s=0"
    );
}
