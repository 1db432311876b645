//! The operator's trading state (SPEC §12): reading it, changing it, and
//! following its changes.
//!
//! Keys: `quantum:p33:trading_state` (global) and
//! `quantum:p33:trading_state:<symbol>` (overrides); stream
//! `quantum:stream:p33.control` (one entry per change). The state takes
//! effect inside the permit write script (`src/scripts/write_permits.lua`),
//! not here: this module changes it (for `ctl`), reports it (metrics,
//! `ctl status`) and logs every change the daemon sees (the follower, one
//! group per instance so every instance logs every change).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::store::Conn;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::domain::TradingState;
use crate::keys::{self, CONTROL_STREAM};
use crate::metrics::Metrics;
use crate::store;
use crate::stream::{BatchHandler, Entry, GroupReader};
use crate::text::clip;

pub use crate::known::NO_OVERRIDE;

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
                        crate::stream::text(kind).as_deref(),
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
    match (crate::stream::text(kind).as_deref(), value) {
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

/// How long the override gauge waits before counting `n` overrides again:
/// 5 s, or one override per ms beyond 5,000 (50 s for 50,000), so that a
/// flood of override keys costs Redis about 1,000 keys a second, not
/// 10,000 (SPEC §11). The global state is read every turn regardless.
pub fn overrides_period(n: usize) -> Duration {
    Duration::from_millis(u64::try_from(n).unwrap_or(u64::MAX)).max(Duration::from_secs(5))
}

/// What an operator asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Set HALTED.
    Halt,
    /// Set REDUCING.
    Reduce,
    /// Back to ACTIVE (global) or no override (symbol: the key is deleted).
    Resume,
}

/// One control entry, as written to `quantum:stream:p33.control`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ControlEntry {
    /// The stream entry ID.
    pub id: String,
    /// `global` or `symbol`.
    pub scope: String,
    /// The symbol (empty for the global scope).
    pub symbol: String,
    /// The state before (`NONE`: no override).
    pub from: String,
    /// The state after (`NONE`: no override).
    pub to: String,
    /// Why, in the operator's words.
    pub reason: String,
    /// `user@host`, or `p33-auto` for the daemon's own latch.
    pub actor: String,
    /// Epoch seconds (whole).
    pub ts: String,
    /// `change`, or `revoked` for a revocation's confirmation (SPEC §12;
    /// empty: an older entry, a change unless it has a `ref`).
    pub kind: String,
    /// A confirmation's halt entry ID (`ref`).
    #[serde(rename = "ref")]
    pub reference: String,
    /// A confirmation's count of revoked allows.
    pub revoked: String,
}

impl ControlEntry {
    /// An entry as read: every field cut and escaped like any echoed value
    /// (SPEC §11), since anyone who can write the stream wrote it.
    fn from_fields(id: &str, f: &HashMap<String, String>) -> ControlEntry {
        let g = |k: &str| f.get(k).map(|v| clip(v).into_owned()).unwrap_or_default();
        ControlEntry {
            id: id.to_string(),
            scope: g("scope"),
            symbol: g("symbol"),
            from: g("from"),
            to: g("to"),
            reason: g("reason"),
            actor: g("actor"),
            ts: g("ts"),
            kind: g("kind"),
            reference: g("ref"),
            revoked: g("revoked"),
        }
    }

    /// Whether this is a revocation's confirmation, not a change.
    pub fn is_confirmation(&self) -> bool {
        self.kind == "revoked" || !self.reference.is_empty()
    }

    /// `global` or `symbol:BTCUSDT`, for log lines.
    pub fn scope_label(&self) -> String {
        if self.scope == "symbol" {
            format!("symbol:{}", clip(&self.symbol))
        } else {
            clip(&self.scope).into_owned()
        }
    }

    /// The SPEC §12 WARN line (every field cut and escaped).
    pub fn log_line(&self) -> String {
        format!(
            "P3.3 trading state {} {} -> {} (reason={}, actor={})",
            self.scope_label(),
            clip(&self.from),
            clip(&self.to),
            clip(&self.reason),
            clip(&self.actor)
        )
    }
}

/// The error code of the change script's refusal: the control stream
/// cannot take the entry, so nothing was changed.
pub const CONTROL_ERROR: &str = "P33CONTROL";

