//! A bounded RESP2 client for servers whose replies are not ours to trust:
//! the sentinels (SPEC §11, §15). redis-rs reads a reply whole, whatever its
//! size: one listed sentinel answering `SENTINEL MASTER` with a 400 MB bulk
//! string aborted the daemon under a 1 GiB memory cap at every start. Here a
//! reply is parsed from a buffer that never grows past [`MAX_REPLY`]; a
//! bigger one, a length beyond it, or nesting deeper than [`MAX_DEPTH`] is
//! an error (the caller counts the sentinel as one that did not answer),
//! never an allocation the peer chose.

use std::time::Duration;

use redis::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The largest reply read (SPEC §11: 64 KiB).
pub(crate) const MAX_REPLY: usize = 64 * 1024;
/// The deepest nesting of arrays accepted (a `SENTINEL MASTER` reply is 1).
pub(crate) const MAX_DEPTH: usize = 4;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RespError {
    /// The reply (or a length it announced) is larger than [`MAX_REPLY`].
    #[error("reply larger than {MAX_REPLY} bytes")]
    TooBig,
    /// Not RESP.
    #[error("malformed reply: {0}")]
    Malformed(&'static str),
    /// The connection failed, closed, or timed out.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// No answer within the time allowed.
    #[error("timed out")]
    TimedOut,
}

/// One parsed reply.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Reply {
    /// `+OK`.
    Simple(String),
    /// `-ERR …`.
    Error(String),
    /// `:1`.
    Int(i64),
    /// `$…` (`None`: nil).
    Bulk(Option<Vec<u8>>),
    /// `*…` (`None`: nil).
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// As a redis-rs value (for the parsers that take one); an error reply
    /// is `Err` with its text.
    pub(crate) fn into_result(self) -> Result<Value, String> {
        Ok(match self {
            Reply::Error(e) => return Err(e),
            Reply::Simple(s) => Value::SimpleString(s),
            Reply::Int(i) => Value::Int(i),
            Reply::Bulk(None) | Reply::Array(None) => Value::Nil,
            Reply::Bulk(Some(b)) => Value::BulkString(b),
            Reply::Array(Some(items)) => Value::Array(
                items
                    .into_iter()
                    .map(|r| match r {
                        Reply::Error(e) => Value::SimpleString(e),
                        other => other.into_result().unwrap_or(Value::Nil),
                    })
                    .collect(),
            ),
        })
    }
}

/// One line (`\r\n`-terminated) at `buf[at..]`: its text and where the
/// next element starts, or `None` when it has not all arrived.
fn line(buf: &[u8], at: usize) -> Result<Option<(&[u8], usize)>, RespError> {
    let rest = buf.get(at..).unwrap_or_default();
    match rest.windows(2).position(|w| w == b"\r\n") {
        Some(i) => Ok(Some((&rest[..i], at + i + 2))),
        None if rest.len() >= MAX_REPLY => Err(RespError::TooBig),
        None => Ok(None),
    }
}

fn number(b: &[u8]) -> Result<i64, RespError> {
    std::str::from_utf8(b)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(RespError::Malformed(
            "a length or integer that is not a number",
        ))
}

/// A length field: -1 (nil) or 0..=[`MAX_REPLY`].
fn length(b: &[u8]) -> Result<Option<usize>, RespError> {
    match number(b)? {
        -1 => Ok(None),
        n if n < -1 => Err(RespError::Malformed("a negative length")),
        n => usize::try_from(n)
            .ok()
            .filter(|n| *n <= MAX_REPLY)
            .map(Some)
            .ok_or(RespError::TooBig),
    }
}

/// Parses one reply at `buf[at..]`: the reply and where it ends, or `None`
/// when more bytes are needed.
pub(crate) fn parse(
    buf: &[u8],
    at: usize,
    depth: usize,
) -> Result<Option<(Reply, usize)>, RespError> {
    let Some((head, next)) = line(buf, at)? else {
        return Ok(None);
    };
    let Some((&kind, body)) = head.split_first() else {
        return Err(RespError::Malformed("an empty line"));
    };
    let text = || String::from_utf8_lossy(body).into_owned();
    Ok(Some(match kind {
        b'+' => (Reply::Simple(text()), next),
        b'-' => (Reply::Error(text()), next),
        b':' => (Reply::Int(number(body)?), next),
        b'$' => match length(body)? {
            None => (Reply::Bulk(None), next),
            Some(n) => {
                let end = next.checked_add(n).ok_or(RespError::TooBig)?;
                if buf.len() < end.saturating_add(2) {
                    return Ok(None);
                }
                if &buf[end..end + 2] != b"\r\n" {
                    return Err(RespError::Malformed("a bulk string without its CRLF"));
                }
                (Reply::Bulk(Some(buf[next..end].to_vec())), end + 2)
            }
        },
        b'*' => match length(body)? {
            None => (Reply::Array(None), next),
            Some(n) => {
                if depth >= MAX_DEPTH {
                    return Err(RespError::Malformed("arrays nested too deep"));
                }
                // Every element takes at least 3 bytes: a count beyond what
                // the budget can hold is refused before any allocation.
                if n > MAX_REPLY / 3 {
                    return Err(RespError::TooBig);
                }
                let mut items = Vec::with_capacity(n.min(64));
                let mut pos = next;
                for _ in 0..n {
                    match parse(buf, pos, depth + 1)? {
                        Some((r, p)) => {
                            items.push(r);
                            pos = p;
                        }
                        None => return Ok(None),
                    }
                }
                (Reply::Array(Some(items)), pos)
            }
        },
        _ => return Err(RespError::Malformed("an unknown type byte")),
    }))
}

