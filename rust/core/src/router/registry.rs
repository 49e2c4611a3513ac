//! The set of workers: which can serve a model now, and which are eligible for a request (the
//! routing policy chooses among those). The set may change while the gateway runs (`fleet`): it
//! is replaced whole, and a request names its worker by id, never by a place in the list.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use tokio::sync::Notify;

use super::breaker::Admission;
use super::policy::{Candidate, Features, RoutingPolicy};
use super::worker::{Outstanding, Worker, WorkerId};

/// Whether a model can be served right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    /// A healthy worker serves it.
    Available,
    /// Only workers that are down served it when last seen, or a worker that has not listed its
    /// models yet (still starting) might serve it.
    Unavailable,
    /// No worker serves it, and every worker has said what it serves.
    Unknown,
}

/// What `Registry::pick` found for a request: by default the chosen worker with the request
/// counted on it.
#[derive(Debug)]
pub enum Pick<Placed = Outstanding> {
    /// The worker chosen.
    Placed(Placed),
    /// Eligible workers exist, and every one is at its `max_concurrency`.
    AllFull,
    /// No eligible worker (or none the policy accepts).
    NoneEligible,
}

#[derive(Debug)]
pub struct Registry {
    /// The workers in rotation, in configuration order; replaced whole when the fleet changes.
    /// A worker taken out lives on in the requests it still serves.
    workers: ArcSwap<Vec<Arc<Worker>>>,
    /// Raised when a worker may have gained room (every worker in the set raises it) or the set
    /// changed: the scheduler then hands places to its queues.
    room: Arc<Notify>,
    /// Whether any worker may be full. Relaxed: a hint stored with each new set.
    bounded: AtomicBool,
}

impl Registry {
    pub fn new(workers: Vec<Arc<Worker>>) -> Self {
        let registry = Self {
            workers: ArcSwap::from_pointee(Vec::new()),
            room: Arc::new(Notify::new()),
            bounded: AtomicBool::new(false),
        };
        registry.replace(workers);
        registry
    }

    /// The workers now, in configuration order: a snapshot that a change of the set leaves as
    /// it is.
    pub fn workers(&self) -> Arc<Vec<Arc<Worker>>> {
        self.workers.load_full()
    }

    /// Puts `workers` in rotation in place of the current set. A worker left out takes no new
    /// request from now on; those it serves finish (they hold it).
    pub fn replace(&self, workers: Vec<Arc<Worker>>) {
        let mut bounded = false;
        for worker in &workers {
            worker.notify_room(self.room.clone());
            bounded |= worker.is_bounded();
        }
        self.bounded.store(bounded, Ordering::Relaxed);
        self.workers.store(Arc::new(workers));
        // Queued requests may have lost their last worker, or gained one.
        self.room.notify_one();
    }

    /// Raised when a worker may have gained room or the set changed.
    pub fn room(&self) -> &Arc<Notify> {
        &self.room
    }

    /// Whether any worker in the set may ever be full.
    pub fn is_bounded(&self) -> bool {
        self.bounded.load(Ordering::Relaxed)
    }

    pub fn availability(&self, model: &str) -> Availability {
        let mut maybe = false;
        for worker in self.workers.load().iter() {
            if worker.serves(model) {
                if worker.is_healthy() {
                    return Availability::Available;
                }
                maybe = true;
            }
            maybe |= !worker.has_listed();
        }
        if maybe {
            Availability::Unavailable
        } else {
            Availability::Unknown
        }
    }

    /// The worker for a request with `features`, the request counted on it, among the eligible
    /// workers (healthy, serving its model, their id not in `tried`) that have room. A worker
    /// whose circuit breaker is half-open takes it as its trial; otherwise `policy` chooses among
    /// those in rotation. Only when every eligible worker is ejected does it choose among the
    /// ejected ones: a worker that fails half its requests serves better than none.
    ///
    /// Concurrent picks never take a worker past its capacity: the request is counted only if
    /// the worker still has room then, and is placed again when another pick took that room.
    pub fn pick(
        &self,
        policy: &dyn RoutingPolicy,
        features: &Features<'_>,
        tried: &[WorkerId],
    ) -> Pick {
        loop {
            match self.choose(policy, features, tried) {
                Pick::Placed(worker) => {
                    if let Some(outstanding) = worker.try_begin() {
                        return Pick::Placed(outstanding);
                    }
                }
                Pick::AllFull => return Pick::AllFull,
                Pick::NoneEligible => return Pick::NoneEligible,
            }
        }
    }

