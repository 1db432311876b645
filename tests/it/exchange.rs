//! Exchange snapshots against the project's fake exchange (SPEC §7): one
//! positionRisk request per cycle, hedge mode, failures, -1021, 429, a hung
//! exchange, step sizes, canonical hashes.

use std::collections::HashMap;
use std::time::Duration;

use crate::common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(10);
const KEY: &str = "test-api-key";
const SECRET: &str = "test-api-secret";

fn snapshot(con: &mut redis::Connection, symbol: &str) -> HashMap<String, String> {
    redis::cmd("HGETALL")
        .arg(format!("quantum:position:snapshot:{symbol}"))
        .query(con)
        .unwrap()
}

fn wait_snapshot(con: &mut redis::Connection, symbol: &str) -> HashMap<String, String> {
    wait_for(&format!("snapshot of {symbol}"), T, || {
        let h = snapshot(con, symbol);
        (!h.is_empty()).then_some(h)
    })
}

fn plan<'a>(id: &'a str, symbol: &'a str, action: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("plan_id", id),
        ("symbol", symbol),
        ("decision", "EXECUTE"),
        ("action", action),
        ("reduceOnly", "true"),
    ]
}

#[test]
fn one_position_risk_request_per_cycle_for_566_symbols() {
    let symbols: Vec<String> = (0..566).map(|i| format!("SYM{i}USDT")).collect();
    let mut t = spawn_daemon(
        Opts::env_allowlist(&symbols.join(","))
            .exchange(KEY, SECRET)
            // Requests counted per cycle: REST alone (no reconcile).
            .set("P33_POSITION_STREAM", "off")
            .set("P33_POLL_SEC", "1")
            .deferred(),
    );
    t.fx().control("/control/positions", json!([
        {"symbol": "SYM0USDT", "positionAmt": "1.5", "entryPrice": "10", "markPrice": "11", "unRealizedProfit": "1.5", "leverage": "3"},
        {"symbol": "SYM1USDT", "positionAmt": "-2"},
        {"symbol": "NOTLISTEDUSDT", "positionAmt": "7"}
    ]));
    t.start();
    t.wait_log("source=env stale=env count=566", T);
    wait_for("the first cycle", T, || {
        (t.metric("p33_snapshot_cycle_seconds_count").unwrap_or(0.0) >= 1.0).then_some(())
    });
    let t0 = now();
    for s in &symbols {
        let h = snapshot(&mut t.con, s);
        let ts: f64 = h["ts_epoch"].parse().unwrap();
        assert!(t0 - ts < 3.0, "{s} fresh");
    }
    let h = snapshot(&mut t.con, "SYM0USDT");
    assert_eq!(
        (
            h["position_amt"].as_str(),
            h["side"].as_str(),
            h["entry_price"].as_str(),
            h["mark_price"].as_str(),
            h["unrealized_pnl"].as_str(),
            h["leverage"].as_str(),
            h["source"].as_str()
        ),
        ("1.5", "LONG", "10", "11", "1.5", "3", "binance")
    );
    let h = snapshot(&mut t.con, "SYM1USDT");
    assert_eq!(
        (h["position_amt"].as_str(), h["side"].as_str()),
        ("-2", "SHORT")
    );
    let h = snapshot(&mut t.con, "SYM2USDT");
    assert_eq!(
        (h["position_amt"].as_str(), h["side"].as_str()),
        ("0", "NONE"),
        "absent from a successful reply is flat"
    );
    assert!(
        snapshot(&mut t.con, "NOTLISTEDUSDT").is_empty(),
        "only allowlisted symbols are written"
    );
    let ttl: i64 = redis::cmd("TTL")
        .arg("quantum:position:snapshot:SYM5USDT")
        .query(&mut t.con)
        .unwrap();
    assert!(ttl > 3500 && ttl <= 3600, "{ttl}");
    wait_for("three cycles", T, || {
        (t.metric("p33_snapshot_cycle_seconds_count")? >= 3.0).then_some(())
    });
    let cycles = t.metric("p33_snapshot_cycle_seconds_count").unwrap();
    let requests = t.fx().count("position_risk_ok") as f64;
    assert!(cycles >= 3.0, "{cycles} cycles");
    assert!(
        requests == cycles || requests == cycles + 1.0,
        "{requests} requests for {cycles} cycles"
    );
    let sum = t.metric("p33_snapshot_cycle_seconds_sum").unwrap();
    eprintln!(
        "566-symbol cycle (request + Redis writes): mean {:.1} ms over {cycles} cycles",
        sum / cycles * 1000.0
    );
}

