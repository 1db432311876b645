//! Redis connections that survive outages and follow failovers, and the
//! wall clock.
//!
//! [`Redis`] is the one handle to the Redis deployment: a fixed server
//! (`REDIS_URL`, host/port) or the master Redis Sentinel names (SPEC §15).
//! Every task gets its own [`Conn`] from it (the plan consumer blocks in
//! `XREADGROUP`, which would hold up any other command multiplexed on the
//! same connection). [`Redis::connect`] retries with capped exponential
//! backoff until Redis answers or shutdown is asked for: the daemon never
//! exits because Redis is away. Once connected, a `Conn` reconnects by
//! itself; the failing call returns an error that callers treat as transient.
//!
//! With sentinels, [`Redis::follow`] (one task) asks them every
//! [`POLL_EVERY`], and at once when one announces `+switch-master` or a
//! call fails with a lost connection or `READONLY`, which node is the
//! master ([`crate::redis::sentinel`]). When that
//! changes, every `Conn` moves on its next call — a call still waiting on
//! the old master is abandoned with an error, so nothing more is written
//! there — and [`Conn::take_moved`] tells stream readers to replay their own
//! pending entries. While no master is known every call fails at once ("no
//! master known") and nothing is written anywhere.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, ConnectionInfo, Pipeline, RedisError, RedisFuture, Value};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::target::{join_host_port, RedisTarget};
use crate::redis::sentinel::{self, Lookup, Sentinels};

/// How often the sentinels are asked while a master is known (SPEC §15:
/// at least every second).
pub const POLL_EVERY: Duration = Duration::from_millis(500);
/// How often while none is known, or right after a failed call.
pub const POLL_FAST: Duration = Duration::from_millis(100);

/// Wall-clock epoch seconds (fractional). The daemon's one clock.
#[allow(clippy::disallowed_methods)]
pub fn now_epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Wall-clock epoch milliseconds.
#[allow(clippy::disallowed_methods)]
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Capped exponential backoff: 100 ms doubling to 1 s (SPEC §3: every
/// reconnect backoff is capped at 1 s, so the first permit after Redis
/// answers again comes within 2 s).
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: Duration::from_millis(100),
        }
    }
}

impl Backoff {
    /// The cap on one wait.
    pub const MAX: Duration = Duration::from_secs(1);

    /// The next wait, doubling up to [`Backoff::MAX`].
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        d
    }

    /// Back to the shortest wait, after a success.
    pub fn reset(&mut self) {
        *self = Backoff::default();
    }

    /// Sleeps for the next delay; false when shutdown came first.
    pub async fn wait(&mut self, cancel: &CancellationToken) -> bool {
        let d = self.next_delay();
        tokio::select! {
            _ = cancel.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }
}

/// A Redis node to connect to.
struct Node {
    info: ConnectionInfo,
    /// `host:port`.
    shown: String,
}

/// Where the master is, as far as this process knows.
#[derive(Clone)]
struct Master {
    /// The node to use; `None` while none is known.
    node: Option<Arc<Node>>,
    /// Grows by one at each switch to another node.
    generation: u64,
    /// The last node known, kept while none is.
    last: Option<Arc<Node>>,
}

struct Shared {
    target: RedisTarget,
    master: watch::Sender<Master>,
    /// A call failed in a way that may mean a failover: look now.
    nudge: Notify,
    /// The master answered `READONLY`: check its `ROLE` at the next look,
    /// even if the sentinels still name it.
    suspect: AtomicBool,
    failovers: AtomicU64,
}

/// The Redis deployment: a fixed server or the master Sentinel names.
/// Cheap to clone; every clone follows the same master.
#[derive(Clone)]
pub struct Redis {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redis({})", self.shared.target.display())
    }
}

/// Sees every change of the master (or of the knowledge of it).
#[derive(Debug)]
pub struct MasterWatch(watch::Receiver<Master>);

impl MasterWatch {
    /// Resolves at the next change since the last call (never, for a fixed
    /// server).
    pub async fn changed(&mut self) {
        if self.0.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl std::fmt::Debug for Master {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = self.node.as_ref().map(|n| n.shown.as_str());
        write!(f, "Master({shown:?}, generation {})", self.generation)
    }
}

/// What a [`Redis`] knows, for metrics and `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterStatus {
    /// The master's address (`host:port`), when one is known.
    pub master: Option<String>,
    /// Switches to another master since start (the first discovery is none).
    pub failovers: u64,
}

