//! The integration tests: one binary (one link, one harness), a module per
//! area. Every test that runs the daemon starts its own `redis-server` on a
//! free loopback port (and, where the exchange matters, the project's fake
//! exchange) through `common::spawn_daemon`, and drives it through Redis.

mod common;

mod allowlist;
mod control;
mod exchange;
mod ha;
mod hostile;
mod layout;
mod limits;
mod ops;
mod plans;
mod props;
mod record;
mod security;
mod stream;
mod survive;
mod verdict;
