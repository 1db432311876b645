//! The trading state survives Redis's own failures (SPEC §12): a restart
//! without persistence, a failover that lost the write, a `FLUSHALL`. A
//! halt is lifted by a control entry and by nothing else.
//!
//! Each instance keeps the state the control log confirmed ([`Known`]: the
//! global state, every symbol override, the latch) in memory and in
//! `$STATE_DIRECTORY/trading_state.json`, folded from the entries of
//! `quantum:stream:p33.control` in order. Once a second (and at once when
//! the consumer finds Redis unarmed) the guardian reads the state keys,
//! folds the entries written since, restores every key that reads less
//! strict than what it knows (through the change script, as `ctl` does,
//! with `actor=p33-restore@<consumer>`), and sets the marker
//! `quantum:p33:armed`, without which the write script writes no allow.
//! The write script also enforces the stricter of the keys and the known
//! state passed in each batch, so a looser value written by hand is never
//! in force, not even for the second before it is restored.
//!
//! The fold (`known.rs`) and the choice of restores ([`plan`]) are pure and
//! table-tested; the task around them does the reads and writes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::domain::TradingState;
use crate::gate::known::{
    parse_file, save, state_path, valid_id, Known, KnownState, NO_OVERRIDE, RESTORE_ACTOR,
};
use crate::observe::metrics::Metrics;
use crate::operator::control::{self, States};
use crate::redis::keys::{self, CONTROL_STREAM};
use crate::redis::store::{self, Conn};
use crate::text::clip;

/// How long an instance that knows nothing waits for a peer that knows
/// more before it arms with the default (SPEC §12).
pub const FIRST_START_WAIT: Duration = Duration::from_secs(2);

/// How often the keys are checked against what the instance knows.
pub const PERIOD: Duration = Duration::from_secs(1);

/// How often the guardian reads every override key itself (a SCAN); the
/// global key and the known overrides are read every [`PERIOD`], the rest
/// come from the override gauge's own reading (every 5 s or slower).
pub const SCAN_EVERY: Duration = Duration::from_secs(3600);

/// Stricter keys named one by one per pass; the rest are counted.
const STRICTER_LINES: usize = 10;

/// Control entries read per call while catching up.
const PAGE: usize = 1000;

/// What the keys say, taken as known (an armed Redis's keys, or a
/// Redis that a gate of an older version kept).
pub fn known_from_keys(s: &States, latch: Option<String>, last_id: String) -> Known {
    Known {
        global: s.global,
        overrides: s.overrides.iter().cloned().collect(),
        latch: latch.filter(|_| s.global != TradingState::Active),
        last_id,
    }
}

/// One key to put back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restore {
    /// `None`: the global key.
    pub symbol: Option<String>,
    /// The state to write.
    pub to: TradingState,
    /// Why, for the entry's reason and the ERROR line.
    pub why: String,
}

/// A key stricter than what is known (written without a control entry):
/// enforced, and said.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stricter {
    /// `None`: the global key.
    pub symbol: Option<String>,
    /// What the key holds.
    pub key: TradingState,
    /// What is known (`None`: no override).
    pub known: Option<TradingState>,
}

/// What the keys need: every key less strict than what is known is
/// restored (a missing one included); every key stricter is left in force
/// and reported.
pub fn plan(k: &Known, keys_now: &States) -> (Vec<Restore>, Vec<Stricter>) {
    let mut restores = Vec::new();
    let mut stricter = Vec::new();
    let why = |set: bool, v: TradingState| {
        if set {
            format!("the key read {} without a control entry", v.as_str())
        } else {
            "the key was missing".to_string()
        }
    };
    if keys_now.global < k.global {
        restores.push(Restore {
            symbol: None,
            to: k.global,
            why: why(keys_now.global_set, keys_now.global),
        });
    } else if keys_now.global > k.global {
        stricter.push(Stricter {
            symbol: None,
            key: keys_now.global,
            known: Some(k.global),
        });
    }
    let held: BTreeMap<&str, TradingState> = keys_now
        .overrides
        .iter()
        .map(|(s, t)| (s.as_str(), *t))
        .collect();
    for (sym, want) in &k.overrides {
        match held.get(sym.as_str()) {
            Some(v) if v >= want => {
                if v > want {
                    stricter.push(Stricter {
                        symbol: Some(sym.clone()),
                        key: *v,
                        known: Some(*want),
                    });
                }
            }
            v => restores.push(Restore {
                symbol: Some(sym.clone()),
                to: *want,
                why: v.map_or_else(|| why(false, *want), |v| why(true, *v)),
            }),
        }
    }
    for (sym, v) in held {
        if !k.overrides.contains_key(sym) && v != TradingState::Active {
            stricter.push(Stricter {
                symbol: Some(sym.to_string()),
                key: v,
                known: None,
            });
        }
    }
    (restores, stricter)
}

