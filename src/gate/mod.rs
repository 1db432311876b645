//! Plans to permits (SPEC §4–§6, §8, §13–§14): the plan consumer
//! (`consumer`) reads a batch and turns each entry into a plan (`intake`), the pure rules (`rules`) judge each plan on
//! typed inputs, the permit writer (`permits`) writes every verdict with its
//! ACK in one script; the decision record (`record`), the ledger follower
//! (`ledger`), the step-size table (`steps`) and the trading state as the
//! gate knows it (`known`). It may import the allowlist, observability,
//! configuration, Redis and the vocabulary, never the operator's tools or
//! the exchange.

pub mod consumer;
mod intake;
pub mod known;
pub mod ledger;
pub mod permits;
pub mod record;
pub mod rules;
pub mod steps;
