//! Exchange: Binance USDⓈ-M futures positions and step sizes (SPEC §7, §5).
//!
//! One signed `GET /fapi/v2/positionRisk` per cycle (every `P33_POLL_SEC`,
//! and at once when the allowlist gains symbols) → one pipeline writing
//! `quantum:position:snapshot:<symbol>` (and, with `P33_CANONICAL_POSITIONS`,
//! `quantum:state:positions:<symbol>`) for every allowlisted symbol, TTL 3600.
//! A failed cycle writes nothing. Step sizes come from the public
//! `GET /fapi/v1/exchangeInfo`, loaded at start and hourly, in both snapshot
//! modes. Both run as their own tasks: a slow exchange never delays plans.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use rust_decimal::Decimal;
use serde_json::Value;
use sha2::Sha256;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::allowlist::AllowlistHandle;
use crate::config::{Config, Secret};
use crate::domain::{dec_str, parse_amount, parse_dec, valid_step, PositionSide};
use crate::keys;
use crate::metrics::Metrics;
use crate::steps::{Positioned, StepSizes};
use crate::store;

/// Snapshot and canonical hash lifetime, seconds.
pub const SNAPSHOT_TTL_S: i64 = 3600;
/// How often step sizes are reloaded.
pub const STEP_REFRESH: Duration = Duration::from_secs(3600);
/// Retry period after a failed exchangeInfo load.
pub const STEP_RETRY: Duration = Duration::from_secs(30);
/// Request timeout (the body is read under it too).
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest reply body read; a larger one fails the request (SPEC §11).
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// The longest `Retry-After` obeyed (SPEC §11); the default when absent or
/// unreadable is 60 s.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);
/// The largest exchange clock offset taken from `/fapi/v1/time`, ms.
const MAX_CLOCK_OFFSET_MS: i64 = 86_400_000;
/// The shortest time between two polls triggered by allowlist gains.
pub const MIN_EXTRA_POLL_GAP: Duration = Duration::from_secs(1);

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
            metrics,
        })
    }

    fn held(&self) -> Option<Duration> {
        let g = self.hold_until.lock().unwrap_or_else(|p| p.into_inner());
        g.and_then(|t| t.checked_duration_since(Instant::now()))
    }

    async fn get(&self, endpoint: &str, query: Option<String>) -> Result<Value, ExchangeError> {
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
        let mut req = self.http.get(url);
        if query.is_some() {
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
                let msg = v
                    .get("msg")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
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
                    warn!("exchange: -1021 timestamp outside recvWindow; resyncing the clock and retrying once");
                    retried = true;
                    self.sync_time().await?;
                }
                other => return other,
            }
        }
    }

    /// `GET /fapi/v1/exchangeInfo` → symbol → step size.
    pub async fn step_sizes(&self) -> Result<HashMap<String, Decimal>, ExchangeError> {
        let v = self.get("/fapi/v1/exchangeInfo", None).await?;
        parse_step_sizes(&v)
    }
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

/// Saves the step table to `quantum:p33:step_sizes` (replacing it in one
/// transaction), so a restart without a route to the exchange keeps real
/// steps instead of the 0.001 fallback.
async fn save_steps(
    con: &mut crate::store::Conn,
    table: &HashMap<String, Decimal>,
) -> Result<(), redis::RedisError> {
    let mut p = redis::pipe();
    p.atomic().del(keys::STEP_SIZES).ignore();
    if !table.is_empty() {
        let pairs: Vec<(&str, String)> = table
            .iter()
            .map(|(s, d)| (s.as_str(), dec_str(*d)))
            .collect();
        p.hset_multiple(keys::STEP_SIZES, &pairs).ignore();
    }
    p.query_async(con).await
}

