//! The gateway's own `/metrics`: requests by outcome, tokens metered, rejections, retries,
//! latency, and each worker's health, circuit breaker and load, as Prometheus text (format 0.0.4)
//! written by the `prometheus-client` crate. It does not read workers' `/metrics` (`router::load`
//! does).
//!
//! Counters are fed by the metering guard (one update per dispatched request) and by the API's
//! rejection paths; nothing here is on the per-chunk path of a stream. Every series whose labels
//! are fixed (endpoint × status, token kind, rejection reason) is created with the metrics and its
//! handle kept, so an update is one relaxed atomic add (the crate's counters use
//! `Ordering::Relaxed`: independent tallies, no memory published through them), and a histogram
//! observation one uncontended lock; no label set is hashed after construction.
//!
//! What other parts own (the meter's queue, the quota's counters, each worker's health, circuit
//! breaker, in-flight count and reported load, prefix affinity's hits and spills) is read once per
//! scrape by a collector, [`Scrape`], rather than copied into gauges: nothing is stored twice, a
//! worker that leaves or whose load is unknown simply has no sample, and two concurrent scrapes
//! cannot interleave a clear and a set.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, prometheus_text,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry as Families;

use crate::error::ApiError;
use crate::quota::QuotaStats;
use crate::request::{Endpoint, Priority};
use crate::router::{AffinityCount, Registry, Worker};
use crate::usage::{Status, UsageEvent};

/// The `Content-Type` of what [`GatewayMetrics::render`] writes.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// In the order of the first index of `GatewayMetrics::requests`.
const ENDPOINTS: [Endpoint; 3] = Endpoint::ALL;
/// In the order of its second index; an interrupted request counts as failed.
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

/// Seconds: the gateway's own share of a request, from tens of microseconds to a long queue.
const OVERHEAD_BOUNDS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 5.0, 30.0,
];

/// Seconds: from sub-millisecond gateway answers to multi-minute generations.
const LATENCY_BOUNDS: [f64; 18] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];

type Labels<const N: usize> = [(&'static str, &'static str); N];

#[derive(Debug)]
pub struct GatewayMetrics {
    /// Every family below, registered once; encoded at each scrape.
    families: Families,
    /// Handles into `tokengate_requests_total`: [endpoint][status], as `ENDPOINTS` × `STATUSES`.
    requests: [[Counter; 3]; ENDPOINTS.len()],
    prompt_tokens: Counter,
    cached_tokens: Counter,
    completion_tokens: Counter,
    /// Handles into `tokengate_rejected_total`, in `REJECTIONS`' order.
    rejected: [Counter; REJECTIONS.len()],
    attempts: Counter,
    retries: Counter,
    duration: Histogram,
    overhead: Histogram,
    first_byte: Histogram,
    queue_wait: Family<QueueLabels, Histogram, fn() -> Histogram>,
    coalesced_calls: Counter,
    coalesced_requests: Counter,
    discovery_failures: Counter,
    discovery_rounds: Counter,
    journal_sync: Histogram,
    journal_unsynced_age: Histogram,
}

/// The labels of a queue's samples.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct QueueLabels {
    model: String,
    tenant: String,
}

/// One tenant's requests queued in one class of one model's queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedSample {
    pub model: Arc<str>,
    pub tenant: Arc<str>,
    pub class: Priority,
    pub count: usize,
}