fn no_master() -> RedisError {
    RedisError::from((
        redis::ErrorKind::IoError,
        "no master known",
        "the sentinels name no master that is up".to_string(),
    ))
}

fn master_changed() -> RedisError {
    RedisError::from((
        redis::ErrorKind::IoError,
        "the master changed during the call",
        "abandoned; retried on the new master".to_string(),
    ))
}

/// Server refusals that may mean the node is no longer (or not yet) the
/// master.
const FAILOVER_CODES: &[&str] = &["READONLY", "MASTERDOWN", "LOADING", "UNBLOCKED"];

/// A reply, as far as a failover is concerned: a command's refusal arrives
/// as a server error inside it, not as an `Err`.
trait Reply {
    /// Whether it holds a server error with one of `codes`.
    fn refused(&self, codes: &[&str]) -> bool;
}

impl Reply for Value {
    fn refused(&self, codes: &[&str]) -> bool {
        matches!(self, Value::ServerError(e) if codes.contains(&e.code()))
    }
}

impl Reply for Vec<Value> {
    fn refused(&self, codes: &[&str]) -> bool {
        self.iter().any(|v| v.refused(codes))
    }
}

/// The node says it is a replica.
fn is_readonly(e: &RedisError) -> bool {
    e.kind() == redis::ErrorKind::ReadOnly || e.code() == Some("READONLY")
}

/// An error that may mean the node is no longer the master.
fn suggests_failover(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.code().is_some_and(|c| FAILOVER_CODES.contains(&c))
}

impl Redis {
    /// A handle; nothing connects yet. With sentinels no master is known
    /// until [`Redis::follow`] or [`Redis::discover`] finds one.
    pub fn new(target: RedisTarget) -> Redis {
        let node = target.sentinel.is_none().then(|| {
            Arc::new(Node {
                info: target.info.clone(),
                shown: target.display(),
            })
        });
        let (tx, _) = watch::channel(Master {
            last: node.clone(),
            node,
            generation: 0,
        });
        Redis {
            shared: Arc::new(Shared {
                target,
                master: tx,
                nudge: Notify::new(),
                suspect: AtomicBool::new(false),
                failovers: AtomicU64::new(0),
            }),
        }
    }

    /// The configured target, credentials redacted.
    pub fn display(&self) -> String {
        self.shared.target.display()
    }

    /// Whether the master is found through sentinels.
    pub fn is_sentinel(&self) -> bool {
        self.shared.target.sentinel.is_some()
    }

    /// The master now, and how many switches there were.
    pub fn status(&self) -> MasterStatus {
        MasterStatus {
            master: self
                .shared
                .master
                .borrow()
                .node
                .as_ref()
                .map(|n| n.shown.clone()),
            failovers: self.shared.failovers.load(Ordering::SeqCst),
        }
    }

    /// A watch on the master, for metrics: see [`MasterWatch::changed`].
    pub fn watch(&self) -> MasterWatch {
        MasterWatch(self.shared.master.subscribe())
    }

