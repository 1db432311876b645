//! The user data stream (SPEC §16): the listenKey, the WebSocket on
//! Binance's private route, frames into checked events, and the task that
//! runs [`Machine`] against the socket.
//!
//! Route: `<P33_EXCHANGE_WS_URL>/private/ws?listenKey=<key>` (Binance's
//! USDⓈ-M routing since 2026; `docs/formats.md`). No `events=` filter: it
//! is optional, and leaving it out is what guarantees `listenKeyExpired` is
//! never filtered away; other events are counted and ignored.
//!
//! The listenKey is a credential: it lives in a [`Secret`], and every
//! message that could hold it (a connect error) is redacted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{Config, Secret};
use crate::observe::metrics::Metrics;
use crate::redis::store;

use super::book::{AccountUpdate, Clock, Reply};
use super::frames::{parse_frame, Frame};
use super::machine::{Action, Input, Machine, Phase, Reason};
use super::orders::{Cause, OrderUpdate};
use super::positions::parse_rest_legs;
use super::snapshots::{Stamp, Writer};
use super::{Client, ExchangeError};

/// The largest frame read; a larger one fails the connection.
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;

/// The longest wait for the socket to open.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest wait for a frame after a ping.
pub const PONG_DEADLINE: Duration = Duration::from_secs(10);

/// How long the old connection is still read after its replacement opened.
pub const REPLACE_OVERLAP: Duration = Duration::from_secs(2);

/// Snapshots are re-stamped only while the last frame is at most this old.
pub const RESTAMP_MAX_FRAME_AGE_MS: u64 = 40_000;

/// A fill's `kind=fill` entry on the positions stream (SPEC §19).
async fn write_fill(con: &mut store::Conn, u: &OrderUpdate) -> redis::RedisResult<()> {
    redis::cmd("XADD")
        .arg(crate::redis::keys::POSITIONS_STREAM)
        .arg("MAXLEN")
        .arg("~")
        .arg(super::snapshots::POSITIONS_MAXLEN)
        .arg("*")
        .arg("kind")
        .arg("fill")
        .arg("symbol")
        .arg(&u.symbol)
        .arg("side")
        .arg(&u.side)
        .arg("leg")
        .arg(u.leg.as_str())
        .arg("qty")
        .arg(crate::domain::dec_str(u.last_qty))
        .arg("price")
        .arg(&u.avg_price)
        .arg("order_id")
        .arg(u.order_id)
        .arg("client_order_id")
        .arg(&u.client_order_id)
        .arg("order_type")
        .arg(&u.order_type)
        .arg("cause")
        .arg(u.cause.as_str())
        .arg("realized_pnl")
        .arg(&u.realized_pnl)
        .arg("exchange_ts_ms")
        .arg(u.tx_ms)
        .query_async(con)
        .await
}

/// The connection URL for a key. Never logged.
fn stream_url(base: &str, key: &Secret) -> String {
    format!("{base}/private/ws?listenKey={}", key.expose())
}

/// `msg` with the key replaced (a connect error may quote the URL).
fn redact(msg: &str, key: &Secret) -> String {
    if key.expose().is_empty() {
        return msg.to_string();
    }
    msg.replace(key.expose(), "[listenKey]")
}

/// A random number for the backoff's jitter (no crate for it: std's
/// randomly keyed hasher over the clock spreads reconnects well enough).
fn jitter() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(store::now_ms());
    h.finish()
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Everything the stream task uses.
pub struct Stream {
    cfg: Arc<Config>,
    client: Arc<Client>,
    writer: Arc<Writer>,
    metrics: Arc<Metrics>,
    /// Connections opened so far: each socket's id.
    opened: std::sync::atomic::AtomicU64,
    /// The id of the socket whose frames are being applied (the old one
    /// during a replacement's overlap): several updates with one `T`
    /// follow each other only on one connection (SPEC §19).
    reading: std::sync::atomic::AtomicU64,
    /// The liquidation and ADL orders whose symbol state was already set
    /// (once per order, SPEC §19), the last [`ORDERS_REMEMBERED`].
    acted: std::sync::Mutex<std::collections::VecDeque<u64>>,
}

/// Liquidation orders remembered so their state change is made once.
const ORDERS_REMEMBERED: usize = 1_000;