// Help texts of registered families carry no final full stop: the registry adds it.
impl Default for GatewayMetrics {
    fn default() -> Self {
        let mut families = Families::default();

        let requests = Family::<Labels<2>, Counter>::default();
        let request_handles = ENDPOINTS.map(|endpoint| {
            STATUSES.map(|status| {
                requests.get_or_create_owned(&[
                    ("endpoint", endpoint.as_str()),
                    ("status", status.as_str()),
                ])
            })
        });
        families.register(
            "tokengate_requests",
            "Requests dispatched to workers, by endpoint and metered outcome",
            requests,
        );

        let tokens = Family::<Labels<1>, Counter>::default();
        let [prompt_tokens, cached_tokens, completion_tokens] = ["prompt", "cached", "completion"]
            .map(|kind| tokens.get_or_create_owned(&[("kind", kind)]));
        families.register(
            "tokengate_tokens",
            "Tokens metered from workers' usage (cached is a subset of prompt)",
            tokens,
        );

        let rejected = Family::<Labels<1>, Counter>::default();
        let rejected_handles =
            REJECTIONS.map(|reason| rejected.get_or_create_owned(&[("reason", reason)]));
        families.register(
            "tokengate_rejected",
            "Requests refused before reaching a worker, by reason",
            rejected,
        );

        let attempts = Counter::default();
        families.register(
            "tokengate_upstream_attempts",
            "Requests sent to workers, retries included",
            attempts.clone(),
        );
        let retries = Counter::default();
        families.register(
            "tokengate_upstream_retries",
            "Upstream attempts that moved a request to another worker",
            retries.clone(),
        );

        let duration = Histogram::new(LATENCY_BOUNDS);
        families.register(
            "tokengate_request_duration_seconds",
            "Time from dispatch to the end of the response, per dispatched request",
            duration.clone(),
        );
        let overhead = Histogram::new(OVERHEAD_BOUNDS);
        families.register(
            "tokengate_gateway_overhead_seconds",
            "Time a dispatched request spent in the gateway itself, apart from waiting on \
             workers: from its receipt (less the read of its body) to its upstream request, \
             queue and admission included, plus the relay's own work (see the README)",
            overhead.clone(),
        );
        let first_byte = Histogram::new(LATENCY_BOUNDS);
        families.register(
            "tokengate_upstream_first_byte_seconds",
            "Time from dispatch to a worker's first answer byte (streams: first event)",
            first_byte.clone(),
        );
        let queue_wait: Family<QueueLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(LATENCY_BOUNDS));
        families.register(
            "tokengate_queue_wait_seconds",
            "Time a request waited in the gateway's queue for a worker with room (those that \
             waited), by model and tenant",
            queue_wait.clone(),
        );

        let coalesced_calls = Counter::default();
        families.register(
            "tokengate_coalesced_calls",
            "Upstream calls that carried several clients' completions at once (coalescing)",
            coalesced_calls.clone(),
        );
        let coalesced_requests = Counter::default();
        families.register(
            "tokengate_coalesced_requests",
            "Requests answered from a coalesced call",
            coalesced_requests.clone(),
        );

        let discovery_failures = Counter::default();
        families.register(
            "tokengate_discovery_failures",
            "Resolutions of a worker DNS name that failed or found no address (the last known \
             workers stay)",
            discovery_failures.clone(),
        );
        let discovery_rounds = Counter::default();
        families.register(
            "tokengate_discovery_rounds",
            "Rounds of worker DNS resolution completed: each installed the workers it found and \
             probed the new ones",
            discovery_rounds.clone(),
        );
        let journal_sync = Histogram::new(OVERHEAD_BOUNDS);
        families.register(
            "tokengate_journal_sync_seconds",
            "Time each sync (fdatasync) of the usage journal took; its count is the syncs \
             (journal.sync: once a tick under load, or once per group of ending responses)",
            journal_sync.clone(),
        );
        let journal_unsynced_age = Histogram::new(OVERHEAD_BOUNDS);
        families.register(
            "tokengate_journal_unsynced_age_seconds",
            "Age of the oldest usage record each journal sync made durable, when the sync ended: \
             what a machine stopping just before it would have lost (journal.sync = interval: \
             up to a tick, the sync's own time and the wait for a CPU)",
            journal_unsynced_age.clone(),
        );

        Self {
            families,
            requests: request_handles,
            prompt_tokens,
            cached_tokens,
            completion_tokens,
            rejected: rejected_handles,
            attempts,
            retries,
            duration,
            overhead,
            first_byte,
            queue_wait,
            coalesced_calls,
            coalesced_requests,
            discovery_failures,
            discovery_rounds,
            journal_sync,
            journal_unsynced_age,
        }
    }
}