    /// The data node at `host:port`: the configured database and password.
    fn node_info(&self, host: String, port: u16) -> ConnectionInfo {
        // TLS as configured (REDIS_TLS): the template address carries it.
        let addr = match &self.shared.target.info.addr {
            redis::ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => redis::ConnectionAddr::TcpTls {
                host,
                port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => redis::ConnectionAddr::Tcp(host, port),
        };
        ConnectionInfo {
            addr,
            redis: self.shared.target.info.redis.clone(),
        }
    }

    /// Records what the sentinels said: `Some` node, or `None` (no master).
    fn publish(&self, found: Option<(String, u16)>, why: &str) {
        let shared = &self.shared;
        shared.master.send_if_modified(|m| match found {
            None => {
                if m.node.is_none() {
                    return false;
                }
                warn!("redis: no master known ({why}); every Redis call fails until there is one");
                m.node = None;
                true
            }
            Some((host, port)) => {
                let shown = join_host_port(&host, port);
                if m.node.as_ref().is_some_and(|n| n.shown == shown) {
                    return false;
                }
                if let Some(last) = m.last.as_ref().filter(|l| l.shown == shown) {
                    // Back to the node we were on: the connections to it are
                    // still good, nothing moves.
                    info!("redis: master {shown} is known again (sentinels)");
                    m.node = Some(last.clone());
                    return true;
                }
                let node = Arc::new(Node {
                    info: self.node_info(host, port),
                    shown: shown.clone(),
                });
                match &m.last {
                    Some(last) => {
                        shared.failovers.fetch_add(1, Ordering::SeqCst);
                        warn!(
                            "redis: master switched from {} to {shown} (sentinels); every connection moves to it",
                            last.shown
                        );
                    }
                    None => info!("redis: master is {shown} (sentinels)"),
                }
                m.generation = m.generation.saturating_add(1);
                m.last = Some(node.clone());
                m.node = Some(node);
                true
            }
        });
    }

    /// Asks the sentinels once and records the answer; for a fixed server,
    /// nothing to do. `Err` says why no master is known.
    pub async fn discover(&self) -> Result<(), String> {
        let Some(target) = self.shared.target.sentinel.clone() else {
            return Ok(());
        };
        let mut sentinels = Sentinels::new(target);
        self.look(&mut sentinels).await
    }

    async fn look(&self, sentinels: &mut Sentinels) -> Result<(), String> {
        let (found, problems) = sentinels.lookup().await;
        sentinels.report(&problems);
        match found {
            Lookup::Master(host, port) => {
                let same = self
                    .shared
                    .master
                    .borrow()
                    .node
                    .as_ref()
                    .is_some_and(|n| n.shown == join_host_port(&host, port));
                if same && !self.shared.suspect.swap(false, Ordering::SeqCst) {
                    return Ok(());
                }
                // The node must say so itself before anything is written there.
                match sentinel::is_master(&self.node_info(host.clone(), port)).await {
                    Ok(true) => {
                        self.publish(Some((host, port)), "");
                        Ok(())
                    }
                    Ok(false) => {
                        // Named but a replica (demoted behind the sentinels'
                        // back, or not promoted yet): nowhere to write.
                        let why = format!(
                            "the sentinels name {} but it is not a master (yet)",
                            join_host_port(&host, port)
                        );
                        self.publish(None, &why);
                        Err(why)
                    }
                    Err(e) => {
                        let why = format!(
                            "the sentinels name {}, which does not answer: {e}",
                            join_host_port(&host, port)
                        );
                        self.publish(None, &why);
                        Err(why)
                    }
                }
            }
            Lookup::NoMaster => {
                let why = format!(
                    "the sentinels name no master {:?} that is up",
                    sentinels.master_name()
                );
                self.publish(None, &why);
                Err(why)
            }
            // Nobody to ask: keep the master we have (its connections still
            // work or fail by themselves).
            Lookup::Unreachable => Err(format!(
                "no sentinel answers ({})",
                sentinel::join(&problems)
            )),
        }
    }

    /// Follows the master until `cancel` fires (sentinel mode; for a fixed
    /// server it only waits).
    pub async fn follow(self, cancel: CancellationToken) {
        let Some(target) = self.shared.target.sentinel.clone() else {
            return cancel.cancelled().await;
        };
        // Each sentinel's +switch-master announcement starts a look at once.
        let mut listeners = tokio::task::JoinSet::new();
        for i in 0..target.sentinels.len() {
            let shared = self.shared.clone();
            listeners.spawn(sentinel::listen(
                target.clone(),
                i,
                move || shared.nudge.notify_one(),
                cancel.clone(),
            ));
        }
        let mut sentinels = Sentinels::new(target);
        let mut failures = 0u64;
        let mut last_look;
        loop {
            last_look = tokio::time::Instant::now();
            match self.look(&mut sentinels).await {
                Ok(()) => failures = 0,
                Err(why) => {
                    failures += 1;
                    // One line at first, then one every 100 looks (~10 s).
                    if failures == 1 || failures.is_multiple_of(100) {
                        warn!("redis: sentinel discovery: {why}");
                    }
                }
            }
            let wait = if self.shared.master.borrow().node.is_some() && failures == 0 {
                POLL_EVERY
            } else {
                POLL_FAST
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                _ = self.shared.nudge.notified() => {
                    // At most one look per POLL_FAST, however many calls
                    // fail at once.
                    tokio::time::sleep_until(last_look + POLL_FAST).await;
                }
            }
        }
    }

    /// Connects to the master, retrying with capped backoff until it answers
    /// (waiting for the sentinels to name one). `None` when shutdown was
    /// asked for first. `response_timeout` must exceed the longest `BLOCK`
    /// the connection's user issues.
    pub async fn connect(
        &self,
        who: &str,
        response_timeout: Duration,
        cancel: &CancellationToken,
    ) -> Option<Conn> {
        // At start the sentinels have not been asked yet: give the first
        // look a moment before calling a missing master a failure.
        if self.is_sentinel() {
            let mut rx = self.shared.master.subscribe();
            tokio::select! {
                _ = cancel.cancelled() => return None,
                _ = rx.wait_for(|m| m.node.is_some()) => {}
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
        let mut backoff = Backoff::default();
        let mut attempts = 0u64;
        loop {
            attempts += 1;
            let attempt = tokio::select! {
                _ = cancel.cancelled() => return None,
                r = self.try_connect(response_timeout) => r,
            };
            match attempt {
                Ok(c) => {
                    REFUSAL_SAID.store(false, Ordering::SeqCst);
                    if attempts > 1 {
                        info!(
                            "redis: {who} connected to {} after {attempts} attempts",
                            c.node.shown
                        );
                    }
                    return Some(c);
                }
                Err(e) => {
                    // Refused credentials are no outage to wait out quietly:
                    // said at once, at ERROR, naming the cause (never the
                    // password), then retried like an outage (SPEC §10).
                    if refused_credentials(&e) && !REFUSAL_SAID.swap(true, Ordering::SeqCst) {
                        // The server's words, cut and escaped like any echo.
                        error!(
                            "redis: {} refused the credentials ({}); check REDIS_PASSWORD (and the user); retrying",
                            self.display(),
                            crate::text::clip(&e.to_string())
                        );
                    }
                    // One line per attempt up to 5, then one every 20, so an
                    // outage of hours does not flood the journal.
                    if attempts <= 5 || attempts.is_multiple_of(20) {
                        warn!(
                            "redis: {who} cannot connect to {} (attempt {attempts}): {e}; retrying",
                            self.display()
                        );
                    }
                    if !backoff.wait(cancel).await {
                        return None;
                    }
                }
            }
        }
    }

    /// One attempt, for a command-line tool that must say at once that
    /// Redis cannot be reached (with sentinels: asks them first).
    pub async fn connect_once(&self, response_timeout: Duration) -> Result<Conn, RedisError> {
        if self.is_sentinel() && self.shared.master.borrow().node.is_none() {
            if let Err(why) = self.discover().await {
                return Err(RedisError::from((
                    redis::ErrorKind::IoError,
                    "no master known",
                    why,
                )));
            }
        }
        self.try_connect(response_timeout).await
    }

    async fn try_connect(&self, response_timeout: Duration) -> Result<Conn, RedisError> {
        let (node, generation) = {
            let m = self.shared.master.borrow();
            (m.node.clone(), m.generation)
        };
        let Some(node) = node else {
            self.shared.nudge.notify_one();
            return Err(no_master());
        };
        let inner = manager(&node.info, response_timeout).await?;
        Ok(Conn {
            inner,
            node,
            generation,
            redis: self.clone(),
            rx: self.shared.master.subscribe(),
            response_timeout,
            moved: false,
        })
    }
}

/// Whether the ERROR of refused credentials was said since the last
/// connection that succeeded (one line for the process, not one per task).
static REFUSAL_SAID: AtomicBool = AtomicBool::new(false);

/// Whether Redis refused the credentials (WRONGPASS, NOAUTH, a failed AUTH).
fn refused_credentials(e: &RedisError) -> bool {
    e.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("WRONGPASS" | "NOAUTH"))
}

async fn manager(
    info: &ConnectionInfo,
    response_timeout: Duration,
) -> Result<ConnectionManager, RedisError> {
    let client = redis::Client::open(info.clone())?;
    // Refused credentials are said at once: one plain connection first,
    // which the manager below would retry with backoff for seconds. Any
    // other failure is left to the manager, as before.
    let probe_cfg = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Duration::from_secs(3))
        .set_response_timeout(Duration::from_secs(3));
    let probe = client.get_multiplexed_async_connection_with_config(&probe_cfg);
    if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(4), probe).await {
        if refused_credentials(&e) {
            return Err(e);
        }
    }
    let cfg = ConnectionManagerConfig::new()
        .set_connection_timeout(Duration::from_secs(3))
        .set_response_timeout(response_timeout)
        .set_number_of_retries(2)
        .set_max_delay(1000);
    let fut = ConnectionManager::new_with_config(client, cfg);
    match tokio::time::timeout(Duration::from_secs(5), fut).await {
        Ok(r) => r,
        Err(_) => Err(RedisError::from((
            redis::ErrorKind::IoError,
            "connect timed out",
        ))),
    }
}