/// The error code of a change other than a halt asked of a Redis without
/// the daemon's function library (no gate connected since it lost its
/// data): nothing was changed.
pub const NO_LIBRARY_ERROR: &str = "P33NOLIBRARY";

/// How a change was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// `FCALL` of the daemon's function library (SPEC §17).
    Function,
    /// The library is missing (no gate connected since Redis lost its
    /// data): a halt written with plain commands (`WATCH`, `MULTI`).
    PlainHalt,
    /// Redis older than 7.0 (no functions): the change script itself.
    Script,
}

/// Applies an operator's change: the key and its control entry, both or
/// neither, after checking that the control stream can take the entry
/// (SPEC §12); a global change also ends the throttle latch. It runs as
/// the daemon's function (`FCALL`): `ctl`'s user runs no code of its own
/// (SPEC §17). Where Redis has no library, a halt is still written (plain
/// commands: a halt is the strictest state, so it needs no comparison) and
/// any other change is refused with [`NO_LIBRARY_ERROR`]. Returns the
/// entry written and how. `con` must be the caller's own connection (ctl's):
/// the plain halt's `WATCH` holds for the connection.
pub async fn apply_change(
    con: &mut Conn,
    change: Change,
    symbol: Option<&str>,
    reason: &str,
    actor: &str,
    default: TradingState,
) -> Result<(ControlEntry, Via), redis::RedisError> {
    let to = match (change, symbol) {
        (Change::Halt, _) => TradingState::Halted.as_str(),
        (Change::Reduce, _) => TradingState::Reducing.as_str(),
        (Change::Resume, None) => TradingState::Active.as_str(),
        (Change::Resume, Some(_)) => NO_OVERRIDE,
    };
    let c = ChangeCall::new(to, symbol, reason, actor, default, None);
    let lib = &crate::scripts::LIBRARY;
    let mut fcall = redis::cmd("FCALL");
    fcall
        .arg(&lib.function)
        .arg(3)
        .arg(&c.keys()[..])
        .arg(c.args());
    match fcall.query_async::<(String, String)>(con).await {
        Ok((id, from)) => Ok((c.entry(id, from), Via::Function)),
        Err(e) if is_missing_function(&e) => {
            if change == Change::Halt {
                Ok((plain_halt(con, &c).await?, Via::PlainHalt))
            } else {
                Err(redis::make_extension_error(
                    NO_LIBRARY_ERROR.into(),
                    Some(format!(
                        "this Redis has no function {} (no gate of this version has connected since it lost its data, or since the upgrade)",
                        lib.function
                    )),
                ))
            }
        }
        Err(e) if is_unknown_command(&e, "FCALL") => {
            let (id, from) = c.script().invoke_async(con).await?;
            Ok((c.entry(id, from), Via::Script))
        }
        Err(e) => Err(e),
    }
}

/// Whether `e` is `FCALL`'s reply for a function Redis does not have.
fn is_missing_function(e: &redis::RedisError) -> bool {
    e.to_string()
        .to_ascii_lowercase()
        .contains("function not found")
}

/// Whether `e` says Redis does not know `command` (older than 7.0).
fn is_unknown_command(e: &redis::RedisError, command: &str) -> bool {
    let s = e.to_string();
    s.to_ascii_lowercase().contains("unknown command") && s.to_ascii_uppercase().contains(command)
}

/// A halt with plain commands, for a Redis that has lost the daemon's
/// library (SPEC §17): `WATCH` the key and the stream, read them, then set
/// the key, write the entry and (global) end the latch in one `MULTI`;
/// again when a watched key changed meanwhile (at most 5 times). The same
/// checks as the script: a control stream that cannot take the entry is
/// [`CONTROL_ERROR`] with nothing changed.
async fn plain_halt(con: &mut Conn, c: &ChangeCall<'_>) -> Result<ControlEntry, redis::RedisError> {
    for _ in 0..5 {
        let _: () = redis::cmd("WATCH")
            .arg(&c.key)
            .arg(CONTROL_STREAM)
            .query_async(con)
            .await?;
        let from = read_keys(con, std::slice::from_ref(&c.key))
            .await?
            .pop()
            .flatten()
            .map_or(c.missing, TradingState::as_str);
        if let Some(why) = stream_problem(con).await? {
            let _: () = redis::cmd("UNWATCH").query_async(con).await?;
            return Err(redis::make_extension_error(
                CONTROL_ERROR.into(),
                Some(format!("{CONTROL_STREAM} {why}")),
            ));
        }
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("SET")
            .arg(&c.key)
            .arg(c.to)
            .ignore()
            .cmd("XADD")
            .arg(CONTROL_STREAM)
            .arg("*")
            .arg(&c.fields(from)[..]);
        if c.symbol.is_none() {
            pipe.cmd("DEL").arg(keys::LATCH).ignore();
        }
        let done: Option<(String,)> = pipe.query_async(con).await?;
        if let Some((id,)) = done {
            return Ok(c.entry(id, from.to_string()));
        }
    }
    Err(redis::make_extension_error(
        CONTROL_ERROR.into(),
        Some(format!(
            "{CONTROL_STREAM} kept changing while the halt was written (5 tries)"
        )),
    ))
}

