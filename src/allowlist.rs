//! Allowlist: which symbols P3.3 writes permits for (SPEC §3).
//!
//! Reads `quantum:cfg:universe:active` (string, JSON), `quantum:cfg:universe:meta`
//! (hash) and `quantum:cfg:universe:last_ok` (string, JSON) in one server-side
//! script, then [`resolve`] — a pure function of what was read, the env list,
//! `now` and the limits — picks the first usable tier:
//! universe → last_ok → env → none. Fail-closed is strict: when every tier
//! fails the allowlist is empty, whatever an earlier resolution found.
//!
//! The result is published through [`AllowlistHandle`], an `ArcSwap` that
//! plan handling reads without a lock. A universe-derived list carries its
//! expiry instant (`asof_epoch + MAX_AGE`); [`Allowlist::contains`] refuses
//! every symbol past it, and the refresher re-resolves at that instant.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{AllowlistMode, Config};
use crate::observe::metrics::Metrics;
use crate::redis::store;

/// Largest universe document accepted, bytes.
pub const MAX_DOC_BYTES: usize = 1024 * 1024;
/// Most symbols accepted in one document.
pub const MAX_SYMBOLS: usize = 10_000;
/// How many dropped entries a WARN names (the rest are counted).
const MAX_DROPPED_NAMED: usize = 10;

/// `"btcusdt" (lower case; …)`: a dropped entry and why, cut for the log.
fn dropped_example(s: &str) -> String {
    format!(
        "{:?} ({})",
        crate::text::clip(s),
        crate::redis::keys::symbol_problem(s).unwrap_or("invalid")
    )
}

/// The shortest time between two re-resolutions at an expiry instant.
const MIN_EXPIRY_GAP: Duration = Duration::from_secs(1);

/// How far in the future an `asof_epoch` may be (clock skew), seconds.
pub const MAX_FUTURE_S: f64 = 60.0;

/// The tier an allowlist came from; the label is the log's `source=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    /// Tier 1: the active universe document.
    Universe,
    /// Tier 2: the last good universe document.
    LastOk,
    /// Tier 3: `P33_ALLOWLIST`.
    Env,
    /// Tier 4: nothing usable; every plan is refused.
    None,
}

impl Source {
    /// The label used in logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Source::Universe => "universe",
            Source::LastOk => "last_ok",
            Source::Env => "env",
            Source::None => "none",
        }
    }
}

/// Why a tier was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The key does not exist.
    Missing,
    /// meta `stale` is not 0 (or missing).
    Stale,
    /// meta `count` is not > 0, or the env list is empty.
    Empty,
    /// The data is older than `P33_UNIVERSE_MAX_AGE_S` (or has no `asof_epoch`).
    TooOld,
    /// Not a JSON object with a `symbols` list, not a string key, or too large.
    ParseError,
    /// Parsed, but no valid symbol in it.
    NoSymbols,
    /// `asof_epoch` more than 60 s in the future.
    Future,
    /// Redis could not be read.
    LoadError,
}

impl Refusal {
    /// The label used in the source-change WARN.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Missing => "missing",
            Refusal::Stale => "stale",
            Refusal::Empty => "empty",
            Refusal::TooOld => "too_old",
            Refusal::ParseError => "parse_error",
            Refusal::NoSymbols => "no_symbols",
            Refusal::Future => "future",
            Refusal::LoadError => "load_error",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// A Redis value as read: absent, a string, or a key of another type.
#[derive(Debug, Clone, PartialEq)]
pub enum Doc {
    /// The key does not exist.
    Missing,
    /// A string value.
    Text(String),
    /// The key holds another Redis type.
    WrongType,
}

/// What one round trip read from Redis.
#[derive(Debug, Clone, PartialEq)]
pub struct UniverseRead {
    /// The active document (`quantum:cfg:universe:active`).
    pub active: Doc,
    /// The meta hash (empty when missing or of another type).
    pub meta: HashMap<String, String>,
    /// The last good document (`quantum:cfg:universe:last_ok`).
    pub last_ok: Doc,
}

/// The limits resolution applies.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Oldest universe data ever used, seconds (`P33_UNIVERSE_MAX_AGE_S`).
    pub max_age_s: f64,
}

