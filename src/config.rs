//! Configuration: every variable of SPEC §2, parsed once and validated.
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

use crate::keys;

/// Exit code for a configuration error (sysexits `EX_CONFIG`); the systemd unit
/// sets `RestartPreventExitStatus=78` so a typo does not crash-loop.
pub const EXIT_CONFIG: i32 = 78;

/// Exit status of a usage error (sysexits EX_USAGE).
pub const EXIT_USAGE: i32 = 64;

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
    /// With [`RedisTarget::sentinel`] set, only `info.redis` (database,
    /// password) is used: the address is the master the sentinels name.
    pub info: redis::ConnectionInfo,
    /// Find the master through Redis Sentinel (SPEC §15) instead.
    pub sentinel: Option<SentinelTarget>,
}

/// Redis Sentinel: where the sentinels are and which master to ask for.
#[derive(Clone, PartialEq, Eq)]
pub struct SentinelTarget {
    /// The sentinels, `(host, port)`, asked in this order.
    pub sentinels: Vec<(String, u16)>,
    /// The master's name (`REDIS_SENTINEL_MASTER`).
    pub master: String,
    /// The sentinels' own password (`REDIS_SENTINEL_PASSWORD`).
    pub password: Option<Secret>,
    /// The sentinels' own ACL user (`REDIS_SENTINEL_USERNAME`).
    pub username: Option<String>,
    /// TLS to the sentinels (`REDIS_TLS`), with these CA certificates (PEM;
    /// `None`: the webpki roots).
    pub tls: Option<Option<Vec<u8>>>,
}

impl SentinelTarget {
    /// `host:port,host:port` (IPv6 hosts in brackets).
    pub fn addresses(&self) -> String {
        join_addresses(&self.sentinels)
    }
}

/// `host:port,host:port` (IPv6 hosts in brackets).
fn join_addresses(list: &[(String, u16)]) -> String {
    list.iter()
        .map(|(h, p)| join_host_port(h, *p))
        .collect::<Vec<_>>()
        .join(",")
}

/// `host:port`, with an IPv6 host in brackets.
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Parses `host:port[,host:port…]` (`[v6]:port` for IPv6): the sentinels.
pub fn parse_sentinels(s: &str) -> Result<Vec<(String, u16)>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let shown = crate::text::clip(part);
        let (host, port) = match part.strip_prefix('[') {
            Some(rest) => match rest.split_once("]:") {
                Some((h, p)) => (h, p),
                None => return Err(format!("{shown:?} is not host:port ([v6]:port for IPv6)")),
            },
            None => match part.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') => (h, p),
                _ => return Err(format!("{shown:?} is not host:port ([v6]:port for IPv6)")),
            },
        };
        if host.is_empty()
            || host
                .chars()
                .any(|c| c.is_whitespace() || c == '/' || c == '@')
        {
            return Err(format!("{shown:?} has no valid host"));
        }
        match port.parse::<u16>() {
            Ok(p) if p > 0 => out.push((host.to_string(), p)),
            _ => return Err(format!("{shown:?} has no valid port (1-65535)")),
        }
    }
    if out.is_empty() {
        return Err("must list at least one host:port".into());
    }
    if out.len() > 64 {
        return Err("lists more than 64 sentinels".into());
    }
    Ok(out)
}

impl RedisTarget {
    /// The database number.
    pub fn db(&self) -> i64 {
        self.info.redis.db
    }

    /// The ACL user in effect, for messages (`default` when none is named),
    /// cut and escaped: it comes from the environment.
    pub fn user_shown(&self) -> String {
        crate::text::clip(self.info.redis.username.as_deref().unwrap_or("default")).into_owned()
    }

    /// `redis://host:port/db` (or `redis+sentinel://s1:p1,s2:p2/master/db`)
    /// with any credentials replaced by `[redacted]`.
    pub fn display(&self) -> String {
        let r = &self.info.redis;
        let auth = if r.password.is_some() || r.username.is_some() {
            "[redacted]@"
        } else {
            ""
        };
        if let Some(s) = &self.sentinel {
            return format!(
                "redis+sentinel://{auth}{}/{}/{}",
                s.addresses(),
                s.master,
                r.db
            );
        }
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

/// How a variable's value is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Seconds, fractions allowed, finite, at most a year; `positive`
    /// excludes 0.
    Seconds {
        /// Whether 0 is refused.
        positive: bool,
    },
    /// A finite number ≥ 0 (a percentage).
    Number,
    /// true/false/1/0/yes/no/on/off, any case.
    Bool,
    /// A TCP port, 0-65535.
    Port,
    /// An IP address.
    Addr,
    /// One of the listed words (lower case).
    Choice(&'static [&'static str]),
    /// A non-empty string (a key or group name).
    Name,
    /// Any string, comma-separated into a list (the allowlist).
    List,
    /// An http(s) URL.
    HttpUrl,
    /// A ws(s) URL.
    WsUrl,
    /// A Redis URL: parsed by the Redis client, shown redacted.
    RedisUrl,
    /// A host name (non-empty).
    Host,
    /// A Redis database number ≥ 0.
    Db,
    /// DEBUG / INFO / WARNING / ERROR / CRITICAL (Python's names).
    LogLevel,
    /// A `tracing` filter directive.
    Filter,
    /// Never parsed, never printed.
    Secret,
    /// `N/Ws`: at most N in any sliding window of W seconds (`20/60s`).
    Rate,
    /// A count ≥ 1.
    Count,
    /// `host:port[,host:port…]`: Redis Sentinels.
    Sentinels,
    /// A size ≥ 0 (0 turns the thing off).
    Size,
}

/// One environment variable of SPEC §2.
#[derive(Debug, Clone, Copy)]
pub struct Var {
    /// The variable's name.
    pub name: &'static str,
    /// Its default, as a user would write it; `None` when there is none or
    /// it depends on other variables (said in `doc`).
    pub default: Option<&'static str>,
    /// How its value is read.
    pub kind: Kind,
    /// What it means.
    pub doc: &'static str,
}

const fn var(
    name: &'static str,
    default: Option<&'static str>,
    kind: Kind,
    doc: &'static str,
) -> Var {
    Var {
        name,
        default,
        kind,
        doc,
    }
}

