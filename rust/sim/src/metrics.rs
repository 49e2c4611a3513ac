//! The simulator's engine counters and their Prometheus text rendering, named and labelled as
//! vLLM's `/metrics` names them (`vllm:…{engine="0",model_name="…"}`), written as vLLM writes
//! them (see `exposition`).
//!
//! Counters only record what the engine reports; deciding when a token or a prefill happens is
//! `engine.rs`'s job.
//!
//! Every atomic here uses `Ordering::Relaxed`: each value is an independent tally that no other
//! memory is published through, readers need only eventually-current totals, and every update is
//! a single read-modify-write, so no increment is ever lost.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::exposition::{Family, Histogram, family, header, sample_line, single};
use super::plan::Finish;

/// vLLM's KV block size, reported in `vllm:cache_config_info`.
const BLOCK_SIZE: u64 = 16;

/// How a request (one per choice, as vLLM counts parallel-sampling children) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Finished(Finish),
    /// The client went away before the end.
    Abort,
    /// The simulated worker died mid-stream.
    Error,
}

impl Outcome {
    const ALL: [Self; 4] = [
        Self::Finished(Finish::Stop),
        Self::Finished(Finish::Length),
        Self::Abort,
        Self::Error,
    ];

    fn slot(self) -> usize {
        match self {
            Self::Finished(Finish::Stop) => 0,
            Self::Finished(Finish::Length) => 1,
            Self::Abort => 2,
            Self::Error => 3,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Finished(f) => f.as_str(),
            Self::Abort => "abort",
            Self::Error => "error",
        }
    }
}

/// Seconds bucket bounds of vLLM's time-to-first-token histogram (a subset).
const TTFT_BOUNDS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
];

/// Seconds bucket bounds of vLLM's end-to-end latency histogram (a subset).
const E2E_BOUNDS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0,
];

/// The engine's live numbers.
#[derive(Debug)]
pub(crate) struct Metrics {
    running: AtomicU64,
    waiting: AtomicU64,
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
    outcomes: [AtomicU64; 4],
    ttft: Histogram,
    e2e: Histogram,
    /// The `model_name` label.
    model: String,
    max_num_seqs: usize,
    num_gpu_blocks: u64,
}

impl Metrics {
    pub(crate) fn new(model: &str, max_num_seqs: usize, max_model_len: u32) -> Self {
        let blocks_per_seq = u64::from(max_model_len).div_ceil(BLOCK_SIZE);
        Self {
            running: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            outcomes: Default::default(),
            ttft: Histogram::new(TTFT_BOUNDS),
            e2e: Histogram::new(E2E_BOUNDS),
            model: model.to_owned(),
            max_num_seqs,
            num_gpu_blocks: blocks_per_seq.saturating_mul(max_num_seqs as u64),
        }
    }

    pub(crate) fn waiting_delta(&self, up: bool) {
        gauge_step(&self.waiting, up);
    }

    pub(crate) fn running_delta(&self, up: bool) {
        gauge_step(&self.running, up);
    }