/// Why the control stream cannot take an entry (`common.lua`'s
/// `stream_problem`, in plain commands): `None` when it can.
async fn stream_problem(con: &mut Conn) -> Result<Option<String>, redis::RedisError> {
    let t: String = redis::cmd("TYPE")
        .arg(CONTROL_STREAM)
        .query_async(con)
        .await?;
    match t.as_str() {
        "none" => Ok(None),
        "stream" => {
            let info: HashMap<String, redis::Value> = redis::cmd("XINFO")
                .arg("STREAM")
                .arg(CONTROL_STREAM)
                .query_async(con)
                .await?;
            let last = info
                .get("last-generated-id")
                .and_then(crate::stream::text)
                .unwrap_or_default();
            Ok((last == MAX_STREAM_ID).then(|| "is at its last possible ID".to_string()))
        }
        other => Ok(Some(format!("holds a {}", clip(other)))),
    }
}

/// The last ID a stream can hold (`common.lua`'s `MAX_ID`).
const MAX_STREAM_ID: &str = "18446744073709551615-18446744073709551615";

/// Restores a key that reads less strict than `to` (SPEC §12): the same
/// atomic change as `ctl` (the key and its control entry), made only while
/// the key still reads looser and no control entry came after `last_id`
/// (a change the restoring instance has not read is never undone). The
/// latch's record is left alone. `Ok(None)`: nothing to do any more.
pub async fn restore(
    con: &mut Conn,
    symbol: Option<&str>,
    to: TradingState,
    reason: &str,
    actor: &str,
    default: TradingState,
    last_id: &str,
) -> Result<Option<ControlEntry>, redis::RedisError> {
    let e = run_change(
        con,
        to.as_str(),
        symbol,
        reason,
        actor,
        default,
        Some(last_id),
    )
    .await?;
    Ok((!e.id.is_empty()).then_some(e))
}

/// The actor of the daemon's own changes (the throttle latch, a
/// liquidation's symbol state).
pub const AUTO_ACTOR: &str = "p33-auto";

/// Sets a symbol's state to `to` when it reads looser (never loosens it),
/// with its control entry (SPEC §19: a liquidation's automatic change,
/// `actor=p33-auto`): the change script's conditional mode, with no entry
/// it could have missed. `Ok(None)`: the state was already as strict.
pub async fn tighten_symbol(
    con: &mut Conn,
    symbol: &str,
    to: TradingState,
    reason: &str,
    actor: &str,
    default: TradingState,
) -> Result<Option<ControlEntry>, redis::RedisError> {
    // The last ID but one: XRANGE from just after it can hold no entry (a
    // stream is never at its last ID, see the script), so only the
    // "looser than" condition decides.
    const NO_NEWER: &str = "18446744073709551615-18446744073709551614";
    let e = run_change(
        con,
        to.as_str(),
        Some(symbol),
        reason,
        actor,
        default,
        Some(NO_NEWER),
    )
    .await?;
    Ok((!e.id.is_empty()).then_some(e))
}

/// One call of the change script (`change_state.lua`); a restore when
/// `last_id` is given (its entry ID is empty when it had nothing to do).
async fn run_change(
    con: &mut Conn,
    to: &str,
    symbol: Option<&str>,
    reason: &str,
    actor: &str,
    default: TradingState,
    last_id: Option<&str>,
) -> Result<ControlEntry, redis::RedisError> {
    let c = ChangeCall::new(to, symbol, reason, actor, default, last_id);
    let (id, from): (String, String) = c.script().invoke_async(con).await?;
    Ok(c.entry(id, from))
}

