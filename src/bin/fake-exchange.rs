//! `fake-exchange`: a local stand-in for the Binance USDⓈ-M futures REST API,
//! for the integration tests and the demo (the real API is not reachable
//! here, and a fresh machine has no testnet keys).
//!
//! Serves `GET /fapi/v1/time`, `GET /fapi/v1/exchangeInfo` and the signed
//! `GET /fapi/v2/positionRisk` with the real API's shapes. Signed requests are
//! checked like the real API does: `X-MBX-APIKEY` (-2015), the HMAC-SHA256
//! `signature` (-1022) and `timestamp` within `recvWindow` (-1021).
//!
//! The user data stream (SPEC §16) on Binance's routes: `POST`/`PUT`
//! `/fapi/v1/listenKey` (keyed; `PUT` of a key that is gone: -1125; one
//! active key, shared by every client, as on Binance), and the WebSocket
//! `GET /private/ws?listenKey=<key>`, which pushes an `ACCOUNT_UPDATE` for
//! every position change and answers pings.
//!
//! Control endpoints (JSON bodies):
//! - `POST /control/positions[?swallow=1]` — a list of positionRisk rows
//!   (`symbol`, `positionAmt`, optional `positionSide`, `entryPrice`, …);
//!   each changed or removed row is pushed in one `ACCOUNT_UPDATE` to every
//!   stream connection, unless `swallow=1` (the event is lost: only REST
//!   knows);
//! - `POST /control/stream` — `{"drop": true}` closes every connection
//!   without a close frame, `{"expire_key": true}` ends the key (and pushes
//!   `listenKeyExpired`), `{"forget_key": true}` ends it silently (the next
//!   `PUT` gets -1125), `{"stall": true}` makes every open connection go
//!   silent (no frames, no pongs), `{"malformed": true}` pushes a frame that
//!   is not JSON, `{"raw": "…"}` pushes that text, `{"old_event": {"symbol",
//!   "positionAmt", "positionSide"?, "age_ms"}}` pushes an `ACCOUNT_UPDATE`
//!   whose `T` is `age_ms` older than the last one (out of order),
//!   `{"order": {"symbol", "side", "qty", "price", "amount_after", "cause":
//!   "order"|"stop"|"take_profit"|"liquidation"|"adl"|"settlement",
//!   "order_first"?, "order_id"?, "realized"?, "client_id"?, "positionSide"?}}`
//!   pushes an `ORDER_TRADE_UPDATE` with Binance's markers for that cause
//!   and the `ACCOUNT_UPDATE` of the position after it (that one first,
//!   unless `order_first`; the entry price kept while open, 0 when flat),
//!   and leaves the position there,
//!   `{"fills": {"symbol", "amounts": ["0.02", "0.04", "1"]}}` pushes one
//!   `ACCOUNT_UPDATE` per amount, all with one `T` (an order filled in
//!   parts) and leaves the position at the last,
//!   `{"max_age_ms": N}` cuts connections opened from now on at that age
//!   (Binance's 24 h cut, shortened);
//! - `POST /control/steps` — `{"SYMBOL": "stepSize", …}` for exchangeInfo;
//! - `POST /control/mode` — `{"delay_ms", "fail_5xx", "rate_limit_s",
//!   "retry_after", "fail_1021_once", "time_offset_ms", "pad_bytes"}` (fields
//!   absent are left as they are): `retry_after` is the raw `Retry-After`
//!   header of the next 429 (default: `rate_limit_s`), `pad_bytes` pads
//!   every positionRisk body with that many blanks (a huge reply);
//! - `GET /control/stats` — request counts (listenKey calls as
//!   `POST /fapi/v1/listenKey` etc.), positionRisk request times, stream
//!   connections opened (`ws_opened`) and open now (`ws_open`).
//!
//! Usage: `fake-exchange [--addr 127.0.0.1] [--port 0] [--api-key K] [--api-secret S]`
//! (or `FAKE_API_KEY` / `FAKE_API_SECRET`). Prints
//! `fake-exchange listening on http://ADDR:PORT` once bound.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use position_state_brain::exchange::sign;
use position_state_brain::redis::store::now_ms;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;

