//! Test harness: a private `redis-server` on a free loopback port, the real
//! daemon binary, and the project's fake exchange. Everything started here
//! is killed on `Drop`, also when a test panics.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const DAEMON: &str = env!("CARGO_BIN_EXE_position-state-brain");
pub const FAKE_EXCHANGE: &str = env!("CARGO_BIN_EXE_fake-exchange");
pub const PLAN_STREAM: &str = "quantum:stream:apply.plan";

#[allow(clippy::disallowed_methods)] // the test's own clock, not the daemon's
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` every 20 ms until it returns `Some`, or panics after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > end {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// A private Redis with an append-only file fsynced on every write, so a
/// SIGKILL loses nothing that was acknowledged.
pub struct Redis {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// More `redis-server` arguments (kept for restarts).
    extra: Vec<String>,
}

/// Whether the integration tests run the daemon as the ACL user `p33`
/// against Redis servers loaded with the shipped `deploy/redis/users.acl`
/// (`P33_IT_ACL=1`, SPEC §17): the same tests, least privilege.
pub fn acl_mode() -> bool {
    std::env::var("P33_IT_ACL").is_ok_and(|v| v == "1")
}

/// The test password of an ACL user.
pub fn acl_password(user: &str) -> String {
    format!("it-pw-{user}")
}

/// The shipped ACL file with test passwords, written into `dir`.
pub fn acl_file(dir: &std::path::Path) -> PathBuf {
    let shipped = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/redis/users.acl"),
    )
    .unwrap();
    let mut text = String::new();
    for line in shipped.lines() {
        let user = line.split_whitespace().nth(1).unwrap_or("");
        // The shipped lines carry no password: one goes after `on`.
        text.push_str(&line.replacen(" on ", &format!(" on >{} ", acl_password(user)), 1));
        text.push('\n');
    }
    let path = dir.join("users.acl");
    std::fs::write(&path, text).unwrap();
    path
}

impl Redis {
    pub fn start() -> Redis {
        Self::start_with(&[])
    }

    /// Loaded with the shipped ACL users (the default user stays, for the
    /// tests' own set-up).
    pub fn start_acl() -> Redis {
        let dir =
            std::env::temp_dir().join(format!("p33-acl-{}-{}", free_port(), std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = acl_file(&dir);
        Self::start_with(&["--aclfile", &path.to_string_lossy()])
    }

    /// Whether this server has the shipped ACL users.
    pub fn has_acl(&self) -> bool {
        self.extra.iter().any(|a| a == "--aclfile")
    }

    /// With more `redis-server` arguments (`--replicaof 127.0.0.1 P`, …).
    pub fn start_with(extra: &[&str]) -> Redis {
        // P33_IT_ACL=1: every server has the shipped users (but one whose
        // test sets its own password: that test is about the default user).
        if acl_mode()
            && !extra
                .iter()
                .any(|a| *a == "--aclfile" || *a == "--requirepass")
        {
            let dir = std::env::temp_dir().join(format!(
                "p33-acl-{}-{}",
                free_port(),
                std::process::id()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let path = acl_file(&dir).to_string_lossy().into_owned();
            let mut with: Vec<&str> = extra.to_vec();
            with.extend(["--aclfile", path.as_str()]);
            return Self::start_with(&with);
        }
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("p33-redis-{port}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut r = Redis {
            port,
            dir,
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--protected-mode",
                "yes",
                "--notify-keyspace-events",
                "K$",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (ops/test.sh installs it)");
        self.child = Some(child);
        let url = self.url();
        wait_for(
            "redis-server to answer PING",
            Duration::from_secs(10),
            || {
                let c = redis::Client::open(url.as_str()).ok()?;
                let mut con = c.get_connection().ok()?;
                redis::cmd("PING").query::<String>(&mut con).ok()
            },
        );
    }

    pub fn url(&self) -> String {
        // A `--requirepass` among the extra arguments is the password.
        let pw = self
            .extra
            .iter()
            .position(|a| a == "--requirepass")
            .and_then(|i| self.extra.get(i + 1));
        match pw {
            Some(pw) => format!("redis://:{pw}@127.0.0.1:{}/0", self.port),
            None => format!("redis://127.0.0.1:{}/0", self.port),
        }
    }

    pub fn con(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same port and data directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// SIGKILL, wipe the data directory, start again on the same port: a
    /// Redis that comes back empty (no stream, no group, no keys).
    pub fn restart_empty(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
        std::fs::create_dir_all(&self.dir).unwrap();
        self.spawn();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running daemon with its captured log lines.
pub struct Daemon {
    child: Child,
    pub lines: Arc<Mutex<Vec<String>>>,
    pub metrics_addr: String,
}

/// The environment every test daemon starts from.
pub fn base_env(redis: &Redis) -> HashMap<String, String> {
    let mut e = HashMap::new();
    for (k, v) in [
        ("REDIS_URL", redis.url()),
        ("P33_METRICS_ADDR", "127.0.0.1".into()),
        ("P33_METRICS_PORT", "0".into()),
        ("P33_SNAPSHOT_SOURCE", "external".into()),
        // A closed loopback port: step sizes fall back to 0.001 quickly.
        (
            "P33_EXCHANGE_BASE_URL",
            format!("http://127.0.0.1:{}", free_port()),
        ),
        ("P33_CONSUMER_NAME", "p33-test".into()),
        ("P33_LOG_LEVEL", "DEBUG".into()),
        ("P33_ALLOWLIST_REFRESH_S", "1".into()),
    ] {
        e.insert(k.to_string(), v);
    }
    if redis.has_acl() {
        e.insert("REDIS_USERNAME".into(), "p33".into());
        e.insert("REDIS_PASSWORD".into(), acl_password("p33"));
    }
    e
}

impl Daemon {
    /// Starts the daemon binary with exactly `env` (plus PATH), and waits
    /// until it logs its metrics address.
    pub fn start(env: &HashMap<String, String>) -> Daemon {
        let mut d = Self::spawn(env);
        d.wait_metrics_addr();
        d
    }

    /// Starts the daemon with its open-files limit (soft and hard) at
    /// `nofile`, through `prlimit`, and waits for its metrics address.
    pub fn start_with_nofile(env: &HashMap<String, String>, nofile: u32) -> Daemon {
        let mut cmd = Command::new("prlimit");
        cmd.arg(format!("--nofile={nofile}:{nofile}"))
            .arg("--")
            .arg(DAEMON);
        let mut d = Self::spawn_cmd(cmd, env);
        d.wait_metrics_addr();
        d
    }

    /// Starts `cmd` (a wrapper that execs the daemon) with exactly `env`
    /// (plus PATH), and waits until it logs its metrics address.
    pub fn start_cmd(cmd: Command, env: &HashMap<String, String>) -> Daemon {
        let mut d = Self::spawn_cmd(cmd, env);
        d.wait_metrics_addr();
        d
    }

    fn wait_metrics_addr(&mut self) {
        let addr = self.wait_log("metrics listening", Duration::from_secs(20));
        self.metrics_addr = addr
            .split("http://")
            .nth(1)
            .expect("metrics line carries the address")
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
            .collect();
    }

    /// Starts the daemon without waiting for anything.
    pub fn spawn(env: &HashMap<String, String>) -> Daemon {
        Self::spawn_cmd(Command::new(DAEMON), env)
    }

    fn spawn_cmd(mut cmd: Command, env: &HashMap<String, String>) -> Daemon {
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("daemon binary starts");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let echo = std::env::var("TEST_LOG").is_ok();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if echo {
                        eprintln!("[daemon] {line}");
                    }
                    lines.lock().unwrap().push(line);
                }
            });
        }
        Daemon {
            child,
            lines,
            metrics_addr: String::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_count(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    /// Lines containing `pat`.
    pub fn grep(&self, pat: &str) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(pat))
            .cloned()
            .collect()
    }

    /// Waits for a line containing `pat`, returns it.
    pub fn wait_log(&self, pat: &str, timeout: Duration) -> String {
        self.wait_log_after(0, pat, timeout)
    }

    /// Waits for a line containing `pat` among lines after index `from`.
    pub fn wait_log_after(&self, from: usize, pat: &str, timeout: Duration) -> String {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_for(&format!("log line containing {pat:?}"), timeout, || {
                let l = self.lines.lock().unwrap();
                l.iter().skip(from).find(|x| x.contains(pat)).cloned()
            })
        }));
        match r {
            Ok(l) => l,
            Err(_) => {
                let all = self.lines.lock().unwrap().join("\n");
                panic!("no log line containing {pat:?} within {timeout:?}; log so far:\n{all}");
            }
        }
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        http(&self.metrics_addr, "GET", path, "")
    }

    /// Waits until `series` reaches `want`.
    pub fn wait_metric(&self, series: &str, want: f64) {
        wait_for(
            &format!("{series} to reach {want}"),
            Duration::from_secs(10),
            || (self.metric(series).unwrap_or(0.0) >= want).then_some(()),
        );
    }

    pub fn scrape(&self) -> String {
        self.get("/metrics").1
    }

    /// The value of a metric line, e.g. `p33_allowlist_source{source="env"}`.
    pub fn metric(&self, series: &str) -> Option<f64> {
        self.scrape()
            .lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    pub fn signal(&self, sig: &str) {
        signal(self.child.id(), sig);
    }

    /// SIGTERM and wait; returns the exit code and how long it took.
    pub fn terminate(&mut self) -> (Option<i32>, Duration) {
        let t = Instant::now();
        self.signal("TERM");
        let end = t + Duration::from_secs(15);
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return (s.code(), t.elapsed());
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                return (None, t.elapsed());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let end = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s.code();
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs the daemon binary to completion with `args` and `env`.
pub fn run_once(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(DAEMON);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A minimal HTTP/1.1 client (Connection: close).
pub fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The fake exchange binary.
pub struct FakeExchange {
    child: Child,
    pub addr: String,
}

impl FakeExchange {
    pub fn start(key: &str, secret: &str) -> FakeExchange {
        let mut child = Command::new(FAKE_EXCHANGE)
            .args(["--port", "0", "--api-key", key, "--api-secret", secret])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let addr = line
            .split("http://")
            .nth(1)
            .expect("fake exchange prints its address")
            .trim()
            .to_string();
        std::thread::spawn(move || for _ in out.lines() {});
        FakeExchange { child, addr }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn control(&self, path: &str, body: serde_json::Value) {
        let (st, b) = http(&self.addr, "POST", path, &body.to_string());
        assert_eq!(st, 200, "fake exchange {path}: {b}");
    }

    pub fn stats(&self) -> serde_json::Value {
        serde_json::from_str(&http(&self.addr, "GET", "/control/stats", "").1).unwrap()
    }

    pub fn count(&self, what: &str) -> u64 {
        self.stats()["counts"][what].as_u64().unwrap_or(0)
    }
}

impl Drop for FakeExchange {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a universe: active document, meta and last_ok.
pub fn set_universe(con: &mut redis::Connection, symbols: &[&str], asof: f64, stale: u8) {
    let doc = serde_json::json!({"symbols": symbols, "asof_epoch": asof as i64, "source": "test", "mode": "top", "filters": {}}).to_string();
    let _: () = redis::cmd("SET")
        .arg("quantum:cfg:universe:active")
        .arg(&doc)
        .query(con)
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg("quantum:cfg:universe:meta")
        .arg("stale")
        .arg(stale)
        .arg("count")
        .arg(symbols.len())
        .arg("asof_epoch")
        .arg(asof as i64)
        .arg("last_ok_epoch")
        .arg(asof as i64)
        .arg("error")
        .arg("")
        .query(con)
        .unwrap();
}

pub fn set_last_ok(con: &mut redis::Connection, symbols: &[&str], asof: f64) {
    let doc = serde_json::json!({"symbols": symbols, "asof_epoch": asof as i64, "source": "test", "mode": "top", "filters": {}}).to_string();
    let _: () = redis::cmd("SET")
        .arg("quantum:cfg:universe:last_ok")
        .arg(&doc)
        .query(con)
        .unwrap();
}

/// Writes a fresh snapshot hash for `symbol`.
pub fn set_snapshot(con: &mut redis::Connection, symbol: &str, amt: &str, ts: f64) {
    let _: () = redis::cmd("HSET")
        .arg(format!("quantum:position:snapshot:{symbol}"))
        .arg("position_amt")
        .arg(amt)
        .arg("side")
        .arg(if amt.starts_with('-') {
            "SHORT"
        } else if amt.trim_start_matches(['0', '.']).is_empty() {
            "NONE"
        } else {
            "LONG"
        })
        .arg("ts_epoch")
        .arg(format!("{ts:.3}"))
        .arg("source")
        .arg("test")
        .query(con)
        .unwrap();
}

/// Creates the `p33` group on the plan stream at `start` (`0` or `$`), as the
/// daemon would, before the daemon runs.
pub fn create_plan_group(con: &mut redis::Connection, start: &str) {
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(PLAN_STREAM)
        .arg("p33")
        .arg(start)
        .arg("MKSTREAM")
        .query(con)
        .unwrap();
}

/// XADDs a plan; returns its entry ID.
pub fn push_plan(con: &mut redis::Connection, fields: &[(&str, &str)]) -> String {
    let mut c = redis::cmd("XADD");
    c.arg(PLAN_STREAM).arg("*");
    for (k, v) in fields {
        c.arg(*k).arg(*v);
    }
    c.query(con).unwrap()
}

/// The permit JSON of `plan_id`, if any (a key of another type, such as a
/// foreign service's hash, is no permit).
pub fn read_permit(con: &mut redis::Connection, plan_id: &str) -> Option<serde_json::Value> {
    let v: Option<String> = match redis::cmd("GET")
        .arg(format!("quantum:permit:p33:{plan_id}"))
        .query(con)
    {
        Ok(v) => v,
        Err(e) if e.code() == Some("WRONGTYPE") => None,
        Err(e) => panic!("reading the permit of {plan_id}: {e}"),
    };
    v.map(|s| serde_json::from_str(&s).expect("permit is JSON"))
}

pub fn wait_permit(con: &mut redis::Connection, plan_id: &str) -> serde_json::Value {
    wait_for(
        &format!("permit for {plan_id}"),
        Duration::from_secs(10),
        || read_permit(con, plan_id),
    )
}

/// Number of pending entries of `group` on the plan stream.
pub fn pending(con: &mut redis::Connection, stream: &str, group: &str) -> i64 {
    let v: redis::Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query(con)
        .unwrap();
    match v {
        redis::Value::Array(a) => match a.first() {
            Some(redis::Value::Int(n)) => *n,
            _ => 0,
        },
        _ => 0,
    }
}

/// Counts `set` keyspace events per permit key.
pub fn count_permit_sets(
    redis: &Redis,
    stop: Arc<AtomicBool>,
) -> (
    Arc<Mutex<HashMap<String, u32>>>,
    std::thread::JoinHandle<()>,
) {
    let counts = Arc::new(Mutex::new(HashMap::new()));
    let c2 = counts.clone();
    let mut con = redis.con();
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        con.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut ps = con.as_pubsub();
        ps.psubscribe("__keyspace@0__:quantum:permit:p33:*")
            .unwrap();
        tx.send(()).unwrap();
        while !stop.load(Ordering::SeqCst) {
            if let Ok(m) = ps.get_message() {
                let event: String = m.get_payload().unwrap_or_default();
                if event == "set" {
                    let ch = m.get_channel_name().to_string();
                    let id = ch.rsplit("quantum:permit:p33:").next().unwrap().to_string();
                    *c2.lock().unwrap().entry(id).or_insert(0) += 1;
                }
            }
        }
    });
    rx.recv().unwrap();
    (counts, h)
}

/// Waits until the group has nothing pending and the stream's last entry was delivered.
pub fn wait_drained(con: &mut redis::Connection, group: &str) {
    wait_for("the group to drain", Duration::from_secs(10), || {
        let v: redis::Value = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(PLAN_STREAM)
            .query(con)
            .ok()?;
        let text = format!("{v:?}");
        let last: String = redis::cmd("XREVRANGE")
            .arg(PLAN_STREAM)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query::<redis::Value>(con)
            .ok()
            .map(|v| format!("{v:?}"))
            .unwrap_or_default();
        let last_id = last.split('"').nth(1).unwrap_or("").to_string();
        (pending(con, PLAN_STREAM, group) == 0 && text.contains(&last_id)).then_some(())
    });
}

/// Waits for every plan in `ids` to have a permit (`counts`, from keyspace
/// events on the node `con` is connected to) and the group to drain,
/// then checks each was SET exactly once: keyspace events arrive in order,
/// so once the permit event of one more plan (`last`) is in, a late second
/// SET of an earlier one would have been too.
pub fn assert_each_permitted_once(
    con: &mut redis::Connection,
    counts: &Mutex<HashMap<String, u32>>,
    stop: Arc<AtomicBool>,
    listener: std::thread::JoinHandle<()>,
    ids: &[String],
    last: &str,
) {
    wait_for("every permit", Duration::from_secs(60), || {
        let c = counts.lock().unwrap();
        ids.iter().all(|id| c.contains_key(id)).then_some(())
    });
    wait_drained(con, "p33");
    push_plan(
        con,
        &[
            ("plan_id", last),
            ("symbol", "BTCUSDT"),
            ("decision", "EXECUTE"),
            ("action", "FULL_CLOSE_PROPOSED"),
            ("reduceOnly", "true"),
        ],
    );
    wait_for("the last permit event", Duration::from_secs(10), || {
        counts.lock().unwrap().contains_key(last).then_some(())
    });
    stop.store(true, Ordering::SeqCst);
    listener.join().unwrap();
    let c = counts.lock().unwrap();
    for id in ids {
        assert_eq!(c.get(id), Some(&1), "plan {id} permitted exactly once");
    }
    assert_eq!(pending(con, PLAN_STREAM, "p33"), 0);
}

/// How a test daemon is set up (see [`spawn_daemon`]).
#[derive(Debug, Clone, Default)]
pub struct Opts {
    env: Vec<(String, String)>,
    exchange: Option<(String, String)>,
    deferred: bool,
    nofile: Option<u32>,
    unarmed: bool,
}

impl Opts {
    /// Tier 3 only (`P33_ALLOWLIST_SOURCE=env`) with these symbols; the
    /// daemon reads external snapshots (the test writes them).
    pub fn env_allowlist(symbols: &str) -> Opts {
        Opts::default()
            .set("P33_ALLOWLIST_SOURCE", "env")
            .set("P33_ALLOWLIST", symbols)
    }

    /// The universe tiers (the test writes the universe keys).
    pub fn universe() -> Opts {
        Opts::default().set("P33_ALLOWLIST_SOURCE", "universe")
    }

    /// One more variable (a later one wins).
    pub fn set(mut self, k: &str, v: &str) -> Opts {
        self.env.push((k.to_string(), v.to_string()));
        self
    }

    /// Start the fake exchange with this key and secret, and poll it
    /// (`P33_SNAPSHOT_SOURCE=binance`, `P33_POLL_SEC=0.5`, log level INFO).
    pub fn exchange(mut self, key: &str, secret: &str) -> Opts {
        self.exchange = Some((key.to_string(), secret.to_string()));
        self
    }

    /// Set up Redis (and the exchange) but start the daemon only on
    /// [`TestDaemon::start`], so the test can seed state first.
    pub fn deferred(mut self) -> Opts {
        self.deferred = true;
        self
    }

    /// A Redis no gate has armed yet (SPEC §12): the daemon's first start
    /// waits 2 s for a peer before it arms. Without this the test's Redis
    /// holds the marker, as one a gate already runs on does.
    pub fn unarmed(mut self) -> Opts {
        self.unarmed = true;
        self
    }

    /// Run the daemon with this open-files limit (through `prlimit`).
    pub fn nofile(mut self, n: u32) -> Opts {
        self.nofile = Some(n);
        self
    }
}

/// A daemon with its own Redis, a connection to it and, when asked, the
/// fake exchange. Everything is killed on drop. Derefs to the running
/// [`Daemon`] (logs, metrics, HTTP).
pub struct TestDaemon {
    /// The daemon (`None` until started, or after [`TestDaemon::kill`]).
    daemon: Option<Daemon>,
    /// The fake exchange, when asked for.
    pub fx: Option<FakeExchange>,
    /// A connection to the private Redis.
    pub con: redis::Connection,
    /// The private Redis.
    pub redis: Redis,
    /// The daemon's environment.
    pub env: HashMap<String, String>,
    nofile: Option<u32>,
}

/// Starts a private Redis, the fake exchange when asked, and the daemon
/// (unless deferred), waiting until the daemon logs its metrics address.
pub fn spawn_daemon(opts: Opts) -> TestDaemon {
    let redis = Redis::start();
    let mut con = redis.con();
    if !opts.unarmed {
        let _: () = redis::cmd("SET")
            .arg("quantum:p33:armed")
            .arg("test-harness")
            .query(&mut con)
            .unwrap();
    }
    let mut env = base_env(&redis);
    let fx = opts.exchange.as_ref().map(|(key, secret)| {
        let fx = FakeExchange::start(key, secret);
        for (k, v) in [
            ("P33_SNAPSHOT_SOURCE", "binance"),
            ("P33_EXCHANGE_BASE_URL", fx.url().as_str()),
            ("BINANCE_TESTNET_API_KEY", key),
            ("BINANCE_TESTNET_API_SECRET", secret),
            ("P33_POLL_SEC", "0.5"),
            ("P33_LOG_LEVEL", "INFO"),
        ] {
            env.insert(k.to_string(), v.to_string());
        }
        fx
    });
    env.extend(opts.env.iter().cloned());
    let mut t = TestDaemon {
        daemon: None,
        fx,
        con,
        redis,
        env,
        nofile: opts.nofile,
    };
    if !opts.deferred {
        t.start();
    }
    t
}

impl TestDaemon {
    /// Starts the daemon (again) with [`TestDaemon::env`].
    pub fn start(&mut self) {
        self.daemon = Some(match self.nofile {
            Some(n) => Daemon::start_with_nofile(&self.env, n),
            None => Daemon::start(&self.env),
        });
    }

    /// Starts it and waits until it reads plans.
    pub fn start_ready(&mut self) {
        self.start();
        self.wait_log("ready: reading plans", Duration::from_secs(10));
    }

    /// Waits until the daemon's instance report (SPEC §12) is in Redis.
    pub fn wait_instance_report(&mut self) {
        let key = format!(
            "quantum:p33:instance:{}",
            self.env
                .get("P33_CONSUMER_NAME")
                .map_or("p33-test", String::as_str)
        );
        let con = &mut self.con;
        wait_for("the instance report", Duration::from_secs(10), || {
            let n: u64 = redis::cmd("EXISTS").arg(&key).query(con).unwrap();
            (n == 1).then_some(())
        });
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.kill();
        }
    }

    /// SIGKILL and start again with the same environment (and consumer name).
    pub fn restart(&mut self) {
        self.kill();
        self.start();
    }

    /// The running daemon, to stop it the way a test needs.
    pub fn daemon_mut(&mut self) -> &mut Daemon {
        self.daemon.as_mut().expect("the daemon was started")
    }

    /// The fake exchange (asked for in [`Opts::exchange`]).
    pub fn fx(&self) -> &FakeExchange {
        self.fx.as_ref().expect("Opts::exchange was given")
    }

    /// XADDs a plan; returns its entry ID.
    pub fn push_plan(&mut self, fields: &[(&str, &str)]) -> String {
        push_plan(&mut self.con, fields)
    }

    /// Waits (10 s at most) for the permit of `plan_id`.
    pub fn wait_permit(&mut self, plan_id: &str) -> serde_json::Value {
        wait_permit(&mut self.con, plan_id)
    }

    /// The permit of `plan_id`, if any.
    pub fn permit(&mut self, plan_id: &str) -> Option<serde_json::Value> {
        read_permit(&mut self.con, plan_id)
    }

    /// Writes a fresh snapshot hash.
    pub fn snapshot(&mut self, symbol: &str, amt: &str, ts: f64) {
        set_snapshot(&mut self.con, symbol, amt, ts);
    }

    /// Pending entries of `group` on the plan stream.
    pub fn pending(&mut self, group: &str) -> i64 {
        pending(&mut self.con, PLAN_STREAM, group)
    }

    /// Every log line so far.
    pub fn logs(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

impl std::ops::Deref for TestDaemon {
    type Target = Daemon;
    fn deref(&self) -> &Daemon {
        self.daemon.as_ref().expect("the daemon was started")
    }
}

impl std::ops::DerefMut for TestDaemon {
    fn deref_mut(&mut self) -> &mut Daemon {
        self.daemon.as_mut().expect("the daemon was started")
    }
}

/// A Redis Sentinel set on loopback (SPEC §15): a master, one replica and
/// three sentinels (`redis-server --sentinel`, quorum 2,
/// `down-after-milliseconds 1000`), all killed on drop.
pub struct SentinelSet {
    /// The first master, then the nodes in start order.
    pub nodes: Vec<Redis>,
    pub sentinels: Vec<Sentinel>,
}

pub const SENTINEL_MASTER: &str = "p33m";

/// One `redis-server --sentinel` with a generated config file.
pub struct Sentinel {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// Its `requirepass`, if any.
    password: Option<String>,
    /// SIGSTOPped ([`Sentinel::pause`]): not asked by the helpers.
    pub paused: bool,
}

impl Sentinel {
    fn start(master_port: u16) -> Sentinel {
        Self::start_with(master_port, "", None)
    }

    /// With more configuration lines, and `requirepass` when `password`.
    pub fn start_with(master_port: u16, extra_conf: &str, password: Option<&str>) -> Sentinel {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("p33-sentinel-{port}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\nlogfile {}\n\
                 sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n\
                 sentinel failover-timeout {SENTINEL_MASTER} 10000\n\
                 sentinel parallel-syncs {SENTINEL_MASTER} 1\n{extra_conf}\n{}",
                dir.display(),
                dir.join("sentinel.log").display(),
                password.map_or(String::new(), |p| format!("requirepass {p}\n"))
            ),
        )
        .unwrap();
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (ops/test.sh installs it)");
        let s = Sentinel {
            port,
            dir,
            child: Some(child),
            password: password.map(str::to_string),
            paused: false,
        };
        wait_for("a sentinel to answer PING", Duration::from_secs(10), || {
            let mut c = s.try_con()?;
            redis::cmd("PING").query::<String>(&mut c).ok()
        });
        s
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn try_con(&self) -> Option<redis::Connection> {
        let auth = self
            .password
            .as_ref()
            .map_or(String::new(), |p| format!(":{p}@"));
        let c = redis::Client::open(format!("redis://{auth}127.0.0.1:{}", self.port)).ok()?;
        let con = c
            .get_connection_with_timeout(Duration::from_millis(500))
            .ok()?;
        con.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        Some(con)
    }

    /// A command to this sentinel.
    pub fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> Option<T> {
        let mut con = self.try_con()?;
        let mut c = redis::cmd(args[0]);
        for a in &args[1..] {
            c.arg(*a);
        }
        c.query(&mut con).ok()
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP: a hung sentinel (accepts connections, never answers).
    pub fn pause(&mut self) {
        if let Some(c) = &self.child {
            signal(c.id(), "STOP");
            self.paused = true;
        }
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `ROLE` of a node: "master", "slave", or None when it does not answer.
pub fn role(port: u16) -> Option<String> {
    let c = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
    let mut con = c
        .get_connection_with_timeout(Duration::from_millis(300))
        .ok()?;
    con.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    let v: redis::Value = redis::cmd("ROLE").query(&mut con).ok()?;
    match v {
        redis::Value::Array(a) => match a.first() {
            Some(redis::Value::BulkString(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        },
        _ => None,
    }
}

impl Drop for SentinelSet {
    /// When a test fails, what each sentinel saw and did (its events:
    /// `+sdown`, `+odown`, `+switch-master`, `+convert-to-slave`, …): a
    /// failover the test did not ask for is told apart from the daemon's.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for s in &self.sentinels {
            let log = std::fs::read_to_string(s.dir.join("sentinel.log")).unwrap_or_default();
            eprintln!("--- sentinel {} ---\n{log}", s.addr());
        }
    }
}

impl SentinelSet {
    /// Master, replica, three sentinels; returns once every sentinel knows
    /// the replica and the other two sentinels, and the replica is in sync,
    /// so a failover can succeed.
    pub fn start() -> SentinelSet {
        // No diskless-sync delay (5 s by default): a replica that has not
        // synced yet would be promoted empty.
        // The first master has replica priority 0: once the sentinels have
        // made it a replica they never promote it again, so every failover
        // here goes one way. On a loaded machine two sentinels can miss the
        // new master's PONGs for `down-after-milliseconds` (1 s) and start
        // a failover nobody asked for; with the old master back as a
        // replica it used to win, and the test saw the new master turned
        // into its replica (READONLY). It now finds no replica to promote.
        let master =
            Redis::start_with(&["--repl-diskless-sync-delay", "0", "--replica-priority", "0"]);
        let replica = Redis::start_with(&[
            "--repl-diskless-sync-delay",
            "0",
            "--replicaof",
            "127.0.0.1",
            &master.port.to_string(),
        ]);
        let sentinels: Vec<Sentinel> = (0..3).map(|_| Sentinel::start(master.port)).collect();
        let set = SentinelSet {
            nodes: vec![master, replica],
            sentinels,
        };
        wait_for("the replica to sync", Duration::from_secs(20), || {
            let mut c = set.nodes[1].con();
            let info: String = redis::cmd("INFO").arg("replication").query(&mut c).ok()?;
            info.contains("master_link_status:up").then_some(())
        });
        wait_for(
            "every sentinel to know the replica and the other sentinels",
            Duration::from_secs(30),
            || {
                set.sentinels
                    .iter()
                    .all(|s| {
                        let replicas: Vec<redis::Value> = s
                            .cmd(&["SENTINEL", "REPLICAS", SENTINEL_MASTER])
                            .unwrap_or_default();
                        let others: Vec<redis::Value> = s
                            .cmd(&["SENTINEL", "SENTINELS", SENTINEL_MASTER])
                            .unwrap_or_default();
                        replicas.len() == 1 && others.len() == 2
                    })
                    .then_some(())
            },
        );
        set
    }

    /// `REDIS_SENTINELS` for the daemon.
    pub fn addrs(&self) -> String {
        self.sentinels
            .iter()
            .map(Sentinel::addr)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The master's port as the sentinels name it (the first that answers).
    pub fn master_port(&self) -> Option<u16> {
        self.sentinels.iter().filter(|s| !s.paused).find_map(|s| {
            let a: Vec<String> =
                s.cmd(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_MASTER])?;
            a.get(1)?.parse().ok()
        })
    }

    /// The node on `port`.
    pub fn node(&mut self, port: u16) -> &mut Redis {
        self.nodes.iter_mut().find(|n| n.port == port).unwrap()
    }

    /// Waits until every sentinel names `port` and that node says master.
    pub fn wait_master(&self, port: u16, timeout: Duration) {
        // Every sentinel names it, and has ended its failover: the leader
        // names the promoted replica while its failover still runs, and
        // its own table keeps the old master as the master until the end
        // (an old master back in that window can be taken for the master
        // again, and the new one turned into its replica).
        wait_for(&format!("the sentinels to name {port}"), timeout, || {
            let all = self.sentinels.iter().filter(|s| !s.paused).all(|s| {
                let named = s
                    .cmd::<Vec<String>>(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_MASTER])
                    .and_then(|a| a.get(1).cloned())
                    == Some(port.to_string());
                let settled = s
                    .cmd::<HashMap<String, String>>(&["SENTINEL", "MASTER", SENTINEL_MASTER])
                    .is_some_and(|m| {
                        m.get("port") == Some(&port.to_string())
                            && m.get("flags").is_some_and(|f| !f.contains("failover"))
                    });
                named && settled
            });
            (all && role(port).as_deref() == Some("master")).then_some(())
        });
    }
}

/// Environment for a daemon that finds the master through `set`.
pub fn sentinel_env(set: &SentinelSet) -> HashMap<String, String> {
    let mut e = base_env(&set.nodes[0]);
    e.remove("REDIS_URL");
    e.insert("REDIS_SENTINELS".into(), set.addrs());
    e.insert("REDIS_SENTINEL_MASTER".into(), SENTINEL_MASTER.into());
    e
}

/// `position-state-brain ctl …` with the daemon's environment.
pub fn ctl(t: &TestDaemon, args: &[&str]) -> (Option<i32>, String, String) {
    if t.daemon.is_some() {
        // A gate installs its function library on its first pass, a few ms
        // after it starts (SPEC §17); ctl's changes but a halt need it.
        let mut con = t.redis.con();
        wait_for(
            "the gate's function library",
            Duration::from_secs(10),
            || {
                let libs: Vec<redis::Value> = redis::cmd("FUNCTION")
                    .arg("LIST")
                    .arg("LIBRARYNAME")
                    .arg("p33_*")
                    .query(&mut con)
                    .ok()?;
                (!libs.is_empty()).then_some(())
            },
        );
    }
    // On a server with the ACL users, as ctl's own user (SPEC §17).
    let ops = ops_env(&t.env);
    let env: Vec<(&str, &str)> = ops
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .chain([("USER", "alice")])
        .collect();
    let mut all = vec!["ctl"];
    all.extend_from_slice(args);
    run_once(&all, &env)
}

/// `env` for `ctl`: the daemon's user `p33` swapped for ctl's own user
/// `p33-ops` (SPEC §17: ctl's changes run as the daemon's function, which
/// only p33-ops may call).
pub fn ops_env(env: &HashMap<String, String>) -> HashMap<String, String> {
    let mut e = env.clone();
    if e.get("REDIS_USERNAME").is_some_and(|u| u == "p33") {
        e.insert("REDIS_USERNAME".into(), "p33-ops".into());
        e.insert("REDIS_PASSWORD".into(), acl_password("p33-ops"));
    }
    e
}

/// `ctl …` that must exit 0; its output.
pub fn ctl_ok(t: &TestDaemon, args: &[&str]) -> String {
    let (code, out, err) = ctl(t, args);
    assert_eq!(code, Some(0), "ctl {args:?}: {out}{err}");
    out
}
