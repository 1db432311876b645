//! Live positions from the user data stream (SPEC §16), against the fake
//! exchange's listenKey endpoints and WebSocket: fills reach the snapshots
//! without a poll, the reconcile, reconnects after each kind of loss, the
//! order rule, REST corrections, hedge mode, restarts, several instances,
//! and the listenKey kept out of every log line.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(10);
const KEY: &str = "stream-api-key";
const SECRET: &str = "stream-api-secret";

fn snapshot(con: &mut redis::Connection, symbol: &str) -> HashMap<String, String> {
    redis::cmd("HGETALL")
        .arg(format!("quantum:position:snapshot:{symbol}"))
        .query(con)
        .unwrap()
}

/// Waits until the snapshot of `symbol` shows `amt` (and, if given, `feed`).
fn wait_amount(
    con: &mut redis::Connection,
    symbol: &str,
    amt: &str,
    feed: Option<&str>,
) -> HashMap<String, String> {
    wait_for(&format!("{symbol} at {amt} ({feed:?})"), T, || {
        let h = snapshot(con, symbol);
        (h.get("position_amt").map(String::as_str) == Some(amt)
            && feed.is_none_or(|f| h.get("feed").map(String::as_str) == Some(f)))
        .then_some(h)
    })
}

fn fill(t: &TestDaemon, rows: serde_json::Value) {
    t.fx().control("/control/positions", rows);
}

fn one(symbol: &str, amt: &str) -> serde_json::Value {
    json!([{"symbol": symbol, "positionAmt": amt, "entryPrice": "100"}])
}

fn metric(t: &TestDaemon, series: &str) -> f64 {
    t.metric(series).unwrap_or(0.0)
}

fn wait_live(t: &TestDaemon) {
    t.wait_metric("p33_position_stream_live", 1.0);
}

/// Waits until `series` is at least `n`.
fn wait_at_least(t: &TestDaemon, series: &str, n: f64) {
    wait_for(&format!("{series} ≥ {n}"), T, || {
        (metric(t, series) >= n).then_some(())
    });
}

/// Account updates the stream took in: applied, or stale because a poll
/// had already brought the same state.
fn events_taken(t: &TestDaemon) -> f64 {
    ["applied", "stale"]
        .iter()
        .map(|r| {
            metric(
                t,
                &format!(
                    "p33_position_stream_events_total{{result=\"{r}\",type=\"account_update\"}}"
                ),
            )
        })
        .sum()
}

/// A fill, with evidence the stream took it: the snapshot shows the amount
/// (written by the stream, or by a poll that came first with the same
/// amount: with a short P33_POLL_SEC either may win) and the stream's
/// account-update count moved.
fn fill_through_stream(t: &mut TestDaemon, symbol: &str, amt: &str) {
    let before = events_taken(t);
    fill(t, one(symbol, amt));
    wait_amount(&mut t.con, symbol, amt, None);
    wait_for("the stream to take the event", T, || {
        (events_taken(t) > before).then_some(())
    });
}

fn stream_daemon(symbols: &str, extra: &[(&str, &str)]) -> TestDaemon {
    let mut o = Opts::env_allowlist(symbols)
        .exchange(KEY, SECRET)
        .set("P33_POLL_SEC", "60")
        .deferred();
    for (k, v) in extra {
        o = o.set(k, v);
    }
    spawn_daemon(o)
}

fn plan<'a>(id: &'a str, symbol: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("plan_id", id),
        ("symbol", symbol),
        ("decision", "EXECUTE"),
        ("action", "FULL_CLOSE_PROPOSED"),
        ("reduceOnly", "true"),
    ]
}

/// Every amount written to one snapshot hash, in order, as Redis executed
/// the writes (`redis-cli monitor`).
struct Writes {
    child: Child,
    amounts: Arc<Mutex<Vec<String>>>,
}

impl Writes {
    fn watch(redis: &Redis, symbol: &str) -> Writes {
        let port = redis.port.to_string();
        let mut child = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port, "monitor"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-cli");
        let out = BufReader::new(child.stdout.take().unwrap());
        let amounts = Arc::new(Mutex::new(Vec::new()));
        let key = format!("\"quantum:position:snapshot:{symbol}\" \"position_amt\" \"");
        let seen = amounts.clone();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                if line.trim() == "OK" {
                    seen.lock().unwrap().push("monitoring".to_string());
                }
                if let Some(rest) = line.split(&key).nth(1) {
                    let amt = rest.split('"').next().unwrap_or("").to_string();
                    seen.lock().unwrap().push(amt);
                }
            }
        });
        // MONITOR answers OK once it follows.
        wait_for("redis-cli monitor", T, || {
            let a = amounts.lock().unwrap();
            (a.first().map(String::as_str) == Some("monitoring")).then_some(())
        });
        amounts.lock().unwrap().clear();
        Writes { child, amounts }
    }

    fn amounts(&self) -> Vec<f64> {
        self.amounts
            .lock()
            .unwrap()
            .iter()
            .map(|a| a.parse::<f64>().unwrap())
            .collect()
    }

    /// No amount written after a larger one: with fills that only grow,
    /// an older amount written late is a wrong amount.
    fn assert_never_back(&self) -> usize {
        let a = self.amounts();
        for w in a.windows(2) {
            assert!(
                w[1] >= w[0],
                "an older amount written after a newer one: {a:?}"
            );
        }
        a.len()
    }
}

