//! Which worker serves a request: the worker registry, its health checks and the routing policy.

mod health;
mod load;
mod registry;
mod worker;

pub use health::{probe_all, run_health_checks};
pub use load::{Load, run_load_scrapes};
pub use registry::{Availability, Registry};
pub use worker::{Outstanding, Worker};
