//! The step-size table (SPEC §5 "Step size"): written by the exchangeInfo
//! loader, read lock-free by plan handling.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use rust_decimal::Decimal;

/// The step-size table, shared lock-free with plan handling.
#[derive(Clone, Default)]
pub struct StepSizes {
    table: Arc<ArcSwap<HashMap<String, Decimal>>>,
    warned: Arc<Mutex<HashSet<String>>>,
}

impl StepSizes {
    /// The step of `symbol`, if the exchange gave one.
    pub fn get(&self, symbol: &str) -> Option<Decimal> {
        self.table.load().get(symbol).copied()
    }
    /// Whether no step is known.
    pub fn is_empty(&self) -> bool {
        self.table.load().is_empty()
    }
    /// Replaces the table.
    pub fn set(&self, t: HashMap<String, Decimal>) {
        self.table.store(Arc::new(t));
    }
    /// True the first time it is called for `symbol` (one WARN per symbol).
    pub fn warn_once(&self, symbol: &str) -> bool {
        self.warned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(symbol.to_string())
    }
}

/// The allowlisted symbols that hold a position (SPEC §13, the position
/// cap): the poller's view in `binance` mode, a read of the snapshots at
/// most once a second in `external` mode.
#[derive(Clone, Default)]
pub struct Positioned {
    inner: Arc<Mutex<Option<View>>>,
}

/// The symbols, and when they were seen.
type View = (Arc<Vec<String>>, std::time::Instant);

impl Positioned {
    /// Replaces the view.
    pub fn set(&self, mut symbols: Vec<String>) {
        symbols.sort();
        *self.inner.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Arc::new(symbols), std::time::Instant::now()));
    }

    /// The view, if it is at most `max_age` old.
    pub fn fresh(&self, max_age: std::time::Duration) -> Option<Arc<Vec<String>>> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.as_ref()
            .filter(|(_, at)| at.elapsed() <= max_age)
            .map(|(v, _)| v.clone())
    }

    /// The latest view, however old.
    pub fn latest(&self) -> Option<Arc<Vec<String>>> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.as_ref().map(|(v, _)| v.clone())
    }
}