#[test]
fn hedge_mode_positions_and_hedged_plans_are_denied() {
    let mut t = spawn_daemon(
        Opts::env_allowlist("SOLUSDT,ADAUSDT,ETHUSDT,BTCUSDT")
            .exchange(KEY, SECRET)
            .deferred(),
    );
    t.fx().control(
        "/control/positions",
        json!([
            {"symbol": "SOLUSDT", "positionAmt": "2", "positionSide": "LONG"},
            {"symbol": "SOLUSDT", "positionAmt": "0", "positionSide": "SHORT"},
            {"symbol": "ADAUSDT", "positionAmt": "0", "positionSide": "LONG"},
            {"symbol": "ADAUSDT", "positionAmt": "-30", "positionSide": "SHORT"},
            {"symbol": "ETHUSDT", "positionAmt": "1", "positionSide": "LONG"},
            {"symbol": "ETHUSDT", "positionAmt": "-1", "positionSide": "SHORT"}
        ]),
    );
    t.start();
    t.wait_log("ready: reading plans", T);
    let h = wait_snapshot(&mut t.con, "SOLUSDT");
    assert_eq!(
        (h["position_amt"].as_str(), h["side"].as_str()),
        ("2", "LONG")
    );
    let h = wait_snapshot(&mut t.con, "ADAUSDT");
    assert_eq!(
        (h["position_amt"].as_str(), h["side"].as_str()),
        ("-30", "SHORT")
    );
    let h = wait_snapshot(&mut t.con, "ETHUSDT");
    assert_eq!(h["side"], "HEDGED");
    let h = wait_snapshot(&mut t.con, "BTCUSDT");
    assert_eq!(
        (h["position_amt"].as_str(), h["side"].as_str()),
        ("0", "NONE")
    );
    push_plan(
        &mut t.con,
        &plan("hedged-1", "ETHUSDT", "FULL_CLOSE_PROPOSED"),
    );
    push_plan(
        &mut t.con,
        &plan("long-1", "SOLUSDT", "FULL_CLOSE_PROPOSED"),
    );
    let p = wait_permit(&mut t.con, "hedged-1");
    assert_eq!(
        (p["reason"].as_str(), p["context"]["field"].as_str()),
        (Some("invalid_exchange_snapshot"), Some("side"))
    );
    assert_eq!(
        wait_permit(&mut t.con, "long-1")["safe_qty"].to_string(),
        "2"
    );
    t.wait_log("hedge-mode positions open on both sides", T);
}

#[test]
fn a_failed_cycle_writes_nothing_and_plans_are_then_denied_stale() {
    // REST alone: while the stream is live it re-stamps the hash (SPEC §16;
    // it/stream.rs covers the stream down with REST down too).
    let mut t = spawn_daemon(
        Opts::env_allowlist("BTCUSDT")
            .exchange(KEY, SECRET)
            .set("P33_POSITION_STREAM", "off")
            .set("P33_STALE_THRESHOLD_SEC", "1.5")
            .deferred(),
    );
    t.fx().control(
        "/control/positions",
        json!([{"symbol": "BTCUSDT", "positionAmt": "0.5"}]),
    );
    t.start();
    let before = wait_snapshot(&mut t.con, "BTCUSDT");
    t.fx().control("/control/mode", json!({"fail_5xx": true}));
    let failed = |t: &TestDaemon| {
        t.metric("p33_exchange_requests_total{outcome=\"transient_error\"}")
            .unwrap_or(0.0)
    };
    wait_for("a failed cycle", T, || (failed(&t) >= 1.0).then_some(()));
    let frozen = snapshot(&mut t.con, "BTCUSDT");
    // Evidence, not a pause: two more failed cycles happened meanwhile.
    let seen = failed(&t);
    wait_for("two more failed cycles", T, || {
        (failed(&t) >= seen + 2.0).then_some(())
    });
    assert_eq!(
        snapshot(&mut t.con, "BTCUSDT"),
        frozen,
        "a failed cycle leaves the hash untouched"
    );
    assert!(frozen["ts_epoch"] >= before["ts_epoch"]);
    assert!(
        t.metric("p33_exchange_requests_total{outcome=\"transient_error\"}")
            .unwrap_or(0.0)
            >= 1.0
    );
    t.wait_log("positionRisk failed", T);
    push_plan(
        &mut t.con,
        &plan("stale-1", "BTCUSDT", "FULL_CLOSE_PROPOSED"),
    );
    assert_eq!(
        wait_permit(&mut t.con, "stale-1")["reason"],
        "stale_exchange_state"
    );
}