/// The outcome of one resolution.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolution {
    /// The tier that won.
    pub source: Source,
    /// The valid symbols it holds.
    pub symbols: HashSet<String>,
    /// The `asof_epoch` the log line shows (meta's for tier 1, the document's
    /// for tier 2).
    pub asof: Option<f64>,
    /// `now − asof`, for tiers 1 and 2.
    pub age_s: Option<f64>,
    /// Instant after which this list must not be used (tiers 1 and 2).
    pub expires_at: Option<f64>,
    /// Why each tier tried before the chosen one was refused.
    pub refused: Vec<(Source, Refusal)>,
    /// Invalid entries dropped from the chosen source.
    pub dropped_invalid: usize,
    /// The first few of them, each with why (for the WARN line).
    pub dropped_examples: Vec<String>,
    /// meta `count` when it differs from the number of symbols loaded.
    pub meta_count_mismatch: Option<i64>,
}

impl Resolution {
    /// The fields after `source=<label> ` in the resolution log line.
    pub fn log_fields(&self) -> String {
        let n = self.symbols.len();
        let asof = self.asof.map_or(0, |a| a.floor() as i64);
        let age = self.age_s.map_or(0, |a| a.floor() as i64);
        match self.source {
            Source::Universe => format!("stale=0 count={n} asof_epoch={asof} age_s={age}"),
            Source::LastOk => format!("stale=1 count={n} asof_epoch={asof} age_s={age}"),
            Source::Env => format!("stale=env count={n} asof_epoch=static age_s=0"),
            Source::None => "stale=? count=0 asof_epoch=? age_s=?".to_string(),
        }
    }

    /// The exact INFO line of SPEC §3.
    pub fn log_line(&self) -> String {
        format!(
            "P3.3 allowlist source={} {}",
            self.source.label(),
            self.log_fields()
        )
    }