/// One task's connection to the master; follows it across failovers. Use
/// it like any redis-rs async connection (`query_async`, scripts,
/// pipelines).
pub struct Conn {
    inner: ConnectionManager,
    node: Arc<Node>,
    generation: u64,
    redis: Redis,
    rx: watch::Receiver<Master>,
    response_timeout: Duration,
    moved: bool,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Conn({})", self.node.shown)
    }
}

impl Conn {
    /// The node this connection talks to, as shown to people (credentials
    /// redacted): a URL, or `host:port` of a master the sentinels named.
    pub fn node_shown(&self) -> &str {
        &self.node.shown
    }

    /// True once after this connection moved to another master: a stream
    /// reader then replays its own pending entries there.
    pub fn take_moved(&mut self) -> bool {
        std::mem::take(&mut self.moved)
    }

    /// Before a call: on the current master, or moved to it.
    async fn follow(&mut self) -> Result<(), RedisError> {
        let (node, generation) = {
            let m = self.rx.borrow_and_update();
            (m.node.clone(), m.generation)
        };
        let Some(node) = node else {
            return Err(no_master());
        };
        if generation == self.generation {
            return Ok(());
        }
        self.inner = manager(&node.info, self.response_timeout).await?;
        debug!(
            "redis: connection moved from {} to {}",
            self.node.shown, node.shown
        );
        self.node = node;
        self.generation = generation;
        self.moved = true;
        Ok(())
    }

