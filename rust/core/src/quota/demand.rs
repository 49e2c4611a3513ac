//! What a request may cost before it runs: a prompt estimate and the most it may generate.
//!
//! The gateway does not tokenize. A prompt's upper bound is its request body's length in bytes
//! (byte-level BPE and byte-fallback tokenizers never produce more tokens than bytes, and the
//! JSON around the text outweighs a chat template's special tokens); its expected size is a
//! quarter of that. Budgets hold the upper bound, so concurrent requests cannot overshoot a
//! budget by more than one request; rate limits take the expected size and settle to the actual
//! count, so a long prompt does not look four times its size to a tokens-per-minute limit.

use super::admission::Demand;
use super::policy::Price;
use crate::api::request::InferenceRequest;
use crate::metering::Usage;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    pub prompt_upper: u64,
    pub prompt_expected: u64,
    /// Every sequence's `max_tokens`, capped by the model's context.
    pub completion_max: u64,
}

impl Estimate {
    /// `context` is the model's context length when a worker reported it; `default_max_tokens`
    /// stands for a missing `max_tokens` when it did not.
    pub fn of(request: &InferenceRequest, context: Option<u64>, default_max_tokens: u64) -> Self {
        let prompts = request.prompts.max(1);
        let sequences = prompts.saturating_mul(request.n.max(1));
        let per_sequence = match (request.max_tokens, context) {
            (Some(max), Some(context)) => max.min(context),
            (Some(max), None) => max,
            (None, Some(context)) => context,
            (None, None) => default_max_tokens,
        };
        let body = u64::try_from(request.body_len()).unwrap_or(u64::MAX);
        let prompt_cap = context.map_or(u64::MAX, |c| c.saturating_mul(prompts));
        Self {
            prompt_upper: body.min(prompt_cap),
            prompt_expected: body.div_ceil(4).min(prompt_cap),
            completion_max: sequences.saturating_mul(per_sequence),
        }
    }

    /// The demand on the counters, with the worst case priced at `price` (no money without one).
    pub fn demand(&self, price: Option<&Price>) -> Demand {
        let worst = Usage {
            prompt_tokens: self.prompt_upper,
            completion_tokens: self.completion_max,
            cached_tokens: 0,
        };
        let prompt = Usage {
            completion_tokens: 0,
            ..worst
        };
        Demand {
            rate_tokens: self.prompt_expected.saturating_add(self.completion_max),
            budget_tokens: self.prompt_upper.saturating_add(self.completion_max),
            budget_money: price.map_or(0, |p| p.cost(&worst)),
            prompt_tokens: self.prompt_upper,
            prompt_money: price.map_or(0, |p| p.cost(&prompt)),
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::api::request::Endpoint;

    fn request(endpoint: Endpoint, body: &str) -> InferenceRequest {
        InferenceRequest::from_json(endpoint, Bytes::from(body.to_owned()), None)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn completion_maximum_counts_every_sequence_and_caps_at_the_context() {
        let body = r#"{"model":"m","prompt":["a","b"],"n":3,"max_tokens":10}"#;
        let estimate = Estimate::of(&request(Endpoint::Completions, body), Some(100), 7);
        assert_eq!(estimate.completion_max, 60);
        assert_eq!(estimate.prompt_upper, body.len() as u64);
        assert_eq!(estimate.prompt_expected, (body.len() as u64).div_ceil(4));
        let capped = Estimate::of(&request(Endpoint::Completions, body), Some(4), 7);
        assert_eq!(capped.completion_max, 2 * 3 * 4);
        assert_eq!(
            capped.prompt_upper, 8,
            "each prompt fits the context or is refused"
        );
    }

    #[test]
    fn missing_max_tokens_means_the_context_or_the_default() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
        let chat = request(Endpoint::ChatCompletions, body);
        assert_eq!(Estimate::of(&chat, Some(512), 7).completion_max, 512);
        assert_eq!(Estimate::of(&chat, None, 7).completion_max, 7);
        let ids = request(Endpoint::Completions, r#"{"model":"m","prompt":[1,2,3]}"#);
        assert_eq!(
            Estimate::of(&ids, None, 7).completion_max,
            7,
            "token ids are one prompt"
        );
    }

    #[test]
    fn demand_prices_the_worst_case() {
        let estimate = Estimate {
            prompt_upper: 1000,
            prompt_expected: 250,
            completion_max: 100,
        };
        let price = Price {
            prompt: 1_000_000,
            cached: 0,
            completion: 2_000_000,
        };
        let demand = estimate.demand(Some(&price));
        assert_eq!(demand.rate_tokens, 350);
        assert_eq!(demand.budget_tokens, 1100);
        assert_eq!(demand.budget_money, 1000 + 200);
        assert_eq!((demand.prompt_tokens, demand.prompt_money), (1000, 1000));
        assert_eq!(estimate.demand(None).budget_money, 0);
    }
}
