//! Which worker serves a request: the worker registry, its health checks, circuit breakers and
//! load scrapes, and the routing policies.

mod breaker;
mod health;
mod load;
mod policy;
mod registry;
mod scrape;
mod worker;

pub use breaker::{Admission, BreakerSettings, BreakerStats};
pub use health::{probe_all, run_health_checks};
pub use load::Load;
pub use policy::{Candidate, Features, LeastLoad, RoutingPolicy};
pub use registry::{Availability, Pick, Registry};
pub use scrape::run_load_scrapes;
pub use worker::{ModelCard, Outstanding, Worker};
