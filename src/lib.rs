//! P3.3 Position State Brain: the fail-closed pre-trade permit gate.
//!
//! # Layout
//!
//! The data flow, one module per stage:
//!
//! - [`config`]: the environment (SPEC §2), parsed once, secrets redacted.
//! - [`allowlist`]: which symbols get permits: universe → last_ok → env →
//!   none (SPEC §3); a pure resolver plus the Redis read and the refresher.
//! - [`consumer`]: plans from `quantum:stream:apply.plan` (SPEC §4), a batch
//!   at a time, a constant number of Redis round trips per batch.
//! - [`rules`]: the pure evaluation of one plan (SPEC §5), on typed inputs
//!   parsed from the raw Redis values.
//! - [`permits`]: permit JSON and the one atomic write + ACK (SPEC §6).
//!
//! Feeding the rules: [`exchange`] (positionRisk snapshots, step sizes,
//! SPEC §7) and [`ledger`] (order metadata from `quantum:stream:apply.result`,
//! SPEC §8). Around it all: [`metrics`] and `http` (SPEC §9), [`store`]
//! (Redis connections that survive outages and follow a Sentinel failover,
//! with [`sentinel`] discovery, SPEC §15), [`telemetry`] (logging) and
//! [`lifecycle`] (start order, supervision, signals, systemd; SPEC §10).
//!
//! The operator's side: [`control`] and [`ctl`] (the trading state, SPEC
//! §12–§13), [`known`] and [`guardian`] (the state kept through Redis's own failures), [`record`], [`explain`] and [`replay`] (the decision record,
//! SPEC §14).
//!
//! Shared underneath: [`stream`] (the one consumer-group reader the plan
//! consumer, the ledger follower and the control follower are handlers of), [`keys`] (every
//! stream, group and key name), `scripts` (the Lua files), [`domain`]
//! (bounded numbers, sides), [`steps`] (the step-size table), [`watchdog`]
//! and `text`. Imports run only downward — lifecycle → workers → core →
//! vocabulary — which `tests/layout.rs` checks.

pub mod acl;
pub mod allowlist;
pub mod config;
pub mod consumer;
pub mod control;
pub mod ctl;
pub mod domain;
pub mod exchange;
pub mod explain;
pub mod guardian;
mod http;
pub mod instance;
pub mod keys;
pub mod known;
pub mod ledger;
pub mod lifecycle;
pub mod metrics;
pub mod permits;
pub mod record;
pub mod replay;
mod resp;
pub mod rules;
mod scripts;
pub mod sentinel;
pub mod steps;
pub mod store;
pub mod stream;
pub mod telemetry;
mod text;
pub mod watchdog;
