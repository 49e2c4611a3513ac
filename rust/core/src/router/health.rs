//! Active health checks: every interval each worker's `/health` and `/v1/models` are probed.
//!
//! Passive signals (a refused connection during a request) mark a worker down at once, in the
//! dispatcher; only a successful probe brings it back.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::registry::Registry;
use super::worker::{ModelCard, Worker};
use crate::upstream::Upstream;

#[derive(Deserialize)]
struct ModelList {
    data: Vec<Box<RawValue>>,
}

/// The members of a model card the gateway reads.
#[derive(Deserialize)]
struct CardId {
    id: String,
    #[serde(default)]
    max_model_len: Option<u64>,
}

/// Probes one worker and updates its health and model list.
pub async fn probe(upstream: &Upstream, worker: &Worker, timeout: Duration) {
    let healthy = match upstream
        .get(worker.to(), worker.health_uri.clone(), timeout)
        .await
    {
        Ok((status, _)) => status.is_success(),
        Err(_) => false,
    };
    if !healthy {
        worker.set_healthy(false);
        return;
    }
    match upstream
        .get(worker.to(), worker.models_uri.clone(), timeout)
        .await
    {
        Ok((status, body)) if status.is_success() => {
            match serde_json::from_slice::<ModelList>(&body) {
                Ok(list) => {
                    let cards = list
                        .data
                        .into_iter()
                        .filter_map(|card| {
                            let CardId { id, max_model_len } =
                                serde_json::from_str(card.get()).ok()?;
                            Some(ModelCard {
                                id,
                                max_model_len,
                                card,
                            })
                        })
                        .collect();
                    worker.set_models(cards);
                    worker.set_healthy(true);
                }
                Err(error) => {
                    tracing::warn!(worker = %worker.url, %error, "unreadable /v1/models");
                    worker.set_healthy(false);
                }
            }
        }
        _ => worker.set_healthy(false),
    }
}

/// Probes every worker concurrently, once.
pub async fn probe_all(upstream: &Upstream, registry: &Registry, timeout: Duration) {
    join_all(
        registry
            .workers()
            .iter()
            .map(|worker| probe(upstream, worker, timeout)),
    )
    .await;
}

/// Probes the workers of the moment forever, `interval()` apart (a reload may change it); the
/// caller aborts the task to stop it.
pub async fn run_health_checks(
    upstream: Upstream,
    registry: Arc<Registry>,
    interval: impl Fn() -> Duration + Send,
) {
    loop {
        let every = interval();
        tokio::time::sleep(every).await;
        probe_all(&upstream, &registry, every.max(Duration::from_millis(500))).await;
    }
}
