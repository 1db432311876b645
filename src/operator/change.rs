//! Changing the trading state (SPEC §12, §17, §19): an operator's halt,
//! reduce or resume through the daemon's function library (a plain halt
//! when Redis lost the library), the guardian's restore of what Redis
//! lost, and the daemon's own tightening of a liquidated symbol; each one
//! entry on `quantum:stream:p33.control`. `control` re-exports it.

use std::collections::HashMap;

use crate::domain::TradingState;
use crate::gate::known::NO_OVERRIDE;
use crate::redis::keys::{self, CONTROL_STREAM};
use crate::redis::store::{self, Conn};

use super::states::read_keys;
use crate::text::clip;

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
    pub(crate) fn from_fields(id: &str, f: &HashMap<String, String>) -> ControlEntry {
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
    let lib = &crate::redis::scripts::LIBRARY;
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
                .and_then(crate::redis::stream::text)
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
        let mut call = crate::redis::scripts::CHANGE_STATE.prepare_invoke();
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
