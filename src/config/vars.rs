//! The variable table (SPEC §2): every variable named once with its
//! default, kind and meaning; everything else is derived from it. One
//! table, one line per variable.

use crate::redis::keys;

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

pub(super) const fn var(
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

/// The on-call's Redis settings (SPEC §12): `ctl`, `explain` and `replay`
/// read it before the environment when it is there.
pub const CTL_ENV_FILE: &str = "/etc/quantum/position-state-brain-ctl.env";
