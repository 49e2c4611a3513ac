//! Which worker serves a request: the worker registry, its health checks, circuit breakers and
//! load scrapes, the fleet's changes (DNS discovery, reloads), and the routing policies.

mod affinity;
mod breaker;
mod discovery;
mod fleet;
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
pub use discovery::Resolver;
pub use fleet::{Change, Fleet};
pub use health::{probe, probe_all, run_health_checks};
pub use load::Load;
pub use policies::Policies;
pub use policy::{Candidate, Features, LeastLoad, RoundRobin, RoutingPolicy};
pub use prefix::{OwnedPrefix, Prefix};
pub use registry::{Availability, Pick, Registry};
pub use scrape::run_load_scrapes;
pub use worker::{ModelCard, Outstanding, Worker, WorkerId};
