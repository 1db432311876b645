//! Redis Sentinel discovery (SPEC §15): which node is the master now.
//!
//! Every sentinel is asked `SENTINEL MASTER <name>` (dead or hung ones are
//! skipped after a short timeout), and the answer with the highest
//! `config-epoch` wins ([`choose`], pure and table-tested). Then the named
//! node must itself say `ROLE` master before anything is written there.
//!
//! Why the epoch, rather than the first sentinel that answers (what
//! redis-rs's own `sentinel` module does, in 0.32 and in 1.x alike): after a
//! graceful `SENTINEL FAILOVER` the sentinels that did not lead it learn the
//! new master from hello messages, up to a couple of seconds later, and the
//! old master answers `ROLE` master until it is reconfigured. Following such
//! a stale sentinel would move the daemon's writes back to the node that is
//! about to be demoted and resynchronised: permits written there are lost.
//! The epoch is Sentinel's own ordering of configurations.

use std::collections::HashMap;
use std::time::Duration;

use redis::{AsyncConnectionConfig, ConnectionInfo, Value};

use super::target::{join_host_port, SentinelTarget};
use crate::redis::resp;

/// How long one sentinel (or the named master's `ROLE`) may take to answer.
pub const ASK_TIMEOUT: Duration = Duration::from_millis(500);

/// What one sentinel says of the master.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterView {
    /// The master's address.
    pub ip: String,
    /// Its port.
    pub port: u16,
    /// `config-epoch`: the configuration's generation.
    pub epoch: u64,
    /// Whether this sentinel sees the master down (`s_down`, `o_down`) or
    /// not flagged a master. (`disconnected` is not down: right after a
    /// switch the leader has no link to the new master yet; the node's own
    /// `ROLE` is checked before it is used.)
    pub down: bool,
}

impl MasterView {
    /// Parses a `SENTINEL MASTER <name>` reply (a flat field/value array, or
    /// a map under RESP3). `None` when ip, port or epoch are missing or bad.
    pub fn parse(v: &Value) -> Option<MasterView> {
        let mut f: HashMap<String, String> = HashMap::new();
        let text = |v: &Value| match v {
            Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
            Value::SimpleString(s) => Some(s.clone()),
            Value::Int(i) => Some(i.to_string()),
            _ => None,
        };
        match v {
            Value::Array(items) => {
                for kv in items.chunks_exact(2) {
                    if let (Some(k), Some(v)) = (text(&kv[0]), text(&kv[1])) {
                        f.insert(k, v);
                    }
                }
            }
            Value::Map(items) => {
                for (k, v) in items {
                    if let (Some(k), Some(v)) = (text(k), text(v)) {
                        f.insert(k, v);
                    }
                }
            }
            _ => return None,
        }
        let ip = f.get("ip").filter(|s| !s.is_empty() && s.len() <= 255)?;
        let port = f.get("port")?.parse::<u16>().ok().filter(|p| *p > 0)?;
        let epoch = f.get("config-epoch")?.parse::<u64>().ok()?;
        let flags = f.get("flags").map(String::as_str).unwrap_or("");
        let down = !flags.split(',').any(|x| x == "master")
            || flags.split(',').any(|x| matches!(x, "s_down" | "o_down"));
        Some(MasterView {
            ip: ip.clone(),
            port,
            epoch,
            down,
        })
    }
}

/// The master to use, from every sentinel's view (`None`: that sentinel did
/// not answer or does not know the name). Only the newest configuration
/// counts: the highest epoch any sentinel reports. If every sentinel at that
/// epoch sees the master down, there is no master (fail closed), even when
/// an older configuration still names a live node.
pub fn choose(views: &[Option<MasterView>]) -> Option<(String, u16)> {
    let newest = views.iter().flatten().map(|v| v.epoch).max()?;
    views
        .iter()
        .flatten()
        .find(|v| v.epoch == newest && !v.down)
        .map(|v| (v.ip.clone(), v.port))
}

/// The sentinels, with a cached connection to each.
pub struct Sentinels {
    target: SentinelTarget,
    cons: Vec<Option<resp::Conn>>,
    /// The sentinels that did not answer the last lookup (for the log).
    silent: Vec<String>,
}

impl std::fmt::Debug for Sentinels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sentinels({})", self.target.addresses())
    }
}

