//! `fake-exchange`: a local stand-in for the Binance USDⓈ-M futures REST API,
//! for the integration tests and the demo (the real API is not reachable
//! here, and a fresh machine has no testnet keys).
//!
//! Serves `GET /fapi/v1/time`, `GET /fapi/v1/exchangeInfo` and the signed
//! `GET /fapi/v2/positionRisk` with the real API's shapes. Signed requests are
//! checked like the real API does: `X-MBX-APIKEY` (-2015), the HMAC-SHA256
//! `signature` (-1022) and `timestamp` within `recvWindow` (-1021).
//!
//! Control endpoints (JSON bodies):
//! - `POST /control/positions` — a list of positionRisk rows
//!   (`symbol`, `positionAmt`, optional `positionSide`, `entryPrice`, …);
//! - `POST /control/steps` — `{"SYMBOL": "stepSize", …}` for exchangeInfo;
//! - `POST /control/mode` — `{"delay_ms", "fail_5xx", "rate_limit_s",
//!   "retry_after", "fail_1021_once", "time_offset_ms", "pad_bytes"}` (fields
//!   absent are left as they are): `retry_after` is the raw `Retry-After`
//!   header of the next 429 (default: `rate_limit_s`), `pad_bytes` pads
//!   every positionRisk body with that many blanks (a huge reply);
//! - `GET /control/stats` — request counts and positionRisk request times.
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
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use position_state_brain::exchange::sign;
use position_state_brain::store::now_ms;
use serde_json::{json, Value};

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

async fn handle(st: Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
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
        return control(&st, &method, &path, &body);
    }
    let (delay, fail, rate) = {
        let mut s = lock(&st);
        count(&mut s, &path);
        if path == "/fapi/v2/positionRisk" {
            s.position_risk_ms.push(now_ms());
        }
        let rate = std::mem::take(&mut s.rate_limit_s);
        let header = if rate > 0 {
            s.retry_after.take().unwrap_or_else(|| rate.to_string())
        } else {
            String::new()
        };
        (s.delay_ms, s.fail_5xx, (rate, header))
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
                let mut body = Value::Array(s.positions.clone()).to_string().into_bytes();
                body.resize(body.len() + s.pad_bytes, b' ');
                let mut r = Response::new(Full::new(Bytes::from(body)));
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("application/json"),
                );
                return r;
            }
            reply(StatusCode::OK, Value::Array(s.positions.clone()))
        }
        _ => api_error(StatusCode::NOT_FOUND, -1000, "unknown endpoint"),
    }
}

fn control(st: &Shared, method: &Method, path: &str, body: &[u8]) -> Response<Full<Bytes>> {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let mut s = lock(st);
    match (method, path) {
        (&Method::POST, "/control/positions") => {
            let Some(rows) = v.as_array() else {
                return reply(StatusCode::BAD_REQUEST, json!({"error": "expected a list"}));
            };
            s.positions = rows
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
                    }
                    r
                })
                .collect();
            reply(StatusCode::OK, json!({"positions": s.positions.len()}))
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
        (&Method::GET, "/control/stats") => reply(
            StatusCode::OK,
            json!({"counts": s.counts, "position_risk_ms": s.position_risk_ms}),
        ),
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
                .await;
        });
    }
}