/// Every variable, in the order of SPEC §2: the one place each is named.
pub const VARS: &[Var] = &[
    var("REDIS_URL", None, Kind::RedisUrl, "redis://[user:pass@]host:port/db, rediss://… (TLS) or unix:///path; wins over REDIS_HOST/PORT/DB"),
    var("REDIS_HOST", Some("localhost"), Kind::Host, "Redis host when REDIS_URL is unset"),
    var("REDIS_PORT", Some("6379"), Kind::Port, "Redis port when REDIS_URL is unset"),
    var("REDIS_DB", Some("0"), Kind::Db, "Redis database when REDIS_URL is unset"),
    var("REDIS_USERNAME", None, Kind::Name, "Redis ACL user (SPEC §17: p33 for the daemon, p33-ops for ctl changes, p33-read for explain/replay/ctl status), used when the URL names none; default: Redis's default user"),
    var("REDIS_PASSWORD", None, Kind::Secret, "Redis AUTH password, used when the URL carries none (with sentinels: the master's and replicas' password)"),
    var("REDIS_PASSWORD_FILE", None, Kind::Name, "a file holding the Redis password (a trailing newline is not part of it), read when REDIS_PASSWORD is unset: an on-call user in group p33-ops needs no secret in the shell (SPEC §12)"),
    var("P33_CTL_ENV_FILE", Some(CTL_ENV_FILE), Kind::Name, "the Redis settings ctl, explain and replay read before the environment, when the file is there (SPEC §12; mode 0640, group p33-ops)"),
    var("REDIS_TLS", Some("false"), Kind::Bool, "TLS to the data nodes and the sentinels (SPEC §17); with REDIS_URL, redis:// then counts as rediss://"),
    var("REDIS_TLS_CA_FILE", None, Kind::Name, "PEM file of the CA certificates the servers' certificates must chain to (default: the public webpki roots); with REDIS_TLS"),
    var("REDIS_SENTINELS", None, Kind::Sentinels, "host:port[,host:port…]: find the master through these Redis Sentinels instead of REDIS_URL/HOST/PORT (with REDIS_SENTINEL_MASTER)"),
    var("REDIS_SENTINEL_MASTER", None, Kind::Name, "the master name the sentinels monitor; required with REDIS_SENTINELS"),
    var("REDIS_SENTINEL_USERNAME", None, Kind::Name, "the sentinels' own ACL user, when they need one"),
    var("REDIS_SENTINEL_PASSWORD", None, Kind::Secret, "the sentinels' own AUTH password, when they need one"),
    var("BINANCE_TESTNET_API_KEY", None, Kind::Secret, "exchange API key (else BINANCE_API_KEY); required with P33_SNAPSHOT_SOURCE=binance"),
    var("BINANCE_TESTNET_API_SECRET", None, Kind::Secret, "exchange API secret (else BINANCE_API_SECRET); required with P33_SNAPSHOT_SOURCE=binance"),
    var("BINANCE_API_KEY", None, Kind::Secret, "exchange API key when BINANCE_TESTNET_API_KEY is unset"),
    var("BINANCE_API_SECRET", None, Kind::Secret, "exchange API secret when BINANCE_TESTNET_API_SECRET is unset"),
    var("P33_EXCHANGE_BASE_URL", Some("https://testnet.binancefuture.com"), Kind::HttpUrl, "exchange REST base URL"),
    var("P33_POSITION_STREAM", Some("on"), Kind::Choice(&["on", "off"]), "on: follow the user data stream for live positions, REST polling reconciles (binance mode); off: REST polling alone"),
    var("P33_POSITION_EVENTS", Some("on"), Kind::Choice(&["on", "off"]), "on: write what the user data stream saw to quantum:stream:p33.positions (kind=position per change of a leg, kind=fill per fill; SPEC §19); only with P33_POSITION_STREAM=on"),
    var("P33_TRADE_CLOSED_EVENTS", Some("false"), Kind::Bool, "also write each close the exchange made (liquidation, adl, stop, take_profit, settlement) to quantum:stream:trade.closed in the pipeline's contract (SPEC §19); only with P33_POSITION_STREAM=on"),
    var("P33_ON_LIQUIDATION", Some("reduce"), Kind::Choice(&["reduce", "halt", "none"]), "a liquidation or ADL of a symbol sets its trading state to REDUCING (reduce) or HALTED (halt) through the control path, once per order (actor p33-auto); none: only said and counted"),
    var("P33_EXCHANGE_WS_URL", None, Kind::WsUrl, "user data stream base (default: from P33_EXCHANGE_BASE_URL, https://fapi.binance.com → wss://fstream.binance.com, http://h:p → ws://h:p)"),
    var("P33_POSITION_STREAM_PING_SEC", Some("30"), Kind::Seconds { positive: true }, "client ping period on the user data stream; no frame within min(10 s, this) after a ping → reconnect"),
    var("P33_POSITION_STREAM_KEEPALIVE_SEC", Some("1800"), Kind::Seconds { positive: true }, "listenKey keepalive (PUT) period; Binance ends a key 60 min after its last one"),
    var("P33_POSITION_STREAM_REPLACE_SEC", Some("82800"), Kind::Seconds { positive: true }, "age at which a stream connection is replaced by a new one (overlapping, never a gap): before Binance's 24 h cut"),
    var("P33_SNAPSHOT_SOURCE", Some("binance"), Kind::Choice(&["binance", "external"]), "binance: poll positionRisk and write snapshots; external: only read them"),
    var("P33_ALLOWLIST", None, Kind::List, "tier-3 symbols, comma separated (default: APPLY_ALLOWLIST, else empty)"),
    var("APPLY_ALLOWLIST", None, Kind::List, "the apply layer's list: tier 3 when P33_ALLOWLIST is unset"),
    var("P33_ALLOWLIST_SOURCE", Some("universe"), Kind::Choice(&["universe", "env"]), "universe: tiers 1→2→3→4; env: tiers 3→4"),
    var("P33_UNIVERSE_KEY_ACTIVE", Some(keys::UNIVERSE_ACTIVE), Kind::Name, "the universe's active document"),
    var("P33_UNIVERSE_KEY_LAST_OK", Some(keys::UNIVERSE_LAST_OK), Kind::Name, "the universe's last good document"),
    var("P33_UNIVERSE_KEY_META", Some(keys::UNIVERSE_META), Kind::Name, "the universe's meta hash"),
    var("P33_UNIVERSE_MAX_AGE_S", Some("300"), Kind::Seconds { positive: true }, "oldest universe data ever used"),
    var("P33_ALLOWLIST_REFRESH_S", Some("60"), Kind::Seconds { positive: true }, "period of the allowlist refresh"),
    var("P33_POLL_SEC", Some("5"), Kind::Seconds { positive: true }, "exchange snapshot period"),
    var("P33_STALE_THRESHOLD_SEC", Some("10"), Kind::Seconds { positive: true }, "oldest snapshot a plan may be judged on"),
    var("P33_COOLDOWN_SEC", Some("15"), Kind::Seconds { positive: false }, "quiet time after an execution"),
    var("P33_QTY_TOLERANCE_PCT", Some("1.0"), Kind::Number, "ledger vs exchange quantity tolerance, percent"),
    var("P33_PERMIT_TTL", Some("60"), Kind::Seconds { positive: true }, "permit key lifetime"),
    var("P33_PLAN_MAX_AGE_S", Some("60"), Kind::Seconds { positive: true }, "older plans (by stream entry ID) are denied plan_expired"),
    var("P33_METRICS_PORT", Some("8045"), Kind::Port, "HTTP port of /metrics, /healthz, /readyz (0: any free port)"),
    var("P33_METRICS_ADDR", Some("0.0.0.0"), Kind::Addr, "HTTP listen address"),
    var("P33_LOG_LEVEL", Some("INFO"), Kind::LogLevel, "DEBUG, INFO, WARNING, ERROR or CRITICAL; RUST_LOG wins when set"),
    var("RUST_LOG", None, Kind::Filter, "a tracing filter directive; wins over P33_LOG_LEVEL"),
    var("P33_LOG_FORMAT", Some("text"), Kind::Choice(&["text", "json"]), "log line format"),
    var("P33_DRY_RUN", Some("false"), Kind::Bool, "evaluate and log, write no permits and no ledger metadata"),
    var("P33_CONSUMER_GROUP", None, Kind::Name, "plan consumer group (default p33, p33-dryrun in dry run)"),
    var("P33_CONSUMER_NAME", None, Kind::Name, "consumer name, stable across restarts (default p33-<hostname>)"),
    var("P33_CLAIM_IDLE_S", Some("30"), Kind::Seconds { positive: true }, "entries idle this long on other consumers are claimed"),
    var("P33_CANONICAL_POSITIONS", Some("false"), Kind::Bool, "also write quantum:state:positions:<symbol>"),
    var("P33_DEFAULT_TRADING_STATE", Some("ACTIVE"), Kind::Choice(&["ACTIVE", "REDUCING", "HALTED"]), "the global trading state while quantum:p33:trading_state is missing"),
    var("P33_MAX_OPENS", None, Kind::Rate, "N/Ws: at most N opening allows in any W seconds, all symbols (unset: off)"),
    var("P33_MAX_OPENS_PER_SYMBOL", None, Kind::Rate, "N/Ws: the same, per symbol (unset: off)"),
    var("P33_MAX_OPEN_POSITIONS", None, Kind::Count, "at most N symbols holding or about to hold a position; more opens are denied (unset: off)"),
    var("P33_DECISIONS_MAXLEN", Some("100000"), Kind::Size, "decision records kept in quantum:stream:p33.decisions (approximately; 0: no record)"),
    var("P33_THROTTLE_LATCH", Some("false"), Kind::Bool, "the first global throttled deny also sets the global state to REDUCING, until an operator resumes"),
];

/// The variable called `name` in [`VARS`].
pub fn var_named(name: &str) -> Option<&'static Var> {
    VARS.iter().find(|v| v.name == name)
}

/// A parsed value.
#[derive(Clone)]
enum Value {
    Secs(f64),
    Number(f64),
    Bool(bool),
    Port(u16),
    Addr(IpAddr),
    Word(&'static str),
    Text(String),
    List(Vec<String>),
    RedisUrl(Box<redis::ConnectionInfo>, String),
    Db(i64),
    Level(&'static str),
    Secret(Secret),
    Rate(Rate),
    Count(u32),
    Sentinels(Vec<(String, u16)>),
}

/// `N/Ws`: at most `limit` events in any sliding window of `window`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// N, at least 1.
    pub limit: u32,
    /// W.
    pub window: Duration,
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}s", self.limit, self.window.as_secs_f64())
    }
}

/// Parses `N/Ws` (`20/60s`, `20/60`, `5/0.5s`).
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let want = "must be N/Ws, e.g. 20/60s (at most N in any W seconds; N ≥ 1, 0 < W ≤ a year)";
    let (n, w) = s.trim().split_once('/').ok_or_else(|| want.to_string())?;
    let limit: u32 = n.trim().parse().map_err(|_| want.to_string())?;
    let w = w.trim();
    let secs: f64 = w
        .strip_suffix('s')
        .unwrap_or(w)
        .trim()
        .parse()
        .map_err(|_| want.to_string())?;
    if limit == 0 || !secs.is_finite() || !(0.001..=MAX_SECS).contains(&secs) {
        return Err(want.to_string());
    }
    Ok(Rate {
        limit,
        window: dur(secs),
    })
}

