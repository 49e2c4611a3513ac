//! The set of workers and the routing policy: least-loaded among healthy workers.
//!
//! A worker's load combines what the gateway knows now (its requests in flight there) with what
//! the worker last reported (vLLM's running and waiting requests, which count every client's,
//! other gateway replicas' included). A worker with requests waiting in its own queue, or with
//! its KV cache nearly full, is saturated: a new request would queue there behind others, so any
//! unsaturated worker is preferred.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::worker::Worker;

/// KV-cache use from which a worker counts as saturated: vLLM starts preempting sequences there.
const KV_CACHE_SATURATED: f64 = 0.95;

/// Lower is better: (saturated, requests on the worker).
fn score(worker: &Worker) -> (bool, usize) {
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

#[derive(Debug)]
pub struct Registry {
    workers: Vec<Arc<Worker>>,
    /// Where the next pick starts scanning, so that ties (idle workers) rotate instead of all
    /// landing on the first worker. Relaxed: only spreads load, orders nothing.
    cursor: AtomicUsize,
}

impl Registry {
    pub fn new(workers: Vec<Arc<Worker>>) -> Self {
        Self {
            workers,
            cursor: AtomicUsize::new(0),
        }
    }

    pub fn workers(&self) -> &[Arc<Worker>] {
        &self.workers
    }

    pub fn availability(&self, model: &str) -> Availability {
        let mut maybe = false;
        for worker in &self.workers {
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

    /// The least-loaded healthy worker serving `model`, skipping those whose index is in
    /// `tried`. Returns the worker's index with it.
    pub fn pick(&self, model: &str, tried: &[usize]) -> Option<(usize, Arc<Worker>)> {
        let n = self.workers.len();
        if n == 0 {
            return None;
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed) % n;
        let mut best: Option<(usize, (bool, usize))> = None;
        for offset in 0..n {
            let index = (start + offset) % n;
            let worker = &self.workers[index];
            if tried.contains(&index) || !worker.is_healthy() || !worker.serves(model) {
                continue;
            }
            let load = score(worker);
            if best.is_none_or(|(_, best_load)| load < best_load) {
                best = Some((index, load));
            }
        }
        best.map(|(index, _)| (index, self.workers[index].clone()))
    }

    /// The smallest context length any worker reports for `model` (a request must fit wherever
    /// it lands); `None` when none reports one.
    pub fn context_len(&self, model: &str) -> Option<u64> {
        self.workers
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
        for worker in self.workers.iter().filter(|w| w.is_healthy()) {
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
mod tests {
    use super::super::load::Load;
    use super::super::worker::ModelCard;
    use super::*;
    use serde_json::value::RawValue;

    fn worker(url: &str, models: &[&str], healthy: bool) -> Arc<Worker> {
        let Ok(worker) = Worker::new(url) else {
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
    fn picks_least_outstanding_healthy_worker_of_the_model() {
        let a = worker("http://a", &["m"], true);
        let b = worker("http://b", &["m"], true);
        let c = worker("http://c", &["other"], true);
        let registry = Registry::new(vec![a.clone(), b.clone(), c]);
        let _busy = a.begin();
        for _ in 0..4 {
            assert_eq!(registry.pick("m", &[]).map(|(i, _)| i), Some(1));
        }
        assert_eq!(registry.pick("m", &[1]).map(|(i, _)| i), Some(0));
        assert_eq!(registry.pick("m", &[0, 1]).map(|(i, _)| i), None);
        b.set_healthy(false);
        assert_eq!(registry.pick("m", &[]).map(|(i, _)| i), Some(0));
    }

    #[test]
    fn reported_load_counts_other_clients_and_saturation_comes_first() {
        let a = worker("http://a", &["m"], true);
        let b = worker("http://b", &["m"], true);
        let registry = Registry::new(vec![a.clone(), b.clone()]);
        let pick = || registry.pick("m", &[]).map(|(i, _)| i);
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
        let registry = Registry::new(vec![
            worker("http://a", &["m"], true),
            worker("http://b", &["m"], true),
        ]);
        let picks: Vec<_> = (0..4)
            .filter_map(|_| registry.pick("m", &[]).map(|(i, _)| i))
            .collect();
        assert!(picks.contains(&0) && picks.contains(&1), "{picks:?}");
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
}
