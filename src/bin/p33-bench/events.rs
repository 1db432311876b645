//! `--events N`: plans flat out while fills flow through the stream,
//! `P33_POSITION_EVENTS` on, off, off, on (SPEC §19).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use position_state_brain::redis::keys;
use serde_json::{json, Value};

use crate::support::*;
use crate::Args;

/// `--events N`: N plans flat out while fills flow through the stream,
/// with `P33_POSITION_EVENTS` on, off, off, on; each fill timed from the
/// call that makes it to its `kind=position` entry.
pub(crate) async fn events_mode(args: &Args) -> anyhow::Result<()> {
    let mut guard = Guard(Vec::new());
    let (dir, url, client, mut con) = private_redis(&mut guard).await?;
    let fake = start_fake(&mut guard)?;
    let http = reqwest::Client::new();
    let nsym = args.fill_symbols.max(1);
    let names: Vec<String> = (0..nsym).map(|k| format!("FILL{k}USDT")).collect();
    let rows: Vec<Value> = names
        .iter()
        .map(|s| json!({"symbol": s, "positionAmt": "1", "entryPrice": "100"}))
        .collect();
    http.post(format!("http://{fake}/control/positions"))
        .body(Value::Array(rows).to_string())
        .send()
        .await?;
    let daemon = match &args.daemon {
        Some(d) => d.clone(),
        None => std::env::current_exe()?.with_file_name("position-state-brain"),
    };
    let mut seq = 1u64;
    let mut runs = Vec::new();
    let mut lat_all: Vec<f64> = Vec::new();
    let phases = ["on", "off", "off", "on"].repeat(usize::from(args.rounds));
    for (n, events) in phases.into_iter().enumerate() {
        let _: () = redis::cmd("FLUSHALL").query_async(&mut con).await?;
        let log_path = dir.join(format!("daemon-events-{n}.log"));
        let consumer = format!("p33-bench-events-{n}");
        let vars = [
            ("P33_POSITION_STREAM", "on"),
            ("P33_POSITION_EVENTS", events),
            ("P33_CONSUMER_NAME", consumer.as_str()),
        ];
        let mut child =
            start_exchange_daemon(&daemon, &url, &fake, &names, &vars, args, &log_path).await?;
        wait_log(&log_path, "position stream: live").await?;
        // Each fill's (symbol, amount after) → when it was made; the
        // kind=position entries as they land.
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let seen: Arc<Mutex<Vec<f64>>> = Arc::new(Mutex::new(Vec::new()));
        let entries = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let reader = {
            let mut rcon = client.get_multiplexed_async_connection().await?;
            let (pend, seen, entries) = (pending.clone(), seen.clone(), entries.clone());
            tokio::spawn(async move {
                let mut last = "0-0".to_string();
                loop {
                    let r: redis::RedisResult<redis::streams::StreamReadReply> =
                        redis::cmd("XREAD")
                            .arg("BLOCK")
                            .arg(200)
                            .arg("STREAMS")
                            .arg(keys::POSITIONS_STREAM)
                            .arg(&last)
                            .query_async(&mut rcon)
                            .await;
                    let Ok(reply) = r else { continue };
                    let at = Instant::now();
                    for k in reply.keys {
                        for id in k.ids {
                            last = id.id.clone();
                            let field = |f: &str| id.get::<String>(f).unwrap_or_default();
                            if field("kind") != "position" {
                                continue;
                            }
                            entries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Ok(amt) = field("to_amt").parse::<u64>() else {
                                continue;
                            };
                            time_changes(&pend, &seen, &field("symbol"), at, |w| w == amt);
                        }
                    }
                }
            })
        };
        // Fills at --fill-rate: a stop or an order of the executor's, in
        // turn, each moving one symbol's amount up by one.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let filler = {
            let (stop, names, pending, http, fake) = (
                stop.clone(),
                names.clone(),
                pending.clone(),
                http.clone(),
                fake.clone(),
            );
            let rate = args.fill_rate.max(0.1);
            let first = seq;
            tokio::spawn(async move {
                let started = Instant::now();
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let due = started + Duration::from_secs_f64(i as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                    let sym = names[(i as usize) % names.len()].clone();
                    let amt = first + i + 1;
                    pending
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .entry(sym.clone())
                        .or_default()
                        .push((amt, Instant::now()));
                    let cause = if i.is_multiple_of(2) { "stop" } else { "order" };
                    let _ = http
                        .post(format!("http://{fake}/control/stream"))
                        .body(
                            json!({"order": {"symbol": sym, "side": "BUY", "qty": "1",
                                             "price": "100", "amount_after": amt.to_string(),
                                             "cause": cause}})
                            .to_string(),
                        )
                        .send()
                        .await;
                    i += 1;
                }
                i
            })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        // The plans, flat out: closes on the fill symbols.
        let started = Instant::now();
        let mut pcon = client.get_multiplexed_async_connection().await?;
        for chunk in (0..args.events).collect::<Vec<_>>().chunks(500) {
            let mut p = redis::pipe();
            for i in chunk {
                p.cmd("XADD")
                    .arg(keys::PLAN_STREAM)
                    .arg("*")
                    .arg("plan_id")
                    .arg(format!("events-{n}-{i}"))
                    .arg("symbol")
                    .arg(&names[i % names.len()])
                    .arg("decision")
                    .arg("EXECUTE")
                    .arg("action")
                    .arg("FULL_CLOSE_PROPOSED")
                    .arg("reduceOnly")
                    .arg("true")
                    .ignore();
            }
            p.query_async::<()>(&mut pcon).await?;
        }
        // Done when the group has read every plan and none is pending.
        let deadline = Instant::now() + Duration::from_secs(600);
        let elapsed = loop {
            let groups: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(keys::PLAN_STREAM)
                .query_async(&mut con)
                .await?;
            let num = |g: &HashMap<String, redis::Value>, k: &str| match g.get(k) {
                Some(redis::Value::Int(n)) => *n,
                _ => -1,
            };
            let done = groups
                .iter()
                .any(|g| num(g, "entries-read") >= args.events as i64 && num(g, "pending") == 0);
            if done {
                break started.elapsed();
            }
            if Instant::now() > deadline {
                anyhow::bail!("the plans were not all finished within 600 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let fills = filler.await.unwrap_or(0);
        seq += fills + 1;
        // The last fills' entries, for up to 5 s.
        if events == "on" {
            wait_timed(&pending, Duration::from_secs(5)).await;
        }
        reader.abort();
        let _ = child.kill();
        let _ = child.wait();
        let mut lat = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        lat.sort_by(|a, b| a.total_cmp(b));
        lat_all.extend(&lat);
        let missing = untimed(&pending);
        let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
        runs.push(json!({
            "P33_POSITION_EVENTS": events,
            "plans_per_s": (args.events as f64 / elapsed.as_secs_f64()).round(),
            "fills": fills,
            "position_entries": entries.load(std::sync::atomic::Ordering::Relaxed),
            "fills_timed": lat.len(),
            "missing": if events == "on" { missing } else { 0 },
            "p50_ms": r3(pct(&lat, 0.5)),
            "p99_ms": r3(pct(&lat, 0.99)),
            "max_ms": r3(lat.last().copied().unwrap_or(f64::NAN)),
        }));
    }
    let mean = |w: &str| {
        let v: Vec<f64> = runs
            .iter()
            .filter(|r| r["P33_POSITION_EVENTS"] == w)
            .filter_map(|r| r["plans_per_s"].as_f64())
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let (on, off) = (mean("on"), mean("off"));
    let median = |w: &str| {
        let mut v: Vec<f64> = runs
            .iter()
            .filter(|r| r["P33_POSITION_EVENTS"] == w)
            .filter_map(|r| r["plans_per_s"].as_f64())
            .collect();
        v.sort_by(|a, b| a.total_cmp(b));
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    };
    lat_all.sort_by(|a, b| a.total_cmp(b));
    let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
    let out = json!({
        "mode": "position_events",
        "plans_per_phase": args.events,
        "fill_rate_per_s": args.fill_rate,
        "fill_symbols": nsym,
        "env": args.env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        "runs": runs,
        "plans_per_s_on": on.round(),
        "plans_per_s_off": off.round(),
        "rounds": args.rounds,
        "on_over_off": r3(on / off),
        "median_on_over_off": r3(median("on") / median("off")),
        "fill_to_entry_p50_ms": r3(pct(&lat_all, 0.5)),
        "fill_to_entry_p99_ms": r3(pct(&lat_all, 0.99)),
        "fill_to_entry_max_ms": r3(lat_all.last().copied().unwrap_or(f64::NAN)),
    });
    println!("{out}");
    drop(guard);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
