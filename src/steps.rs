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
