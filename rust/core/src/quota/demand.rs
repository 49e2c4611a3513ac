//! What a request may cost before it runs: a prompt estimate and the most it may generate.
//!
//! The gateway does not tokenize. A prompt's upper bound is its request body's length in bytes
//! (byte-level BPE and byte-fallback tokenizers never produce more tokens than bytes, and the
//! JSON around the text outweighs a chat template's special tokens); its expected size is a
//! quarter of that. The completion's maximum is every sequence's `max_tokens` (n × prompts
//! sequences), or the model's context when the client set none; an embeddings request has none
//! (its worst case is its prompt). And since a worker serves no
//! sequence past its context, a request never uses more than `sequences × context` tokens in all,
//! prompt included. Budgets hold the worst case and admit a request only if it fits, so no
//! number of concurrent requests spends past a budget; rate limits take the expected size and
//! settle to the actual count, so a long prompt does not look four times its size to a
//! tokens-per-minute limit.
//!
//! Every figure is a saturating product or sum of what the client sent, capped at
//! [`COUNT_CAP`]: a client's `n` of 2^62 makes a demand no budget admits, never a wrapped one.

use super::admission::{COUNT_CAP, Demand};
use super::policy::Price;
use crate::request::InferenceRequest;
use crate::usage::Usage;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    pub prompt_upper: u64,
    pub prompt_expected: u64,
    /// Every sequence's completion maximum: `sequences × max_tokens` (or × the context, or ×
    /// `quota.default_max_tokens` when the context is unknown).
    pub completion_max: u64,
    /// Sequences the request generates: `n` × prompts.
    pub sequences: u64,
    /// The most tokens it can use in all, prompt and completion: `sequences × context` when the
    /// context is known, else unbounded (`COUNT_CAP`).
    pub total_max: u64,
    /// Whether the client set `max_tokens` (or `max_completion_tokens`) itself.
    pub max_tokens_set: bool,
}

impl Default for Estimate {
    /// A request that costs nothing: one sequence, no prompt, no completion.
    fn default() -> Self {
        Self {
            prompt_upper: 0,
            prompt_expected: 0,
            completion_max: 0,
            sequences: 1,
            total_max: COUNT_CAP,
            max_tokens_set: true,
        }
    }
}

impl Estimate {
    /// `context` is the model's context length when a worker reported it; `default_max_tokens`
    /// stands for a missing `max_tokens` when it did not.
    pub fn of(request: &InferenceRequest, context: Option<u64>, default_max_tokens: u64) -> Self {
        let prompts = request.prompts.max(1);
        let sequences = prompts.saturating_mul(request.n.max(1)).min(COUNT_CAP);
        let per_sequence = match (request.max_tokens, context) {
            // Embeddings read their prompts and generate nothing.
            _ if !request.endpoint.generates() => 0,
            (Some(max), Some(context)) => max.min(context),
            (Some(max), None) => max,
            (None, Some(context)) => context,
            (None, None) => default_max_tokens,
        };
        let body = u64::try_from(request.body_len()).unwrap_or(u64::MAX);
        let prompt_cap = context.map_or(u64::MAX, |c| c.saturating_mul(prompts));
        Self {
            prompt_upper: body.min(prompt_cap).min(COUNT_CAP),
            prompt_expected: body.div_ceil(4).min(prompt_cap).min(COUNT_CAP),
            completion_max: sequences.saturating_mul(per_sequence).min(COUNT_CAP),
            sequences,
            total_max: context.map_or(COUNT_CAP, |c| c.saturating_mul(sequences).min(COUNT_CAP)),
            max_tokens_set: request.max_tokens.is_some(),
        }
    }

    /// The most tokens the request can use, prompt and completion.
    pub fn worst_tokens(&self) -> u64 {
        self.prompt_upper
            .saturating_add(self.completion_max)
            .min(self.total_max)
    }

    /// The worst case as usage priced at `price`: the pricier class filled first, within the
    /// prompt bound, the completion maximum and the total.
    fn worst_usage(&self, price: &Price) -> Usage {
        let total = self.worst_tokens();
        let (prompt_tokens, completion_tokens) = if price.completion >= price.prompt {
            let completion = self.completion_max.min(total);
            (
                self.prompt_upper.min(total.saturating_sub(completion)),
                completion,
            )
        } else {
            let prompt = self.prompt_upper.min(total);
            (
                prompt,
                self.completion_max.min(total.saturating_sub(prompt)),
            )
        };
        Usage {
            prompt_tokens,
            completion_tokens,
            cached_tokens: 0,
        }
    }

    /// The demand on the counters, with the worst case priced at `price` (no money without one).
    pub fn demand(&self, price: Option<&Price>) -> Demand {
        let rate = self
            .prompt_expected
            .saturating_add(self.completion_max)
            .min(self.total_max);
        Demand {
            rate_tokens: rate,
            budget_tokens: self.worst_tokens(),
            budget_money: price.map_or(0, |p| p.cost(&self.worst_usage(p)).min(COUNT_CAP)),
        }
    }