/// One change's keys and arguments (`change_state.lua`'s protocol), for
/// the script, the library's function and the plain halt alike.
struct ChangeCall<'a> {
    key: String,
    to: &'a str,
    symbol: Option<&'a str>,
    scope: &'static str,
    reason: &'a str,
    actor: &'a str,
    ts: String,
    /// The state in force while the key is missing.
    missing: &'static str,
    last_id: Option<&'a str>,
}

impl<'a> ChangeCall<'a> {
    fn new(
        to: &'a str,
        symbol: Option<&'a str>,
        reason: &'a str,
        actor: &'a str,
        default: TradingState,
        last_id: Option<&'a str>,
    ) -> Self {
        ChangeCall {
            key: symbol.map_or_else(|| keys::TRADING_STATE.to_string(), keys::trading_state),
            to,
            symbol,
            scope: if symbol.is_some() { "symbol" } else { "global" },
            reason,
            actor,
            ts: (store::now_ms() / 1000).to_string(),
            missing: if symbol.is_some() {
                NO_OVERRIDE
            } else {
                default.as_str()
            },
            last_id,
        }
    }

    /// KEYS: the state key, the control stream, the latch.
    fn keys(&self) -> [&str; 3] {
        [&self.key, CONTROL_STREAM, keys::LATCH]
    }

    /// ARGV.
    fn args(&self) -> Vec<&str> {
        let mut a = vec![
            self.to,
            self.scope,
            self.symbol.unwrap_or(""),
            self.reason,
            self.actor,
            &self.ts,
            self.missing,
        ];
        a.extend(self.last_id);
        a
    }

    /// The control entry's fields, as the script writes them.
    fn fields(&self, from: &'a str) -> [(&str, &str); 8] {
        [
            ("kind", "change"),
            ("scope", self.scope),
            ("symbol", self.symbol.unwrap_or("")),
            ("from", from),
            ("to", self.to),
            ("reason", self.reason),
            ("actor", self.actor),
            ("ts", &self.ts),
        ]
    }

    /// The script invocation.
    fn script(&self) -> redis::ScriptInvocation<'static> {
        let mut call = crate::scripts::CHANGE_STATE.prepare_invoke();
        call.key(&self.keys()[..]).arg(self.args());
        call
    }

    /// The entry written, from its ID and the state before.
    fn entry(&self, id: String, from: String) -> ControlEntry {
        ControlEntry {
            id,
            scope: self.scope.into(),
            symbol: self.symbol.unwrap_or("").into(),
            from,
            to: self.to.into(),
            reason: self.reason.into(),
            actor: self.actor.into(),
            ts: self.ts.clone(),
            kind: "change".into(),
            reference: String::new(),
            revoked: String::new(),
        }
    }
}

/// The last `n` control entries, newest first.
pub async fn last_entries(
    con: &mut Conn,
    n: usize,
) -> Result<Vec<ControlEntry>, redis::RedisError> {
    let v: redis::Value = redis::cmd("XREVRANGE")
        .arg(CONTROL_STREAM)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(n)
        .query_async(con)
        .await?;
    Ok(crate::stream::parse_entries(&v)
        .into_iter()
        .filter_map(|e| Some(ControlEntry::from_fields(&e.id, e.fields.as_ref()?)))
        .collect())
}

/// Whether the throttle latch (SPEC §13) holds the global state: the
/// daemon's own record of tripping it (`quantum:p33:latch`, which only the
/// write script sets and an operator's global change deletes) exists and
/// the global state is not ACTIVE. A control entry naming `p33-auto` as its
/// actor proves nothing: anyone who can write the stream can write that.
pub async fn latch_tripped(
    con: &mut Conn,
    global: TradingState,
) -> Result<bool, redis::RedisError> {
    let exists: bool = redis::cmd("EXISTS")
        .arg(keys::LATCH)
        .query_async(con)
        .await?;
    Ok(exists && global != TradingState::Active)
}

/// The follower: logs each change at WARN, ACKs it, refreshes the gauges.
struct Follower {
    group: String,
    refresh: Arc<Notify>,
    /// Told of every entry, so what it knows follows at once.
    guardian: Arc<crate::known::KnownState>,
    cfg: Arc<Config>,
    config_hash: String,
}

