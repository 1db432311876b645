//! The snapshot writer (SPEC §7): every allowlisted symbol's
//! `quantum:position:snapshot:<symbol>` (and the canonical hash) in one
//! pipeline.

use std::collections::HashMap;

use crate::domain::{dec_str, PositionSide};
use crate::keys;

use super::Position;

/// Snapshot and canonical hash lifetime, seconds.
pub const SNAPSHOT_TTL_S: i64 = 3600;

/// `binance_testnet` when the base URL's host contains `testnet`.
pub fn source_label(base_url: &str) -> &'static str {
    let host = url::Url::parse(base_url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_default();
    if host.contains("testnet") {
        "binance_testnet"
    } else {
        "binance"
    }
}

/// Writes every allowlisted symbol's snapshot in one pipeline.
pub async fn write_snapshots(
    con: &mut crate::store::Conn,
    symbols: &[String],
    positions: &HashMap<String, Position>,
    ts_ms: u64,
    source: &str,
    canonical: bool,
) -> Result<(), redis::RedisError> {
    let mut p = redis::pipe();
    // Whole seconds: the pipeline's Python readers call int() on it (§7).
    let ts = (ts_ms / 1000).to_string();
    let ts_ms = ts_ms.to_string();
    let flat = Position::flat();
    for sym in symbols {
        let pos = positions.get(sym).unwrap_or(&flat);
        let key = keys::snapshot(sym);
        let amt = dec_str(pos.amt);
        p.cmd("HSET")
            .arg(&key)
            .arg("position_amt")
            .arg(&amt)
            .arg("side")
            .arg(pos.side.as_str())
            .arg("entry_price")
            .arg(&pos.entry_price)
            .arg("mark_price")
            .arg(&pos.mark_price)
            .arg("unrealized_pnl")
            .arg(&pos.unrealized_pnl)
            .arg("leverage")
            .arg(&pos.leverage)
            .arg("ts_epoch")
            .arg(&ts)
            .arg("ts_epoch_ms")
            .arg(&ts_ms)
            .arg("source")
            .arg(source)
            .ignore();
        p.cmd("EXPIRE").arg(&key).arg(SNAPSHOT_TTL_S).ignore();
        // The canonical hash knows LONG/SHORT/FLAT only: a hedged symbol is
        // left out rather than written with a side that would mislead.
        if canonical && pos.side != PositionSide::Hedged {
            let ckey = keys::canonical_position(sym);
            let side = match pos.side {
                PositionSide::Long => "LONG",
                PositionSide::Short => "SHORT",
                PositionSide::None | PositionSide::Hedged => "FLAT",
            };
            p.cmd("HSET")
                .arg(&ckey)
                .arg("symbol")
                .arg(sym)
                .arg("position_amt")
                .arg(&amt)
                .arg("side")
                .arg(side)
                .arg("quantity")
                .arg(dec_str(pos.amt.abs()))
                .arg("entry_price")
                .arg(&pos.entry_price)
                .arg("mark_price")
                .arg(&pos.mark_price)
                .arg("current_price")
                .arg(&pos.mark_price)
                .arg("unrealized_pnl")
                .arg(&pos.unrealized_pnl)
                .arg("leverage")
                .arg(&pos.leverage)
                .arg("ts_epoch")
                .arg(&ts)
                .arg("source")
                .arg("position_state_brain")
                .ignore();
            p.cmd("EXPIRE").arg(&ckey).arg(SNAPSHOT_TTL_S).ignore();
        }
    }
    p.query_async::<()>(con).await
}
