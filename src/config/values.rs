//! Reading one variable's value by its [`Kind`] (a default by the same
//! code as a user's value), and the parsed set the cross-variable rules
//! work on.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use super::vars::{var_named, Kind, VARS};
use super::ConfigError;
use crate::redis::target::{join_addresses, parse_sentinels, RedisTarget};
use crate::text::Secret;

/// A parsed value.
#[derive(Clone)]
pub(super) enum Value {
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
    pub(super) fn shown(&self) -> String {
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
pub(super) fn parse_value(kind: Kind, raw: &str) -> Result<Value, String> {
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
        Kind::Secret => Ok(Value::Secret(Secret::new(raw))),
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
pub(super) struct Parsed {
    pub(super) values: HashMap<&'static str, Value>,
    /// Names given a value (as opposed to defaulted), empty ones included.
    pub(super) given: HashMap<&'static str, String>,
    pub(super) errors: Vec<ConfigError>,
}

impl Parsed {
    pub(super) fn read(env: &HashMap<String, String>) -> Parsed {
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

    pub(super) fn failed(&self, name: &str) -> bool {
        self.errors.iter().any(|e| e.var == name)
    }
    pub(super) fn secs(&self, name: &str) -> f64 {
        match self.values.get(name) {
            Some(Value::Secs(s) | Value::Number(s)) => *s,
            _ => default_f64(name),
        }
    }
    pub(super) fn bool(&self, name: &str) -> bool {
        matches!(self.values.get(name), Some(Value::Bool(true)))
    }
    pub(super) fn word(&self, name: &str) -> &'static str {
        match self.values.get(name) {
            Some(Value::Word(w)) => w,
            _ => var_named(name).and_then(|v| v.default).unwrap_or(""),
        }
    }
    pub(super) fn text(&self, name: &str) -> Option<String> {
        match self.values.get(name) {
            Some(Value::Text(t)) => Some(t.clone()),
            _ => None,
        }
    }
    pub(super) fn secret(&self, name: &str) -> Option<Secret> {
        match self.values.get(name) {
            Some(Value::Secret(s)) if !s.expose().trim().is_empty() => Some(s.clone()),
            _ => None,
        }
    }
    pub(super) fn rate(&self, name: &str) -> Option<Rate> {
        match self.values.get(name) {
            Some(Value::Rate(r)) => Some(*r),
            _ => None,
        }
    }
    pub(super) fn list(&self, name: &str) -> Option<Vec<String>> {
        match self.values.get(name) {
            Some(Value::List(l)) => Some(l.clone()),
            _ => None,
        }
    }
}

/// A table default as a number (defaults are checked by a unit test).
pub(super) fn default_f64(name: &str) -> f64 {
    var_named(name)
        .and_then(|v| v.default)
        .and_then(|d| d.parse().ok())
        .unwrap_or(0.0)
}

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
pub(super) const MAX_SECS: f64 = 31_536_000.0;

/// A `Duration` from positive, finite seconds (at most [`MAX_SECS`]).
pub(super) fn dur(secs: f64) -> Duration {
    Duration::try_from_secs_f64(secs.clamp(0.0, MAX_SECS)).unwrap_or(Duration::ZERO)
}

/// A URL with everything that may be a credential replaced, for error
/// messages (SPEC §11: anything after a `:` before an `@` is a password).
/// It must hold for malformed URLs too (`redis//:pw@host`, `:pw@host`), so
/// it does not parse: everything before the last `@` goes, but for a
/// well-formed `scheme://`; a `password=` query value goes too.
pub(super) fn redact_url(url: &str) -> String {
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