impl Value {
    /// For `--check-config`: secrets and Redis credentials redacted.
    fn shown(&self) -> String {
        match self {
            Value::Secs(s) | Value::Number(s) => s.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Port(p) => p.to_string(),
            Value::Addr(a) => a.to_string(),
            Value::Word(w) | Value::Level(w) => (*w).to_string(),
            Value::Text(t) => crate::text::redact_userinfo(t).into_owned(),
            Value::List(l) => l.join(","),
            Value::RedisUrl(_, shown) => shown.clone(),
            Value::Db(d) => d.to_string(),
            Value::Secret(_) => "[redacted]".to_string(),
            Value::Rate(r) => r.to_string(),
            Value::Count(n) => n.to_string(),
            Value::Sentinels(l) => join_addresses(l),
        }
    }
}

/// Parses one raw value by its kind; the error says what is wanted.
fn parse_value(kind: Kind, raw: &str) -> Result<Value, String> {
    let s = raw.trim();
    match kind {
        Kind::Seconds { positive } => match s.parse::<f64>().ok().filter(|v| v.is_finite()) {
            Some(v) if v > MAX_SECS => {
                Err(format!("must be at most {MAX_SECS} (a year, in seconds)"))
            }
            Some(v) if positive && v > 0.0 => Ok(Value::Secs(v)),
            Some(v) if !positive && v >= 0.0 => Ok(Value::Secs(v)),
            Some(_) if positive => Err("must be a number of seconds greater than 0".into()),
            _ => Err("must be a number of seconds (fractions allowed), e.g. 0.5".into()),
        },
        Kind::Number => match s.parse::<f64>().ok().filter(|v| v.is_finite()) {
            Some(v) if (0.0..=MAX_SECS).contains(&v) => Ok(Value::Number(v)),
            _ => Err("must be a finite number ≥ 0".into()),
        },
        Kind::Bool => parse_bool(s)
            .map(Value::Bool)
            .ok_or_else(|| "must be one of true/false/1/0/yes/no/on/off".into()),
        Kind::Port => s
            .parse::<u16>()
            .map(Value::Port)
            .map_err(|_| "must be a TCP port number 0-65535".into()),
        Kind::Addr => s
            .parse::<IpAddr>()
            .map(Value::Addr)
            .map_err(|_| "must be an IP address, e.g. 0.0.0.0 or 127.0.0.1".into()),
        Kind::Choice(words) => words
            .iter()
            .find(|w| s.eq_ignore_ascii_case(w))
            .map(|w| Value::Word(w))
            .ok_or_else(|| format!("must be one of: {}", words.join(", "))),
        Kind::Name | Kind::Host => {
            if s.is_empty() {
                Err("must not be empty".into())
            } else {
                Ok(Value::Text(s.to_string()))
            }
        }
        Kind::List => Ok(Value::List(
            s.split(',')
                .map(|x| x.trim().to_string())
                .filter(|x| !x.is_empty())
                .collect(),
        )),
        Kind::HttpUrl => match url::Url::parse(s) {
            Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {
                Ok(Value::Text(s.trim_end_matches('/').to_string()))
            }
            _ => Err("must be an http(s) URL".into()),
        },
        Kind::WsUrl => match url::Url::parse(s) {
            Ok(u) if (u.scheme() == "ws" || u.scheme() == "wss") && u.host_str().is_some() => {
                Ok(Value::Text(s.trim_end_matches('/').to_string()))
            }
            _ => Err("must be a ws:// or wss:// URL".into()),
        },
        Kind::RedisUrl => {
            use redis::IntoConnectionInfo;
            match s.into_connection_info() {
                Ok(i) => {
                    let shown = RedisTarget {
                        info: i.clone(),
                        sentinel: None,
                    }
                    .display();
                    Ok(Value::RedisUrl(Box::new(i), shown))
                }
                Err(_) => Err("is not a redis://, rediss:// or unix:// URL".into()),
            }
        }
        Kind::Db => s
            .parse::<i64>()
            .ok()
            .filter(|d| *d >= 0)
            .map(Value::Db)
            .ok_or_else(|| "must be a database number ≥ 0".into()),
        Kind::LogLevel => match s.to_ascii_uppercase().as_str() {
            "TRACE" => Ok(Value::Level("trace")),
            "DEBUG" => Ok(Value::Level("debug")),
            "INFO" => Ok(Value::Level("info")),
            "WARN" | "WARNING" => Ok(Value::Level("warn")),
            "ERROR" | "CRITICAL" | "FATAL" => Ok(Value::Level("error")),
            _ => Err("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL".into()),
        },
        Kind::Filter => match tracing_subscriber::EnvFilter::try_new(s) {
            Ok(_) => Ok(Value::Text(s.to_string())),
            Err(_) => Err("is not a valid tracing filter directive".into()),
        },
        Kind::Secret => Ok(Value::Secret(Secret(raw.to_string()))),
        Kind::Rate => parse_rate(s).map(Value::Rate),
        Kind::Size => s
            .parse::<u32>()
            .map(Value::Count)
            .map_err(|_| "must be a whole number ≥ 0 (0: off)".into()),
        Kind::Sentinels => parse_sentinels(s).map(Value::Sentinels),
        Kind::Count => s
            .parse::<u32>()
            .ok()
            .filter(|n| *n >= 1)
            .map(Value::Count)
            .ok_or_else(|| "must be a whole number ≥ 1".into()),
    }
}

/// The parsed variables, by name: each set one (or its default), when valid.
struct Parsed {
    values: HashMap<&'static str, Value>,
    /// Names given a value (as opposed to defaulted), empty ones included.
    given: HashMap<&'static str, String>,
    errors: Vec<ConfigError>,
}

impl Parsed {
    fn read(env: &HashMap<String, String>) -> Parsed {
        let mut p = Parsed {
            values: HashMap::new(),
            given: HashMap::new(),
            errors: Vec::new(),
        };
        for v in VARS {
            let raw = env.get(v.name);
            if let Some(r) = raw {
                p.given.insert(v.name, r.clone());
            }
            // An empty value is "unset" (as an env file line `X=` means),
            // except for the list, where an explicit empty list wins.
            let raw = raw.filter(|r| !r.trim().is_empty() || v.kind == Kind::List);
            let Some(text) = raw.map(String::as_str).or(v.default) else {
                continue;
            };
            match parse_value(v.kind, text) {
                Ok(val) => {
                    p.values.insert(v.name, val);
                }
                Err(why) => {
                    let shown = match v.kind {
                        Kind::Secret => "[redacted]".to_string(),
                        Kind::RedisUrl => redact_url(text),
                        _ => crate::text::clip(&crate::text::redact_userinfo(text)).into_owned(),
                    };
                    p.errors.push(ConfigError {
                        var: v.name.to_string(),
                        value: shown,
                        why,
                    });
                }
            }
        }
        p
    }

    fn failed(&self, name: &str) -> bool {
        self.errors.iter().any(|e| e.var == name)
    }
    fn secs(&self, name: &str) -> f64 {
        match self.values.get(name) {
            Some(Value::Secs(s) | Value::Number(s)) => *s,
            _ => default_f64(name),
        }
    }
    fn bool(&self, name: &str) -> bool {
        matches!(self.values.get(name), Some(Value::Bool(true)))
    }
    fn word(&self, name: &str) -> &'static str {
        match self.values.get(name) {
            Some(Value::Word(w)) => w,
            _ => var_named(name).and_then(|v| v.default).unwrap_or(""),
        }
    }
    fn text(&self, name: &str) -> Option<String> {
        match self.values.get(name) {
            Some(Value::Text(t)) => Some(t.clone()),
            _ => None,
        }
    }
    fn secret(&self, name: &str) -> Option<Secret> {
        match self.values.get(name) {
            Some(Value::Secret(s)) if !s.expose().trim().is_empty() => Some(s.clone()),
            _ => None,
        }
    }
    fn rate(&self, name: &str) -> Option<Rate> {
        match self.values.get(name) {
            Some(Value::Rate(r)) => Some(*r),
            _ => None,
        }
    }
    fn list(&self, name: &str) -> Option<Vec<String>> {
        match self.values.get(name) {
            Some(Value::List(l)) => Some(l.clone()),
            _ => None,
        }
    }
}

