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
use crate::domain::parse_amount;
use crate::keys::valid_symbol;
use crate::metrics::Metrics;
use crate::store;

use super::book::{AccountUpdate, Clock, EventLeg, Reply};
use super::machine::{Action, Input, Machine, Phase, Reason};
use super::orders::{parse_order_update, Cause, OrderUpdate};
use super::positions::{parse_rest_legs, Leg};
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

/// One frame, read.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// An `ACCOUNT_UPDATE` whose every position entry is within bounds.
    Account(AccountUpdate),
    /// An `ORDER_TRADE_UPDATE` within bounds (SPEC §19).
    Order(Box<OrderUpdate>),
    /// `listenKeyExpired`.
    KeyExpired,
    /// Any other JSON object (another event, a reply): ignored.
    Other,
    /// Not JSON, not an object, or an `ACCOUNT_UPDATE` or
    /// `ORDER_TRADE_UPDATE` with anything out of bounds: why, for the WARN
    /// (raw values cut and escaped).
    Invalid(String),
}

impl Frame {
    /// The `type` label of `p33_position_stream_events_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Account(_) => "account_update",
            Frame::Order(_) => "order_trade_update",
            Frame::KeyExpired => "listen_key_expired",
            Frame::Other => "other",
            Frame::Invalid(_) => "invalid",
        }
    }
}

fn clip(s: &str) -> String {
    crate::text::clip(s).into_owned()
}

/// A text field of a position entry, cut to 64 characters (a number is
/// taken as its text; absent is "0").
fn text_field(e: &Value, k: &str) -> Result<String, String> {
    match e.get(k) {
        Some(Value::String(s)) => Ok(clip(s)),
        Some(Value::Number(n)) => Ok(n.to_string()),
        None | Some(Value::Null) => Ok("0".into()),
        Some(_) => Err(format!("{k} is not a string")),
    }
}

fn event_leg(e: &Value) -> Result<EventLeg, String> {
    let symbol = match e.get("s") {
        Some(Value::String(s)) if valid_symbol(s) => s.clone(),
        Some(Value::String(s)) => return Err(format!("symbol {:?} is not a symbol", clip(s))),
        _ => return Err("a position entry without a symbol".into()),
    };
    let amt = match e.get("pa") {
        Some(Value::String(s)) => parse_amount(s)
            .ok_or_else(|| format!("{symbol}: pa {:?} is not a number within ±1e12", clip(s)))?,
        _ => return Err(format!("{symbol}: pa is not a string")),
    };
    let leg = match e.get("ps") {
        None => Leg::Both,
        Some(Value::String(s)) => Leg::parse(Some(s))
            .ok_or_else(|| format!("{symbol}: ps {:?} is not BOTH, LONG or SHORT", clip(s)))?,
        Some(_) => return Err(format!("{symbol}: ps is not a string")),
    };
    Ok(EventLeg {
        entry_price: text_field(e, "ep").map_err(|w| format!("{symbol}: {w}"))?,
        unrealized_pnl: text_field(e, "up").map_err(|w| format!("{symbol}: {w}"))?,
        symbol,
        leg,
        amt,
    })
}