/// `+switch-master` looks at most this often, however fast a sentinel
/// announces (SPEC §11: a flood of announcements must not cost a core).
pub const HINT_EVERY: Duration = Duration::from_millis(100);

/// Connects to sentinel `i` of `target` and authenticates with its own
/// password (when it has one), every reply read under the 64 KiB cap.
async fn connect(target: &SentinelTarget, i: usize) -> Result<resp::Conn, String> {
    let (host, port) = &target.sentinels[i];
    let tls = match &target.tls {
        None => None,
        Some(ca) => Some(resp::tls_config(ca.as_deref())?),
    };
    let mut con = resp::Conn::connect(host, *port, ASK_TIMEOUT, tls)
        .await
        .map_err(|e| e.to_string())?;
    if let Some(pw) = &target.password {
        let auth = match &target.username {
            Some(user) => {
                con.call(
                    &[b"AUTH", user.as_bytes(), pw.expose().as_bytes()],
                    ASK_TIMEOUT,
                )
                .await
            }
            None => {
                con.call(&[b"AUTH", pw.expose().as_bytes()], ASK_TIMEOUT)
                    .await
            }
        }
        .map_err(|e| e.to_string())?;
        if let resp::Reply::Error(e) = auth {
            return Err(crate::text::clip(&e).into_owned());
        }
    }
    Ok(con)
}

/// A sentinel that did not answer a lookup, and why.
#[derive(Debug, Clone)]
pub struct Problem {
    /// `host:port`.
    pub sentinel: String,
    /// The error.
    pub error: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sentinel {}: {}", self.sentinel, self.error)
    }
}

/// `a; b; c`.
pub fn join(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(Problem::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// What asking the sentinels gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The newest configuration names this master (`host`, `port`).
    Master(String, u16),
    /// Sentinels answered, but none names a master that is up.
    NoMaster,
    /// No sentinel answered.
    Unreachable,
}

fn config(timeout: Duration) -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(timeout)
        .set_response_timeout(timeout)
}

impl Sentinels {
    /// No connection is made until [`Sentinels::lookup`].
    pub fn new(target: SentinelTarget) -> Sentinels {
        let n = target.sentinels.len();
        Sentinels {
            target,
            cons: (0..n).map(|_| None).collect(),
            silent: Vec::new(),
        }
    }

    /// Logs which sentinels stopped or started answering (`problems` from
    /// [`Sentinels::lookup`]): one WARN per change, not one per look, so a
    /// degraded sentinel set is visible while the master is still found.
    pub fn report(&mut self, problems: &[Problem]) {
        let silent: Vec<String> = problems.iter().map(|p| p.sentinel.clone()).collect();
        if silent != self.silent {
            if problems.is_empty() {
                tracing::info!("redis: every sentinel answers again");
            } else {
                tracing::warn!(
                    "redis: {} of {} sentinels do not answer: {}",
                    problems.len(),
                    self.cons.len(),
                    join(problems)
                );
            }
            self.silent = silent;
        }
    }

    /// The master's name.
    pub fn master_name(&self) -> &str {
        &self.target.master
    }

    /// Asks every sentinel at once (a hung one costs [`ASK_TIMEOUT`], not
    /// a turn each) and chooses ([`choose`]). Also says what failed.
    pub async fn lookup(&mut self) -> (Lookup, Vec<Problem>) {
        let mut asks = tokio::task::JoinSet::new();
        for i in 0..self.cons.len() {
            let (con, target) = (self.cons[i].take(), self.target.clone());
            asks.spawn(async move { (i, ask(con, &target, i).await) });
        }
        let mut answers: Vec<Option<Result<Option<MasterView>, String>>> =
            (0..self.cons.len()).map(|_| None).collect();
        while let Some(done) = asks.join_next().await {
            if let Ok((i, (con, r))) = done {
                self.cons[i] = con;
                answers[i] = Some(r);
            }
        }
        let mut problems = Vec::new();
        let mut answered = Vec::new();
        for (i, r) in answers.into_iter().enumerate() {
            let error = match r {
                Some(Ok(v)) => {
                    answered.push(v);
                    continue;
                }
                Some(Err(e)) => e,
                // Its ask panicked: a sentinel that did not answer.
                None => "the lookup failed".to_string(),
            };
            let (h, p) = &self.target.sentinels[i];
            problems.push(Problem {
                sentinel: join_host_port(h, *p),
                error,
            });
        }
        if answered.is_empty() {
            return (Lookup::Unreachable, problems);
        }
        match choose(&answered) {
            Some((h, p)) => (Lookup::Master(h, p), problems),
            None => (Lookup::NoMaster, problems),
        }
    }
}

