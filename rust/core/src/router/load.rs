//! Load signals read from a worker's `/metrics`: requests running and waiting, KV-cache usage,
//! and the KV cache's block size.
//!
//! Parses only the families a router needs from vLLM's Prometheus text, summing gauges over
//! their label sets (one per model and engine). It does not decide where requests go; the
//! routing policy does, from the [`Load`] and block size kept on each worker.

/// What a worker reported about itself at its last scrape.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Load {
    /// `vllm:num_requests_running`: sequences in the running batch.
    pub running: u32,
    /// `vllm:num_requests_waiting`: requests queued inside the worker.
    pub waiting: u32,
    /// `vllm:kv_cache_usage_perc` (`vllm:gpu_cache_usage_perc` before vLLM 0.10): a 0–1 fraction,
    /// the highest over the worker's engines.
    pub kv_cache_usage: f64,
}

const RUNNING: &str = "vllm:num_requests_running";
const WAITING: &str = "vllm:num_requests_waiting";
const KV_CACHE: &str = "vllm:kv_cache_usage_perc";
const KV_CACHE_LEGACY: &str = "vllm:gpu_cache_usage_perc";
/// An info gauge whose labels are the cache's settings, `block_size` (in tokens) among them.
const CACHE_CONFIG: &str = "vllm:cache_config_info";

/// The largest block size believed, in tokens: vLLM's are 16 to a few hundred.
pub const MAX_BLOCK_SIZE: u32 = 4096;

/// What one page of a worker's `/metrics` says.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Report {
    /// `None` when neither request gauge is there (not a vLLM worker, or not one that exports
    /// them).
    pub load: Option<Load>,
    /// Tokens per KV-cache block (`vllm:cache_config_info{block_size}`), when given, 1 to
    /// `MAX_BLOCK_SIZE`; the largest over the worker's engines.
    pub block_size: Option<u32>,
}

/// Reads a worker's load and block size from its Prometheus text.
pub fn parse(text: &str) -> Report {
    let (mut running, mut waiting) = (None::<f64>, None::<f64>);
    let mut kv = None::<f64>;
    let mut block_size = None::<u32>;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((name, labels, value)) = sample(line) else {
            continue;
        };
        match name {
            RUNNING => *running.get_or_insert(0.0) += value,
            WAITING => *waiting.get_or_insert(0.0) += value,
            KV_CACHE | KV_CACHE_LEGACY => kv = Some(kv.map_or(value, |k: f64| k.max(value))),
            CACHE_CONFIG => {
                let size = label(labels, "block_size")
                    .and_then(|v| v.parse::<u32>().ok())
                    .filter(|size| (1..=MAX_BLOCK_SIZE).contains(size));
                block_size = block_size.max(size);
            }
            _ => {}
        }
    }
    let load = (running.is_some() || waiting.is_some()).then(|| {
        let count = |v: Option<f64>| v.map_or(0, |v| v.clamp(0.0, f64::from(u32::MAX)) as u32);
        Load {
            running: count(running),
            waiting: count(waiting),
            kv_cache_usage: kv.unwrap_or(0.0).clamp(0.0, 1.0),
        }
    });
    Report { load, block_size }
}

/// Splits `name{labels} value [timestamp]` into its name, its label set's inside (empty when
/// it has none) and its value. Label values may hold spaces, braces and escaped quotes.
fn sample(line: &str) -> Option<(&str, &str, f64)> {
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = "";
    if rest.starts_with('{') {
        let close = labels_end(rest)?;
        labels = &rest[1..close];
        rest = &rest[close + 1..];
    }
    let value = rest.split_ascii_whitespace().next()?;
    let value: f64 = value.parse().ok()?;
    value.is_finite().then_some((name, labels, value))
}

/// The value of label `key` in a label set's inside (`a="1",b="x"`), as written (escapes
/// kept); `None` when absent.
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    let mut rest = labels;
    loop {
        let (name, after) = rest.split_once("=\"")?;
        let end = quoted_end(after)?;
        if name.trim_start_matches(',').trim() == key {
            return Some(&after[..end]);
        }
        rest = &after[end + 1..];
    }
}

