//! The gateway's own `/metrics`: requests by outcome, tokens metered, rejections, retries,
//! latency, and each worker's health and load, as Prometheus text.
//!
//! Counters are fed by the metering guard (one update per dispatched request) and by the API's
//! rejection paths; nothing here is on the per-chunk path of a stream. Every atomic uses
//! `Ordering::Relaxed`: independent tallies, no memory published through them.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::ApiError;
use crate::prometheus::{Family, Histogram, escape_label, family, header};
use crate::quota::QuotaStats;
use crate::router::Registry;
use crate::usage::{Status, UsageEvent};

const ENDPOINTS: [&str; 2] = ["chat.completions", "completions"];
const STATUSES: [Status; 3] = [Status::Completed, Status::Cancelled, Status::Failed];

/// Reasons a request is refused before it reaches a worker; `ApiError::reason` names them.
const REJECTIONS: [&str; 12] = [
    "bad_request",
    "missing_api_key",
    "invalid_api_key",
    "model_not_found",
    "request_too_large",
    "unknown_route",
    "method_not_allowed",
    "rate_limit_exceeded",
    "insufficient_quota",
    "model_not_priced",
    "quota_unavailable",
    "other",
];

/// Seconds: from sub-millisecond gateway answers to multi-minute generations.
const LATENCY_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];

#[derive(Debug)]
pub struct GatewayMetrics {
    /// [endpoint][status]
    requests: [[AtomicU64; 3]; 2],
    prompt_tokens: AtomicU64,
    cached_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    rejected: [AtomicU64; REJECTIONS.len()],
    attempts: AtomicU64,
    retries: AtomicU64,
    duration: Histogram,
    first_byte: Histogram,
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        Self {
            requests: Default::default(),
            prompt_tokens: AtomicU64::new(0),
            cached_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            rejected: Default::default(),
            attempts: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            duration: Histogram::new(LATENCY_BOUNDS),
            first_byte: Histogram::new(LATENCY_BOUNDS),
        }
    }
}