#[test]
fn wrong_secret_is_rejected_by_the_exchange_and_counted() {
    let mut t = spawn_daemon(
        Opts::env_allowlist("BTCUSDT")
            .exchange(KEY, SECRET)
            .set("BINANCE_TESTNET_API_SECRET", "not-the-secret")
            .deferred(),
    );
    t.start();
    wait_for("a rejected signature", T, || {
        (t.fx().count("rejected_signature") >= 1).then_some(())
    });
    wait_for("the api_error count", T, || {
        (t.metric("p33_exchange_requests_total{outcome=\"api_error\"}")
            .unwrap_or(0.0)
            >= 1.0)
            .then_some(())
    });
    let line = t.wait_log("api error -1022", T);
    assert!(
        !line.contains("not-the-secret") && !line.contains("signature="),
        "{line}"
    );
    assert!(t
        .lines
        .lock()
        .unwrap()
        .iter()
        .all(|l| !l.contains("not-the-secret") && !l.contains(KEY)));
}

#[test]
fn error_1021_resyncs_the_clock_once_and_retries_once() {
    // REST alone: the stream's reconcile would be one more positionRisk.
    let mut t = spawn_daemon(
        Opts::env_allowlist("BTCUSDT")
            .exchange(KEY, SECRET)
            .set("P33_POSITION_STREAM", "off")
            .set("P33_POLL_SEC", "60")
            .deferred(),
    );
    t.fx().control(
        "/control/positions",
        json!([{"symbol": "BTCUSDT", "positionAmt": "0.5"}]),
    );
    t.fx()
        .control("/control/mode", json!({"fail_1021_once": true}));
    t.start();
    wait_snapshot(&mut t.con, "BTCUSDT");
    t.wait_log("-1021 timestamp outside recvWindow", T);
    assert_eq!(t.fx().count("/fapi/v1/time"), 1, "one time sync");
    assert_eq!(
        t.fx().count("/fapi/v2/positionRisk"),
        2,
        "the request and one retry"
    );
    assert_eq!(t.fx().count("position_risk_ok"), 1);
}

#[test]
fn a_local_clock_an_hour_off_is_corrected_by_the_time_sync() {
    let mut t = spawn_daemon(
        Opts::env_allowlist("BTCUSDT")
            .exchange(KEY, SECRET)
            .deferred(),
    );
    t.fx().control(
        "/control/positions",
        json!([{"symbol": "BTCUSDT", "positionAmt": "0.5"}]),
    );
    t.fx()
        .control("/control/mode", json!({"time_offset_ms": 3_600_000}));
    t.start();
    wait_snapshot(&mut t.con, "BTCUSDT");
    assert_eq!(t.fx().count("/fapi/v1/time"), 1, "one resync");
    // The stream reads the exchange's clock at start; the first poll and
    // the stream's reconcile may be refused before that one resync (or
    // none, when the stream's came first); none after it.
    let refused = t.fx().count("rejected_timestamp");
    assert!(refused <= 2, "{refused} refused");
    let polls = t.fx().count("position_risk_ok");
    wait_for("two more polls", T, || {
        (t.fx().count("position_risk_ok") >= polls + 2).then_some(())
    });
    assert_eq!(t.fx().count("rejected_timestamp"), refused);
}