/// What the state file said at start.
enum Loaded {
    /// No file (or no `STATE_DIRECTORY`).
    Nothing,
    /// A file that is not a state: the instance knows nothing, and never
    /// arms with the default on its own.
    Broken,
    /// A state.
    State(Known),
}

fn load(path: Option<&Path>) -> Loaded {
    let Some(path) = path else {
        return Loaded::Nothing;
    };
    match std::fs::read(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Loaded::Nothing,
        Err(e) => {
            error!(
                "trading state: cannot read {}: {e}; this instance knows no state and will not arm Redis with the default (a peer or a readable file must)",
                clip(&path.display().to_string())
            );
            Loaded::Broken
        }
        Ok(bytes) if bytes.len() > 64 * 1024 * 1024 => {
            error!(
                "trading state: {} is larger than 64 MiB; this instance knows no state and will not arm Redis with the default",
                clip(&path.display().to_string())
            );
            Loaded::Broken
        }
        Ok(bytes) => match std::str::from_utf8(&bytes)
            .map_err(|e| e.to_string())
            .and_then(parse_file)
        {
            Ok(k) => {
                info!(
                    "trading state: known from {}: global {}, {} override(s), last control entry {}",
                    clip(&path.display().to_string()),
                    k.global.as_str(),
                    k.overrides.len(),
                    k.last_id
                );
                Loaded::State(k)
            }
            Err(why) => {
                error!(
                    "trading state: {} is not a state file ({}); this instance knows no state and will not arm Redis with the default: move the file away once the state in Redis is right",
                    clip(&path.display().to_string()),
                    clip(&why)
                );
                Loaded::Broken
            }
        },
    }
}

/// The control entries after `after`, oldest first, at most `PAGE`.
async fn entries_after(
    con: &mut Conn,
    after: &str,
) -> Result<Vec<crate::redis::stream::Entry>, redis::RedisError> {
    let v: redis::Value = redis::cmd("XRANGE")
        .arg(CONTROL_STREAM)
        .arg(format!("({after}"))
        .arg("+")
        .arg("COUNT")
        .arg(PAGE)
        .query_async(con)
        .await?;
    Ok(crate::redis::stream::parse_entries(&v))
}

/// The newest control entry's ID (`0-0`: none).
async fn last_entry_id(con: &mut Conn) -> Result<String, redis::RedisError> {
    let v: redis::Value = redis::cmd("XREVRANGE")
        .arg(CONTROL_STREAM)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(con)
        .await
        .or_else(|e| {
            // Not a stream: no entry can be read from it (said elsewhere).
            if e.code() == Some("WRONGTYPE") {
                Ok(redis::Value::Nil)
            } else {
                Err(e)
            }
        })?;
    Ok(crate::redis::stream::parse_entries(&v)
        .into_iter()
        .next()
        .map_or_else(|| "0-0".into(), |e| e.id))
}

/// The guardian's own state across passes.
struct Task {
    cfg: Arc<Config>,
    guardian: Arc<KnownState>,
    metrics: Arc<Metrics>,
    path: Option<PathBuf>,
    /// From the file, until the first pass takes it.
    loaded: Option<Loaded>,
    started: Instant,
    /// What was saved last, so an unchanged state is not rewritten.
    saved: Option<Known>,
    /// When every override key is read again (a SCAN).
    next_scan: Instant,
    /// The stricter keys seen on the last pass: one reported only when it
    /// holds for two passes in a row (a change read between the keys and
    /// the entries is no discrepancy), and only once.
    seen_stricter: BTreeSet<Stricter>,
    said_stricter: BTreeSet<Stricter>,
    armed_said: bool,
    waiting_said: bool,
    said_wrongtype: bool,
    /// Whether the library's absence or refusal was said (once per
    /// outcome, until it is installed again).
    library_said: Option<String>,
}

