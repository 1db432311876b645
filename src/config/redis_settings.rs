//! Where Redis is, from the environment (SPEC §2, §15, §17): `REDIS_URL`
//! or host/port/db, the sentinels, TLS and its CA file, into a
//! [`RedisTarget`].

use super::credentials::{read_regular_file, MAX_CA_BYTES};
use super::values::{Parsed, Value};
use super::ConfigError;
use crate::redis::target::{RedisTarget, SentinelTarget};

/// SPEC §15: `REDIS_SENTINELS` and `REDIS_SENTINEL_MASTER` come together,
/// `REDIS_SENTINEL_PASSWORD` only with them, and never with `REDIS_URL`
/// (empty counts as unset). A variable that was already wrong gets no
/// follow-on error.
pub(super) fn sentinel_rules(p: &mut Parsed) {
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
pub(super) fn tls_settings(p: &mut Parsed) -> Option<Option<Vec<u8>>> {
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

pub(super) fn redis_target(p: &mut Parsed, tls: Option<Option<Vec<u8>>>) -> RedisTarget {
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