impl Stream {
    /// The stream task's parts.
    pub fn new(
        cfg: Arc<Config>,
        client: Arc<Client>,
        writer: Arc<Writer>,
        metrics: Arc<Metrics>,
    ) -> Stream {
        // Every series at 0 from the start, so rates and alerts see them.
        for (kind, result) in [
            ("account_update", "applied"),
            ("account_update", "stale"),
            ("account_update", "buffered"),
            ("account_update", "ignored"),
            ("order_trade_update", "fill"),
            ("order_trade_update", "ignored"),
            ("listen_key_expired", "reconnect"),
            ("other", "ignored"),
            ("invalid", "dropped"),
        ] {
            metrics
                .position_stream_events_total
                .with_label_values(&[kind, result]);
        }
        for c in Cause::ALL.into_iter().filter(|c| c.by_exchange()) {
            metrics
                .exchange_closes_total
                .with_label_values(&[c.as_str()]);
        }
        for r in Reason::ALL {
            metrics
                .position_stream_reconnects_total
                .with_label_values(&[r.label()]);
        }
        Stream {
            cfg,
            client,
            writer,
            metrics,
            opened: std::sync::atomic::AtomicU64::new(0),
            reading: std::sync::atomic::AtomicU64::new(0),
            acted: std::sync::Mutex::new(std::collections::VecDeque::new()),
        }
    }

    /// A new socket's id.
    fn next_conn(&self) -> u64 {
        self.opened
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .saturating_add(1)
    }

    fn count(&self, kind: &str, result: &str) {
        self.metrics
            .position_stream_events_total
            .with_label_values(&[kind, result])
            .inc();
    }

