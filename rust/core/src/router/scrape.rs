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
        .get(
            &worker.url,
            worker.metrics_uri.clone(),
            worker.authorization.as_ref(),
            timeout,
        )
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

/// Scrapes every healthy worker forever, every `interval`; the caller aborts the task to stop.
pub async fn run_load_scrapes(upstream: Upstream, registry: Arc<Registry>, interval: Duration) {
    let timeout = interval.max(Duration::from_millis(250));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        join_all(registry.workers().iter().map(|worker| async {
            if worker.is_healthy() {
                scrape(&upstream, worker, timeout).await;
            } else {
                worker.set_load(None);
            }
        }))
        .await;
    }
}