impl Task {
    /// One pass: keys, entries, restores, the marker. Returns whether
    /// Redis is armed at its end.
    async fn pass(&mut self, con: &mut Conn) -> Result<bool, redis::RedisError> {
        self.install_library(con).await;
        let default = self.cfg.default_trading_state;
        // The keys first, then the entries: a change made between the two
        // reads is folded in before it is compared (a change is one atomic
        // write of its key and its entry). Every second: the global key and
        // the keys of the overrides known. Every override key (a SCAN) only
        // when nothing is known yet, and once an hour: the other override
        // keys (stricter than the control log, set by hand) are those the
        // override gauge read last (every 5 s or slower, SPEC §11).
        let first = self.guardian.known().is_none();
        let scan = first || Instant::now() >= self.next_scan;
        let mut keys_now = if scan {
            let s = control::read_states(con, default).await?;
            self.next_scan = Instant::now() + SCAN_EVERY;
            s
        } else {
            let global = control::read_global(con).await?;
            States {
                global: global.unwrap_or(default),
                global_set: global.is_some(),
                overrides: Vec::new(),
            }
        };
        let armed: bool = redis::cmd("EXISTS")
            .arg(keys::ARMED)
            .query_async(con)
            .await?;
        let latch_key: Option<String> = match redis::cmd("GET")
            .arg(keys::LATCH)
            .query_async::<Option<String>>(con)
            .await
        {
            Ok(v) => v,
            Err(e) if e.kind() == redis::ErrorKind::TypeError => None,
            Err(e) if e.code() == Some("WRONGTYPE") => None,
            Err(e) => return Err(e),
        };
        let mut known = match self.guardian.known() {
            Some(k) => Known::clone(&k),
            None => match self.loaded.take().unwrap_or(Loaded::Nothing) {
                Loaded::State(k) => k,
                other => {
                    let anything = keys_now.global_set || !keys_now.overrides.is_empty();
                    if armed || anything {
                        // A gate put these keys in place (or an older
                        // version kept them): they are the state.
                        let last = last_entry_id(con).await?;
                        known_from_keys(&keys_now, latch_key.clone(), last)
                    } else if matches!(other, Loaded::Broken)
                        || self.started.elapsed() < FIRST_START_WAIT
                    {
                        if !self.waiting_said {
                            self.waiting_said = true;
                            info!(
                                "trading state: none known here and none in Redis; waiting {} s for a peer that knows more before arming with the default",
                                FIRST_START_WAIT.as_secs()
                            );
                        }
                        self.loaded = Some(other);
                        return Ok(false);
                    } else {
                        let last = last_entry_id(con).await?;
                        let mut k = Known::fresh(default);
                        k.last_id = last;
                        k
                    }
                }
            },
        };
        // Every entry written since the last one read.
        for _ in 0..100 {
            let page = match entries_after(con, &known.last_id).await {
                Ok(p) => p,
                Err(e) if e.code() == Some("WRONGTYPE") => {
                    if !self.said_wrongtype {
                        self.said_wrongtype = true;
                        warn!(
                            "trading state: {CONTROL_STREAM} is not a stream; no change can be read from it until it is repaired"
                        );
                    }
                    Vec::new()
                }
                Err(e) => return Err(e),
            };
            let n = page.len();
            for e in page {
                match &e.fields {
                    Some(f) => crate::gate::known::fold(&mut known, &e.id, f),
                    None => known.last_id = e.id.clone(),
                }
            }
            if n < PAGE {
                break;
            }
        }
        if !scan {
            // The keys of the overrides known, a page per MULTI.
            let symbols: Vec<&String> = known.overrides.keys().collect();
            for page in symbols.chunks(1000) {
                let names: Vec<String> = page.iter().map(|s| keys::trading_state(s)).collect();
                for (sym, st) in page.iter().zip(control::read_keys(con, &names).await?) {
                    if let Some(st) = st {
                        keys_now.overrides.push(((*sym).clone(), st));
                    }
                }
            }
            if let Some(seen) = self.guardian.seen_overrides() {
                keys_now.overrides.extend(
                    seen.iter()
                        .filter(|(s, _)| !known.overrides.contains_key(s))
                        .cloned(),
                );
            }
        }
        // The latch as its own key says (only the write script sets it);
        // while the key is missing the known one stands, to be restored.
        if latch_key.as_deref().is_some_and(valid_id) {
            known.latch = latch_key.clone();
        }
        if known.global == TradingState::Active {
            known.latch = None;
        }
        // The follower may have folded a newer entry meanwhile: that stands.
        let known = self.guardian.replace(known);
        self.persist(&known);
        if self.cfg.dry_run {
            // A dry run writes no state (SPEC §14): it only knows.
            self.guardian.mark_ready();
            return Ok(armed);
        }
        let (restores, stricter) = plan(&known, &keys_now);
        for r in &restores {
            self.restore(con, r, &known.last_id, default).await?;
        }
        if let Some(id) = &known.latch {
            if latch_key.is_none() && known.global != TradingState::Active {
                let _: Option<String> = redis::cmd("SET")
                    .arg(keys::LATCH)
                    .arg(id)
                    .arg("NX")
                    .query_async(con)
                    .await?;
            }
        }
        self.report_stricter(stricter);
        if !armed {
            let stamp = format!("{}@{}", self.cfg.consumer_name, store::now_ms() / 1000);
            let _: () = redis::cmd("SET")
                .arg(keys::ARMED)
                .arg(stamp)
                .query_async(con)
                .await?;
            let overrides: Vec<String> = known
                .overrides
                .iter()
                .map(|(s, t)| format!("{s}={}", t.as_str()))
                .collect();
            let how = if self.armed_said {
                "Redis had lost the marker (its data?)"
            } else {
                "at start"
            };
            warn!(
                "trading state: armed Redis ({how}): global {}, overrides [{}]",
                known.global.as_str(),
                clip(&overrides.join(","))
            );
        }
        self.armed_said = true;
        self.guardian.mark_ready();
        Ok(true)
    }

