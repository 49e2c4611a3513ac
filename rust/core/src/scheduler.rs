//! Where an admitted request gets its worker: the scheduler places each attempt, asking its
//! routing policy to choose among the eligible workers from the request's features and each
//! worker's load. Today it places at once (no queue); admission queues and fair sharing between
//! tenants go here.

use std::sync::Arc;

use crate::request::InferenceRequest;
use crate::router::{Features, LeastLoad, Registry, RoutingPolicy, Worker};

#[derive(Debug)]
pub struct Scheduler {
    registry: Arc<Registry>,
    policy: Box<dyn RoutingPolicy>,
}

impl Scheduler {
    pub fn new(registry: Arc<Registry>, policy: Box<dyn RoutingPolicy>) -> Self {
        Self { registry, policy }
    }

    /// Least-loaded routing over `registry`.
    pub fn least_load(registry: Arc<Registry>) -> Self {
        Self::new(registry, Box::new(LeastLoad::default()))
    }

    /// The worker for the next attempt at `request`, never one whose registry index is in
    /// `tried`; `None` when no eligible worker is left.
    pub async fn place(
        &self,
        request: &InferenceRequest,
        tried: &[usize],
    ) -> Option<(usize, Arc<Worker>)> {
        self.registry
            .pick(self.policy.as_ref(), &Features::of(request), tried)
    }
}
