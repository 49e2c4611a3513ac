//! Which worker serves a request: the worker registry, its health checks, circuit breakers and
//! load scrapes, and the routing policies.

mod affinity;
mod breaker;
mod health;
mod load;
mod policies;
mod policy;
mod prefix;
mod registry;
mod scrape;
mod worker;

pub use affinity::{AffinityCount, LoadBound, PrefixAffinity};
pub use breaker::{Admission, BreakerSettings, BreakerStats};
pub use health::{probe_all, run_health_checks};
pub use load::Load;
pub use policies::Policies;
pub use policy::{Candidate, Features, LeastLoad, RoundRobin, RoutingPolicy};
pub use prefix::{OwnedPrefix, Prefix};
pub use registry::{Availability, Pick, Registry};
pub use scrape::run_load_scrapes;
pub use worker::{ModelCard, Outstanding, Worker};
