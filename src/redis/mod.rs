//! Redis, the pipeline's one shared store (SPEC §1, §4, §15, §17): every
//! key and stream name (`keys`, the key map), connections that survive
//! outages and follow a Sentinel failover (`store`, with `sentinel`
//! discovery over the small RESP client `resp`), the one consumer-group
//! reader the workers are handlers of (`stream`), the Lua scripts and the
//! function library (`scripts`, `scripts/*.lua`), and the connection
//! settings (`target`). The bottom of the house above the vocabulary: it
//! imports only `domain` and `text`.

pub mod keys;
mod resp;
pub(crate) mod scripts;
pub mod sentinel;
pub mod store;
pub mod stream;
pub mod target;
