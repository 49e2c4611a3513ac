//! The set of workers: which can serve a model now, and which are eligible for a request (the
//! routing policy chooses among those).

use std::sync::Arc;

use super::policy::{Candidate, Features, RoutingPolicy};
use super::worker::Worker;

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

/// What `Registry::pick` found for a request.
#[derive(Debug)]
pub enum Pick {
    /// The worker chosen, with its index.
    Placed(usize, Arc<Worker>),
    /// Eligible workers exist, and every one is at its `max_concurrency`.
    AllFull,
    /// No eligible worker (or none the policy accepts).
    NoneEligible,
}

#[derive(Debug)]
pub struct Registry {
    workers: Vec<Arc<Worker>>,
}

impl Registry {
    pub fn new(workers: Vec<Arc<Worker>>) -> Self {
        Self { workers }
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

    /// The worker `policy` chooses for a request with `features` among the eligible workers
    /// (healthy, serving its model, their index not in `tried`) that have room.
    pub fn pick(
        &self,
        policy: &dyn RoutingPolicy,
        features: &Features<'_>,
        tried: &[usize],
    ) -> Pick {
        let mut eligible = false;
        let candidates: Vec<Candidate<'_>> = self
            .workers
            .iter()
            .enumerate()
            .filter(|(index, worker)| {
                !tried.contains(index) && worker.is_healthy() && worker.serves(features.model)
            })
            .inspect(|_| eligible = true)
            .filter(|(_, worker)| worker.has_room())
            .map(|(index, worker)| Candidate { index, worker })
            .collect();
        let chosen = policy
            .choose(features, &candidates)
            .and_then(|position| candidates.get(position));
        match chosen {
            Some(chosen) => Pick::Placed(chosen.index, chosen.worker.clone()),
            None if eligible && candidates.is_empty() => Pick::AllFull,
            None => Pick::NoneEligible,
        }
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
pub(super) mod tests {
    use super::super::worker::ModelCard;
    use super::*;
    use serde_json::value::RawValue;

    pub(in crate::router) fn worker(url: &str, models: &[&str], healthy: bool) -> Arc<Worker> {
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