/// A command as RESP.
fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A byte stream: plain TCP or TLS over it.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// A connection that reads each reply into at most [`MAX_REPLY`] bytes.
pub(crate) struct Conn {
    stream: Box<dyn Io>,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("resp::Conn")
    }
}

/// The TLS client settings for CA certificates `ca_pem` (PEM), or the
/// webpki roots.
pub(crate) fn tls_config(
    ca_pem: Option<&[u8]>,
) -> Result<std::sync::Arc<rustls::ClientConfig>, String> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            for c in rustls_pki_types::CertificateDer::pem_slice_iter(pem) {
                let c = c.map_err(|e| format!("CA file: {e}"))?;
                roots.add(c).map_err(|e| format!("CA certificate: {e}"))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(std::sync::Arc::new(cfg))
}

impl Conn {
    /// Connects within `timeout`; over TLS with `tls` (the server's
    /// certificate checked against its roots and `host`).
    pub(crate) async fn connect(
        host: &str,
        port: u16,
        timeout: Duration,
        tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    ) -> Result<Conn, RespError> {
        tokio::time::timeout(timeout, async {
            let tcp = TcpStream::connect((host, port)).await?;
            tcp.set_nodelay(true)?;
            let stream: Box<dyn Io> = match tls {
                None => Box::new(tcp),
                Some(cfg) => {
                    let name = rustls_pki_types::ServerName::try_from(host.to_string())
                        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                    Box::new(
                        tokio_rustls::TlsConnector::from(cfg)
                            .connect(name, tcp)
                            .await?,
                    )
                }
            };
            Ok::<_, std::io::Error>(Conn {
                stream,
                buf: Vec::new(),
            })
        })
        .await
        .map_err(|_| RespError::TimedOut)?
        .map_err(RespError::Io)
    }

    /// Sends a command (no reply read).
    pub(crate) async fn send(&mut self, args: &[&[u8]]) -> Result<(), RespError> {
        self.stream.write_all(&encode(args)).await?;
        Ok(())
    }

    /// Reads the next reply (bytes after it are kept for the next one).
    pub(crate) async fn read(&mut self) -> Result<Reply, RespError> {
        let mut chunk = [0u8; 8192];
        loop {
            if let Some((r, used)) = parse(&self.buf, 0, 0)? {
                self.buf.drain(..used);
                return Ok(r);
            }
            if self.buf.len() >= MAX_REPLY {
                return Err(RespError::TooBig);
            }
            let want = chunk.len().min(MAX_REPLY - self.buf.len());
            let n = self.stream.read(&mut chunk[..want]).await?;
            if n == 0 {
                return Err(RespError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Sends a command and reads its reply, within `timeout`.
    pub(crate) async fn call(
        &mut self,
        args: &[&[u8]],
        timeout: Duration,
    ) -> Result<Reply, RespError> {
        tokio::time::timeout(timeout, async {
            self.send(args).await?;
            self.read().await
        })
        .await
        .map_err(|_| RespError::TimedOut)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(b: &[u8]) -> Result<Option<Reply>, RespError> {
        parse(b, 0, 0).map(|o| o.map(|(r, _)| r))
    }

    #[test]
    fn parses_replies_and_waits_for_the_rest() {
        let bulk = |s: &str| Reply::Bulk(Some(s.as_bytes().to_vec()));
        for (raw, want) in [
            (&b"+OK\r\n"[..], Some(Reply::Simple("OK".into()))),
            (b"-ERR no\r\n", Some(Reply::Error("ERR no".into()))),
            (b":42\r\n", Some(Reply::Int(42))),
            (b"$-1\r\n", Some(Reply::Bulk(None))),
            (b"$2\r\nip\r\n", Some(bulk("ip"))),
            (
                b"*2\r\n$2\r\nip\r\n:1\r\n",
                Some(Reply::Array(Some(vec![bulk("ip"), Reply::Int(1)]))),
            ),
            (b"*2\r\n$2\r\nip\r\n", None),
            (b"$5\r\nab", None),
            (b"+O", None),
        ] {
            assert_eq!(one(raw).unwrap(), want, "{raw:?}");
        }
    }

    #[test]
    fn refuses_what_is_too_big_deep_or_not_resp() {
        for (raw, what) in [
            (&b"$400000000\r\n"[..], "too big"),
            (b"*100000000\r\n", "too big"),
            (b"$9223372036854775807\r\n", "too big"),
            (b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n", "malformed"),
            (b"$-5\r\n", "malformed"),
            (b"$x\r\n", "malformed"),
            (b"?\r\n", "malformed"),
            (b"$2\r\nabcd\r\n", "malformed"),
        ] {
            let e = one(raw).unwrap_err().to_string();
            let ok = match what {
                "too big" => e.contains("larger"),
                _ => e.contains("malformed"),
            };
            assert!(ok, "{raw:?}: {e}");
        }
        let endless = vec![b'+'; MAX_REPLY + 1];
        assert!(matches!(one(&endless), Err(RespError::TooBig)));
    }

    #[test]
    fn encodes_commands() {
        assert_eq!(
            encode(&[b"SENTINEL", b"MASTER", b"m"]),
            b"*3\r\n$8\r\nSENTINEL\r\n$6\r\nMASTER\r\n$1\r\nm\r\n".to_vec()
        );
    }
}
