//! Configuration: every variable of SPEC §2, parsed once and validated.
//!
//! Raw values are read with `envy` into structs of `Option<String>` (one for the
//! `P33_` prefix, one for the unprefixed `REDIS_*`, `BINANCE_*` and legacy
//! names) and then parsed here, so that every bad variable is reported with its
//! name and value before the process exits 78. Tests feed an iterator of pairs
//! (`Config::from_pairs`); nothing here calls `std::env::set_var`.
//!
//! Secrets (exchange key and secret, the Redis password) live in [`Secret`],
//! whose `Debug` prints `[redacted]`; only request signing and the Redis
//! connection call [`Secret::expose`].

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::keys;

/// Exit code for a configuration error (sysexits `EX_CONFIG`); the systemd unit
/// sets `RestartPreventExitStatus=78` so a typo does not crash-loop.
pub const EXIT_CONFIG: i32 = 78;

/// A string that must never reach a log line, a panic message or `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself: call only where a request header, a signature or a
    /// Redis AUTH is built.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Where exchange position snapshots come from (SPEC §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotSource {
    /// P3.3 polls `positionRisk` and writes the snapshot hashes itself.
    Binance,
    /// Another process keeps the hashes fresh; P3.3 only reads them.
    External,
}

/// Where allowlist resolution starts (SPEC §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllowlistMode {
    /// Tiers 1 → 2 → 3 → 4.
    Universe,
    /// Tiers 3 → 4.
    Env,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (journald).
    Text,
    /// One JSON object per line.
    Json,
}

/// The Redis server to talk to. `Debug` hides the password.
#[derive(Clone)]
pub struct RedisTarget {
    /// Connection parameters, password included: hand only to `redis::Client`.
    pub info: redis::ConnectionInfo,
}

impl RedisTarget {
    /// `redis://host:port/db` with any credentials replaced by `[redacted]`.
    pub fn display(&self) -> String {
        let r = &self.info.redis;
        let auth = if r.password.is_some() || r.username.is_some() {
            "[redacted]@"
        } else {
            ""
        };
        match &self.info.addr {
            redis::ConnectionAddr::Tcp(h, p) => format!("redis://{auth}{h}:{p}/{}", r.db),
            redis::ConnectionAddr::TcpTls { host, port, .. } => {
                format!("rediss://{auth}{host}:{port}/{}", r.db)
            }
            redis::ConnectionAddr::Unix(path) => {
                format!("unix://{auth}{}?db={}", path.display(), r.db)
            }
        }
    }
}

impl fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display())
    }
}

/// The effective configuration of the daemon.
#[derive(Debug, Clone)]
pub struct Config {
    pub redis: RedisTarget,
    pub binance_api_key: Option<Secret>,
    pub binance_api_secret: Option<Secret>,
    pub exchange_base_url: String,
    pub snapshot_source: SnapshotSource,
    /// Raw tier-3 list (validated at resolution time, so that the WARN about
    /// dropped entries is logged with the resolution that drops them).
    pub allowlist_env: Vec<String>,
    pub allowlist_mode: AllowlistMode,
    pub universe_key_active: String,
    pub universe_key_last_ok: String,
    pub universe_key_meta: String,
    /// Oldest universe data ever used, seconds.
    pub universe_max_age_s: f64,
    pub allowlist_refresh: Duration,
    pub poll_interval: Duration,
    /// Oldest snapshot a plan may be judged on, seconds.
    pub stale_threshold_s: f64,
    pub cooldown_s: f64,
    pub qty_tolerance_pct: f64,
    pub permit_ttl: Duration,
    pub plan_max_age_s: f64,
    pub metrics_addr: IpAddr,
    pub metrics_port: u16,
    /// `tracing` filter directive (from `RUST_LOG` when set).
    pub log_filter: String,
    pub log_format: LogFormat,
    pub dry_run: bool,
    pub consumer_group: String,
    pub consumer_name: String,
    pub claim_idle: Duration,
    pub canonical_positions: bool,
    /// Legacy variables that were set and are ignored (named once in a WARN).
    pub legacy_present: Vec<&'static str>,
    /// `P33_*` variables that this daemon does not know (likely typos).
    pub unknown_p33: Vec<String>,
}

/// One variable that could not be used.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub var: String,
    /// The value as given (never a secret: secrets are not parsed).
    pub value: String,
    pub why: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid configuration: {}={:?}: {}",
            self.var, self.value, self.why
        )
    }
}