impl GatewayMetrics {
    /// One dispatched request ended; `elapsed` is its whole duration at the gateway, `overhead`
    /// the gateway's own part of it (`metering::Overhead`).
    pub fn observe_event(&self, event: &UsageEvent, elapsed: Duration, overhead: Duration) {
        let endpoint = match event.endpoint {
            Endpoint::ChatCompletions => 0,
            Endpoint::Completions => 1,
            Endpoint::Embeddings => 2,
        };
        let status = match event.status {
            Status::Completed => 0,
            Status::Cancelled => 1,
            Status::Failed | Status::Interrupted => 2,
        };
        self.requests[endpoint][status].inc();
        self.prompt_tokens.inc_by(event.prompt_tokens);
        self.cached_tokens.inc_by(event.cached_tokens);
        self.completion_tokens.inc_by(event.completion_tokens);
        self.duration.observe(elapsed.as_secs_f64());
        self.overhead.observe(overhead.as_secs_f64());
    }

    pub fn reject(&self, error: &ApiError) {
        let reason = error.reason();
        let slot = REJECTIONS
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(REJECTIONS.len() - 1);
        self.rejected[slot].inc();
    }

    /// An upstream attempt; `retry` when it is not the request's first.
    pub fn attempt(&self, retry: bool) {
        self.attempts.inc();
        if retry {
            self.retries.inc();
        }
    }

    /// The first byte of a worker's answer arrived (for streams: the first event).
    pub fn first_byte(&self, elapsed: Duration) {
        self.first_byte.observe(elapsed.as_secs_f64());
    }

    /// One upstream call answered `requests` clients' completions at once.
    pub fn coalesced(&self, requests: usize) {
        self.coalesced_calls.inc();
        self.coalesced_requests.inc_by(requests as u64);
    }

    /// `names` worker DNS names could not be resolved, or had no address.
    pub fn discovery_failed(&self, names: usize) {
        self.discovery_failures.inc_by(names as u64);
    }

    /// A round of worker DNS resolution has installed what it found and probed the new workers.
    pub fn discovery_round(&self) {
        self.discovery_rounds.inc();
    }

    /// Where the usage journal's syncer reports how long each sync took, and the age of the
    /// oldest record each sync made durable.
    pub fn journal_syncs(&self) -> (Histogram, Histogram) {
        (self.journal_sync.clone(), self.journal_unsynced_age.clone())
    }

    /// A request of `tenant` for `model` waited `waited` in the gateway's queue before a worker
    /// had room for it.
    pub fn queue_wait(&self, model: &str, tenant: &str, waited: Duration) {
        self.queue_wait
            .get_or_create(&QueueLabels {
                model: model.to_owned(),
                tenant: tenant.to_owned(),
            })
            .observe(waited.as_secs_f64());
    }

    /// The exposition, of [`CONTENT_TYPE`]: the registered families, then what [`Scrape`] reads
    /// from `registry`, the meter's queue, the quota, the scheduler's queues (`queued`: each
    /// model's queued requests) and prefix affinity's tallies (`affinity`).
    pub fn render(
        &self,
        registry: &Registry,
        pending_usage: usize,
        quota: QuotaStats,
        queued: Vec<QueuedSample>,
        affinity: Vec<AffinityCount>,
    ) -> String {
        let mut scraped = Families::default();
        scraped.register_collector(Box::new(Scrape {
            pending_usage,
            quota,
            workers: registry.workers().to_vec(),
            queued,
            affinity,
        }));
        let mut out = String::with_capacity(8 * 1024);
        // Encoding fails only when the writer does, and writing into a `String` cannot fail.
        let _ = prometheus_text::encode(&mut out, &self.families);
        let _ = prometheus_text::encode(&mut out, &scraped);
        out
    }
}

/// A metric's name (counters without `_total`, which the encoder adds) and help text. Written
/// by a collector, the help is taken as it is: these keep their full stop.
type Descriptor = (&'static str, &'static str);