#[test]
fn rate_limit_429_holds_requests_until_retry_after() {
    let mut t = spawn_daemon(
        Opts::env_allowlist("BTCUSDT")
            .exchange(KEY, SECRET)
            .deferred(),
    );
    t.fx().control(
        "/control/positions",
        json!([{"symbol": "BTCUSDT", "positionAmt": "0.5"}]),
    );
    t.start();
    wait_snapshot(&mut t.con, "BTCUSDT");
    t.fx().control("/control/mode", json!({"rate_limit_s": 2}));
    wait_for("a 429", T, || {
        (t.metric("p33_exchange_requests_total{outcome=\"rate_limited\"}")
            .unwrap_or(0.0)
            >= 1.0)
            .then_some(())
    });
    let ok_before = t.fx().count("position_risk_ok");
    wait_for("requests to resume", T, || {
        (t.fx().count("position_risk_ok") > ok_before).then_some(())
    });
    let times: Vec<u64> = t.fx().stats()["position_risk_ms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    // The 429 is the request just before the first one that resumed.
    let resumed = times.len() - 1 - (t.fx().count("position_risk_ok") - ok_before - 1) as usize;
    let gap = times[resumed] - times[resumed - 1];
    assert!(
        gap >= 2000,
        "no request before Retry-After passed: gap {gap} ms in {times:?}"
    );
    assert!(
        t.metric("p33_exchange_requests_total{outcome=\"held_back\"}")
            .unwrap_or(0.0)
            >= 1.0
    );
}

#[test]
fn a_hung_exchange_does_not_delay_permits() {
    let mut t = spawn_daemon(
        Opts::env_allowlist("BTCUSDT")
            .exchange(KEY, SECRET)
            .set("P33_STALE_THRESHOLD_SEC", "2")
            .deferred(),
    );
    t.fx().control(
        "/control/positions",
        json!([{"symbol": "BTCUSDT", "positionAmt": "0.5"}]),
    );
    t.start();
    wait_snapshot(&mut t.con, "BTCUSDT");
    t.fx().control("/control/mode", json!({"delay_ms": 30_000}));
    let started = now();
    let mut reasons = Vec::new();
    let mut i = 0;
    while now() - started < 4.5 {
        let id = format!("hung-{i}");
        i += 1;
        // The exchange hangs 30 s; a permit that waited for it would miss
        // wait_permit's 10 s (how fast permits come is the benchmark's job).
        push_plan(&mut t.con, &plan(&id, "BTCUSDT", "FULL_CLOSE_PROPOSED"));
        let p = wait_permit(&mut t.con, &id);
        reasons.push(p["reason"].as_str().unwrap().to_string());
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(
        reasons.first().map(String::as_str),
        Some("sanity_checks_passed"),
        "{reasons:?}"
    );
    assert_eq!(
        reasons.last().map(String::as_str),
        Some("stale_exchange_state"),
        "{reasons:?}"
    );
    t.kill();
}

#[test]
fn step_sizes_from_exchange_info_set_the_safe_quantity() {
    let mut t = spawn_daemon(
        Opts::env_allowlist("DOGEUSDT,ALTUSDT,XYZUSDT")
            .exchange(KEY, SECRET)
            .deferred(),
    );
    t.fx().control(
        "/control/steps",
        json!({"DOGEUSDT": "1", "ALTUSDT": "0.1", "BTCUSDT": "0.001"}),
    );
    t.fx().control(
        "/control/positions",
        json!([
            {"symbol": "DOGEUSDT", "positionAmt": "1234"},
            {"symbol": "ALTUSDT", "positionAmt": "0.35"},
            {"symbol": "XYZUSDT", "positionAmt": "0.0375"}
        ]),
    );
    t.start();
    t.wait_log("step sizes loaded for 3 symbols", T);
    wait_snapshot(&mut t.con, "XYZUSDT");
    push_plan(&mut t.con, &plan("step-doge", "DOGEUSDT", "PARTIAL_75"));
    push_plan(&mut t.con, &plan("step-alt", "ALTUSDT", "PARTIAL_50"));
    push_plan(
        &mut t.con,
        &plan("step-unknown", "XYZUSDT", "FULL_CLOSE_PROPOSED"),
    );
    let raw: String = wait_for("permit", T, || {
        redis::cmd("GET")
            .arg("quantum:permit:p33:step-doge")
            .query::<Option<String>>(&mut t.con)
            .ok()
            .flatten()
    });
    assert!(raw.contains("\"safe_qty\":925,"), "{raw}");
    assert_eq!(
        wait_permit(&mut t.con, "step-alt")["safe_qty"].to_string(),
        "0.1"
    );
    assert_eq!(
        wait_permit(&mut t.con, "step-unknown")["safe_qty"].to_string(),
        "0.037"
    );
    t.wait_log(
        "XYZUSDT: no step size known from exchangeInfo; using 0.001",
        T,
    );
    assert_eq!(
        t.metric("p33_step_size_fallback_total{symbol=\"XYZUSDT\"}"),
        Some(1.0)
    );
}

#[test]
fn canonical_positions_are_written_when_enabled() {
    let mut t = spawn_daemon(
        Opts::env_allowlist("BTCUSDT,ETHUSDT")
            .exchange(KEY, SECRET)
            .set("P33_CANONICAL_POSITIONS", "true")
            .deferred(),
    );
    // positionRisk names a flat symbol too, with its mark price (SPEC §19:
    // the canonical hash of a flat symbol carries it, not 0).
    t.fx().control("/control/positions", json!([
        {"symbol": "BTCUSDT", "positionAmt": "-0.25", "entryPrice": "60000", "markPrice": "59000", "unRealizedProfit": "250", "leverage": "5"},
        {"symbol": "ETHUSDT", "positionAmt": "0", "entryPrice": "0.0", "markPrice": "3100.5", "unRealizedProfit": "0", "leverage": "10"}
    ]));
    // Another service's field in the canonical hash stays: merged, never
    // replaced.
    let _: () = redis::cmd("HSET")
        .arg("quantum:state:positions:ETHUSDT")
        .arg("risk_tier")
        .arg("B")
        .query(&mut t.con)
        .unwrap();
    t.start();
    let h: HashMap<String, String> = wait_for("canonical hash", T, || {
        let h: HashMap<String, String> = redis::cmd("HGETALL")
            .arg("quantum:state:positions:BTCUSDT")
            .query(&mut t.con)
            .ok()?;
        (!h.is_empty()).then_some(h)
    });
    for (k, v) in [
        ("symbol", "BTCUSDT"),
        ("position_amt", "-0.25"),
        ("side", "SHORT"),
        ("quantity", "0.25"),
        ("entry_price", "60000"),
        ("mark_price", "59000"),
        ("current_price", "59000"),
        ("unrealized_pnl", "250"),
        ("leverage", "5"),
        ("source", "position_state_brain"),
    ] {
        assert_eq!(h.get(k).map(String::as_str), Some(v), "{k}");
    }
    let flat: HashMap<String, String> = redis::cmd("HGETALL")
        .arg("quantum:state:positions:ETHUSDT")
        .query(&mut t.con)
        .unwrap();
    assert_eq!(flat["side"], "FLAT");
    assert_eq!(flat["mark_price"], "3100.5", "{flat:?}");
    assert_eq!(flat["current_price"], "3100.5", "{flat:?}");
    assert_eq!(
        flat["risk_tier"], "B",
        "another writer's field stays: {flat:?}"
    );
    let snap: HashMap<String, String> = redis::cmd("HGETALL")
        .arg("quantum:position:snapshot:ETHUSDT")
        .query(&mut t.con)
        .unwrap();
    assert_eq!(snap["mark_price"], "3100.5", "{snap:?}");
}

#[test]
fn a_gained_symbol_is_polled_at_once() {
    let mut t = spawn_daemon(
        Opts::env_allowlist("BTCUSDT")
            .exchange(KEY, SECRET)
            .set("P33_ALLOWLIST_SOURCE", "universe")
            .set("P33_POLL_SEC", "3600")
            .set("P33_ALLOWLIST_REFRESH_S", "3600")
            .deferred(),
    );
    set_universe(&mut t.con, &["BTCUSDT"], now(), 0);
    t.start();
    wait_snapshot(&mut t.con, "BTCUSDT");
    set_universe(&mut t.con, &["BTCUSDT", "ETHUSDT"], now(), 0);
    t.signal("HUP");
    wait_snapshot(&mut t.con, "ETHUSDT");
    t.wait_log("allowlist gained symbols: polling positions now", T);
}

#[test]
fn step_sizes_survive_a_restart_without_the_exchange() {
    let mut t = spawn_daemon(
        Opts::env_allowlist("SOLUSDT")
            .exchange(KEY, SECRET)
            .deferred(),
    );
    t.fx().control("/control/steps", json!({"SOLUSDT": "1"}));
    t.fx().control(
        "/control/positions",
        json!([{"symbol": "SOLUSDT", "positionAmt": "-9.75"}]),
    );
    t.start();
    t.wait_log("step sizes loaded for 1 symbols", T);
    let saved: HashMap<String, String> = wait_for("the saved table", T, || {
        let h: HashMap<String, String> = redis::cmd("HGETALL")
            .arg("quantum:p33:step_sizes")
            .query(&mut t.con)
            .ok()?;
        (!h.is_empty()).then_some(h)
    });
    assert_eq!(saved["SOLUSDT"], "1");
    // Restart with no route to the exchange: external snapshots, a closed port.
    t.kill();
    let closed = format!("http://127.0.0.1:{}", free_port());
    t.env
        .insert("P33_SNAPSHOT_SOURCE".into(), "external".into());
    t.env.insert("P33_EXCHANGE_BASE_URL".into(), closed.clone());
    t.start_ready();
    let warn = t.wait_log("step sizes: GET", T);
    assert!(
        warn.contains(&format!("{closed}/fapi/v1/exchangeInfo")),
        "names the URL: {warn}"
    );
    assert!(
        warn.to_lowercase().contains("refused"),
        "names the cause: {warn}"
    );
    t.wait_log("step sizes: 1 loaded from quantum:p33:step_sizes", T);
    set_snapshot(&mut t.con, "SOLUSDT", "-9.75", now());
    push_plan(
        &mut t.con,
        &plan("sol-close", "SOLUSDT", "FULL_CLOSE_PROPOSED"),
    );
    let p = wait_permit(&mut t.con, "sol-close");
    assert_eq!(
        p["safe_qty"], 9,
        "the saved step 1, not the 0.001 fallback: {p}"
    );
    assert!(t.grep("using 0.001").is_empty());
}

#[test]
fn the_position_cap_follows_the_exchange_when_one_snapshot_write_fails() {
    let mut t = spawn_daemon(
        Opts::env_allowlist("AAAUSDT,BBBUSDT,CCCUSDT")
            .exchange(KEY, SECRET)
            .set("P33_MAX_OPEN_POSITIONS", "1")
            .deferred(),
    );
    t.fx().control("/control/positions", json!([]));
    t.start_ready();
    wait_for("the first cycle", T, || {
        (t.metric("p33_snapshot_cycle_seconds_count").unwrap_or(0.0) >= 1.0).then_some(())
    });
    // From now on every cycle's snapshot write fails on CCCUSDT's key.
    let key = "quantum:position:snapshot:CCCUSDT";
    let _: () = redis::cmd("DEL").arg(key).query(&mut t.con).unwrap();
    let _: () = redis::cmd("RPUSH")
        .arg(key)
        .arg("x")
        .query(&mut t.con)
        .unwrap();
    t.wait_log("snapshots: writing 3 hashes failed", T);
    // AAAUSDT opens on the exchange; two more polls see it.
    t.fx().control(
        "/control/positions",
        json!([{"symbol": "AAAUSDT", "positionAmt": "1"}]),
    );
    let seen = t.fx().count("position_risk_ok");
    wait_for("two more polls", T, || {
        (t.fx().count("position_risk_ok") >= seen + 2).then_some(())
    });
    t.push_plan(&[
        ("plan_id", "cap-bbb"),
        ("symbol", "BBBUSDT"),
        ("decision", "EXECUTE"),
        ("action", "OPEN_LONG"),
        ("reduceOnly", "false"),
    ]);
    let p = t.wait_permit("cap-bbb");
    assert_eq!(p["reason"], "max_open_positions", "{p}");
    assert_eq!(p["context"]["positions"], 1, "{p}");
}

#[test]
fn position_amounts_sent_as_json_numbers_fail_the_cycle() {
    let mut t = spawn_daemon(Opts::env_allowlist("BTCUSDT").exchange(KEY, SECRET));
    t.fx().control(
        "/control/positions",
        json!([{"symbol": "BTCUSDT", "positionAmt": "0.5"}]),
    );
    wait_for("the string amount in the snapshot", T, || {
        (snapshot(&mut t.con, "BTCUSDT")
            .get("position_amt")
            .map(String::as_str)
            == Some("0.5"))
        .then_some(())
    });
    // Binance sends strings: a number is a reply of another shape.
    t.fx().control(
        "/control/positions",
        json!([{"symbol": "BTCUSDT", "positionAmt": 0.25}]),
    );
    // Evidence, not a pause: two cycles refused the reply.
    wait_for("two refused cycles", T, || {
        (t.grep("positionAmt is a number, not a string").len() >= 2).then_some(())
    });
    assert_eq!(
        snapshot(&mut t.con, "BTCUSDT")["position_amt"],
        "0.5",
        "a malformed reply writes nothing"
    );
}

#[test]
fn dry_run_writes_nothing_the_live_pipeline_reads() {
    let mut t = spawn_daemon(
        Opts::env_allowlist("BTCUSDT")
            .exchange(KEY, SECRET)
            .set("P33_DRY_RUN", "true")
            .set("P33_STALE_THRESHOLD_SEC", "600")
            .deferred(),
    );
    t.fx().control(
        "/control/positions",
        json!([{"symbol": "BTCUSDT", "positionAmt": "0.5"}]),
    );
    t.fx()
        .control("/control/steps", json!({"BTCUSDT": "0.001"}));
    // The live instance's snapshot, as the dry run finds it.
    set_snapshot(&mut t.con, "BTCUSDT", "0.25", now());
    t.start_ready();
    // Evidence that it polled and loaded step sizes: its own log lines.
    t.wait_log("step sizes loaded for 1 symbols", T);
    wait_for("two polls", T, || {
        (t.metric("p33_exchange_requests_total{outcome=\"ok\"}")
            .unwrap_or(0.0)
            >= 3.0)
            .then_some(())
    });
    push_plan(
        &mut t.con,
        &plan("dry-close", "BTCUSDT", "FULL_CLOSE_PROPOSED"),
    );
    t.wait_log("DRY-RUN would ALLOW plan dry-clos", T);
    assert_eq!(
        snapshot(&mut t.con, "BTCUSDT")["position_amt"],
        "0.25",
        "the live snapshot is untouched"
    );
    let steps: HashMap<String, String> = redis::cmd("HGETALL")
        .arg("quantum:p33:step_sizes")
        .query(&mut t.con)
        .unwrap();
    assert!(steps.is_empty(), "no step table written: {steps:?}");
    let live: i64 = redis::cmd("XLEN")
        .arg("quantum:stream:p33.decisions")
        .query(&mut t.con)
        .unwrap();
    assert_eq!(live, 0, "no record in the live stream");
    let dry: i64 = redis::cmd("XLEN")
        .arg("quantum:stream:p33.decisions.dry_run")
        .query(&mut t.con)
        .unwrap();
    assert_eq!(dry, 1, "its record in its own stream");
    let env: Vec<(&str, &str)> = t
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let (code, out, err) = run_once(&["explain", "dry-close"], &env);
    assert_eq!(code, Some(0), "explain finds a dry run's record: {err}");
    assert!(out.contains("dry_run_allow"), "{out}");
    let (code, out, err) = run_once(&["replay", "--dry-run", "--json"], &env);
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["records"], 1, "{v}");
}
