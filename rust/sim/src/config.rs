//! The simulator's one configuration document: what it serves, how fast, and how often it fails.
//!
//! It only describes and checks values; the engine that acts on them lives in `engine.rs`.

use serde::Deserialize;

/// Configuration of `gateway sim`. Deserialised once (unknown keys are an error), then fixed for
/// the life of the server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimConfig {
    /// Served model name, the only one `/v1/models` lists and requests may name.
    pub model: String,
    /// Context length: prompt tokens plus max tokens may not exceed it.
    pub max_model_len: u32,
    /// Time to first token, counted from the moment a sequence slot is obtained (at most a day).
    pub ttft_ms: u64,
    /// Inter-token latency; 0 emits every token at once (at most a day).
    pub itl_ms: u64,
    /// Concurrent sequences; further requests wait (and show in `vllm:num_requests_waiting`).
    pub max_num_seqs: usize,
    /// The simulated EOS: generation stops with `finish_reason: "stop"` after this many tokens
    /// unless `max_tokens` stops it first (then `"length"`).
    pub max_output_tokens: u32,
    /// Fraction of generation requests answered with a 500 before generating.
    pub error_rate: f64,
    /// Fraction of streaming requests whose connection is cut halfway through generation.
    pub die_rate: f64,
    /// PRNG seed of the failure injection: the same seed fails the same requests, in arrival order.
    pub seed: u64,
    /// Like `vllm serve --api-key`: when set, every `/v1/...` request must carry
    /// `Authorization: Bearer <api_key>` or gets vLLM's bare 401 `{"error":"Unauthorized"}`.
    pub api_key: Option<String>,
    /// Whether responses carry `usage`. `false` answers as an OpenAI-compatible server that
    /// reports none would: no `usage` in bodies, `stream_options` ignored.
    pub report_usage: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            model: "sim-model".to_owned(),
            max_model_len: 4096,
            ttft_ms: 0,
            itl_ms: 0,
            max_num_seqs: 256,
            max_output_tokens: 64,
            error_rate: 0.0,
            die_rate: 0.0,
            seed: 0,
            api_key: None,
            report_usage: true,
        }
    }
}

/// Largest `max_num_seqs` honoured; tokio's semaphore cannot hold more permits than this anyway.
pub(crate) const MAX_NUM_SEQS_LIMIT: usize = 1 << 24;

/// Longest TTFT or ITL honoured (a day): longer waits are clamped so deadlines never overflow.
pub(crate) const MAX_DELAY_MS: u64 = 24 * 60 * 60 * 1000;

/// A configuration value the simulator cannot run with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SimConfigError {
    #[error("model must not be empty")]
    EmptyModel,
    #[error("max_model_len must be at least 1")]
    ZeroContext,
    #[error("max_num_seqs must be between 1 and {MAX_NUM_SEQS_LIMIT}, got {0}")]
    NumSeqs(usize),
    #[error("{name} must be a fraction between 0 and 1, got {value}")]
    Rate { name: &'static str, value: f64 },
    #[error("{name} must be at most {MAX_DELAY_MS} ms, got {value}")]
    Delay { name: &'static str, value: u64 },
}

impl SimConfig {
    /// Checks every value; `app` also accepts an unchecked config and clamps it (see `normalized`).
    pub fn validate(&self) -> Result<(), SimConfigError> {
        if self.model.is_empty() {
            return Err(SimConfigError::EmptyModel);
        }
        if self.max_model_len == 0 {
            return Err(SimConfigError::ZeroContext);
        }
        if self.max_num_seqs == 0 || self.max_num_seqs > MAX_NUM_SEQS_LIMIT {
            return Err(SimConfigError::NumSeqs(self.max_num_seqs));
        }
        for (name, value) in [("ttft_ms", self.ttft_ms), ("itl_ms", self.itl_ms)] {
            if value > MAX_DELAY_MS {
                return Err(SimConfigError::Delay { name, value });
            }
        }
        for (name, value) in [("error_rate", self.error_rate), ("die_rate", self.die_rate)] {
            if !(0.0..=1.0).contains(&value) {
                return Err(SimConfigError::Rate { name, value });
            }
        }
        Ok(())
    }

    /// The config with every out-of-range value clamped into range, so a server always starts:
    /// at least one sequence slot, a context of at least one token, rates within 0..=1 (NaN as 0),
    /// latencies of at most `MAX_DELAY_MS`.
    pub(crate) fn normalized(mut self) -> Self {
        if self.model.is_empty() {
            self.model = Self::default().model;
        }
        self.max_model_len = self.max_model_len.max(1);
        self.max_num_seqs = self.max_num_seqs.clamp(1, MAX_NUM_SEQS_LIMIT);
        self.ttft_ms = self.ttft_ms.min(MAX_DELAY_MS);
        self.itl_ms = self.itl_ms.min(MAX_DELAY_MS);
        self.error_rate = clamp_rate(self.error_rate);
        self.die_rate = clamp_rate(self.die_rate);
        self
    }
}

fn clamp_rate(rate: f64) -> f64 {
    if rate.is_nan() {
        0.0
    } else {
        rate.clamp(0.0, 1.0)
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on a bad fixture")]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documented_values() {
        let c = SimConfig::default();
        assert_eq!(c.model, "sim-model");
        assert_eq!(c.max_model_len, 4096);
        assert_eq!((c.ttft_ms, c.itl_ms), (0, 0));
        assert_eq!(c.max_num_seqs, 256);
        assert_eq!(c.max_output_tokens, 64);
        assert_eq!((c.error_rate, c.die_rate, c.seed), (0.0, 0.0, 0));
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn partial_documents_take_defaults_and_unknown_keys_are_rejected() {
        let c: SimConfig = serde_json::from_str(r#"{"model":"m","itl_ms":5}"#).unwrap();
        assert_eq!((c.model.as_str(), c.itl_ms, c.max_num_seqs), ("m", 5, 256));
        assert!(serde_json::from_str::<SimConfig>(r#"{"modle":"m"}"#).is_err());
    }

    #[test]
    fn validate_names_the_bad_value_and_normalized_clamps_it() {
        let bad = SimConfig {
            max_num_seqs: 0,
            itl_ms: u64::MAX,
            error_rate: 1.5,
            die_rate: f64::NAN,
            ..SimConfig::default()
        };
        assert_eq!(bad.validate(), Err(SimConfigError::NumSeqs(0)));
        let fixed = bad.normalized();
        assert_eq!(fixed.max_num_seqs, 1);
        assert_eq!((fixed.error_rate, fixed.die_rate), (1.0, 0.0));
        assert_eq!(fixed.itl_ms, MAX_DELAY_MS);
        assert_eq!(fixed.validate(), Ok(()));
    }
}
