//! What an instance knows of the trading state (SPEC §12): the state the
//! control log confirmed — the global state, every symbol override, the
//! latch — folded from the entries of `quantum:stream:p33.control` in order,
//! kept in memory ([`KnownState`], shared by the follower, the guardian, the
//! consumer and the metrics) and in `$STATE_DIRECTORY/trading_state.json`.
//! Pure but for the file; the guardian (`guardian.rs`) does the Redis side.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::domain::TradingState;
use crate::redis::keys;
use crate::text::clip;

/// The spelling of "no override" in control entries (`from`/`to` of a
/// symbol whose key is missing).
pub const NO_OVERRIDE: &str = "NONE";

/// The actor of a restore's control entry.
pub const RESTORE_ACTOR: &str = "p33-restore@";

/// The state file's name under `$STATE_DIRECTORY`.
pub const STATE_FILE: &str = "trading_state.json";

/// The state the control log confirmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    /// The global state.
    pub global: TradingState,
    /// Per-symbol overrides.
    pub overrides: BTreeMap<String, TradingState>,
    /// The throttle latch's entry ID, while it holds.
    pub latch: Option<String>,
    /// The last control entry folded in (`0-0`: none).
    pub last_id: String,
}

impl Known {
    /// Nothing set: the default global state, no override.
    pub fn fresh(default: TradingState) -> Known {
        Known {
            global: default,
            overrides: BTreeMap::new(),
            latch: None,
            last_id: "0-0".into(),
        }
    }

    /// A symbol's state in force: the stricter of global and override.
    pub fn of(&self, symbol: &str) -> TradingState {
        self.overrides
            .get(symbol)
            .map_or(self.global, |s| (*s).max(self.global))
    }
}

/// The state file's shape (versioned, strings as the keys hold them).
#[derive(Debug, Serialize, Deserialize)]
struct File {
    version: u32,
    global: String,
    overrides: BTreeMap<String, String>,
    latch: Option<String>,
    last_id: String,
}

impl From<&Known> for File {
    fn from(k: &Known) -> File {
        File {
            version: 1,
            global: k.global.as_str().into(),
            overrides: k
                .overrides
                .iter()
                .map(|(s, t)| (s.clone(), t.as_str().into()))
                .collect(),
            latch: k.latch.clone(),
            last_id: k.last_id.clone(),
        }
    }
}

/// Reads a state file's text. A value that is not a state reads HALTED,
/// as a stored one does (fail closed); a file that is not this shape is an
/// error, never an empty state.
pub fn parse_file(text: &str) -> Result<Known, String> {
    let f: File = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if f.version != 1 {
        return Err(format!("version {} is not 1", f.version));
    }
    if f.overrides.len() > 100_000 {
        return Err("more than 100,000 overrides".into());
    }
    let mut overrides = BTreeMap::new();
    for (sym, st) in f.overrides {
        if !keys::valid_symbol(&sym) {
            return Err(format!("{:?} is not a symbol", clip(&sym)));
        }
        overrides.insert(sym, TradingState::from_stored(&st));
    }
    Ok(Known {
        global: TradingState::from_stored(&f.global),
        overrides,
        latch: f.latch.filter(|l| valid_id(l)),
        last_id: if valid_id(&f.last_id) {
            f.last_id
        } else {
            "0-0".into()
        },
    })
}

/// A stream entry ID as numbers, for ordering (`(0, 0)`: not an ID).
pub fn id_order(id: &str) -> (u64, u64) {
    id.split_once('-')
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
        .unwrap_or((0, 0))
}

/// Whether `id` is a stream entry ID (`<ms>-<seq>`).
pub fn valid_id(id: &str) -> bool {
    id.split_once('-').is_some_and(|(a, b)| {
        !a.is_empty()
            && !b.is_empty()
            && a.len() <= 20
            && b.len() <= 20
            && a.bytes().chain(b.bytes()).all(|c| c.is_ascii_digit())
    })
}

/// Folds one control entry into what is known. A revocation's
/// confirmation (`ref`, or `kind` other than `change`) changes no state;
/// an entry of no known scope is skipped. The throttle latch is taken from
/// its own key (which only the write script sets), never from an entry
/// naming `p33-auto` (anyone who can write the stream can write that); a
/// global change by anyone but the daemon itself ends it.
pub fn fold(k: &mut Known, id: &str, f: &HashMap<String, String>) {
    k.last_id = id.to_string();
    let g = |n: &str| f.get(n).map_or("", String::as_str);
    if f.contains_key("ref") || !matches!(g("kind"), "" | "change") {
        return;
    }
    let to = g("to");
    match g("scope") {
        "global" => {
            k.global = TradingState::from_stored(to);
            let actor = g("actor");
            if actor != "p33-auto" && !actor.starts_with(RESTORE_ACTOR) {
                k.latch = None;
            }
        }
        "symbol" if keys::valid_symbol(g("symbol")) => {
            let sym = g("symbol").to_string();
            if to.trim().eq_ignore_ascii_case(NO_OVERRIDE) {
                k.overrides.remove(&sym);
            } else {
                k.overrides.insert(sym, TradingState::from_stored(to));
            }
        }
        _ => {}
    }
}

