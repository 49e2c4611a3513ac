//! tokengate's data plane: the OpenAI-compatible gateway and the vLLM-protocol simulator.
//!
//! Pure Rust, no Python: the `gateway._core` extension (rust/python) is only the boundary.

pub mod api;
pub mod auth;
pub mod config;
pub mod error;
pub mod gateway;
pub mod grpc;
pub mod journal;
pub mod json;
#[cfg(test)]
mod json_props;
pub mod metering;
pub mod metrics;
pub(crate) mod prometheus;
pub mod quota;
pub mod relay;
pub mod router;
pub mod serve;
pub mod sim;
pub mod state;
pub mod upstream;

pub use gateway::Gateway;