/// What the gateway reads at scrape time from the parts that own it. Each worker's load is read
/// once, so its running, waiting and KV-cache samples come from the same report.
#[derive(Debug)]
struct Scrape {
    pending_usage: usize,
    quota: QuotaStats,
    workers: Vec<Arc<Worker>>,
    queued: Vec<QueuedSample>,
    affinity: Vec<AffinityCount>,
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let quota = &self.quota;
        single(&mut encoder, PENDING, ConstGauge::new(self.pending_usage))?;
        single(
            &mut encoder,
            QUOTA_INFLIGHT,
            ConstGauge::new(quota.local_inflight),
        )?;
        single(
            &mut encoder,
            QUOTA_HELD,
            ConstGauge::new(quota.local_held_tokens),
        )?;
        single(
            &mut encoder,
            QUOTA_REDIS_ERRORS,
            ConstCounter::new(quota.redis_errors),
        )?;
        single(
            &mut encoder,
            QUOTA_FALLBACKS,
            ConstCounter::new(quota.fallbacks),
        )?;
        let workers = || self.workers.iter().map(|w| (&*w.url, w));
        per_worker(
            &mut encoder,
            HEALTHY,
            workers().map(|(url, w)| (url, u32::from(w.is_healthy()))),
        )?;
        let breakers: Vec<_> = workers().map(|(url, w)| (url, w.breaker_stats())).collect();
        per_worker(
            &mut encoder,
            EJECTED,
            breakers.iter().map(|(url, b)| (*url, u32::from(b.ejected))),
        )?;
        per_worker_counter(
            &mut encoder,
            EJECTIONS,
            breakers.iter().map(|(url, b)| (*url, b.ejections)),
        )?;
        per_worker_counter(
            &mut encoder,
            RETURNS,
            breakers.iter().map(|(url, b)| (*url, b.returns)),
        )?;
        per_worker_counter(
            &mut encoder,
            TRIALS,
            breakers.iter().map(|(url, b)| (*url, b.trials)),
        )?;
        per_worker(
            &mut encoder,
            OUTSTANDING,
            workers().map(|(url, w)| (url, w.outstanding())),
        )?;
        let loads: Vec<_> = workers()
            .filter_map(|(url, w)| w.load().map(|load| (url, load)))
            .collect();
        per_worker(
            &mut encoder,
            RUNNING,
            loads.iter().map(|(url, load)| (*url, load.running)),
        )?;
        per_worker(
            &mut encoder,
            WAITING,
            loads.iter().map(|(url, load)| (*url, load.waiting)),
        )?;
        per_worker(
            &mut encoder,
            KV_CACHE,
            loads.iter().map(|(url, load)| (*url, load.kv_cache_usage)),
        )?;
        let (name, help) = QUEUED;
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for sample in &self.queued {
            let labels = [
                ("model", &*sample.model),
                ("tenant", &*sample.tenant),
                ("priority", sample.class.as_str()),
            ];
            ConstGauge::new(sample.count).encode(family.encode_family(&labels)?)?;
        }
        let (name, help) = AFFINITY;
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for count in &self.affinity {
            for (outcome, value) in [("hit", count.hits), ("spill", count.spills)] {
                let labels = [("model", &*count.model), ("outcome", outcome)];
                ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// A family of one unlabelled sample.
fn single(
    encoder: &mut DescriptorEncoder,
    (name, help): Descriptor,
    metric: impl EncodeMetric,
) -> fmt::Result {
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// A gauge family with one sample per worker, labelled `worker`.
fn per_worker<'a, V>(
    encoder: &mut DescriptorEncoder,
    (name, help): Descriptor,
    samples: impl Iterator<Item = (&'a str, V)>,
) -> fmt::Result
where
    ConstGauge<V>: EncodeMetric,
{
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (url, value) in samples {
        ConstGauge::new(value).encode(family.encode_family(&[("worker", url)])?)?;
    }
    Ok(())
}

/// A counter family with one sample per worker, labelled `worker`.
fn per_worker_counter<'a>(
    encoder: &mut DescriptorEncoder,
    (name, help): Descriptor,
    samples: impl Iterator<Item = (&'a str, u64)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (url, value) in samples {
        ConstCounter::new(value).encode(family.encode_family(&[("worker", url)])?)?;
    }
    Ok(())
}

const QUEUED: Descriptor = (
    "tokengate_queued_requests",
    "Requests waiting in the gateway's queue for a worker with room, by model, tenant and priority class.",
);
const AFFINITY: Descriptor = (
    "tokengate_affinity",
    "Requests placed by prefix affinity, by model: on their prefix's home worker (hit) or past \
     it, the home being at its load bound or saturated (spill).",
);
const PENDING: Descriptor = (
    "tokengate_usage_events_pending",
    "Usage events recorded and not yet drained into the ledger.",
);
const QUOTA_INFLIGHT: Descriptor = (
    "tokengate_quota_inflight_requests",
    "Concurrency slots held in this process's quota counters (all scopes).",
);
const QUOTA_HELD: Descriptor = (
    "tokengate_quota_held_tokens",
    "Worst-case tokens held against budgets in this process's quota counters (all scopes).",
);
const QUOTA_REDIS_ERRORS: Descriptor = (
    "tokengate_quota_redis_errors",
    "Admissions for which the shared quota counters in Redis did not answer.",
);
const QUOTA_FALLBACKS: Descriptor = (
    "tokengate_quota_fallback_admissions",
    "Admissions decided on this replica's fallback while Redis was unreachable.",
);
const HEALTHY: Descriptor = (
    "tokengate_worker_healthy",
    "1 while the worker is up (its health probes pass); see tokengate_worker_ejected for its circuit breaker.",
);
const EJECTED: Descriptor = (
    "tokengate_worker_ejected",
    "1 while the worker's circuit breaker keeps it out of rotation (its backoff, or its trial request, runs).",
);
const EJECTIONS: Descriptor = (
    "tokengate_worker_ejections",
    "Times the worker's circuit breaker ejected it (failed trial requests included).",
);
const RETURNS: Descriptor = (
    "tokengate_worker_returns",
    "Times the worker returned to rotation after an ejection (its trial request was answered).",
);
const TRIALS: Descriptor = (
    "tokengate_worker_trial_requests",
    "Requests sent to the worker as its trial while its circuit breaker was half-open.",
);
const OUTSTANDING: Descriptor = (
    "tokengate_worker_outstanding_requests",
    "Requests the gateway has in flight on the worker.",
);
const RUNNING: Descriptor = (
    "tokengate_worker_running_requests",
    "Requests the worker reported running (vllm:num_requests_running) at its last scrape.",
);
const WAITING: Descriptor = (
    "tokengate_worker_waiting_requests",
    "Requests the worker reported queued (vllm:num_requests_waiting) at its last scrape.",
);
const KV_CACHE: Descriptor = (
    "tokengate_worker_kv_cache_usage",
    "KV-cache use, 0 to 1, the worker reported (vllm:kv_cache_usage_perc) at its last scrape.",
);

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on a bad fixture")]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::*;
    use crate::router::{Load, Worker};

    fn event(status: Status, completion: u64) -> UsageEvent {
        crate::usage::test_event(status, completion)
    }

    /// The value of the sample whose series (name and labels) is written exactly `series`.
    fn value<'a>(text: &'a str, series: &str) -> Option<&'a str> {
        text.lines()
            .find(|line| {
                line.strip_prefix(series)
                    .is_some_and(|rest| rest.starts_with(' '))
            })
            .and_then(|line| line.rsplit(' ').next())
    }