/// Asks one sentinel (connecting first when `con` is `None`); gives back
/// the connection to keep (none after a failure) and its answer (`None`:
/// it does not know the name). A reply over 64 KiB, or one that is not
/// RESP, is a sentinel that did not answer.
async fn ask(
    con: Option<resp::Conn>,
    target: &SentinelTarget,
    i: usize,
) -> (Option<resp::Conn>, Result<Option<MasterView>, String>) {
    let mut con = match con {
        Some(c) => c,
        None => match connect(target, i).await {
            Ok(c) => c,
            Err(e) => return (None, Err(e)),
        },
    };
    let asked = con
        .call(
            &[b"SENTINEL", b"MASTER", target.master.as_bytes()],
            ASK_TIMEOUT,
        )
        .await;
    match asked.map(resp::Reply::into_result) {
        Ok(Ok(v)) => (Some(con), Ok(MasterView::parse(&v))),
        // Not allowed to ask: no answer.
        Ok(Err(e))
            if e.starts_with("NOAUTH") || e.starts_with("WRONGPASS") || e.starts_with("NOPERM") =>
        {
            (None, Err(crate::text::clip(&e).into_owned()))
        }
        // "ERR No such master with that name": it answered, knows nothing.
        Ok(Err(_)) => (Some(con), Ok(None)),
        Err(e) => (None, Err(e.to_string())),
    }
}

/// Listens for `+switch-master` on the sentinel at `i` until `cancel`,
/// calling `heard` at each announcement — at most once per [`HINT_EVERY`]:
/// after one, nothing more is read for that long, so a flooding sentinel
/// meets TCP back-pressure rather than a busy core. Reconnects after a
/// failure at most once a second. A hint only: the choice is
/// [`Sentinels::lookup`]'s.
pub async fn listen(
    target: SentinelTarget,
    i: usize,
    heard: impl Fn(),
    cancel: tokio_util::sync::CancellationToken,
) {
    loop {
        let follow = subscribed(&target, i, &heard);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = follow => {}
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// One subscription to `+switch-master` on sentinel `i`, until it fails;
/// returns why.
async fn subscribed(target: &SentinelTarget, i: usize, heard: &impl Fn()) -> String {
    let mut con = match connect(target, i).await {
        Ok(c) => c,
        Err(e) => return e,
    };
    if let Err(e) = con.send(&[b"SUBSCRIBE", b"+switch-master"]).await {
        return e.to_string();
    }
    let message = resp::Reply::Bulk(Some(b"message".to_vec()));
    loop {
        match con.read().await {
            Ok(resp::Reply::Array(Some(m))) if m.first() == Some(&message) => {
                heard();
                tokio::time::sleep(HINT_EVERY).await;
            }
            Ok(resp::Reply::Error(e)) => return crate::text::clip(&e).into_owned(),
            Ok(_) => {}
            Err(e) => return e.to_string(),
        }
    }
}

fn timed_out() -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::IoError, "timed out"))
}

