//! Configuration (SPEC §2): every variable, parsed once and validated,
//! secrets redacted. The parts: the table (`vars`), one value by its kind
//! and the parsed set (`values`), credential files (`credentials`), the
//! process environment and the ctl env file (`env`), where Redis is
//! (`redis_settings`) and `--check-config` (`check`); `Config` and its
//! cross-variable rules here. It may import Redis's key map and targets
//! and the vocabulary (`domain`, `text`); every stage above reads it.
//!
//! Each variable is named once, in [`VARS`]: its name, default, kind and
//! meaning. Everything else is derived from that table: which names are
//! known (an unknown `P33_*` is a likely typo), how each raw value is parsed
//! (by its [`Kind`]; a default is parsed by the same code as a user's
//! value), the one error line per bad variable, and the `--check-config`
//! printout. Cross-variable rules (credentials in binance mode, `REDIS_URL`
//! over host/port/db, `RUST_LOG` over `P33_LOG_LEVEL`) come after, and never
//! add a follow-on error to a variable that was already wrong. Tests feed an
//! iterator of pairs (`Config::from_pairs`); nothing here calls
//! `std::env::set_var` (the model: linkerd2-proxy's `env.rs`).
//!
//! Secrets (exchange key and secret, the Redis password) live in [`Secret`],
//! whose `Debug` prints `[redacted]`; only request signing and the Redis
//! connection call [`Secret::expose`].

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use crate::redis::keys;

mod check;
mod credentials;
mod env;
mod redis_settings;
mod values;
mod vars;

use self::check::edit_distance;
use self::credentials::credentials;
pub use self::credentials::{
    is_placeholder, read_regular_file, read_secret_file, Purpose, CREDENTIALS, CREDSTORE_DIRS,
};
use self::env::{ctl_env_pairs, is_exchange_var};
pub use self::env::{env_text, hostname, parse_ctl_env};
use self::redis_settings::{redis_target, sentinel_rules, tls_settings};
use self::values::{dur, Parsed, Value};
pub use self::values::{parse_bool, parse_rate, Rate};
pub use self::vars::{var_named, Kind, Var, CTL_ENV_FILE, VARS};
pub use crate::redis::target::{join_host_port, parse_sentinels, RedisTarget, SentinelTarget};
pub use crate::text::Secret;

/// Exit code for a configuration error (sysexits `EX_CONFIG`); the systemd unit
/// sets `RestartPreventExitStatus=78` so a typo does not crash-loop.
pub const EXIT_CONFIG: i32 = 78;

/// Exit status of a usage error (sysexits EX_USAGE).
pub const EXIT_USAGE: i32 = 64;

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

