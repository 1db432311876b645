//! One consumer-group reader for every stream the daemon follows (SPEC §4,
//! §8): connect → replay this consumer's own pending entries (`0`) → read
//! new ones (`>`) → claim entries idle on other consumers (XAUTOCLAIM) →
//! recreate a vanished group at the last entry finished here → back off on
//! errors. The plan consumer and the ledger follower are [`BatchHandler`]s
//! of a [`GroupReader`]; neither carries its own copy of the loop.
//!
//! Entries are parsed strictly: a field name or value that is not UTF-8
//! marks the entry ([`Entry::not_utf8`]) instead of being "repaired".

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use crate::redis::store::Conn;
use redis::Value;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::redis::store::{self, Backoff};
use crate::text::{clip, clip_bytes};

/// One stream entry: its ID and fields (`None` when the entry was deleted
/// while pending).
#[derive(Debug, Clone)]
pub struct Entry {
    /// The entry ID, `<ms>-<seq>`.
    pub id: String,
    /// The fields; `None` when the entry was deleted while pending.
    pub fields: Option<HashMap<String, String>>,
    /// The first field whose name or value is not valid UTF-8 (escaped and
    /// cut for the log): such an entry is malformed, never "repaired".
    pub not_utf8: Option<String>,
}

/// The milliseconds part of a stream entry ID.
pub fn entry_ms(id: &str) -> Option<u64> {
    id.split('-').next()?.parse().ok()
}

/// A reply value as text (lossy: for IDs and values that are not plan fields).
pub fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// A field name or value: its text, or `Err(escaped)` when it is not UTF-8.
fn strict_text(v: &Value) -> Option<Result<String, String>> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8(b.clone()).map_err(|_| clip_bytes(b))),
        Value::SimpleString(s) => Some(Ok(s.clone())),
        Value::Int(i) => Some(Ok(i.to_string())),
        _ => None,
    }
}

fn parse_entry(v: &Value) -> Option<Entry> {
    let Value::Array(parts) = v else { return None };
    let id = text(parts.first()?)?;
    let mut not_utf8 = None;
    let fields = match parts.get(1) {
        Some(Value::Array(kv)) => {
            let mut map = HashMap::with_capacity(kv.len() / 2);
            for c in kv.chunks_exact(2) {
                match (strict_text(&c[0]), strict_text(&c[1])) {
                    (Some(Ok(k)), Some(Ok(v))) => {
                        map.insert(k, v);
                    }
                    (Some(Err(k)), _) => {
                        not_utf8.get_or_insert(format!("a field name ({k})"));
                    }
                    (Some(Ok(k)), Some(Err(_))) => {
                        not_utf8.get_or_insert(format!("field {}", clip(&k)));
                    }
                    _ => {}
                }
            }
            Some(map)
        }
        _ => None,
    };
    Some(Entry {
        id,
        fields,
        not_utf8,
    })
}

/// The highest entry ID of `entries`, if any parses.
pub fn max_id(entries: &[Entry]) -> Option<StreamId> {
    entries.iter().filter_map(|e| StreamId::parse(&e.id)).max()
}

/// Parses a list of entries (`[[id, [k, v, …]], …]`).
pub fn parse_entries(v: &Value) -> Vec<Entry> {
    match v {
        Value::Array(items) => items.iter().filter_map(parse_entry).collect(),
        _ => Vec::new(),
    }
}

/// Pages through a whole stream (XRANGE oldest first, XREVRANGE newest
/// first), outside any group: the decision record's readers.
#[derive(Debug, Clone)]
pub struct RangeCursor {
    stream: &'static str,
    newest_first: bool,
    /// Where the next page starts: an ID, `-`/`+`, or `(ID` (past it).
    next: String,
}

impl RangeCursor {
    /// From the oldest entry at or after `from` (an ID or `<ms>`) onwards.
    pub fn oldest_first(stream: &'static str, from: String) -> RangeCursor {
        RangeCursor {
            stream,
            newest_first: false,
            next: from,
        }
    }

    /// From the newest entry backwards.
    pub fn newest_first(stream: &'static str) -> RangeCursor {
        RangeCursor {
            stream,
            newest_first: true,
            next: "+".into(),
        }
    }