/// Override keys as read: (symbol, state), shared without copying.
pub type Overrides = std::sync::Arc<Vec<(String, TradingState)>>;

/// The known state, shared by the control follower (which folds each entry
/// as it reads it, before it revokes), the guardian, the consumer (whose
/// batches pass it to the write script) and the metrics.
#[derive(Debug)]
pub struct KnownState {
    /// Every override key as the override gauge last read it (its own
    /// pace): what the guardian compares the control log with, beyond the
    /// overrides it knows, without reading them all again.
    seen: Mutex<Option<Overrides>>,
    /// Shared, not copied: the consumer takes it for every batch.
    known: Mutex<Option<std::sync::Arc<Known>>>,
    ready: watch::Sender<bool>,
    wake: Notify,
}

impl Default for KnownState {
    fn default() -> Self {
        KnownState {
            seen: Mutex::new(None),
            known: Mutex::new(None),
            ready: watch::channel(false).0,
            wake: Notify::new(),
        }
    }
}

impl KnownState {
    /// What is known (`None` before the first pass settled it): a shared
    /// reference, never a copy of every override.
    pub fn known(&self) -> Option<std::sync::Arc<Known>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Takes `k` unless what is held already folds a newer entry (the
    /// follower may have folded one while the guardian read); what is held
    /// then.
    pub fn replace(&self, k: Known) -> std::sync::Arc<Known> {
        let mut held = self.known.lock().unwrap_or_else(|p| p.into_inner());
        match held.as_ref() {
            Some(cur) if id_order(&cur.last_id) > id_order(&k.last_id) => cur.clone(),
            _ => {
                let k = std::sync::Arc::new(k);
                *held = Some(k.clone());
                k
            }
        }
    }

    /// Folds one entry the control follower read, if it is newer than
    /// what is known (nothing while nothing is known yet).
    pub fn observe(&self, id: &str, f: &HashMap<String, String>) {
        let mut held = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = held.as_mut() {
            if id_order(id) > id_order(&k.last_id) {
                fold(std::sync::Arc::make_mut(k), id, f);
            }
        }
    }

    /// The override keys as the gauge read them.
    pub fn set_seen_overrides(&self, v: Vec<(String, TradingState)>) {
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::sync::Arc::new(v));
    }

    /// The override keys the gauge read last.
    pub fn seen_overrides(&self) -> Option<Overrides> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The state is known: plans may be read.
    pub fn mark_ready(&self) {
        self.ready.send_replace(true);
    }

    /// Resolves when a pass is asked for.
    pub async fn woken(&self) {
        self.wake.notified().await;
    }

    /// Asks for a pass now (the consumer found Redis unarmed).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Waits until the state is known, or `cancel`.
    pub async fn wait_known(&self, cancel: &CancellationToken) {
        let mut rx = self.ready.subscribe();
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = rx.wait_for(|r| *r) => {}
        }
    }
}

/// `$STATE_DIRECTORY/trading_state.json` (the first directory systemd
/// names), or `None` without `STATE_DIRECTORY`.
pub fn state_path(dir: Option<&str>) -> Option<PathBuf> {
    let first = dir?.split(':').next().filter(|d| !d.is_empty())?;
    Some(Path::new(first).join(STATE_FILE))
}

