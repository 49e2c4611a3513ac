//! What tracing costs a request while it is off (no `[telemetry] otlp_endpoint`): the root span a
//! surface asks for with the client's `traceparent` in hand, the six children the pipeline opens,
//! and the trace headers of the upstream request; and, always on, the stopwatch behind
//! `tokengate_gateway_overhead_seconds` over a non-streaming request's stretches. No HTTP.
//!
//!     cargo bench -p gateway-core --bench telemetry
//!
//! Prints one JSON object: nanoseconds per request on one thread. Run by `cargo test` (no
//! `--bench` argument), it only checks itself on a few thousand requests.

use std::hint::black_box;
use std::time::Instant;

use gateway_core::child_span;
use gateway_core::metering::Overhead;
use gateway_core::telemetry::{self, TraceHeaders};
use serde_json::json;

const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

/// One request's spans while tracing is off; whether any was built.
fn spans() -> bool {
    let root = telemetry::request_span("http", |name| {
        (name == "traceparent").then_some(black_box(TRACEPARENT))
    });
    let admission = child_span!(&root, "gateway.admission");
    let route = child_span!(&root, "gateway.route");
    let attempt = child_span!(&root, "gateway.attempt");
    let first_byte = child_span!(&attempt, "gateway.first_byte");
    let headers = TraceHeaders::of(&attempt);
    let relay = child_span!(&root, "gateway.relay");
    let metering = child_span!(&root, "gateway.metering");
    let built = [
        &root,
        &admission,
        &route,
        &attempt,
        &first_byte,
        &relay,
        &metering,
    ]
    .iter()
    .any(|span| !span.is_none());
    black_box(headers);
    built
}

/// A non-streaming request's stopwatch: received, body read, attempt, answer, recorded.
fn stopwatch() -> std::time::Duration {
    let mut overhead = Overhead::start();
    overhead.pause();
    overhead.resume();
    overhead.pause();
    overhead.resume();
    overhead.total()
}

fn per_request_ns(n: u64, mut request: impl FnMut()) -> f64 {
    let started = Instant::now();
    for _ in 0..n {
        request();
    }
    started.elapsed().as_nanos() as f64 / n as f64
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let n: u64 = if bench { 10_000_000 } else { 10_000 };
    assert!(!telemetry::on());
    let mut built = false;
    let spans_ns = per_request_ns(n, || built |= spans());
    assert!(!built, "tracing off built a span");
    let stopwatch_ns = per_request_ns(n, || {
        black_box(stopwatch());
    });
    println!(
        "{}",
        json!({
            "requests": n,
            "ns_per_request_spans_tracing_off": spans_ns,
            "ns_per_request_overhead_stopwatch": stopwatch_ns,
        })
    );
}