/// The index of the quote that closes a label value `text` starts inside of.
fn quoted_end(text: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, byte) in text.bytes().enumerate() {
        match byte {
            _ if escaped => escaped = false,
            b'\\' => escaped = true,
            b'"' => return Some(i),
            _ => {}
        }
    }
    None
}

/// The index of the `}` that closes the label set `text` starts with.
fn labels_end(text: &str) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, byte) in text.bytes().enumerate() {
        match byte {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b'}' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    // Shaped as vLLM 0.32 writes it: one series per engine, values as floats.
    const VLLM: &str = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 3.0
vllm:num_requests_running{engine="1",model_name="tiny"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny"} 4.0
vllm:num_requests_waiting{engine="1",model_name="tiny"} 0.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="tiny"} 0.5
vllm:prompt_tokens_total{engine="0",model_name="tiny"} 1234.0
"#;

    #[test]
    fn sums_requests_over_engines_and_takes_the_fullest_cache() {
        let load = parse(VLLM).load;
        assert_eq!(
            load,
            Some(Load {
                running: 5,
                waiting: 4,
                kv_cache_usage: 0.5
            })
        );
    }

    #[test]
    fn reads_the_legacy_cache_gauge_and_odd_labels() {
        let text = "vllm:num_requests_running{model_name=\"a} b\\\"c\"} 1\n\
                    vllm:gpu_cache_usage_perc 0.75 1700000000000\n";
        let load = parse(text).load;
        assert_eq!(load.map(|l| (l.running, l.waiting)), Some((1, 0)));
        assert_eq!(load.map(|l| l.kv_cache_usage), Some(0.75));
    }

    #[test]
    fn a_page_without_request_gauges_is_no_load() {
        assert_eq!(parse("process_cpu_seconds_total 1.5\n").load, None);
        assert_eq!(parse("").load, None);
    }

    #[test]
    fn garbage_values_are_skipped_not_trusted() {
        let text = "vllm:num_requests_running NaN\nvllm:num_requests_running 2\n\
                    vllm:num_requests_waiting -3\nvllm:kv_cache_usage_perc 7\nvllm:num_requests_waiting{x=\"1\" 5\n";
        assert_eq!(
            parse(text).load,
            Some(Load {
                running: 2,
                waiting: 0,
                kv_cache_usage: 1.0
            })
        );
    }

    #[test]
    fn reads_the_block_size_from_the_cache_config() {
        // As vLLM 0.32's CPU build writes it (labels sorted, every value a string).
        let text = format!(
            "{VLLM}# TYPE vllm:cache_config_info gauge\n\
             vllm:cache_config_info{{block_size=\"32\",cache_dtype=\"auto\",\
             enable_prefix_caching=\"True\",engine=\"0\",num_gpu_blocks=\"200\",\
             prefix_caching_hash_algo=\"sha256\"}} 1.0\n"
        );
        assert_eq!(parse(&text).block_size, Some(32));
        assert_eq!(parse(VLLM).block_size, None);
    }

    #[test]
    fn a_block_size_is_read_only_from_its_own_label_and_within_bounds() {
        let page = |labels: &str| format!("vllm:cache_config_info{{{labels}}} 1\n");
        let cases = [
            (r#"engine="0",block_size="16""#, Some(16)),
            (r#"x="block_size=\"64\"",block_size="128""#, Some(128)),
            (r#"kv_block_size="32""#, None),
            (r#"block_size="0""#, None),
            (r#"block_size="4097""#, None),
            (r#"block_size="-1""#, None),
            (r#"block_size="99999999999999999999""#, None),
            (r#"block_size="32"#, None),
        ];
        for (labels, expected) in cases {
            assert_eq!(parse(&page(labels)).block_size, expected, "{labels}");
        }
    }
}
