//! Routing policies: which of the eligible workers serves a request, from the request's features
//! and each worker's load. The scheduler asks one (`Policies`, which asks the model's);
//! `LeastLoad` and `RoundRobin` are here, `PrefixAffinity` in `affinity`.

use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::prefix::Prefix;
use super::worker::{Worker, WorkerId};
use crate::request::{Endpoint, InferenceRequest};

/// What a policy may know of a request.
#[derive(Debug, Clone, Copy)]
pub struct Features<'a> {
    pub model: &'a str,
    pub endpoint: Endpoint,
    /// The body's length: the prompt's upper bound.
    pub prompt_bytes: usize,
    /// Sequences it generates (n × prompts).
    pub sequences: u64,
    /// What `prefix_affinity` hashes, unread by the other policies.
    pub prefix: Prefix<'a>,
}

impl<'a> Features<'a> {
    pub fn of(request: &'a InferenceRequest) -> Self {
        Self {
            model: &request.model,
            endpoint: request.endpoint,
            prompt_bytes: request.body_len(),
            sequences: request.n.saturating_mul(request.prompts),
            prefix: Prefix {
                body: request.raw_body(),
                session: request.session_id.as_ref(),
            },
        }
    }
}

/// An eligible worker: healthy, serving the request's model, not tried yet for it.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    /// Its id (see `Worker::id`).
    pub id: WorkerId,
    pub worker: &'a Arc<Worker>,
}

pub trait RoutingPolicy: Debug + Send + Sync {
    /// The position in `candidates` of the worker to serve the request; `None` when there is no
    /// candidate (or none the policy accepts).
    fn choose(&self, features: &Features<'_>, candidates: &[Candidate<'_>]) -> Option<usize>;
}

/// A shared policy is the policy: the scheduler may own a handle while `/metrics` reads another.
impl<P: RoutingPolicy + ?Sized> RoutingPolicy for Arc<P> {
    fn choose(&self, features: &Features<'_>, candidates: &[Candidate<'_>]) -> Option<usize> {
        (**self).choose(features, candidates)
    }
}

/// KV-cache use from which a worker counts as saturated: vLLM starts preempting sequences there.
const KV_CACHE_SATURATED: f64 = 0.95;

/// Lower is better: (saturated, requests on the worker).
pub(super) fn score(worker: &Worker) -> (bool, usize) {
    let outstanding = worker.outstanding();
    match worker.load() {
        None => (false, outstanding),
        Some(load) => {
            let reported = load.running as usize + load.waiting as usize;
            let saturated = load.waiting > 0 || load.kv_cache_usage >= KV_CACHE_SATURATED;
            (saturated, outstanding.max(reported))
        }
    }
}

/// The least-loaded worker. A worker's load combines what the gateway knows now (its requests in
/// flight there) with what the worker last reported (vLLM's running and waiting requests, which
/// count every client's, other gateway replicas' included). A worker with requests waiting in its
/// own queue, or with its KV cache nearly full, is saturated: a new request would queue there
/// behind others, so any unsaturated worker is preferred.
#[derive(Debug, Default)]
pub struct LeastLoad {
    /// Where the next choice starts scanning, so that ties (idle workers) rotate instead of all
    /// landing on the first worker. Relaxed: only spreads load, orders nothing.
    cursor: AtomicUsize,
}

impl RoutingPolicy for LeastLoad {
    fn choose(&self, _: &Features<'_>, candidates: &[Candidate<'_>]) -> Option<usize> {
        let n = candidates.len();
        if n == 0 {
            return None;
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed) % n;
        let mut best: Option<(usize, (bool, usize))> = None;
        for offset in 0..n {
            let position = (start + offset) % n;
            let load = score(candidates[position].worker);
            if best.is_none_or(|(_, best_load)| load < best_load) {
                best = Some((position, load));
            }
        }
        best.map(|(position, _)| position)
    }
}

/// Each worker in turn, the saturated ones only when every candidate is.
#[derive(Debug, Default)]
pub struct RoundRobin {
    /// The turn. Relaxed: only spreads load, orders nothing.
    cursor: AtomicUsize,
}

