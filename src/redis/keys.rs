//! Every Redis stream, consumer group and key name the daemon reads or
//! writes (SPEC §3–§8), built here and nowhere else. Other services parse
//! these names: a change here is a change of the contract.
//!
//! Per-symbol and per-plan keys are built from a symbol that passed
//! [`valid_symbol`] or a `plan_id` that passed the plan checks, so a key
//! never carries an untrusted byte.

/// The plan stream the apply layer publishes to (SPEC §4).
pub const PLAN_STREAM: &str = "quantum:stream:apply.plan";
/// The result stream of the apply layer and the intent executor (SPEC §8).
pub const RESULT_STREAM: &str = "quantum:stream:apply.result";

/// The plan consumer group (SPEC §2 `P33_CONSUMER_GROUP` default).
pub const PLAN_GROUP: &str = "p33";
/// The plan consumer group in dry run.
pub const PLAN_GROUP_DRY_RUN: &str = "p33-dryrun";
/// The ledger follower's group on [`RESULT_STREAM`].
pub const LEDGER_GROUP: &str = "p33-ledger";
/// The ledger follower's group in dry run.
pub const LEDGER_GROUP_DRY_RUN: &str = "p33-ledger-dryrun";

/// Default of `P33_UNIVERSE_KEY_ACTIVE` (SPEC §3).
pub const UNIVERSE_ACTIVE: &str = "quantum:cfg:universe:active";
/// Default of `P33_UNIVERSE_KEY_LAST_OK`.
pub const UNIVERSE_LAST_OK: &str = "quantum:cfg:universe:last_ok";
/// Default of `P33_UNIVERSE_KEY_META`.
pub const UNIVERSE_META: &str = "quantum:cfg:universe:meta";

/// The last good step-size table (hash: symbol → stepSize), written by this
/// daemon after each exchangeInfo load and read at start when the exchange
/// cannot be reached.
pub const STEP_SIZES: &str = "quantum:p33:step_sizes";

/// The global trading state (SPEC §12): ACTIVE, REDUCING or HALTED.
pub const TRADING_STATE: &str = "quantum:p33:trading_state";

/// The per-symbol trading state override (SPEC §12).
pub fn trading_state(symbol: &str) -> String {
    format!("{TRADING_STATE}:{symbol}")
}

/// The pattern that finds every per-symbol override (SCAN MATCH).
pub fn trading_state_pattern() -> String {
    format!("{TRADING_STATE}:*")
}

/// The prefix of the open throttles' sorted sets (SPEC §13).
pub const OPENS: &str = "quantum:p33:opens";

/// Opening allows of the last window, all symbols (SPEC §13): a sorted set
/// of entry IDs scored by the time they were granted, ms. One set per
/// window length, so that instances configured with different windows never
/// trim each other's counts; instances with the same window share one.
pub fn opens(window_ms: u64) -> String {
    format!("{OPENS}:{window_ms}ms")
}

/// Opening allows of the last window, one symbol (SPEC §13); one set per
/// window length, as [`opens`].
pub fn opens_symbol(window_ms: u64, symbol: &str) -> String {
    format!("{OPENS}:{window_ms}ms:{symbol}")
}

/// A name in the throttles' family, for a key slot a script never touches.
pub fn opens_unused(rest: &str) -> String {
    format!("{OPENS}:{rest}")
}

/// Symbols granted an open while flat, within the permit TTL (SPEC §13
/// `P33_MAX_OPEN_POSITIONS`): a sorted set scored by the time, ms.
pub const OPEN_POSITIONS: &str = "quantum:p33:open_positions";

/// Every finished plan, one record each (SPEC §14).
pub const DECISIONS_STREAM: &str = "quantum:stream:p33.decisions";

/// The records of a dry run (`P33_DRY_RUN`), never mixed into the live ones.
pub const DECISIONS_DRY_RUN: &str = "quantum:stream:p33.decisions.dry_run";

/// The decision stream of a daemon in dry run or not.
pub fn decisions(dry_run: bool) -> &'static str {
    if dry_run {
        DECISIONS_DRY_RUN
    } else {
        DECISIONS_STREAM
    }
}