    /// A `max_tokens` with which the request would fit in `left` tokens, if any: for a refusal's
    /// message. The body grows when the client writes it (`,"max_tokens":` and up to 20 digits),
    /// and so does the prompt's bound: that much is left aside.
    pub fn max_tokens_within(&self, left: u64) -> Option<u64> {
        const WRITTEN: u64 = 36;
        let per_sequence = left
            .saturating_sub(self.prompt_upper)
            .saturating_sub(WRITTEN)
            .checked_div(self.sequences)
            .unwrap_or(0);
        (per_sequence > 0).then_some(per_sequence)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::request::Endpoint;

    fn request(endpoint: Endpoint, body: &str) -> InferenceRequest {
        InferenceRequest::from_json(endpoint, Bytes::from(body.to_owned()), None)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn completion_maximum_counts_every_sequence_and_caps_at_the_context() {
        let body = r#"{"model":"m","prompt":["a","b"],"n":3,"max_tokens":10}"#;
        let estimate = Estimate::of(&request(Endpoint::Completions, body), Some(100), 7);
        assert_eq!(estimate.completion_max, 60);
        assert_eq!(estimate.sequences, 6);
        assert_eq!(estimate.prompt_upper, body.len() as u64);
        assert_eq!(estimate.prompt_expected, (body.len() as u64).div_ceil(4));
        assert_eq!(estimate.worst_tokens(), body.len() as u64 + 60);
        let capped = Estimate::of(&request(Endpoint::Completions, body), Some(4), 7);
        assert_eq!(capped.completion_max, 2 * 3 * 4);
        assert_eq!(
            capped.prompt_upper, 8,
            "each prompt fits the context or is refused"
        );
        assert_eq!(
            capped.worst_tokens(),
            6 * 4,
            "no sequence runs past the context, prompt included"
        );
    }

    #[test]
    fn missing_max_tokens_means_the_context_or_the_default() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
        let chat = request(Endpoint::ChatCompletions, body);
        let known = Estimate::of(&chat, Some(512), 7);
        assert_eq!(known.completion_max, 512);
        assert_eq!(
            known.worst_tokens(),
            512,
            "prompt and completion share the context"
        );
        assert!(!known.max_tokens_set);
        assert_eq!(Estimate::of(&chat, None, 7).completion_max, 7);
        let ids = request(Endpoint::Completions, r#"{"model":"m","prompt":[1,2,3]}"#);
        assert_eq!(
            Estimate::of(&ids, None, 7).completion_max,
            7,
            "token ids are one prompt"
        );
    }

    #[test]
    fn embeddings_reserve_their_prompt_and_no_completion() {
        let body = r#"{"model":"m","input":["a","b","c"],"max_tokens":9,"n":5}"#;
        let embeddings = request(Endpoint::Embeddings, body);
        for context in [None, Some(512)] {
            let estimate = Estimate::of(&embeddings, context, 7);
            assert_eq!(estimate.completion_max, 0, "{context:?}");
            assert_eq!(estimate.sequences, 3, "one per input; `n` is not read");
            assert_eq!(estimate.worst_tokens(), body.len() as u64);
            assert_eq!(
                estimate.demand(None).rate_tokens,
                (body.len() as u64).div_ceil(4)
            );
        }
        let tight = Estimate::of(&embeddings, Some(4), 7);
        assert_eq!(
            tight.worst_tokens(),
            3 * 4,
            "each input fits the context or is refused"
        );
        assert_eq!(
            tight.max_tokens_within(5),
            None,
            "no `max_tokens` to suggest"
        );
    }

    #[test]
    fn hostile_counts_saturate_at_the_cap() {
        let body = r#"{"model":"m","prompt":["a","b"],"n":4611686018427387904,"max_tokens":18446744073709551615}"#;
        let estimate = Estimate::of(&request(Endpoint::Completions, body), None, 7);
        assert_eq!(estimate.sequences, COUNT_CAP);
        assert_eq!(estimate.completion_max, COUNT_CAP);
        let price = Price {
            prompt: u64::MAX,
            cached: u64::MAX,
            completion: u64::MAX,
        };
        let demand = estimate.demand(Some(&price));
        assert_eq!(demand.budget_tokens, COUNT_CAP);
        assert_eq!(demand.budget_money, COUNT_CAP);
        assert_eq!(estimate.max_tokens_within(u64::MAX), Some(2047));
        assert_eq!(estimate.max_tokens_within(0), None);
    }

    #[test]
    fn demand_prices_the_worst_case() {
        let estimate = Estimate {
            prompt_upper: 1000,
            prompt_expected: 250,
            completion_max: 100,
            ..Estimate::default()
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
        assert_eq!(estimate.demand(None).budget_money, 0);
        // Within a total of 500, the pricier completion is filled first.
        let bounded = Estimate {
            total_max: 500,
            ..estimate
        };
        assert_eq!(bounded.demand(Some(&price)).budget_tokens, 500);
        assert_eq!(bounded.demand(Some(&price)).budget_money, 400 + 200);
        assert_eq!(bounded.max_tokens_within(1086), Some(50));
        assert_eq!(bounded.max_tokens_within(1036), None);
    }
}