/// Every problem found, reported together.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// `P33_*` variables, read with `envy::prefixed("P33_")`.
#[derive(Debug, Default, Deserialize)]
struct RawP33 {
    exchange_base_url: Option<String>,
    snapshot_source: Option<String>,
    allowlist: Option<String>,
    allowlist_source: Option<String>,
    universe_key_active: Option<String>,
    universe_key_last_ok: Option<String>,
    universe_key_meta: Option<String>,
    universe_max_age_s: Option<String>,
    allowlist_refresh_s: Option<String>,
    poll_sec: Option<String>,
    stale_threshold_sec: Option<String>,
    cooldown_sec: Option<String>,
    qty_tolerance_pct: Option<String>,
    permit_ttl: Option<String>,
    plan_max_age_s: Option<String>,
    metrics_port: Option<String>,
    metrics_addr: Option<String>,
    log_level: Option<String>,
    log_format: Option<String>,
    dry_run: Option<String>,
    consumer_group: Option<String>,
    consumer_name: Option<String>,
    claim_idle_s: Option<String>,
    canonical_positions: Option<String>,
}

/// Unprefixed variables, read with `envy::from_iter`. Secrets go straight
/// into [`Secret`] and are never echoed.
#[derive(Default, Deserialize)]
struct RawOther {
    redis_url: Option<String>,
    redis_host: Option<String>,
    redis_port: Option<String>,
    redis_db: Option<String>,
    redis_password: Option<String>,
    binance_testnet_api_key: Option<String>,
    binance_testnet_api_secret: Option<String>,
    binance_api_key: Option<String>,
    binance_api_secret: Option<String>,
    apply_allowlist: Option<String>,
    rust_log: Option<String>,
}

/// Names of the known `P33_` variables, to spot typos and legacy names.
const KNOWN_P33: &[&str] = &[
    "P33_EXCHANGE_BASE_URL",
    "P33_SNAPSHOT_SOURCE",
    "P33_ALLOWLIST",
    "P33_ALLOWLIST_SOURCE",
    "P33_UNIVERSE_KEY_ACTIVE",
    "P33_UNIVERSE_KEY_LAST_OK",
    "P33_UNIVERSE_KEY_META",
    "P33_UNIVERSE_MAX_AGE_S",
    "P33_ALLOWLIST_REFRESH_S",
    "P33_POLL_SEC",
    "P33_STALE_THRESHOLD_SEC",
    "P33_COOLDOWN_SEC",
    "P33_QTY_TOLERANCE_PCT",
    "P33_PERMIT_TTL",
    "P33_PLAN_MAX_AGE_S",
    "P33_METRICS_PORT",
    "P33_METRICS_ADDR",
    "P33_LOG_LEVEL",
    "P33_LOG_FORMAT",
    "P33_DRY_RUN",
    "P33_CONSUMER_GROUP",
    "P33_CONSUMER_NAME",
    "P33_CLAIM_IDLE_S",
    "P33_CANONICAL_POSITIONS",
];

/// Variables of older env files: accepted, ignored, named once in a WARN.
pub const LEGACY_VARS: &[&str] = &[
    "UNIVERSE_ENABLE",
    "UNIVERSE_CACHE_SECONDS",
    "P33_SNAPSHOT_TOP_N",
    "P33_INTENT_WINDOW_SEC",
    "P33_TARGET_CYCLE_SEC",
    "P33_MIN_TOP_K",
    "P33_ONDEMAND_SNAPSHOT",
    "P33_ONDEMAND_TTL_SEC",
];

/// Parses a boolean in any of the spellings SPEC §2 allows.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// Parses a number of seconds, fractions allowed (`0.5`).
fn parse_secs(s: &str) -> Option<f64> {
    let v: f64 = s.trim().parse().ok()?;
    v.is_finite().then_some(v)
}

/// Collects parse errors while building the config.
struct Parser {
    errors: Vec<ConfigError>,
}

impl Parser {
    fn err(&mut self, var: &str, value: &str, why: impl Into<String>) {
        self.errors.push(ConfigError {
            var: var.to_string(),
            value: value.to_string(),
            why: why.into(),
        });
    }

    /// Seconds, `min_exclusive`: value must be > 0; else ≥ 0.
    fn secs(&mut self, var: &str, raw: &Option<String>, default: f64, positive: bool) -> f64 {
        let Some(s) = raw else { return default };
        match parse_secs(s) {
            Some(v) if v > MAX_SECS => {
                self.err(
                    var,
                    s,
                    format!("must be at most {MAX_SECS} (a year, in seconds)"),
                );
                default
            }
            Some(v) if positive && v > 0.0 => v,
            Some(v) if !positive && v >= 0.0 => v,
            Some(_) if positive => {
                self.err(var, s, "must be a number of seconds greater than 0");
                default
            }
            _ => {
                self.err(
                    var,
                    s,
                    "must be a number of seconds (fractions allowed), e.g. 0.5",
                );
                default
            }
        }
    }