/// The throttle latch's own record (SPEC §13): the ID of the control entry
/// the write script wrote when the latch tripped. Only the daemon writes it;
/// an operator's global change (`ctl`) deletes it. `ctl status` and
/// `p33_throttle_latch_tripped` report the latch from it, never from an
/// `actor` name anyone can write to the control stream.
pub const LATCH: &str = "quantum:p33:latch";

/// The marker that a gate has put the trading state in place on this
/// Redis (SPEC §12): set (no TTL) by an instance once it has read the state
/// keys and restored what was lost. While it is missing the write script
/// writes no allow: a Redis that lost its data permits nothing until a gate
/// has put the state back.
pub const ARMED: &str = "quantum:p33:armed";

/// The allows written and not yet expired (SPEC §12): a sorted set of
/// `<symbol>|<plan_id>` scored by the permit's expiry, ms. A halt revokes
/// those still held.
pub const ALLOWS: &str = "quantum:p33:allows";

/// The opening allows of [`ALLOWS`] (members `<symbol>|<plan_id>`): what a
/// global reduce walks, so its steps never pass the closes again and again.
pub const ALLOWS_OPENS: &str = "quantum:p33:allows:opens";

/// One symbol's allows (members `<plan_id>`, scored by expiry, ms): what a
/// symbol halt walks, never every allow of every symbol (SPEC §12).
pub fn allows_symbol(symbol: &str) -> String {
    format!("{ALLOWS}:{symbol}")
}

/// One symbol's opening allows: what a symbol reduce walks.
pub fn allows_symbol_opens(symbol: &str) -> String {
    format!("{ALLOWS}:{symbol}:opens")
}

/// One record per permit a halt revoked (SPEC §12), with its own MAXLEN:
/// a big halt never pushes the decisions it is about out of the decision
/// record. `explain` reads it too.
pub const REVOCATIONS_STREAM: &str = "quantum:stream:p33.revocations";

/// What the user data stream saw (SPEC §19): `kind=position` (a leg's
/// change, with the snapshot write) and `kind=fill` entries.
pub const POSITIONS_STREAM: &str = "quantum:stream:p33.positions";

/// The pipeline's closed trades (SPEC §19): intent_executor and the apply
/// layer write their own closes there; this daemon, with
/// `P33_TRADE_CLOSED_EVENTS`, the ones the exchange made. Not ours: we
/// only add to it.
pub const TRADE_CLOSED_STREAM: &str = "quantum:stream:trade.closed";

/// A running instance's report of itself (SPEC §12), a hash with a TTL.
pub fn instance(consumer: &str) -> String {
    format!("quantum:p33:instance:{consumer}")
}

/// The marker that a halt entry's revocation was done (by one instance).
pub fn revoked_marker(entry_id: &str) -> String {
    format!("quantum:p33:revoked:{entry_id}")
}

/// Every trading-state change, one entry each (SPEC §12).
pub const CONTROL_STREAM: &str = "quantum:stream:p33.control";

/// The control follower's group: one per instance, so that every instance
/// sees (and logs) every change.
pub fn control_group(consumer: &str) -> String {
    format!("p33-control:{consumer}")
}

/// The prefix of every permit key; keyspace listeners match on it.
pub const PERMIT_PREFIX: &str = "quantum:permit:p33:";

/// The gate's own namespace, as key prefixes: its permits, its trading
/// state, latch and control stream, and every other key of its own. What
/// only the gate may write (`acl --pipeline`, SPEC §17).
pub const GATE_ONLY: [&str; 3] = [PERMIT_PREFIX, "quantum:p33:", "quantum:stream:p33."];

/// The permit of a plan (SPEC §6), a string with a TTL.
pub fn permit(plan_id: &str) -> String {
    format!("{PERMIT_PREFIX}{plan_id}")
}

/// The reconcile hold of a symbol (SPEC §5), set by the reconcile engine.
pub fn hold(symbol: &str) -> String {
    format!("quantum:reconcile:hold:{symbol}")
}

/// The exchange snapshot hash of a symbol (SPEC §7).
pub fn snapshot(symbol: &str) -> String {
    format!("quantum:position:snapshot:{symbol}")
}

