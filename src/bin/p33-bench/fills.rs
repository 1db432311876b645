//! `--fills N`: position changes timed to the snapshot, the stream on
//! then off (SPEC §16).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use position_state_brain::redis::keys;
use serde_json::{json, Value};

use crate::support::*;
use crate::Args;

/// `--fills`: position changes timed to the snapshot, stream on then off.
pub(crate) async fn fills_mode(args: &Args) -> anyhow::Result<()> {
    let mut guard = Guard(Vec::new());
    let (dir, url, client, mut con) = private_redis(&mut guard).await?;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg("Kh")
        .query_async(&mut con)
        .await?;
    let fake = start_fake(&mut guard)?;
    let http = reqwest::Client::new();
    let nsym = args.fill_symbols.max(1);
    let names: Vec<String> = (0..nsym).map(|k| format!("FILL{k}USDT")).collect();
    let mut amounts: Vec<u64> = vec![0; nsym];
    let rows = |amounts: &[u64]| {
        Value::Array(
            names
                .iter()
                .zip(amounts)
                .map(|(s, a)| json!({"symbol": s, "positionAmt": a.to_string(), "entryPrice": "100"}))
                .collect(),
        )
    };
    http.post(format!("http://{fake}/control/positions"))
        .body(rows(&amounts).to_string())
        .send()
        .await?;
    let plan_rate = if args.rate > 0.0 { args.rate } else { 50.0 };
    let mut phases = serde_json::Map::new();
    let daemon = std::env::current_exe()?.with_file_name("position-state-brain");
    let mut seq = 0u64;
    for (phase, stream) in [("stream", "on"), ("poll", "off")] {
        let log_path = dir.join(format!("daemon-{phase}.log"));
        let consumer = format!("p33-bench-{phase}");
        let vars = [
            ("P33_POSITION_STREAM", stream),
            ("P33_CONSUMER_NAME", consumer.as_str()),
        ];
        let mut child =
            start_exchange_daemon(&daemon, &url, &fake, &names, &vars, args, &log_path).await?;
        let metrics_line = wait_log(&log_path, "metrics listening on http://").await?;
        let metrics_addr = metrics_line
            .rsplit("http://")
            .next()
            .unwrap_or_default()
            .trim()
            .to_string();
        if stream == "on" {
            wait_log(&log_path, "position stream: live").await?;
        }
        // The snapshot amounts as they are written, by symbol.
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let seen: Arc<Mutex<Vec<f64>>> = Arc::new(Mutex::new(Vec::new()));
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub
            .psubscribe(format!("__keyspace@0__:{}*", keys::snapshot("")))
            .await?;
        let (pend, seen2) = (pending.clone(), seen.clone());
        let mut rcon = client.get_multiplexed_async_connection().await?;
        let listener = tokio::spawn(async move {
            let mut msgs = pubsub.on_message();
            while let Some(msg) = msgs.next().await {
                let at = Instant::now();
                let ch = msg.get_channel_name().to_string();
                let Some(key) = ch.split_once(':').map(|(_, k)| k.to_string()) else {
                    continue;
                };
                let sym = key.rsplit(':').next().unwrap_or_default().to_string();
                let amt: Option<String> = redis::cmd("HGET")
                    .arg(&key)
                    .arg("position_amt")
                    .query_async(&mut rcon)
                    .await
                    .unwrap_or(None);
                let Some(amt) = amt.and_then(|a| a.parse::<u64>().ok()) else {
                    continue;
                };
                time_changes(&pend, &seen2, &sym, at, |want| amt >= want);
            }
        });
        // Plans meanwhile: closes on the fill symbols.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sender = {
            let mut pcon = client.get_multiplexed_async_connection().await?;
            let (stop, names) = (stop.clone(), names.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let due = started + Duration::from_secs_f64(i as f64 / plan_rate);
                    tokio::time::sleep_until(due.into()).await;
                    let sym = &names[(i as usize) % names.len()];
                    let _: Result<String, _> = redis::cmd("XADD")
                        .arg(keys::PLAN_STREAM)
                        .arg("*")
                        .arg("plan_id")
                        .arg(format!("fill-plan-{i}-{}", started.elapsed().as_nanos()))
                        .arg("symbol")
                        .arg(sym)
                        .arg("decision")
                        .arg("EXECUTE")
                        .arg("action")
                        .arg("FULL_CLOSE_PROPOSED")
                        .arg("reduceOnly")
                        .arg("true")
                        .query_async(&mut pcon)
                        .await;
                    i += 1;
                }
            })
        };
        let started = Instant::now();
        for i in 0..args.fills {
            let due = started + Duration::from_secs_f64(i as f64 / args.fill_rate.max(0.1));
            tokio::time::sleep_until(due.into()).await;
            let k = i % nsym;
            seq += 1;
            amounts[k] = seq;
            pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(names[k].clone())
                .or_default()
                .push((seq, Instant::now()));
            http.post(format!("http://{fake}/control/positions"))
                .body(rows(&amounts).to_string())
                .send()
                .await?;
        }
        wait_timed(&pending, Duration::from_secs(30)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = sender.await;
        listener.abort();
        let scrape = http
            .get(format!("http://{metrics_addr}/metrics"))
            .send()
            .await?
            .text()
            .await?;
        let _ = child.kill();
        let _ = child.wait();
        let missing = untimed(&pending);
        let mut lat = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        lat.sort_by(|a, b| a.total_cmp(b));
        let (age_p99, age_within) =
            histogram(&scrape, "p33_decision_input_age_seconds", 0.99, "1.1");
        let (age_p50, _) = histogram(&scrape, "p33_decision_input_age_seconds", 0.5, "1.1");
        let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
        phases.insert(
            phase.to_string(),
            json!({
                "P33_POSITION_STREAM": stream,
                "fills_timed": lat.len(),
                "missing": missing,
                "p50_ms": r3(pct(&lat, 0.5)),
                "p99_ms": r3(pct(&lat, 0.99)),
                "max_ms": r3(lat.last().copied().unwrap_or(f64::NAN)),
                "decision_input_age_p50_s": r3(age_p50),
                "decision_input_age_p99_s": r3(age_p99),
                "decision_input_age_share_le_1_1s": r3(age_within),
            }),
        );
    }
    let out = json!({
        "mode": "positions",
        "fills": args.fills,
        "fill_rate_per_s": args.fill_rate,
        "fill_symbols": nsym,
        "plans_per_s": plan_rate,
        "env": args.env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        "stream": phases.get("stream"),
        "poll": phases.get("poll"),
    });
    println!("{out}");
    drop(guard);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
