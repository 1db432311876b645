//! Reading the trading state (SPEC §12, §17): the global state and the
//! per-symbol overrides, with plain commands the way the write script reads
//! them, so that no reader needs a script of its own. `control` re-exports
//! it.

use crate::domain::TradingState;
use crate::redis::keys;
use crate::redis::store::Conn;

/// The trading state as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct States {
    /// The global state in force (the default when its key is missing).
    pub global: TradingState,
    /// Whether the global key exists (else the default applies).
    pub global_set: bool,
    /// Per-symbol overrides, sorted by symbol.
    pub overrides: Vec<(String, TradingState)>,
}

/// Keys read per `MULTI` of [`read_keys`] (a SCAN page).
const STATES_PAGE: usize = 1000;

/// Reads `keys` the way the write script reads them (`state_of`, mirrored
/// by [`TradingState::from_stored_bytes`]) with plain commands: no reader
/// needs a script, so the read-only ACL user has none (SPEC §17). Each key
/// is read with `TYPE` and `GETRANGE 0 16` in one `MULTI` (at most 17 bytes
/// are sent: more than 16 is HALTED), so a key deleted by a concurrent
/// change is simply missing. `None` for a missing key; a key of another
/// type is HALTED.
///
/// The keys go in one `MULTI`; when one of them is of another type (its
/// `GETRANGE` fails the whole reply), those keys are found with `TYPE` and
/// left out, twice at most, then every key is read on its own.
pub async fn read_keys(
    con: &mut Conn,
    keys: &[String],
) -> Result<Vec<Option<TradingState>>, redis::RedisError> {
    let mut out: Vec<Option<Option<TradingState>>> = vec![None; keys.len()];
    for _ in 0..3 {
        let todo: Vec<usize> = (0..keys.len()).filter(|&i| out[i].is_none()).collect();
        if todo.is_empty() {
            break;
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for &i in &todo {
            read_state_cmds(&mut pipe, &keys[i]);
        }
        match pipe.query_async::<Vec<redis::Value>>(con).await {
            Ok(v) if v.len() == todo.len() * 2 => {
                for (&i, pair) in todo.iter().zip(v.chunks(2)) {
                    out[i] = Some(stored_state(&pair[0], &pair[1]));
                }
            }
            Ok(_) => {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::TypeError,
                    "trading-state read: a reply of the wrong length",
                )))
            }
            Err(e) if e.code() == Some("WRONGTYPE") => {
                let mut types = redis::pipe();
                for &i in &todo {
                    types.cmd("TYPE").arg(&keys[i]);
                }
                let t: Vec<redis::Value> = types.query_async(con).await?;
                for (&i, kind) in todo.iter().zip(&t) {
                    if !matches!(
                        crate::redis::stream::text(kind).as_deref(),
                        Some("string" | "none")
                    ) {
                        out[i] = Some(Some(TradingState::Halted));
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
    // Keys retyped while they were read: one MULTI each.
    for i in 0..keys.len() {
        if out[i].is_some() {
            continue;
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        read_state_cmds(&mut pipe, &keys[i]);
        out[i] = Some(match pipe.query_async::<Vec<redis::Value>>(con).await {
            Ok(v) if v.len() == 2 => stored_state(&v[0], &v[1]),
            Err(e) if e.code() == Some("WRONGTYPE") => Some(TradingState::Halted),
            Ok(_) => Some(TradingState::Halted),
            Err(e) => return Err(e),
        });
    }
    Ok(out.into_iter().map(Option::flatten).collect())
}

/// A key's `TYPE` and `GETRANGE 0 16` (at most 17 bytes: more than 16 is
/// HALTED), added to `pipe`.
fn read_state_cmds(pipe: &mut redis::Pipeline, key: &str) {
    pipe.cmd("TYPE")
        .arg(key)
        .cmd("GETRANGE")
        .arg(key)
        .arg(0)
        .arg(16);
}

/// One key's `TYPE` and `GETRANGE 0 16` replies as a state (`None`:
/// missing).
fn stored_state(kind: &redis::Value, value: &redis::Value) -> Option<TradingState> {
    use redis::Value as V;
    match (crate::redis::stream::text(kind).as_deref(), value) {
        (Some("none"), _) => None,
        (Some("string"), V::BulkString(b)) => Some(TradingState::from_stored_bytes(b)),
        (Some("string"), V::SimpleString(s)) => Some(TradingState::from_stored(s)),
        // Another type, or a reply that is no value: fail closed.
        _ => Some(TradingState::Halted),
    }
}

/// The global state's key as read (`None`: missing).
pub async fn read_global(con: &mut Conn) -> Result<Option<TradingState>, redis::RedisError> {
    Ok(read_keys(con, &[keys::TRADING_STATE.to_string()])
        .await?
        .pop()
        .flatten())
}

/// Every override, sorted by symbol: each SCAN page of override keys is
/// read in one `MULTI` (50,000 overrides cost about 100 round trips, not
/// 100,000), at most 100,000 overrides.
pub async fn read_overrides(
    con: &mut Conn,
) -> Result<Vec<(String, TradingState)>, redis::RedisError> {
    let prefix = keys::trading_state("");
    let mut overrides = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(keys::trading_state_pattern())
            .arg("COUNT")
            .arg(STATES_PAGE)
            .query_async(con)
            .await?;
        // SCAN may return a key twice; a key that is no symbol's (a name
        // that is not UTF-8 included) is ignored, never an error.
        let page: Vec<String> = batch
            .into_iter()
            .filter_map(|k| String::from_utf8(k).ok())
            .filter(|k| k.strip_prefix(&prefix).is_some_and(keys::valid_symbol))
            .filter(|k| seen.insert(k.clone()))
            .collect();
        for (k, st) in page.iter().zip(read_keys(con, &page).await?) {
            if let (Some(sym), Some(st)) = (k.strip_prefix(&prefix), st) {
                overrides.push((sym.to_string(), st));
            }
        }
        if next == 0 || seen.len() > 100_000 {
            break;
        }
        cursor = next;
    }
    overrides.sort();
    Ok(overrides)
}

/// Reads the global state and every override.
pub async fn read_states(
    con: &mut Conn,
    default: TradingState,
) -> Result<States, redis::RedisError> {
    let global = read_global(con).await?;
    let overrides = read_overrides(con).await?;
    Ok(States {
        global: global.unwrap_or(default),
        global_set: global.is_some(),
        overrides,
    })
}