impl Drop for Writes {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_fill_reaches_the_snapshot_without_a_poll_and_the_next_plan_is_judged_on_it() {
    let mut t = stream_daemon("BTCUSDT,ETHUSDT", &[]);
    fill(&t, one("BTCUSDT", "0.5"));
    t.start();
    wait_live(&t);
    t.wait_log("position stream: live (reconciled with positionRisk", T);
    let h = wait_amount(&mut t.con, "BTCUSDT", "0.5", Some("rest"));
    assert_eq!(h["source"], "binance");
    let polls = t.fx().count("/fapi/v2/positionRisk");
    fill(&t, one("BTCUSDT", "1.5"));
    let h = wait_amount(&mut t.con, "BTCUSDT", "1.5", Some("stream"));
    assert_eq!(
        (h["side"].as_str(), h["entry_price"].as_str()),
        ("LONG", "100")
    );
    // At once: the plan right after the fill is judged on the new amount.
    t.push_plan(&plan("after-fill", "BTCUSDT"));
    assert_eq!(t.wait_permit("after-fill")["safe_qty"].to_string(), "1.5");
    assert_eq!(
        t.fx().count("/fapi/v2/positionRisk"),
        polls,
        "no positionRisk between the fill and the snapshot (P33_POLL_SEC=60)"
    );
    let e = snapshot(&mut t.con, "ETHUSDT");
    assert_eq!(
        (e["position_amt"].as_str(), e["feed"].as_str()),
        ("0", "rest"),
        "untouched symbols keep REST's"
    );
    assert!(metric(&t, "p33_position_update_latency_seconds_count") >= 1.0);
    assert!(
        metric(
            &t,
            "p33_position_stream_events_total{result=\"applied\",type=\"account_update\"}"
        ) >= 1.0
    );
    assert_eq!(metric(&t, "p33_position_stream_enabled"), 1.0);
    assert!(metric(&t, "p33_decision_input_age_seconds_count") >= 1.0);
}

#[test]
fn a_connection_is_replaced_before_the_exchange_cuts_it_and_never_goes_down() {
    // The exchange cuts connections at 5 s (Binance: 24 h); the daemon
    // replaces its own at 2.5 s of age (P33_POSITION_STREAM_REPLACE_SEC),
    // counted from each one's open: with the 2 s overlap none gets older
    // than 4.5 s.
    let mut t = stream_daemon("BTCUSDT", &[("P33_POSITION_STREAM_REPLACE_SEC", "2.5")]);
    fill(&t, one("BTCUSDT", "1"));
    t.fx()
        .control("/control/stream", json!({"max_age_ms": 5000}));
    t.start();
    wait_live(&t);
    for n in 2..=4 {
        wait_at_least(
            &t,
            "p33_position_stream_reconnects_total{reason=\"replaced\"}",
            f64::from(n - 1),
        );
        let a = n.to_string();
        fill(&t, one("BTCUSDT", &a));
        wait_amount(&mut t.con, "BTCUSDT", &a, Some("stream"));
    }
    assert!(t.fx().stats()["ws_opened"].as_u64().unwrap() >= 4);
    // Between overlaps one connection is open: the old ones were closed.
    wait_for("one open connection between overlaps", T, || {
        (t.fx().stats()["ws_open"] == 1).then_some(())
    });
    assert_eq!(t.grep("position stream: down").len(), 0, "{:?}", t.logs());
    assert_eq!(metric(&t, "p33_position_stream_live"), 1.0);
    t.wait_log(
        "connection replaced ahead of the exchange's 24 h cut; still live",
        T,
    );
}

#[test]
fn an_out_of_order_event_is_ignored_and_a_swallowed_one_is_corrected_by_rest() {
    let mut t = stream_daemon("BTCUSDT", &[("P33_POLL_SEC", "1")]);
    fill(&t, one("BTCUSDT", "1"));
    t.start();
    wait_live(&t);
    fill_through_stream(&mut t, "BTCUSDT", "2");
    t.fx().control(
        "/control/stream",
        json!({"old_event": {"symbol": "BTCUSDT", "positionAmt": "9", "age_ms": 5000}}),
    );
    wait_at_least(
        &t,
        "p33_position_stream_events_total{result=\"stale\",type=\"account_update\"}",
        1.0,
    );
    assert_eq!(snapshot(&mut t.con, "BTCUSDT")["position_amt"], "2");
    // The exchange moves to 3 and the event is lost: REST corrects it.
    t.fx()
        .control("/control/positions?swallow=1", one("BTCUSDT", "3"));
    wait_amount(&mut t.con, "BTCUSDT", "3", Some("rest"));
    wait_at_least(&t, "p33_position_stream_corrections_total", 1.0);
    t.wait_log(
        "positionRisk corrected BTCUSDT BOTH: the stream said 2, REST says 3 (a missed event)",
        T,
    );
    assert_eq!(metric(&t, "p33_position_stream_corrections_total"), 1.0);
    assert_eq!(metric(&t, "p33_position_stream_live"), 1.0, "still live");
}

#[test]
fn drop_key_expiry_and_a_silent_stall_each_reconnect_and_no_wrong_amount_is_written() {
    let mut t = stream_daemon(
        "BTCUSDT",
        &[
            ("P33_POLL_SEC", "0.5"),
            ("P33_POSITION_STREAM_PING_SEC", "1"),
        ],
    );
    fill(&t, one("BTCUSDT", "1"));
    t.fx().control("/control/mode", json!({"delay_ms": 100}));
    let writes = Writes::watch(&t.redis, "BTCUSDT");
    t.start();
    wait_live(&t);
    let amount = std::cell::Cell::new(1);
    let step = |t: &mut TestDaemon| {
        amount.set(amount.get() + 1);
        let a = amount.get().to_string();
        fill(t, one("BTCUSDT", &a));
        wait_amount(&mut t.con, "BTCUSDT", &a, None);
    };
    step(&mut t);
    for (fault, reason, said) in [
        (
            json!({"drop": true}),
            "closed",
            "position stream: down (closed",
        ),
        (
            json!({"expire_key": true}),
            "key_expired",
            "position stream: down (key_expired: listenKeyExpired event",
        ),
        (
            json!({"stall": true}),
            "ping_timeout",
            "position stream: down (ping_timeout: no frame within 1.0 s of a ping",
        ),
    ] {
        let series = format!("p33_position_stream_reconnects_total{{reason=\"{reason}\"}}");
        let from = t.log_count();
        t.fx().control("/control/stream", fault);
        // Fills while the stream is down or coming back: REST or the
        // stream writes them, never an older one after a newer.
        step(&mut t);
        wait_at_least(&t, &series, 1.0);
        t.wait_log_after(from, said, T);
        wait_live(&t);
        amount.set(amount.get() + 1);
        fill_through_stream(&mut t, "BTCUSDT", &amount.get().to_string());
    }
    assert_eq!(
        t.fx().count("POST /fapi/v1/listenKey"),
        2,
        "a new key after the expiry, the same one otherwise"
    );
    let written = writes.assert_never_back();
    assert!(written >= 8, "{written} writes seen");
    t.daemon_mut().terminate();
    assert_eq!(t.fx().count("DELETE /fapi/v1/listenKey"), 0, "never DELETE");
}

#[test]
fn a_key_gone_without_a_word_is_found_by_the_keepalive_and_made_anew() {
    let mut t = stream_daemon("BTCUSDT", &[("P33_POSITION_STREAM_KEEPALIVE_SEC", "0.5")]);
    fill(&t, one("BTCUSDT", "1"));
    t.start();
    wait_live(&t);
    wait_for("a keepalive", T, || {
        (t.fx().count("PUT /fapi/v1/listenKey") >= 1).then_some(())
    });
    t.fx()
        .control("/control/stream", json!({"forget_key": true}));
    wait_at_least(
        &t,
        "p33_position_stream_reconnects_total{reason=\"key_expired\"}",
        1.0,
    );
    t.wait_log(
        "position stream: down (key_expired: keepalive: -1125, the listenKey does not exist)",
        T,
    );
    wait_live(&t);
    assert_eq!(t.fx().count("POST /fapi/v1/listenKey"), 2, "a new key");
    fill(&t, one("BTCUSDT", "2"));
    wait_amount(&mut t.con, "BTCUSDT", "2", Some("stream"));
}

#[test]
fn a_malformed_frame_ends_live_and_with_rest_down_too_plans_are_denied_stale() {
    let mut t = stream_daemon(
        "BTCUSDT",
        &[("P33_POLL_SEC", "0.5"), ("P33_STALE_THRESHOLD_SEC", "1.5")],
    );
    fill(&t, one("BTCUSDT", "1"));
    t.start();
    wait_live(&t);
    wait_amount(&mut t.con, "BTCUSDT", "1", None);
    t.fx().control("/control/mode", json!({"fail_5xx": true}));
    t.fx()
        .control("/control/stream", json!({"malformed": true}));
    wait_at_least(
        &t,
        "p33_position_stream_reconnects_total{reason=\"invalid_frame\"}",
        1.0,
    );
    t.wait_log("position stream: down (invalid_frame: not JSON", T);
    // Evidence it tried to come back: a reconcile failed on the dead REST.
    wait_at_least(
        &t,
        "p33_position_stream_reconnects_total{reason=\"reconcile_failed\"}",
        1.0,
    );
    assert_eq!(metric(&t, "p33_position_stream_live"), 0.0);
    let ts: f64 = snapshot(&mut t.con, "BTCUSDT")["ts_epoch_ms"]
        .parse()
        .unwrap();
    wait_for("the snapshot to age past the threshold", T, || {
        (now() * 1000.0 - ts > 1600.0).then_some(())
    });
    t.push_plan(&plan("down-1", "BTCUSDT"));
    assert_eq!(t.wait_permit("down-1")["reason"], "stale_exchange_state");
    // REST back: reconciled and live again.
    t.fx().control("/control/mode", json!({"fail_5xx": false}));
    wait_live(&t);
    fill_through_stream(&mut t, "BTCUSDT", "2");
}

#[test]
fn hedge_mode_legs_arrive_through_the_stream() {
    let mut t = stream_daemon("ETHUSDT", &[]);
    let hedge = |long: &str, short: &str| {
        json!([
            {"symbol": "ETHUSDT", "positionAmt": long, "positionSide": "LONG"},
            {"symbol": "ETHUSDT", "positionAmt": short, "positionSide": "SHORT"}
        ])
    };
    fill(&t, hedge("0", "0"));
    t.start();
    wait_live(&t);
    wait_amount(&mut t.con, "ETHUSDT", "0", Some("rest"));
    fill(&t, hedge("0", "-2"));
    let h = wait_amount(&mut t.con, "ETHUSDT", "-2", Some("stream"));
    assert_eq!(h["side"], "SHORT");
    t.push_plan(&plan("short-1", "ETHUSDT"));
    assert_eq!(t.wait_permit("short-1")["safe_qty"].to_string(), "2");
    fill(&t, hedge("1", "-2"));
    wait_for("HEDGED", T, || {
        (snapshot(&mut t.con, "ETHUSDT")["side"] == "HEDGED").then_some(())
    });
    t.push_plan(&plan("hedged-1", "ETHUSDT"));
    let p = t.wait_permit("hedged-1");
    assert_eq!(
        (p["reason"].as_str(), p["context"]["field"].as_str()),
        (Some("invalid_exchange_snapshot"), Some("side"))
    );
}

#[test]
fn a_sigkill_under_a_stream_of_fills_writes_no_older_amount_and_catches_up() {
    let mut t = stream_daemon("BTCUSDT", &[("P33_POLL_SEC", "0.3")]);
    fill(&t, one("BTCUSDT", "1"));
    // Each positionRisk reply arrives 150 ms after the positions it shows:
    // about seven fills late. Only the order rule keeps it from writing an
    // older amount over the stream's newer one.
    t.fx().control("/control/mode", json!({"delay_ms": 150}));
    let writes = Writes::watch(&t.redis, "BTCUSDT");
    t.start();
    wait_live(&t);
    let addr = t.fx().addr.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let last = Arc::new(std::sync::atomic::AtomicU64::new(1));
    let filler = {
        let (stop, last) = (stop.clone(), last.clone());
        std::thread::spawn(move || {
            let mut n = 1u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let body = one("BTCUSDT", &n.to_string()).to_string();
                let (st, b) = http(&addr, "POST", "/control/positions", &body);
                assert_eq!(st, 200, "{b}");
                last.store(n, std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    wait_for("fills written", T, || {
        (writes.amounts().len() >= 20).then_some(())
    });
    t.kill();
    std::thread::sleep(Duration::from_millis(300));
    t.start();
    wait_live(&t);
    wait_for("fills written after the restart", T, || {
        (writes.amounts().len() >= 60).then_some(())
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    filler.join().unwrap();
    let n = last.load(std::sync::atomic::Ordering::Relaxed).to_string();
    wait_amount(&mut t.con, "BTCUSDT", &n, None);
    writes.assert_never_back();
}

#[test]
fn several_instances_each_follow_the_stream_on_one_shared_key() {
    let mut t = stream_daemon("BTCUSDT", &[("P33_CONSUMER_NAME", "p33-a")]);
    fill(&t, one("BTCUSDT", "1"));
    t.start();
    wait_live(&t);
    let mut env = t.env.clone();
    env.insert("P33_CONSUMER_NAME".into(), "p33-b".into());
    let b = Daemon::start(&env);
    b.wait_metric("p33_position_stream_live", 1.0);
    assert_eq!(t.fx().stats()["ws_open"], 2);
    assert_eq!(t.fx().count("POST /fapi/v1/listenKey"), 2);
    fill(&t, one("BTCUSDT", "4"));
    wait_amount(&mut t.con, "BTCUSDT", "4", Some("stream"));
    wait_for("both instances applied the event", T, || {
        let applied =
            "p33_position_stream_events_total{result=\"applied\",type=\"account_update\"}";
        (metric(&t, applied) >= 1.0 && b.metric(applied).unwrap_or(0.0) >= 1.0).then_some(())
    });
    for name in ["p33-a", "p33-b"] {
        wait_for(&format!("{name} reports live"), T, || {
            let s: Option<String> = redis::cmd("HGET")
                .arg(format!("quantum:p33:instance:{name}"))
                .arg("position_stream")
                .query(&mut t.con)
                .unwrap();
            (s.as_deref() == Some("live")).then_some(())
        });
    }
    let (code, out, _) = run_once(&["ctl", "status"], &[("REDIS_URL", &t.redis.url())]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(out.matches("position_stream=live").count(), 2, "{out}");
    assert_eq!(out.matches("canonical_positions=off").count(), 2, "{out}");
}

#[test]
fn the_listen_key_never_reaches_a_log_line_or_check_config() {
    // At TRACE: the WebSocket library logs its URL (with the key) and its
    // request below INFO, so it is capped there whatever is asked (SPEC §17).
    let mut t = stream_daemon(
        "BTCUSDT",
        &[("P33_POSITION_STREAM_PING_SEC", "1"), ("RUST_LOG", "trace")],
    );
    t.start();
    wait_live(&t);
    // The key, as any client of the API key would get it.
    let key = {
        let mut s = std::net::TcpStream::connect(&t.fx().addr).unwrap();
        use std::io::{Read, Write};
        write!(
            s,
            "POST /fapi/v1/listenKey HTTP/1.1\r\nHost: x\r\nX-MBX-APIKEY: {KEY}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        let body = r.split("\r\n\r\n").nth(1).unwrap();
        serde_json::from_str::<serde_json::Value>(body).unwrap()["listenKey"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(key.len() > 10);
    for fault in [
        json!({"drop": true}),
        json!({"stall": true}),
        json!({"malformed": true}),
    ] {
        let live = metric(
            &t,
            "p33_position_stream_reconnects_total{reason=\"closed\"}",
        ) + metric(
            &t,
            "p33_position_stream_reconnects_total{reason=\"ping_timeout\"}",
        ) + metric(
            &t,
            "p33_position_stream_reconnects_total{reason=\"invalid_frame\"}",
        );
        t.fx().control("/control/stream", fault);
        wait_for("a reconnect", T, || {
            let n = metric(
                &t,
                "p33_position_stream_reconnects_total{reason=\"closed\"}",
            ) + metric(
                &t,
                "p33_position_stream_reconnects_total{reason=\"ping_timeout\"}",
            ) + metric(
                &t,
                "p33_position_stream_reconnects_total{reason=\"invalid_frame\"}",
            );
            (n > live).then_some(())
        });
        wait_live(&t);
    }
    let logs = t.logs().join("\n");
    assert!(logs.contains("position stream: down"), "{logs}");
    assert!(!logs.contains(&key), "the listenKey in a log line");
    assert!(
        logs.contains("log_filter=trace,tungstenite=info"),
        "the daemon ran at TRACE: {logs}"
    );
    let env: Vec<(&str, &str)> = t
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let (code, out, err) = run_once(&["--check-config"], &env);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains(&format!("P33_EXCHANGE_WS_URL=ws://{}", t.fx().addr)),
        "{out}"
    );
    assert!(!out.contains(&key) && !err.contains(&key));
}

#[test]
fn with_the_stream_off_there_is_no_key_no_socket_and_the_feed_is_rest() {
    let mut t = stream_daemon(
        "BTCUSDT",
        &[("P33_POSITION_STREAM", "off"), ("P33_POLL_SEC", "0.5")],
    );
    fill(&t, one("BTCUSDT", "1"));
    t.start();
    wait_amount(&mut t.con, "BTCUSDT", "1", Some("rest"));
    fill(&t, one("BTCUSDT", "2"));
    wait_amount(&mut t.con, "BTCUSDT", "2", Some("rest"));
    assert_eq!(t.fx().count("POST /fapi/v1/listenKey"), 0);
    assert_eq!(t.fx().stats()["ws_opened"], 0);
    assert_eq!(metric(&t, "p33_position_stream_enabled"), 0.0);
    wait_for("the instance report", T, || {
        let s: Option<String> = redis::cmd("HGET")
            .arg("quantum:p33:instance:p33-test")
            .arg("position_stream")
            .query(&mut t.con)
            .unwrap();
        (s.as_deref() == Some("off")).then_some(())
    });
}

/// The daemon's resident memory, bytes (`/proc/<pid>/status`).
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// An `ACCOUNT_UPDATE` with these times and one entry.
fn raw_event(e: u64, t: u64, symbol: &str, amt: &str) -> String {
    json!({"e": "ACCOUNT_UPDATE", "E": e, "T": t, "a": {"m": "ORDER", "B": [],
        "P": [{"s": symbol, "pa": amt, "ep": "100", "up": "0", "ps": "BOTH"}]}})
    .to_string()
}

/// SPEC §16: no exchange time beyond our clock. An event whose `T` is in
/// the year 3000, at u64::MAX, or 20 s ahead of the exchange's clock is an
/// invalid frame: never applied, never pinning the leg; real fills go on.
/// A positionRisk row whose `updateTime` is in the year 3000 makes its
/// symbol invalid (plans denied) until a row within bounds comes.
#[test]
fn an_exchange_time_ahead_of_our_clock_never_pins_a_position() {
    let mut t = stream_daemon("BTCUSDT", &[("P33_POLL_SEC", "0.5")]);
    fill(&t, one("BTCUSDT", "1.5"));
    let writes = Writes::watch(&t.redis, "BTCUSDT");
    t.start();
    wait_live(&t);
    let server_now = || now() as u64 * 1000;
    let mut amount = 1.5;
    for (n, ahead) in [32_503_680_000_000u64, u64::MAX, server_now() + 20_000]
        .into_iter()
        .enumerate()
    {
        let from = t.log_count();
        t.fx().control(
            "/control/stream",
            json!({"raw": raw_event(server_now(), ahead, "BTCUSDT", "1000")}),
        );
        wait_at_least(
            &t,
            "p33_position_stream_reconnects_total{reason=\"invalid_frame\"}",
            (n + 1) as f64,
        );
        t.wait_log_after(from, "ahead of the exchange's clock", T);
        wait_live(&t);
        // The next real fill reaches the snapshot through the stream.
        amount += 1.0;
        fill_through_stream(&mut t, "BTCUSDT", &amount.to_string());
    }
    assert!(
        writes.amounts().iter().all(|a| *a < 1000.0),
        "the amount ahead of the clock was written: {:?}",
        writes.amounts()
    );
    // A REST row from the year 3000: the symbol is invalid, plans denied.
    fill(
        &t,
        json!([{"symbol": "BTCUSDT", "positionAmt": "9", "updateTime": 32_503_680_000_000u64}]),
    );
    wait_for("the invalid snapshot", T, || {
        (snapshot(&mut t.con, "BTCUSDT")
            .get("side")
            .map(String::as_str)
            == Some("HEDGED"))
        .then_some(())
    });
    t.push_plan(&plan("future-row", "BTCUSDT"));
    assert_eq!(
        t.wait_permit("future-row")["reason"],
        "invalid_exchange_snapshot"
    );
    // A row within bounds makes it valid again, with its own amount.
    fill(&t, one("BTCUSDT", "2"));
    wait_amount(&mut t.con, "BTCUSDT", "2", None);
}

/// SPEC §16: only allowlisted symbols are kept. Account updates naming
/// 300,000 distinct symbols that are not on the allowlist cost no memory
/// (before, about 2 KB each, for ever), and the stream stays live.
#[test]
fn a_feed_naming_300000_other_symbols_costs_no_memory() {
    let mut t = stream_daemon("BTCUSDT", &[]);
    fill(&t, one("BTCUSDT", "1"));
    t.start();
    wait_live(&t);
    let pid = t.daemon_mut().pid();
    let before = rss_bytes(pid);
    let mut sent = 0u64;
    for frame in 0..30u64 {
        let entries: Vec<serde_json::Value> = (0..10_000u64)
            .map(|i| {
                json!({"s": format!("Z{}USDT", frame * 10_000 + i), "pa": "1", "ep": "1", "up": "0", "ps": "BOTH"})
            })
            .collect();
        let ts = now() as u64 * 1000;
        let text = json!({"e": "ACCOUNT_UPDATE", "E": ts, "T": ts, "a": {"m": "ORDER", "B": [], "P": entries}})
            .to_string();
        t.fx().control("/control/stream", json!({"raw": text}));
        sent += 1;
        wait_at_least(
            &t,
            "p33_position_stream_events_total{result=\"ignored\",type=\"account_update\"}",
            sent as f64,
        );
    }
    let grown = rss_bytes(pid).saturating_sub(before);
    assert!(
        grown < 64 * 1024 * 1024,
        "resident memory grew by {} MB for symbols not on the allowlist",
        grown / (1024 * 1024)
    );
    assert_eq!(metric(&t, "p33_position_stream_live"), 1.0);
    fill_through_stream(&mut t, "BTCUSDT", "2");
}

#[test]
fn an_order_filled_in_parts_with_one_t_is_followed_fill_by_fill() {
    // SPEC §19: Binance sends one ACCOUNT_UPDATE per fill of an order, often
    // with one T. The second and third were "stale" until REST corrected
    // them, up to a poll later (here 60 s).
    let mut t = stream_daemon("BTCUSDT", &[]);
    fill(&t, one("BTCUSDT", "0"));
    t.start();
    wait_live(&t);
    let stale = "p33_position_stream_events_total{result=\"stale\",type=\"account_update\"}";
    let applied = "p33_position_stream_events_total{result=\"applied\",type=\"account_update\"}";
    let (stale0, applied0) = (metric(&t, stale), metric(&t, applied));
    t.fx().control(
        "/control/stream",
        json!({"fills": {"symbol": "BTCUSDT", "amounts": ["0.02", "0.04", "1"]}}),
    );
    let h = wait_amount(&mut t.con, "BTCUSDT", "1", Some("stream"));
    assert_eq!(h["side"], "LONG", "{h:?}");
    wait_at_least(&t, applied, applied0 + 3.0);
    assert_eq!(metric(&t, stale), stale0, "none of the three was stale");
}

#[test]
fn order_trade_updates_name_the_cause_of_each_fill_in_either_order() {
    // SPEC §19: a fill is read from ORDER_TRADE_UPDATE and named by its
    // cause; a liquidation or an ADL is an ERROR line. The ACCOUNT_UPDATE
    // of the same fill (before it, as Binance usually sends them, or after)
    // moves the snapshot.
    let mut t = stream_daemon("BTCUSDT", &[]);
    fill(&t, one("BTCUSDT", "3"));
    t.start();
    wait_live(&t);
    let fills = "p33_position_stream_events_total{result=\"fill\",type=\"order_trade_update\"}";
    for (cause, order_first, level, order_type, after) in [
        ("stop", false, "INFO", "STOP_MARKET", "2.5"),
        ("take_profit", true, "INFO", "TAKE_PROFIT_MARKET", "2"),
        ("liquidation", false, "ERROR", "LIQUIDATION", "1.5"),
        ("adl", true, "ERROR", "MARKET", "1"),
        ("settlement", false, "INFO", "MARKET", "0.5"),
        ("order", true, "INFO", "MARKET", "0.25"),
    ] {
        let before = metric(&t, fills);
        t.fx().control(
            "/control/stream",
            json!({"order": {"symbol": "BTCUSDT", "side": "SELL", "qty": "0.5", "price": "61000",
                             "amount_after": after, "cause": cause, "order_first": order_first}}),
        );
        let line = t.wait_log(
            &format!("position stream: {cause} fill of BTCUSDT BOTH: SELL 0.5 at 61000"),
            T,
        );
        assert!(line.contains(level), "{line}");
        assert!(line.contains(order_type), "{line}");
        wait_amount(&mut t.con, "BTCUSDT", after, Some("stream"));
        wait_at_least(&t, fills, before + 1.0);
    }
    // Out of bounds (a quantity as a JSON number): the frame drops the
    // connection like a bad ACCOUNT_UPDATE.
    let invalid = "p33_position_stream_reconnects_total{reason=\"invalid_frame\"}";
    let before = metric(&t, invalid);
    t.fx().control(
        "/control/stream",
        json!({"raw": r#"{"e":"ORDER_TRADE_UPDATE","E":1,"T":1,"o":{"s":"BTCUSDT","c":"x","S":"SELL","o":"MARKET","x":"TRADE","i":1,"l":0.5,"ap":"1"}}"#}),
    );
    wait_at_least(&t, invalid, before + 1.0);
    t.wait_log("o.l is not a string", T);
}

/// The entries of `quantum:stream:p33.positions`, oldest first.
fn position_events(con: &mut redis::Connection) -> Vec<HashMap<String, String>> {
    let v: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg("quantum:stream:p33.positions")
        .arg("-")
        .arg("+")
        .query(con)
        .unwrap();
    v.into_iter().map(|(_, f)| f).collect()
}

#[test]
fn a_stop_fill_reaches_the_positions_stream_as_a_fill_and_a_change() {
    // SPEC §19: kind=position with the snapshot write, kind=fill per fill,
    // joined by symbol and exchange_ts_ms. The start (a first reply) is no
    // change.
    let mut t = stream_daemon("BTCUSDT", &[]);
    fill(&t, one("BTCUSDT", "3"));
    t.start();
    wait_live(&t);
    wait_amount(&mut t.con, "BTCUSDT", "3", None);
    assert!(
        position_events(&mut t.con).is_empty(),
        "the first reply is no change"
    );
    t.fx().control(
        "/control/stream",
        json!({"order": {"symbol": "BTCUSDT", "side": "SELL", "qty": "0.5", "price": "61000",
                         "amount_after": "2.5", "cause": "stop", "realized": "-12.5"}}),
    );
    let events = wait_for("a position change and a fill", T, || {
        let e = position_events(&mut t.con);
        (e.len() >= 2).then_some(e)
    });
    let change = events
        .iter()
        .find(|e| e["kind"] == "position")
        .expect("kind=position");
    let fill = events
        .iter()
        .find(|e| e["kind"] == "fill")
        .expect("kind=fill");
    for (k, v) in [
        ("symbol", "BTCUSDT"),
        ("leg", "BOTH"),
        ("from_amt", "3"),
        ("to_amt", "2.5"),
        ("side_after", "LONG"),
        ("reason", "order"),
        ("feed", "stream"),
    ] {
        assert_eq!(change[k], v, "{k}: {change:?}");
    }
    for (k, v) in [
        ("symbol", "BTCUSDT"),
        ("side", "SELL"),
        ("leg", "BOTH"),
        ("qty", "0.5"),
        ("price", "61000"),
        ("order_type", "STOP_MARKET"),
        ("cause", "stop"),
        ("realized_pnl", "-12.5"),
        ("client_order_id", "web_stop"),
    ] {
        assert_eq!(fill[k], v, "{k}: {fill:?}");
    }
    assert_eq!(
        change["exchange_ts_ms"], fill["exchange_ts_ms"],
        "joined by T"
    );
    assert!(fill["order_id"].parse::<u64>().is_ok(), "{fill:?}");
    assert!(
        change["ts_epoch"].parse::<u64>().is_ok(),
        "whole seconds: {change:?}"
    );
}

#[test]
fn with_position_events_off_the_snapshot_moves_and_nothing_is_written() {
    let mut t = stream_daemon("BTCUSDT", &[("P33_POSITION_EVENTS", "off")]);
    fill(&t, one("BTCUSDT", "3"));
    t.start();
    wait_live(&t);
    let fills = "p33_position_stream_events_total{result=\"fill\",type=\"order_trade_update\"}";
    t.fx().control(
        "/control/stream",
        json!({"order": {"symbol": "BTCUSDT", "qty": "1", "amount_after": "2", "cause": "take_profit"}}),
    );
    wait_amount(&mut t.con, "BTCUSDT", "2", Some("stream"));
    // The fill was read (evidence the daemon looked), and not written.
    wait_at_least(&t, fills, 1.0);
    assert!(position_events(&mut t.con).is_empty());
}

#[test]
fn a_liquidation_sets_its_symbol_reducing_once_and_is_counted() {
    // SPEC §19: a liquidation or ADL sets the symbol's state through the
    // control path (p33-auto, once per order, never looser), counts the
    // close by cause; P33_ON_LIQUIDATION=none only says and counts.
    let mut t = stream_daemon("BTCUSDT,ETHUSDT", &[]);
    fill(
        &t,
        json!([{"symbol": "BTCUSDT", "positionAmt": "3"}, {"symbol": "ETHUSDT", "positionAmt": "2"}]),
    );
    t.start();
    wait_live(&t);
    let closes = |c: &str| format!("p33_exchange_closes_total{{cause=\"{c}\"}}");
    for c in ["liquidation", "adl", "settlement", "stop", "take_profit"] {
        assert_eq!(t.metric(&closes(c)), Some(0.0), "{c} exported at 0");
    }
    let state = |con: &mut redis::Connection, s: &str| -> Option<String> {
        redis::cmd("GET")
            .arg(format!("quantum:p33:trading_state:{s}"))
            .query(con)
            .unwrap()
    };
    for _ in 0..2 {
        // The same liquidation order twice (two fills of it).
        t.fx().control(
            "/control/stream",
            json!({"order": {"symbol": "BTCUSDT", "qty": "1", "amount_after": "2",
                             "cause": "liquidation", "order_id": 777}}),
        );
    }
    wait_at_least(&t, &closes("liquidation"), 2.0);
    let con = &mut t.con;
    wait_for("BTCUSDT REDUCING", T, || {
        (state(con, "BTCUSDT").as_deref() == Some("REDUCING")).then_some(())
    });
    let entries: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg("quantum:stream:p33.control")
        .arg("-")
        .arg("+")
        .query(&mut t.con)
        .unwrap();
    let autos: Vec<&HashMap<String, String>> = entries
        .iter()
        .map(|(_, f)| f)
        .filter(|f| f.get("reason").map(String::as_str) == Some("liquidation 777"))
        .filter(|f| f.get("kind").map(String::as_str) == Some("change"))
        .collect();
    assert_eq!(autos.len(), 1, "once per order: {entries:?}");
    for (k, v) in [
        ("actor", "p33-auto"),
        ("scope", "symbol"),
        ("symbol", "BTCUSDT"),
        ("to", "REDUCING"),
    ] {
        assert_eq!(autos[0][k], v, "{k}: {:?}", autos[0]);
    }
    t.wait_log("position stream: liquidation fill of BTCUSDT", T);
    // A stop is a close too, and changes no state.
    t.fx().control(
        "/control/stream",
        json!({"order": {"symbol": "ETHUSDT", "qty": "1", "amount_after": "1", "cause": "stop"}}),
    );
    wait_at_least(&t, &closes("stop"), 1.0);
    assert_eq!(state(&mut t.con, "ETHUSDT"), None);
}

#[test]
fn with_on_liquidation_none_a_liquidation_is_only_said_and_counted() {
    let mut t = stream_daemon("BTCUSDT", &[("P33_ON_LIQUIDATION", "none")]);
    fill(&t, one("BTCUSDT", "3"));
    t.start();
    wait_live(&t);
    t.fx().control(
        "/control/stream",
        json!({"order": {"symbol": "BTCUSDT", "qty": "1", "amount_after": "2", "cause": "adl"}}),
    );
    wait_at_least(&t, "p33_exchange_closes_total{cause=\"adl\"}", 1.0);
    t.wait_log("position stream: adl fill of BTCUSDT", T);
    let s: Option<String> = redis::cmd("GET")
        .arg("quantum:p33:trading_state:BTCUSDT")
        .query(&mut t.con)
        .unwrap();
    assert_eq!(s, None);
}

/// The entries of `quantum:stream:trade.closed`, oldest first.
fn trade_closed(con: &mut redis::Connection) -> Vec<HashMap<String, String>> {
    let v: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg("quantum:stream:trade.closed")
        .arg("-")
        .arg("+")
        .query(con)
        .unwrap();
    v.into_iter().map(|(_, f)| f).collect()
}

/// Checks `entry` against the pipeline's contract for it (quantum_trader's
/// `TradeClosedEvent`: every field a string; required `event_type`,
/// `timestamp`, `symbol`, `side`, `entry_price`, `exit_price`,
/// `pnl_percent`, `source`) and the formats its readers parse the way
/// intent_executor writes them: prices and PnL as Python's `str(float)`
/// (what `float()` reads back), `pnl_percent` rounded to 2 places, the time
/// as `utcnow().isoformat()` (no zone), the order id a whole number. No
/// python3 here: CI hides it.
fn check_contract(entry: &HashMap<String, String>) -> Result<(), String> {
    for k in [
        "event_type",
        "timestamp",
        "symbol",
        "side",
        "entry_price",
        "exit_price",
        "pnl_percent",
        "source",
        "confidence",
        "model_id",
        "R_net",
        "pnl_usd",
        "reason",
        "order_id",
    ] {
        if entry.get(k).is_none_or(|v| v.is_empty()) {
            return Err(format!("{k} is missing"));
        }
    }
    if entry["event_type"] != "trade.closed" {
        return Err("event_type".into());
    }
    if !["LONG", "SHORT"].contains(&entry["side"].as_str()) {
        return Err("side is not LONG or SHORT".into());
    }
    // str(float): digits, a point and digits (or Python's exponent form).
    let py_float = |v: &str| {
        let v = v.strip_prefix('-').unwrap_or(v);
        let fixed = v.split_once('.').is_some_and(|(i, f)| {
            !i.is_empty()
                && !f.is_empty()
                && i.bytes().all(|b| b.is_ascii_digit())
                && f.bytes().all(|b| b.is_ascii_digit())
        });
        let exp = v.split_once('e').is_some_and(|(m, e)| {
            m.parse::<f64>().is_ok()
                && (e.starts_with('-') || e.starts_with('+'))
                && e.len() >= 3
                && e[1..].bytes().all(|b| b.is_ascii_digit())
        });
        fixed || exp
    };
    for k in [
        "entry_price",
        "exit_price",
        "pnl_percent",
        "pnl_usd",
        "R_net",
        "confidence",
    ] {
        if !py_float(&entry[k]) || entry[k].parse::<f64>().is_err() {
            return Err(format!("{k} {:?} is not str(float)", entry[k]));
        }
    }
    if entry["pnl_percent"]
        .split_once('.')
        .is_none_or(|(_, f)| f.len() > 2)
    {
        return Err("pnl_percent is not rounded to 2 places".into());
    }
    // 2026-12-07T19:35:14.514000 or 2026-12-07T19:35:14
    let t = entry["timestamp"].as_bytes();
    let digits = |r: std::ops::Range<usize>| t[r].iter().all(u8::is_ascii_digit);
    let shape = (t.len() == 19 || t.len() == 26)
        && digits(0..4)
        && t[4] == b'-'
        && digits(5..7)
        && t[7] == b'-'
        && digits(8..10)
        && t[10] == b'T'
        && digits(11..13)
        && t[13] == b':'
        && digits(14..16)
        && t[16] == b':'
        && digits(17..19)
        && (t.len() == 19 || (t[19] == b'.' && digits(20..26)));
    if !shape {
        return Err("timestamp is not utcnow().isoformat()".into());
    }
    if entry["order_id"].parse::<u64>().is_err() {
        return Err("order_id is not a whole number".into());
    }
    Ok(())
}

#[test]
fn exchange_side_closes_reach_trade_closed_in_the_pipelines_contract() {
    // SPEC §19: a change to FLAT joined with its fill (either order) whose
    // cause is the exchange's own is written to the pipeline's trade.closed
    // stream, in intent_executor's formats; the executor's own close, a
    // partial stop, and P33_TRADE_CLOSED_EVENTS off write nothing there.
    let mut t = stream_daemon(
        "BTCUSDT,ETHUSDT,SOLUSDT,XRPUSDT",
        &[
            ("P33_TRADE_CLOSED_EVENTS", "true"),
            ("P33_ON_LIQUIDATION", "none"),
        ],
    );
    fill(
        &t,
        json!([
            {"symbol": "BTCUSDT", "positionAmt": "0.5", "entryPrice": "60000"},
            {"symbol": "ETHUSDT", "positionAmt": "-2", "entryPrice": "3000.5"},
            {"symbol": "SOLUSDT", "positionAmt": "10", "entryPrice": "150"},
            {"symbol": "XRPUSDT", "positionAmt": "100", "entryPrice": "0.5"},
        ]),
    );
    t.start();
    wait_live(&t);
    let written =
        |c: &str| format!("p33_trade_closed_events_total{{cause=\"{c}\",result=\"written\"}}");
    for c in ["liquidation", "adl", "settlement", "stop", "take_profit"] {
        assert_eq!(t.metric(&written(c)), Some(0.0), "{c} exported at 0");
    }
    let order = |t: &TestDaemon, o: serde_json::Value| {
        t.fx().control("/control/stream", json!({ "order": o }))
    };
    // The executor closes SOLUSDT; a stop takes part of XRPUSDT.
    order(
        &t,
        json!({"symbol": "SOLUSDT", "qty": "10", "price": "151", "amount_after": "0", "cause": "order"}),
    );
    order(
        &t,
        json!({"symbol": "XRPUSDT", "qty": "40", "price": "0.45", "amount_after": "60", "cause": "stop"}),
    );
    // A stop closes BTCUSDT (the ACCOUNT_UPDATE first), in two fills of one
    // order with one T each.
    order(
        &t,
        json!({"symbol": "BTCUSDT", "qty": "0.2", "price": "58000", "amount_after": "0.3",
               "cause": "stop", "order_id": 4242, "realized": "-400"}),
    );
    order(
        &t,
        json!({"symbol": "BTCUSDT", "qty": "0.3", "price": "58712.4", "amount_after": "0",
               "cause": "stop", "order_id": 4242, "realized": "-386.28"}),
    );
    // A liquidation closes the ETHUSDT short (the fill first).
    order(
        &t,
        json!({"symbol": "ETHUSDT", "side": "BUY", "qty": "2", "price": "3150.25", "amount_after": "0",
               "cause": "liquidation", "order_first": true, "order_id": 5151, "realized": "-299.5"}),
    );
    let entries = wait_for("two trade.closed entries", T, || {
        let e = trade_closed(&mut t.con);
        (e.len() >= 2).then_some(e)
    });
    // Every event before them was taken in (the fills were read and their
    // changes written): the executor's close and the partial stop would be
    // there by now.
    assert_eq!(entries.len(), 2, "{entries:#?}");
    let by = |s: &str| entries.iter().find(|e| e["symbol"] == s).unwrap();
    let btc = by("BTCUSDT");
    let ts = btc["timestamp"].clone();
    let want_btc: HashMap<String, String> = [
        ("event_type", "trade.closed"),
        ("timestamp", ts.as_str()),
        ("symbol", "BTCUSDT"),
        ("side", "LONG"),
        ("entry_price", "60000.0"),
        ("exit_price", "58712.4"),
        // (58712.4 − 60000) / 60000 × 100, rounded to 2 places.
        ("pnl_percent", "-2.15"),
        ("confidence", "0.5"),
        ("model_id", "exchange"),
        ("R_net", "0.0"),
        ("pnl_usd", "-786.28"),
        ("reason", "stop"),
        ("order_id", "4242"),
        ("source", "position_state_brain"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(btc, &want_btc);
    let eth = by("ETHUSDT");
    for (k, v) in [
        ("side", "SHORT"),
        ("entry_price", "3000.5"),
        ("exit_price", "3150.25"),
        // A short: (3000.5 − 3150.25) / 3000.5 × 100 = −4.99…
        ("pnl_percent", "-4.99"),
        ("pnl_usd", "-299.5"),
        ("reason", "liquidation"),
        ("order_id", "5151"),
    ] {
        assert_eq!(eth[k], v, "{k}: {eth:?}");
    }
    for e in &entries {
        check_contract(e).unwrap_or_else(|why| panic!("{why}\n{e:?}"));
    }
    // The check itself refuses what the pipeline could not read.
    for (k, bad) in [
        ("entry_price", "60000"),
        ("pnl_percent", "-2.146"),
        ("timestamp", "2026-12-07T19:35:14Z"),
        ("order_id", "x"),
        ("side", "BUY"),
        ("source", ""),
    ] {
        let mut e = btc.clone();
        e.insert(k.into(), bad.into());
        assert!(check_contract(&e).is_err(), "{k}={bad} passed");
    }
    // The time is now, as utcnow() would have it.
    let day = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H"])
        .output()
        .unwrap();
    let hour = String::from_utf8_lossy(&day.stdout).trim().to_string();
    assert!(ts.starts_with(&hour[..10]), "{ts} vs {hour}");
    assert_eq!(t.metric(&written("stop")), Some(1.0));
    assert_eq!(t.metric(&written("liquidation")), Some(1.0));
    t.wait_log(
        "position stream: trade.closed for BTCUSDT LONG (stop, order 4242)",
        T,
    );
    // The positions stream has all of it: four changes to flat or less,
    // five fills.
    let events = position_events(&mut t.con);
    assert_eq!(events.iter().filter(|e| e["kind"] == "fill").count(), 5);
}

#[test]
fn with_trade_closed_events_off_a_stop_close_writes_only_the_positions_stream() {
    let mut t = stream_daemon("BTCUSDT", &[]);
    fill(&t, one("BTCUSDT", "3"));
    t.start();
    wait_live(&t);
    t.fx().control(
        "/control/stream",
        json!({"order": {"symbol": "BTCUSDT", "qty": "3", "amount_after": "0", "cause": "stop"}}),
    );
    // Evidence the daemon looked: the fill and the change to flat are on
    // the positions stream.
    wait_for("the fill and the change", T, || {
        let e = position_events(&mut t.con);
        (e.iter().any(|e| e["kind"] == "fill") && e.iter().any(|e| e["kind"] == "position"))
            .then_some(())
    });
    assert!(trade_closed(&mut t.con).is_empty());
    assert_eq!(
        t.metric("p33_trade_closed_events_total{cause=\"stop\",result=\"written\"}"),
        Some(0.0)
    );
}