/// Index members a revocation takes per script call at most.
pub const REVOKE_STEP: usize = 200;

/// The script time a revocation step may use, µs: the step ends early
/// once it has used it, whatever the load (`p33-bench --halt` measures it).
pub const REVOKE_STEP_BUDGET_US: u64 = 3_000;

/// The actor of a revocation's confirmation entry.
pub const REVOKE_ACTOR: &str = "p33-revoke@";

/// The error code of the revocation script's refusal (a key it must write
/// cannot take it): nothing was revoked.
pub const REVOKE_ERROR: &str = "P33REVOKE";

impl Follower {
    /// A halt or reduce entry (not a confirmation): revokes the allows it
    /// makes void (SPEC §12), unless in dry run. `Ok(None)`: nothing to do,
    /// or another instance did it.
    async fn revoke(
        &self,
        con: &mut Conn,
        id: &str,
        f: &HashMap<String, String>,
    ) -> Result<Option<i64>, redis::RedisError> {
        let g = |k: &str| f.get(k).map_or("", String::as_str);
        let to = g("to").trim().to_ascii_uppercase();
        let halted = to == TradingState::Halted.as_str();
        if self.cfg.dry_run
            || !(halted || to == TradingState::Reducing.as_str())
            || f.contains_key("ref")
            || g("actor").starts_with(REVOKE_ACTOR)
        {
            return Ok(None);
        }
        let (scope, symbol) = match g("scope") {
            "global" => ("global", ""),
            "symbol" if keys::valid_symbol(g("symbol")) => ("symbol", g("symbol")),
            _ => return Ok(None),
        };
        let ttl_ms = u64::try_from(self.cfg.permit_ttl.as_millis()).unwrap_or(u64::MAX);
        // Only the index of the scope, and for a reduce only its opens: a
        // symbol halt never walks every allow of every symbol.
        let index = match (scope, halted) {
            ("symbol", true) => keys::allows_symbol(symbol),
            ("symbol", false) => keys::allows_symbol_opens(symbol),
            (_, true) => keys::ALLOWS.to_string(),
            (_, false) => keys::ALLOWS_OPENS.to_string(),
        };
        let state_key = if scope == "symbol" {
            keys::trading_state(symbol)
        } else {
            keys::TRADING_STATE.to_string()
        };
        let template = crate::permits::revoked_template(halted, store::now_epoch());
        let actor = format!("{REVOKE_ACTOR}{}", self.cfg.consumer_name);
        let missing = if scope == "symbol" {
            NO_OVERRIDE
        } else {
            self.cfg.default_trading_state.as_str()
        };
        let mut total: i64 = 0;
        let mut first = true;
        // Bounded steps (SPEC §12): each script call takes at most
        // REVOKE_STEP members, so no other client waits for a big halt.
        loop {
            let (n, done): (i64, i64) = crate::scripts::REVOKE
                .key(&index)
                .key(CONTROL_STREAM)
                .key(keys::revoked_marker(id))
                .key(keys::REVOCATIONS_STREAM)
                .key(&state_key)
                .arg(scope)
                .arg(symbol)
                .arg(&to)
                .arg(id)
                .arg(g("reason"))
                .arg(&actor)
                .arg(ttl_ms.saturating_mul(2).max(60_000))
                .arg(&template)
                .arg(self.cfg.decisions_maxlen)
                .arg(&self.config_hash)
                .arg(env!("CARGO_PKG_VERSION"))
                .arg(&self.cfg.consumer_name)
                .arg(missing)
                .arg(REVOKE_STEP)
                .arg(total)
                .arg(if first { "1" } else { "0" })
                .arg(REVOKE_STEP_BUDGET_US)
                .invoke_async(con)
                .await?;
            if n == -1 || (n == -2 && first) {
                return Ok(None);
            }
            if n == -2 {
                return Ok(Some(total));
            }
            total = total.saturating_add(n);
            first = false;
            if done == 1 {
                return Ok(Some(total));
            }
            tokio::task::yield_now().await;
        }
    }
}

