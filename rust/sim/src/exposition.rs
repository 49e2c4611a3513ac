//! Prometheus text (format 0.0.4) written as vLLM's `/metrics` writes it, through Python's
//! `prometheus_client`: counters' HELP and TYPE under their `_total` name, every value a float
//! (`1.0`).
//!
//! The gateway's own `/metrics` is written by the `prometheus-client` crate, which cannot write
//! this: it prints counts as integers (`3`, not `3.0`), bucket bounds as Go does (`le="1"`, not
//! `le="1.0"`), and ends every HELP text with a full stop. The simulator keeps this writer to match
//! a real worker's text, not only its values.
//!
//! Every atomic here uses `Ordering::Relaxed`: each value is an independent tally that no other
//! memory is published through, and readers need only eventually-current totals.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A fixed-bucket histogram of durations. Buckets hold non-cumulative counts; rendering sums
/// them, so a scrape racing an observation may see `count` and buckets one apart, as Prometheus
/// clients commonly allow.
#[derive(Debug)]
pub(crate) struct Histogram {
    bounds: &'static [f64],
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub(crate) fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: (0..bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub(crate) fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|&b| secs <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// Renders the family; `labels` (already escaped, may be empty) go on every sample.
    pub(crate) fn render(&self, out: &mut String, family: &Family, labels: &str) {
        header(out, family);
        let name = family.name;
        let (bucket_labels, braced) = if labels.is_empty() {
            (String::new(), String::new())
        } else {
            (format!("{labels},"), format!("{{{labels}}}"))
        };
        let mut cumulative = 0;
        for (bound, bucket) in self.bounds.iter().zip(self.buckets.iter()) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{bucket_labels}le=\"{bound:?}\"}} {cumulative}.0"
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{bucket_labels}le=\"+Inf\"}} {count}.0");
        let _ = writeln!(out, "{name}_count{braced} {count}.0");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{braced} {sum:?}");
    }
}

/// A metric family's name, help text and type.
pub(crate) struct Family {
    pub(crate) name: &'static str,
    pub(crate) help: &'static str,
    pub(crate) kind: &'static str,
}

pub(crate) const fn family(name: &'static str, kind: &'static str, help: &'static str) -> Family {
    Family { name, help, kind }
}

pub(crate) fn header(out: &mut String, family: &Family) {
    let Family { name, help, kind } = family;
    // Writing into a `String` cannot fail; the `fmt::Result`s in this file are ignored for that.
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A single-sample family: HELP, TYPE, then `name{labels} value.0`.
pub(crate) fn sample(out: &mut String, family: &Family, labels: &str, value: u64) {
    header(out, family);
    let _ = writeln!(out, "{}{{{labels}}} {value}.0", family.name);
}

/// Escapes a Prometheus label value (backslash, quote, newline).
pub(crate) fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