/// A table default as a number (defaults are checked by a unit test).
fn default_f64(name: &str) -> f64 {
    var_named(name)
        .and_then(|v| v.default)
        .and_then(|d| d.parse().ok())
        .unwrap_or(0.0)
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

/// Parses a boolean in any of the spellings SPEC §2 allows.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
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

/// The process environment as text: every variable whose name and value are
/// UTF-8, and the names of those of ours (`P33_*` and every name
/// [`var_named`] knows) whose value is not. Another service's variable that
/// is not UTF-8 is none of our business and left out; nothing here panics
/// (`std::env::vars` would) or shows a value.
pub fn env_text() -> (Vec<(String, String)>, Vec<String>) {
    let mut pairs = Vec::new();
    let mut bad = Vec::new();
    for (k, v) in std::env::vars_os() {
        let Ok(k) = k.into_string() else { continue };
        match v.into_string() {
            Ok(v) => pairs.push((k, v)),
            Err(_) if k.starts_with("P33_") || var_named(&k).is_some() => bad.push(k),
            Err(_) => {}
        }
    }
    bad.sort();
    (pairs, bad)
}

/// What a configuration is read for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// The daemon: everything is required and validated.
    Daemon,
    /// `ctl`, `explain`, `replay`: only what reaches Redis and what the
    /// rules read; the exchange settings are ignored.
    Tools,
    /// `--check-config`: as the daemon, and with `CREDENTIALS_DIRECTORY`
    /// unset (a root shell, not the unit) the credentials are read where
    /// the unit's `LoadCredential=` finds them ([`CREDSTORE_DIRS`]).
    Check,
}

/// Where systemd's `LoadCredential=<name>:position-state-brain.<name>`
/// looks, in its order (SPEC §17, §18): what `--check-config` reads when
/// it runs outside the unit.
pub const CREDSTORE_DIRS: [&str; 3] = ["/etc/credstore", "/run/credstore", "/usr/lib/credstore"];

/// The credential files' name prefix in a credstore directory.
const CREDSTORE_PREFIX: &str = "position-state-brain.";

/// Where the credential files are read from.
#[derive(Debug, Clone)]
enum CredentialSource {
    /// None: only the environment.
    None,
    /// `$CREDENTIALS_DIRECTORY` (the unit's), files named as the credential.
    Directory(std::path::PathBuf),
    /// The credstore directories (outside the unit, `--check-config`): for
    /// each credential the first `position-state-brain.<name>` found.
    Store(Vec<std::path::PathBuf>),
}

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

/// The systemd credentials (SPEC §17): file in `$CREDENTIALS_DIRECTORY`,
/// and the variables it stands for (the first is the one it is read as;
/// the others are dropped: the credential wins over every name).
pub const CREDENTIALS: [(&str, &[&str]); 4] = [
    (
        "binance_api_key",
        &["BINANCE_TESTNET_API_KEY", "BINANCE_API_KEY"],
    ),
    (
        "binance_api_secret",
        &["BINANCE_TESTNET_API_SECRET", "BINANCE_API_SECRET"],
    ),
    ("redis_password", &["REDIS_PASSWORD"]),
    ("redis_sentinel_password", &["REDIS_SENTINEL_PASSWORD"]),
];

/// The largest credential file read.
const MAX_CREDENTIAL_BYTES: u64 = 64 * 1024;

/// The largest CA file read (`REDIS_TLS_CA_FILE`).
const MAX_CA_BYTES: u64 = 4 * 1024 * 1024;

/// Reads the credential files present in `$CREDENTIALS_DIRECTORY` into
/// `env` (a file wins over its variables; an absent file leaves them). Also
/// returns where each secret variable came from, and one error per file
/// that is unreadable, empty, too large or not UTF-8 (exit 78). A trailing
/// newline is not part of the value.
fn credentials(
    env: HashMap<String, String>,
    purpose: Purpose,
) -> (
    HashMap<String, String>,
    HashMap<&'static str, String>,
    Vec<ConfigError>,
) {
    let source = match env
        .get("CREDENTIALS_DIRECTORY")
        .filter(|d| !d.trim().is_empty())
    {
        Some(d) => CredentialSource::Directory(std::path::PathBuf::from(d)),
        None if purpose == Purpose::Check => CredentialSource::Store(
            CREDSTORE_DIRS
                .iter()
                .map(std::path::PathBuf::from)
                .collect(),
        ),
        None => CredentialSource::None,
    };
    credentials_from(env, purpose, source)
}

/// [`credentials`] from `source`.
fn credentials_from(
    mut env: HashMap<String, String>,
    purpose: Purpose,
    source: CredentialSource,
) -> (
    HashMap<String, String>,
    HashMap<&'static str, String>,
    Vec<ConfigError>,
) {
    let mut sources = HashMap::new();
    let mut errors = Vec::new();
    let dir = match &source {
        CredentialSource::Directory(d) => Some(d.clone()),
        _ => None,
    };
    if let Some(d) = &dir {
        if !d.is_dir() {
            errors.push(ConfigError {
                var: "CREDENTIALS_DIRECTORY".into(),
                value: crate::text::clip(&d.to_string_lossy()).into_owned(),
                why: "is not a directory (systemd sets it to the unit's credentials)".into(),
            });
        }
    }
    for (file, names) in CREDENTIALS {
        if purpose == Purpose::Tools && names.iter().any(|n| is_exchange_var(n)) {
            // ctl, explain and replay open no exchange credential.
            continue;
        }
        // The file, and how it is named in messages.
        let found: Option<(std::path::PathBuf, String)> = match &source {
            CredentialSource::Directory(d) if d.is_dir() => {
                Some((d.join(file), format!("$CREDENTIALS_DIRECTORY/{file}")))
                    .filter(|(p, _)| std::fs::symlink_metadata(p).is_ok())
            }
            CredentialSource::Store(dirs) => dirs
                .iter()
                .map(|d| d.join(format!("{CREDSTORE_PREFIX}{file}")))
                .find(|p| std::fs::symlink_metadata(p).is_ok())
                .map(|p| {
                    let shown = crate::text::clip(&p.to_string_lossy()).into_owned();
                    (p, shown)
                }),
            _ => None,
        };
        if let Some((path, shown)) = found {
            let problem = |why: String| ConfigError {
                var: format!("{} (credential {file})", names[0]),
                value: "[not shown]".into(),
                why: format!("{shown} {why}"),
            };
            match read_secret_file(&path) {
                Ok(value) => {
                    for n in &names[1..] {
                        env.remove(*n);
                    }
                    env.insert(names[0].to_string(), value.expose().to_string());
                    let from = match &source {
                        CredentialSource::Store(_) => {
                            format!("from {shown}, as the unit loads it")
                        }
                        _ => format!("from credential {file}"),
                    };
                    sources.insert(names[0], from);
                }
                Err(why) => errors.push(problem(why)),
            }
            continue;
        }
        for n in names {
            if env.get(*n).is_some_and(|v| !v.trim().is_empty()) {
                sources.insert(*n, "from the environment".to_string());
            }
        }
    }
    // REDIS_PASSWORD_FILE, when no credential or variable gave a password.
    let file = env
        .get("REDIS_PASSWORD_FILE")
        .filter(|f| !f.trim().is_empty())
        .cloned();
    if let Some(path) = file.filter(|_| env.get("REDIS_PASSWORD").is_none_or(|p| p.is_empty())) {
        let problem = |why: String| ConfigError {
            var: "REDIS_PASSWORD_FILE".into(),
            value: crate::text::clip(&path).into_owned(),
            why,
        };
        match read_secret_file(std::path::Path::new(&path)) {
            Err(why) => errors.push(problem(why)),
            Ok(value) => {
                env.insert("REDIS_PASSWORD".into(), value.expose().to_string());
                sources.insert("REDIS_PASSWORD", "from REDIS_PASSWORD_FILE".to_string());
            }
        }
    }
    (env, sources, errors)
}

/// Whether a password is one of the shipped placeholders (`CHANGE-ME…`,
/// any case, `_` for `-`).
pub fn is_placeholder(password: &str) -> bool {
    password
        .trim()
        .to_ascii_uppercase()
        .replace('_', "-")
        .starts_with("CHANGE-ME")
}

/// Reads a file that must be a regular file (SPEC §17): it is opened
/// non-blocking (a FIFO never hangs the open) and checked with `fstat`
/// before a byte is read, so a FIFO, a device, a socket or a directory is
/// an error, never a wait. At most `max` bytes: more is an error.
pub fn read_regular_file(path: &std::path::Path, max: u64) -> Result<Vec<u8>, String> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| format!("cannot be read: {}", e.kind()))?;
    let t = f
        .metadata()
        .map_err(|e| format!("cannot be read: {}", e.kind()))?
        .file_type();
    if !t.is_file() {
        let what = if t.is_fifo() {
            "a FIFO"
        } else if t.is_dir() {
            "a directory"
        } else if t.is_char_device() || t.is_block_device() {
            "a device"
        } else if t.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(format!("is {what}, not a regular file"));
    }
    let mut bytes = Vec::new();
    f.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot be read: {}", e.kind()))?;
    if bytes.len() as u64 > max {
        return Err(format!("is larger than {max} bytes"));
    }
    Ok(bytes)
}