/// What a stream connection is told to do.
enum Push {
    Text(String),
    Drop,
    Stall,
}

#[derive(Default)]
struct State {
    key: String,
    secret: String,
    positions: Vec<Value>,
    steps: HashMap<String, String>,
    delay_ms: u64,
    fail_5xx: bool,
    rate_limit_s: u64,
    retry_after: Option<String>,
    pad_bytes: usize,
    fail_1021_once: bool,
    time_offset_ms: i64,
    counts: HashMap<String, u64>,
    position_risk_ms: Vec<u64>,
    /// The account's one active listenKey.
    listen_key: Option<String>,
    key_seq: u64,
    /// Open stream connections: their key and their mailbox.
    conns: Vec<(String, mpsc::UnboundedSender<Push>)>,
    ws_opened: u64,
    /// Connections are cut at this age (Binance's 24 h cut, shortened).
    max_age_ms: u64,
    /// The last event's `T`, server clock.
    last_t: i64,
    /// The last order id handed out (`ORDER_TRADE_UPDATE`'s `i`).
    order_id: u64,
}

impl State {
    fn server_ms(&self) -> i64 {
        now_ms() as i64 + self.time_offset_ms
    }

    /// A fresh transaction time: the server clock, strictly after the last.
    fn next_t(&mut self) -> i64 {
        self.last_t = self.server_ms().max(self.last_t + 1);
        self.last_t
    }

    /// Sends `text` to every open connection (closed ones are forgotten).
    fn push(&mut self, text: &str) {
        self.conns
            .retain(|(_, tx)| tx.send(Push::Text(text.to_string())).is_ok());
    }
}

/// One position entry of an `ACCOUNT_UPDATE` from a positionRisk row.
fn event_entry(row: &Value) -> Value {
    let f = |k: &str, d: &str| row.get(k).cloned().unwrap_or_else(|| json!(d));
    json!({
        "s": f("symbol", ""),
        "pa": f("positionAmt", "0"),
        "ep": f("entryPrice", "0.0"),
        "bep": "0",
        "cr": "0",
        "up": f("unRealizedProfit", "0.0"),
        "mt": f("marginType", "cross"),
        "iw": "0",
        "ps": f("positionSide", "BOTH"),
    })
}

fn account_update(t: i64, entries: Vec<Value>) -> String {
    json!({"e": "ACCOUNT_UPDATE", "E": t, "T": t, "a": {"m": "ORDER", "B": [], "P": entries}})
        .to_string()
}

fn row_id(r: &Value) -> (String, String) {
    let g = |k: &str, d: &str| r.get(k).and_then(Value::as_str).unwrap_or(d).to_string();
    (g("symbol", ""), g("positionSide", "BOTH"))
}

type Shared = Arc<Mutex<State>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn api_error(status: StatusCode, code: i64, msg: &str) -> Response<Full<Bytes>> {
    reply(status, json!({"code": code, "msg": msg}))
}

fn count(st: &mut State, what: &str) {
    *st.counts.entry(what.to_string()).or_default() += 1;
}

/// Checks key, signature and timestamp like the real API.
fn check_signed(
    st: &mut State,
    query: &str,
    key: Option<&str>,
) -> Result<(), (StatusCode, i64, &'static str)> {
    if key != Some(st.key.as_str()) {
        count(st, "rejected_api_key");
        return Err((
            StatusCode::UNAUTHORIZED,
            -2015,
            "Invalid API-key, IP, or permissions for action.",
        ));
    }
    let Some((payload, sig)) = query.rsplit_once("&signature=") else {
        count(st, "rejected_signature");
        return Err((
            StatusCode::BAD_REQUEST,
            -1102,
            "Mandatory parameter 'signature' was not sent.",
        ));
    };
    if sign(&st.secret, payload) != sig {
        count(st, "rejected_signature");
        return Err((
            StatusCode::BAD_REQUEST,
            -1022,
            "Signature for this request is not valid.",
        ));
    }
    let param = |name: &str| {
        payload
            .split('&')
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse::<i64>().ok())
    };
    let server = now_ms() as i64 + st.time_offset_ms;
    let window = param("recvWindow").unwrap_or(5000);
    let ts = param("timestamp").unwrap_or(0);
    if st.fail_1021_once || ts > server + 1000 || server - ts > window {
        st.fail_1021_once = false;
        count(st, "rejected_timestamp");
        return Err((
            StatusCode::BAD_REQUEST,
            -1021,
            "Timestamp for this request is outside of the recvWindow.",
        ));
    }
    Ok(())
}