impl RoutingPolicy for RoundRobin {
    fn choose(&self, _: &Features<'_>, candidates: &[Candidate<'_>]) -> Option<usize> {
        let n = candidates.len();
        if n == 0 {
            return None;
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed) % n;
        (0..n)
            .map(|offset| (start + offset) % n)
            .find(|&position| !score(candidates[position].worker).0)
            .or(Some(start))
    }
}

#[cfg(test)]
mod tests {
    use super::super::load::Load;
    use super::super::registry::Registry;
    use super::super::registry::tests::{placed_by as pick, worker};
    use super::*;

    #[test]
    fn picks_least_outstanding_healthy_worker_of_the_model() {
        let a = worker("http://a", &["m"], true);
        let b = worker("http://b", &["m"], true);
        let c = worker("http://c", &["other"], true);
        let policy = LeastLoad::default();
        let registry = Registry::new(vec![a.clone(), b.clone(), c]);
        let _busy = a.begin();
        for _ in 0..4 {
            assert_eq!(pick(&registry, &policy, &[]), Some(1));
        }
        assert_eq!(pick(&registry, &policy, &[1]), Some(0));
        assert_eq!(pick(&registry, &policy, &[0, 1]), None);
        b.set_healthy(false);
        assert_eq!(pick(&registry, &policy, &[]), Some(0));
    }

    #[test]
    fn reported_load_counts_other_clients_and_saturation_comes_first() {
        let a = worker("http://a", &["m"], true);
        let b = worker("http://b", &["m"], true);
        let policy = LeastLoad::default();
        let registry = Registry::new(vec![a.clone(), b.clone()]);
        let pick = || pick(&registry, &policy, &[]);
        let _ours = a.begin();
        // b is busy with another replica's requests: 3 running beats our 1 in flight on a.
        let load = |running, waiting, kv_cache_usage| {
            Some(Load {
                running,
                waiting,
                kv_cache_usage,
            })
        };
        b.set_load(load(3, 0, 0.1));
        assert_eq!(pick(), Some(0));
        // a queues requests: saturated, so b is preferred despite more running.
        a.set_load(load(1, 2, 0.1));
        assert_eq!(pick(), Some(1));
        // a full KV cache saturates as a queue does.
        a.set_load(load(1, 0, 0.97));
        assert_eq!(pick(), Some(1));
        // when both are saturated, fewer requests wins again.
        b.set_load(load(3, 1, 0.5));
        assert_eq!(pick(), Some(0));
        // a stale report never hides what the gateway has in flight itself.
        a.set_load(load(0, 0, 0.0));
        b.set_load(None);
        let _more = [b.begin(), b.begin()];
        assert_eq!(pick(), Some(0));
    }

    #[test]
    fn idle_ties_rotate() {
        let policy = LeastLoad::default();
        let registry = Registry::new(vec![
            worker("http://a", &["m"], true),
            worker("http://b", &["m"], true),
        ]);
        let picks: Vec<_> = (0..4)
            .filter_map(|_| pick(&registry, &policy, &[]))
            .collect();
        assert!(picks.contains(&0) && picks.contains(&1), "{picks:?}");
    }

    #[test]
    fn round_robin_takes_turns_and_passes_over_the_saturated() {
        let a = worker("http://a", &["m"], true);
        let b = worker("http://b", &["m"], true);
        let c = worker("http://c", &["m"], true);
        let policy = RoundRobin::default();
        let registry = Registry::new(vec![a.clone(), b.clone(), c.clone()]);
        // Load does not matter, only turns.
        let _busy = [a.begin(), a.begin()];
        let picks: Vec<_> = (0..6)
            .filter_map(|_| pick(&registry, &policy, &[]))
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        b.set_load(Some(Load {
            running: 0,
            waiting: 3,
            kv_cache_usage: 0.0,
        }));
        let picks: Vec<_> = (0..4)
            .filter_map(|_| pick(&registry, &policy, &[]))
            .collect();
        assert!(!picks.contains(&1), "{picks:?}");
        for worker in [&a, &c] {
            worker.set_load(Some(Load {
                running: 0,
                waiting: 0,
                kv_cache_usage: 0.99,
            }));
        }
        let picks: Vec<_> = (0..3)
            .filter_map(|_| pick(&registry, &policy, &[]))
            .collect();
        assert_eq!(picks.len(), 3);
        assert_eq!(pick(&registry, &policy, &[0, 1, 2]), None);
    }
}