/// Reads one text frame. An `ACCOUNT_UPDATE` is taken whole or not at all:
/// one entry out of bounds makes the frame invalid (never half-applied).
/// `limit_ms` is the latest exchange time within bounds
/// ([`super::Clock::limit_ms`]): an `E` or `T` beyond it makes the frame
/// invalid (SPEC §16), so no time ahead of the exchange's clock can pin a
/// position.
pub fn parse_frame(text: &str, limit_ms: u64) -> Frame {
    let v: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return Frame::Invalid(format!("not JSON ({e})")),
    };
    let Some(obj) = v.as_object() else {
        return Frame::Invalid("not a JSON object".into());
    };
    let name = match obj.get("e").and_then(Value::as_str) {
        Some(n @ ("ACCOUNT_UPDATE" | "ORDER_TRADE_UPDATE")) => n,
        Some("listenKeyExpired") => return Frame::KeyExpired,
        _ => return Frame::Other,
    };
    let time = |k: &str| obj.get(k).and_then(Value::as_u64);
    let (Some(event_ms), Some(tx_ms)) = (time("E"), time("T")) else {
        return Frame::Invalid(format!("{name} without numeric E and T"));
    };
    if tx_ms > limit_ms || event_ms > limit_ms {
        return Frame::Invalid(format!(
            "{name} E {event_ms} / T {tx_ms} more than {} s ahead of the exchange's clock ({})",
            super::MAX_AHEAD_MS / 1000,
            limit_ms.saturating_sub(super::MAX_AHEAD_MS)
        ));
    }
    if name == "ORDER_TRADE_UPDATE" {
        return match parse_order_update(obj, event_ms, tx_ms) {
            Ok(u) => Frame::Order(Box::new(u)),
            Err(why) => Frame::Invalid(format!("ORDER_TRADE_UPDATE {why}")),
        };
    }
    let Some(a) = obj.get("a").and_then(Value::as_object) else {
        return Frame::Invalid("ACCOUNT_UPDATE without an object a".into());
    };
    let entries = match a.get("P") {
        None => &Vec::new(),
        Some(Value::Array(p)) => p,
        Some(_) => return Frame::Invalid("ACCOUNT_UPDATE a.P is not a list".into()),
    };
    let mut legs = Vec::with_capacity(entries.len());
    for e in entries {
        match event_leg(e) {
            Ok(l) => legs.push(l),
            Err(why) => return Frame::Invalid(format!("ACCOUNT_UPDATE: {why}")),
        }
    }
    // Why: a.m in lower case, when it is a word (SPEC §19).
    let reason = match a.get("m").and_then(Value::as_str) {
        Some(m)
            if !m.is_empty()
                && m.len() <= 32
                && m.bytes().all(|b| b.is_ascii_alphabetic() || b == b'_') =>
        {
            m.to_ascii_lowercase()
        }
        _ => "other".to_string(),
    };
    Frame::Account(AccountUpdate {
        event_ms,
        tx_ms,
        legs,
        reason,
    })
}