/// `GET /private/ws?listenKey=…`: the user data stream.
fn ws_upgrade(st: &Shared, mut req: Request<Incoming>) -> Response<Full<Bytes>> {
    let query = req.uri().query().unwrap_or("").to_string();
    let given = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("listenKey="))
        .unwrap_or("")
        .to_string();
    let mut s = lock(st);
    count(&mut s, "/private/ws");
    if s.listen_key.as_deref() != Some(given.as_str()) || given.is_empty() {
        return api_error(
            StatusCode::BAD_REQUEST,
            -1125,
            "This listenKey does not exist.",
        );
    }
    let Some(accept) = req
        .headers()
        .get("Sec-WebSocket-Key")
        .map(|k| derive_accept_key(k.as_bytes()))
    else {
        return api_error(StatusCode::BAD_REQUEST, -1000, "not a WebSocket request");
    };
    let (tx, rx) = mpsc::unbounded_channel();
    s.conns.push((given, tx));
    s.ws_opened += 1;
    let cut = (s.max_age_ms > 0).then(|| Duration::from_millis(s.max_age_ms));
    drop(s);
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(up) = on_upgrade.await {
            let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                TokioIo::new(up),
                Role::Server,
                None,
            )
            .await;
            serve_ws(ws, rx, cut).await;
        }
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("Upgrade"),
    );
    h.insert(
        hyper::header::UPGRADE,
        hyper::header::HeaderValue::from_static("websocket"),
    );
    if let Ok(v) = accept.parse() {
        h.insert("Sec-WebSocket-Accept", v);
    }
    r
}

/// One stream connection: pushes what it is told, answers pings, until
/// told to drop (or to stall: then nothing at all, like a dead peer), or
/// until its age reaches `cut`.
async fn serve_ws<S>(
    ws: tokio_tungstenite::WebSocketStream<S>,
    mut rx: mpsc::UnboundedReceiver<Push>,
    cut: Option<Duration>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut tx, mut frames) = ws.split();
    let mut stalled = false;
    let cut_at = tokio::time::Instant::now() + cut.unwrap_or(Duration::from_secs(86_400));
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(cut_at) => {
                let _ = tx.send(Message::Close(None)).await;
                return;
            }
            p = rx.recv() => match p {
                Some(Push::Text(t)) if !stalled => {
                    if tx.send(Message::Text(t.into())).await.is_err() {
                        return;
                    }
                }
                Some(Push::Text(_)) => {}
                Some(Push::Stall) => stalled = true,
                Some(Push::Drop) | None => return,
            },
            m = frames.next(), if !stalled => match m {
                Some(Ok(Message::Ping(p))) => {
                    if tx.send(Message::Pong(p)).await.is_err() {
                        return;
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
        }
    }
}

