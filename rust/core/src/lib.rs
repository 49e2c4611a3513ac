//! tokengate's data plane: the OpenAI-compatible gateway. (The vLLM-protocol simulator is its own
//! crate, `gateway-sim`.)
//!
//! Pure Rust, no Python: the `gateway._core` extension (rust/python) is only the boundary.
//!
//! Layers, bottom first; a module names only modules below it (`layers.rs` checks it):
//! 1. foundations: `json`, `error`, `serve`, `thread_class` (the scheduling class of background
//!    threads);
//! 2. the domain: `request` (what a client asks), `usage` (the usage event it is billed by);
//! 3. parts: `config`, `telemetry` (traces), `upstream`, `auth`, `journal`, `ledger`, `router`,
//!    `quota`, `metrics`, `metering`, `relay`;
//! 4. the pipeline: `scheduler`, `coalesce` (completions that share a call), `state`, `pipeline`
//!    (admission, attempts, the typed outcome);
//! 5. surfaces, which render the outcome: `api` (HTTP), `grpc`;
//! 6. the whole: `gateway`.

pub mod api;
pub mod auth;
pub mod coalesce;
pub mod config;
pub mod error;
pub mod gateway;
pub mod grpc;
pub mod journal;
pub mod json;
#[cfg(test)]
mod json_props;
#[cfg(test)]
mod layers;
pub mod ledger;
pub mod metering;
pub mod metrics;
pub(crate) mod pipeline;
pub mod quota;
pub mod relay;
pub mod request;
#[cfg(test)]
mod request_props;
pub mod router;
pub mod scheduler;
pub mod serve;
pub mod state;
pub mod telemetry;
pub mod thread_class;
pub mod upstream;
pub mod usage;

pub use gateway::{Control, Gateway, Reloaded, WorkerStatus};