    /// The next page, `count` entries at most; empty at the end.
    pub async fn next_page(
        &mut self,
        con: &mut Conn,
        count: usize,
    ) -> Result<Vec<Entry>, redis::RedisError> {
        let (cmd, other_end) = if self.newest_first {
            ("XREVRANGE", "-")
        } else {
            ("XRANGE", "+")
        };
        let v: Value = redis::cmd(cmd)
            .arg(self.stream)
            .arg(&self.next)
            .arg(other_end)
            .arg("COUNT")
            .arg(count)
            .query_async(con)
            .await?;
        let page = parse_entries(&v);
        if let Some(last) = page.last() {
            self.next = format!("({}", last.id);
        }
        Ok(page)
    }
}

/// Parses an `XREADGROUP` reply for one stream (`Nil` on timeout).
pub fn parse_xread(v: &Value) -> Vec<Entry> {
    match v {
        Value::Array(streams) => streams
            .iter()
            .filter_map(|s| match s {
                Value::Array(p) if p.len() == 2 => Some(parse_entries(&p[1])),
                _ => None,
            })
            .flatten()
            .collect(),
        Value::Map(m) => m.iter().flat_map(|(_, e)| parse_entries(e)).collect(),
        _ => Vec::new(),
    }
}

/// Reads this consumer's entries: own pending ones from `0`, or new ones.
pub async fn read_group(
    con: &mut Conn,
    stream: &str,
    group: &str,
    consumer: &str,
    pending: bool,
    count: usize,
    block_ms: u64,
) -> Result<Vec<Entry>, redis::RedisError> {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP")
        .arg(group)
        .arg(consumer)
        .arg("COUNT")
        .arg(count);
    if !pending {
        cmd.arg("BLOCK").arg(block_ms);
    }
    cmd.arg("STREAMS")
        .arg(stream)
        .arg(if pending { "0" } else { ">" });
    let v: Value = cmd.query_async(con).await?;
    Ok(parse_xread(&v))
}

/// Claims entries idle `min_idle` on any consumer of `group` (XAUTOCLAIM,
/// Redis ≥ 6.2), walking the whole pending list once.
pub async fn autoclaim(
    con: &mut Conn,
    stream: &str,
    group: &str,
    consumer: &str,
    min_idle: Duration,
    count: usize,
) -> Result<Vec<Entry>, redis::RedisError> {
    let mut start = "0-0".to_string();
    let mut out = Vec::new();
    for _ in 0..100 {
        let v: Value = redis::cmd("XAUTOCLAIM")
            .arg(stream)
            .arg(group)
            .arg(consumer)
            .arg(u64::try_from(min_idle.as_millis()).unwrap_or(u64::MAX))
            .arg(&start)
            .arg("COUNT")
            .arg(count)
            .query_async(con)
            .await?;
        let Value::Array(parts) = &v else { break };
        let next = parts.first().and_then(text).unwrap_or_else(|| "0-0".into());
        if let Some(e) = parts.get(1) {
            out.extend(parse_entries(e));
        }
        if next == "0-0" || out.len() >= 10 * count {
            break;
        }
        start = next;
    }
    Ok(out)
}

/// Whether an error says the consumer group or its stream is gone.
pub fn is_nogroup(e: &redis::RedisError) -> bool {
    e.code() == Some("NOGROUP") || e.to_string().contains("NOGROUP")
}

/// A stream entry ID, `<ms>-<seq>`, ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct StreamId {
    /// Milliseconds part.
    pub ms: u64,
    /// Sequence part.
    pub seq: u64,
}