/// A secret's file, read as a secret (SPEC §17): a regular file
/// ([`read_regular_file`]), UTF-8, one trailing newline (`\n` or `\r\n`)
/// dropped; empty, or with any other leading or trailing whitespace, is an
/// error (a `'secret '` would fail every signed request with no line
/// naming the file). The error says why, never the value.
pub fn read_secret_file(path: &std::path::Path) -> Result<Secret, String> {
    let bytes = read_regular_file(path, MAX_CREDENTIAL_BYTES)?;
    let text = String::from_utf8(bytes).map_err(|_| "is not UTF-8 text".to_string())?;
    let value = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(&text);
    if value.trim().is_empty() {
        return Err("is empty".into());
    }
    if value.trim() != value {
        return Err(
            "has whitespace before or after the secret (only one trailing newline is dropped): remove it"
                .into(),
        );
    }
    Ok(Secret::new(value))
}

/// The on-call's Redis settings (SPEC §12): `ctl`, `explain` and `replay`
/// read it before the environment when it is there.
pub const CTL_ENV_FILE: &str = "/etc/quantum/position-state-brain-ctl.env";

/// The `REDIS_*` settings of an env file (`NAME=value` lines, `#` comments,
/// optional quotes), and the names of other variables it holds (ignored:
/// the file holds Redis settings only).
pub fn parse_ctl_env(text: &str) -> (Vec<(String, String)>, Vec<String>) {
    let mut pairs = Vec::new();
    let mut ignored = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let k = k.trim();
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
            .unwrap_or(v);
        if k.starts_with("REDIS_") {
            pairs.push((k.to_string(), v.to_string()));
        } else {
            ignored.push(crate::text::clip(k).into_owned());
        }
    }
    (pairs, ignored)
}

/// The ctl env file's Redis settings (SPEC §12), `[]` when there is none;
/// a file that is there but cannot be read is said on stderr (never its
/// contents), and the environment alone is used.
fn ctl_env_pairs(env: &[(String, String)]) -> Vec<(String, String)> {
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "P33_CTL_ENV_FILE")
        .map_or(CTL_ENV_FILE, |(_, v)| v.as_str());
    // Echoed below: from the environment, so cut and escaped (SPEC §11).
    let shown = crate::text::clip(path);
    let text = match std::fs::read(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            eprintln!(
                "warning: {shown} cannot be read ({}): is this user in group p33-ops? Using the environment alone",
                e.kind()
            );
            return Vec::new();
        }
        Ok(b) if b.len() > 64 * 1024 => {
            eprintln!("warning: {shown} is larger than 64 KiB: not read");
            return Vec::new();
        }
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
    };
    let (pairs, ignored) = parse_ctl_env(&text);
    if !ignored.is_empty() {
        eprintln!(
            "warning: {shown} holds Redis settings only; ignored: {}",
            ignored.join(", ")
        );
    }
    pairs
}

