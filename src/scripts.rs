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

/// The functions several scripts share (`common.lua`: how a trading state
/// is read, whether a stream can take an entry), put in front of them.
const COMMON: &str = include_str!("scripts/common.lua");

/// A batch's permits and ACKs, with the hold and the no-overwrite guard
/// (`permits`).
pub(crate) static WRITE_PERMITS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{COMMON}{}",
        include_str!("scripts/write_permits.lua")
    ))
});

/// The trading states of the global key and a page of override keys,
/// atomically (`control`).
pub(crate) static READ_STATES: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{COMMON}{}",
        include_str!("scripts/read_states.lua")
    ))
});

/// A halt's revocation of the allows not yet used (`control`).
pub(crate) static REVOKE: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{COMMON}{}", include_str!("scripts/revoke.lua"))));

/// One trading-state change and its control entry: both or neither
/// (`control`, for `ctl`).
pub(crate) static CHANGE_STATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{COMMON}{}",
        include_str!("scripts/change_state.lua")
    ))
});

/// One result entry's ledger metadata and ACK (`ledger`).
pub(crate) static APPLY_LEDGER: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/apply_ledger.lua")));