    fn boolean(&mut self, var: &str, raw: &Option<String>, default: bool) -> bool {
        let Some(s) = raw else { return default };
        parse_bool(s).unwrap_or_else(|| {
            self.err(var, s, "must be one of true/false/1/0/yes/no/on/off");
            default
        })
    }

    fn key(&mut self, var: &str, raw: &Option<String>, default: &str) -> String {
        match raw {
            Some(s) if s.trim().is_empty() => {
                self.err(var, s, "must not be empty");
                default.to_string()
            }
            Some(s) => s.trim().to_string(),
            None => default.to_string(),
        }
    }
}

/// The longest duration or age any variable takes, seconds (a year): a
/// larger one would overflow timer arithmetic, and no setting needs it.
const MAX_SECS: f64 = 31_536_000.0;

/// A `Duration` from positive, finite seconds (at most [`MAX_SECS`]).
fn dur(secs: f64) -> Duration {
    Duration::try_from_secs_f64(secs.clamp(0.0, MAX_SECS)).unwrap_or(Duration::ZERO)
}

/// This machine's host name, for the default consumer name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Config, ConfigErrors> {
        Self::from_pairs(std::env::vars())
    }

    /// Builds the configuration from `(name, value)` pairs.
    pub fn from_pairs<I>(vars: I) -> Result<Config, ConfigErrors>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let vars: Vec<(String, String)> = vars.into_iter().collect();
        let mut p = Parser { errors: Vec::new() };
        // envy fails as a whole only on a type error; every field is a string,
        // so these cannot fail on values, only on a non-UTF-8 environment,
        // which std::env::vars already refuses.
        let p33: RawP33 = envy::prefixed("P33_")
            .from_iter(vars.iter().cloned())
            .unwrap_or_default();
        let other: RawOther = envy::from_iter(vars.iter().cloned()).unwrap_or_default();

        let legacy_present: Vec<&'static str> = LEGACY_VARS
            .iter()
            .copied()
            .filter(|n| vars.iter().any(|(k, _)| k == n))
            .collect();
        let mut unknown_p33: Vec<String> = vars
            .iter()
            .map(|(k, _)| k)
            .filter(|k| k.starts_with("P33_"))
            .filter(|k| !KNOWN_P33.contains(&k.as_str()) && !LEGACY_VARS.contains(&k.as_str()))
            .cloned()
            .collect();
        unknown_p33.sort();

        let redis = redis_target(&mut p, &other);

        let snapshot_source = match p33.snapshot_source.as_deref().map(str::trim) {
            None | Some("binance") => SnapshotSource::Binance,
            Some("external") => SnapshotSource::External,
            Some(s) => {
                p.err("P33_SNAPSHOT_SOURCE", s, "must be `binance` or `external`");
                SnapshotSource::Binance
            }
        };
        let nonempty = |s: &Option<String>| s.clone().filter(|v| !v.trim().is_empty());
        let (key_name, key) = match nonempty(&other.binance_testnet_api_key) {
            Some(k) => ("BINANCE_TESTNET_API_KEY", Some(k)),
            None => ("BINANCE_API_KEY", nonempty(&other.binance_api_key)),
        };
        let (secret_name, secret) = match nonempty(&other.binance_testnet_api_secret) {
            Some(s) => ("BINANCE_TESTNET_API_SECRET", Some(s)),
            None => ("BINANCE_API_SECRET", nonempty(&other.binance_api_secret)),
        };
        if snapshot_source == SnapshotSource::Binance && (key.is_none() || secret.is_none()) {
            let missing: Vec<&str> = [(key.is_none(), key_name), (secret.is_none(), secret_name)]
                .iter()
                .filter(|(m, _)| *m)
                .map(|(_, n)| *n)
                .collect();
            p.err(
                "BINANCE_TESTNET_API_KEY/BINANCE_TESTNET_API_SECRET",
                "",
                format!(
                    "{} unset: exchange credentials (or BINANCE_API_KEY/BINANCE_API_SECRET) are required when P33_SNAPSHOT_SOURCE=binance",
                    missing.join(" and ")
                ),
            );
        }

        let exchange_base_url = p33
            .exchange_base_url
            .clone()
            .unwrap_or_else(|| "https://testnet.binancefuture.com".to_string());
        match url::Url::parse(exchange_base_url.trim()) {
            Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
            _ => p.err(
                "P33_EXCHANGE_BASE_URL",
                &exchange_base_url,
                "must be an http(s) URL",
            ),
        }
        let exchange_base_url = exchange_base_url.trim().trim_end_matches('/').to_string();

        let allowlist_raw = p33.allowlist.clone().or(other.apply_allowlist.clone());
        let allowlist_env: Vec<String> = allowlist_raw
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();

        let allowlist_mode = match p33.allowlist_source.as_deref().map(str::trim) {
            None | Some("universe") => AllowlistMode::Universe,
            Some("env") => AllowlistMode::Env,
            Some(s) => {
                p.err("P33_ALLOWLIST_SOURCE", s, "must be `universe` or `env`");
                AllowlistMode::Universe
            }
        };

        let universe_key_active = p.key(
            "P33_UNIVERSE_KEY_ACTIVE",
            &p33.universe_key_active,
            keys::UNIVERSE_ACTIVE,
        );
        let universe_key_last_ok = p.key(
            "P33_UNIVERSE_KEY_LAST_OK",
            &p33.universe_key_last_ok,
            keys::UNIVERSE_LAST_OK,
        );
        let universe_key_meta = p.key(
            "P33_UNIVERSE_KEY_META",
            &p33.universe_key_meta,
            keys::UNIVERSE_META,
        );

        let universe_max_age_s = p.secs(
            "P33_UNIVERSE_MAX_AGE_S",
            &p33.universe_max_age_s,
            300.0,
            true,
        );
        let refresh = p.secs(
            "P33_ALLOWLIST_REFRESH_S",
            &p33.allowlist_refresh_s,
            60.0,
            true,
        );
        let poll = p.secs("P33_POLL_SEC", &p33.poll_sec, 5.0, true);
        let stale_threshold_s = p.secs(
            "P33_STALE_THRESHOLD_SEC",
            &p33.stale_threshold_sec,
            10.0,
            true,
        );
        let cooldown_s = p.secs("P33_COOLDOWN_SEC", &p33.cooldown_sec, 15.0, false);
        let qty_tolerance_pct = p.secs("P33_QTY_TOLERANCE_PCT", &p33.qty_tolerance_pct, 1.0, false);
        let permit_ttl = p.secs("P33_PERMIT_TTL", &p33.permit_ttl, 60.0, true);
        if permit_ttl < 0.001 {
            p.err(
                "P33_PERMIT_TTL",
                p33.permit_ttl.as_deref().unwrap_or(""),
                "must be at least 0.001 seconds",
            );
        }
        let plan_max_age_s = p.secs("P33_PLAN_MAX_AGE_S", &p33.plan_max_age_s, 60.0, true);
        let claim_idle = p.secs("P33_CLAIM_IDLE_S", &p33.claim_idle_s, 30.0, true);

        let metrics_port = match &p33.metrics_port {
            None => 8045,
            Some(s) => s.trim().parse::<u16>().unwrap_or_else(|_| {
                p.err("P33_METRICS_PORT", s, "must be a TCP port number 0-65535");
                8045
            }),
        };
        let metrics_addr = match &p33.metrics_addr {
            None => IpAddr::from([0, 0, 0, 0]),
            Some(s) => s.trim().parse::<IpAddr>().unwrap_or_else(|_| {
                p.err(
                    "P33_METRICS_ADDR",
                    s,
                    "must be an IP address, e.g. 0.0.0.0 or 127.0.0.1",
                );
                IpAddr::from([0, 0, 0, 0])
            }),
        };

        let level = match p33
            .log_level
            .as_deref()
            .map(|s| s.trim().to_ascii_uppercase())
        {
            None => "info".to_string(),
            Some(l) => match l.as_str() {
                "TRACE" => "trace".into(),
                "DEBUG" => "debug".into(),
                "INFO" => "info".into(),
                "WARN" | "WARNING" => "warn".into(),
                "ERROR" | "CRITICAL" | "FATAL" => "error".into(),
                _ => {
                    p.err(
                        "P33_LOG_LEVEL",
                        p33.log_level.as_deref().unwrap_or(""),
                        "must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL",
                    );
                    "info".into()
                }
            },
        };
        let log_filter = match other.rust_log.as_deref().map(str::trim) {
            Some(f) if !f.is_empty() => {
                if tracing_subscriber::EnvFilter::try_new(f).is_err() {
                    p.err("RUST_LOG", f, "is not a valid tracing filter directive");
                }
                f.to_string()
            }
            _ => level,
        };
        let log_format = match p33
            .log_format
            .as_deref()
            .map(|s| s.trim().to_ascii_lowercase())
        {
            None => LogFormat::Text,
            Some(f) if f == "text" => LogFormat::Text,
            Some(f) if f == "json" => LogFormat::Json,
            Some(_) => {
                p.err(
                    "P33_LOG_FORMAT",
                    p33.log_format.as_deref().unwrap_or(""),
                    "must be `text` or `json`",
                );
                LogFormat::Text
            }
        };

        let dry_run = p.boolean("P33_DRY_RUN", &p33.dry_run, false);
        let canonical_positions =
            p.boolean("P33_CANONICAL_POSITIONS", &p33.canonical_positions, false);
        let default_group = if dry_run {
            keys::PLAN_GROUP_DRY_RUN
        } else {
            keys::PLAN_GROUP
        };
        let consumer_group = p.key("P33_CONSUMER_GROUP", &p33.consumer_group, default_group);
        let consumer_name = p.key(
            "P33_CONSUMER_NAME",
            &p33.consumer_name,
            &format!("p33-{}", hostname()),
        );

        if !p.errors.is_empty() {
            return Err(ConfigErrors(p.errors));
        }
        Ok(Config {
            redis,
            binance_api_key: key.map(Secret),
            binance_api_secret: secret.map(Secret),
            exchange_base_url,
            snapshot_source,
            allowlist_env,
            allowlist_mode,
            universe_key_active,
            universe_key_last_ok,
            universe_key_meta,
            universe_max_age_s,
            allowlist_refresh: dur(refresh),
            poll_interval: dur(poll),
            stale_threshold_s,
            cooldown_s,
            qty_tolerance_pct,
            permit_ttl: dur(permit_ttl),
            plan_max_age_s,
            metrics_addr,
            metrics_port,
            log_filter,
            log_format,
            dry_run,
            consumer_group,
            consumer_name,
            claim_idle: dur(claim_idle),
            canonical_positions,
            legacy_present,
            unknown_p33,
        })
    }

    /// The ledger-follower group (SPEC §8): its own in dry run, so a dry run
    /// never takes entries from the live follower.
    pub fn ledger_group(&self) -> &'static str {
        if self.dry_run {
            keys::LEDGER_GROUP_DRY_RUN
        } else {
            keys::LEDGER_GROUP
        }
    }

    /// The effective configuration as `NAME=value` lines, secrets redacted,
    /// for `--check-config`.
    pub fn effective(&self) -> BTreeMap<&'static str, String> {
        let secret = |s: &Option<Secret>| match s {
            Some(_) => "[redacted]".to_string(),
            None => "(unset)".to_string(),
        };
        let mut m = BTreeMap::new();
        m.insert("REDIS", self.redis.display());
        m.insert("BINANCE_API_KEY", secret(&self.binance_api_key));
        m.insert("BINANCE_API_SECRET", secret(&self.binance_api_secret));
        m.insert("P33_EXCHANGE_BASE_URL", self.exchange_base_url.clone());
        m.insert(
            "P33_SNAPSHOT_SOURCE",
            match self.snapshot_source {
                SnapshotSource::Binance => "binance",
                SnapshotSource::External => "external",
            }
            .into(),
        );
        m.insert("P33_ALLOWLIST", self.allowlist_env.join(","));
        m.insert(
            "P33_ALLOWLIST_SOURCE",
            match self.allowlist_mode {
                AllowlistMode::Universe => "universe",
                AllowlistMode::Env => "env",
            }
            .into(),
        );
        m.insert("P33_UNIVERSE_KEY_ACTIVE", self.universe_key_active.clone());
        m.insert(
            "P33_UNIVERSE_KEY_LAST_OK",
            self.universe_key_last_ok.clone(),
        );
        m.insert("P33_UNIVERSE_KEY_META", self.universe_key_meta.clone());
        m.insert(
            "P33_UNIVERSE_MAX_AGE_S",
            self.universe_max_age_s.to_string(),
        );
        m.insert(
            "P33_ALLOWLIST_REFRESH_S",
            self.allowlist_refresh.as_secs_f64().to_string(),
        );
        m.insert("P33_POLL_SEC", self.poll_interval.as_secs_f64().to_string());
        m.insert(
            "P33_STALE_THRESHOLD_SEC",
            self.stale_threshold_s.to_string(),
        );
        m.insert("P33_COOLDOWN_SEC", self.cooldown_s.to_string());
        m.insert("P33_QTY_TOLERANCE_PCT", self.qty_tolerance_pct.to_string());
        m.insert("P33_PERMIT_TTL", self.permit_ttl.as_secs_f64().to_string());
        m.insert("P33_PLAN_MAX_AGE_S", self.plan_max_age_s.to_string());
        m.insert("P33_METRICS_ADDR", self.metrics_addr.to_string());
        m.insert("P33_METRICS_PORT", self.metrics_port.to_string());
        m.insert("LOG_FILTER", self.log_filter.clone());
        m.insert(
            "P33_LOG_FORMAT",
            match self.log_format {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            }
            .into(),
        );
        m.insert("P33_DRY_RUN", self.dry_run.to_string());
        m.insert("P33_CONSUMER_GROUP", self.consumer_group.clone());
        m.insert("P33_CONSUMER_NAME", self.consumer_name.clone());
        m.insert(
            "P33_CLAIM_IDLE_S",
            self.claim_idle.as_secs_f64().to_string(),
        );
        m.insert(
            "P33_CANONICAL_POSITIONS",
            self.canonical_positions.to_string(),
        );
        m
    }
}