/// Writes the state file atomically (a temporary file, synced, renamed).
pub fn save(path: &Path, k: &Known) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(&File::from(k))?;
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&text)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use TradingState::*;

    fn entry(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_fold_follows_changes_and_nothing_else() {
        type Row<'a> = (
            &'a str,
            &'a [(&'a str, &'a str)],
            TradingState,
            &'a [(&'a str, TradingState)],
            bool,
        );
        let cases: &[Row<'_>] = &[
            (
                "a global halt",
                &[("scope", "global"), ("to", "HALTED"), ("actor", "op@h")],
                Halted,
                &[],
                false,
            ),
            (
                "a symbol reduce",
                &[
                    ("scope", "symbol"),
                    ("symbol", "BTCUSDT"),
                    ("to", "REDUCING"),
                ],
                Active,
                &[("BTCUSDT", Reducing)],
                false,
            ),
            (
                "a confirmation changes nothing",
                &[
                    ("scope", "global"),
                    ("from", "HALTED"),
                    ("to", "HALTED"),
                    ("ref", "1-0"),
                ],
                Active,
                &[],
                false,
            ),
            (
                "a kind other than change changes nothing",
                &[("kind", "revoked"), ("scope", "global"), ("to", "HALTED")],
                Active,
                &[],
                false,
            ),
            (
                "an explicit change",
                &[("kind", "change"), ("scope", "global"), ("to", "REDUCING")],
                Reducing,
                &[],
                false,
            ),
            (
                "a value that is no state is HALTED",
                &[("scope", "global"), ("to", "paused")],
                Halted,
                &[],
                false,
            ),
            (
                "an entry naming p33-auto is no latch",
                &[
                    ("scope", "global"),
                    ("to", "REDUCING"),
                    ("actor", "p33-auto"),
                ],
                Reducing,
                &[],
                false,
            ),
            (
                "a bad symbol is skipped",
                &[
                    ("scope", "symbol"),
                    ("symbol", "btc usdt"),
                    ("to", "HALTED"),
                ],
                Active,
                &[],
                false,
            ),
            (
                "no scope is skipped",
                &[("to", "HALTED")],
                Active,
                &[],
                false,
            ),
        ];
        for (name, f, global, overrides, latch) in cases {
            let mut k = Known::fresh(Active);
            fold(&mut k, "5-0", &entry(f));
            assert_eq!(k.global, *global, "{name}");
            let want: BTreeMap<String, TradingState> =
                overrides.iter().map(|(s, t)| (s.to_string(), *t)).collect();
            assert_eq!(k.overrides, want, "{name}");
            assert_eq!(k.latch.is_some(), *latch, "{name}");
            assert_eq!(k.last_id, "5-0", "{name}");
        }
        // A symbol resume removes the override; an operator's global change
        // ends the latch (taken from its key), its own entry and a restore
        // do not.
        let mut k = Known::fresh(Active);
        k.latch = Some("2-0".into());
        fold(
            &mut k,
            "1-0",
            &entry(&[("scope", "symbol"), ("symbol", "ETHUSDT"), ("to", "HALTED")]),
        );
        fold(
            &mut k,
            "2-0",
            &entry(&[
                ("scope", "global"),
                ("to", "REDUCING"),
                ("actor", "p33-auto"),
            ]),
        );
        fold(
            &mut k,
            "3-0",
            &entry(&[
                ("scope", "global"),
                ("to", "REDUCING"),
                ("actor", "p33-restore@a"),
            ]),
        );
        assert_eq!(k.latch.as_deref(), Some("2-0"));
        fold(
            &mut k,
            "4-0",
            &entry(&[("scope", "symbol"), ("symbol", "ETHUSDT"), ("to", "NONE")]),
        );
        fold(
            &mut k,
            "5-0",
            &entry(&[("scope", "global"), ("to", "ACTIVE"), ("actor", "op@h")]),
        );
        assert_eq!(
            k,
            Known {
                last_id: "5-0".into(),
                ..Known::fresh(Active)
            }
        );
    }

    #[test]
    fn the_state_file_round_trips_and_a_bad_one_is_an_error() {
        let mut k = Known::fresh(Active);
        k.global = Reducing;
        k.overrides.insert("BTCUSDT".into(), Halted);
        k.latch = Some("17-0".into());
        k.last_id = "17-3".into();
        let dir = std::env::temp_dir().join(format!("p33-guardian-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(STATE_FILE);
        save(&path, &k).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(parse_file(&text).unwrap(), k);
        std::fs::remove_dir_all(&dir).unwrap();
        for bad in [
            "",
            "{}",
            "[1]",
            r#"{"version":2,"global":"ACTIVE","overrides":{},"latch":null,"last_id":"0-0"}"#,
            r#"{"version":1,"global":"ACTIVE","overrides":{"bad sym":"HALTED"},"latch":null,"last_id":"0-0"}"#,
        ] {
            assert!(parse_file(bad).is_err(), "{bad}");
        }
        let odd = parse_file(
            r#"{"version":1,"global":"whatever","overrides":{},"latch":"x","last_id":"nope"}"#,
        )
        .unwrap();
        assert_eq!(
            (odd.global, odd.latch, odd.last_id.as_str()),
            (Halted, None, "0-0")
        );
        assert_eq!(
            state_path(Some("/var/lib/a:/var/lib/b")),
            Some(PathBuf::from("/var/lib/a").join(STATE_FILE))
        );
        assert_eq!(state_path(Some("")), None);
        assert_eq!(state_path(None), None);
    }

    #[test]
    fn entry_ids_order_as_numbers() {
        assert!(id_order("10-0") > id_order("9-5"));
        assert!(id_order("10-10") > id_order("10-9"));
        assert_eq!(id_order("nope"), (0, 0));
        let k = KnownState::default();
        k.replace(Known {
            last_id: "5-0".into(),
            ..Known::fresh(Active)
        });
        // An older pass does not replace a newer fold.
        let older = Known {
            global: Halted,
            last_id: "4-0".into(),
            ..Known::fresh(Active)
        };
        assert_eq!(k.replace(older).global, Active);
        k.observe("6-0", &entry(&[("scope", "global"), ("to", "HALTED")]));
        k.observe("3-0", &entry(&[("scope", "global"), ("to", "ACTIVE")]));
        assert_eq!(k.known().unwrap().global, Halted);
    }
}
