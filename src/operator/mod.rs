//! The operator's side (SPEC §12–§14, §17): the trading state and its kill
//! switch (`control`: read, change, follow; `guardian`: what Redis lost put
//! back and armed), the `ctl` command line, the decision record's readers
//! (`explain`, `replay`), the instance report (`instance`) and the ACL
//! users (`acl`). It may import the gate, the allowlist, observability,
//! configuration, Redis and the vocabulary; only `exchange/` (a liquidation
//! tightens a symbol through the control path) and `app/` import it.

pub mod acl;
mod change;
pub mod control;
pub mod ctl;
pub mod explain;
pub mod guardian;
pub mod instance;
pub mod replay;
mod states;