impl StreamId {
    /// Parses `<ms>-<seq>` (or `<ms>`); `None` for anything else.
    pub fn parse(id: &str) -> Option<StreamId> {
        let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
        Some(StreamId {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// How far ahead of the clock an entry ID may be and still be a place to
/// recreate a group at (SPEC §4).
pub const FUTURE_SLACK_MS: u64 = 5_000;

/// Where a group is (re)created: at `$` when the daemon starts, at the last
/// entry this process finished (`0` when none) when the group vanished while
/// running (SPEC §4): plans published between Redis coming back empty and
/// the recreation must still be read. A finished entry more than
/// [`FUTURE_SLACK_MS`] ahead of `now_ms` (one XADD with a future ID) is no
/// safe position: a group there would skip every later plan, so it is `0`,
/// and the second value says so (for a WARN).
pub fn recreate_at(last_done: Option<StreamId>, now_ms: u64) -> (String, bool) {
    match last_done {
        None => ("0".to_string(), false),
        Some(id) if id.ms > now_ms.saturating_add(FUTURE_SLACK_MS) => ("0".to_string(), true),
        Some(id) => (id.to_string(), false),
    }
}

/// A flat key/value reply (`XINFO`) as a map of its text keys.
fn info_map(v: &Value) -> HashMap<String, &Value> {
    match v {
        Value::Array(kv) => kv
            .chunks_exact(2)
            .filter_map(|c| Some((text(&c[0])?, &c[1])))
            .collect(),
        _ => HashMap::new(),
    }
}

/// A group whose last delivered ID is beyond its stream's last ID can
/// never read another entry: the stream was deleted and recreated below
/// it (after an entry with a future ID), or someone moved the group. Such a
/// group is moved to `0`, with a WARN, so the entries published since are
/// read (SPEC §4); returns whether it was.
pub async fn repair_group_ahead(
    con: &mut Conn,
    stream: &str,
    group: &str,
) -> Result<bool, redis::RedisError> {
    let groups: Value = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(con)
        .await?;
    let Value::Array(groups) = groups else {
        return Ok(false);
    };
    let Some(delivered) = groups.iter().find_map(|g| {
        let m = info_map(g);
        (m.get("name").and_then(|v| text(v)).as_deref() == Some(group))
            .then(|| m.get("last-delivered-id").and_then(|v| text(v)))
            .flatten()
    }) else {
        return Ok(false);
    };
    let info: Value = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(stream)
        .query_async(con)
        .await?;
    let last = info_map(&info)
        .get("last-generated-id")
        .and_then(|v| text(v))
        .unwrap_or_default();
    let (Some(d), Some(l)) = (StreamId::parse(&delivered), StreamId::parse(&last)) else {
        return Ok(false);
    };
    if d <= l {
        return Ok(false);
    }
    warn!(
        "group {group} on {stream} was at {d}, beyond the stream's last entry {l}: no new entry could ever be read; moving it to 0 so the entries published since are read"
    );
    let _: () = redis::cmd("XGROUP")
        .arg("SETID")
        .arg(stream)
        .arg(group)
        .arg("0")
        .query_async(con)
        .await?;
    Ok(true)
}

/// Creates `group` on `stream` at `start` (`$`, `0` or an entry ID) with
/// MKSTREAM; BUSYGROUP is fine.
pub async fn ensure_group(
    con: &mut Conn,
    stream: &str,
    group: &str,
    start: &str,
) -> Result<(), redis::RedisError> {
    let r: Result<(), redis::RedisError> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg(start)
        .arg("MKSTREAM")
        .query_async(con)
        .await;
    match r {
        Ok(()) => {
            info!("redis: created consumer group {group} on {stream} at {start}");
            Ok(())
        }
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        Err(e) => Err(e),
    }
}

/// Why a turn of the reader failed, so the loop knows what to do next.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The group (or its stream) is gone: recreate it, then read again.
    #[error("consumer group missing: {0}")]
    NoGroup(redis::RedisError),
    /// Anything else from Redis: back off, then replay own pending entries.
    #[error("{0}")]
    Transient(redis::RedisError),
}

impl From<redis::RedisError> for StreamError {
    fn from(e: redis::RedisError) -> Self {
        if is_nogroup(&e) {
            StreamError::NoGroup(e)
        } else {
            StreamError::Transient(e)
        }
    }
}

/// What a [`GroupReader`] hands its entries to.
pub trait BatchHandler: Send {
    /// Handles one batch (never empty). An error leaves every entry the
    /// handler did not ACK pending: the reader backs off and replays them.
    fn handle(
        &mut self,
        con: &mut Conn,
        entries: &[Entry],
    ) -> impl Future<Output = Result<(), redis::RedisError>> + Send;

    /// Called on every turn of the loop (and every second while connecting).
    fn on_turn(&mut self) {}

    /// A turn succeeded: Redis answers and the group exists.
    fn on_healthy(&mut self) {}

    /// A turn failed; `group_missing` when the group was gone.
    fn on_error(&mut self, _group_missing: bool) {}
}

/// Reads one stream in one consumer group, for ever (until cancelled).
#[derive(Debug, Clone)]
pub struct GroupReader {
    /// Who reads, for log lines (`plan consumer`, `ledger follower`).
    pub who: &'static str,
    /// What an entry is called in log lines (`plan`, `apply.result`).
    pub what: &'static str,
    /// The stream (a `keys` constant).
    pub stream: &'static str,
    /// The consumer group.
    pub group: String,
    /// This consumer's name, stable across restarts.
    pub consumer: String,
    /// Entries per read.
    pub batch: usize,
    /// `BLOCK` of a read; bounds how long shutdown waits for one.
    pub block: Duration,
    /// Entries idle this long on other consumers are claimed, this often.
    pub claim_idle: Duration,
}

impl GroupReader {
    /// Connects (retrying until Redis answers) and runs the read loop until
    /// `cancel` fires. Never returns early: Redis errors are retried with
    /// backoff (after which own pending entries are read again), a vanished
    /// group is recreated at the last entry finished here.
    pub async fn run<H: BatchHandler>(
        self,
        redis: &store::Redis,
        handler: &mut H,
        cancel: &CancellationToken,
    ) {
        // The response timeout must outlast the blocking read.
        let connect = redis.connect(
            self.who,
            self.block.saturating_add(Duration::from_secs(5)),
            cancel,
        );
        tokio::pin!(connect);
        let mut feed = tokio::time::interval(Duration::from_secs(1));
        let connected = loop {
            tokio::select! {
                c = &mut connect => break c,
                _ = feed.tick() => handler.on_turn(),
            }
        };
        let Some(mut con) = connected else { return };
        // A new master ends a backoff at once: the outage is over.
        let mut master = redis.watch();
        let mut backoff = Backoff::default();
        let mut replay_pending = true;
        let mut next_claim = Instant::now();
        // The last entry this process finished: where a vanished group is
        // recreated, so no entry published meanwhile is skipped (SPEC §4).
        let mut last_done: Option<StreamId> = None;
        loop {
            handler.on_turn();
            if cancel.is_cancelled() {
                return;
            }
            let turn = self
                .turn(
                    &mut con,
                    handler,
                    cancel,
                    &mut replay_pending,
                    &mut next_claim,
                    &mut last_done,
                )
                .await;
            match turn {
                Ok(()) => {
                    handler.on_healthy();
                    backoff.reset();
                }
                Err(e) => {
                    replay_pending = true;
                    let missing = matches!(e, StreamError::NoGroup(_));
                    handler.on_error(missing);
                    if missing {
                        let (at, ahead) = recreate_at(last_done, store::now_ms());
                        if ahead {
                            warn!(
                                "{}: the last entry finished here is ahead of the clock; the group is recreated at 0, not there (every later plan would be skipped)",
                                self.who
                            );
                        }
                        warn!(
                            "{} group missing ({e}); recreating it at {at} (the last entry finished here)",
                            self.who
                        );
                        match ensure_group(&mut con, self.stream, &self.group, &at).await {
                            Ok(()) => continue,
                            Err(e) => warn!("{}: recreating the group failed: {e}", self.who),
                        }
                    } else {
                        warn!("{}: redis error: {e}; retrying with backoff", self.who);
                    }
                    let go_on = tokio::select! {
                        w = backoff.wait(cancel) => w,
                        _ = master.changed() => true,
                    };
                    if !go_on {
                        return;
                    }
                }
            }
        }
    }

    /// One turn: claim (when due), read, hand over.
    async fn turn<H: BatchHandler>(
        &self,
        con: &mut Conn,
        handler: &mut H,
        cancel: &CancellationToken,
        replay_pending: &mut bool,
        next_claim: &mut Instant,
        last_done: &mut Option<StreamId>,
    ) -> Result<(), StreamError> {
        // After a failover our own pending entries are read again on the
        // new master: what the old one had delivered may be pending there.
        if con.take_moved() {
            *replay_pending = true;
        }
        if Instant::now() >= *next_claim {
            *next_claim = Instant::now() + self.claim_idle;
            let claimed = autoclaim(
                con,
                self.stream,
                &self.group,
                &self.consumer,
                self.claim_idle,
                self.batch,
            )
            .await?;
            if !claimed.is_empty() {
                info!(
                    "claimed {} {} entries idle ≥ {:?} on other consumers",
                    claimed.len(),
                    self.what,
                    self.claim_idle
                );
                for chunk in claimed.chunks(self.batch.max(1)) {
                    handler.handle(con, chunk).await?;
                    *last_done = (*last_done).max(max_id(chunk));
                }
            }
        }
        let block_ms = u64::try_from(self.block.as_millis()).unwrap_or(u64::MAX);
        let read = read_group(
            con,
            self.stream,
            &self.group,
            &self.consumer,
            *replay_pending,
            self.batch,
            block_ms,
        );
        // A read cut short by shutdown leaves its entries pending for the
        // next start (same consumer name): nothing is lost.
        let entries = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            r = read => r?,
        };
        if *replay_pending {
            if entries.is_empty() {
                *replay_pending = false;
            } else {
                info!(
                    "re-reading {} own pending {} entries",
                    entries.len(),
                    self.what
                );
            }
        }
        if !entries.is_empty() {
            handler.handle(con, &entries).await?;
            *last_done = (*last_done).max(max_id(&entries));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_order_and_recreate_points() {
        let a = StreamId::parse("1769920000123-4").unwrap();
        let b = StreamId::parse("1769920000123-10").unwrap();
        let c = StreamId::parse("1769920000124-0").unwrap();
        assert!(a < b && b < c);
        assert_eq!(StreamId::parse("5"), Some(StreamId { ms: 5, seq: 0 }));
        assert_eq!(StreamId::parse("x-1"), None);
        assert_eq!(StreamId::parse("99999999999999999999-0"), None);
        let now = 1769920000200;
        for (name, last, want) in [
            ("none finished", None, ("0", false)),
            ("a past entry", Some(b), ("1769920000123-10", false)),
            (
                "within the slack",
                StreamId::parse("1769920005200-0"),
                ("1769920005200-0", false),
            ),
            (
                "ahead of the clock",
                StreamId::parse("9999999999999-0"),
                ("0", true),
            ),
        ] {
            let (at, ahead) = recreate_at(last, now);
            assert_eq!((at.as_str(), ahead), want, "{name}");
        }
    }

    #[test]
    fn parses_xreadgroup_replies() {
        let b = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let v = Value::Array(vec![Value::Array(vec![
            b(crate::redis::keys::PLAN_STREAM),
            Value::Array(vec![
                Value::Array(vec![b("5-0"), Value::Array(vec![b("plan_id"), b("p")])]),
                Value::Array(vec![b("6-0"), Value::Nil]),
            ]),
        ])]);
        let e = parse_xread(&v);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].fields.as_ref().unwrap()["plan_id"], "p");
        assert!(e[1].fields.is_none());
        assert!(parse_xread(&Value::Nil).is_empty());
        assert_eq!(entry_ms("1769920000123-4"), Some(1769920000123));
    }

    #[test]
    fn nogroup_errors_are_told_apart() {
        let e = redis::RedisError::from((
            redis::ErrorKind::ResponseError,
            "NOGROUP",
            format!(
                "No such key '{}' or consumer group 'p33'",
                crate::redis::keys::PLAN_STREAM
            ),
        ));
        assert!(matches!(StreamError::from(e), StreamError::NoGroup(_)));
        let e = redis::RedisError::from((redis::ErrorKind::IoError, "broken pipe"));
        assert!(matches!(StreamError::from(e), StreamError::Transient(_)));
    }
}
