//! The routing policy of each model: one default (`routing.policy`) and per-model overrides
//! (`[routing.models."<model>"]`), behind the one `RoutingPolicy` the scheduler holds.
//!
//! A model without an override costs one emptiness check before its policy runs. Each policy is
//! one instance for every model that uses it (`prefix_affinity` keeps its tallies per model). A
//! reload changes the policies (`configure`) and a change of the fleet the workers
//! (`set_workers`) with every tally kept. It does not read the configuration file; the control
//! plane resolved it.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::affinity::{AffinityCount, LoadBound, PrefixAffinity};
use super::policy::{Candidate, Features, LeastLoad, RoundRobin, RoutingPolicy};
use super::registry::Registry;
use super::worker::Worker;
use crate::config::{PolicyKind, RoutingConfig};

/// Which policy routes which model.
#[derive(Debug)]
struct Selection {
    default: PolicyKind,
    by_model: HashMap<Box<str>, PolicyKind>,
}

impl Selection {
    fn of(routing: &RoutingConfig) -> Self {
        Self {
            default: routing.policy,
            by_model: routing
                .models
                .iter()
                .filter_map(|(model, settings)| Some((Box::from(model.as_str()), settings.policy?)))
                .collect(),
        }
    }
}

fn bound(routing: &RoutingConfig) -> LoadBound {
    LoadBound {
        factor: routing.affinity_load_factor,
        floor: usize::try_from(routing.affinity_load_floor).unwrap_or(usize::MAX),
    }
}

#[derive(Debug)]
pub struct Policies {
    selection: ArcSwap<Selection>,
    least_load: LeastLoad,
    round_robin: RoundRobin,
    prefix_affinity: PrefixAffinity,
}

impl Policies {
    /// As `routing` says, over `registry`'s workers.
    pub fn new(routing: &RoutingConfig, registry: &Registry) -> Self {
        Self {
            selection: ArcSwap::from_pointee(Selection::of(routing)),
            least_load: LeastLoad::default(),
            round_robin: RoundRobin::default(),
            prefix_affinity: PrefixAffinity::new(&registry.workers(), bound(routing)),
        }
    }

    /// The policies and bounds `routing` says, from the next request on.
    pub fn configure(&self, routing: &RoutingConfig) {
        self.selection.store(Arc::new(Selection::of(routing)));
        self.prefix_affinity.set_bound(bound(routing));
    }

    /// The fleet is `workers` now (see `PrefixAffinity::set_workers`).
    pub fn set_workers(&self, workers: &[Arc<Worker>]) {
        self.prefix_affinity.set_workers(workers);
    }

    /// The policy `model` is routed by.
    pub fn kind(&self, model: &str) -> PolicyKind {
        let selection = self.selection.load();
        if selection.by_model.is_empty() {
            return selection.default;
        }
        selection
            .by_model
            .get(model)
            .copied()
            .unwrap_or(selection.default)
    }

    /// `prefix_affinity`'s hits and spills, per model.
    pub fn affinity_counts(&self) -> Vec<AffinityCount> {
        self.prefix_affinity.counts()
    }
}

impl RoutingPolicy for Policies {
    fn choose(&self, features: &Features<'_>, candidates: &[Candidate<'_>]) -> Option<usize> {
        match self.kind(features.model) {
            PolicyKind::LeastLoad => self.least_load.choose(features, candidates),
            PolicyKind::PrefixAffinity => self.prefix_affinity.choose(features, candidates),
            PolicyKind::RoundRobin => self.round_robin.choose(features, candidates),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use bytes::Bytes;

    use super::super::prefix::Prefix;
    use super::super::registry::tests::worker;
    use super::*;
    use crate::config::ModelRoutingConfig;
    use crate::request::Endpoint;

    fn routing(policy: PolicyKind, models: &[(&str, PolicyKind)]) -> RoutingConfig {
        RoutingConfig {
            health_interval_ms: 500,
            load_interval_ms: 100,
            connect_timeout_ms: 1000,
            request_timeout_ms: 1000,
            stream_idle_timeout_ms: 1000,
            max_attempts: 3,
            queue_timeout_ms: 1000,
            max_queued: 10,
            max_queued_per_tenant: 10,
            batch_every: 10,
            learn_capacity: true,
            breaker_consecutive_failures: 5,
            breaker_window: 20,
            breaker_min_requests: 10,
            breaker_failure_percent: 40,
            breaker_backoff_ms: 1000,
            breaker_max_backoff_ms: 60_000,
            policy,
            affinity_load_factor: 1.25,
            affinity_load_floor: 8,
            coalesce_window_us: 0,
            coalesce_max_prompts: 16,
            models: models
                .iter()
                .map(|(model, policy)| {
                    let settings = ModelRoutingConfig {
                        policy: Some(*policy),
                        coalesce_window_us: None,
                    };
                    ((*model).to_owned(), settings)
                })
                .collect::<BTreeMap<_, _>>(),
            discovery_interval_ms: 5000,
            dns_servers: Vec::new(),
        }
    }

    #[test]
    fn a_model_takes_its_own_policy_and_the_rest_the_default() {
        let registry = Registry::new(vec![
            worker("http://a", &["m", "tiny"], true),
            worker("http://b", &["m", "tiny"], true),
        ]);
        let policies = Policies::new(
            &routing(
                PolicyKind::RoundRobin,
                &[("tiny", PolicyKind::PrefixAffinity)],
            ),
            &registry,
        );
        assert_eq!(policies.kind("tiny"), PolicyKind::PrefixAffinity);
        assert_eq!(policies.kind("m"), PolicyKind::RoundRobin);
        let body = Bytes::from_static(br#"{"model":"m","prompt":"the same prompt every time"}"#);
        let features = |model| Features {
            model,
            endpoint: Endpoint::Completions,
            prompt_bytes: body.len(),
            sequences: 1,
            prefix: Prefix {
                body: &body,
                session: None,
            },
        };
        let workers = registry.workers();
        let candidates: Vec<_> = workers
            .iter()
            .map(|worker| Candidate {
                id: worker.id,
                worker,
            })
            .collect();
        let choose = |model| {
            let shared: Arc<Policies> = Arc::new(Policies::new(
                &routing(
                    PolicyKind::RoundRobin,
                    &[("tiny", PolicyKind::PrefixAffinity)],
                ),
                &registry,
            ));
            (0..4)
                .filter_map(|_| shared.choose(&features(model), &candidates))
                .collect::<Vec<_>>()
        };
        // The same prompt: one worker under prefix affinity, both in turn under round robin.
        let tiny = choose("tiny");
        assert!(tiny.iter().all(|p| *p == tiny[0]), "{tiny:?}");
        assert_eq!(choose("m"), [0, 1, 0, 1]);
        for _ in 0..3 {
            policies.choose(&features("tiny"), &candidates);
        }
        policies.choose(&features("m"), &candidates);
        let counts = policies.affinity_counts();
        assert_eq!(counts.len(), 1);
        assert_eq!((&*counts[0].model, counts[0].hits), ("tiny", 3));
    }
}
