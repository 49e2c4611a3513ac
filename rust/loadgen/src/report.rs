//! Tallies, latency histograms and the JSON report; no timing or I/O of its own.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::Instant;

use crate::Result;

/// Latencies in nanoseconds, 3 significant digits, up to this bound (larger values saturate).
const MAX_NANOS: u64 = 3_600 * 1_000_000_000;

/// Latency and time-to-first-byte histograms of the successful, recorded requests.
pub struct Histograms {
    latency: Histogram<u64>,
    ttfb: Histogram<u64>,
}

impl Histograms {
    pub fn new() -> Result<Self> {
        Ok(Self {
            latency: Histogram::new_with_bounds(1, MAX_NANOS, 3)?,
            ttfb: Histogram::new_with_bounds(1, MAX_NANOS, 3)?,
        })
    }

    pub fn record(&mut self, ttfb_ns: u64, total_ns: u64) {
        self.ttfb.saturating_record(ttfb_ns.max(1));
        self.latency.saturating_record(total_ns.max(1));
    }
}

/// One worker's counts of recorded (post-warm-up) requests.
#[derive(Default)]
pub struct Tally {
    pub ok: u64,
    /// Non-2xx responses by status code.
    pub status: BTreeMap<u16, u64>,
    pub transport: u64,
    pub timeout: u64,
    /// 2xx streams that lacked `data: [DONE]` or carried an error frame.
    pub bad_stream: u64,
    /// Open-loop slots this worker started, warm-up included.
    pub started: u64,
    pub last_done: Option<Instant>,
}

impl Tally {
    pub fn merge(&mut self, other: Self) {
        self.ok += other.ok;
        for (code, n) in other.status {
            *self.status.entry(code).or_default() += n;
        }
        self.transport += other.transport;
        self.timeout += other.timeout;
        self.bad_stream += other.bad_stream;
        self.started += other.started;
        self.last_done = self.last_done.max(other.last_done);
    }

    pub fn errors(&self) -> u64 {
        self.status.values().sum::<u64>() + self.transport + self.timeout + self.bad_stream
    }
}

#[derive(Serialize)]
pub struct Quantiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
    pub min: f64,
}

impl Quantiles {
    fn of(h: &Histogram<u64>) -> Self {
        // Nanoseconds to microseconds, rounded to 0.1 µs.
        let us = |ns: f64| (ns / 100.0).round() / 10.0;
        let q = |p: f64| us(h.value_at_quantile(p) as f64);
        Self {
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            p999: q(0.999),
            max: us(h.max() as f64),
            mean: us(h.mean()),
            min: us(h.min() as f64),
        }
    }
}

#[derive(Serialize)]
pub struct Errors {
    /// Non-2xx responses by status code.
    pub status: BTreeMap<String, u64>,
    pub transport: u64,
    pub timeout: u64,
    pub bad_stream: u64,
}

/// The JSON printed on stdout.
#[derive(Serialize)]
pub struct Report {
    /// "closed" (saturation at `concurrency`) or "open" (fixed timetable at `target_rps`).
    pub mode: &'static str,
    pub concurrency: usize,
    pub target_rps: Option<f64>,
    pub stream: bool,
    /// Recorded requests that completed: successes plus errors.
    pub requests: u64,
    pub errors: u64,
    pub error_kinds: Errors,
    /// Open loop: slots due before the end that were never sent (the rate was not sustained).
    pub unsent: u64,
    /// From the end of the warm-up to the last recorded completion.
    pub duration_s: f64,
    /// Successful requests per second.
    pub rps: f64,
    /// From send (or from the due time, when the open loop ran behind) to the end of the body.
    pub latency_us: Quantiles,
    /// To the first body byte; with `--stream`, to the first `data:` frame.
    pub ttfb_us: Quantiles,
}

impl Report {
    pub fn new(
        concurrency: usize,
        rate: Option<f64>,
        stream: bool,
        tally: &Tally,
        unsent: u64,
        duration_s: f64,
        hists: &Histograms,
    ) -> Self {
        let errors = tally.errors();
        Self {
            mode: if rate.is_some() { "open" } else { "closed" },
            concurrency,
            target_rps: rate,
            stream,
            requests: tally.ok + errors,
            errors,
            error_kinds: Errors {
                status: tally
                    .status
                    .iter()
                    .map(|(c, n)| (c.to_string(), *n))
                    .collect(),
                transport: tally.transport,
                timeout: tally.timeout,
                bad_stream: tally.bad_stream,
            },
            unsent,
            duration_s: (duration_s * 1e3).round() / 1e3,
            rps: ((tally.ok as f64 / duration_s) * 10.0).round() / 10.0,
            latency_us: Quantiles::of(&hists.latency),
            ttfb_us: Quantiles::of(&hists.ttfb),
        }
    }
}
