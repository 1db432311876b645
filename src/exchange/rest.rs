//! The REST client of Binance USDⓈ-M futures (SPEC §7, §11): signing,
//! the clock offset, capped bodies and waits, `Retry-After`, and the
//! exchangeInfo step sizes' parser.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use rust_decimal::Decimal;
use serde_json::Value;
use sha2::Sha256;
use tracing::{info, warn};

use crate::config::{Config, Secret};
use crate::domain::{parse_dec, valid_step};
use crate::observe::metrics::Metrics;
use crate::redis::store;

/// Request timeout (the body is read under it too).
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest reply body read; a larger one fails the request (SPEC §11).
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// The longest `Retry-After` obeyed (SPEC §11); the default when absent or
/// unreadable is 60 s.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// The largest exchange clock offset taken from `/fapi/v1/time`, ms.
const MAX_CLOCK_OFFSET_MS: i64 = 86_400_000;

/// What went wrong talking to the exchange. Messages never hold secrets:
/// request URLs (which carry the signature) are stripped.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// Network error, timeout or 5xx: the cycle fails, the next one retries.
    #[error("transient: {0}")]
    Transient(String),
    /// 429/418: no request before the instant given.
    #[error("rate limited: retry after {0:?}")]
    RateLimited(Duration),
    /// An API error code (e.g. -1022 bad signature, -2015 bad key).
    #[error("api error {code}: {msg}")]
    Api {
        /// The API's error code.
        code: i64,
        /// The API's message.
        msg: String,
    },
    /// A reply that is not what the API documents.
    #[error("malformed reply: {0}")]
    Malformed(String),
}

impl ExchangeError {
    /// The `outcome` label of `p33_exchange_requests_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            ExchangeError::Transient(_) => "transient_error",
            ExchangeError::RateLimited(_) => "rate_limited",
            ExchangeError::Api { .. } => "api_error",
            ExchangeError::Malformed(_) => "malformed",
        }
    }
}

/// A request error with its causes ("error sending request: … Connection
/// refused"), never its URL: a signed URL carries the signature.
fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// How long to hold requests after a 429/418: `Retry-After` in seconds
/// (integer or decimal), capped at [`MAX_RETRY_AFTER`]; 60 s when absent or
/// unreadable.
pub fn retry_after(header: Option<&str>) -> Duration {
    let default = Duration::from_secs(60);
    let Some(secs) = header.and_then(|v| v.trim().parse::<f64>().ok()) else {
        return default;
    };
    if !secs.is_finite() || secs < 0.0 {
        return default;
    }
    Duration::from_secs_f64(secs.min(MAX_RETRY_AFTER.as_secs_f64()))
}