/// The last good table from `quantum:p33:step_sizes`; entries that are not
/// valid symbols or steps are left out, and a key of another type is no
/// table (empty, with a WARN).
pub async fn load_saved_steps(
    con: &mut crate::store::Conn,
) -> Result<HashMap<String, Decimal>, redis::RedisError> {
    let raw: HashMap<String, String> = match redis::cmd("HGETALL")
        .arg(keys::STEP_SIZES)
        .query_async(con)
        .await
    {
        Ok(r) => r,
        Err(e) if e.code() == Some("WRONGTYPE") => {
            warn!(
                "step sizes: {} holds another type; no saved table",
                keys::STEP_SIZES
            );
            return Ok(HashMap::new());
        }
        Err(e) => return Err(e),
    };
    Ok(raw
        .into_iter()
        .filter(|(s, _)| keys::valid_symbol(s))
        .filter_map(|(s, v)| Some((s, parse_dec(&v).filter(|d| valid_step(*d))?)))
        .collect())
}

/// Loads step sizes at start and hourly; a failed load keeps the last good
/// table and retries sooner. Each good table is saved to Redis; when the
/// exchange cannot be reached and no table is loaded yet, the saved one is
/// used (SPEC §5 "Step size": 0.001 is the fallback of last resort).
pub async fn run_step_sizes(
    cfg: Arc<Config>,
    redis: store::Redis,
    steps: StepSizes,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let client = match Client::new(&cfg, metrics) {
        Ok(c) => c,
        Err(e) => {
            warn!("step sizes: cannot build the HTTP client: {e}; using 0.001 for every symbol");
            return cancel.cancelled().await;
        }
    };
    let Some(mut con) = redis
        .connect("step sizes", Duration::from_secs(5), &cancel)
        .await
    else {
        return;
    };
    let url = format!("{}/fapi/v1/exchangeInfo", cfg.exchange_base_url);
    let mut failures = 0u64;
    // The saved table, loaded before the first plan (lifecycle), counts.
    let mut have_table = !steps.is_empty();
    loop {
        let wait = match client.step_sizes().await {
            Ok(t) => {
                info!(
                    "step sizes loaded for {} symbols from exchangeInfo",
                    t.len()
                );
                if let Err(e) = save_steps(&mut con, &t).await {
                    warn!(
                        "step sizes: saving them to {} failed: {e}",
                        keys::STEP_SIZES
                    );
                }
                steps.set(t);
                have_table = true;
                failures = 0;
                STEP_REFRESH
            }
            Err(e) => {
                failures += 1;
                // An exchange that stays away (external mode without one) is
                // named a few times, then every 20th try, not every 30 s.
                if failures <= 3 || failures.is_multiple_of(20) {
                    warn!(
                        "step sizes: GET {url} failed ({failures} in a row): {e}; {}",
                        if have_table {
                            "keeping the last table"
                        } else {
                            "no table yet"
                        }
                    );
                }
                if !have_table {
                    match load_saved_steps(&mut con).await {
                        Ok(t) if !t.is_empty() => {
                            info!(
                                "step sizes: using the {} saved in {} until exchangeInfo answers",
                                t.len(),
                                keys::STEP_SIZES
                            );
                            steps.set(t);
                            have_table = true;
                        }
                        Ok(_) => {
                            if failures == 1 {
                                warn!(
                                    "step sizes: none saved in {} either; closes are rounded down to 0.001 (see README, Step sizes)",
                                    keys::STEP_SIZES
                                );
                            }
                        }
                        Err(e) => warn!("step sizes: reading {} failed: {e}", keys::STEP_SIZES),
                    }
                }
                STEP_RETRY
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// One symbol's position as written to its snapshot hash.
#[derive(Debug, Clone, PartialEq)]
pub struct Position {
    /// Signed amount (0 when flat or invalid).
    pub amt: Decimal,
    /// The side written to the snapshot hash.
    pub side: PositionSide,
    /// `entryPrice`, as the exchange wrote it (cut to 64 characters).
    pub entry_price: String,
    /// `markPrice`, as the exchange wrote it.
    pub mark_price: String,
    /// `unRealizedProfit` (summed for a hedged symbol).
    pub unrealized_pnl: String,
    /// `leverage`, as the exchange wrote it.
    pub leverage: String,
    /// Why the rows of this symbol could not be taken as one position
    /// (written as `HEDGED`, so its plans are denied), for the WARN line.
    pub problem: Option<&'static str>,
}

impl Position {
    fn flat() -> Self {
        Position {
            amt: Decimal::ZERO,
            side: PositionSide::None,
            entry_price: "0".into(),
            mark_price: "0".into(),
            unrealized_pnl: "0".into(),
            leverage: "0".into(),
            problem: None,
        }
    }

    /// A symbol whose rows make no single position: written as `HEDGED`
    /// with amount 0, so every plan for it is denied (SPEC §7, §11).
    fn invalid(problem: &'static str) -> Self {
        Position {
            side: PositionSide::Hedged,
            problem: Some(problem),
            ..Position::flat()
        }
    }
}

/// A raw field of a positionRisk row as a string, cut to 64 characters.
fn row_field(r: &Value, k: &str) -> String {
    let s = match r.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "0".into(),
        Some(other) => other.to_string(),
    };
    crate::text::clip(&s).into_owned()
}

/// One symbol's rows → its position. One-way mode has one `BOTH` row; hedge
/// mode a `LONG` and a `SHORT` row, of which one non-zero is the position
/// and two are `HEDGED`. An amount that is not a number or beyond 1e12, or
/// two one-way rows with different amounts, make the symbol invalid (never
/// a sum): its plans are denied.
fn fold_rows(rows: &[(Option<Decimal>, &Value)]) -> Position {
    let mut amts = Vec::with_capacity(rows.len());
    for (amt, r) in rows {
        match amt {
            Some(a) => amts.push((*a, *r)),
            None => return Position::invalid("positionAmt not a number within ±1e12"),
        }
    }
    let one_way = |r: &Value| {
        r.get("positionSide")
            .and_then(Value::as_str)
            .is_none_or(|s| s.eq_ignore_ascii_case("BOTH"))
    };
    let both: Vec<Decimal> = amts
        .iter()
        .filter(|(_, r)| one_way(r))
        .map(|(a, _)| *a)
        .collect();
    if both.windows(2).any(|w| w[0] != w[1]) {
        return Position::invalid("duplicate one-way rows with different amounts");
    }
    // Identical duplicate one-way rows are one position, not two.
    let mut seen_both = false;
    let open: Vec<(Decimal, &Value)> = amts
        .into_iter()
        .filter(|(_, r)| !one_way(r) || !std::mem::replace(&mut seen_both, true))
        .filter(|(a, _)| !a.is_zero())
        .collect();
    match open.as_slice() {
        [] => Position::flat(),
        [(amt, r)] => Position {
            amt: *amt,
            // Any non-zero row is a position, dust included: the rules
            // decide what is flat.
            side: if amt.is_sign_positive() {
                PositionSide::Long
            } else {
                PositionSide::Short
            },
            entry_price: row_field(r, "entryPrice"),
            mark_price: row_field(r, "markPrice"),
            unrealized_pnl: row_field(r, "unRealizedProfit"),
            leverage: row_field(r, "leverage"),
            problem: None,
        },
        [(_, r), ..] => {
            let Some(amt) = open
                .iter()
                .try_fold(Decimal::ZERO, |acc, (a, _)| acc.checked_add(*a))
            else {
                return Position::invalid("hedge-mode amounts overflow");
            };
            let pnl = open
                .iter()
                .map(|(_, r)| parse_dec(&row_field(r, "unRealizedProfit")))
                .try_fold(Decimal::ZERO, |acc, p| acc.checked_add(p?))
                .map_or_else(|| "0".to_string(), dec_str);
            Position {
                amt,
                side: PositionSide::Hedged,
                entry_price: row_field(r, "entryPrice"),
                mark_price: row_field(r, "markPrice"),
                unrealized_pnl: pnl,
                leverage: row_field(r, "leverage"),
                problem: None,
            }
        }
    }
}

/// What kind of JSON value `v` is, for an error message.
fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Folds a positionRisk reply into one position per symbol (see
/// `fold_rows`). A row without a symbol fails the whole reply: the
/// position it holds could not be attributed, and an absent symbol would
/// read as flat.
pub fn parse_positions(v: &Value) -> Result<HashMap<String, Position>, ExchangeError> {
    let rows = v
        .as_array()
        .ok_or_else(|| ExchangeError::Malformed("positionRisk reply is not a list".into()))?;
    let mut by_symbol: HashMap<&str, Vec<(Option<Decimal>, &Value)>> = HashMap::new();
    for r in rows {
        let Some(sym) = r.get("symbol").and_then(Value::as_str) else {
            return Err(ExchangeError::Malformed(
                "positionRisk row without a symbol".into(),
            ));
        };
        // Binance sends amounts as strings; a number (or anything else) is a
        // reply of another shape, and so doubtful: the cycle fails (§11).
        let amt = match r.get("positionAmt") {
            Some(Value::String(s)) => parse_amount(s),
            Some(other) => {
                return Err(ExchangeError::Malformed(format!(
                    "positionRisk row for {}: positionAmt is {}, not a string",
                    crate::text::clip(sym),
                    json_kind(other)
                )))
            }
            None => None,
        };
        by_symbol.entry(sym).or_default().push((amt, r));
    }
    Ok(by_symbol
        .into_iter()
        .map(|(sym, rows)| (sym.to_string(), fold_rows(&rows)))
        .collect())
}

/// `binance_testnet` when the base URL's host contains `testnet`.
pub fn source_label(base_url: &str) -> &'static str {
    let host = url::Url::parse(base_url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_default();
    if host.contains("testnet") {
        "binance_testnet"
    } else {
        "binance"
    }
}

/// Writes every allowlisted symbol's snapshot in one pipeline.
pub async fn write_snapshots(
    con: &mut crate::store::Conn,
    symbols: &[String],
    positions: &HashMap<String, Position>,
    ts_ms: u64,
    source: &str,
    canonical: bool,
) -> Result<(), redis::RedisError> {
    let mut p = redis::pipe();
    // Whole seconds: the pipeline's Python readers call int() on it (§7).
    let ts = (ts_ms / 1000).to_string();
    let ts_ms = ts_ms.to_string();
    let flat = Position::flat();
    for sym in symbols {
        let pos = positions.get(sym).unwrap_or(&flat);
        let key = keys::snapshot(sym);
        let amt = dec_str(pos.amt);
        p.cmd("HSET")
            .arg(&key)
            .arg("position_amt")
            .arg(&amt)
            .arg("side")
            .arg(pos.side.as_str())
            .arg("entry_price")
            .arg(&pos.entry_price)
            .arg("mark_price")
            .arg(&pos.mark_price)
            .arg("unrealized_pnl")
            .arg(&pos.unrealized_pnl)
            .arg("leverage")
            .arg(&pos.leverage)
            .arg("ts_epoch")
            .arg(&ts)
            .arg("ts_epoch_ms")
            .arg(&ts_ms)
            .arg("source")
            .arg(source)
            .ignore();
        p.cmd("EXPIRE").arg(&key).arg(SNAPSHOT_TTL_S).ignore();
        // The canonical hash knows LONG/SHORT/FLAT only: a hedged symbol is
        // left out rather than written with a side that would mislead.
        if canonical && pos.side != PositionSide::Hedged {
            let ckey = keys::canonical_position(sym);
            let side = match pos.side {
                PositionSide::Long => "LONG",
                PositionSide::Short => "SHORT",
                PositionSide::None | PositionSide::Hedged => "FLAT",
            };
            p.cmd("HSET")
                .arg(&ckey)
                .arg("symbol")
                .arg(sym)
                .arg("position_amt")
                .arg(&amt)
                .arg("side")
                .arg(side)
                .arg("quantity")
                .arg(dec_str(pos.amt.abs()))
                .arg("entry_price")
                .arg(&pos.entry_price)
                .arg("mark_price")
                .arg(&pos.mark_price)
                .arg("current_price")
                .arg(&pos.mark_price)
                .arg("unrealized_pnl")
                .arg(&pos.unrealized_pnl)
                .arg("leverage")
                .arg(&pos.leverage)
                .arg("ts_epoch")
                .arg(&ts)
                .arg("source")
                .arg("position_state_brain")
                .ignore();
            p.cmd("EXPIRE").arg(&ckey).arg(SNAPSHOT_TTL_S).ignore();
        }
    }
    p.query_async::<()>(con).await
}

/// Polls positions until `cancel` fires: every `P33_POLL_SEC`, and at once
/// when `gained` changes (the allowlist gained symbols) — but such an extra
/// poll comes at least [`MIN_EXTRA_POLL_GAP`] after the previous one, so a
/// flapping universe cannot multiply the request rate (SPEC §7).
pub async fn run_poller(
    cfg: Arc<Config>,
    redis: store::Redis,
    allowlist: AllowlistHandle,
    positioned: Positioned,
    metrics: Arc<Metrics>,
    mut gained: watch::Receiver<u64>,
    cancel: CancellationToken,
) {
    let client = match Client::new(&cfg, metrics.clone()) {
        Ok(c) => c,
        Err(e) => {
            warn!("snapshots: cannot build the HTTP client: {e}; snapshots will age");
            return cancel.cancelled().await;
        }
    };
    let Some(mut con) = redis
        .connect("snapshot poller", Duration::from_secs(10), &cancel)
        .await
    else {
        return;
    };
    let source = source_label(&cfg.exchange_base_url);
    let mut tick = tokio::time::interval(cfg.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures = 0u64;
    let mut last_poll: Option<Instant> = None;
    // The symbols last named in the "plans denied" WARN: it is repeated only
    // when that set changes, not every cycle.
    let mut warned_invalid = String::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
            r = gained.changed() => {
                if r.is_err() { return cancel.cancelled().await; }
                if let Some(at) = last_poll.and_then(|t| t.checked_add(MIN_EXTRA_POLL_GAP)) {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep_until(at.into()) => {}
                    }
                }
                // Gains that came while waiting are covered by this poll.
                gained.borrow_and_update();
                info!("allowlist gained symbols: polling positions now");
            }
        }
        last_poll = Some(Instant::now());
        let allow = allowlist.load();
        let mut symbols: Vec<String> = allow.symbols.iter().cloned().collect();
        symbols.sort();
        if symbols.is_empty() {
            continue;
        }
        let started = Instant::now();
        let fetched = tokio::select! {
            _ = cancel.cancelled() => return,
            r = client.signed_get("/fapi/v2/positionRisk") => r.and_then(|v| parse_positions(&v)),
        };
        let positions = match fetched {
            Ok(p) => p,
            Err(e) => {
                failures += 1;
                if failures <= 3 || failures.is_multiple_of(20) {
                    warn!(
                        "snapshots: positionRisk failed ({failures} in a row): {e}; snapshots age"
                    );
                }
                continue;
            }
        };
        let ts_ms = store::now_ms();
        let ts = ts_ms as f64 / 1000.0;
        // The position cap's view is the exchange's answer, whether or not
        // every hash below is written: a write that fails for one key (one
        // of another type) must not leave the cap counting an old view.
        positioned.set(
            symbols
                .iter()
                .filter(|s| {
                    positions
                        .get(*s)
                        .is_some_and(|p| p.side != PositionSide::None)
                })
                .cloned()
                .collect(),
        );
        match write_snapshots(
            &mut con,
            &symbols,
            &positions,
            ts_ms,
            source,
            cfg.canonical_positions,
        )
        .await
        {
            Ok(()) => {
                if failures > 0 {
                    info!("snapshots: positionRisk recovered after {failures} failed cycle(s)");
                }
                failures = 0;
                let mut invalid = String::new();
                for s in &symbols {
                    if let Some(p) = positions.get(s).filter(|p| p.side == PositionSide::Hedged) {
                        let why = p
                            .problem
                            .unwrap_or("hedge-mode positions open on both sides");
                        invalid.push_str(&format!(" {s} ({why})"));
                    }
                }
                if invalid != warned_invalid {
                    if !invalid.is_empty() {
                        warn!("snapshots: written as HEDGED, plans denied:{invalid}");
                    }
                    warned_invalid = invalid;
                }
                for s in &symbols {
                    let amt = positions
                        .get(s)
                        .map_or(0.0, |p| dec_str(p.amt).parse().unwrap_or(0.0));
                    metrics.observe_snapshot(s, ts, amt);
                }
                let keep: HashSet<&str> = symbols.iter().map(String::as_str).collect();
                metrics.retain_snapshot_symbols(&|s| keep.contains(s));
                metrics
                    .snapshot_cycle_seconds
                    .observe(started.elapsed().as_secs_f64());
            }
            Err(e) => warn!("snapshots: writing {} hashes failed: {e}", symbols.len()),
        }
    }
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
    fn positions_one_way_and_hedge_mode() {
        let v = json!([
            {"symbol": "BTCUSDT", "positionAmt": "0.038", "positionSide": "BOTH", "entryPrice": "60000", "markPrice": "60100", "unRealizedProfit": "3.8", "leverage": "5"},
            {"symbol": "ETHUSDT", "positionAmt": "0", "positionSide": "LONG"},
            {"symbol": "ETHUSDT", "positionAmt": "-1.5", "positionSide": "SHORT", "entryPrice": "3000"},
            {"symbol": "SOLUSDT", "positionAmt": "2", "positionSide": "LONG"},
            {"symbol": "SOLUSDT", "positionAmt": "-1", "positionSide": "SHORT"},
            {"symbol": "XRPUSDT", "positionAmt": "0.000", "positionSide": "BOTH"}
        ]);
        let p = parse_positions(&v).unwrap();
        assert_eq!(
            (p["BTCUSDT"].side.as_str(), dec_str(p["BTCUSDT"].amt)),
            ("LONG", "0.038".into())
        );
        assert_eq!(
            (p["ETHUSDT"].side.as_str(), dec_str(p["ETHUSDT"].amt)),
            ("SHORT", "-1.5".into())
        );
        assert_eq!(p["SOLUSDT"].side, PositionSide::Hedged);
        assert_eq!(
            (p["XRPUSDT"].side.as_str(), dec_str(p["XRPUSDT"].amt)),
            ("NONE", "0".into())
        );
        assert!(parse_positions(&json!({"code": -1})).is_err());
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
    fn hostile_position_rows_make_the_symbol_invalid_never_a_panic() {
        let v = json!([
            {"symbol": "DUPUSDT", "positionAmt": "79228162514264337593543950335", "positionSide": "BOTH"},
            {"symbol": "DUPUSDT", "positionAmt": "79228162514264337593543950335", "positionSide": "BOTH"},
            {"symbol": "TWINUSDT", "positionAmt": "1.5", "positionSide": "BOTH"},
            {"symbol": "TWINUSDT", "positionAmt": "1.5", "positionSide": "BOTH"},
            {"symbol": "SPLITUSDT", "positionAmt": "1.5"},
            {"symbol": "SPLITUSDT", "positionAmt": "2"},
            {"symbol": "HUGEUSDT", "positionAmt": "1e27"},
            {"symbol": "TEXTUSDT", "positionAmt": "lots"},
            {"symbol": "MISSINGUSDT"}
        ]);
        let p = parse_positions(&v).unwrap();
        assert_eq!(p["DUPUSDT"].side, PositionSide::Hedged);
        assert!(p["DUPUSDT"].problem.is_some());
        assert_eq!(
            (p["TWINUSDT"].side.as_str(), p["TWINUSDT"].amt),
            ("LONG", Decimal::from_str("1.5").unwrap())
        );
        assert_eq!(p["SPLITUSDT"].side, PositionSide::Hedged);
        assert_eq!(p["HUGEUSDT"].side, PositionSide::Hedged);
        assert_eq!(p["TEXTUSDT"].side, PositionSide::Hedged);
        assert_eq!(p["MISSINGUSDT"].side, PositionSide::Hedged);
        assert!(parse_positions(&json!([{"positionAmt": "1"}])).is_err());
        // Another shape than Binance's strings fails the whole reply.
        for amt in [json!(0.25), json!(null), json!(["1"]), json!(true)] {
            let v = json!([{"symbol": "OKUSDT", "positionAmt": "1"}, {"symbol": "NUMUSDT", "positionAmt": amt}]);
            let e = parse_positions(&v).unwrap_err().to_string();
            assert!(
                e.contains("NUMUSDT") && e.contains("not a string"),
                "{amt}: {e}"
            );
        }
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

    #[test]
    fn source_label_from_host() {
        assert_eq!(
            source_label("https://testnet.binancefuture.com"),
            "binance_testnet"
        );
        assert_eq!(source_label("https://fapi.binance.com"), "binance");
        assert_eq!(source_label("http://127.0.0.1:9000"), "binance");
    }
}