/// The effective configuration of the daemon.
#[derive(Debug, Clone)]
pub struct Config {
    /// The Redis server (`REDIS_URL`, else host/port/db, plus password).
    pub redis: RedisTarget,
    /// Exchange API key (testnet name first).
    pub binance_api_key: Option<Secret>,
    /// Exchange API secret (testnet name first).
    pub binance_api_secret: Option<Secret>,
    /// REST base URL, no trailing slash.
    pub exchange_base_url: String,
    /// Who writes the snapshot hashes.
    pub snapshot_source: SnapshotSource,
    /// Follow the user data stream (SPEC §16; binance mode only).
    pub position_stream: bool,
    /// Position events on `quantum:stream:p33.positions` (SPEC §19): with
    /// the stream only.
    pub position_events: bool,
    /// Exchange-side closes on `quantum:stream:trade.closed` (SPEC §19):
    /// with the stream only.
    pub trade_closed_events: bool,
    /// `P33_TRADE_CLOSED_EVENTS` was set true without the stream (a WARN).
    trade_closed_without_stream: bool,
    /// The state a liquidation or ADL sets on its symbol (`None`: none).
    pub on_liquidation: Option<crate::domain::TradingState>,
    /// The user data stream's base URL, no trailing slash (no listenKey).
    pub exchange_ws_url: String,
    /// Client ping period on the user data stream.
    pub stream_ping: Duration,
    /// Age at which a stream connection is replaced.
    pub stream_replace: Duration,
    /// listenKey keepalive period.
    pub stream_keepalive: Duration,
    /// Raw tier-3 list (validated at resolution time, so that the WARN about
    /// dropped entries is logged with the resolution that drops them).
    pub allowlist_env: Vec<String>,
    /// Where allowlist resolution starts.
    pub allowlist_mode: AllowlistMode,
    /// The universe's active document key.
    pub universe_key_active: String,
    /// The universe's last good document key.
    pub universe_key_last_ok: String,
    /// The universe's meta hash key.
    pub universe_key_meta: String,
    /// Oldest universe data ever used, seconds.
    pub universe_max_age_s: f64,
    /// Period of the allowlist refresh.
    pub allowlist_refresh: Duration,
    /// Exchange snapshot period.
    pub poll_interval: Duration,
    /// Oldest snapshot a plan may be judged on, seconds.
    pub stale_threshold_s: f64,
    /// Quiet time after an execution, seconds.
    pub cooldown_s: f64,
    /// Ledger vs exchange quantity tolerance, percent.
    pub qty_tolerance_pct: f64,
    /// Permit key lifetime.
    pub permit_ttl: Duration,
    /// Older plans are denied `plan_expired`, seconds.
    pub plan_max_age_s: f64,
    /// HTTP listen address.
    pub metrics_addr: IpAddr,
    /// HTTP port (0: any free port).
    pub metrics_port: u16,
    /// `tracing` filter directive (from `RUST_LOG` when set).
    pub log_filter: String,
    /// Log line format.
    pub log_format: LogFormat,
    /// Evaluate and log only.
    pub dry_run: bool,
    /// Plan consumer group.
    pub consumer_group: String,
    /// This consumer's name in every group.
    pub consumer_name: String,
    /// Entries idle this long on other consumers are claimed.
    pub claim_idle: Duration,
    /// Also write the canonical position hashes.
    pub canonical_positions: bool,
    /// The global trading state while its key is missing (SPEC §12).
    pub default_trading_state: crate::domain::TradingState,
    /// systemd's `STATE_DIRECTORY` (units: `StateDirectory=`): where the
    /// instance keeps the trading state it knows (SPEC §12); `None`: in
    /// memory only.
    pub state_directory: Option<String>,
    /// `P33_MAX_OPENS` (SPEC §13); `None`: off.
    pub max_opens: Option<Rate>,
    /// `P33_MAX_OPENS_PER_SYMBOL`; `None`: off.
    pub max_opens_per_symbol: Option<Rate>,
    /// `P33_THROTTLE_LATCH`.
    pub throttle_latch: bool,
    /// `P33_MAX_OPEN_POSITIONS`; `None`: off.
    pub max_open_positions: Option<u32>,
    /// `P33_DECISIONS_MAXLEN`; 0: no decision record.
    pub decisions_maxlen: u32,
    /// Legacy variables that were set and are ignored (named once in a WARN).
    pub legacy_present: Vec<&'static str>,
    /// `P33_*` variables that this daemon does not know (likely typos).
    pub unknown_p33: Vec<String>,
    /// Variables set that look like a misspelt `REDIS_*`/`BINANCE_*` name
    /// this daemon reads: (as set, the name meant).
    pub near_misses: Vec<(String, &'static str)>,
    /// Both a testnet and a mainnet key (or secret) are set.
    pub both_key_kinds: bool,
    /// `NAME=value` of every variable as in effect, secrets redacted.
    shown: Vec<(&'static str, String)>,
}

/// One variable that could not be used.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    /// The variable (or the pair of them, for a cross-variable rule).
    pub var: String,
    /// The value as given (secrets and Redis passwords redacted).
    pub value: String,
    /// What is wanted instead.
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

/// The user data stream's base for a REST base URL (SPEC §16): Binance's
/// hosts map to their stream hosts (`fapi.binance.com` →
/// `fstream.binance.com`, the testnet's and the demo's likewise), any other
/// keeps its host and port with `http` → `ws`, `https` → `wss`.
pub fn derive_ws_url(base: &str) -> Option<String> {
    let u = url::Url::parse(base).ok()?;
    let scheme = match u.scheme() {
        "https" => "wss",
        "http" => "ws",
        _ => return None,
    };
    let host = u.host_str()?;
    let host = match host {
        "fapi.binance.com" => "fstream.binance.com",
        "testnet.binancefuture.com" => "stream.binancefuture.com",
        "demo-fapi.binance.com" => "demo-fstream.binance.com",
        h => h,
    };
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    Some(match u.port() {
        Some(port) => format!("{scheme}://{host}:{port}"),
        None => format!("{scheme}://{host}"),
    })
}

impl Config {
    /// Reads the process environment: a variable of ours that is not UTF-8
    /// is a configuration error naming it (its value never shown).
    pub fn from_env() -> Result<Config, ConfigErrors> {
        let (pairs, bad) = env_text();
        Self::from_text_env(pairs, &bad)
    }

    /// [`Config::from_env`] for `--check-config`: the ctl env file's Redis
    /// settings first, as `ctl` reads them (SPEC §12), the environment over
    /// them; an operator checks what the tools will use without root.
    pub fn check_from_env() -> Result<Config, ConfigErrors> {
        let (env, bad) = env_text();
        let mut pairs = ctl_env_pairs(&env);
        pairs.extend(env);
        Self::from_text_env_errors(Self::from_pairs_for(pairs, Purpose::Check), &bad)
    }

    /// [`Config::from_pairs`], with the variables of ours that were not
    /// UTF-8 (from [`env_text`]) reported first.
    pub fn from_text_env(
        pairs: Vec<(String, String)>,
        not_utf8: &[String],
    ) -> Result<Config, ConfigErrors> {
        Self::from_text_env_errors(Self::from_pairs(pairs), not_utf8)
    }

    /// `res`, with the variables of ours that were not UTF-8 reported first.
    fn from_text_env_errors(
        res: Result<Config, ConfigErrors>,
        not_utf8: &[String],
    ) -> Result<Config, ConfigErrors> {
        if not_utf8.is_empty() {
            return res;
        }
        let mut errors: Vec<ConfigError> = not_utf8
            .iter()
            .map(|name| ConfigError {
                var: name.clone(),
                value: "[not shown]".to_string(),
                why: "the value is not valid UTF-8".to_string(),
            })
            .collect();
        if let Err(ConfigErrors(more)) = res {
            errors.extend(more);
        }
        Err(ConfigErrors(errors))
    }

    /// Builds the configuration from `(name, value)` pairs (a later pair
    /// wins, as in an environment).
    pub fn from_pairs<I>(vars: I) -> Result<Config, ConfigErrors>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        Self::from_pairs_for(vars, Purpose::Daemon)
    }

    /// The configuration `ctl`, `explain` and `replay` run with (SPEC §12):
    /// the exchange settings are neither required nor validated, so an
    /// operator can halt trading from a shell that holds no exchange secret.
    pub fn tools_from_env() -> Result<Config, ConfigErrors> {
        Self::tools_from_env_with(Vec::new())
    }

    /// [`Config::tools_from_env`] with more pairs that win over the
    /// environment (`replay --set`).
    pub fn tools_from_env_with(extra: Vec<(String, String)>) -> Result<Config, ConfigErrors> {
        let (env, bad) = env_text();
        // The ctl env file first, the environment over it, then `extra`.
        let mut pairs = ctl_env_pairs(&env);
        pairs.extend(env);
        pairs.extend(extra);
        let bad: Vec<String> = bad.into_iter().filter(|n| !is_exchange_var(n)).collect();
        match Self::from_pairs_for(pairs, Purpose::Tools) {
            Ok(c) if bad.is_empty() => Ok(c),
            res => Self::from_text_env_errors(res, &bad),
        }
    }

    /// [`Config::from_pairs`] for `purpose`.
    pub fn from_pairs_for<I>(vars: I, purpose: Purpose) -> Result<Config, ConfigErrors>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let env: HashMap<String, String> = vars.into_iter().collect();
        let (env, secret_sources, credential_errors) = credentials(env, purpose);
        let mut p = Parsed::read(&env);
        p.errors.extend(credential_errors);

        let legacy_present: Vec<&'static str> = LEGACY_VARS
            .iter()
            .copied()
            .filter(|n| env.contains_key(*n))
            .collect();
        let mut unknown_p33: Vec<String> = env
            .keys()
            .filter(|k| k.starts_with("P33_"))
            .filter(|k| var_named(k).is_none() && !LEGACY_VARS.contains(&k.as_str()))
            .cloned()
            .collect();
        unknown_p33.sort();
        let mut near_misses: Vec<(String, &'static str)> = env
            .keys()
            .filter(|k| {
                (k.starts_with("REDIS_") || k.starts_with("BINANCE_")) && var_named(k).is_none()
            })
            .filter_map(|k| {
                VARS.iter()
                    .map(|v| v.name)
                    .filter(|n| n.starts_with("REDIS_") || n.starts_with("BINANCE_"))
                    .find(|n| edit_distance(k, n) <= 2)
                    .map(|n| (k.clone(), n))
            })
            .collect();
        near_misses.sort();
        let given = |n: &str| env.get(n).is_some_and(|v| !v.trim().is_empty());
        let both_key_kinds = (given("BINANCE_TESTNET_API_KEY") && given("BINANCE_API_KEY"))
            || (given("BINANCE_TESTNET_API_SECRET") && given("BINANCE_API_SECRET"));

        sentinel_rules(&mut p);
        let tls = tls_settings(&mut p);
        let redis = redis_target(&mut p, tls);

        let snapshot_source = match p.word("P33_SNAPSHOT_SOURCE") {
            "external" => SnapshotSource::External,
            _ => SnapshotSource::Binance,
        };
        let key = p
            .secret("BINANCE_TESTNET_API_KEY")
            .map(|k| ("BINANCE_TESTNET_API_KEY", k))
            .or_else(|| p.secret("BINANCE_API_KEY").map(|k| ("BINANCE_API_KEY", k)));
        let secret = p
            .secret("BINANCE_TESTNET_API_SECRET")
            .map(|k| ("BINANCE_TESTNET_API_SECRET", k))
            .or_else(|| {
                p.secret("BINANCE_API_SECRET")
                    .map(|k| ("BINANCE_API_SECRET", k))
            });
        // Credentials matter only in binance mode, and only when the mode
        // itself was valid: a misspelt mode is one error, not two.
        if purpose != Purpose::Tools
            && snapshot_source == SnapshotSource::Binance
            && !p.failed("P33_SNAPSHOT_SOURCE")
            && (key.is_none() || secret.is_none())
        {
            let missing: Vec<&str> = [
                (key.is_none(), "BINANCE_TESTNET_API_KEY"),
                (secret.is_none(), "BINANCE_TESTNET_API_SECRET"),
            ]
            .iter()
            .filter(|(m, _)| *m)
            .map(|(_, n)| *n)
            .collect();
            p.errors.push(ConfigError {
                var: "BINANCE_TESTNET_API_KEY/BINANCE_TESTNET_API_SECRET".into(),
                value: String::new(),
                why: format!(
                    "{} unset: exchange credentials (or BINANCE_API_KEY/BINANCE_API_SECRET) are required when P33_SNAPSHOT_SOURCE=binance",
                    missing.join(" and ")
                ),
            });
        }

        // P33_ALLOWLIST wins when set, even empty; else APPLY_ALLOWLIST.
        let allowlist_env = if p.given.contains_key("P33_ALLOWLIST") {
            p.list("P33_ALLOWLIST")
        } else {
            p.list("APPLY_ALLOWLIST")
        }
        .unwrap_or_default();
        let allowlist_mode = match p.word("P33_ALLOWLIST_SOURCE") {
            "env" => AllowlistMode::Env,
            _ => AllowlistMode::Universe,
        };

        let permit_ttl = p.secs("P33_PERMIT_TTL");
        if permit_ttl < 0.001 && !p.failed("P33_PERMIT_TTL") {
            p.errors.push(ConfigError {
                var: "P33_PERMIT_TTL".into(),
                value: p.given.get("P33_PERMIT_TTL").cloned().unwrap_or_default(),
                why: "must be at least 0.001 seconds".into(),
            });
        }

        let level = match p.values.get("P33_LOG_LEVEL") {
            Some(Value::Level(l)) => *l,
            _ => "info",
        };
        let log_filter = p.text("RUST_LOG").unwrap_or_else(|| level.to_string());
        let log_format = match p.word("P33_LOG_FORMAT") {
            "json" => LogFormat::Json,
            _ => LogFormat::Text,
        };

        let dry_run = p.bool("P33_DRY_RUN");
        let consumer_group = p.text("P33_CONSUMER_GROUP").unwrap_or_else(|| {
            if dry_run {
                keys::PLAN_GROUP_DRY_RUN
            } else {
                keys::PLAN_GROUP
            }
            .to_string()
        });
        let consumer_name = p
            .text("P33_CONSUMER_NAME")
            .unwrap_or_else(|| format!("p33-{}", hostname()));

        if purpose == Purpose::Tools {
            p.errors.retain(|e| !is_exchange_var(&e.var));
        }
        if !p.errors.is_empty() {
            return Err(ConfigErrors(p.errors));
        }
        // What --check-config prints: the table's parsed values, with the
        // values other variables decided filled in.
        p.values
            .insert("P33_CONSUMER_GROUP", Value::Text(consumer_group.clone()));
        p.values
            .insert("P33_CONSUMER_NAME", Value::Text(consumer_name.clone()));
        p.values
            .insert("P33_ALLOWLIST", Value::List(allowlist_env.clone()));
        let exchange_ws_url = p
            .text("P33_EXCHANGE_WS_URL")
            .or_else(|| {
                p.text("P33_EXCHANGE_BASE_URL")
                    .and_then(|b| derive_ws_url(&b))
            })
            .unwrap_or_default();
        if !exchange_ws_url.is_empty() {
            p.values
                .insert("P33_EXCHANGE_WS_URL", Value::Text(exchange_ws_url.clone()));
        }
        let shown = VARS
            .iter()
            .map(|v| {
                let value = p
                    .values
                    .get(v.name)
                    .map_or_else(|| "(unset)".to_string(), Value::shown);
                (v.name, value)
            })
            .chain([
                ("REDIS", redis.display()),
                ("LOG_FILTER", log_filter.clone()),
            ])
            .map(|(name, value)| match secret_sources.get(name) {
                // Where each secret came from, never what it is.
                Some(from) if value != "(unset)" => (name, format!("{value} ({from})")),
                _ => (name, value),
            })
            .collect();
        // The user data stream, which the position events need.
        let stream_on =
            snapshot_source == SnapshotSource::Binance && p.word("P33_POSITION_STREAM") == "on";
        let trade_closed = p.bool("P33_TRADE_CLOSED_EVENTS");
        Ok(Config {
            redis,
            binance_api_key: key.map(|(_, k)| k),
            binance_api_secret: secret.map(|(_, s)| s),
            exchange_base_url: p.text("P33_EXCHANGE_BASE_URL").unwrap_or_default(),
            position_stream: stream_on,
            on_liquidation: match p.word("P33_ON_LIQUIDATION") {
                "halt" => Some(crate::domain::TradingState::Halted),
                "none" => None,
                _ => Some(crate::domain::TradingState::Reducing),
            },
            position_events: stream_on && p.word("P33_POSITION_EVENTS") == "on",
            trade_closed_events: stream_on && trade_closed,
            trade_closed_without_stream: trade_closed && !stream_on,
            exchange_ws_url,
            stream_ping: dur(p.secs("P33_POSITION_STREAM_PING_SEC")),
            stream_replace: dur(p.secs("P33_POSITION_STREAM_REPLACE_SEC")),
            stream_keepalive: dur(p.secs("P33_POSITION_STREAM_KEEPALIVE_SEC")),
            snapshot_source,
            allowlist_env,
            allowlist_mode,
            universe_key_active: p.text("P33_UNIVERSE_KEY_ACTIVE").unwrap_or_default(),
            universe_key_last_ok: p.text("P33_UNIVERSE_KEY_LAST_OK").unwrap_or_default(),
            universe_key_meta: p.text("P33_UNIVERSE_KEY_META").unwrap_or_default(),
            universe_max_age_s: p.secs("P33_UNIVERSE_MAX_AGE_S"),
            allowlist_refresh: dur(p.secs("P33_ALLOWLIST_REFRESH_S")),
            poll_interval: dur(p.secs("P33_POLL_SEC")),
            stale_threshold_s: p.secs("P33_STALE_THRESHOLD_SEC"),
            cooldown_s: p.secs("P33_COOLDOWN_SEC"),
            qty_tolerance_pct: p.secs("P33_QTY_TOLERANCE_PCT"),
            permit_ttl: dur(permit_ttl),
            plan_max_age_s: p.secs("P33_PLAN_MAX_AGE_S"),
            metrics_addr: match p.values.get("P33_METRICS_ADDR") {
                Some(Value::Addr(a)) => *a,
                _ => IpAddr::from([0, 0, 0, 0]),
            },
            metrics_port: match p.values.get("P33_METRICS_PORT") {
                Some(Value::Port(n)) => *n,
                _ => 8045,
            },
            log_filter,
            log_format,
            dry_run,
            consumer_group,
            consumer_name,
            claim_idle: dur(p.secs("P33_CLAIM_IDLE_S")),
            canonical_positions: p.bool("P33_CANONICAL_POSITIONS"),
            default_trading_state: crate::domain::TradingState::parse(
                p.word("P33_DEFAULT_TRADING_STATE"),
            )
            .unwrap_or(crate::domain::TradingState::Active),
            state_directory: env
                .get("STATE_DIRECTORY")
                .filter(|d| !d.trim().is_empty())
                .cloned(),
            max_opens: p.rate("P33_MAX_OPENS"),
            max_opens_per_symbol: p.rate("P33_MAX_OPENS_PER_SYMBOL"),
            throttle_latch: p.bool("P33_THROTTLE_LATCH"),
            decisions_maxlen: match p.values.get("P33_DECISIONS_MAXLEN") {
                Some(Value::Count(n)) => *n,
                _ => 100_000,
            },
            max_open_positions: match p.values.get("P33_MAX_OPEN_POSITIONS") {
                Some(Value::Count(n)) => Some(*n),
                _ => None,
            },
            legacy_present,
            unknown_p33,
            near_misses,
            both_key_kinds,
            shown,
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
}
#[cfg(test)]
mod tests;