/// Whether `name` is an exchange setting (credentials, URLs): what the
/// tools never validate or read.
fn is_exchange_var(name: &str) -> bool {
    name.starts_with("BINANCE_") || name.starts_with("P33_EXCHANGE_")
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
        Ok(Config {
            redis,
            binance_api_key: key.map(|(_, k)| k),
            binance_api_secret: secret.map(|(_, s)| s),
            exchange_base_url: p.text("P33_EXCHANGE_BASE_URL").unwrap_or_default(),
            position_stream: snapshot_source == SnapshotSource::Binance
                && p.word("P33_POSITION_STREAM") == "on",
            on_liquidation: match p.word("P33_ON_LIQUIDATION") {
                "halt" => Some(crate::domain::TradingState::Halted),
                "none" => None,
                _ => Some(crate::domain::TradingState::Reducing),
            },
            position_events: snapshot_source == SnapshotSource::Binance
                && p.word("P33_POSITION_STREAM") == "on"
                && p.word("P33_POSITION_EVENTS") == "on",
            trade_closed_events: snapshot_source == SnapshotSource::Binance
                && p.word("P33_POSITION_STREAM") == "on"
                && p.bool("P33_TRADE_CLOSED_EVENTS"),
            trade_closed_without_stream: p.bool("P33_TRADE_CLOSED_EVENTS")
                && !(snapshot_source == SnapshotSource::Binance
                    && p.word("P33_POSITION_STREAM") == "on"),
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

    /// The effective configuration as `NAME=value` pairs in table order,
    /// secrets redacted, for `--check-config`.
    pub fn effective(&self) -> &[(&'static str, String)] {
        &self.shown
    }

    /// Every WARN start-up gives about the configuration itself: unknown
    /// `P33_*` names, legacy variables, and each tier-3 allowlist entry that
    /// will be dropped, by name and why.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if !self.legacy_present.is_empty() {
            w.push(format!(
                "ignoring legacy variables (no longer used): {}",
                self.legacy_present.join(", ")
            ));
        }
        if !self.unknown_p33.is_empty() {
            w.push(format!(
                "unknown P33_ variables (typo?), ignored: {}",
                self.unknown_p33.join(", ")
            ));
        }
        for s in &self.allowlist_env {
            if let Some(why) = keys::symbol_problem(s) {
                w.push(format!(
                    "P3.3 allowlist: tier-3 entry {:?} will be dropped: {why}",
                    crate::text::clip(s)
                ));
            }
        }
        for (set, meant) in &self.near_misses {
            w.push(format!(
                "{} is not a variable this daemon reads; did you mean {meant}?",
                crate::text::clip(set)
            ));
        }
        if self.both_key_kinds {
            w.push(
                "testnet and mainnet exchange credentials are both set: BINANCE_TESTNET_API_KEY/SECRET win; unset the ones not meant"
                    .to_string(),
            );
        }
        if self.snapshot_source == SnapshotSource::Binance
            && self.poll_interval.as_secs_f64() >= self.stale_threshold_s
        {
            w.push(format!(
                "P33_POLL_SEC={} is not below P33_STALE_THRESHOLD_SEC={}: every snapshot goes stale between polls and plans are denied stale_exchange_state",
                self.poll_interval.as_secs_f64(),
                self.stale_threshold_s
            ));
        }
        let placeholder = [
            ("REDIS_PASSWORD", self.redis.info.redis.password.as_deref()),
            (
                "REDIS_SENTINEL_PASSWORD",
                self.redis
                    .sentinel
                    .as_ref()
                    .and_then(|s| s.password.as_ref())
                    .map(Secret::expose),
            ),
        ];
        for (name, pw) in placeholder {
            if pw.is_some_and(is_placeholder) {
                w.push(format!(
                    "{name} is a shipped placeholder (CHANGE-ME…): anyone who read the package can log in as this user; choose a password and load the users with `position-state-brain acl` (SPEC §17)"
                ));
            }
        }
        if self.trade_closed_without_stream {
            w.push(
                "P33_TRADE_CLOSED_EVENTS=true does nothing without the user data stream (P33_SNAPSHOT_SOURCE=binance, P33_POSITION_STREAM=on): only the stream sees the fills that closed a position"
                    .to_string(),
            );
        }
        if !self.metrics_addr.is_loopback() {
            w.push(format!(
                "P33_METRICS_ADDR={} is not loopback: /metrics (positions, the allowlist) is reachable from other hosts; set 127.0.0.1, or allow only the Prometheus host to port {}",
                self.metrics_addr, self.metrics_port
            ));
        }
        w
    }
}

/// The Levenshtein distance of two short names (ASCII, bytes).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// SPEC §15: `REDIS_SENTINELS` and `REDIS_SENTINEL_MASTER` come together,
/// `REDIS_SENTINEL_PASSWORD` only with them, and never with `REDIS_URL`
/// (empty counts as unset). A variable that was already wrong gets no
/// follow-on error.
fn sentinel_rules(p: &mut Parsed) {
    let set = |p: &Parsed, n: &str| p.given.get(n).is_some_and(|v| !v.trim().is_empty());
    let (list, master) = (set(p, "REDIS_SENTINELS"), set(p, "REDIS_SENTINEL_MASTER"));
    let (password, url) = (set(p, "REDIS_SENTINEL_PASSWORD"), set(p, "REDIS_URL"));
    let username = set(p, "REDIS_SENTINEL_USERNAME");
    if p.failed("REDIS_SENTINELS") || p.failed("REDIS_SENTINEL_MASTER") {
        return;
    }
    let mut err = |var: &str, why: &str| {
        p.errors.push(ConfigError {
            var: var.into(),
            value: String::new(),
            why: why.into(),
        })
    };
    if list != master {
        let missing = if list {
            "REDIS_SENTINEL_MASTER"
        } else {
            "REDIS_SENTINELS"
        };
        err(
            "REDIS_SENTINELS/REDIS_SENTINEL_MASTER",
            &format!(
                "{missing} unset: Redis Sentinel needs both the sentinels and the master name"
            ),
        );
    } else if !list && password {
        err(
            "REDIS_SENTINEL_PASSWORD",
            "set without REDIS_SENTINELS and REDIS_SENTINEL_MASTER",
        );
    } else if !list && username {
        err(
            "REDIS_SENTINEL_USERNAME",
            "set without REDIS_SENTINELS and REDIS_SENTINEL_MASTER",
        );
    }
    if list && url {
        err(
            "REDIS_URL/REDIS_SENTINELS",
            "both set: connect either to one Redis (REDIS_URL) or through Redis Sentinel (REDIS_SENTINELS)",
        );
    }
}

/// `REDIS_URL` wins over host/port/db; `REDIS_PASSWORD` applies when the URL
/// carries none. With sentinels, host and port come from them.
/// `REDIS_TLS` and its CA file (SPEC §17): `None` without TLS, else the CA
/// certificates (PEM) or `None` for the webpki roots. A CA file that cannot
/// be read or holds no certificate is an error.
fn tls_settings(p: &mut Parsed) -> Option<Option<Vec<u8>>> {
    let ca = p.text("REDIS_TLS_CA_FILE");
    if !p.bool("REDIS_TLS") {
        if ca.is_some() {
            p.errors.push(ConfigError {
                var: "REDIS_TLS_CA_FILE".into(),
                value: String::new(),
                why: "set without REDIS_TLS=true".into(),
            });
        }
        return None;
    }
    let Some(path) = ca else { return Some(None) };
    let err = |why: String| ConfigError {
        var: "REDIS_TLS_CA_FILE".into(),
        value: crate::text::clip(&path).into_owned(),
        why,
    };
    match read_regular_file(std::path::Path::new(&path), MAX_CA_BYTES) {
        Err(why) => {
            p.errors.push(err(why));
            Some(None)
        }
        Ok(pem) => {
            use rustls_pki_types::pem::PemObject;
            let certs = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
                .filter(Result::is_ok)
                .count();
            if certs == 0 {
                p.errors.push(err("holds no PEM certificate".into()));
            }
            Some(Some(pem))
        }
    }
}

fn redis_target(p: &mut Parsed, tls: Option<Option<Vec<u8>>>) -> RedisTarget {
    let mut info = match p.values.get("REDIS_URL") {
        Some(Value::RedisUrl(i, _)) => (**i).clone(),
        _ => {
            let host = p.text("REDIS_HOST").unwrap_or_else(|| "localhost".into());
            let port = match p.values.get("REDIS_PORT") {
                Some(Value::Port(n)) => *n,
                _ => 6379,
            };
            let mut info = redis::ConnectionInfo {
                addr: redis::ConnectionAddr::Tcp(host, port),
                redis: redis::RedisConnectionInfo::default(),
            };
            if let Some(Value::Db(d)) = p.values.get("REDIS_DB") {
                info.redis.db = *d;
            }
            info
        }
    };
    if info.redis.password.is_none() {
        info.redis.password = p.secret("REDIS_PASSWORD").map(|s| s.expose().to_string());
    }
    if info.redis.username.is_none() {
        info.redis.username = p.text("REDIS_USERNAME");
    }
    let sentinel = match (
        p.values.get("REDIS_SENTINELS"),
        p.text("REDIS_SENTINEL_MASTER"),
    ) {
        (Some(Value::Sentinels(list)), Some(master)) => Some(SentinelTarget {
            sentinels: list.clone(),
            master,
            password: p.secret("REDIS_SENTINEL_PASSWORD"),
            username: p.text("REDIS_SENTINEL_USERNAME"),
            tls: tls.clone(),
        }),
        _ => None,
    };
    if let Some(ca) = tls {
        // TLS to the data node(s): the address (a sentinel-found master's
        // too, which takes this one's TLS settings) becomes TcpTls.
        if let redis::ConnectionAddr::Tcp(host, port) = &info.addr {
            info.addr = redis::ConnectionAddr::TcpTls {
                host: host.clone(),
                port: *port,
                insecure: false,
                tls_params: None,
            };
        }
        if let Some(pem) = ca {
            let certs = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem),
            };
            match redis::Client::build_with_tls(info.clone(), certs) {
                Ok(c) => info = c.get_connection_info().clone(),
                Err(e) => p.errors.push(ConfigError {
                    var: "REDIS_TLS_CA_FILE".into(),
                    value: String::new(),
                    why: format!(
                        "not usable as the CA: {}",
                        crate::text::clip(&e.to_string())
                    ),
                }),
            }
        }
    }
    RedisTarget { info, sentinel }
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

    #[test]
    fn the_ctl_env_file_gives_redis_settings_only() {
        let (pairs, ignored) = parse_ctl_env(
            "# on call\n\nREDIS_URL=redis://h:1/0\nexport REDIS_USERNAME=\"p33-ops\"\nREDIS_PASSWORD_FILE='/etc/credstore/p'\nBINANCE_API_SECRET=x\nP33_DRY_RUN=true\nnot a line\n",
        );
        assert_eq!(
            pairs,
            vec![
                ("REDIS_URL".to_string(), "redis://h:1/0".to_string()),
                ("REDIS_USERNAME".to_string(), "p33-ops".to_string()),
                (
                    "REDIS_PASSWORD_FILE".to_string(),
                    "/etc/credstore/p".to_string()
                ),
            ]
        );
        assert_eq!(ignored, vec!["BINANCE_API_SECRET", "P33_DRY_RUN"]);
    }

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
        let mut v: Vec<(String, String)> = vec![("P33_SNAPSHOT_SOURCE".into(), "external".into())];
        v.extend(pairs.iter().map(|(k, x)| (k.to_string(), x.to_string())));
        Config::from_pairs(v)
    }

    #[test]
    fn systemd_credentials_win_over_the_environment_and_say_where_they_came_from() {
        let dir = std::env::temp_dir().join(format!("p33-creds-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("binance_api_key"), "cred-key\n").unwrap();
        std::fs::write(dir.join("binance_api_secret"), "cred-secret").unwrap();
        std::fs::write(dir.join("redis_password"), "cred-redis\r\n").unwrap();
        let d = dir.to_string_lossy().into_owned();
        let pairs = |extra: &[(&str, &str)]| {
            let mut v: Vec<(String, String)> = vec![
                ("CREDENTIALS_DIRECTORY".into(), d.clone()),
                ("BINANCE_API_KEY".into(), "env-key".into()),
                ("BINANCE_TESTNET_API_SECRET".into(), "env-secret".into()),
            ];
            v.extend(extra.iter().map(|(k, x)| (k.to_string(), x.to_string())));
            v
        };
        let c = Config::from_pairs(pairs(&[])).unwrap();
        assert_eq!(c.binance_api_key.as_ref().unwrap().expose(), "cred-key");
        assert_eq!(
            c.binance_api_secret.as_ref().unwrap().expose(),
            "cred-secret"
        );
        assert!(!c.both_key_kinds, "the credential replaced both key names");
        let shown: HashMap<&str, &str> = c
            .effective()
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect();
        assert_eq!(
            shown["BINANCE_TESTNET_API_KEY"],
            "[redacted] (from credential binance_api_key)"
        );
        assert_eq!(
            shown["REDIS_PASSWORD"],
            "[redacted] (from credential redis_password)"
        );
        assert_eq!(shown["REDIS_SENTINEL_PASSWORD"], "(unset)");
        assert_eq!(shown["BINANCE_API_KEY"], "(unset)");
        let text = format!("{c:?}{:?}", c.effective());
        for secret in ["cred-key", "cred-secret", "cred-redis", "env-key"] {
            assert!(!text.contains(secret), "{secret} shown");
        }
        // Empty, unreadable: exit 78 naming the file, never the value.
        std::fs::write(dir.join("redis_password"), "\n").unwrap();
        let e = Config::from_pairs(pairs(&[])).unwrap_err().to_string();
        assert!(e.contains("redis_password is empty"), "{e}");
        std::fs::remove_file(dir.join("redis_password")).unwrap();
        std::fs::create_dir(dir.join("redis_password")).unwrap();
        let e = Config::from_pairs(pairs(&[])).unwrap_err().to_string();
        assert!(
            e.contains("redis_password is a directory, not a regular file"),
            "{e}"
        );
        std::fs::remove_dir(dir.join("redis_password")).unwrap();
        // A FIFO is refused at once, never waited on (no writer ever comes).
        let fifo = dir.join("redis_password");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let e = Config::from_pairs(pairs(&[])).unwrap_err().to_string();
        assert!(
            e.contains("redis_password is a FIFO, not a regular file"),
            "{e}"
        );
        std::fs::remove_file(&fifo).unwrap();
        // One trailing newline is dropped; any other blank around it is an
        // error naming the file, never the value.
        for (body, ok) in [
            ("pw-x\n", true),
            ("pw-x\r\n", true),
            ("pw-x", true),
            ("pw-x ", false),
            (" pw-x", false),
            ("pw-x\t\n", false),
            ("pw-x\n\n", false),
        ] {
            std::fs::write(dir.join("redis_password"), body).unwrap();
            match Config::from_pairs(pairs(&[])) {
                Ok(c) => {
                    assert!(ok, "{body:?} accepted");
                    assert_eq!(c.redis.info.redis.password.as_deref(), Some("pw-x"));
                }
                Err(e) => {
                    let e = e.to_string();
                    assert!(!ok, "{body:?}: {e}");
                    assert!(e.contains("redis_password has whitespace"), "{e}");
                    assert!(!e.contains("pw-x"), "{e}");
                }
            }
        }
        std::fs::remove_file(dir.join("redis_password")).unwrap();
        // The tools ignore the exchange's credentials, broken or not.
        std::fs::write(dir.join("binance_api_key"), "").unwrap();
        assert!(Config::from_pairs(pairs(&[])).is_err());
        assert!(Config::from_pairs_for(pairs(&[]), Purpose::Tools).is_ok());
        // Absent files leave the environment's values.
        std::fs::remove_file(dir.join("binance_api_key")).unwrap();
        let c = Config::from_pairs(pairs(&[])).unwrap();
        assert_eq!(c.binance_api_key.as_ref().unwrap().expose(), "env-key");
        let shown: HashMap<&str, &str> = c
            .effective()
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect();
        assert_eq!(
            shown["BINANCE_API_KEY"],
            "[redacted] (from the environment)"
        );
        // A credentials directory that is not there: exit 78.
        let e = Config::from_pairs(vec![(
            "CREDENTIALS_DIRECTORY".to_string(),
            dir.join("missing").to_string_lossy().into_owned(),
        )])
        .unwrap_err()
        .to_string();
        assert!(e.contains("CREDENTIALS_DIRECTORY"), "{e}");
        assert!(e.contains("is not a directory"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_stream_url_follows_the_rest_url_unless_set() {
        for (base, want) in [
            (
                "https://fapi.binance.com",
                Some("wss://fstream.binance.com"),
            ),
            (
                "https://testnet.binancefuture.com",
                Some("wss://stream.binancefuture.com"),
            ),
            (
                "https://demo-fapi.binance.com",
                Some("wss://demo-fstream.binance.com"),
            ),
            ("http://127.0.0.1:8080", Some("ws://127.0.0.1:8080")),
            (
                "https://proxy.example:8443/api",
                Some("wss://proxy.example:8443"),
            ),
            ("http://[::1]:9", Some("ws://[::1]:9")),
            ("ftp://x", None),
        ] {
            assert_eq!(derive_ws_url(base).as_deref(), want, "{base}");
        }
        let binance = |extra: &[(&str, &str)]| {
            let mut v: Vec<(String, String)> = vec![
                ("BINANCE_API_KEY".into(), "k".into()),
                ("BINANCE_API_SECRET".into(), "s".into()),
            ];
            v.extend(extra.iter().map(|(k, x)| (k.to_string(), x.to_string())));
            Config::from_pairs(v)
        };
        let c = binance(&[("P33_EXCHANGE_BASE_URL", "http://127.0.0.1:9")]).unwrap();
        assert_eq!(c.exchange_ws_url, "ws://127.0.0.1:9");
        assert!(c.position_stream);
        let c = binance(&[
            ("P33_EXCHANGE_WS_URL", "wss://elsewhere/"),
            ("P33_POSITION_STREAM", "OFF"),
        ])
        .unwrap();
        assert_eq!(
            (c.exchange_ws_url.as_str(), c.position_stream),
            ("wss://elsewhere", false)
        );
        // External mode never streams.
        assert!(!cfg(&[]).unwrap().position_stream);
        for bad in ["http://x", "wss://", "nonsense"] {
            let e = binance(&[("P33_EXCHANGE_WS_URL", bad)]).unwrap_err();
            assert!(e.to_string().contains("P33_EXCHANGE_WS_URL"), "{bad}: {e}");
        }
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
    fn the_table_is_the_one_list_of_names_and_every_default_parses() {
        let mut names = std::collections::HashSet::new();
        for v in VARS {
            assert!(names.insert(v.name), "{} twice", v.name);
            if let Some(d) = v.default {
                assert!(parse_value(v.kind, d).is_ok(), "default of {}", v.name);
            }
            assert!(!v.doc.is_empty(), "{} has a doc", v.name);
        }
        let c = cfg(&[]).unwrap();
        let shown: Vec<&str> = c.effective().iter().map(|(k, _)| *k).collect();
        for v in VARS {
            assert!(shown.contains(&v.name), "--check-config shows {}", v.name);
        }
    }

    #[test]
    fn one_error_per_bad_variable_and_no_follow_on() {
        // A misspelt mode is one error, not also "credentials missing".
        let e = Config::from_pairs([("P33_SNAPSHOT_SOURCE".to_string(), "extrenal".to_string())])
            .unwrap_err();
        assert_eq!(e.0.len(), 1, "{e}");
        assert_eq!(e.0[0].var, "P33_SNAPSHOT_SOURCE");
        // A bad TTL is one error, not also "at least 0.001".
        let e = cfg(&[("P33_PERMIT_TTL", "-1")]).unwrap_err();
        assert_eq!(e.0.len(), 1, "{e}");
    }

    #[test]
    fn warnings_name_every_dropped_entry_and_why() {
        let c = cfg(&[
            ("P33_ALLOWLIST", "btcusdt,ETHUSDT,BTC-USDT"),
            ("P33_POLL_SECS", "3"),
        ])
        .unwrap();
        let w = c.warnings().join("\n");
        assert!(w.contains("\"btcusdt\" will be dropped: lower case"), "{w}");
        assert!(
            w.contains("\"BTC-USDT\" will be dropped: holds characters"),
            "{w}"
        );
        assert!(!w.contains("ETHUSDT"), "{w}");
        assert!(w.contains("P33_POLL_SECS"), "{w}");
    }

    #[test]
    fn check_config_warns_of_settings_that_cannot_be_meant() {
        let c = cfg(&[
            ("P33_SNAPSHOT_SOURCE", "binance"),
            ("BINANCE_TESTNET_API_KEY", "k"),
            ("BINANCE_TESTNET_API_SECRET", "s"),
            ("BINANCE_API_KEY", "k2"),
            ("REDIS_PASWORD", "x"),
            ("P33_POLL_SEC", "15"),
            ("P33_STALE_THRESHOLD_SEC", "10"),
            ("P33_METRICS_ADDR", "0.0.0.0"),
            ("P33_POSITION_STREAM", "off"),
            ("P33_TRADE_CLOSED_EVENTS", "true"),
        ])
        .unwrap();
        assert!(!c.trade_closed_events);
        let w = c.warnings().join("\n");
        for want in [
            "REDIS_PASWORD is not a variable this daemon reads; did you mean REDIS_PASSWORD?",
            "P33_TRADE_CLOSED_EVENTS=true does nothing without the user data stream",
            "testnet and mainnet exchange credentials are both set",
            "P33_POLL_SEC=15 is not below P33_STALE_THRESHOLD_SEC=10",
            "P33_METRICS_ADDR=0.0.0.0 is not loopback",
        ] {
            assert!(w.contains(want), "{want}: {w}");
        }
        assert!(!w.contains("\"x\""), "no value of a secret-like name: {w}");
        let quiet = cfg(&[
            ("P33_SNAPSHOT_SOURCE", "external"),
            ("P33_METRICS_ADDR", "127.0.0.1"),
            ("REDIS_OTHER_SERVICE_SETTING", "1"),
        ])
        .unwrap();
        assert!(quiet.warnings().is_empty(), "{:?}", quiet.warnings());
        assert_eq!(edit_distance("REDIS_PASWORD", "REDIS_PASSWORD"), 1);
    }

    #[test]
    fn check_config_reads_the_credstore_outside_the_unit() {
        let dir = std::env::temp_dir().join(format!("p33-credstore-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("position-state-brain.redis_password"),
            "store-pw\n",
        )
        .unwrap();
        let env: HashMap<String, String> = HashMap::new();
        let (env, sources, errors) = credentials_from(
            env,
            Purpose::Check,
            CredentialSource::Store(vec![dir.join("absent"), dir.clone()]),
        );
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(env["REDIS_PASSWORD"], "store-pw");
        let from = &sources["REDIS_PASSWORD"];
        assert!(
            from.contains("position-state-brain.redis_password, as the unit loads it"),
            "{from}"
        );
        // A bad file there is named, never read as a secret.
        std::fs::write(
            dir.join("position-state-brain.redis_password"),
            " store-pw\n",
        )
        .unwrap();
        let (_, _, errors) = credentials_from(
            HashMap::new(),
            Purpose::Check,
            CredentialSource::Store(vec![dir.clone()]),
        );
        let e = format!("{errors:?}");
        assert!(
            e.contains("position-state-brain.redis_password has whitespace"),
            "{e}"
        );
        assert!(!e.contains("store-pw"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_shipped_placeholder_password_is_warned_of() {
        for (name, value) in [
            ("REDIS_PASSWORD", "CHANGE-ME-p33"),
            ("REDIS_URL", "redis://p33:change-me-p33@127.0.0.1:6379/0"),
        ] {
            let c = cfg(&[(name, value)]).unwrap();
            let w = c.warnings().join("\n");
            assert!(w.contains("REDIS_PASSWORD is a shipped placeholder"), "{w}");
            assert!(!w.to_ascii_lowercase().contains("change-me-p33"), "{w}");
        }
        let c = cfg(&[("REDIS_PASSWORD", "a-real-one")]).unwrap();
        assert!(!c.warnings().join("").contains("placeholder"));
    }

    #[test]
    fn rates_parse_and_bad_ones_are_named() {
        let c = cfg(&[
            ("P33_MAX_OPENS", "20/60s"),
            ("P33_MAX_OPENS_PER_SYMBOL", " 2 / 0.5 "),
        ])
        .unwrap();
        assert_eq!(
            c.max_opens,
            Some(Rate {
                limit: 20,
                window: Duration::from_secs(60)
            })
        );
        assert_eq!(
            c.max_opens_per_symbol.unwrap().window,
            Duration::from_millis(500)
        );
        assert!(
            cfg(&[]).unwrap().max_opens.is_none(),
            "off unless configured"
        );
        for bad in [
            "20",
            "0/60s",
            "x/60s",
            "20/0s",
            "20/-1s",
            "20/NaNs",
            "20/1e300s",
            "-3/60s",
        ] {
            let e = cfg(&[("P33_MAX_OPENS", bad)]).unwrap_err();
            assert_eq!(e.0.len(), 1, "{bad}: {e}");
            assert_eq!(e.0[0].var, "P33_MAX_OPENS", "{bad}");
        }
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
    fn acl_users_and_tls_settings() {
        // REDIS_USERNAME applies when the URL names no user.
        let c = cfg(&[("REDIS_USERNAME", "p33"), ("REDIS_PASSWORD", "pw")]).unwrap();
        assert_eq!(c.redis.info.redis.username.as_deref(), Some("p33"));
        let c = cfg(&[
            ("REDIS_URL", "redis://ops:pw@127.0.0.1:6390/0"),
            ("REDIS_USERNAME", "p33"),
        ])
        .unwrap();
        assert_eq!(c.redis.info.redis.username.as_deref(), Some("ops"));
        // The sentinels' own user: with them only.
        let c = cfg(&[
            ("REDIS_SENTINELS", "127.0.0.1:26379"),
            ("REDIS_SENTINEL_MASTER", "quantum"),
            ("REDIS_SENTINEL_USERNAME", "watcher"),
            ("REDIS_SENTINEL_PASSWORD", "x"),
        ])
        .unwrap();
        let s = c.redis.sentinel.as_ref().unwrap();
        assert_eq!(s.username.as_deref(), Some("watcher"));
        assert_eq!(s.tls, None);
        let e = cfg(&[("REDIS_SENTINEL_USERNAME", "watcher")]).unwrap_err();
        assert!(e.to_string().contains("REDIS_SENTINEL_USERNAME"), "{e}");
        // TLS: a plain address becomes TLS; the CA file only with it.
        let c = cfg(&[("REDIS_TLS", "true"), ("REDIS_HOST", "redis-1")]).unwrap();
        assert!(matches!(
            &c.redis.info.addr,
            redis::ConnectionAddr::TcpTls { host, insecure: false, .. } if host == "redis-1"
        ));
        assert!(
            c.redis.display().starts_with("rediss://redis-1:6379/"),
            "{}",
            c.redis.display()
        );
        let e = cfg(&[("REDIS_TLS_CA_FILE", "/nonexistent")]).unwrap_err();
        assert!(e.to_string().contains("set without REDIS_TLS=true"), "{e}");
        let e = cfg(&[
            ("REDIS_TLS", "true"),
            ("REDIS_TLS_CA_FILE", "/nonexistent/ca.crt"),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("cannot be read"), "{e}");
        let c = cfg(&[
            ("REDIS_TLS", "true"),
            ("REDIS_SENTINELS", "127.0.0.1:26379"),
            ("REDIS_SENTINEL_MASTER", "quantum"),
        ])
        .unwrap();
        assert_eq!(
            c.redis.sentinel.as_ref().unwrap().tls,
            Some(None),
            "TLS, webpki roots"
        );
    }

    #[test]
    fn sentinel_variables_come_together_and_never_with_redis_url() {
        let c = cfg(&[
            (
                "REDIS_SENTINELS",
                "127.0.0.1:26379, [::1]:26380,sentinel-3:26381",
            ),
            ("REDIS_SENTINEL_MASTER", "quantum"),
            ("REDIS_SENTINEL_PASSWORD", "s3ntinel"),
            ("REDIS_PASSWORD", "n0de"),
            ("REDIS_DB", "2"),
        ])
        .unwrap();
        let s = c.redis.sentinel.as_ref().expect("sentinel mode");
        assert_eq!(
            s.sentinels,
            vec![
                ("127.0.0.1".to_string(), 26379),
                ("::1".to_string(), 26380),
                ("sentinel-3".to_string(), 26381)
            ]
        );
        assert_eq!(s.master, "quantum");
        assert_eq!(
            c.redis.display(),
            "redis+sentinel://[redacted]@127.0.0.1:26379,[::1]:26380,sentinel-3:26381/quantum/2"
        );
        assert_eq!(c.redis.info.redis.password.as_deref(), Some("n0de"));
        let shown = format!("{c:?} {:?}", c.effective());
        assert!(
            !shown.contains("s3ntinel") && !shown.contains("n0de"),
            "{shown}"
        );

        // (pairs, the variable the one error names, what it says)
        type Row<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);
        let rows: &[Row] = &[
            (
                &[("REDIS_SENTINELS", "127.0.0.1:26379")],
                "REDIS_SENTINELS/REDIS_SENTINEL_MASTER",
                "REDIS_SENTINEL_MASTER unset",
            ),
            (
                &[("REDIS_SENTINEL_MASTER", "quantum")],
                "REDIS_SENTINELS/REDIS_SENTINEL_MASTER",
                "REDIS_SENTINELS unset",
            ),
            (
                &[
                    ("REDIS_SENTINELS", "127.0.0.1:26379"),
                    ("REDIS_SENTINEL_MASTER", " "),
                ],
                "REDIS_SENTINELS/REDIS_SENTINEL_MASTER",
                "REDIS_SENTINEL_MASTER unset",
            ),
            (
                &[
                    ("REDIS_SENTINELS", ""),
                    ("REDIS_SENTINEL_MASTER", "quantum"),
                ],
                "REDIS_SENTINELS/REDIS_SENTINEL_MASTER",
                "REDIS_SENTINELS unset",
            ),
            (
                &[("REDIS_SENTINEL_PASSWORD", "x")],
                "REDIS_SENTINEL_PASSWORD",
                "without REDIS_SENTINELS",
            ),
            (
                &[
                    ("REDIS_SENTINELS", "127.0.0.1:26379"),
                    ("REDIS_SENTINEL_MASTER", "q"),
                    ("REDIS_URL", "redis://127.0.0.1:6390/0"),
                ],
                "REDIS_URL/REDIS_SENTINELS",
                "both set",
            ),
            (
                &[
                    ("REDIS_SENTINELS", "127.0.0.1"),
                    ("REDIS_SENTINEL_MASTER", "q"),
                ],
                "REDIS_SENTINELS",
                "not host:port",
            ),
            (
                &[
                    ("REDIS_SENTINELS", "127.0.0.1:0"),
                    ("REDIS_SENTINEL_MASTER", "q"),
                ],
                "REDIS_SENTINELS",
                "no valid port",
            ),
            (
                &[
                    ("REDIS_SENTINELS", "127.0.0.1:26379,h:65536"),
                    ("REDIS_SENTINEL_MASTER", "q"),
                ],
                "REDIS_SENTINELS",
                "no valid port",
            ),
            (
                &[("REDIS_SENTINELS", "h:x"), ("REDIS_SENTINEL_MASTER", "q")],
                "REDIS_SENTINELS",
                "no valid port",
            ),
            (
                &[
                    ("REDIS_SENTINELS", "::1:26379"),
                    ("REDIS_SENTINEL_MASTER", "q"),
                ],
                "REDIS_SENTINELS",
                "not host:port",
            ),
            (
                &[
                    ("REDIS_SENTINELS", ":26379"),
                    ("REDIS_SENTINEL_MASTER", "q"),
                ],
                "REDIS_SENTINELS",
                "no valid host",
            ),
            (
                &[("REDIS_SENTINELS", ",,"), ("REDIS_SENTINEL_MASTER", "q")],
                "REDIS_SENTINELS",
                "at least one",
            ),
        ];
        for (pairs, var, why) in rows {
            let e = cfg(pairs).unwrap_err();
            assert_eq!(e.0.len(), 1, "{pairs:?}: one error, no follow-on: {e}");
            assert_eq!(e.0[0].var, *var, "{pairs:?}: {e}");
            assert!(e.0[0].why.contains(why), "{pairs:?}: {e}");
        }
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
