//! P3.3 Position State Brain: the fail-closed pre-trade permit gate.
//!
//! # Layout
//!
//! One folder per stage of the data flow, each a layer that imports only
//! the layers below it (`tests/it/layout.rs` checks it, folder by folder and
//! module by module inside a folder), from the top:
//!
//! - [`app`]: the process — start order, supervision, signals, systemd
//!   (`lifecycle`, SPEC §10) and `/metrics`, `/healthz`, `/readyz` (SPEC §9).
//! - [`exchange`]: Binance positions, polled and live from the user data
//!   stream, into the snapshots; the positions stream and exchange-side
//!   closes; step sizes (SPEC §5, §7, §16, §19). Above the operator: a
//!   liquidation tightens its symbol through the control path.
//! - [`operator`]: the kill switch and its tools — the trading state read,
//!   changed and followed (`control`), the guardian of what Redis lost,
//!   `ctl`, `explain`, `replay`, the instance report, the ACL users
//!   (SPEC §12–§14, §17).
//! - [`gate`]: plans to permits — the consumer and its intake, the pure
//!   `rules`, the `permits` write + ACK, the decision `record`, the `ledger`
//!   follower, the step table, the trading state as the gate knows it
//!   (SPEC §4–§6, §8, §13).
//! - [`allowlist`]: which symbols get permits — universe → last_ok → env →
//!   none (SPEC §3); a pure resolver, the Redis read, the refresher.
//! - [`observe`]: metrics, logging, the watchdog (SPEC §9–§11).
//! - [`config`]: the environment, parsed once, secrets redacted (SPEC §2).
//! - [`redis`]: the key map, connections that survive outages and follow a
//!   Sentinel failover, the one consumer-group reader, the Lua scripts
//!   (SPEC §1, §4, §15, §17).
//! - [`domain`] and `text`: bounded numbers and sides; cutting, escaping
//!   and redacting text.

pub mod allowlist;
pub mod app;
pub mod config;
pub mod domain;
pub mod exchange;
pub mod gate;
pub mod observe;
pub mod operator;
pub mod redis;
mod text;
