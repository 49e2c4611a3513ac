//! Per-tenant and per-key quotas: rate limits, concurrency, budgets and model allow-lists,
//! enforced at admission and settled to the metered usage when a request ends.

// Every number here may have come from a client or a worker: no arithmetic on one may wrap.
#![deny(clippy::arithmetic_side_effects)]

mod admission;
mod demand;
mod enforcer;
mod gcra;
mod local;
mod policy;
#[cfg(test)]
mod props;
mod redis;
mod reservation;

pub use admission::{COUNT_CAP, Demand, Exceeded, RateHeaders, Refusal, format_reset};
pub use demand::Estimate;
pub use enforcer::{Quota, QuotaError, QuotaStats};
pub use gcra::RateInfo;
pub use policy::{Limits, Period, PolicySnapshot, Price, QueueShare, Scope};
pub use redis::StoreError;
pub use reservation::Reservation;