impl GatewayMetrics {
    /// One dispatched request ended; `elapsed` is its whole duration at the gateway.
    pub fn observe_event(&self, event: &UsageEvent, elapsed: Duration) {
        let endpoint = ENDPOINTS
            .iter()
            .position(|e| *e == event.endpoint.as_str())
            .unwrap_or(0);
        let status = STATUSES
            .iter()
            .position(|s| *s == event.status)
            .unwrap_or(2);
        self.requests[endpoint][status].fetch_add(1, Ordering::Relaxed);
        self.prompt_tokens
            .fetch_add(event.prompt_tokens, Ordering::Relaxed);
        self.cached_tokens
            .fetch_add(event.cached_tokens, Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(event.completion_tokens, Ordering::Relaxed);
        self.duration.observe(elapsed);
    }

    pub fn reject(&self, error: &ApiError) {
        let reason = error.reason();
        let slot = REJECTIONS
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(REJECTIONS.len() - 1);
        self.rejected[slot].fetch_add(1, Ordering::Relaxed);
    }

    /// An upstream attempt; `retry` when it is not the request's first.
    pub fn attempt(&self, retry: bool) {
        self.attempts.fetch_add(1, Ordering::Relaxed);
        if retry {
            self.retries.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The first byte of a worker's answer arrived (for streams: the first event).
    pub fn first_byte(&self, elapsed: Duration) {
        self.first_byte.observe(elapsed);
    }

    pub fn render(&self, registry: &Registry, pending_usage: usize, quota: QuotaStats) -> String {
        let mut out = String::with_capacity(4096);
        header(&mut out, &REQUESTS);
        for (e, endpoint) in ENDPOINTS.iter().enumerate() {
            for (s, status) in STATUSES.iter().enumerate() {
                let n = self.requests[e][s].load(Ordering::Relaxed);
                let status = status.as_str();
                let _ = writeln!(
                    out,
                    "{}{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}",
                    REQUESTS.name
                );
            }
        }
        header(&mut out, &TOKENS);
        for (kind, counter) in [
            ("prompt", &self.prompt_tokens),
            ("cached", &self.cached_tokens),
            ("completion", &self.completion_tokens),
        ] {
            let n = counter.load(Ordering::Relaxed);
            let _ = writeln!(out, "{}{{kind=\"{kind}\"}} {n}", TOKENS.name);
        }
        header(&mut out, &REJECTED);
        for (reason, counter) in REJECTIONS.iter().zip(&self.rejected) {
            let n = counter.load(Ordering::Relaxed);
            let _ = writeln!(out, "{}{{reason=\"{reason}\"}} {n}", REJECTED.name);
        }
        scalar(&mut out, &ATTEMPTS, self.attempts.load(Ordering::Relaxed));
        scalar(&mut out, &RETRIES, self.retries.load(Ordering::Relaxed));
        scalar(&mut out, &PENDING, pending_usage as u64);
        scalar(&mut out, &QUOTA_INFLIGHT, quota.local_inflight);
        scalar(&mut out, &QUOTA_HELD, quota.local_held_tokens);
        scalar(&mut out, &QUOTA_REDIS_ERRORS, quota.redis_errors);
        scalar(&mut out, &QUOTA_FALLBACKS, quota.fallbacks);
        self.duration.render(&mut out, &DURATION, "");
        self.first_byte.render(&mut out, &FIRST_BYTE, "");
        header(&mut out, &HEALTHY);
        for worker in registry.workers() {
            let url = escape_label(&worker.url);
            let healthy = u8::from(worker.is_healthy());
            let _ = writeln!(out, "{}{{worker=\"{url}\"}} {healthy}", HEALTHY.name);
        }
        header(&mut out, &OUTSTANDING);
        for worker in registry.workers() {
            let url = escape_label(&worker.url);
            let n = worker.outstanding();
            let _ = writeln!(out, "{}{{worker=\"{url}\"}} {n}", OUTSTANDING.name);
        }
        render_reported_load(&mut out, registry);
        out
    }
}

/// What each worker reported at its last scrape; a worker whose load is unknown has no sample.
fn render_reported_load(out: &mut String, registry: &Registry) {
    let loads: Vec<_> = registry
        .workers()
        .iter()
        .filter_map(|w| w.load().map(|load| (escape_label(&w.url), load)))
        .collect();
    header(out, &RUNNING);
    for (url, load) in &loads {
        let _ = writeln!(out, "{}{{worker=\"{url}\"}} {}", RUNNING.name, load.running);
    }
    header(out, &WAITING);
    for (url, load) in &loads {
        let _ = writeln!(out, "{}{{worker=\"{url}\"}} {}", WAITING.name, load.waiting);
    }
    header(out, &KV_CACHE);
    for (url, load) in &loads {
        let usage = load.kv_cache_usage;
        let _ = writeln!(out, "{}{{worker=\"{url}\"}} {usage:?}", KV_CACHE.name);
    }
}

fn scalar(out: &mut String, family: &Family, value: u64) {
    header(out, family);
    let _ = writeln!(out, "{} {value}", family.name);
}

const REQUESTS: Family = family(
    "tokengate_requests_total",
    "counter",
    "Requests dispatched to workers, by endpoint and metered outcome.",
);
const TOKENS: Family = family(
    "tokengate_tokens_total",
    "counter",
    "Tokens metered from workers' usage (cached is a subset of prompt).",
);
const REJECTED: Family = family(
    "tokengate_rejected_total",
    "counter",
    "Requests refused before reaching a worker, by reason.",
);
const ATTEMPTS: Family = family(
    "tokengate_upstream_attempts_total",
    "counter",
    "Requests sent to workers, retries included.",
);
const RETRIES: Family = family(
    "tokengate_upstream_retries_total",
    "counter",
    "Upstream attempts that moved a request to another worker.",
);
const PENDING: Family = family(
    "tokengate_usage_events_pending",
    "gauge",
    "Usage events recorded and not yet drained into the ledger.",
);
const QUOTA_INFLIGHT: Family = family(
    "tokengate_quota_inflight_requests",
    "gauge",
    "Concurrency slots held in this process's quota counters (all scopes).",
);
const QUOTA_HELD: Family = family(
    "tokengate_quota_held_tokens",
    "gauge",
    "Worst-case tokens held against budgets in this process's quota counters (all scopes).",
);
const QUOTA_REDIS_ERRORS: Family = family(
    "tokengate_quota_redis_errors_total",
    "counter",
    "Admissions for which the shared quota counters in Redis did not answer.",
);
const QUOTA_FALLBACKS: Family = family(
    "tokengate_quota_fallback_admissions_total",
    "counter",
    "Admissions decided on this replica's fallback while Redis was unreachable.",
);
const DURATION: Family = family(
    "tokengate_request_duration_seconds",
    "histogram",
    "Time from dispatch to the end of the response, per dispatched request.",
);
const FIRST_BYTE: Family = family(
    "tokengate_upstream_first_byte_seconds",
    "histogram",
    "Time from dispatch to a worker's first answer byte (streams: first event).",
);
const HEALTHY: Family = family(
    "tokengate_worker_healthy",
    "gauge",
    "1 while the worker is in rotation.",
);
const OUTSTANDING: Family = family(
    "tokengate_worker_outstanding_requests",
    "gauge",
    "Requests the gateway has in flight on the worker.",
);
const RUNNING: Family = family(
    "tokengate_worker_running_requests",
    "gauge",
    "Requests the worker reported running (vllm:num_requests_running) at its last scrape.",
);
const WAITING: Family = family(
    "tokengate_worker_waiting_requests",
    "gauge",
    "Requests the worker reported queued (vllm:num_requests_waiting) at its last scrape.",
);
const KV_CACHE: Family = family(
    "tokengate_worker_kv_cache_usage",
    "gauge",
    "KV-cache use, 0 to 1, the worker reported (vllm:kv_cache_usage_perc) at its last scrape.",
);

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::prometheus::sample_value as value;
    use crate::router::Worker;
    use crate::usage::UsageSource;

    fn event(status: Status, completion: u64) -> UsageEvent {
        UsageEvent {
            event_id: "e".into(),
            request_id: "r".into(),
            tenant_id: "t".into(),
            key_id: "k".into(),
            model: "m".into(),
            worker: None,
            endpoint: crate::request::Endpoint::Completions,
            stream: false,
            status,
            http_status: 200,
            prompt_tokens: 3,
            cached_tokens: 1,
            completion_tokens: completion,
            usage_source: UsageSource::Worker,
            started_at_ms: 0,
            finished_at_ms: 0,
        }
    }

    #[test]
    fn renders_what_was_observed() {
        let metrics = GatewayMetrics::default();
        metrics.observe_event(&event(Status::Completed, 5), Duration::from_millis(3));
        metrics.observe_event(&event(Status::Cancelled, 2), Duration::from_millis(30));
        metrics.reject(&ApiError::InvalidKey);
        metrics.reject(&ApiError::bad_request("x", None));
        metrics.attempt(false);
        metrics.attempt(true);
        let worker = Worker::new("http://w:1").map(Arc::new).ok();
        let registry = Registry::new(worker.into_iter().collect());
        let text = metrics.render(&registry, 7, QuotaStats::default());
        let completions = "tokengate_requests_total{endpoint=\"completions\"";
        assert_eq!(
            value(&text, &format!("{completions},status=\"completed\"}}")),
            Some("1")
        );
        assert_eq!(
            value(&text, &format!("{completions},status=\"cancelled\"}}")),
            Some("1")
        );
        assert_eq!(
            value(&text, "tokengate_tokens_total{kind=\"completion\"}"),
            Some("7")
        );
        assert_eq!(
            value(&text, "tokengate_tokens_total{kind=\"cached\"}"),
            Some("2")
        );
        assert_eq!(
            value(
                &text,
                "tokengate_rejected_total{reason=\"invalid_api_key\"}"
            ),
            Some("1")
        );
        assert_eq!(
            value(&text, "tokengate_rejected_total{reason=\"bad_request\"}"),
            Some("1")
        );
        assert_eq!(value(&text, "tokengate_upstream_retries_total"), Some("1"));
        assert_eq!(value(&text, "tokengate_usage_events_pending"), Some("7"));
        assert_eq!(
            value(&text, "tokengate_request_duration_seconds_count"),
            Some("2.0")
        );
        assert_eq!(
            value(
                &text,
                "tokengate_request_duration_seconds_bucket{le=\"0.005\"}"
            ),
            Some("1.0")
        );
        assert_eq!(
            value(&text, "tokengate_worker_healthy{worker=\"http://w:1\"}"),
            Some("0")
        );
        let running = "tokengate_worker_running_requests{worker=\"http://w:1\"}";
        assert_eq!(value(&text, running), None, "no scrape yet, no sample");
        registry.workers()[0].set_load(Some(crate::router::Load {
            running: 3,
            waiting: 2,
            kv_cache_usage: 0.5,
        }));
        let text = metrics.render(&registry, 7, QuotaStats::default());
        assert_eq!(value(&text, running), Some("3"));
        assert_eq!(
            value(
                &text,
                "tokengate_worker_waiting_requests{worker=\"http://w:1\"}"
            ),
            Some("2")
        );
        assert_eq!(
            value(
                &text,
                "tokengate_worker_kv_cache_usage{worker=\"http://w:1\"}"
            ),
            Some("0.5")
        );
    }
}