    /// Installs the function library `ctl` calls (SPEC §17) when Redis does
    /// not have it: at start, after Redis lost its data (or an admin's
    /// `FUNCTION FLUSH`), on a new master that never had it. Checked every
    /// pass (`FUNCTION LIST` of one name); a refusal (an ACL without
    /// `FUNCTION`, a Redis older than 7.0) is said once and costs nothing
    /// else: `ctl halt` works without the library.
    async fn install_library(&mut self, con: &mut Conn) {
        let lib = &crate::redis::scripts::LIBRARY;
        match lib.install(con).await {
            Ok(loaded) => {
                if loaded {
                    info!(
                        "redis: installed the function library {} (ctl's changes run as its function {})",
                        lib.name, lib.function
                    );
                }
                self.library_said = None;
            }
            Err(e) => {
                let said = clip(&e.to_string()).into_owned();
                if self.library_said.as_deref() != Some(said.as_str()) {
                    warn!(
                        "redis: cannot install the function library {} ({said}): ctl can halt, but its other changes are refused until a gate installs it (SPEC §17)",
                        lib.name
                    );
                    self.library_said = Some(said);
                }
            }
        }
    }

    /// Puts one key back through the change script (conditional: only
    /// while it still reads looser and no newer entry exists).
    async fn restore(
        &self,
        con: &mut Conn,
        r: &Restore,
        last_id: &str,
        default: TradingState,
    ) -> Result<(), redis::RedisError> {
        let reason = format!("restored: {}", r.why);
        let actor = format!("{RESTORE_ACTOR}{}", self.cfg.consumer_name);
        let done = control::restore(
            con,
            r.symbol.as_deref(),
            r.to,
            &reason,
            &actor,
            default,
            last_id,
        )
        .await;
        let scope = if r.symbol.is_some() {
            "symbol"
        } else {
            "global"
        };
        match done {
            Ok(Some(entry)) => {
                self.metrics
                    .trading_state_restored_total
                    .with_label_values(&[scope])
                    .inc();
                error!(
                    "P3.3 trading state {} restored {} -> {} ({}); control entry {}",
                    entry.scope_label(),
                    clip(&entry.from),
                    entry.to,
                    clip(&r.why),
                    entry.id
                );
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) if e.code() == Some(control::CONTROL_ERROR) => {
                error!(
                    "P3.3 trading state {}: cannot restore {} ({}): {}",
                    r.symbol.as_deref().unwrap_or("global"),
                    r.to.as_str(),
                    clip(&r.why),
                    clip(e.detail().unwrap_or(""))
                );
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Says each stricter key once, when it held on two passes in a row:
    /// at most [`STRICTER_LINES`] lines a pass, then one line counting the
    /// rest (50,000 keys set by hand are one line, not 50,000).
    fn report_stricter(&mut self, now: Vec<Stricter>) {
        let now: BTreeSet<Stricter> = now.into_iter().collect();
        let new: Vec<&Stricter> = now
            .iter()
            .filter(|s| self.seen_stricter.contains(s) && !self.said_stricter.contains(s))
            .collect();
        for s in new.iter().take(STRICTER_LINES) {
            warn!(
                "P3.3 trading state {}: the key reads {} without a control entry (known: {}); enforced (fail closed) until a control entry says otherwise",
                s.symbol
                    .as_deref()
                    .map_or_else(|| "global".to_string(), |x| format!("symbol:{x}")),
                s.key.as_str(),
                s.known.map_or(NO_OVERRIDE, TradingState::as_str)
            );
        }
        if new.len() > STRICTER_LINES {
            warn!(
                "P3.3 trading state: {} more keys read stricter than the control log without a control entry; enforced (fail closed)",
                new.len() - STRICTER_LINES
            );
        }
        let new: Vec<Stricter> = new.into_iter().cloned().collect();
        self.said_stricter.retain(|s| now.contains(s));
        self.said_stricter.extend(new);
        self.seen_stricter = now;
    }

    fn persist(&mut self, k: &Known) {
        if self.saved.as_ref() == Some(k) {
            return;
        }
        if let Some(path) = &self.path {
            if let Err(e) = save(path, k) {
                warn!(
                    "trading state: cannot write {}: {e}; known in memory only",
                    clip(&path.display().to_string())
                );
                return;
            }
        }
        self.saved = Some(k.clone());
    }
}

/// Keeps the trading state in place until `cancel` fires: a pass every
/// second, and at once when woken.
pub async fn run(
    cfg: Arc<Config>,
    redis: store::Redis,
    guardian: Arc<KnownState>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let path = state_path(cfg.state_directory.as_deref());
    let loaded = load(path.as_deref());
    let mut task = Task {
        cfg,
        guardian: guardian.clone(),
        metrics,
        path,
        loaded: Some(loaded),
        started: Instant::now(),
        saved: None,
        next_scan: Instant::now(),
        seen_stricter: BTreeSet::new(),
        said_stricter: BTreeSet::new(),
        armed_said: false,
        waiting_said: false,
        said_wrongtype: false,
        library_said: None,
    };
    let Some(mut con) = redis
        .connect("trading state guardian", Duration::from_secs(5), &cancel)
        .await
    else {
        return;
    };
    let mut failures = 0u64;
    loop {
        match task.pass(&mut con).await {
            Ok(armed) => {
                failures = 0;
                task.metrics.trading_state_armed.set(i64::from(armed));
            }
            Err(e) => {
                failures += 1;
                task.metrics.trading_state_armed.set(0);
                if failures <= 3 || failures.is_multiple_of(60) {
                    warn!("trading state: a pass failed ({failures} in a row): {e}");
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = guardian.woken() => {}
            _ = tokio::time::sleep(PERIOD) => {}
        }
    }
}

#[cfg(test)]
#[cfg(test)]
mod tests {
    use super::*;
    use TradingState::*;

    fn states(global: Option<TradingState>, overrides: &[(&str, TradingState)]) -> States {
        States {
            global: global.unwrap_or(Active),
            global_set: global.is_some(),
            overrides: overrides.iter().map(|(s, t)| (s.to_string(), *t)).collect(),
        }
    }

    #[test]
    fn the_plan_restores_looser_keys_and_leaves_stricter_ones() {
        let mut known = Known::fresh(Active);
        known.global = Halted;
        known.overrides.insert("BTCUSDT".into(), Reducing);
        type Want<'a> = Vec<(Option<&'a str>, TradingState, &'a str)>;
        let cases: Vec<(&str, States, Want<'_>, usize)> = vec![
            (
                "everything lost",
                states(None, &[]),
                vec![
                    (None, Halted, "the key was missing"),
                    (Some("BTCUSDT"), Reducing, "the key was missing"),
                ],
                0,
            ),
            (
                "in place",
                states(Some(Halted), &[("BTCUSDT", Reducing)]),
                vec![],
                0,
            ),
            (
                "loosened by hand",
                states(Some(Active), &[("BTCUSDT", Active)]),
                vec![
                    (None, Halted, "the key read ACTIVE without a control entry"),
                    (
                        Some("BTCUSDT"),
                        Reducing,
                        "the key read ACTIVE without a control entry",
                    ),
                ],
                0,
            ),
            (
                "stricter by hand",
                states(Some(Halted), &[("BTCUSDT", Halted), ("ETHUSDT", Reducing)]),
                vec![],
                2,
            ),
        ];
        for (name, keys_now, want, n_stricter) in cases {
            let (r, s) = plan(&known, &keys_now);
            let got: Vec<(Option<&str>, TradingState, &str)> = r
                .iter()
                .map(|r| (r.symbol.as_deref(), r.to, r.why.as_str()))
                .collect();
            assert_eq!(got, want, "{name}");
            assert_eq!(s.len(), n_stricter, "{name}");
        }
        // The default global (missing key) is no restore when it is known.
        let (r, _) = plan(&Known::fresh(Active), &states(None, &[]));
        assert!(r.is_empty());
    }
}
