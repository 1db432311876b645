//! `--halt N`: `ctl halt` with N allows outstanding (SPEC §12).

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use position_state_brain::redis::keys;
use serde_json::json;

use crate::support::*;
use crate::Args;

/// `--halt N`: N allows indexed (10 symbols, half of them opens), the
/// daemon running, then `ctl halt` while another client pings.
pub(crate) async fn halt_mode(args: &Args) -> anyhow::Result<()> {
    let n = args.halt;
    let mut guard = Guard(Vec::new());
    let (dir, url, client, mut con) = private_redis(&mut guard).await?;
    let expiry = position_state_brain::redis::store::now_ms() + 600_000;
    let seeded = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(10_000) {
        let mut p = redis::pipe();
        for &i in chunk {
            let sym = format!("S{}USDT", i % 10);
            let plan = format!("bulk-{i}");
            let open = i % 2 == 0;
            let body = json!({"allow": true, "plan_id": plan, "symbol": sym, "safe_qty": 0,
                "safe_close_qty": 0, "exchange_position_amt": 0, "ledger_amt": 0,
                "reason": if open { "open_permit_granted" } else { "sanity_checks_passed" },
                "created_at": 1.0});
            p.cmd("SET")
                .arg(keys::permit(&plan))
                .arg(body.to_string())
                .arg("PX")
                .arg(600_000)
                .ignore();
            p.cmd("ZADD")
                .arg(keys::ALLOWS)
                .arg(expiry)
                .arg(format!("{sym}|{plan}"))
                .ignore();
            p.cmd("ZADD")
                .arg(keys::allows_symbol(&sym))
                .arg(expiry)
                .arg(&plan)
                .ignore();
            if open {
                p.cmd("ZADD")
                    .arg(keys::ALLOWS_OPENS)
                    .arg(expiry)
                    .arg(format!("{sym}|{plan}"))
                    .ignore();
                p.cmd("ZADD")
                    .arg(keys::allows_symbol_opens(&sym))
                    .arg(expiry)
                    .arg(&plan)
                    .ignore();
            }
        }
        let _: () = p.query_async(&mut con).await?;
    }
    let seeded = seeded.elapsed();
    let _: () = redis::cmd("SET")
        .arg(keys::ARMED)
        .arg("bench")
        .query_async(&mut con)
        .await?;
    let bin = match &args.daemon {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name("position-state-brain"),
    };
    let env: Vec<(&str, String)> = vec![
        ("REDIS_URL", url.clone()),
        ("P33_METRICS_PORT", "0".into()),
        ("P33_METRICS_ADDR", "127.0.0.1".into()),
        ("P33_SNAPSHOT_SOURCE", "external".into()),
        ("P33_ALLOWLIST_SOURCE", "env".into()),
        ("P33_ALLOWLIST", "S0USDT".into()),
        ("P33_CONSUMER_NAME", "bench".into()),
        ("P33_LOG_LEVEL", "INFO".into()),
        ("P33_EXCHANGE_BASE_URL", "http://127.0.0.1:9".into()),
    ];
    let log = dir.join("daemon.log");
    let mut cmd = Command::new(&bin);
    cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::create(dir.join("daemon.err"))?);
    guard.0.push(cmd.spawn()?);
    wait_log(&log, "ready: reading plans").await?;
    for (k, v) in [
        ("slowlog-log-slower-than", "0"),
        ("slowlog-max-len", "1000000"),
    ] {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(k)
            .arg(v)
            .query_async(&mut con)
            .await?;
    }
    let _: () = redis::cmd("SLOWLOG")
        .arg("RESET")
        .query_async(&mut con)
        .await?;
    // Another client: one PING at a time, the worst wait kept.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pinger = {
        let stop = stop.clone();
        let mut pcon = client.get_multiplexed_async_connection().await?;
        // A PING answered BUSY (a script holds Redis) is asked again: the
        // wait counts until one is answered.
        tokio::spawn(async move {
            let (mut worst, mut pings, mut busy) = (Duration::ZERO, 0u64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let at = Instant::now();
                loop {
                    let r: redis::RedisResult<String> =
                        redis::cmd("PING").query_async(&mut pcon).await;
                    match r {
                        Ok(_) => break,
                        Err(_) => {
                            busy += 1;
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                }
                worst = worst.max(at.elapsed());
                pings += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            (worst, pings, busy)
        })
    };
    let started = Instant::now();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(&bin)
            .args(["ctl", "halt", "--reason", "bench"])
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
    })
    .await??;
    let ctl_s = started.elapsed().as_secs_f64();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    // The revocation is done when its confirmation is on the control stream.
    let revoked_s = loop {
        let v: redis::Value = match redis::cmd("XRANGE")
            .arg(keys::CONTROL_STREAM)
            .arg("-")
            .arg("+")
            .query_async(&mut con)
            .await
        {
            Ok(v) => v,
            // BUSY while one script walks them all (an older build).
            Err(e) if e.code() == Some("BUSY") => redis::Value::Nil,
            Err(e) => return Err(e.into()),
        };
        let done = position_state_brain::redis::stream::parse_entries(&v)
            .into_iter()
            .filter_map(|e| e.fields)
            .any(|f| f.contains_key("ref"));
        if done {
            break started.elapsed().as_secs_f64();
        }
        if started.elapsed() > Duration::from_secs(300) {
            anyhow::bail!("no confirmation within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (worst, pings, busy) = pinger.await?;
    // Each script call of the revocation (its marker key is among its keys).
    let slow: redis::Value = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(1_000_000)
        .query_async(&mut con)
        .await?;
    let mut calls: Vec<f64> = Vec::new();
    if let redis::Value::Array(entries) = slow {
        for e in entries {
            let redis::Value::Array(f) = e else { continue };
            let (Some(redis::Value::Int(us)), Some(redis::Value::Array(cmd_args))) =
                (f.get(2), f.get(3))
            else {
                continue;
            };
            let words: Vec<String> = cmd_args
                .iter()
                .filter_map(|a| match a {
                    redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
                    _ => None,
                })
                .collect();
            let marker = keys::revoked_marker("");
            if words.iter().any(|w| w.starts_with(&marker)) {
                calls.push(*us as f64 / 1000.0);
            }
        }
    }
    calls.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        calls
            .get(((calls.len() as f64 * q).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!(
        "{}",
        json!({
            "mode": "halt",
            "allows": n,
            "seed_s": seeded.as_secs_f64(),
            "ctl_s": ctl_s,
            "revocation_s": revoked_s,
            "script_calls": calls.len(),
            "script_ms_max": pick(1.0),
            "script_ms_p99": pick(0.99),
            "script_ms_total": calls.iter().sum::<f64>(),
            "ping_worst_ms": worst.as_secs_f64() * 1000.0,
            "pings": pings,
            "ping_busy_replies": busy,
            "ctl_said": said.lines().filter(|l| l.contains("revok")).collect::<Vec<_>>().join(" | "),
        })
    );
    drop(guard);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
