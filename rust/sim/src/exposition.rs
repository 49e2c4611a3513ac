//! Prometheus text (format 0.0.4) written as vLLM's `/metrics` writes it, through Python's
//! `prometheus_client`: counters' HELP and TYPE under their `_total` name, every value a float
//! as Python prints it (`1.0`, `0.25`, `1.234567e+06`), labels in name order (`le` among them).
//!
//! The gateway's own `/metrics` is written by the `prometheus-client` crate, which cannot write
//! this: it prints counts as integers (`3`, not `3.0`), bucket bounds as Go does (`le="1"`, not
//! `le="1.0"`), puts `le` after the other labels, and ends every HELP text with a full stop. The
//! simulator keeps this writer to match a real worker's text, not only its values.
//!
//! Not written, though vLLM's client writes them: the `_created` gauges beside each counter and
//! histogram.
//!
//! Every atomic here uses `Ordering::Relaxed`: each value is an independent tally that no other
//! memory is published through, and readers need only eventually-current totals.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A fixed-bucket histogram of durations. Buckets hold non-cumulative counts; rendering sums
/// them, so a scrape racing an observation may see `_count` and buckets one apart, as Prometheus
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

    /// Renders the family; `labels` go on every sample.
    pub(crate) fn render(&self, out: &mut String, family: &Family, labels: &[(&str, &str)]) {
        header(out, family);
        let bucket = format!("{}_bucket", family.name);
        let mut cumulative = 0;
        let mut write_bucket = |le: &str, n: u64| {
            let mut with_le = labels.to_vec();
            with_le.push(("le", le));
            sample_line(out, &bucket, &with_le, n as f64);
        };
        for (&bound, n) in self.bounds.iter().zip(self.buckets.iter()) {
            cumulative += n.load(Ordering::Relaxed);
            write_bucket(&float(bound), cumulative);
        }
        let count = self.count.load(Ordering::Relaxed);
        write_bucket("+Inf", count);
        let name = family.name;
        sample_line(out, &format!("{name}_count"), labels, count as f64);
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        sample_line(out, &format!("{name}_sum"), labels, sum);
    }
}

/// A metric family's name (a counter's with `_total`), help text and type.
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

/// A single-sample family: HELP, TYPE, then its sample.
pub(crate) fn single(out: &mut String, family: &Family, labels: &[(&str, &str)], value: f64) {
    header(out, family);
    sample_line(out, family.name, labels, value);
}

/// `name{labels} value`: labels sorted by name and escaped (backslash, quote, newline), the value
/// as Python's client prints it.
pub(crate) fn sample_line(out: &mut String, name: &str, labels: &[(&str, &str)], value: f64) {
    out.push_str(name);
    let mut labels = labels.to_vec();
    labels.sort_unstable_by_key(|&(key, _)| key);
    for (i, (key, value)) in labels.iter().enumerate() {
        out.push(if i == 0 { '{' } else { ',' });
        let _ = write!(out, "{key}=\"");
        for c in value.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    if !labels.is_empty() {
        out.push('}');
    }
    let _ = writeln!(out, " {}", float(value));
}

/// `v` as Python's `prometheus_client` writes a value or a bucket bound (`floatToGoString`):
/// Python's `repr`, except that a positive number with seven or more digits before the point takes
/// Go's exponent form, `1.234567e+06` (and, as Python's client writes it, `e+010` from ten digits
/// on).
pub(crate) fn float(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "+Inf" } else { "-Inf" }.into();
    }
    let repr = python_repr(v);
    match repr.find('.') {
        Some(dot) if v > 0.0 && dot > 6 => {
            let digits = format!("{}.{}{}", &repr[..1], &repr[1..dot], &repr[dot + 1..]);
            format!("{}e+0{}", digits.trim_end_matches(['0', '.']), dot - 1)
        }
        _ => repr,
    }
}

/// Python's `repr` of a finite float. Rust's `Debug` has the same shortest round-trip digits and
/// the same switch to an exponent (below 1e-4, from 1e16), but writes it `1e16`, `1.5e-5` where
/// Python writes `1e+16`, `1.5e-05`.
fn python_repr(v: f64) -> String {
    let debug = format!("{v:?}");
    let Some((mantissa, exponent)) = debug.split_once('e') else {
        return debug;
    };
    let (sign, digits) = match exponent.strip_prefix('-') {
        Some(digits) => ('-', digits),
        None => ('+', exponent),
    };
    format!("{mantissa}e{sign}{digits:0>2}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_read_as_pythons_client_writes_them() {
        for (v, python) in [
            (0.0, "0.0"),
            (12.0, "12.0"),
            (0.25, "0.25"),
            (0.0025, "0.0025"),
            (123_456.0, "123456.0"),
            (1_000_000.0, "1e+06"),
            (1_234_567.0, "1.234567e+06"),
            (12_345_678_901.0, "1.2345678901e+010"),
            (1.5e-5, "1.5e-05"),
            (2e16, "2e+16"),
            (-3.0, "-3.0"),
            (f64::INFINITY, "+Inf"),
        ] {
            assert_eq!(float(v), python, "{v:?}");
        }
    }

    #[test]
    fn labels_are_sorted_and_escaped() {
        let mut out = String::new();
        sample_line(&mut out, "m", &[("b", "x\"y\\\n"), ("a", "1")], 2.0);
        assert_eq!(out, "m{a=\"1\",b=\"x\\\"y\\\\\\n\"} 2.0\n");
        out.clear();
        sample_line(&mut out, "m", &[], 0.5);
        assert_eq!(out, "m 0.5\n");
    }

    #[test]
    fn histogram_buckets_take_le_in_its_place_and_end_at_inf() {
        const BOUNDS: &[f64] = &[0.5, 1.0];
        let h = Histogram::new(BOUNDS);
        h.observe(Duration::from_millis(250));
        h.observe(Duration::from_secs(2));
        let mut out = String::new();
        h.render(
            &mut out,
            &family("h", "histogram", "H."),
            &[("model_name", "m"), ("engine", "0")],
        );
        let expected = "# HELP h H.\n# TYPE h histogram\n\
            h_bucket{engine=\"0\",le=\"0.5\",model_name=\"m\"} 1.0\n\
            h_bucket{engine=\"0\",le=\"1.0\",model_name=\"m\"} 1.0\n\
            h_bucket{engine=\"0\",le=\"+Inf\",model_name=\"m\"} 2.0\n\
            h_count{engine=\"0\",model_name=\"m\"} 2.0\n\
            h_sum{engine=\"0\",model_name=\"m\"} 2.25\n";
        assert_eq!(out, expected);
    }
}
