//! Redis connections that survive outages, and the wall clock.
//!
//! Every task gets its own [`redis::aio::ConnectionManager`] (the plan consumer
//! blocks in `XREADGROUP`, which would hold up any other command multiplexed
//! on the same connection). [`connect`] retries with capped exponential
//! backoff until Redis answers or shutdown is asked for: the daemon never
//! exits because Redis is away. Once connected, the manager reconnects by
//! itself; the failing call returns an error that callers treat as transient.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::RedisTarget;

/// Wall-clock epoch seconds (fractional). The daemon's one clock.
#[allow(clippy::disallowed_methods)]
pub fn now_epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Wall-clock epoch milliseconds.
#[allow(clippy::disallowed_methods)]
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Capped exponential backoff: 100 ms doubling to 5 s.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: Duration::from_millis(100),
        }
    }
}

impl Backoff {
    /// The cap on one wait.
    pub const MAX: Duration = Duration::from_secs(5);

    /// The next wait, doubling up to [`Backoff::MAX`].
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        d
    }

    /// Back to the shortest wait, after a success.
    pub fn reset(&mut self) {
        *self = Backoff::default();
    }

    /// Sleeps for the next delay; false when shutdown came first.
    pub async fn wait(&mut self, cancel: &CancellationToken) -> bool {
        let d = self.next_delay();
        tokio::select! {
            _ = cancel.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }
}

/// Connects to Redis, retrying with capped backoff until it answers.
/// `None` when shutdown was asked for first. `response_timeout` must exceed
/// the longest `BLOCK` the connection's user issues.
pub async fn connect(
    target: &RedisTarget,
    who: &str,
    response_timeout: Duration,
    cancel: &CancellationToken,
) -> Option<ConnectionManager> {
    let mut backoff = Backoff::default();
    let mut attempts = 0u64;
    loop {
        attempts += 1;
        let attempt = tokio::select! {
            _ = cancel.cancelled() => return None,
            r = try_connect(target, response_timeout) => r,
        };
        match attempt {
            Ok(c) => {
                if attempts > 1 {
                    info!(
                        "redis: {who} connected to {} after {attempts} attempts",
                        target.display()
                    );
                }
                return Some(c);
            }
            Err(e) => {
                // One line per attempt up to 5, then one every 20, so an
                // outage of hours does not flood the journal.
                if attempts <= 5 || attempts.is_multiple_of(20) {
                    warn!(
                        "redis: {who} cannot connect to {} (attempt {attempts}): {e}; retrying",
                        target.display()
                    );
                }
                if !backoff.wait(cancel).await {
                    return None;
                }
            }
        }
    }
}

/// One attempt (5 s at most), for a command-line tool that must say at once
/// that Redis cannot be reached.
pub async fn connect_once(
    target: &RedisTarget,
    response_timeout: Duration,
) -> Result<ConnectionManager, redis::RedisError> {
    try_connect(target, response_timeout).await
}

async fn try_connect(
    target: &RedisTarget,
    response_timeout: Duration,
) -> Result<ConnectionManager, redis::RedisError> {
    let client = redis::Client::open(target.info.clone())?;
    let cfg = ConnectionManagerConfig::new()
        .set_connection_timeout(Duration::from_secs(3))
        .set_response_timeout(response_timeout)
        .set_number_of_retries(2)
        .set_max_delay(1000);
    let fut = ConnectionManager::new_with_config(client, cfg);
    match tokio::time::timeout(Duration::from_secs(5), fut).await {
        Ok(r) => r,
        Err(_) => Err(redis::RedisError::from((
            redis::ErrorKind::IoError,
            "connect timed out",
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::default();
        let seq: Vec<u128> = (0..8).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(seq, vec![100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }
}