/// `REDIS_URL` wins over host/port/db; `REDIS_PASSWORD` applies when the URL
/// carries none.
fn redis_target(p: &mut Parser, o: &RawOther) -> RedisTarget {
    use redis::IntoConnectionInfo;
    let password = o.redis_password.clone().filter(|s| !s.is_empty());
    let fallback = || redis::ConnectionInfo {
        addr: redis::ConnectionAddr::Tcp("localhost".into(), 6379),
        redis: redis::RedisConnectionInfo::default(),
    };
    let mut info = if let Some(url) = o.redis_url.as_deref().filter(|s| !s.trim().is_empty()) {
        match url.trim().into_connection_info() {
            Ok(i) => i,
            Err(_) => {
                p.err(
                    "REDIS_URL",
                    &redact_url(url),
                    "is not a redis://, rediss:// or unix:// URL",
                );
                fallback()
            }
        }
    } else {
        let host = o
            .redis_host
            .clone()
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| "localhost".into());
        let port = match &o.redis_port {
            None => 6379,
            Some(s) => s.trim().parse::<u16>().unwrap_or_else(|_| {
                p.err("REDIS_PORT", s, "must be a TCP port number");
                6379
            }),
        };
        let db = match &o.redis_db {
            None => 0,
            Some(s) => s
                .trim()
                .parse::<i64>()
                .ok()
                .filter(|d| *d >= 0)
                .unwrap_or_else(|| {
                    p.err("REDIS_DB", s, "must be a database number ≥ 0");
                    0
                }),
        };
        let mut i = fallback();
        i.addr = redis::ConnectionAddr::Tcp(host.trim().to_string(), port);
        i.redis.db = db;
        i
    };
    if info.redis.password.is_none() {
        info.redis.password = password;
    }
    RedisTarget { info }
}