/// The canonical position hash newer services read (SPEC §7).
pub fn canonical_position(symbol: &str) -> String {
    format!("quantum:state:positions:{symbol}")
}

/// The ledger hash of a symbol (SPEC §5 row 7, §8).
pub fn ledger(symbol: &str) -> String {
    format!("quantum:position:ledger:{symbol}")
}

/// The last-execution timestamp (epoch ms) of a symbol (SPEC §5 row 8).
pub fn cooldown(symbol: &str) -> String {
    format!("quantum:cooldown:last_exec_ts:{symbol}")
}

/// A key slot a script is given but never touches (an ACK-only entry still
/// fills its KEYS positions; Redis Cluster would route on it, so it is a
/// name in the same family).
pub fn unused(family: fn(&str) -> String) -> String {
    family("-")
}

/// A symbol as the universe and the exchange spell them: `^[A-Z0-9]{1,32}$`.
pub fn valid_symbol(s: &str) -> bool {
    symbol_problem(s).is_none()
}

/// Why `s` is not a valid symbol, in words an operator can act on.
pub fn symbol_problem(s: &str) -> Option<&'static str> {
    if s.is_empty() {
        Some("empty")
    } else if s.len() > 32 {
        Some("longer than 32 characters")
    } else if s
        .bytes()
        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
    {
        None
    } else if s
        .bytes()
        .all(|b| b.is_ascii_alphabetic() || b.is_ascii_digit())
    {
        Some("lower case; symbols are upper case (BTCUSDT)")
    } else {
        Some("holds characters other than A-Z and 0-9")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_contract() {
        assert_eq!(permit("p1"), "quantum:permit:p33:p1");
        assert_eq!(hold("BTCUSDT"), "quantum:reconcile:hold:BTCUSDT");
        assert_eq!(snapshot("BTCUSDT"), "quantum:position:snapshot:BTCUSDT");
        assert_eq!(
            canonical_position("BTCUSDT"),
            "quantum:state:positions:BTCUSDT"
        );
        assert_eq!(ledger("BTCUSDT"), "quantum:position:ledger:BTCUSDT");
        assert_eq!(cooldown("BTCUSDT"), "quantum:cooldown:last_exec_ts:BTCUSDT");
        assert_eq!(unused(permit), "quantum:permit:p33:-");
        assert_eq!(
            trading_state("BTCUSDT"),
            "quantum:p33:trading_state:BTCUSDT"
        );
        assert_eq!(trading_state_pattern(), "quantum:p33:trading_state:*");
        assert_eq!(CONTROL_STREAM, "quantum:stream:p33.control");
        assert_eq!(
            symbol_problem("btcusdt"),
            Some("lower case; symbols are upper case (BTCUSDT)")
        );
        assert_eq!(
            symbol_problem("BTC-USDT"),
            Some("holds characters other than A-Z and 0-9")
        );
        assert_eq!(symbol_problem(""), Some("empty"));
        assert_eq!(
            symbol_problem(&"A".repeat(33)),
            Some("longer than 32 characters")
        );
        assert!(valid_symbol("1000PEPEUSDT"));
    }

    /// Every `"quantum:` literal of the crate is in this file (SPEC names
    /// are spelled once). Doc comments may quote them.
    #[test]
    fn no_other_module_spells_a_key() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src");
        let mut offenders = Vec::new();
        let mut stack = vec![std::path::PathBuf::from(dir)];
        while let Some(p) = stack.pop() {
            for e in std::fs::read_dir(&p).unwrap().flatten() {
                let path = e.path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                if path.extension().is_none_or(|x| x != "rs") || path.ends_with("keys.rs") {
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                for (n, line) in text.lines().enumerate() {
                    let code = line.trim_start();
                    if code.starts_with("//") {
                        continue;
                    }
                    if code.contains("\"quantum:") {
                        offenders.push(format!("{}:{}: {code}", path.display(), n + 1));
                    }
                }
            }
        }
        assert!(offenders.is_empty(), "{}", offenders.join("\n"));
    }
}