async fn handle(st: Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() == "/private/ws" {
        return ws_upgrade(&st, req);
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let key = req
        .headers()
        .get("X-MBX-APIKEY")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    if path.starts_with("/control/") {
        return control(&st, &method, &path, &query, &body);
    }
    if path == "/fapi/v1/listenKey" {
        return listen_key(&st, &method, key.as_deref());
    }
    // positionRisk answers with the positions as they were when the request
    // arrived: `delay_ms` is then the reply's way back, during which the
    // account may move on (and its events overtake the reply).
    let (delay, fail, rate, rows) = {
        let mut s = lock(&st);
        count(&mut s, &path);
        if path == "/fapi/v2/positionRisk" {
            s.position_risk_ms.push(now_ms());
        }
        let rows = s.positions.clone();
        let rate = std::mem::take(&mut s.rate_limit_s);
        let header = if rate > 0 {
            s.retry_after.take().unwrap_or_else(|| rate.to_string())
        } else {
            String::new()
        };
        (s.delay_ms, s.fail_5xx, (rate, header), rows)
    };
    let (rate, retry_after) = rate;
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if rate > 0 {
        let mut r = api_error(StatusCode::TOO_MANY_REQUESTS, -1003, "Too many requests.");
        if let Ok(v) = retry_after.parse() {
            r.headers_mut().insert("Retry-After", v);
        }
        return r;
    }
    if fail {
        return api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            -1001,
            "Internal error; unable to process your request.",
        );
    }
    let mut s = lock(&st);
    match (method, path.as_str()) {
        (Method::GET, "/fapi/v1/time") => reply(
            StatusCode::OK,
            json!({"serverTime": now_ms() as i64 + s.time_offset_ms}),
        ),
        (Method::GET, "/fapi/v1/exchangeInfo") => {
            let symbols: Vec<Value> = s
                .steps
                .iter()
                .map(|(sym, step)| {
                    json!({"symbol": sym, "status": "TRADING", "filters": [
                        {"filterType": "LOT_SIZE", "stepSize": step, "minQty": step, "maxQty": "1000000"},
                        {"filterType": "MARKET_LOT_SIZE", "stepSize": step, "minQty": step, "maxQty": "100000"}
                    ]})
                })
                .collect();
            reply(
                StatusCode::OK,
                json!({"timezone": "UTC", "serverTime": now_ms(), "symbols": symbols}),
            )
        }
        (Method::GET, "/fapi/v2/positionRisk") => {
            if let Err((status, code, msg)) = check_signed(&mut s, &query, key.as_deref()) {
                return api_error(status, code, msg);
            }
            count(&mut s, "position_risk_ok");
            if s.pad_bytes > 0 {
                let mut body = Value::Array(rows).to_string().into_bytes();
                body.resize(body.len() + s.pad_bytes, b' ');
                let mut r = Response::new(Full::new(Bytes::from(body)));
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("application/json"),
                );
                return r;
            }
            reply(StatusCode::OK, Value::Array(rows))
        }
        _ => api_error(StatusCode::NOT_FOUND, -1000, "unknown endpoint"),
    }
}

/// `POST`/`PUT`/`DELETE /fapi/v1/listenKey` (keyed, unsigned).
fn listen_key(st: &Shared, method: &Method, key: Option<&str>) -> Response<Full<Bytes>> {
    let mut s = lock(st);
    count(&mut s, &format!("{method} /fapi/v1/listenKey"));
    if key != Some(s.key.as_str()) {
        return api_error(
            StatusCode::UNAUTHORIZED,
            -2015,
            "Invalid API-key, IP, or permissions for action.",
        );
    }
    match *method {
        Method::POST => {
            if s.listen_key.is_none() {
                s.key_seq += 1;
                let seed = format!("{}{}{}", s.key_seq, now_ms(), std::process::id());
                s.listen_key = Some(format!("lk{}", sign(&seed, "listenKey")));
            }
            reply(StatusCode::OK, json!({"listenKey": s.listen_key}))
        }
        Method::PUT if s.listen_key.is_some() => reply(StatusCode::OK, json!({})),
        Method::PUT => api_error(
            StatusCode::BAD_REQUEST,
            -1125,
            "This listenKey does not exist.",
        ),
        Method::DELETE => {
            s.listen_key = None;
            reply(StatusCode::OK, json!({}))
        }
        _ => api_error(StatusCode::NOT_FOUND, -1000, "unknown endpoint"),
    }
}