    /// `pick`'s choice, not yet counted on the worker.
    fn choose(
        &self,
        policy: &dyn RoutingPolicy,
        features: &Features<'_>,
        tried: &[WorkerId],
    ) -> Pick<Arc<Worker>> {
        let workers = self.workers.load();
        let mut eligible = false;
        let mut in_rotation = false;
        let mut candidates: Vec<Candidate<'_>> = Vec::new();
        let mut ejected: Vec<Candidate<'_>> = Vec::new();
        for worker in workers.iter() {
            if tried.contains(&worker.id) || !worker.is_healthy() || !worker.serves(features.model)
            {
                continue;
            }
            eligible = true;
            let admission = worker.admission();
            in_rotation |= admission != Admission::Ejected;
            if !worker.has_room() {
                continue;
            }
            let candidate = Candidate {
                id: worker.id,
                worker,
            };
            match admission {
                Admission::Trial => return Pick::Placed(worker.clone()),
                Admission::Closed => candidates.push(candidate),
                Admission::Ejected => ejected.push(candidate),
            }
        }
        if !in_rotation {
            candidates = ejected;
        }
        let chosen = policy
            .choose(features, &candidates)
            .and_then(|position| candidates.get(position));
        match chosen {
            Some(chosen) => Pick::Placed(chosen.worker.clone()),
            None if eligible && candidates.is_empty() => Pick::AllFull,
            None => Pick::NoneEligible,
        }
    }

    /// The smallest context length any worker reports for `model` (a request must fit wherever
    /// it lands); `None` when none reports one.
    pub fn context_len(&self, model: &str) -> Option<u64> {
        self.workers
            .load()
            .iter()
            .filter_map(|w| {
                w.models()
                    .iter()
                    .find(|m| m.id == model)
                    .and_then(|m| m.max_model_len)
            })
            .min()
    }

    /// `GET /v1/models`: the union, by id, of the cards healthy workers list, as they list them.
    pub fn models_document(&self) -> Vec<u8> {
        self.models_document_where(|_| true)
    }