    /// Before a call: on the master (moved to it if it changed); asks for a
    /// look at the sentinels when there is none.
    async fn before(&mut self) -> Result<(), RedisError> {
        let r = self.follow().await;
        if r.is_err() {
            self.redis.shared.nudge.notify_one();
        }
        r
    }

    /// What a call in flight watches: a switch abandons it (sentinel mode).
    fn guard(&self) -> Option<(watch::Receiver<Master>, u64)> {
        self.redis
            .is_sentinel()
            .then(|| (self.rx.clone(), self.generation))
    }

    /// After a call: a failure a failover would cause asks for a look; a
    /// `READONLY` (an error, or a server error inside the reply, which is
    /// how a command's refusal arrives here) has the node's `ROLE` checked.
    fn after<T: Reply>(&self, r: &Result<T, RedisError>) {
        let (failover, readonly) = match r {
            Ok(v) => (v.refused(FAILOVER_CODES), v.refused(&["READONLY"])),
            Err(e) => (suggests_failover(e), is_readonly(e)),
        };
        if readonly && self.redis.is_sentinel() {
            self.redis.shared.suspect.store(true, Ordering::SeqCst);
        }
        if failover {
            self.redis.shared.nudge.notify_one();
        }
    }
}

/// Runs `call`, abandoning it when the master changes meanwhile: nothing
/// more goes to a node the sentinels no longer name.
async fn guarded<T>(
    guard: Option<(watch::Receiver<Master>, u64)>,
    call: RedisFuture<'_, T>,
) -> Result<T, RedisError> {
    let Some((mut rx, generation)) = guard else {
        return call.await;
    };
    let moved = async move {
        if rx.wait_for(|m| m.generation != generation).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        r = call => r,
        _ = moved => Err(master_changed()),
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            self.before().await?;
            let r = guarded(self.guard(), self.inner.req_packed_command(cmd)).await;
            self.after(&r);
            r
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            self.before().await?;
            let r = guarded(
                self.guard(),
                self.inner.req_packed_commands(cmd, offset, count),
            )
            .await;
            self.after(&r);
            r
        })
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::default();
        let seq: Vec<u128> = (0..8).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(seq, vec![100, 200, 400, 800, 1000, 1000, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }
}
