//! HTTP: `/metrics`, `/healthz` and `/readyz` on `P33_METRICS_ADDR:P33_METRICS_PORT`.
//!
//! [`bind`] happens first at start (a busy port is fatal, exit 1), and logs
//! the address it got, so tests can use port 0. The server stops accepting
//! when shutdown is asked for.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::observe::metrics::Metrics;
use crate::redis::store;

/// Binds the listener; the error names the address.
pub(crate) async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let l = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind the metrics port {addr}: {e}"))?;
    info!("metrics listening on http://{}", l.local_addr()?);
    Ok(l)
}

fn reply(status: StatusCode, ctype: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = ctype.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// Answers one request.
pub(crate) fn handle(metrics: &Metrics, method: &Method, path: &str) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    let known = matches!(path, "/metrics" | "/healthz" | "/readyz");
    if !known {
        return reply(StatusCode::NOT_FOUND, TEXT, "not found\n".into());
    }
    if method != Method::GET && method != Method::HEAD {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "method not allowed\n".into(),
        );
        if let Ok(v) = "GET, HEAD".parse() {
            r.headers_mut().insert(hyper::header::ALLOW, v);
        }
        return r;
    }
    match path {
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(store::now_epoch()),
        ),
        "/healthz" => reply(StatusCode::OK, TEXT, "ok\n".into()),
        _ => match metrics.not_ready() {
            None => reply(StatusCode::OK, TEXT, "ready\n".into()),
            Some(why) => reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, format!("{why}\n")),
        },
    }
}

/// The most connections served at once; more wait in the kernel backlog,
/// so a flood of the metrics port cannot take the file descriptors the plan
/// path needs (SPEC §11).
pub(crate) const MAX_CONNECTIONS: usize = 512;
/// Request headers (and the first bytes of an idle keep-alive connection's
/// next request) must arrive within this, or the connection is closed.
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest pause after a failed `accept` (EMFILE, ENFILE, …): the loop
/// backs off instead of spinning at 100 % CPU.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Serves until `cancel` fires.
pub(crate) async fn serve(listener: TcpListener, metrics: Arc<Metrics>, cancel: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut accept_backoff = Duration::from_millis(10);
    let mut accept_errors = 0u64;
    loop {
        // A slot first: at the cap, nothing is accepted (no descriptor used).
        let slot = tokio::select! {
            _ = cancel.cancelled() => return,
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => return,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => {
                    accept_backoff = Duration::from_millis(10);
                    x
                }
                Err(e) => {
                    accept_errors += 1;
                    if accept_errors <= 5 || accept_errors.is_multiple_of(100) {
                        warn!("metrics: accept failed ({accept_errors} so far): {e}; backing off {accept_backoff:?}");
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(accept_backoff) => {}
                    }
                    accept_backoff = (accept_backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let r = handle(&metrics, req.method(), req.uri().path());
                async move { Ok::<_, Infallible>(r) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r { debug!("metrics connection from {peer}: {e}") },
                _ = cancel.cancelled() => conn.as_mut().graceful_shutdown(),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_methods() {
        let m = Metrics::new();
        assert_eq!(
            handle(&m, &Method::GET, "/healthz").status(),
            StatusCode::OK
        );
        assert_eq!(
            handle(&m, &Method::GET, "/readyz").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            handle(&m, &Method::GET, "/metrics").status(),
            StatusCode::OK
        );
        assert_eq!(
            handle(&m, &Method::GET, "/nope").status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            handle(&m, &Method::POST, "/metrics").status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        let why = |m: &Metrics| {
            let r = handle(m, &Method::GET, "/readyz");
            (r.status(), m.not_ready())
        };
        let unavailable = StatusCode::SERVICE_UNAVAILABLE;
        assert_eq!(why(&m), (unavailable, Some("redis down")));
        m.set_redis_up(true);
        assert_eq!(why(&m), (unavailable, Some("group missing")));
        m.set_group_ok(true);
        m.set_allowlist("none", 0, None);
        assert_eq!(why(&m), (unavailable, Some("fail-closed: no allowlist")));
        m.set_allowlist("env", 1, None);
        assert_eq!(why(&m), (unavailable, Some("trading state unknown")));
        m.trading_state_armed.set(1);
        assert_eq!(why(&m), (StatusCode::OK, None));
    }
}
