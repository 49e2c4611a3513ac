//! Everything a request handler needs, shared by all of them.

use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;

use crate::auth::KeyStore;
use crate::coalesce::Coalescer;
use crate::config::GatewayConfig;
use crate::ledger::UsageReader;
use crate::metering::Meter;
use crate::quota::Quota;
use crate::router::{Fleet, Policies, Registry, Resolver};
use crate::scheduler::Scheduler;
use crate::upstream::Upstream;

#[derive(Debug)]
pub struct AppState {
    /// In effect now: a reload swaps it (what needs a restart keeps its value from the start).
    pub config: ArcSwap<GatewayConfig>,
    pub keys: KeyStore,
    pub registry: Arc<Registry>,
    /// Makes the registry's set from the configured workers and DNS names.
    pub fleet: Arc<Fleet>,
    pub resolver: Arc<Resolver>,
    pub scheduler: Scheduler,
    /// The routing policies the scheduler places by, for `/metrics` to read their tallies.
    pub policies: Arc<Policies>,
    pub upstream: Upstream,
    /// Present when `routing.coalesce_window_us` turns coalescing on.
    pub coalescer: Option<Arc<Coalescer>>,
    pub meter: Arc<Meter>,
    pub quota: Arc<Quota>,
    /// How the gRPC usage service reads the ledger; installed by the control plane.
    pub usage_reader: OnceLock<Arc<dyn UsageReader>>,
}
