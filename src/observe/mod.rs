//! Observability (SPEC §9–§11): the metrics registry (`metrics`), logging
//! (`telemetry`: text or JSON, journald priorities, capped lines) and the
//! watchdog that says a stage has stopped making progress (`watchdog`). It
//! may import configuration, Redis's key map and the vocabulary; every
//! stage above reports through it.

pub mod metrics;
pub mod telemetry;
pub mod watchdog;
