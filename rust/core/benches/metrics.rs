//! The request-path cost of the gateway's own `/metrics`: the updates one dispatched request
//! makes (an upstream `attempt`, its `first_byte`, and `observe_event` when it ends), without HTTP.
//!
//!     cargo bench -p gateway-core --bench metrics
//!
//! Prints one JSON object: nanoseconds per request on one thread, and on two threads updating
//! the same metrics. Run by `cargo test` (no `--bench` argument), it only checks itself on a few
//! thousand requests.

#![expect(
    clippy::unwrap_used,
    reason = "a benchmark fails loudly on a bad fixture"
)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use gateway_core::metrics::GatewayMetrics;
use gateway_core::quota::QuotaStats;
use gateway_core::request::Endpoint;
use gateway_core::router::Registry;
use gateway_core::usage::{Status, UsageEvent, UsageSource};
use serde_json::json;

fn event(endpoint: Endpoint, status: Status) -> UsageEvent {
    UsageEvent {
        event_id: "e".into(),
        request_id: "r".into(),
        tenant_id: "t".into(),
        key_id: "k".into(),
        model: "m".into(),
        worker: None,
        endpoint,
        stream: true,
        status,
        http_status: 200,
        prompt_tokens: 20,
        cached_tokens: 4,
        completion_tokens: 16,
        usage_source: UsageSource::Worker,
        started_at_ms: 0,
        finished_at_ms: 0,
    }
}

/// `n` requests' updates, their durations spread over the histograms' buckets (0 to 100 ms).
fn requests(metrics: &GatewayMetrics, events: &[UsageEvent], n: u64) -> Duration {
    let started = Instant::now();
    for i in 0..n {
        let event = &events[(i % events.len() as u64) as usize];
        let elapsed = Duration::from_micros(i % 100_000);
        metrics.attempt(black_box(false));
        metrics.first_byte(black_box(elapsed / 2));
        metrics.observe_event(black_box(event), black_box(elapsed), black_box(elapsed));
    }
    started.elapsed()
}

fn per_request_ns(elapsed: Duration, n: u64) -> f64 {
    elapsed.as_nanos() as f64 / n as f64
}

/// The requests counted in `tokengate_requests_total`, over its label sets.
fn counted(metrics: &GatewayMetrics) -> f64 {
    let text = metrics.render(
        &Registry::new(Vec::new()),
        0,
        QuotaStats::default(),
        Vec::new(),
        Vec::new(),
    );
    text.lines()
        .filter(|line| line.starts_with("tokengate_requests_total{"))
        .map(|line| line.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let n: u64 = if bench { 10_000_000 } else { 10_000 };
    let events = [
        event(Endpoint::ChatCompletions, Status::Completed),
        event(Endpoint::Completions, Status::Completed),
        event(Endpoint::ChatCompletions, Status::Cancelled),
        event(Endpoint::Completions, Status::Failed),
    ];

    let metrics = GatewayMetrics::default();
    requests(&metrics, &events, n / 10);
    let one_thread = per_request_ns(requests(&metrics, &events, n), n);
    let two_threads = {
        let started = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| requests(&metrics, &events, n / 2));
            }
        });
        per_request_ns(started.elapsed(), n)
    };
    assert_eq!(counted(&metrics), (n / 10 + n + n / 2 * 2) as f64);
    println!(
        "{}",
        json!({
            "requests": n,
            "ns_per_request_one_thread": one_thread,
            "ns_per_request_two_threads_shared_metrics": two_threads,
        })
    );
}