/// A URL with everything that may be a credential replaced, for error
/// messages (SPEC §11: anything after a `:` before an `@` is a password).
/// It must hold for malformed URLs too (`redis//:pw@host`, `:pw@host`), so
/// it does not parse: everything before the last `@` goes, but for a
/// well-formed `scheme://`; a `password=` query value goes too.
fn redact_url(url: &str) -> String {
    let mut out = match url.rfind('@') {
        None => url.to_string(),
        Some(at) => {
            let scheme = url[..at]
                .find("://")
                .filter(|&i| i > 0 && url[..i].bytes().all(|b| b.is_ascii_alphanumeric()))
                .map_or("", |i| &url[..i + 3]);
            format!("{scheme}[redacted]{}", &url[at..])
        }
    };
    if let Some(i) = out.to_ascii_lowercase().find("password=") {
        let end = out[i..].find('&').map_or(out.len(), |e| i + e);
        out.replace_range(i + "password=".len()..end, "[redacted]");
    }
    crate::text::clip(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
        let mut v: Vec<(String, String)> = vec![("P33_SNAPSHOT_SOURCE".into(), "external".into())];
        v.extend(pairs.iter().map(|(k, x)| (k.to_string(), x.to_string())));
        Config::from_pairs(v)
    }

    #[test]
    fn defaults_match_the_spec_table() {
        let c = cfg(&[]).expect("defaults are valid");
        assert_eq!(c.redis.display(), "redis://localhost:6379/0");
        assert_eq!(c.universe_key_active, keys::UNIVERSE_ACTIVE);
        assert_eq!(c.universe_key_last_ok, keys::UNIVERSE_LAST_OK);
        assert_eq!(c.universe_key_meta, keys::UNIVERSE_META);
        assert_eq!(c.universe_max_age_s, 300.0);
        assert_eq!(c.allowlist_refresh, Duration::from_secs(60));
        assert_eq!(c.poll_interval, Duration::from_secs(5));
        assert_eq!(c.stale_threshold_s, 10.0);
        assert_eq!(c.cooldown_s, 15.0);
        assert_eq!(c.qty_tolerance_pct, 1.0);
        assert_eq!(c.permit_ttl, Duration::from_secs(60));
        assert_eq!(c.plan_max_age_s, 60.0);
        assert_eq!(c.metrics_port, 8045);
        assert_eq!(c.metrics_addr.to_string(), "0.0.0.0");
        assert_eq!(c.log_filter, "info");
        assert_eq!(c.log_format, LogFormat::Text);
        assert!(!c.dry_run);
        assert_eq!(c.consumer_group, "p33");
        assert!(c.consumer_name.starts_with("p33-"));
        assert_eq!(c.claim_idle, Duration::from_secs(30));
        assert!(!c.canonical_positions);
        assert!(c.allowlist_env.is_empty(), "no hard-coded symbol");
        assert_eq!(c.allowlist_mode, AllowlistMode::Universe);
        assert_eq!(c.exchange_base_url, "https://testnet.binancefuture.com");
    }

    #[test]
    fn fractional_durations_are_accepted() {
        let c = cfg(&[("P33_POLL_SEC", "0.5"), ("P33_ALLOWLIST_REFRESH_S", "1.25")]).unwrap();
        assert_eq!(c.poll_interval, Duration::from_millis(500));
        assert_eq!(c.allowlist_refresh, Duration::from_millis(1250));
    }

    #[test]
    fn booleans_accept_every_spelling() {
        for (s, want) in [
            ("true", true),
            ("TRUE", true),
            ("1", true),
            ("yes", true),
            ("On", true),
            ("false", false),
            ("0", false),
            ("No", false),
            ("OFF", false),
        ] {
            let c = cfg(&[("P33_DRY_RUN", s)]).unwrap();
            assert_eq!(c.dry_run, want, "P33_DRY_RUN={s}");
        }
        assert!(cfg(&[("P33_DRY_RUN", "maybe")]).is_err());
    }

    #[test]
    fn dry_run_has_its_own_group() {
        let c = cfg(&[("P33_DRY_RUN", "yes")]).unwrap();
        assert_eq!(c.consumer_group, "p33-dryrun");
        assert_eq!(c.ledger_group(), "p33-ledger-dryrun");
    }

    #[test]
    fn every_bad_variable_is_reported_with_its_value() {
        let e = cfg(&[
            ("P33_POLL_SEC", "abc"),
            ("P33_STALE_THRESHOLD_SEC", "-1"),
            ("P33_METRICS_PORT", "99999"),
            ("P33_LOG_FORMAT", "xml"),
            ("P33_ALLOWLIST_SOURCE", "magic"),
            ("P33_UNIVERSE_MAX_AGE_S", "NaN"),
            ("P33_PERMIT_TTL", "1e300"),
            ("P33_CLAIM_IDLE_S", "31536001"),
        ])
        .unwrap_err();
        let vars: Vec<&str> = e.0.iter().map(|e| e.var.as_str()).collect();
        for v in [
            "P33_POLL_SEC",
            "P33_STALE_THRESHOLD_SEC",
            "P33_METRICS_PORT",
            "P33_LOG_FORMAT",
            "P33_ALLOWLIST_SOURCE",
            "P33_UNIVERSE_MAX_AGE_S",
            "P33_PERMIT_TTL",
            "P33_CLAIM_IDLE_S",
        ] {
            assert!(vars.contains(&v), "{v} reported in {vars:?}");
        }
        let text = e.to_string();
        assert!(text.contains("P33_POLL_SEC=\"abc\""), "{text}");
        assert_eq!(text.lines().count(), 8, "one line per variable: {text}");
    }

    #[test]
    fn redis_url_wins_and_password_is_redacted() {
        let c = cfg(&[
            ("REDIS_URL", "redis://:hunter2@127.0.0.1:7000/3"),
            ("REDIS_HOST", "elsewhere"),
        ])
        .unwrap();
        assert_eq!(c.redis.display(), "redis://[redacted]@127.0.0.1:7000/3");
        assert!(!format!("{c:?}").contains("hunter2"));
        let c = cfg(&[
            ("REDIS_HOST", "10.0.0.5"),
            ("REDIS_PORT", "6380"),
            ("REDIS_DB", "2"),
            ("REDIS_PASSWORD", "s3cret"),
        ])
        .unwrap();
        assert_eq!(c.redis.display(), "redis://[redacted]@10.0.0.5:6380/2");
        assert_eq!(c.redis.info.redis.password.as_deref(), Some("s3cret"));
        assert!(!format!("{c:?}").contains("s3cret"));
        let e = cfg(&[("REDIS_URL", "http://:pw@x")]).unwrap_err();
        assert!(!e.to_string().contains("pw@"), "{e}");
        for bad in [
            "redis//:hunter2@host:6379",
            ":hunter2@host",
            "redis:/user:hunter2@host",
            "redis://:hunter2@@host:notaport",
            "hunter2@",
        ] {
            let e = cfg(&[("REDIS_URL", bad)]).unwrap_err().to_string();
            assert!(!e.contains("hunter2"), "{bad} -> {e}");
            assert!(e.contains("REDIS_URL"), "{e}");
        }
        assert_eq!(
            redact_url("redis//host:6379?password=hunter2&x=1"),
            "redis//host:6379?password=[redacted]&x=1"
        );
    }

    #[test]
    fn binance_credentials_are_required_for_binance_snapshots_and_never_printed() {
        let e = Config::from_pairs(Vec::<(String, String)>::new()).unwrap_err();
        assert!(e.to_string().contains("BINANCE_TESTNET_API_KEY"), "{e}");
        let v = |k: &str, s: &str| (k.to_string(), s.to_string());
        let c = Config::from_pairs(vec![
            v("BINANCE_API_KEY", "legacykey"),
            v("BINANCE_API_SECRET", "legacysecret"),
        ])
        .unwrap();
        assert_eq!(c.binance_api_key.as_ref().unwrap().expose(), "legacykey");
        let c = Config::from_pairs(vec![
            v("BINANCE_TESTNET_API_KEY", "tkey"),
            v("BINANCE_TESTNET_API_SECRET", "tsecret"),
            v("BINANCE_API_KEY", "legacykey"),
            v("BINANCE_API_SECRET", "legacysecret"),
        ])
        .unwrap();
        assert_eq!(c.binance_api_secret.as_ref().unwrap().expose(), "tsecret");
        let dbg = format!("{c:?} {:?}", c.effective());
        for s in ["tkey", "tsecret", "legacykey", "legacysecret"] {
            assert!(!dbg.contains(s), "{s} leaked");
        }
    }

    #[test]
    fn allowlist_env_is_trimmed_and_apply_allowlist_is_the_fallback() {
        let c = cfg(&[("P33_ALLOWLIST", " BTCUSDT , ETHUSDT,, ")]).unwrap();
        assert_eq!(c.allowlist_env, vec!["BTCUSDT", "ETHUSDT"]);
        let c = cfg(&[("APPLY_ALLOWLIST", "SOLUSDT")]).unwrap();
        assert_eq!(c.allowlist_env, vec!["SOLUSDT"]);
        let c = cfg(&[("APPLY_ALLOWLIST", "SOLUSDT"), ("P33_ALLOWLIST", "")]).unwrap();
        assert!(
            c.allowlist_env.is_empty(),
            "an explicit empty P33_ALLOWLIST wins"
        );
    }

    #[test]
    fn legacy_and_unknown_variables_are_noted() {
        let c = cfg(&[
            ("UNIVERSE_ENABLE", "true"),
            ("P33_SNAPSHOT_TOP_N", "50"),
            ("P33_POLL_SECS", "1"),
        ])
        .unwrap();
        assert_eq!(
            c.legacy_present,
            vec!["UNIVERSE_ENABLE", "P33_SNAPSHOT_TOP_N"]
        );
        assert_eq!(c.unknown_p33, vec!["P33_POLL_SECS"]);
    }

    #[test]
    fn log_level_maps_python_names_and_rust_log_wins() {
        assert_eq!(
            cfg(&[("P33_LOG_LEVEL", "WARNING")]).unwrap().log_filter,
            "warn"
        );
        assert_eq!(
            cfg(&[("P33_LOG_LEVEL", "debug")]).unwrap().log_filter,
            "debug"
        );
        let c = cfg(&[
            ("P33_LOG_LEVEL", "DEBUG"),
            ("RUST_LOG", "position_state_brain=trace"),
        ]);
        assert_eq!(c.unwrap().log_filter, "position_state_brain=trace");
        assert!(cfg(&[("P33_LOG_LEVEL", "LOUD")]).is_err());
    }
}