    /// `universe=stale last_ok=too_old`, for the source-change WARN.
    pub fn refusals_text(&self) -> String {
        if self.refused.is_empty() {
            return "none".to_string();
        }
        self.refused
            .iter()
            .map(|(s, r)| format!("{}={}", s.label(), r.label()))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

pub use crate::redis::keys::valid_symbol;

/// A parsed universe document.
struct ParsedDoc {
    symbols: HashSet<String>,
    dropped: usize,
    dropped_examples: Vec<String>,
    asof: Option<f64>,
}

/// A number that may arrive as a JSON number or a numeric string.
fn num(v: &serde_json::Value) -> Option<f64> {
    match v {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
    .filter(|x| x.is_finite())
}

/// A document's `asof_epoch`: absent is `None` ("too old" later); present
/// but not a finite number is a parse error.
fn doc_asof(v: &serde_json::Value) -> Result<Option<f64>, Refusal> {
    match v.get("asof_epoch") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(x) => num(x).map(Some).ok_or(Refusal::ParseError),
    }
}

fn parse_doc(doc: &Doc) -> Result<ParsedDoc, Refusal> {
    let text = match doc {
        Doc::Missing => return Err(Refusal::Missing),
        Doc::WrongType => return Err(Refusal::ParseError),
        Doc::Text(t) => t,
    };
    if text.len() > MAX_DOC_BYTES {
        return Err(Refusal::ParseError);
    }
    let v: serde_json::Value = serde_json::from_str(text).map_err(|_| Refusal::ParseError)?;
    let list = v
        .get("symbols")
        .and_then(|s| s.as_array())
        .ok_or(Refusal::ParseError)?;
    if list.len() > MAX_SYMBOLS {
        return Err(Refusal::ParseError);
    }
    let mut symbols = HashSet::with_capacity(list.len());
    let mut dropped = 0;
    let mut dropped_examples = Vec::new();
    for s in list {
        match s.as_str() {
            Some(s) if valid_symbol(s) => {
                symbols.insert(s.to_string());
            }
            other => {
                dropped += 1;
                if dropped_examples.len() < MAX_DROPPED_NAMED {
                    dropped_examples.push(match other {
                        Some(s) => dropped_example(s),
                        None => format!("{} (not a string)", crate::text::clip(&s.to_string())),
                    });
                }
            }
        }
    }
    Ok(ParsedDoc {
        symbols,
        dropped,
        dropped_examples,
        asof: doc_asof(&v)?,
    })
}

/// Age check shared by tiers 1 and 2: missing asof is "too old".
fn check_age(asof: Option<f64>, now: f64, lim: &Limits) -> Result<(f64, f64), Refusal> {
    let asof = asof.unwrap_or(0.0);
    if asof - now > MAX_FUTURE_S {
        return Err(Refusal::Future);
    }
    let age = now - asof;
    if age > lim.max_age_s {
        return Err(Refusal::TooOld);
    }
    Ok((asof, age))
}

fn tier_universe(read: &UniverseRead, now: f64, lim: &Limits) -> Result<Resolution, Refusal> {
    if read.active == Doc::Missing {
        return Err(Refusal::Missing);
    }
    // A meta number present but not finite (NaN, inf, text) is a
    // parse_error: NaN would pass every comparison (SPEC §3).
    let meta_num = |k: &str| -> Result<Option<f64>, Refusal> {
        match read.meta.get(k) {
            None => Ok(None),
            Some(v) => v
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or(Refusal::ParseError),
        }
    };
    // meta `stale` must parse as 0; missing counts as stale.
    if meta_num("stale")? != Some(0.0) {
        return Err(Refusal::Stale);
    }
    let meta_count = meta_num("count")?.unwrap_or(0.0);
    if meta_count <= 0.0 {
        return Err(Refusal::Empty);
    }
    let (asof, age) = check_age(meta_num("asof_epoch")?, now, lim)?;
    let doc = parse_doc(&read.active)?;
    if doc.symbols.is_empty() {
        return Err(Refusal::NoSymbols);
    }
    let mc = meta_count as i64;
    Ok(Resolution {
        source: Source::Universe,
        meta_count_mismatch: (mc != doc.symbols.len() as i64).then_some(mc),
        symbols: doc.symbols,
        asof: Some(asof),
        age_s: Some(age),
        expires_at: Some(asof + lim.max_age_s),
        refused: Vec::new(),
        dropped_invalid: doc.dropped,
        dropped_examples: doc.dropped_examples,
    })
}

fn tier_last_ok(read: &UniverseRead, now: f64, lim: &Limits) -> Result<Resolution, Refusal> {
    let doc = parse_doc(&read.last_ok)?;
    if doc.symbols.is_empty() {
        return Err(Refusal::NoSymbols);
    }
    let (asof, age) = check_age(doc.asof, now, lim)?;
    Ok(Resolution {
        source: Source::LastOk,
        symbols: doc.symbols,
        asof: Some(asof),
        age_s: Some(age),
        expires_at: Some(asof + lim.max_age_s),
        refused: Vec::new(),
        dropped_invalid: doc.dropped,
        dropped_examples: doc.dropped_examples,
        meta_count_mismatch: None,
    })
}

fn tier_env(env: &[String]) -> Result<Resolution, Refusal> {
    if env.is_empty() {
        return Err(Refusal::Empty);
    }
    let symbols: HashSet<String> = env.iter().filter(|s| valid_symbol(s)).cloned().collect();
    if symbols.is_empty() {
        return Err(Refusal::NoSymbols);
    }
    let dropped = env.iter().filter(|s| !valid_symbol(s)).count();
    let dropped_examples = env
        .iter()
        .filter(|s| !valid_symbol(s))
        .take(MAX_DROPPED_NAMED)
        .map(|s| dropped_example(s))
        .collect();
    Ok(Resolution {
        source: Source::Env,
        symbols,
        asof: None,
        age_s: None,
        expires_at: None,
        refused: Vec::new(),
        dropped_invalid: dropped,
        dropped_examples,
        meta_count_mismatch: None,
    })
}

/// Picks the first usable tier. `read` is `Err(())` when Redis could not be
/// read, which refuses tiers 1 and 2 with `load_error`. No I/O, no clock.
pub fn resolve(
    read: Result<&UniverseRead, ()>,
    env: &[String],
    mode: AllowlistMode,
    now: f64,
    lim: &Limits,
) -> Resolution {
    let mut refused = Vec::new();
    if mode == AllowlistMode::Universe {
        match read {
            Err(()) => {
                refused.push((Source::Universe, Refusal::LoadError));
                refused.push((Source::LastOk, Refusal::LoadError));
            }
            Ok(read) => {
                match tier_universe(read, now, lim) {
                    Ok(r) => return Resolution { refused, ..r },
                    Err(e) => refused.push((Source::Universe, e)),
                }
                match tier_last_ok(read, now, lim) {
                    Ok(r) => return Resolution { refused, ..r },
                    Err(e) => refused.push((Source::LastOk, e)),
                }
            }
        }
    }
    match tier_env(env) {
        Ok(r) => return Resolution { refused, ..r },
        Err(e) => refused.push((Source::Env, e)),
    }
    Resolution {
        source: Source::None,
        symbols: HashSet::new(),
        asof: None,
        age_s: None,
        expires_at: None,
        refused,
        dropped_invalid: 0,
        dropped_examples: Vec::new(),
        meta_count_mismatch: None,
    }
}

/// The allowlist in force.
#[derive(Debug, Clone)]
pub struct Allowlist {
    /// The tier the list came from.
    pub source: Source,
    /// The symbols that get permits.
    pub symbols: HashSet<String>,
    /// Past this instant the list refuses every symbol (tiers 1–2).
    pub expires_at: Option<f64>,
}

impl Allowlist {
    /// The empty, fail-closed list in force before the first resolution.
    pub fn empty() -> Self {
        Allowlist {
            source: Source::None,
            symbols: HashSet::new(),
            expires_at: None,
        }
    }

    /// Whether a plan for `symbol` may be considered at `now`.
    pub fn contains(&self, symbol: &str, now: f64) -> bool {
        self.expires_at.is_none_or(|e| now <= e) && self.symbols.contains(symbol)
    }
}

/// Shared, lock-free-on-read handle to the allowlist in force.
#[derive(Clone)]
pub struct AllowlistHandle(Arc<ArcSwap<Allowlist>>);

impl Default for AllowlistHandle {
    fn default() -> Self {
        AllowlistHandle(Arc::new(ArcSwap::from_pointee(Allowlist::empty())))
    }
}

impl AllowlistHandle {
    /// The current list (a cheap reference-counted snapshot).
    pub fn load(&self) -> Arc<Allowlist> {
        self.0.load_full()
    }
    fn store(&self, a: Allowlist) {
        self.0.store(Arc::new(a));
    }
}

/// Reads active, meta and last_ok in one round trip.
pub async fn read_universe(
    con: &mut crate::redis::store::Conn,
    cfg: &Config,
) -> Result<UniverseRead, redis::RedisError> {
    type Str = (String, Vec<u8>);
    let (active, meta, last_ok): (Str, Vec<String>, Str) = crate::redis::scripts::READ_UNIVERSE
        .invoke(
            con,
            &[
                &cfg.universe_key_active,
                &cfg.universe_key_meta,
                &cfg.universe_key_last_ok,
            ],
        )
        .await?;
    let doc = |(t, v): Str| match t.as_str() {
        "none" => Doc::Missing,
        // Non-UTF-8 bytes cannot be a JSON document: a parse error.
        "string" => String::from_utf8(v).map_or(Doc::WrongType, Doc::Text),
        _ => Doc::WrongType,
    };
    let meta = meta
        .chunks_exact(2)
        .map(|kv| (kv[0].clone(), kv[1].clone()))
        .collect();
    Ok(UniverseRead {
        active: doc(active),
        meta,
        last_ok: doc(last_ok),
    })
}

/// Resolves from Redis (or refuses tiers 1–2 on a read error), publishes the
/// result, logs the SPEC §3 lines and updates the gauges.
pub struct Resolver {
    cfg: Arc<Config>,
    handle: AllowlistHandle,
    metrics: Arc<Metrics>,
    last_source: Option<Source>,
    gained: Option<tokio::sync::watch::Sender<u64>>,
    /// Whether the WARN that Redis did not answer was said for this outage.
    keeping: bool,
}

impl Resolver {
    /// A resolver publishing to `handle`.
    pub fn new(cfg: Arc<Config>, handle: AllowlistHandle, metrics: Arc<Metrics>) -> Self {
        Resolver {
            cfg,
            handle,
            metrics,
            last_source: None,
            gained: None,
            keeping: false,
        }
    }

    /// Bumps `tx` whenever a resolution adds symbols, so the snapshot poller
    /// polls at once instead of at its next period.
    pub fn on_gain(&mut self, tx: tokio::sync::watch::Sender<u64>) {
        self.gained = Some(tx);
    }

    /// One resolution: read (unless env mode), decide, publish, log.
    /// `None`: Redis did not answer (SPEC §3) — no answer is not an empty
    /// one: the resolution in force stays (a universe or last_ok list still
    /// expires at its own instant, [`Allowlist::expires_at`]), and the
    /// caller retries every second until Redis answers.
    pub async fn refresh(
        &mut self,
        con: Option<&mut crate::redis::store::Conn>,
    ) -> Option<Resolution> {
        let read = match (self.cfg.allowlist_mode, con) {
            (AllowlistMode::Env, _) => Err(()),
            (AllowlistMode::Universe, None) => Err(()),
            (AllowlistMode::Universe, Some(con)) => {
                let got =
                    tokio::time::timeout(Duration::from_secs(5), read_universe(con, &self.cfg))
                        .await;
                match got {
                    // Whether Redis answered is known here too, not only to
                    // the plan loop: p33_redis_up follows every reader.
                    Ok(Ok(r)) => {
                        self.metrics.set_redis_up(true);
                        self.keeping = false;
                        Ok(r)
                    }
                    // An error reply for these keys (NOPERM, a wrong type):
                    // Redis answered, tiers 1-2 are refused load_error.
                    Ok(Err(e)) if answered(&e) => {
                        self.metrics.set_redis_up(true);
                        self.keeping = false;
                        warn!("allowlist: reading the universe keys failed: {e}");
                        Err(())
                    }
                    other => {
                        self.metrics.set_redis_up(false);
                        let why = match other {
                            Ok(Err(e)) => crate::text::clip(&e.to_string()).into_owned(),
                            _ => "no reply within 5 s".to_string(),
                        };
                        if !self.keeping {
                            self.keeping = true;
                            match self.last_source {
                                Some(s) => warn!(
                                    "allowlist: Redis read failed ({why}): keeping source={} until it answers",
                                    s.label()
                                ),
                                None => warn!(
                                    "allowlist: Redis read failed ({why}): no resolution yet; retrying every second"
                                ),
                            }
                        }
                        return None;
                    }
                }
            }
        };
        let lim = Limits {
            max_age_s: self.cfg.universe_max_age_s,
        };
        let res = resolve(
            read.as_ref().map_err(|_| ()),
            &self.cfg.allowlist_env,
            self.cfg.allowlist_mode,
            store::now_epoch(),
            &lim,
        );
        self.publish(&res);
        Some(res)
    }

    fn publish(&mut self, res: &Resolution) {
        if res.dropped_invalid > 0 {
            warn!(
                "P3.3 allowlist: dropped {} invalid symbol(s) from source={} (a symbol must match ^[A-Z0-9]{{1,32}}$): {}{}",
                res.dropped_invalid,
                res.source.label(),
                res.dropped_examples.join(", "),
                if res.dropped_invalid > res.dropped_examples.len() { ", …" } else { "" }
            );
        }
        if let Some(mc) = res.meta_count_mismatch {
            warn!(
                "P3.3 allowlist: universe meta count={mc} differs from the {} symbols loaded from the active document",
                res.symbols.len()
            );
        }
        if res.source == Source::None {
            error!("FAIL-CLOSED: No valid allowlist from any source!");
        }
        if let Some(old) = self.last_source.filter(|o| *o != res.source) {
            warn!(
                "P3.3 allowlist source changed: {} -> {} (refused: {})",
                old.label(),
                res.source.label(),
                res.refusals_text()
            );
        }
        self.last_source = Some(res.source);
        let old = self.handle.load();
        let gained = res.symbols.iter().any(|s| !old.symbols.contains(s));
        // Swap before logging so the line never announces a list not yet in force.
        self.handle.store(Allowlist {
            source: res.source,
            symbols: res.symbols.clone(),
            expires_at: res.expires_at,
        });
        self.metrics.set_allowlist(
            res.source.label(),
            res.symbols.len(),
            res.asof
                .filter(|_| matches!(res.source, Source::Universe | Source::LastOk)),
        );
        info!("{}", res.log_line());
        if gained {
            if let Some(tx) = &self.gained {
                tx.send_modify(|n| *n += 1);
            }
        }
    }
}

/// How often the universe keys are read again while Redis does not answer.
pub const NO_ANSWER_RETRY: Duration = Duration::from_secs(1);

/// Whether an error is Redis's answer for these keys (an error reply), not
/// the lack of one (a dropped connection, a timeout, a server still loading
/// its data or without a master).
pub fn answered(e: &redis::RedisError) -> bool {
    !(e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || matches!(
            e.code(),
            Some("LOADING" | "BUSY" | "MASTERDOWN" | "READONLY" | "TRYAGAIN")
        ))
}

/// Refreshes every `P33_ALLOWLIST_REFRESH_S`, at the expiry instant of
/// universe-derived data, and whenever `reload` is notified (SIGHUP). The
/// first resolution is done by the caller, before plans are read.
pub async fn run_refresher(
    mut resolver: Resolver,
    mut con: Option<crate::redis::store::Conn>,
    mut expires_at: Option<f64>,
    reload: Arc<Notify>,
    cancel: CancellationToken,
) {
    let period = resolver.cfg.allowlist_refresh;
    let mut last_expiry_wake: Option<std::time::Instant> = None;
    let mut retry = false;
    loop {
        let mut wait = if retry {
            period.min(NO_ANSWER_RETRY)
        } else {
            period
        };
        let mut expiry_wake = false;
        if let Some(e) = expires_at {
            // Wake just past the expiry instant, so the age check refuses it
            // — but at most once per second: no value may make this spin.
            let until = (e - store::now_epoch()).max(0.0) + 0.001;
            let mut at = Duration::try_from_secs_f64(until).unwrap_or(period);
            if let Some(last) = last_expiry_wake {
                at = at.max(MIN_EXPIRY_GAP.saturating_sub(last.elapsed()));
            }
            if at < wait {
                wait = at;
                expiry_wake = true;
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
            _ = reload.notified() => info!("SIGHUP: re-resolving the allowlist"),
        }
        if expiry_wake {
            last_expiry_wake = Some(std::time::Instant::now());
        }
        // Redis not answering: the list in force stays; asked again every
        // second until it answers (its expiry still applies meanwhile).
        retry = match resolver.refresh(con.as_mut()).await {
            Some(res) => {
                expires_at = res.expires_at;
                false
            }
            None => true,
        };
    }
}

#[cfg(test)]
mod tests;
