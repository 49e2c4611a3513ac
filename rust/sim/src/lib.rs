//! `gateway sim`: a vLLM-protocol worker simulator with configurable latency, capacity and
//! failures, whose `/metrics` counters let the gateway's metering be checked to the token.
//!
//! This file only declares and re-exports; it simulates no model quality, only vLLM's wire
//! behaviour and timing.

mod config;
mod embedding;
mod engine;
mod exposition;
mod faults;
mod handlers;
mod hold;
mod metrics;
mod plan;
mod request;
mod response;
mod sse;
#[cfg(test)]
mod test_support;
mod tokens;
mod traces;

pub use config::{SimConfig, SimConfigError};
pub use handlers::app;