    /// Runs until `cancel`: key, connect, reconcile, follow; on any loss,
    /// back off and start again, forever.
    pub async fn run(self, redis: store::Redis, cancel: CancellationToken) {
        let Some(mut con) = redis
            .connect("position stream", Duration::from_secs(10), &cancel)
            .await
        else {
            return;
        };
        // The exchange's clock first: every event time is bounded by it.
        let synced = tokio::select! {
            _ = cancel.cancelled() => return,
            r = self.client.resync("the position stream starts: every event time is bounded by the exchange's clock") => r,
        };
        if let Err(e) = synced {
            warn!("position stream: the exchange's time could not be read ({e}); a signed request's -1021 resyncs it");
        }
        let mut machine = Machine::default();
        let mut key: Option<Secret> = None;
        let mut delay = Duration::ZERO;
        let mut losses = 0u64;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            let reason = self
                .connection(&mut machine, &mut key, &mut con, &cancel)
                .await;
            let Some(reason) = reason else { return };
            self.writer.set_phase(Phase::Connecting);
            self.metrics
                .position_stream_reconnects_total
                .with_label_values(&[reason.0.label()])
                .inc();
            if reason.0.new_key() {
                key = None;
            }
            let actions = machine.on(Input::Lost(reason.0), jitter());
            delay = actions
                .iter()
                .find_map(|a| match a {
                    Action::Reconnect(_, d) => Some(*d),
                    _ => None,
                })
                .unwrap_or(super::machine::BACKOFF_MIN);
            losses += 1;
            warn!(
                "position stream: down ({}: {}); snapshots from positionRisk polling alone; reconnecting in {:.1} s ({losses} since start)",
                reason.0.label(),
                reason.1,
                delay.as_secs_f64()
            );
        }
    }

    /// One connection, from the key to its loss: why it ended (`None`:
    /// cancelled).
    async fn connection(
        &self,
        machine: &mut Machine,
        key: &mut Option<Secret>,
        con: &mut store::Conn,
        cancel: &CancellationToken,
    ) -> Option<(Reason, String)> {
        let k = match key {
            Some(k) => k.clone(),
            None => {
                let got = tokio::select! {
                    _ = cancel.cancelled() => return None,
                    r = self.client.create_listen_key() => r,
                };
                match got {
                    Ok(k) => {
                        *key = Some(k.clone());
                        k
                    }
                    Err(e) => {
                        return Some((Reason::ConnectFailed, format!("listenKey: {e}")));
                    }
                }
            }
        };
        let ws = match self.open(&k, cancel).await? {
            Ok(ws) => ws,
            Err(why) => return Some((Reason::ConnectFailed, why)),
        };
        self.reading
            .store(self.next_conn(), std::sync::atomic::Ordering::Relaxed);
        self.writer.frame_at(store::now_ms());
        // Opened → Reconcile: positionRisk, asked now, while frames are read
        // (and buffered by the machine).
        machine.on(Input::Opened, jitter());
        let asked = Asked {
            clock: self.client.clock(),
            covers: self.writer.allowlist().load(),
        };
        let reconcile: Reconcile<'_> = Box::pin(self.client.signed_get("/fapi/v2/positionRisk"));
        self.follow(ws, &k, Some((reconcile, asked)), machine, con, cancel)
            .await
    }

    /// Opens the socket (capped wait, capped frames). `None`: cancelled.
    async fn open(&self, k: &Secret, cancel: &CancellationToken) -> Option<Result<Socket, String>> {
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_FRAME_BYTES))
            .max_frame_size(Some(MAX_FRAME_BYTES));
        let url = stream_url(&self.cfg.exchange_ws_url, k);
        let connect = tokio_tungstenite::connect_async_with_config(url, Some(config), true);
        tokio::select! {
            _ = cancel.cancelled() => None,
            r = tokio::time::timeout(CONNECT_TIMEOUT, connect) => Some(match r {
                Err(_) => Err(format!("no connection within {} s", CONNECT_TIMEOUT.as_secs())),
                Ok(Err(e)) => Err(redact(&format!("connect: {e}"), k)),
                Ok(Ok((ws, _))) => Ok(ws),
            }),
        }
    }

    /// Follows a connection until it is lost: reads frames, runs the
    /// reconcile when one is given, pings, keeps the key alive, re-stamps
    /// once a second while live, and replaces the socket before 24 h.
    async fn follow(
        &self,
        mut ws: Socket,
        k: &Secret,
        mut reconcile: Option<(Reconcile<'_>, Asked)>,
        machine: &mut Machine,
        con: &mut store::Conn,
        cancel: &CancellationToken,
    ) -> Option<(Reason, String)> {
        let ping_every = self.cfg.stream_ping;
        let deadline = PONG_DEADLINE.min(ping_every);
        let start = |d: Duration| tokio::time::interval_at((Instant::now() + d).into(), d);
        let mut ping = start(ping_every);
        let mut pong_due: Option<Instant> = None;
        let mut keepalive = start(self.cfg.stream_keepalive);
        let mut restamp = start(Duration::from_secs(1));
        restamp.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let replace_after = self.cfg.stream_replace;
        let mut replace_at = Instant::now() + replace_after;
        // The last frame time last re-stamped to: the same again would
        // rewrite the same values.
        let mut restamped = 0u64;
        // When this connection will have been live long enough for the
        // backoff to start over.
        let mut steady_at: Option<Instant> = None;
        let reason = loop {
            let due = pong_due.unwrap_or(replace_at);
            tokio::select! {
                _ = cancel.cancelled() => {
                    let _ = ws.close(None).await;
                    return None;
                }
                msg = ws.next() => match msg {
                    None => break (Reason::Closed, "the exchange closed the connection".into()),
                    Some(Err(e)) => break (Reason::Closed, redact(&e.to_string(), k)),
                    Some(Ok(m)) => {
                        self.writer.frame_at(store::now_ms());
                        pong_due = None;
                        if let Err(r) = self.frame(m, machine, con).await {
                            break r;
                        }
                    }
                },
                r = async { match reconcile.as_mut() { Some((f, _)) => f.await, None => std::future::pending().await } }, if reconcile.is_some() => {
                    let Some((_, asked)) = reconcile.take() else { continue };
                    match r {
                        Ok(v) => {
                            if let Err(r) = self.reconciled(&v, &asked, machine, con).await {
                                break r;
                            }
                            if machine.phase() == Phase::Live {
                                steady_at = Some(Instant::now() + super::STEADY_AFTER);
                            }
                        }
                        Err(e) => break (Reason::ReconcileFailed, format!("positionRisk: {e}")),
                    }
                }
                _ = ping.tick() => {
                    if let Err(e) = ws.send(Message::Ping(Vec::new().into())).await {
                        break (Reason::Closed, redact(&e.to_string(), k));
                    }
                    if pong_due.is_none() {
                        pong_due = Some(Instant::now() + deadline);
                    }
                }
                _ = tokio::time::sleep_until(due.into()), if pong_due.is_some() => {
                    break (Reason::PingTimeout, format!("no frame within {:.1} s of a ping", deadline.as_secs_f64()));
                }
                _ = keepalive.tick() => {
                    match self.client.keep_listen_key_alive().await {
                        Ok(()) => {}
                        Err(ExchangeError::Api { code: -1125, .. }) => {
                            break (Reason::KeyExpired, "keepalive: -1125, the listenKey does not exist".into());
                        }
                        Err(e) => break (Reason::KeyExpired, format!("keepalive failed: {e}")),
                    }
                }
                _ = restamp.tick() => {
                    restamped = self.restamp(machine, con, restamped).await;
                    self.writer.due_closes(con).await;
                }
                _ = async { match steady_at { Some(t) => tokio::time::sleep_until(t.into()).await, None => std::future::pending().await } }, if steady_at.is_some() => {
                    steady_at = None;
                    machine.on(Input::Steady, jitter());
                }
                _ = tokio::time::sleep_until(replace_at.into()), if pong_due.is_none() && reconcile.is_none() => {
                    match self.replace(k, &mut ws, machine, con, cancel).await? {
                        Ok(opened) => {
                            self.metrics
                                .position_stream_reconnects_total
                                .with_label_values(&[Reason::Replaced.label()])
                                .inc();
                            info!("position stream: connection replaced ahead of the exchange's 24 h cut; still live");
                            // The new connection's age counts from its
                            // open, not from the overlap's end.
                            replace_at = opened + replace_after;
                            ping.reset();
                        }
                        Err(why) => break (Reason::Replaced, why),
                    }
                }
            }
        };
        let _ = ws.close(None).await;
        Some(reason)
    }

    /// Handles one message. `Err`: the connection must end, and why.
    async fn frame(
        &self,
        m: Message,
        machine: &mut Machine,
        con: &mut store::Conn,
    ) -> Result<(), (Reason, String)> {
        let text = match m {
            Message::Text(t) => t,
            Message::Binary(_) => {
                self.count("invalid", "dropped");
                return Err((Reason::InvalidFrame, "a binary frame".into()));
            }
            Message::Close(_) => {
                return Err((Reason::Closed, "the exchange sent a close frame".into()))
            }
            // Pings are answered by the socket itself; pongs only prove life.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => return Ok(()),
        };
        let frame = parse_frame(text.as_str(), self.client.clock().limit_ms());
        match frame {
            Frame::Order(u) => {
                self.order_update(&u, con).await;
                Ok(())
            }
            Frame::Account(mut ev) => {
                // Only allowlisted symbols are kept, buffered or not: a feed
                // naming 300,000 others costs nothing (SPEC §16).
                let allowed = self.writer.allowlist().load();
                let named = ev.legs.len();
                ev.legs.retain(|l| allowed.symbols.contains(&l.symbol));
                if named > 0 && ev.legs.is_empty() {
                    self.count("account_update", "ignored");
                    return Ok(());
                }
                let phase = machine.phase();
                for a in machine.on(Input::Event(ev), jitter()) {
                    match a {
                        Action::Apply(evs) => self.apply(&evs, con).await,
                        Action::Hold if phase == Phase::Reconciling => {
                            self.count("account_update", "buffered");
                        }
                        Action::Hold => self.count("account_update", "ignored"),
                        Action::Reconnect(r, _) => {
                            return Err((
                                r,
                                "more events than are buffered while reconciling".into(),
                            ))
                        }
                        Action::Reconcile | Action::GoLive => {}
                    }
                }
                Ok(())
            }
            Frame::KeyExpired => {
                self.count("listen_key_expired", "reconnect");
                Err((Reason::KeyExpired, "listenKeyExpired event".into()))
            }
            Frame::Other => {
                self.count("other", "ignored");
                Ok(())
            }
            Frame::Invalid(why) => {
                self.count("invalid", "dropped");
                Err((Reason::InvalidFrame, why))
            }
        }
    }

    /// An `ORDER_TRADE_UPDATE` of an allowlisted symbol: a fill is counted
    /// and said (a liquidation or an ADL at ERROR: the exchange closed a
    /// position on its own); anything else is counted as ignored. The
    /// position itself comes from the `ACCOUNT_UPDATE` of the same fill.
    async fn order_update(&self, u: &OrderUpdate, con: &mut store::Conn) {
        let allowed = self.writer.allowlist().load();
        if !u.is_fill() || !allowed.symbols.contains(&u.symbol) {
            self.count("order_trade_update", "ignored");
            return;
        }
        self.count("order_trade_update", "fill");
        if self.cfg.position_events && !self.cfg.dry_run {
            if let Err(e) = write_fill(con, u).await {
                warn!(
                    "position stream: writing the fill of {} to {} failed: {e}",
                    u.symbol,
                    crate::redis::keys::POSITIONS_STREAM
                );
            }
        }
        self.writer.fill_closes(con, u).await;
        let line = format!(
            "position stream: {} fill of {} {}: {} {} at {} (order {}, {}, client id {:?}, realized {})",
            u.cause.as_str(),
            u.symbol,
            u.leg.as_str(),
            u.side,
            crate::domain::dec_str(u.last_qty),
            u.avg_price,
            u.order_id,
            u.order_type,
            crate::text::clip(&u.client_order_id),
            u.realized_pnl
        );
        if u.cause.by_exchange() {
            self.metrics
                .exchange_closes_total
                .with_label_values(&[u.cause.as_str()])
                .inc();
        }
        match u.cause {
            Cause::Liquidation | Cause::Adl => {
                error!("{line}");
                self.on_liquidation(u, con).await;
            }
            _ => info!("{line}"),
        }
    }

    /// A liquidation or ADL: the symbol's state is set to
    /// `P33_ON_LIQUIDATION` through the control path, once per order, never
    /// loosened (SPEC §19): no new position opens on it until an operator
    /// has looked and resumed; closes go on.
    async fn on_liquidation(&self, u: &OrderUpdate, con: &mut store::Conn) {
        let Some(to) = self.cfg.on_liquidation else {
            return;
        };
        if self.cfg.dry_run {
            return;
        }
        {
            let mut acted = self.acted.lock().unwrap_or_else(|p| p.into_inner());
            if acted.contains(&u.order_id) {
                return;
            }
            if acted.len() >= ORDERS_REMEMBERED {
                acted.pop_front();
            }
            acted.push_back(u.order_id);
        }
        let reason = format!("liquidation {}", u.order_id);
        match crate::operator::control::tighten_symbol(
            con,
            &u.symbol,
            to,
            &reason,
            crate::operator::control::AUTO_ACTOR,
            self.cfg.default_trading_state,
        )
        .await
        {
            Ok(Some(_)) => warn!(
                "position stream: {} of {}: its trading state is now {} until an operator resumes it (reason: {reason})",
                u.cause.as_str(),
                u.symbol,
                to.as_str()
            ),
            Ok(None) => info!(
                "position stream: {} of {}: its trading state was already {} or stricter",
                u.cause.as_str(),
                u.symbol,
                to.as_str()
            ),
            Err(e) => error!(
                "position stream: {} of {}: setting its trading state to {} failed: {e}",
                u.cause.as_str(),
                u.symbol,
                to.as_str()
            ),
        }
    }

    /// Applies events to the book and writes the symbols they changed at
    /// once, with `feed=stream`.
    async fn apply(&self, evs: &[AccountUpdate], con: &mut store::Conn) {
        let mut changed = Vec::new();
        let clock = self.client.clock();
        let allowed = self.writer.allowlist().load();
        let conn = self.reading.load(std::sync::atomic::Ordering::Relaxed);
        {
            let mut book = self.writer.book();
            for ev in evs {
                let a = book.apply_event(ev, clock, &allowed.symbols, conn);
                let result = if !a.symbols.is_empty() {
                    "applied"
                } else if a.stale > 0 {
                    "stale"
                } else if a.dropped > 0 {
                    "ignored"
                } else {
                    "applied"
                };
                self.count("account_update", result);
                changed.extend(a.symbols);
            }
        }
        changed.sort();
        changed.dedup();
        if changed.is_empty() {
            return;
        }
        match self.writer.write(con, Some(&changed), Stamp::Now).await {
            Ok(0) => {}
            Ok(_) => {
                let written = store::now_ms() as i64;
                let offset = self.client.offset_ms();
                for ev in evs {
                    let sent_local = i64::try_from(ev.event_ms)
                        .unwrap_or(i64::MAX)
                        .saturating_sub(offset);
                    let secs = written.saturating_sub(sent_local) as f64 / 1000.0;
                    self.metrics
                        .position_update_latency_seconds
                        .observe(secs.max(0.0));
                }
            }
            Err(e) => warn!(
                "position stream: writing {} snapshot(s) failed: {e}; the next write or poll repairs them",
                changed.len()
            ),
        }
    }

    /// The reconcile's reply: applied to the book, written, then the
    /// buffered events, then live.
    async fn reconciled(
        &self,
        v: &Value,
        asked: &Asked,
        machine: &mut Machine,
        con: &mut store::Conn,
    ) -> Result<(), (Reason, String)> {
        let clock = self.client.clock();
        let legs = parse_rest_legs(v, asked.clock.exchange_ms, clock.limit_ms())
            .map_err(|e| (Reason::ReconcileFailed, format!("positionRisk: {e}")))?;
        let reply = Reply {
            legs: &legs,
            asked_ms: asked.clock.exchange_ms,
            asked_local_ms: asked.clock.local_ms,
            covers: &asked.covers.symbols,
        };
        let now_allowed = self.writer.allowlist().load();
        let corrections = self
            .writer
            .book()
            .apply_rest(reply, clock, false, &now_allowed.symbols);
        super::report_corrections(&self.metrics, &corrections);
        if let Err(e) = self.writer.write(con, None, Stamp::Now).await {
            warn!("position stream: writing the reconciled snapshots failed: {e}");
        }
        let mut buffered = 0usize;
        for a in machine.on(Input::Reconciled, jitter()) {
            match a {
                Action::Apply(evs) => {
                    buffered = evs.len();
                    self.apply(&evs, con).await;
                }
                Action::GoLive => {
                    self.writer.set_phase(Phase::Live);
                    info!(
                        "position stream: live (reconciled with positionRisk, {buffered} buffered event(s) applied)"
                    );
                }
                Action::Reconcile | Action::Hold | Action::Reconnect(..) => {}
            }
        }
        Ok(())
    }

    /// While live and a frame came within 40 s (and since `prev`, the last
    /// frame time re-stamped to): every allowlisted snapshot re-stamped to
    /// the last frame's time (SPEC §16). Returns the time re-stamped to.
    async fn restamp(&self, machine: &Machine, con: &mut store::Conn, prev: u64) -> u64 {
        let last = self.writer.last_frame_ms();
        if machine.phase() != Phase::Live
            || last == prev
            || store::now_ms().saturating_sub(last) > RESTAMP_MAX_FRAME_AGE_MS
        {
            return prev;
        }
        match self.writer.write(con, None, Stamp::LastFrame(last)).await {
            Ok(_) => last,
            Err(e) => {
                warn!("position stream: re-stamping snapshots failed: {e}");
                prev
            }
        }
    }

    /// Opens a second connection on the same key and reads the old one
    /// [`REPLACE_OVERLAP`] longer, so no event falls between them (an
    /// event seen on both is stale the second time); when the new one
    /// opened. `Err`: the new one
    /// could not be opened; the old is given up (a reconnect reconciles).
    /// An invalid frame on the old one during the overlap is not applied
    /// (events are whole or nothing) and ends the overlap.
    async fn replace(
        &self,
        k: &Secret,
        ws: &mut Socket,
        machine: &mut Machine,
        con: &mut store::Conn,
        cancel: &CancellationToken,
    ) -> Option<Result<Instant, String>> {
        let fresh = match self.open(k, cancel).await? {
            Ok(f) => f,
            Err(why) => return Some(Err(format!("replacement: {why}"))),
        };
        // The old socket's frames are applied through the overlap as its
        // own; the new one's (the same events again, then later ones) after.
        let fresh_id = self.next_conn();
        let opened = Instant::now();
        let mut old = std::mem::replace(ws, fresh);
        let until = Instant::now() + REPLACE_OVERLAP;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return None,
                _ = tokio::time::sleep_until(until.into()) => break,
                m = old.next() => match m {
                    // Whatever ends the old one now (its close, a bad
                    // frame) ends only the overlap: the new one follows.
                    Some(Ok(m)) => {
                        if self.frame(m, machine, con).await.is_err() {
                            break;
                        }
                    }
                    _ => break,
                },
            }
        }
        let _ = old.close(None).await;
        self.reading
            .store(fresh_id, std::sync::atomic::Ordering::Relaxed);
        Some(Ok(opened))
    }
}

/// When the reconcile's request was sent, and the allowlist then (what its
/// reply covers).
struct Asked {
    clock: Clock,
    covers: Arc<crate::allowlist::Allowlist>,
}

/// The reconcile's request, run while frames are read.
type Reconcile<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Value, ExchangeError>> + Send + 'a>>;

#[cfg(test)]
mod tests;
