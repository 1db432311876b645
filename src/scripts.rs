//! The server-side Lua scripts, one file each under `src/scripts/` with its
//! KEYS/ARGV protocol at its top, each [`redis::Script`] built once (its
//! SHA1 computed once; `EVALSHA`, falling back to `EVAL` after a Redis
//! restart, is redis-rs's job).

use std::sync::LazyLock;

use redis::Script;

/// The universe keys in one round trip (`allowlist`).
pub(crate) static READ_UNIVERSE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/read_universe.lua")));

/// Snapshot, ledger and cooldown of a batch's symbols (`consumer`).
pub(crate) static READ_STATE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/read_state.lua")));

/// A batch's permits and ACKs, with the hold and the no-overwrite guard
/// (`permits`).
pub(crate) static WRITE_PERMITS: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/write_permits.lua")));

/// One result entry's ledger metadata and ACK (`ledger`).
pub(crate) static APPLY_LEDGER: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/apply_ledger.lua")));