    fn one_worker() -> Registry {
        let worker = Worker::new("http://w:1").map(Arc::new).ok();
        Registry::new(worker.into_iter().collect())
    }

    #[test]
    fn each_endpoint_counts_under_its_own_name() {
        let metrics = GatewayMetrics::default();
        for (times, endpoint) in Endpoint::ALL.into_iter().enumerate() {
            for _ in 0..=times {
                let event = UsageEvent {
                    endpoint,
                    ..event(Status::Completed, 0)
                };
                metrics.observe_event(&event, Duration::from_millis(1), Duration::ZERO);
            }
        }
        let text = metrics.render(
            &one_worker(),
            0,
            QuotaStats::default(),
            Vec::new(),
            Vec::new(),
        );
        for (times, endpoint) in Endpoint::ALL.into_iter().enumerate() {
            let series = format!(
                "tokengate_requests_total{{endpoint=\"{}\",status=\"completed\"}}",
                endpoint.as_str()
            );
            assert_eq!(
                value(&text, &series),
                Some(&*(times + 1).to_string()),
                "{series}"
            );
        }
    }

    #[test]
    fn renders_what_was_observed() {
        let metrics = GatewayMetrics::default();
        metrics.observe_event(
            &event(Status::Completed, 5),
            Duration::from_millis(3),
            Duration::from_micros(200),
        );
        metrics.observe_event(
            &event(Status::Cancelled, 2),
            Duration::from_millis(30),
            Duration::from_micros(300),
        );
        metrics.reject(&ApiError::InvalidKey);
        metrics.reject(&ApiError::bad_request("x", None));
        metrics.attempt(false);
        metrics.attempt(true);
        let registry = one_worker();
        let text = metrics.render(&registry, 7, QuotaStats::default(), Vec::new(), Vec::new());
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
        assert_eq!(value(&text, "tokengate_upstream_attempts_total"), Some("2"));
        assert_eq!(value(&text, "tokengate_upstream_retries_total"), Some("1"));
        assert_eq!(value(&text, "tokengate_usage_events_pending"), Some("7"));
        assert_eq!(
            value(&text, "tokengate_request_duration_seconds_count"),
            Some("2")
        );
        assert_eq!(
            value(
                &text,
                "tokengate_request_duration_seconds_bucket{le=\"0.005\"}"
            ),
            Some("1")
        );
        assert_eq!(
            value(&text, "tokengate_request_duration_seconds_sum"),
            Some("0.033")
        );
        assert_eq!(
            value(&text, "tokengate_gateway_overhead_seconds_count"),
            Some("2")
        );
        assert_eq!(
            value(
                &text,
                "tokengate_gateway_overhead_seconds_bucket{le=\"0.00025\"}"
            ),
            Some("1")
        );
        assert_eq!(
            value(&text, "tokengate_worker_healthy{worker=\"http://w:1\"}"),
            Some("0")
        );
        for (series, zero) in [
            ("tokengate_worker_ejected", "0"),
            ("tokengate_worker_ejections_total", "0"),
            ("tokengate_worker_returns_total", "0"),
            ("tokengate_worker_trial_requests_total", "0"),
        ] {
            let series = format!("{series}{{worker=\"http://w:1\"}}");
            assert_eq!(value(&text, &series), Some(zero), "{series}");
        }
        let running = "tokengate_worker_running_requests{worker=\"http://w:1\"}";
        assert_eq!(value(&text, running), None, "no scrape yet, no sample");
        registry.workers()[0].set_load(Some(Load {
            running: 3,
            waiting: 2,
            kv_cache_usage: 0.5,
        }));
        let text = metrics.render(&registry, 7, QuotaStats::default(), Vec::new(), Vec::new());
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

    /// A family as read back: its TYPE and its samples (suffix after the family name, labels,
    /// value).
    #[derive(Debug, Default)]
    struct Read {
        kind: String,
        samples: Vec<(String, BTreeMap<String, String>, f64)>,
    }

    /// Reads `text` strictly as Prometheus text (format 0.0.4): every family opens with `# HELP`
    /// then `# TYPE` under the same name, once; every sample belongs to the family above it (a
    /// histogram's by its `_bucket`, `_sum` and `_count` suffixes); label values are quoted and
    /// escaped; values are floats.
    fn read(text: &str) -> BTreeMap<String, Read> {
        assert!(text.ends_with('\n'), "{text}");
        let mut families = BTreeMap::<String, Read>::new();
        let mut current = String::new();
        let mut lines = text.lines();
        while let Some(line) = lines.next() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap();
                assert!(!help.is_empty() && !help.ends_with(".."), "{line}");
                let kind = lines
                    .next()
                    .and_then(|l| l.strip_prefix(&format!("# TYPE {name} ")))
                    .unwrap_or_else(|| panic!("no TYPE after {line}"));
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{kind}");
                let family = Read {
                    kind: kind.to_owned(),
                    ..Read::default()
                };
                assert!(families.insert(name.to_owned(), family).is_none(), "{name}");
                current = name.to_owned();
                continue;
            }
            assert!(!line.starts_with('#'), "{line}");
            let family = families.get_mut(&current).unwrap();
            let (name, labels, value) = parse_sample(line);
            let suffix = name.strip_prefix(current.as_str()).unwrap_or_else(|| {
                panic!("{line} outside its family {current}");
            });
            let allowed: &[&str] = match family.kind.as_str() {
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            assert!(allowed.contains(&suffix), "{line}");
            family.samples.push((suffix.to_owned(), labels, value));
        }
        families
    }

