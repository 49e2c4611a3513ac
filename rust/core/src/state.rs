//! Everything a request handler needs, shared by all of them, and whether the gateway wants new
//! requests (`Readiness`); it does not start or stop anything.

use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use tokio::sync::watch;

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
    /// What `/ready` and the gRPC health service answer.
    pub readiness: Readiness,
}

/// Where the gateway is in its life, as a load balancer should see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Built, not yet listening on every port.
    Starting,
    Serving,
    /// Asked to stop: still serving, but telling load balancers to send no more. Final.
    Draining,
}

impl Phase {
    /// The `status` member of `/ready`'s body.
    pub fn name(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Serving => "ready",
            Self::Draining => "draining",
        }
    }
}

/// Starting, then serving, then draining, never back; subscribers learn of each step at once.
/// It says nothing of the workers: that is `/health`'s business.
#[derive(Debug)]
pub struct Readiness {
    phase: watch::Sender<Phase>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self {
            phase: watch::Sender::new(Phase::Starting),
        }
    }
}

impl Readiness {
    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    pub fn is_ready(&self) -> bool {
        self.phase() == Phase::Serving
    }

    /// Starting becomes serving; a gateway already draining stays draining.
    pub fn serving(&self) {
        self.phase.send_if_modified(|phase| {
            let starting = *phase == Phase::Starting;
            if starting {
                *phase = Phase::Serving;
            }
            starting
        });
    }

    /// From now on the gateway is draining; true the first time only.
    pub fn drain(&self) -> bool {
        self.phase.send_if_modified(|phase| {
            let first = *phase != Phase::Draining;
            *phase = Phase::Draining;
            first
        })
    }

    /// A receiver that sees the current phase and wakes on every change.
    pub fn subscribe(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::{Phase, Readiness};

    #[test]
    fn readiness_goes_from_starting_to_serving_to_draining_and_never_back() {
        let readiness = Readiness::default();
        let mut seen = readiness.subscribe();
        assert_eq!(readiness.phase(), Phase::Starting);
        assert!(!readiness.is_ready());
        readiness.serving();
        assert!(readiness.is_ready());
        assert!(seen.has_changed().unwrap_or(false));
        assert_eq!(*seen.borrow_and_update(), Phase::Serving);
        assert!(readiness.drain());
        assert!(!readiness.drain(), "the second drain changes nothing");
        readiness.serving();
        assert_eq!(readiness.phase(), Phase::Draining);
        assert_eq!(*seen.borrow_and_update(), Phase::Draining);
    }

    #[test]
    fn a_gateway_stopped_before_it_served_never_becomes_ready() {
        let readiness = Readiness::default();
        assert!(readiness.drain());
        readiness.serving();
        assert_eq!(readiness.phase().name(), "draining");
    }
}