    /// `GET /v1/models` for a caller who may see only the models `visible` accepts.
    pub fn models_document_where(&self, visible: impl Fn(&str) -> bool) -> Vec<u8> {
        let mut seen: Vec<String> = Vec::new();
        let mut out = br#"{"object":"list","data":["#.to_vec();
        for worker in self.workers.load().iter().filter(|w| w.is_healthy()) {
            for model in worker.models().iter() {
                if seen.contains(&model.id) || !visible(&model.id) {
                    continue;
                }
                if !seen.is_empty() {
                    out.push(b',');
                }
                out.extend_from_slice(model.card.get().as_bytes());
                seen.push(model.id.clone());
            }
        }
        out.extend_from_slice(b"]}");
        out
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::time::Duration;

    use super::super::breaker::BreakerSettings;
    use super::super::policy::LeastLoad;
    use super::super::worker::ModelCard;
    use super::*;
    use crate::request::Endpoint;
    use serde_json::value::RawValue;

    pub(in crate::router) fn worker(url: &str, models: &[&str], healthy: bool) -> Arc<Worker> {
        worker_with(url, models, healthy, BreakerSettings::OFF)
    }

    fn worker_with(
        url: &str,
        models: &[&str],
        healthy: bool,
        breaker: BreakerSettings,
    ) -> Arc<Worker> {
        let Ok(worker) = Worker::new(url).map(|w| w.with_breaker(breaker)) else {
            panic!("bad url {url}")
        };
        worker.set_models(
            models
                .iter()
                .filter_map(|id| {
                    let card = RawValue::from_string(format!(r#"{{"id":"{id}"}}"#)).ok()?;
                    Some(ModelCard {
                        id: (*id).to_owned(),
                        max_model_len: Some(100),
                        card,
                    })
                })
                .collect(),
        );
        worker.set_healthy(healthy);
        Arc::new(worker)
    }

    #[test]
    fn availability_distinguishes_down_from_unknown() {
        let a = worker("http://a", &["m"], false);
        let registry = Registry::new(vec![a.clone()]);
        assert_eq!(registry.availability("m"), Availability::Unavailable);
        assert_eq!(registry.availability("x"), Availability::Unknown);
        a.set_healthy(true);
        assert_eq!(registry.availability("m"), Availability::Available);
    }

    #[test]
    fn a_worker_that_never_listed_makes_any_model_unavailable_not_unknown() {
        let Ok(starting) = Worker::new("http://starting") else {
            panic!("bad url")
        };
        let registry = Registry::new(vec![worker("http://a", &["m"], true), Arc::new(starting)]);
        assert_eq!(registry.availability("x"), Availability::Unavailable);
        registry.workers()[1].set_models(Vec::new());
        assert_eq!(registry.availability("x"), Availability::Unknown);
    }

    #[test]
    fn models_document_is_the_union_of_healthy_workers() {
        let registry = Registry::new(vec![
            worker("http://a", &["m", "n"], true),
            worker("http://b", &["m", "o"], true),
            worker("http://c", &["down"], false),
        ]);
        let doc: serde_json::Value =
            serde_json::from_slice(&registry.models_document()).unwrap_or_default();
        let ids: Vec<_> = doc["data"]
            .as_array()
            .map(|a| a.iter().filter_map(|m| m["id"].as_str()).collect())
            .unwrap_or_default();
        assert_eq!(ids, ["m", "n", "o"]);
    }

    fn breaking(url: &str) -> Arc<Worker> {
        let settings = BreakerSettings {
            consecutive_failures: 2,
            window: 0,
            min_requests: 1,
            failure_percent: 100,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(100),
        };
        worker_with(url, &["m"], true, settings)
    }

    fn placed(registry: &Registry, tried: &[usize]) -> Option<usize> {
        placed_by(registry, &LeastLoad::default(), tried)
    }

    /// Where (the place in the list) `policy` places a one-sequence completion for `m`, past
    /// the workers at the places `tried`.
    pub(in crate::router) fn placed_by(
        registry: &Registry,
        policy: &dyn RoutingPolicy,
        tried: &[usize],
    ) -> Option<usize> {
        let placed = placement_by(registry, policy, tried)?;
        registry
            .workers()
            .iter()
            .position(|w| w.id == placed.worker().id)
    }

    /// That request, counted on the worker `policy` placed it on.
    fn placement_by(
        registry: &Registry,
        policy: &dyn RoutingPolicy,
        tried: &[usize],
    ) -> Option<Outstanding> {
        let workers = registry.workers();
        let tried: Vec<WorkerId> = tried
            .iter()
            .filter_map(|&place| workers.get(place).map(|w| w.id))
            .collect();
        let body = bytes::Bytes::new();
        let features = Features {
            model: "m",
            endpoint: Endpoint::Completions,
            prompt_bytes: 1,
            sequences: 1,
            prefix: super::super::prefix::Prefix {
                body: &body,
                session: None,
            },
        };
        match registry.pick(policy, &features, &tried) {
            Pick::Placed(placed) => Some(placed),
            Pick::AllFull | Pick::NoneEligible => None,
        }
    }

    fn fail_twice(worker: &Arc<Worker>) {
        for _ in 0..2 {
            worker.begin().failed();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_ejected_worker_is_skipped_then_takes_one_trial() {
        let (a, b) = (breaking("http://a"), breaking("http://b"));
        let registry = Registry::new(vec![a.clone(), b.clone()]);
        fail_twice(&a);
        assert_eq!(a.admission(), Admission::Ejected);
        // Healthy all along, but out of rotation: the other worker takes everything.
        assert!(a.is_healthy());
        assert!((0..4).all(|_| placed(&registry, &[]) == Some(1)));
        // A retry after the other failed: the ejected worker is all that is left, so it serves.
        assert_eq!(placed(&registry, &[1]), Some(0));
        // A request placed there before its ejection, still running.
        let busy = a.begin();
        tokio::time::advance(Duration::from_millis(100)).await;
        // Half-open: the next request is its trial, though least-load would choose the other.
        let Some(mut trial) = placement_by(&registry, &LeastLoad::default(), &[]) else {
            panic!("no worker for the trial")
        };
        assert_eq!(trial.worker().id, a.id);
        drop(busy);
        // While the trial runs, nothing else goes there.
        assert_eq!(placed(&registry, &[]), Some(1));
        trial.answered();
        assert_eq!(a.admission(), Admission::Closed);
        let stats = a.breaker_stats();
        assert_eq!((stats.ejections, stats.returns, stats.trials), (1, 1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn with_every_worker_ejected_they_serve_anyway() {
        let (a, b) = (breaking("http://a"), breaking("http://b"));
        let registry = Registry::new(vec![a.clone(), b.clone()]);
        fail_twice(&a);
        fail_twice(&b);
        assert!(placed(&registry, &[]).is_some());
        assert_eq!(placed(&registry, &[0]), Some(1));
        // A worker that is down is not eligible at all, ejected or not.
        b.set_healthy(false);
        assert_eq!(placed(&registry, &[]), Some(0));
        assert_eq!(placed(&registry, &[0]), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_trial_whose_request_never_ends_passes_on() {
        let a = breaking("http://a");
        fail_twice(&a);
        tokio::time::advance(Duration::from_millis(100)).await;
        // Placed as the trial, then dropped without an outcome (its client left).
        drop(a.begin());
        assert_eq!(a.admission(), Admission::Trial);
        let mut trial = a.begin();
        trial.failed();
        assert_eq!(a.admission(), Admission::Ejected);
        assert_eq!(a.breaker_stats().trials, 2);
    }
}