fn control(
    st: &Shared,
    method: &Method,
    path: &str,
    query: &str,
    body: &[u8],
) -> Response<Full<Bytes>> {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let mut s = lock(st);
    match (method, path) {
        (&Method::POST, "/control/positions") => {
            let Some(rows) = v.as_array() else {
                return reply(StatusCode::BAD_REQUEST, json!({"error": "expected a list"}));
            };
            let t = s.next_t();
            let new: Vec<Value> = rows
                .iter()
                .map(|r| {
                    let mut r = r.clone();
                    if let Some(o) = r.as_object_mut() {
                        for (k, d) in [
                            ("positionSide", "BOTH"),
                            ("entryPrice", "0.0"),
                            ("markPrice", "0.0"),
                            ("unRealizedProfit", "0.0"),
                            ("leverage", "10"),
                            ("marginType", "cross"),
                        ] {
                            o.entry(k).or_insert(json!(d));
                        }
                        o.entry("updateTime").or_insert(json!(t));
                    }
                    r
                })
                .collect();
            // What changed: new or different rows, and rows now gone (flat).
            let old: HashMap<(String, String), Value> =
                s.positions.iter().map(|r| (row_id(r), r.clone())).collect();
            let mut entries: Vec<Value> = new
                .iter()
                .filter(|r| {
                    old.get(&row_id(r)).is_none_or(|o| {
                        o.get("positionAmt") != r.get("positionAmt")
                            || o.get("entryPrice") != r.get("entryPrice")
                    })
                })
                .map(event_entry)
                .collect();
            let kept: std::collections::HashSet<(String, String)> =
                new.iter().map(row_id).collect();
            for (id, o) in &old {
                if !kept.contains(id) {
                    let mut gone = event_entry(o);
                    gone["pa"] = json!("0");
                    entries.push(gone);
                }
            }
            let pushed = !entries.is_empty() && !query.contains("swallow=1");
            s.positions = new;
            if pushed {
                let text = account_update(t, entries);
                s.push(&text);
            }
            reply(
                StatusCode::OK,
                json!({"positions": s.positions.len(), "pushed": pushed, "T": t}),
            )
        }
        (&Method::POST, "/control/stream") => {
            if v.get("malformed").and_then(Value::as_bool) == Some(true) {
                s.push("{\"e\":\"ACCOUNT_UPDATE\",\"E\":");
            }
            if let Some(raw) = v.get("raw").and_then(Value::as_str) {
                s.push(raw);
            }
            if let Some(o) = v.get("order") {
                // An order the exchange filled: its ORDER_TRADE_UPDATE and
                // the ACCOUNT_UPDATE of the position after it, one T, the
                // ACCOUNT_UPDATE first as Binance usually sends them (or
                // the other way with "order_first"). "cause" picks the
                // markers Binance uses (SPEC §19).
                let t = s.next_t();
                let g =
                    |k: &str, d: &str| o.get(k).and_then(Value::as_str).unwrap_or(d).to_string();
                let symbol = g("symbol", "BTCUSDT");
                let after = g("amount_after", "0");
                let cause = g("cause", "order");
                let (x, c, typ, ot) = match cause.as_str() {
                    "liquidation" => (
                        "CALCULATED",
                        "autoclose-1700000000000".to_string(),
                        "LIQUIDATION",
                        "LIQUIDATION",
                    ),
                    "adl" => ("TRADE", "adl_autoclose".to_string(), "MARKET", "MARKET"),
                    "settlement" => (
                        "TRADE",
                        "settlement_autoclose-1".to_string(),
                        "MARKET",
                        "MARKET",
                    ),
                    "stop" => ("TRADE", g("client_id", "web_stop"), "MARKET", "STOP_MARKET"),
                    "take_profit" => (
                        "TRADE",
                        g("client_id", "web_tp"),
                        "MARKET",
                        "TAKE_PROFIT_MARKET",
                    ),
                    _ => ("TRADE", g("client_id", "p33-order"), "MARKET", "MARKET"),
                };
                // The same order again (Binance sends one update per fill
                // of an order) with "order_id".
                let id = match o.get("order_id").and_then(Value::as_u64) {
                    Some(id) => id,
                    None => {
                        s.order_id += 1;
                        s.order_id
                    }
                };
                let order = json!({
                    "e": "ORDER_TRADE_UPDATE", "E": t, "T": t,
                    "o": {"s": symbol, "c": c, "S": g("side", "SELL"), "o": typ, "ot": ot,
                          "f": "GTC", "q": g("qty", "1"), "p": "0", "ap": g("price", "60000"),
                          "sp": "0", "x": x, "X": "FILLED", "i": id, "l": g("qty", "1"),
                          "z": g("qty", "1"), "L": g("price", "60000"), "N": "USDT", "n": "0",
                          "T": t, "t": id, "b": "0", "a": "0", "m": false, "R": true,
                          "ps": g("positionSide", "BOTH"), "rp": g("realized", "0")}
                })
                .to_string();
                // A position that stays open keeps its entry price (as on
                // Binance); a flat one has 0.
                let leg = g("positionSide", "BOTH");
                let entry = if after == "0" {
                    "0.0".to_string()
                } else {
                    s.positions
                        .iter()
                        .find(|r| {
                            r.get("symbol").and_then(Value::as_str) == Some(symbol.as_str())
                                && r.get("positionSide")
                                    .and_then(Value::as_str)
                                    .unwrap_or("BOTH")
                                    == leg
                        })
                        .and_then(|r| r.get("entryPrice").and_then(Value::as_str))
                        .unwrap_or("0.0")
                        .to_string()
                };
                let row = json!({"symbol": symbol, "positionAmt": after, "positionSide": leg,
                                 "entryPrice": entry});
                let account = account_update(t, vec![event_entry(&row)]);
                if o.get("order_first").and_then(Value::as_bool) == Some(true) {
                    s.push(&order);
                    s.push(&account);
                } else {
                    s.push(&account);
                    s.push(&order);
                }
                let sym = json!(symbol);
                s.positions.retain(|r| r.get("symbol") != Some(&sym));
                if after != "0" {
                    s.positions.push(json!({
                        "symbol": symbol, "positionAmt": after, "positionSide": leg,
                        "entryPrice": entry, "markPrice": "0.0", "unRealizedProfit": "0.0",
                        "leverage": "10", "marginType": "cross", "updateTime": t,
                    }));
                }
            }
            if let Some(o) = v.get("fills") {
                // One order filled in parts: one ACCOUNT_UPDATE per fill,
                // all with one T (as Binance sends them, SPEC §19); the
                // position ends at the last amount.
                let t = s.next_t();
                let symbol = o.get("symbol").cloned().unwrap_or(json!(""));
                let amounts: Vec<Value> = o
                    .get("amounts")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                for a in &amounts {
                    let row = json!({"symbol": symbol, "positionAmt": a});
                    let text = account_update(t, vec![event_entry(&row)]);
                    s.push(&text);
                }
                if let Some(last) = amounts.last() {
                    s.positions.retain(|r| r.get("symbol") != Some(&symbol));
                    s.positions.push(json!({
                        "symbol": symbol, "positionAmt": last, "positionSide": "BOTH",
                        "entryPrice": "0.0", "markPrice": "0.0", "unRealizedProfit": "0.0",
                        "leverage": "10", "marginType": "cross", "updateTime": t,
                    }));
                }
            }
            if let Some(o) = v.get("old_event") {
                let age = o.get("age_ms").and_then(Value::as_i64).unwrap_or(1000);
                let t = s.last_t - age;
                let text = account_update(t, vec![event_entry(o)]);
                s.push(&text);
            }
            if v.get("forget_key").and_then(Value::as_bool) == Some(true) {
                // Gone without a word: only the next keepalive learns it.
                s.listen_key = None;
            }
            if v.get("expire_key").and_then(Value::as_bool) == Some(true) {
                if let Some(k) = s.listen_key.take() {
                    let t = s.server_ms();
                    let text = json!({"e": "listenKeyExpired", "E": t, "listenKey": k}).to_string();
                    s.push(&text);
                }
            }
            if let Some(ms) = v.get("max_age_ms").and_then(Value::as_u64) {
                s.max_age_ms = ms;
            }
            if v.get("stall").and_then(Value::as_bool) == Some(true) {
                s.conns.retain(|(_, tx)| tx.send(Push::Stall).is_ok());
            }
            if v.get("drop").and_then(Value::as_bool) == Some(true) {
                for (_, tx) in s.conns.drain(..) {
                    let _ = tx.send(Push::Drop);
                }
            }
            let open = s.conns.iter().filter(|(_, tx)| !tx.is_closed()).count();
            reply(StatusCode::OK, json!({"ok": true, "ws_open": open}))
        }
        (&Method::POST, "/control/steps") => {
            let Some(o) = v.as_object() else {
                return reply(
                    StatusCode::BAD_REQUEST,
                    json!({"error": "expected an object"}),
                );
            };
            for (k, step) in o {
                s.steps
                    .insert(k.clone(), step.as_str().unwrap_or("0.001").to_string());
            }
            reply(StatusCode::OK, json!({"steps": s.steps.len()}))
        }
        (&Method::POST, "/control/mode") => {
            if let Some(d) = v.get("delay_ms").and_then(Value::as_u64) {
                s.delay_ms = d;
            }
            if let Some(f) = v.get("fail_5xx").and_then(Value::as_bool) {
                s.fail_5xx = f;
            }
            if let Some(r) = v.get("rate_limit_s").and_then(Value::as_u64) {
                s.rate_limit_s = r;
            }
            if let Some(h) = v.get("retry_after").and_then(Value::as_str) {
                s.retry_after = Some(h.to_string());
            }
            if let Some(n) = v.get("pad_bytes").and_then(Value::as_u64) {
                s.pad_bytes = usize::try_from(n).unwrap_or(0);
            }
            if let Some(f) = v.get("fail_1021_once").and_then(Value::as_bool) {
                s.fail_1021_once = f;
            }
            if let Some(o) = v.get("time_offset_ms").and_then(Value::as_i64) {
                s.time_offset_ms = o;
            }
            reply(StatusCode::OK, json!({"ok": true}))
        }
        (&Method::GET, "/control/stats") => {
            let open = s.conns.iter().filter(|(_, tx)| !tx.is_closed()).count();
            reply(
                StatusCode::OK,
                json!({"counts": s.counts, "position_risk_ms": s.position_risk_ms,
                       "ws_opened": s.ws_opened, "ws_open": open}),
            )
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            json!({"error": "unknown control endpoint"}),
        ),
    }
}