    pub(crate) fn add_prompt_tokens(&self, n: u64) {
        self.prompt_tokens.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn add_generation_tokens(&self, n: u64) {
        if n > 0 {
            self.generation_tokens.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub(crate) fn add_outcome(&self, outcome: Outcome, n: u64) {
        self.outcomes[outcome.slot()].fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn observe_ttft(&self, d: Duration) {
        self.ttft.observe(d);
    }

    pub(crate) fn observe_e2e(&self, d: Duration) {
        self.e2e.observe(d);
    }

    #[cfg(test)]
    pub(crate) fn snapshot(&self) -> (u64, u64, u64, u64) {
        (
            self.running.load(Ordering::Relaxed),
            self.waiting.load(Ordering::Relaxed),
            self.prompt_tokens.load(Ordering::Relaxed),
            self.generation_tokens.load(Ordering::Relaxed),
        )
    }

    /// The Prometheus text exposition (format 0.0.4), as vLLM's Python client writes it.
    pub(crate) fn render(&self) -> String {
        let l = [("engine", "0"), ("model_name", self.model.as_str())];
        let mut out = String::with_capacity(6 * 1024);
        let running = self.running.load(Ordering::Relaxed);
        let prompt = self.prompt_tokens.load(Ordering::Relaxed) as f64;
        let generated = self.generation_tokens.load(Ordering::Relaxed) as f64;
        let waiting = self.waiting.load(Ordering::Relaxed);
        single(&mut out, &RUNNING, &l, running as f64);
        single(&mut out, &WAITING, &l, waiting as f64);
        let usage = running as f64 / self.max_num_seqs as f64;
        single(&mut out, &KV_USAGE, &l, usage);
        single(&mut out, &PROMPT_TOKENS, &l, prompt);
        single(&mut out, &GENERATION_TOKENS, &l, generated);
        single(&mut out, &PREFIX_QUERIES, &l, prompt);
        single(&mut out, &PREFIX_HITS, &l, 0.0);
        header(&mut out, &SUCCESS);
        for outcome in Outcome::ALL {
            let n = self.outcomes[outcome.slot()].load(Ordering::Relaxed);
            let labels = [l[0], l[1], ("finished_reason", outcome.label())];
            sample_line(&mut out, SUCCESS.name, &labels, n as f64);
        }
        self.ttft.render(&mut out, &TTFT, &l);
        self.e2e.render(&mut out, &E2E, &l);
        let (block_size, blocks) = (BLOCK_SIZE.to_string(), self.num_gpu_blocks.to_string());
        let config = [
            l[0],
            l[1],
            ("block_size", block_size.as_str()),
            ("cache_dtype", "auto"),
            ("num_cpu_blocks", "None"),
            ("num_gpu_blocks", blocks.as_str()),
        ];
        single(&mut out, &CACHE_CONFIG, &config, 1.0);
        out
    }
}

const RUNNING: Family = family(
    "vllm:num_requests_running",
    "gauge",
    "Number of requests in model execution batches.",
);
const WAITING: Family = family(
    "vllm:num_requests_waiting",
    "gauge",
    "Number of requests waiting to be processed.",
);
const KV_USAGE: Family = family(
    "vllm:kv_cache_usage_perc",
    "gauge",
    "KV-cache usage. 1 means 100 percent usage.",
);
const PROMPT_TOKENS: Family = family(
    "vllm:prompt_tokens_total",
    "counter",
    "Number of prefill tokens processed.",
);
const GENERATION_TOKENS: Family = family(
    "vllm:generation_tokens_total",
    "counter",
    "Number of generation tokens processed.",
);
const PREFIX_QUERIES: Family = family(
    "vllm:prefix_cache_queries_total",
    "counter",
    "Prefix cache queries, in terms of number of queried tokens.",
);
const PREFIX_HITS: Family = family(
    "vllm:prefix_cache_hits_total",
    "counter",
    "Prefix cache hits, in terms of number of cached tokens.",
);
const SUCCESS: Family = family(
    "vllm:request_success_total",
    "counter",
    "Count of successfully processed requests.",
);
const TTFT: Family = family(
    "vllm:time_to_first_token_seconds",
    "histogram",
    "Histogram of time to first token in seconds.",
);
const E2E: Family = family(
    "vllm:e2e_request_latency_seconds",
    "histogram",
    "Histogram of e2e request latency in seconds.",
);
const CACHE_CONFIG: Family = family(
    "vllm:cache_config_info",
    "gauge",
    "Information of the LLMEngine CacheConfig",
);

/// Moves a gauge by one. Never below zero: every decrement is paired with an earlier increment
/// by the RAII guards in `engine.rs`.
fn gauge_step(gauge: &AtomicU64, up: bool) {
    if up {
        gauge.fetch_add(1, Ordering::Relaxed);
    } else {
        gauge.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample whose series (name and labels) is written exactly `series`.
    fn sample<'a>(text: &'a str, series: &str) -> Option<&'a str> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
    }

    #[test]
    fn render_names_labels_and_types_like_vllm() {
        let m = Metrics::new("my\"model", 4, 100);
        m.running_delta(true);
        m.waiting_delta(true);
        m.add_prompt_tokens(12);
        m.add_generation_tokens(5);
        m.add_outcome(Outcome::Finished(Finish::Length), 2);
        m.observe_ttft(Duration::from_millis(30));
        let text = m.render();
        let l = "{engine=\"0\",model_name=\"my\\\"model\"}";
        assert_eq!(
            sample(&text, &format!("vllm:num_requests_running{l}")),
            Some("1.0")
        );
        assert_eq!(
            sample(&text, &format!("vllm:num_requests_waiting{l}")),
            Some("1.0")
        );
        assert_eq!(
            sample(&text, &format!("vllm:kv_cache_usage_perc{l}")),
            Some("0.25")
        );
        assert_eq!(
            sample(&text, &format!("vllm:prompt_tokens_total{l}")),
            Some("12.0")
        );
        assert_eq!(
            sample(&text, &format!("vllm:generation_tokens_total{l}")),
            Some("5.0")
        );
        assert!(text.contains(
            "# HELP vllm:generation_tokens_total Number of generation tokens processed.\n\
             # TYPE vllm:generation_tokens_total counter\n"
        ));
        // Labels in name order, as Python's client writes them.
        let model = "model_name=\"my\\\"model\"";
        assert_eq!(
            sample(
                &text,
                &format!(
                    "vllm:request_success_total{{engine=\"0\",finished_reason=\"length\",{model}}}"
                )
            ),
            Some("2.0")
        );
        let bucket = "vllm:time_to_first_token_seconds_bucket";
        for (le, n) in [
            ("0.02", "0.0"),
            ("0.04", "1.0"),
            ("1.0", "1.0"),
            ("+Inf", "1.0"),
        ] {
            let series = format!("{bucket}{{engine=\"0\",le=\"{le}\",{model}}}");
            assert_eq!(sample(&text, &series), Some(n), "{series}");
        }
        assert_eq!(
            sample(&text, &format!("vllm:time_to_first_token_seconds_count{l}")),
            Some("1.0")
        );
        let config = format!(
            "vllm:cache_config_info{{block_size=\"16\",cache_dtype=\"auto\",engine=\"0\",{model},\
             num_cpu_blocks=\"None\",num_gpu_blocks=\"28\"}}"
        );
        assert_eq!(sample(&text, &config), Some("1.0"));
        // Every sample line is `name{labels} value`, every metric has HELP and TYPE.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("vllm:") && line.contains("} "), "{line}");
        }
        assert_eq!(
            text.matches("# HELP ").count(),
            text.matches("# TYPE ").count()
        );
    }
}