    fn parse_sample(line: &str) -> (&str, BTreeMap<String, String>, f64) {
        let name_end = line.find(['{', ' ']).unwrap();
        let name = &line[..name_end];
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':'),
            "{line}"
        );
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(mut inner) = rest.strip_prefix('{') {
            loop {
                let (key, quoted) = inner.split_once("=\"").unwrap();
                let mut value = String::new();
                let mut chars = quoted.char_indices();
                let end = loop {
                    match chars.next().unwrap() {
                        (_, '\\') => match chars.next().unwrap().1 {
                            'n' => value.push('\n'),
                            c @ ('\\' | '"') => value.push(c),
                            c => panic!("bad escape \\{c} in {line}"),
                        },
                        (i, '"') => break i,
                        (_, c) => value.push(c),
                    }
                };
                assert!(labels.insert(key.to_owned(), value).is_none(), "{line}");
                inner = &quoted[end + 1..];
                match inner.strip_prefix(',') {
                    Some(more) => inner = more,
                    None => {
                        rest = inner.strip_prefix('}').unwrap();
                        break;
                    }
                }
            }
        }
        let value = rest.strip_prefix(' ').unwrap().parse().unwrap();
        (name, labels, value)
    }

    #[test]
    fn renders_valid_exposition_with_every_family_under_its_name() {
        let metrics = GatewayMetrics::default();
        let durations = [0.0005, 0.003, 0.03, 2.0, 700.0];
        for (i, secs) in durations.into_iter().enumerate() {
            let status = [Status::Completed, Status::Failed][i % 2];
            metrics.observe_event(
                &event(status, 1),
                Duration::from_secs_f64(secs),
                Duration::ZERO,
            );
        }
        metrics.first_byte(Duration::from_millis(1));
        metrics.reject(&ApiError::InvalidKey);
        let registry = one_worker();
        registry.workers()[0].set_load(Some(Load {
            running: 1,
            waiting: 0,
            kv_cache_usage: 0.25,
        }));
        let quota = QuotaStats {
            redis_errors: 4,
            ..QuotaStats::default()
        };
        metrics.queue_wait("m", "t", Duration::from_millis(3));
        let queued = vec![QueuedSample {
            model: "m".into(),
            tenant: "t".into(),
            class: Priority::Batch,
            count: 3,
        }];
        let affinity = vec![AffinityCount {
            model: "tiny".into(),
            hits: 5,
            spills: 2,
        }];
        let families = read(&metrics.render(&registry, 0, quota, queued, affinity));

        // Every family the gateway exposed before `prometheus-client`, under the same name and
        // type: dashboards and tests read these.
        let kinds: Vec<_> = families
            .iter()
            .map(|(name, family)| (name.as_str(), family.kind.as_str()))
            .collect();
        let mut expected = vec![
            ("tokengate_requests_total", "counter"),
            ("tokengate_tokens_total", "counter"),
            ("tokengate_rejected_total", "counter"),
            ("tokengate_upstream_attempts_total", "counter"),
            ("tokengate_upstream_retries_total", "counter"),
            ("tokengate_usage_events_pending", "gauge"),
            ("tokengate_quota_inflight_requests", "gauge"),
            ("tokengate_quota_held_tokens", "gauge"),
            ("tokengate_quota_redis_errors_total", "counter"),
            ("tokengate_quota_fallback_admissions_total", "counter"),
            ("tokengate_request_duration_seconds", "histogram"),
            ("tokengate_gateway_overhead_seconds", "histogram"),
            ("tokengate_upstream_first_byte_seconds", "histogram"),
            ("tokengate_queue_wait_seconds", "histogram"),
            ("tokengate_coalesced_calls_total", "counter"),
            ("tokengate_coalesced_requests_total", "counter"),
            ("tokengate_discovery_failures_total", "counter"),
            ("tokengate_discovery_rounds_total", "counter"),
            ("tokengate_journal_sync_seconds", "histogram"),
            ("tokengate_journal_unsynced_age_seconds", "histogram"),
            ("tokengate_queued_requests", "gauge"),
            ("tokengate_affinity_total", "counter"),
            ("tokengate_worker_healthy", "gauge"),
            ("tokengate_worker_ejected", "gauge"),
            ("tokengate_worker_ejections_total", "counter"),
            ("tokengate_worker_returns_total", "counter"),
            ("tokengate_worker_trial_requests_total", "counter"),
            ("tokengate_worker_outstanding_requests", "gauge"),
            ("tokengate_worker_running_requests", "gauge"),
            ("tokengate_worker_waiting_requests", "gauge"),
            ("tokengate_worker_kv_cache_usage", "gauge"),
        ];
        expected.sort_unstable();
        assert_eq!(kinds, expected);

        // Fixed label sets are all there from the start, zeros included.
        let labels = |name: &str, key: &str| -> Vec<String> {
            let mut values: Vec<_> = families[name]
                .samples
                .iter()
                .map(|(_, labels, _)| labels[key].clone())
                .collect();
            values.sort_unstable();
            values
        };
        assert_eq!(families["tokengate_requests_total"].samples.len(), 9);
        assert_eq!(
            labels("tokengate_requests_total", "endpoint"),
            ["chat.completions"; 3]
                .into_iter()
                .chain(["completions"; 3])
                .chain(["embeddings"; 3])
                .collect::<Vec<_>>()
        );
        let mut reasons = REJECTIONS.map(String::from).to_vec();
        reasons.sort_unstable();
        assert_eq!(labels("tokengate_rejected_total", "reason"), reasons);
        assert_eq!(
            labels("tokengate_tokens_total", "kind"),
            ["cached", "completion", "prompt"]
        );
        let redis_errors = &families["tokengate_quota_redis_errors_total"].samples;
        assert_eq!(redis_errors[0].2, 4.0);
        let affinity: Vec<_> = families["tokengate_affinity_total"]
            .samples
            .iter()
            .map(|(_, labels, value)| {
                (labels["model"].as_str(), labels["outcome"].as_str(), *value)
            })
            .collect();
        assert_eq!(affinity, [("tiny", "hit", 5.0), ("tiny", "spill", 2.0)]);

        // A histogram's buckets are cumulative over rising bounds and end at +Inf with _count.
        let duration = &families["tokengate_request_duration_seconds"].samples;
        let buckets: Vec<(f64, f64)> = duration
            .iter()
            .filter(|(suffix, ..)| suffix == "_bucket")
            .map(|(_, labels, n)| (labels["le"].parse().unwrap(), *n))
            .collect();
        assert_eq!(buckets.len(), LATENCY_BOUNDS.len() + 1);
        assert!(
            buckets
                .windows(2)
                .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1)
        );
        let last = buckets.last().unwrap();
        assert_eq!(last.0, f64::INFINITY);
        let only = |suffix: &str| {
            duration
                .iter()
                .find(|(s, ..)| s == suffix)
                .map(|(_, _, v)| *v)
                .unwrap()
        };
        assert_eq!(only("_count"), durations.len() as f64);
        assert_eq!(last.1, only("_count"));
        assert!((only("_sum") - durations.iter().sum::<f64>()).abs() < 1e-9);
        // 0.0005 and 0.003 under 0.005; 700 s only in +Inf.
        assert!(buckets.contains(&(0.005, 2.0)));
        assert!(buckets.contains(&(600.0, 4.0)));
    }
}