/// A fill's `kind=fill` entry on the positions stream (SPEC §19).
async fn write_fill(con: &mut store::Conn, u: &OrderUpdate) -> redis::RedisResult<()> {
    redis::cmd("XADD")
        .arg(crate::keys::POSITIONS_STREAM)
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
                    crate::keys::POSITIONS_STREAM
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
        match crate::control::tighten_symbol(
            con,
            &u.symbol,
            to,
            &reason,
            crate::control::AUTO_ACTOR,
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
mod tests {
    use super::*;

    #[test]
    fn frames() {
        let ok = r#"{"e":"ACCOUNT_UPDATE","E":1700000000100,"T":1700000000099,"a":{"m":"ORDER","B":[],"P":[
            {"s":"BTCUSDT","pa":"0.5","ep":"60000","up":"1.2","ps":"BOTH"},
            {"s":"ETHUSDT","pa":"-2","ep":"3000","up":"0","ps":"SHORT"}]}}"#;
        let Frame::Account(a) = parse_frame(ok, u64::MAX) else {
            panic!("{:?}", parse_frame(ok, u64::MAX))
        };
        assert_eq!(
            (a.event_ms, a.tx_ms, a.legs.len()),
            (1700000000100, 1700000000099, 2)
        );
        assert_eq!(
            (a.legs[1].leg, a.legs[1].amt.to_string()),
            (Leg::Short, "-2".into())
        );
        let cases: &[(&str, &str)] = &[
            (
                r#"{"e":"listenKeyExpired","E":1,"listenKey":"x"}"#,
                "listen_key_expired",
            ),
            (r#"{"e":"ORDER_TRADE_UPDATE","E":1}"#, "invalid"),
            (r#"{"e":"ORDER_TRADE_UPDATE","E":1,"T":1}"#, "invalid"),
            (
                r#"{"e":"ORDER_TRADE_UPDATE","E":1,"T":1,"o":{"s":"BTCUSDT","c":"x","S":"SELL","o":"MARKET","x":"TRADE","i":1,"l":0.5,"ap":"1"}}"#,
                "invalid",
            ),
            (
                r#"{"e":"ORDER_TRADE_UPDATE","E":1,"T":1,"o":{"s":"BTCUSDT","c":"x","S":"SELL","o":"MARKET","x":"TRADE","i":1,"l":"0.5","ap":"1"}}"#,
                "order_trade_update",
            ),
            (r#"{"result":null,"id":1}"#, "other"),
            (
                r#"{"e":"ACCOUNT_UPDATE","E":1,"T":1,"a":{"m":"DEPOSIT","B":[]}}"#,
                "account_update",
            ),
            ("{not json", "invalid"),
            ("[1,2]", "invalid"),
            (r#"{"e":"ACCOUNT_UPDATE","E":1,"a":{"P":[]}}"#, "invalid"),
            (
                r#"{"e":"ACCOUNT_UPDATE","E":1,"T":-5,"a":{"P":[]}}"#,
                "invalid",
            ),
            (
                r#"{"e":"ACCOUNT_UPDATE","E":1,"T":1,"a":{"P":{}}}"#,
                "invalid",
            ),
            (
                r#"{"e":"ACCOUNT_UPDATE","E":1,"T":1,"a":{"P":[{"s":"BTCUSDT","pa":"1e13","ps":"BOTH"}]}}"#,
                "invalid",
            ),
            (
                r#"{"e":"ACCOUNT_UPDATE","E":1,"T":1,"a":{"P":[{"s":"BTCUSDT","pa":1,"ps":"BOTH"}]}}"#,
                "invalid",
            ),
            (
                r#"{"e":"ACCOUNT_UPDATE","E":1,"T":1,"a":{"P":[{"s":"btc
usdt","pa":"1"}]}}"#,
                "invalid",
            ),
            (
                r#"{"e":"ACCOUNT_UPDATE","E":1,"T":1,"a":{"P":[{"s":"BTCUSDT","pa":"1","ps":"UP"}]}}"#,
                "invalid",
            ),
        ];
        for (text, kind) in cases {
            assert_eq!(parse_frame(text, u64::MAX).kind(), *kind, "{text}");
        }
        // One bad entry spoils the frame: never half-applied.
        let half = r#"{"e":"ACCOUNT_UPDATE","E":1,"T":1,"a":{"P":[{"s":"BTCUSDT","pa":"1"},{"s":"ETHUSDT","pa":"NaN"}]}}"#;
        let Frame::Invalid(why) = parse_frame(half, u64::MAX) else {
            panic!()
        };
        assert!(why.contains("ETHUSDT"), "{why}");
        // A time beyond the exchange's clock (year 3000, u64::MAX, or just
        // past the limit) makes the frame invalid; at the limit it is read.
        for (e, t, kind) in [
            (1000u64, 32_503_680_000_000u64, "invalid"),
            (1000, u64::MAX, "invalid"),
            (1000, 10_001, "invalid"),
            (10_001, 1000, "invalid"),
            (10_000, 10_000, "account_update"),
        ] {
            let f = format!(r#"{{"e":"ACCOUNT_UPDATE","E":{e},"T":{t},"a":{{"P":[]}}}}"#);
            assert_eq!(parse_frame(&f, 10_000).kind(), kind, "{f}");
        }
    }

    #[test]
    fn the_key_is_redacted_and_the_route_is_private() {
        let k = Secret::new("abcDEF123");
        assert_eq!(
            stream_url("wss://fstream.binance.com", &k),
            "wss://fstream.binance.com/private/ws?listenKey=abcDEF123"
        );
        assert_eq!(
            redact(
                "URL error: wss://h/private/ws?listenKey=abcDEF123 refused",
                &k
            ),
            "URL error: wss://h/private/ws?listenKey=[listenKey] refused"
        );
    }
}
