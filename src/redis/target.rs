//! Where Redis is (SPEC §2, §15, §17): one server, or the master a set of
//! sentinels names, with TLS and credentials. Parsed from the environment
//! by `config`; used by `store` and `sentinel`. `Debug` hides every
//! password.

use std::fmt;

use crate::text::Secret;

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
pub(crate) fn join_addresses(list: &[(String, u16)]) -> String {
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