impl BatchHandler for Follower {
    async fn handle(&mut self, con: &mut Conn, entries: &[Entry]) -> Result<(), redis::RedisError> {
        for e in entries {
            let Some(f) = &e.fields else { continue };
            let entry = ControlEntry::from_fields(&e.id, f);
            // Known before anything else is done with it: a halt this
            // instance confirmed (below) is one it restores if Redis loses it.
            self.guardian.observe(&e.id, f);
            if entry.is_confirmation() {
                info!(
                    "P3.3 control: {} revoked {} allows (for {}, actor={})",
                    entry.scope_label(),
                    entry.revoked,
                    entry.reference,
                    entry.actor
                );
                continue;
            }
            warn!("{}", entry.log_line());
            match self.revoke(con, &e.id, f).await {
                Ok(Some(n)) => warn!(
                    "P3.3 revoked {n} outstanding allows after {} -> {} (control entry {})",
                    entry.scope_label(),
                    entry.to,
                    e.id
                ),
                Ok(None) => {}
                // A key the revocation must write is unusable: said, and
                // not retried for ever (the allows expire within the TTL).
                Err(err) if err.code() == Some(REVOKE_ERROR) => warn!(
                    "P3.3 cannot revoke the allows after control entry {}: {}; they stay valid until they expire",
                    e.id,
                    clip(err.detail().unwrap_or(""))
                ),
                Err(err) => return Err(err),
            }
        }
        let mut ack = redis::cmd("XACK");
        ack.arg(CONTROL_STREAM).arg(&self.group);
        for e in entries {
            ack.arg(&e.id);
        }
        let _: i64 = ack.query_async(con).await?;
        self.refresh.notify_one();
        self.guardian.wake();
        Ok(())
    }
}

/// Follows the control stream until `cancel` fires.
pub async fn run_follower(
    cfg: Arc<Config>,
    redis: store::Redis,
    refresh: Arc<Notify>,
    guardian: Arc<crate::known::KnownState>,
    cancel: CancellationToken,
) {
    let reader = GroupReader {
        who: "control follower",
        what: "control",
        stream: CONTROL_STREAM,
        group: keys::control_group(&cfg.consumer_name),
        consumer: cfg.consumer_name.clone(),
        batch: 64,
        block: Duration::from_millis(1000),
        // The group is this instance's own: nothing to claim from others.
        claim_idle: Duration::from_secs(3600),
    };
    let mut handler = Follower {
        group: reader.group.clone(),
        refresh,
        guardian,
        config_hash: crate::record::config_hash(&cfg),
        cfg,
    };
    reader.run(&redis, &mut handler, &cancel).await;
}

/// Keeps `p33_trading_state` and `p33_symbol_overrides` current: at once
/// when the follower saw a change, and every 5 s (a state set by hand,
/// without `ctl`, shows too). The global gauge shows the state in force:
/// the stricter of the key and what the guardian knows.
pub async fn run_state_metrics(
    cfg: Arc<Config>,
    redis: store::Redis,
    guardian: Arc<crate::known::KnownState>,
    metrics: Arc<Metrics>,
    refresh: Arc<Notify>,
    cancel: CancellationToken,
) {
    let Some(mut con) = redis
        .connect("trading state", Duration::from_secs(5), &cancel)
        .await
    else {
        return;
    };
    let mut overrides: Vec<TradingState> = Vec::new();
    let mut next_count = tokio::time::Instant::now();
    loop {
        let read = async {
            // What is in force: the stricter of the key and the state the
            // control log confirmed (a key Redis lost reads the latter).
            let key = read_global(&mut con)
                .await?
                .unwrap_or(cfg.default_trading_state);
            let global = guardian.known().map_or(key, |k| k.global.max(key));
            if tokio::time::Instant::now() >= next_count {
                let all = read_overrides(&mut con).await?;
                overrides = all.iter().map(|(_, t)| *t).collect();
                guardian.set_seen_overrides(all);
                next_count = tokio::time::Instant::now() + overrides_period(overrides.len());
            }
            let latch = latch_tripped(&mut con, global).await?;
            Ok::<_, redis::RedisError>((global, latch))
        };
        match read.await {
            Ok((global, latch)) => {
                metrics.set_trading_state(global, &overrides);
                metrics.throttle_latch_tripped.set(i64::from(latch));
            }
            Err(e) => warn!("trading state: reading it failed: {e}"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = refresh.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}