/// Reads a reply body of at most `cap` bytes, chunk by chunk.
async fn read_capped(mut resp: reqwest::Response, cap: usize) -> Result<Vec<u8>, ExchangeError> {
    let too_big = |n: String| {
        ExchangeError::Malformed(format!(
            "reply body of {n} bytes exceeds the {} MiB cap",
            cap / (1024 * 1024)
        ))
    };
    if let Some(len) = resp.content_length() {
        if len > cap as u64 {
            return Err(too_big(len.to_string()));
        }
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| ExchangeError::Transient(describe(e)))?
    {
        if body.len().saturating_add(chunk.len()) > cap {
            return Err(too_big(format!("more than {cap}")));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Hex HMAC-SHA256 of `query` with `secret` (Binance request signing).
pub fn sign(secret: &str, query: &str) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .expect("HMAC-SHA256 accepts keys of any length");
    mac.update(query.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// A small Binance futures REST client.
pub struct Client {
    http: reqwest::Client,
    base: String,
    key: Option<Secret>,
    secret: Option<Secret>,
    /// Server time minus local time, ms (resynced on -1021).
    offset_ms: AtomicI64,
    /// No request before this instant (after 429/418).
    hold_until: Mutex<Option<Instant>>,
    /// When the clock was last resynced after a -1021: requests that failed
    /// together (the poll and the stream's reconcile) resync once.
    resynced: tokio::sync::Mutex<Option<Instant>>,
    metrics: Arc<Metrics>,
}

impl Client {
    /// A client for `cfg`'s base URL and credentials.
    pub fn new(cfg: &Config, metrics: Arc<Metrics>) -> Result<Self, ExchangeError> {
        let http = reqwest::Client::builder()
            .timeout(HTTP_TIMEOUT)
            .connect_timeout(HTTP_TIMEOUT)
            .user_agent(concat!("position-state-brain/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ExchangeError::Transient(describe(e)))?;
        Ok(Client {
            http,
            base: cfg.exchange_base_url.clone(),
            key: cfg.binance_api_key.clone(),
            secret: cfg.binance_api_secret.clone(),
            offset_ms: AtomicI64::new(0),
            hold_until: Mutex::new(None),
            resynced: tokio::sync::Mutex::new(None),
            metrics,
        })
    }

    fn held(&self) -> Option<Duration> {
        let g = self.hold_until.lock().unwrap_or_else(|p| p.into_inner());
        g.and_then(|t| t.checked_duration_since(Instant::now()))
    }

    async fn get(&self, endpoint: &str, query: Option<String>) -> Result<Value, ExchangeError> {
        let keyed = query.is_some();
        self.request(reqwest::Method::GET, endpoint, query, keyed)
            .await
    }

    async fn request(
        &self,
        method: reqwest::Method,
        endpoint: &str,
        query: Option<String>,
        keyed: bool,
    ) -> Result<Value, ExchangeError> {
        if let Some(left) = self.held() {
            self.metrics
                .exchange_requests_total
                .with_label_values(&["held_back"])
                .inc();
            return Err(ExchangeError::RateLimited(left));
        }
        let url = match &query {
            Some(q) => format!("{}{endpoint}?{q}", self.base),
            None => format!("{}{endpoint}", self.base),
        };
        let mut req = self.http.request(method, url);
        if keyed {
            if let Some(k) = &self.key {
                req = req.header("X-MBX-APIKEY", k.expose());
            }
        }
        let started = Instant::now();
        let res = self.send(req).await;
        self.metrics
            .exchange_request_duration_seconds
            .with_label_values(&[endpoint])
            .observe(started.elapsed().as_secs_f64());
        let outcome = match &res {
            Ok(_) => "ok",
            Err(e) => e.outcome(),
        };
        self.metrics
            .exchange_requests_total
            .with_label_values(&[outcome])
            .inc();
        res
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Value, ExchangeError> {
        // (The body is read chunk by chunk and given up past the cap: a
        // 100 MB reply must not cost 2 GB.)
        let resp = req
            .send()
            .await
            .map_err(|e| ExchangeError::Transient(describe(e)))?;
        let status = resp.status();
        if status.as_u16() == 429 || status.as_u16() == 418 {
            let wait = retry_after(
                resp.headers()
                    .get("Retry-After")
                    .and_then(|v| v.to_str().ok()),
            );
            *self.hold_until.lock().unwrap_or_else(|p| p.into_inner()) =
                Instant::now().checked_add(wait);
            return Err(ExchangeError::RateLimited(wait));
        }
        let body = read_capped(resp, MAX_BODY_BYTES).await?;
        if status.is_server_error() {
            return Err(ExchangeError::Transient(format!("HTTP {status}")));
        }
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| ExchangeError::Malformed(format!("HTTP {status}: {e}")))?;
        if let Some(code) = v.get("code").and_then(Value::as_i64) {
            if code != 200 && (v.get("msg").is_some() || !status.is_success()) {
                // The exchange's words, cut and escaped: every log line
                // and deny that quotes an API error goes through here.
                let msg = crate::text::clip(v.get("msg").and_then(Value::as_str).unwrap_or(""))
                    .into_owned();
                return Err(ExchangeError::Api { code, msg });
            }
        }
        if !status.is_success() {
            return Err(ExchangeError::Malformed(format!("HTTP {status}")));
        }
        Ok(v)
    }

    /// Resyncs the clock offset from `GET /fapi/v1/time`.
    pub async fn sync_time(&self) -> Result<(), ExchangeError> {
        let v = self.get("/fapi/v1/time", None).await?;
        let server = v
            .get("serverTime")
            .and_then(Value::as_i64)
            .ok_or_else(|| ExchangeError::Malformed("no serverTime".into()))?;
        // An offset beyond a day is no clock drift but a broken reply; it
        // would also push signed timestamps past any sane range.
        let off = server
            .checked_sub(store::now_ms() as i64)
            .filter(|o| o.abs() <= MAX_CLOCK_OFFSET_MS)
            .ok_or_else(|| {
                ExchangeError::Malformed(format!("serverTime {server} is more than a day off"))
            })?;
        self.offset_ms.store(off, Ordering::Relaxed);
        info!("exchange clock offset resynced: {off} ms");
        Ok(())
    }

    /// Resyncs the clock offset unless another caller did within the last
    /// second (then its offset is used): the stream's start and a -1021
    /// that race make one request, not two.
    pub async fn resync(&self, why: &str) -> Result<(), ExchangeError> {
        let mut last = self.resynced.lock().await;
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return Ok(());
        }
        warn!("exchange: {why}; resyncing the clock");
        self.sync_time().await?;
        *last = Some(Instant::now());
        Ok(())
    }

    /// A signed GET; on -1021 (timestamp outside recvWindow) resync the clock
    /// and retry once.
    pub async fn signed_get(&self, endpoint: &str) -> Result<Value, ExchangeError> {
        let Some(secret) = &self.secret else {
            return Err(ExchangeError::Api {
                code: -2015,
                msg: "no API secret configured".into(),
            });
        };
        let mut retried = false;
        loop {
            let ts =
                (store::now_ms() as i64).saturating_add(self.offset_ms.load(Ordering::Relaxed));
            let q = format!("timestamp={ts}&recvWindow=5000");
            let sig = sign(secret.expose(), &q);
            match self
                .get(endpoint, Some(format!("{q}&signature={sig}")))
                .await
            {
                Err(ExchangeError::Api { code: -1021, .. }) if !retried => {
                    retried = true;
                    self.resync("-1021 timestamp outside recvWindow").await?;
                }
                other => return other,
            }
        }
    }

    /// Server time minus local time, ms (0 until a resync).
    pub fn offset_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::Relaxed)
    }

    /// Our clock now, and the exchange's as we know it (ours corrected by
    /// the offset): what exchange times are bounded by (SPEC §16).
    pub fn clock(&self) -> super::Clock {
        let local_ms = store::now_ms();
        let exchange_ms = u64::try_from(
            i64::try_from(local_ms)
                .unwrap_or(i64::MAX)
                .saturating_add(self.offset_ms()),
        )
        .unwrap_or(0);
        super::Clock {
            local_ms,
            exchange_ms,
        }
    }

    /// `POST /fapi/v1/listenKey` (keyed, unsigned, SPEC §16): the account's
    /// active listenKey, or a new one. It is a credential: kept as a
    /// [`Secret`], never shown.
    pub async fn create_listen_key(&self) -> Result<Secret, ExchangeError> {
        let v = self
            .request(reqwest::Method::POST, "/fapi/v1/listenKey", None, true)
            .await?;
        let key = v
            .get("listenKey")
            .and_then(Value::as_str)
            .filter(|k| valid_listen_key(k))
            .ok_or_else(|| {
                ExchangeError::Malformed(
                    "listenKey reply without a listenKey of 1-256 letters and digits".into(),
                )
            })?;
        Ok(Secret::new(key.to_string()))
    }

    /// `PUT /fapi/v1/listenKey`: keeps the key alive another 60 minutes.
    /// `-1125` says the key is gone.
    pub async fn keep_listen_key_alive(&self) -> Result<(), ExchangeError> {
        self.request(reqwest::Method::PUT, "/fapi/v1/listenKey", None, true)
            .await
            .map(|_| ())
    }

    /// `GET /fapi/v1/exchangeInfo` → symbol → step size.
    pub async fn step_sizes(&self) -> Result<HashMap<String, Decimal>, ExchangeError> {
        let v = self.get("/fapi/v1/exchangeInfo", None).await?;
        parse_step_sizes(&v)
    }
}

/// A listenKey fit to put in a URL: 1-256 ASCII letters and digits.
fn valid_listen_key(k: &str) -> bool {
    (1..=256).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Step sizes from an exchangeInfo reply: `MARKET_LOT_SIZE`, else `LOT_SIZE`.
pub fn parse_step_sizes(v: &Value) -> Result<HashMap<String, Decimal>, ExchangeError> {
    let syms = v
        .get("symbols")
        .and_then(Value::as_array)
        .ok_or_else(|| ExchangeError::Malformed("exchangeInfo without symbols".into()))?;
    let mut out = HashMap::with_capacity(syms.len());
    for s in syms {
        let Some(name) = s.get("symbol").and_then(Value::as_str) else {
            continue;
        };
        let filters = s.get("filters").and_then(Value::as_array);
        let step_of = |kind: &str| {
            filters?
                .iter()
                .find(|f| f.get("filterType").and_then(Value::as_str) == Some(kind))
                .and_then(|f| f.get("stepSize"))
                .and_then(Value::as_str)
                .and_then(parse_dec)
                .filter(|d| valid_step(*d))
        };
        if let Some(step) = step_of("MARKET_LOT_SIZE").or_else(|| step_of("LOT_SIZE")) {
            out.insert(name.to_string(), step.normalize());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::str::FromStr;

    #[test]
    fn signature_matches_the_binance_documentation_example() {
        // Binance API docs, "SIGNED endpoint examples for POST /api/v3/order" (HMAC).
        let secret = "NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j";
        let query = "symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC&quantity=1&price=0.1&recvWindow=5000&timestamp=1499827319559";
        assert_eq!(
            sign(secret, query),
            "c8db56825ae71d6d79447849e617115f4a920fa2acdcab2b053c4b2838bd6b71"
        );
    }

    #[test]
    fn step_sizes_prefer_market_lot_size() {
        let v = json!({"symbols": [
            {"symbol": "BTCUSDT", "filters": [{"filterType": "LOT_SIZE", "stepSize": "0.001"}, {"filterType": "MARKET_LOT_SIZE", "stepSize": "0.010"}]},
            {"symbol": "DOGEUSDT", "filters": [{"filterType": "LOT_SIZE", "stepSize": "1"}]},
            {"symbol": "ODDUSDT", "filters": [{"filterType": "MARKET_LOT_SIZE", "stepSize": "0"}, {"filterType": "LOT_SIZE", "stepSize": "0.1"}]},
            {"symbol": "NONEUSDT", "filters": []}
        ]});
        let t = parse_step_sizes(&v).unwrap();
        assert_eq!(t["BTCUSDT"], Decimal::from_str("0.01").unwrap());
        assert_eq!(t["DOGEUSDT"], Decimal::ONE);
        assert_eq!(t["ODDUSDT"], Decimal::from_str("0.1").unwrap());
        assert!(!t.contains_key("NONEUSDT"));
    }

    #[test]
    fn step_sizes_outside_1e_12_to_1e9_are_ignored() {
        let v = json!({"symbols": [
            {"symbol": "TINYUSDT", "filters": [{"filterType": "MARKET_LOT_SIZE", "stepSize": "1e-28"}]},
            {"symbol": "HUGEUSDT", "filters": [{"filterType": "LOT_SIZE", "stepSize": "1e10"}]},
            {"symbol": "NANUSDT", "filters": [{"filterType": "LOT_SIZE", "stepSize": "NaN"}]},
            {"symbol": "OKUSDT", "filters": [{"filterType": "LOT_SIZE", "stepSize": "0.000000000001"}]}
        ]});
        let t = parse_step_sizes(&v).unwrap();
        assert_eq!(t.keys().collect::<Vec<_>>(), vec!["OKUSDT"]);
    }

    #[test]
    fn retry_after_is_capped_and_never_overflows() {
        assert_eq!(retry_after(Some("18446744073709551615")), MAX_RETRY_AFTER);
        assert_eq!(retry_after(Some("1000000000")), MAX_RETRY_AFTER);
        assert_eq!(retry_after(Some("1e300")), MAX_RETRY_AFTER);
        assert_eq!(retry_after(Some("2")), Duration::from_secs(2));
        assert_eq!(retry_after(Some("0.5")), Duration::from_millis(500));
        assert_eq!(retry_after(Some("-1")), Duration::from_secs(60));
        assert_eq!(retry_after(Some("NaN")), Duration::from_secs(60));
        assert_eq!(retry_after(None), Duration::from_secs(60));
        assert!(Instant::now()
            .checked_add(retry_after(Some("1e300")))
            .is_some());
    }
}