/// Asks the node itself: `true` when its `ROLE` is master.
pub async fn is_master(info: &ConnectionInfo) -> Result<bool, redis::RedisError> {
    let client = redis::Client::open(info.clone())?;
    let fut = async {
        let mut con = client
            .get_multiplexed_async_connection_with_config(&config(ASK_TIMEOUT))
            .await?;
        let v: Value = redis::cmd("ROLE").query_async(&mut con).await?;
        Ok::<_, redis::RedisError>(match v {
            Value::Array(parts) => matches!(
                parts.first(),
                Some(Value::BulkString(b)) if b.as_slice() == b"master"
            ),
            _ => false,
        })
    };
    tokio::time::timeout(ASK_TIMEOUT.saturating_mul(2), fut)
        .await
        .map_err(|_| timed_out())?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(ip: &str, port: u16, epoch: u64, down: bool) -> Option<MasterView> {
        Some(MasterView {
            ip: ip.into(),
            port,
            epoch,
            down,
        })
    }

    #[test]
    fn the_newest_configuration_wins() {
        let a = ("10.0.0.1".to_string(), 6379);
        let b = ("10.0.0.2".to_string(), 6380);
        #[allow(clippy::type_complexity)]
        let rows: &[(&str, Vec<Option<MasterView>>, Option<(String, u16)>)] = &[
            ("nobody answered", vec![None, None], None),
            (
                "one sentinel",
                vec![view("10.0.0.1", 6379, 0, false)],
                Some(a.clone()),
            ),
            (
                "all agree",
                vec![
                    view("10.0.0.1", 6379, 3, false),
                    view("10.0.0.1", 6379, 3, false),
                ],
                Some(a.clone()),
            ),
            (
                "a stale sentinel first: the higher epoch wins",
                vec![
                    view("10.0.0.1", 6379, 3, false),
                    view("10.0.0.2", 6380, 4, false),
                ],
                Some(b.clone()),
            ),
            (
                "a dead sentinel skipped",
                vec![None, view("10.0.0.2", 6380, 4, false)],
                Some(b.clone()),
            ),
            (
                "master down at the newest epoch: none, though an older one is up",
                vec![
                    view("10.0.0.1", 6379, 3, false),
                    view("10.0.0.2", 6380, 4, true),
                ],
                None,
            ),
            (
                "one sentinel sees it down, another at the same epoch does not",
                vec![
                    view("10.0.0.1", 6379, 3, true),
                    view("10.0.0.1", 6379, 3, false),
                ],
                Some(a.clone()),
            ),
            ("all down", vec![view("10.0.0.1", 6379, 3, true)], None),
        ];
        for (what, views, want) in rows {
            assert_eq!(&choose(views), want, "{what}");
        }
    }

    #[test]
    fn parses_sentinel_master_replies() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let reply = |pairs: &[(&str, &str)]| {
            Value::Array(pairs.iter().flat_map(|(k, v)| [bulk(k), bulk(v)]).collect())
        };
        let ok = reply(&[
            ("name", "mymaster"),
            ("ip", "127.0.0.1"),
            ("port", "7001"),
            ("flags", "master"),
            ("config-epoch", "2"),
        ]);
        assert_eq!(
            MasterView::parse(&ok),
            Some(MasterView {
                ip: "127.0.0.1".into(),
                port: 7001,
                epoch: 2,
                down: false
            })
        );
        let down = reply(&[
            ("ip", "127.0.0.1"),
            ("port", "7001"),
            ("flags", "master,s_down,o_down"),
            ("config-epoch", "2"),
        ]);
        assert!(MasterView::parse(&down).unwrap().down);
        let not_master = reply(&[
            ("ip", "127.0.0.1"),
            ("port", "7001"),
            ("flags", "slave"),
            ("config-epoch", "2"),
        ]);
        assert!(MasterView::parse(&not_master).unwrap().down);
        let unlinked = reply(&[
            ("ip", "127.0.0.1"),
            ("port", "7001"),
            ("flags", "master,disconnected"),
            ("config-epoch", "3"),
        ]);
        assert!(!MasterView::parse(&unlinked).unwrap().down);
        for bad in [
            reply(&[("ip", "127.0.0.1"), ("port", "0"), ("config-epoch", "1")]),
            reply(&[
                ("ip", "127.0.0.1"),
                ("port", "99999"),
                ("config-epoch", "1"),
            ]),
            reply(&[
                ("ip", "127.0.0.1"),
                ("port", "7001"),
                ("config-epoch", "-1"),
            ]),
            reply(&[("ip", ""), ("port", "7001"), ("config-epoch", "1")]),
            reply(&[("port", "7001"), ("config-epoch", "1")]),
            Value::Nil,
            Value::Int(3),
        ] {
            assert_eq!(MasterView::parse(&bad), None, "{bad:?}");
        }
        let map = Value::Map(vec![
            (bulk("ip"), bulk("::1")),
            (bulk("port"), Value::Int(7002)),
            (bulk("flags"), bulk("master")),
            (bulk("config-epoch"), Value::Int(5)),
        ]);
        assert_eq!(MasterView::parse(&map).unwrap().port, 7002);
    }
}
