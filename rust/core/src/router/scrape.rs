//! Load scrapes: every healthy worker's `/metrics`, read for the load it reports.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;

use super::load::parse;
use super::registry::Registry;
use super::worker::Worker;
use crate::upstream::Upstream;

/// Scrapes one worker's `/metrics` and stores its load and block size; a failed scrape forgets
/// the last load, so the policy falls back to the gateway's own in-flight count, and keeps the
/// block size, which changes only when the worker restarts with another.
pub async fn scrape(upstream: &Upstream, worker: &Worker, timeout: Duration) {
    let report = match upstream
        .get(worker.to(), worker.metrics_uri.clone(), timeout)
        .await
    {
        Ok((status, body)) if status.is_success() => std::str::from_utf8(&body).ok().map(parse),
        _ => None,
    };
    worker.set_load(report.and_then(|r| r.load));
    if let Some(size) = report.and_then(|r| r.block_size) {
        worker.set_block_size(size);
    }
}

/// While scrapes are off, how often `run_load_scrapes` looks whether a reload turned them on.
const OFF_RECHECK: Duration = Duration::from_secs(1);

/// Scrapes every healthy worker of the moment forever, `interval()` apart (`None`: off, which a
/// reload may change); the caller aborts the task to stop.
pub async fn run_load_scrapes(
    upstream: Upstream,
    registry: Arc<Registry>,
    interval: impl Fn() -> Option<Duration> + Send,
) {
    loop {
        let Some(every) = interval() else {
            tokio::time::sleep(OFF_RECHECK).await;
            continue;
        };
        tokio::time::sleep(every).await;
        let timeout = every.max(Duration::from_millis(250));
        let workers = registry.workers();
        join_all(workers.iter().map(|worker| async {
            if worker.is_healthy() {
                scrape(&upstream, worker, timeout).await;
            } else {
                worker.set_load(None);
            }
        }))
        .await;
    }
}