/// A local stand-in for the Binance USDⓈ-M futures REST API.
#[derive(Debug, clap::Parser)]
#[command(name = "fake-exchange")]
struct Args {
    /// Address to listen on (loopback only is the point).
    #[arg(long, default_value = "127.0.0.1")]
    addr: std::net::IpAddr,
    /// Port; 0 picks a free one (printed on the first line).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// The API key signed requests must carry.
    #[arg(long, env = "FAKE_API_KEY", default_value = "fake-key")]
    api_key: String,
    /// The secret signatures are checked with.
    #[arg(
        long,
        env = "FAKE_API_SECRET",
        default_value = "fake-secret",
        hide_env_values = true
    )]
    api_secret: String,
}

#[tokio::main]
async fn main() {
    let args = <Args as clap::Parser>::parse();
    let (key, secret) = (args.api_key, args.api_secret);
    let sock = SocketAddr::new(args.addr, args.port);
    let listener = match tokio::net::TcpListener::bind(sock).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("fake-exchange: cannot bind {sock}: {e}");
            std::process::exit(1);
        }
    };
    let local = listener.local_addr().map_or(sock, |a| a);
    println!("fake-exchange listening on http://{local}");
    let _ = std::io::stdout().flush();
    let st: Shared = Arc::new(Mutex::new(State {
        key,
        secret,
        ..State::default()
    }));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let st = st.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let st = st.clone();
                async move { Ok::<_, Infallible>(handle(st, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades()
                .await;
        });
    }
}
