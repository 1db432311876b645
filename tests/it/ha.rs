//! High availability (issue 13, SPEC §15): the daemon finds the master
//! through Redis Sentinel and follows a failover — a SIGKILLed master, a
//! graceful `SENTINEL FAILOVER`, the old master back as a replica — with
//! real servers on loopback: a master, a replica and three sentinels
//! started here. Permits are counted with keyspace `set` events on the new
//! master: every plan XADDed to it gets exactly one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;

const T: Duration = Duration::from_secs(10);
/// A failover takes `down-after-milliseconds` (1 s) plus an election; far
/// less than this.
const FAILOVER: Duration = Duration::from_secs(30);

fn plan(id: &str) -> Vec<(&str, &str)> {
    vec![
        ("plan_id", id),
        ("symbol", "BTCUSDT"),
        ("decision", "EXECUTE"),
        ("action", "FULL_CLOSE_PROPOSED"),
        ("reduceOnly", "true"),
    ]
}

/// A producer as a pipeline client would be: it XADDs about 100 plans a
/// second to whichever node the sentinels name (asked again every ten
/// plans and after any error), and records each plan with the port of the
/// node that acknowledged it. A failed XADD is not retried under the same
/// plan_id.
struct Producer {
    stop: Arc<AtomicBool>,
    done: Arc<Mutex<Vec<(String, u16, Instant)>>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Producer {
    fn start(sentinel_ports: Vec<u16>, prefix: &'static str) -> Producer {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(Mutex::new(Vec::new()));
        let (flag, out) = (stop.clone(), done.clone());
        let handle = std::thread::spawn(move || {
            let ask = || {
                sentinel_ports.iter().find_map(|p| {
                    let c = redis::Client::open(format!("redis://127.0.0.1:{p}")).ok()?;
                    let mut con = c
                        .get_connection_with_timeout(Duration::from_millis(300))
                        .ok()?;
                    con.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
                    let a: Vec<String> = redis::cmd("SENTINEL")
                        .arg("GET-MASTER-ADDR-BY-NAME")
                        .arg(SENTINEL_MASTER)
                        .query(&mut con)
                        .ok()?;
                    a.get(1)?.parse::<u16>().ok()
                })
            };
            let mut target: Option<(u16, redis::Connection)> = None;
            let mut i = 0u64;
            while !flag.load(Ordering::SeqCst) {
                if target.is_none() || i.is_multiple_of(10) {
                    target = ask().and_then(|port| {
                        let c = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
                        let con = c
                            .get_connection_with_timeout(Duration::from_millis(300))
                            .ok()?;
                        con.set_read_timeout(Some(Duration::from_millis(500)))
                            .ok()?;
                        con.set_write_timeout(Some(Duration::from_millis(500)))
                            .ok()?;
                        Some((port, con))
                    });
                }
                let id = format!("{prefix}-{i}");
                i += 1;
                if let Some((port, con)) = target.as_mut() {
                    let mut c = redis::cmd("XADD");
                    c.arg(PLAN_STREAM).arg("*");
                    for (k, v) in plan(&id) {
                        c.arg(k).arg(v);
                    }
                    match c.query::<String>(con) {
                        Ok(_) => out.lock().unwrap().push((id, *port, Instant::now())),
                        Err(_) => target = None,
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Producer {
            stop,
            done,
            handle: Some(handle),
        }
    }

    /// Plans acknowledged by the node on `port`.
    fn on(&self, port: u16) -> Vec<String> {
        self.on_since(port, None)
    }

    /// … whose XADD was sent after `since`.
    fn on_since(&self, port: u16, since: Option<Instant>) -> Vec<String> {
        let d = self.done.lock().unwrap();
        d.iter()
            .filter(|(_, p, at)| *p == port && since.is_none_or(|s| *at > s))
            .map(|(id, ..)| id.clone())
            .collect()
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            h.join().unwrap();
        }
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The Sentinel set, a snapshot that makes every plan an allow, and the
/// daemon finding the master through the sentinels.
fn start() -> (SentinelSet, Daemon, HashMap<String, String>) {
    let set = SentinelSet::start();
    let mut con = set.nodes[0].con();
    set_snapshot(&mut con, "BTCUSDT", "1", now());
    create_plan_group(&mut con, "$");
    let mut env = sentinel_env(&set);
    for (k, v) in [
        ("P33_ALLOWLIST_SOURCE", "env"),
        ("P33_ALLOWLIST", "BTCUSDT"),
        ("P33_STALE_THRESHOLD_SEC", "600"),
        ("P33_CLAIM_IDLE_S", "5"),
    ] {
        env.insert(k.into(), v.into());
    }
    let d = Daemon::start(&env);
    d.wait_log("ready: reading plans", T);
    d.wait_log(
        &format!("redis: master is 127.0.0.1:{}", set.nodes[0].port),
        T,
    );
    (set, d, env)
}

/// Counts permit SETs on the promoted node from now on. Only from now:
/// Sentinel ends every client connection of the node it promotes (`CLIENT
/// KILL TYPE normal|pubsub`), a listener's included, so a count started
/// before the promotion would miss what follows it. Returns when
/// subscribed, with that instant.
#[allow(clippy::type_complexity)]
fn count_on_new_master(
    node: &Redis,
) -> (
    Arc<AtomicBool>,
    Arc<Mutex<HashMap<String, u32>>>,
    std::thread::JoinHandle<()>,
    Instant,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let (counts, listener) = count_permit_sets(node, stop.clone());
    (stop, counts, listener, Instant::now())
}

/// After the switch to `node`: counts permit SETs there from now on, waits
/// for 200 plans the producer XADDs there meanwhile, stops it, and checks
/// each got exactly one permit and nothing is left pending. Returns them.
fn each_later_plan_permitted_once(
    node: &Redis,
    producer: &mut Producer,
    last: &str,
) -> Vec<String> {
    let (stop, counts, listener, since) = count_on_new_master(node);
    wait_for("200 plans on the new master", FAILOVER, || {
        (producer.on_since(node.port, Some(since)).len() >= 200).then_some(())
    });
    producer.stop();
    let after = producer.on_since(node.port, Some(since));
    assert_each_permitted_once(&mut node.con(), &counts, stop, listener, &after, last);
    after
}

/// SIGKILLs the master under load and waits for the promotion; returns the
/// new master's port, having seen `/readyz` 503 while no master was known.
fn kill_master_and_wait(set: &mut SentinelSet, d: &Daemon) -> u16 {
    let (old, new) = (set.nodes[0].port, set.nodes[1].port);
    set.node(old).kill();
    wait_for("/readyz 503 while no master is known", FAILOVER, || {
        (d.get("/readyz").0 == 503 && d.metric("p33_redis_master_known") == Some(0.0)).then_some(())
    });
    let t0 = Instant::now();
    wait_for("the replica promoted", FAILOVER, || {
        (role(new).as_deref() == Some("master")).then_some(())
    });
    eprintln!("promotion {:?} after /readyz went 503", t0.elapsed());
    set.wait_master(new, FAILOVER);
    new
}

#[test]
fn a_sigkilled_master_fails_over_with_a_sentinel_hung_and_every_later_plan_gets_exactly_one_permit()
{
    let (mut set, d, _env) = start();
    let new = set.nodes[1].port;
    // The first sentinel the daemon asks hangs: it must be skipped (the
    // other two still make the quorum and elect a leader).
    set.sentinels[0].pause();
    let hung = d.wait_log("1 of 3 sentinels do not answer", T);
    assert!(hung.contains(&set.sentinels[0].addr()), "{hung}");
    let sentinels: Vec<u16> = set.sentinels[1..].iter().map(|s| s.port).collect();
    let mut producer = Producer::start(sentinels, "kill");
    wait_for("plans flowing through the first master", T, || {
        (producer.on(set.nodes[0].port).len() >= 50).then_some(())
    });
    kill_master_and_wait(&mut set, &d);
    let after = each_later_plan_permitted_once(&set.nodes[1], &mut producer, "kill-last");
    let switched = d.wait_log(
        &format!(
            "master switched from 127.0.0.1:{} to 127.0.0.1:{new}",
            set.nodes[0].port
        ),
        T,
    );
    assert!(switched.contains("WARN"), "{switched}");
    d.wait_metric("p33_redis_failovers_total", 1.0);
    assert_eq!(d.metric("p33_redis_master_known"), Some(1.0));
    wait_for("/readyz 200 again", T, || {
        (d.get("/readyz").0 == 200).then_some(())
    });
    eprintln!(
        "{} plans on the new master, each permitted once",
        after.len()
    );
}

#[test]
fn a_graceful_sentinel_failover_moves_every_write_and_ctl_follows() {
    let (set, d, env) = start();
    let (old, new) = (set.nodes[0].port, set.nodes[1].port);
    let sentinels: Vec<u16> = set.sentinels.iter().map(|s| s.port).collect();
    let mut producer = Producer::start(sentinels, "graceful");
    wait_for("plans flowing through the first master", T, || {
        (producer.on(old).len() >= 50).then_some(())
    });
    // Asked of the last sentinel, which the daemon asks last: the others
    // learn the new configuration later, and the epoch must win.
    // Refused (NOGOODSLAVE) until that sentinel has heard from the replica.
    wait_for("SENTINEL FAILOVER to be accepted", FAILOVER, || {
        let ok: String = set.sentinels[2].cmd(&["SENTINEL", "FAILOVER", SENTINEL_MASTER])?;
        (ok == "OK").then_some(())
    });
    set.wait_master(new, FAILOVER);
    each_later_plan_permitted_once(&set.nodes[1], &mut producer, "graceful-last");
    d.wait_log(
        &format!("master switched from 127.0.0.1:{old} to 127.0.0.1:{new}"),
        T,
    );
    d.wait_metric("p33_redis_failovers_total", 1.0);
    // The old master is a replica now: nothing the daemon writes goes there.
    wait_for("the old master demoted", FAILOVER, || {
        (role(old).as_deref() == Some("slave")).then_some(())
    });

    // ctl finds the master the same way.
    let ops = ops_env(&env);
    let pairs: Vec<(&str, &str)> = ops.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (code, out, err) = run_once(&["ctl", "halt", "--reason", "ha test"], &pairs);
    assert_eq!(code, Some(0), "{out}{err}");
    let state: Option<String> = redis::cmd("GET")
        .arg("quantum:p33:trading_state")
        .query(&mut set.nodes[1].con())
        .unwrap();
    assert_eq!(state.as_deref(), Some("HALTED"));
}

/// XADDs plan `id` to `node` as a pipeline client would: when the
/// connection is closed under it (a sentinel that reconfigures an instance
/// runs `CLIENT KILL TYPE normal` there), it reconnects and adds the plan
/// unless the lost reply's XADD did go through. Each plan is in the stream
/// once.
fn push_plan_reconnecting(node: &Redis, con: &mut redis::Connection, id: &str) {
    for attempt in 0..5 {
        let mut c = redis::cmd("XADD");
        c.arg(PLAN_STREAM).arg("*");
        for (k, v) in plan(id) {
            c.arg(k).arg(v);
        }
        match c.query::<String>(con) {
            Ok(_) => return,
            Err(e) => {
                eprintln!("XADD {id} (attempt {attempt}): {e}; reconnecting");
                std::thread::sleep(Duration::from_millis(100));
                *con = node.con();
                let recent: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
                    .arg(PLAN_STREAM)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(20)
                    .query(con)
                    .unwrap();
                let added = recent
                    .iter()
                    .any(|(_, fields)| fields.iter().any(|(k, v)| k == "plan_id" && v == id));
                if added {
                    return;
                }
            }
        }
    }
    panic!("XADD {id} failed 5 times");
}

#[test]
fn the_old_master_back_as_a_replica_does_not_confuse_the_daemon() {
    let (mut set, d, _env) = start();
    let old = set.nodes[0].port;
    let new = kill_master_and_wait(&mut set, &d);
    d.wait_metric("p33_redis_failovers_total", 1.0);
    // Back on its old port with its old data and no replicaof: a master by
    // its own account until the sentinels turn it into a replica.
    set.node(old).restart();
    let (stop, counts, listener, _) = count_on_new_master(&set.nodes[1]);
    let mut con = set.nodes[1].con();
    let mut ids = Vec::new();
    let converted = Instant::now();
    wait_for("the old master turned into a replica", FAILOVER, || {
        // Plans keep coming meanwhile.
        let id = format!("back-{}", ids.len());
        push_plan_reconnecting(&set.nodes[1], &mut con, &id);
        ids.push(id);
        std::thread::sleep(Duration::from_millis(50));
        (role(old).as_deref() == Some("slave")).then_some(())
    });
    eprintln!(
        "old master converted after {:?}, {} plans meanwhile",
        converted.elapsed(),
        ids.len()
    );
    for i in 0..50 {
        let id = format!("back-after-{i}");
        push_plan_reconnecting(&set.nodes[1], &mut con, &id);
        ids.push(id);
    }
    assert_each_permitted_once(
        &mut set.nodes[1].con(),
        &counts,
        stop,
        listener,
        &ids,
        "back-last",
    );
    assert_eq!(d.metric("p33_redis_failovers_total"), Some(1.0));
    assert!(
        d.grep(&format!("from 127.0.0.1:{new}")).is_empty(),
        "never switched back: {:?}",
        d.grep("master switched")
    );
    assert_eq!(role(new).as_deref(), Some("master"));
}

#[test]
fn sentinel_settings_that_cannot_work_exit_78_before_connecting() {
    let base = [("P33_SNAPSHOT_SOURCE", "external")];
    let rows: &[(&[(&str, &str)], &str)] = &[
        (
            &[("REDIS_SENTINELS", "127.0.0.1:26379")],
            "REDIS_SENTINEL_MASTER unset",
        ),
        (
            &[("REDIS_SENTINEL_MASTER", "p33m")],
            "REDIS_SENTINELS unset",
        ),
        (
            &[("REDIS_SENTINEL_PASSWORD", "pw")],
            "REDIS_SENTINEL_PASSWORD",
        ),
        (
            &[
                ("REDIS_SENTINELS", "127.0.0.1:99999"),
                ("REDIS_SENTINEL_MASTER", "p33m"),
            ],
            "no valid port",
        ),
        (
            &[
                ("REDIS_SENTINELS", "127.0.0.1:26379"),
                ("REDIS_SENTINEL_MASTER", "p33m"),
                ("REDIS_URL", "redis://127.0.0.1:6390/0"),
            ],
            "both set",
        ),
    ];
    for (pairs, why) in rows {
        let env: Vec<(&str, &str)> = base.iter().chain(pairs.iter()).copied().collect();
        let (code, out, err) = run_once(&[], &env);
        assert_eq!(code, Some(78), "{pairs:?}: {out}{err}");
        assert!(err.contains(why), "{pairs:?}: {err}");
        assert!(!err.contains("pw"), "{err}");
    }
}

/// A daemon (tier-3 allowlist BTCUSDT) finding `master` through the one
/// `sentinel`, with `more` variables.
fn one_sentinel_env(
    master: &Redis,
    sentinel: &Sentinel,
    more: &[(&str, &str)],
) -> HashMap<String, String> {
    let mut env = base_env(master);
    env.remove("REDIS_URL");
    for (k, v) in [
        ("REDIS_SENTINELS", sentinel.addr().as_str()),
        ("REDIS_SENTINEL_MASTER", SENTINEL_MASTER),
        ("P33_ALLOWLIST_SOURCE", "env"),
        ("P33_ALLOWLIST", "BTCUSDT"),
    ]
    .into_iter()
    .chain(more.iter().copied())
    {
        env.insert(k.into(), v.into());
    }
    env
}

#[test]
fn password_protected_sentinels_and_nodes_are_found_and_no_password_is_printed() {
    // The master wants one password, the sentinel another (SPEC §15).
    let master = Redis::start_with(&["--requirepass", "n0de-pw"]);
    let sentinel = Sentinel::start_with(
        master.port,
        &format!("sentinel auth-pass {SENTINEL_MASTER} n0de-pw"),
        Some("s3ntinel-pw"),
    );
    let mut con = master.con();
    set_snapshot(&mut con, "BTCUSDT", "1", now());
    let mut env = one_sentinel_env(
        &master,
        &sentinel,
        &[
            ("REDIS_SENTINEL_PASSWORD", "s3ntinel-pw"),
            ("REDIS_PASSWORD", "n0de-pw"),
        ],
    );
    let d = Daemon::start(&env);
    d.wait_log(&format!("redis: master is 127.0.0.1:{}", master.port), T);
    d.wait_log("ready: reading plans", T);
    push_plan(&mut con, &plan("pw-1"));
    assert_eq!(wait_permit(&mut con, "pw-1")["allow"], true);
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (code, out, err) = run_once(&["ctl", "status"], &pairs);
    assert_eq!(code, Some(0), "{out}{err}");

    // A wrong sentinel password: no master is known, and the WARN says why
    // without the password.
    env.insert("REDIS_SENTINEL_PASSWORD".into(), "wrong-pw".into());
    env.insert("P33_CONSUMER_NAME".into(), "p33-wrong".into());
    let bad = Daemon::start(&env);
    bad.wait_log("sentinel discovery: no sentinel answers", T);
    assert_eq!(bad.get("/readyz").0, 503);
    let logs = [d.grep(""), bad.grep("")].concat().join("\n") + &out + &err;
    for secret in ["n0de-pw", "s3ntinel-pw", "wrong-pw"] {
        assert!(!logs.contains(secret), "{secret} printed");
    }
}

#[test]
fn a_master_demoted_behind_the_sentinels_back_is_no_master() {
    // The sentinels still name it, but the node says it is a replica (here
    // turned into one by hand): READONLY makes the daemon check its ROLE,
    // and no master is known until it is one again.
    let master = Redis::start();
    let other = Redis::start();
    let sentinel = Sentinel::start_with(master.port, "", None);
    let mut con = master.con();
    set_snapshot(&mut con, "BTCUSDT", "1", now());
    let env = one_sentinel_env(&master, &sentinel, &[]);
    let d = Daemon::start(&env);
    d.wait_log("ready: reading plans", T);
    push_plan(&mut con, &plan("demoted-1"));
    wait_permit(&mut con, "demoted-1");

    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(other.port)
        .query(&mut con)
        .unwrap();
    wait_for("no master known", T, || {
        (d.metric("p33_redis_master_known") == Some(0.0) && d.get("/readyz").0 == 503).then_some(())
    });
    d.wait_log("but it is not a master", T);

    let _: () = redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query(&mut con)
        .unwrap();
    wait_for("the master known again", T, || {
        (d.metric("p33_redis_master_known") == Some(1.0)).then_some(())
    });
    // It synced from the empty node: the snapshot is gone; write it again.
    set_snapshot(&mut con, "BTCUSDT", "1", now());
    push_plan(&mut con, &plan("demoted-2"));
    assert_eq!(wait_permit(&mut con, "demoted-2")["allow"], true);
    assert_eq!(d.metric("p33_redis_failovers_total"), Some(0.0));
}

/// A "sentinel" that answers `SENTINEL MASTER` with a bulk string announced
/// as 300 MB (and sends it, as fast as the reader takes it), and floods
/// every `SUBSCRIBE` with `+switch-master` messages. Serves for `serve`.
fn hostile_sentinel(serve: Duration) -> (u16, Arc<AtomicBool>, Arc<AtomicBool>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = Arc::new(AtomicBool::new(false));
    let subscribed = Arc::new(AtomicBool::new(false));
    let (flag, sub) = (stop.clone(), subscribed.clone());
    std::thread::spawn(move || {
        let end = Instant::now() + serve;
        listener.set_nonblocking(true).unwrap();
        while Instant::now() < end && !flag.load(Ordering::SeqCst) {
            let Ok((mut s, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            let (flag, sub) = (flag.clone(), sub.clone());
            std::thread::spawn(move || {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut buf = [0u8; 4096];
                let Ok(n) = s.read(&mut buf) else { return };
                let req = String::from_utf8_lossy(&buf[..n]).to_uppercase();
                if req.contains("SUBSCRIBE") {
                    sub.store(true, Ordering::SeqCst);
                    let _ =
                        s.write_all(b"*3\r\n$9\r\nsubscribe\r\n$14\r\n+switch-master\r\n:1\r\n");
                    let payload = "p33m 127.0.0.1 1 127.0.0.1 2";
                    let msg = format!(
                        "*3\r\n$7\r\nmessage\r\n$14\r\n+switch-master\r\n${}\r\n{payload}\r\n",
                        payload.len()
                    )
                    .into_bytes();
                    let many: Vec<u8> =
                        msg.iter().copied().cycle().take(msg.len() * 1000).collect();
                    while Instant::now() < end && !flag.load(Ordering::SeqCst) {
                        if s.write_all(&many).is_err() {
                            return;
                        }
                    }
                } else if req.contains("SENTINEL") {
                    let _ = s.write_all(b"$300000000\r\n");
                    let chunk = vec![b'x'; 1 << 20];
                    for _ in 0..300 {
                        if s.write_all(&chunk).is_err() {
                            return;
                        }
                    }
                } else {
                    let _ = s.write_all(b"+OK\r\n");
                }
            });
        }
    });
    (port, stop, subscribed)
}

/// Peak resident memory (VmHWM) and CPU time (utime + stime, in ticks).
fn usage(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<u64> = after
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // Fields 14 and 15 of stat; after the ")" the 3rd field is index 0.
    let ticks = f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0);
    (hwm_kb, ticks)
}

#[test]
fn a_hostile_sentinel_costs_neither_memory_nor_a_core() {
    let master = Redis::start();
    let sentinel = Sentinel::start_with(master.port, "", None);
    let (port, stop, subscribed) = hostile_sentinel(Duration::from_secs(30));
    let mut con = master.con();
    set_snapshot(&mut con, "BTCUSDT", "1", now());
    // The hostile one is listed first; the real one still names the master.
    let list = format!("127.0.0.1:{port},{}", sentinel.addr());
    let env = one_sentinel_env(&master, &sentinel, &[("REDIS_SENTINELS", list.as_str())]);
    let d = Daemon::start(&env);
    d.wait_log("ready: reading plans", T);
    push_plan(&mut con, &plan("hostile-1"));
    assert_eq!(wait_permit(&mut con, "hostile-1")["allow"], true);
    d.wait_log(&format!("sentinel 127.0.0.1:{port}: reply larger than"), T);
    wait_for("the daemon to subscribe to the flood", T, || {
        subscribed.load(Ordering::SeqCst).then_some(())
    });
    // Two seconds under the flood: a few looks, not a busy core.
    let (_, before) = usage(d.pid());
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let (hwm_kb, after) = usage(d.pid());
    let ticks_per_s = 100.0; // USER_HZ on Linux
    let cpu = (after - before) as f64 / ticks_per_s / t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    eprintln!(
        "under the flood: {:.0} % of a core, peak {} MB",
        cpu * 100.0,
        hwm_kb / 1024
    );
    assert!(cpu < 0.5, "the daemon used {:.0} % of a core", cpu * 100.0);
    assert!(
        hwm_kb < 100 * 1024,
        "peak memory {} MB: a 300 MB reply was read",
        hwm_kb / 1024
    );
    push_plan(&mut con, &plan("hostile-2"));
    assert_eq!(wait_permit(&mut con, "hostile-2")["allow"], true);
}
