//! The server-side Lua scripts, one file each under `src/redis/scripts/` with its
//! KEYS/ARGV protocol at its top, each [`redis::Script`] built once (its
//! SHA1 computed once; `EVALSHA`, falling back to `EVAL` after a Redis
//! restart, is redis-rs's job).
//!
//! The scripts that only read ([`ReadOnly`]) run with `EVALSHA_RO` (Redis ≥
//! 7.0, SPEC §17): `EVALSHA` counts every declared key as written, so an
//! ACL user that may only read the universe or the snapshots would be
//! refused it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::LazyLock;

use redis::{FromRedisValue, Script, ToRedisArgs};

/// A script that only reads: `EVALSHA_RO`, `SCRIPT LOAD` once after a
/// `NOSCRIPT`, and on a Redis older than 7.0 (no `EVALSHA_RO`) `EVALSHA`,
/// said once.
pub(crate) struct ReadOnly {
    code: &'static str,
    script: Script,
}

/// Set once `EVALSHA_RO` was found missing (Redis < 7.0).
static NO_EVALSHA_RO: AtomicBool = AtomicBool::new(false);

impl ReadOnly {
    fn new(code: &'static str) -> ReadOnly {
        ReadOnly {
            code,
            script: Script::new(code),
        }
    }

    /// Runs the script on `keys` (no ARGV).
    pub(crate) async fn invoke<T, K, C>(&self, con: &mut C, keys: &[K]) -> redis::RedisResult<T>
    where
        T: FromRedisValue,
        K: ToRedisArgs,
        C: redis::aio::ConnectionLike,
    {
        if NO_EVALSHA_RO.load(Ordering::Relaxed) {
            let mut inv = self.script.prepare_invoke();
            for k in keys {
                inv.key(k);
            }
            return inv.invoke_async(con).await;
        }
        let call = || {
            let mut c = redis::cmd("EVALSHA_RO");
            c.arg(self.script.get_hash()).arg(keys.len()).arg(keys);
            c
        };
        match call().query_async(con).await {
            Err(e) if e.kind() == redis::ErrorKind::NoScriptError => {
                redis::cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(self.code)
                    .query_async::<String>(con)
                    .await?;
                call().query_async(con).await
            }
            Err(e)
                if e.to_string()
                    .to_ascii_lowercase()
                    .contains("unknown command")
                    && e.to_string().to_ascii_uppercase().contains("EVALSHA_RO") =>
            {
                if !NO_EVALSHA_RO.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "redis: no EVALSHA_RO (Redis older than 7.0): read-only scripts run with EVALSHA, which an ACL user with read-only keys is refused (SPEC §17)"
                    );
                }
                let mut inv = self.script.prepare_invoke();
                for k in keys {
                    inv.key(k);
                }
                inv.invoke_async(con).await
            }
            other => other,
        }
    }
}

/// The universe keys in one round trip (`allowlist`).
pub(crate) static READ_UNIVERSE: LazyLock<ReadOnly> =
    LazyLock::new(|| ReadOnly::new(include_str!("scripts/read_universe.lua")));

/// Snapshot, ledger and cooldown of a batch's symbols (`consumer`).
pub(crate) static READ_STATE: LazyLock<ReadOnly> =
    LazyLock::new(|| ReadOnly::new(include_str!("scripts/read_state.lua")));

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

/// The function library the daemon installs (`library.lua` around
/// [`CHANGE_STATE`]'s code): what `ctl`'s user runs with `FCALL` instead of
/// code of its own (SPEC §17).
pub(crate) struct Library {
    /// `p33_<16 hex of the code's SHA1>`.
    pub(crate) name: String,
    /// `p33_change_state_<the same 16 hex>`.
    pub(crate) function: String,
    /// The `FUNCTION LOAD` source.
    code: String,
}

/// The one library of this version.
pub(crate) static LIBRARY: LazyLock<Library> = LazyLock::new(|| {
    let body = format!("{COMMON}{}", include_str!("scripts/change_state.lua"));
    let hash = Script::new(&body).get_hash().to_string();
    let tag = hash.get(..16).unwrap_or(&hash);
    let name = format!("p33_{tag}");
    let function = format!("p33_change_state_{tag}");
    let code = include_str!("scripts/library.lua")
        .replace("__LIBRARY__", &name)
        .replace("__FUNCTION__", &function)
        .replace("__BODY__", &body);
    Library {
        name,
        function,
        code,
    }
});

impl Library {
    /// Installs the library unless Redis has it (`FUNCTION LIST`, then
    /// `FUNCTION LOAD REPLACE`): `true` when it was loaded now.
    pub(crate) async fn install<C>(&self, con: &mut C) -> redis::RedisResult<bool>
    where
        C: redis::aio::ConnectionLike,
    {
        let present: Vec<redis::Value> = redis::cmd("FUNCTION")
            .arg("LIST")
            .arg("LIBRARYNAME")
            .arg(&self.name)
            .query_async(con)
            .await?;
        if !present.is_empty() {
            return Ok(false);
        }
        let _: String = redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg("REPLACE")
            .arg(&self.code)
            .query_async(con)
            .await?;
        Ok(true)
    }
}

/// One result entry's ledger metadata and ACK (`ledger`).
pub(crate) static APPLY_LEDGER: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/apply_ledger.lua")));
