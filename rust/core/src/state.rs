//! Everything a request handler needs, shared by all of them.

use std::sync::{Arc, OnceLock};

use crate::auth::KeyStore;
use crate::coalesce::Coalescer;
use crate::config::GatewayConfig;
use crate::ledger::UsageReader;
use crate::metering::Meter;
use crate::quota::Quota;
use crate::router::{Policies, Registry};
use crate::scheduler::Scheduler;
use crate::upstream::Upstream;

#[derive(Debug)]
pub struct AppState {
    pub config: GatewayConfig,
    pub keys: KeyStore,
    pub registry: Arc<Registry>,
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
