//! What a validated request will generate: prompt token counts and, per choice, how many tokens
//! it produces, their text, and why it stops, all decided up front (generation is deterministic).
//!
//! It neither parses requests (`request.rs`) nor keeps time or counts (`engine.rs`).

use super::config::SimConfig;
use super::response::ApiError;
use super::tokens::{self, StopCut};

/// Most choices (prompts × `n`) one request may ask for; vLLM has no such limit, but a
/// simulator must not be made to allocate without bound by one request.
pub(crate) const MAX_CHOICES: usize = 4096;

/// Which OpenAI route a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Chat,
    Completion,
}

/// Why a choice stopped generating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Finish {
    Stop,
    Length,
}

impl Finish {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// What a streaming request asked `stream_options` for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StreamMode {
    pub include_usage: bool,
    pub continuous_usage: bool,
}

impl StreamMode {
    pub(crate) const NO_USAGE: Self = Self {
        include_usage: false,
        continuous_usage: false,
    };
}

/// One choice's whole future, decided up front (generation is deterministic).
#[derive(Debug, Clone)]
pub(crate) struct Choice {
    /// Index into `Plan::prompt_tokens` of the prompt it continues.
    pub prompt: usize,
    pub tokens: u32,
    pub finish: Finish,
    stream: u64,
    cut: Option<StopCut>,
}

impl Choice {
    /// The text streamed with generated token `pos`.
    pub(crate) fn delta(&self, pos: u32) -> &str {
        match &self.cut {
            Some(cut) => cut.delta(pos),
            None => tokens::token_text(self.stream, pos),
        }
    }

    /// The id of generated token `pos` (`return_token_ids`).
    pub(crate) fn token_id(&self, pos: u32) -> u32 {
        tokens::token_id(self.stream, pos)
    }

    /// The stop string that ended this choice, if one did.
    pub(crate) fn stop_reason<'a>(&self, plan: &'a Plan) -> Option<&'a str> {
        let matched = self.cut.as_ref()?.matched?;
        plan.stops.get(matched).map(String::as_str)
    }
}

/// A validated generation request, resolved against the config.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub kind: Kind,
    /// `None` for a non-streaming request.
    pub stream: Option<StreamMode>,
    /// Prompt tokens of each prompt (chat has exactly one).
    pub prompt_tokens: Vec<u32>,
    /// Choices in response order: index `prompt * n + i`.
    pub choices: Vec<Choice>,
    pub stops: Vec<String>,
    /// With `return_token_ids`: each prompt's token ids, and each choice's generated ids.
    pub prompt_ids: Option<Vec<Vec<u32>>>,
}

impl Plan {
    pub(crate) fn total_prompt_tokens(&self) -> u64 {
        self.prompt_tokens.iter().map(|&p| u64::from(p)).sum()
    }

    /// Prompt tokens as vLLM's `prompt_tokens_total` counts them: once per sequence, so each
    /// prompt `n` times, while `usage.prompt_tokens` counts each prompt once.
    pub(crate) fn prefilled_prompt_tokens(&self) -> u64 {
        let n = self.choices.len() / self.prompt_tokens.len().max(1);
        self.total_prompt_tokens() * n as u64
    }

    pub(crate) fn total_completion_tokens(&self) -> u64 {
        self.choices.iter().map(|c| u64::from(c.tokens)).sum()
    }

    /// Decode steps: the longest choice's token count.
    pub(crate) fn steps(&self) -> u32 {
        self.choices.iter().map(|c| c.tokens).max().unwrap_or(0)
    }
}

/// The sampling parameters both routes share, validated.
#[derive(Debug, Clone)]
pub(crate) struct Sampling {
    pub n: u32,
    pub stream: Option<StreamMode>,
    /// Non-empty stop strings.
    pub stops: Vec<String>,
    /// The request's seed, 0 without one.
    pub seed: u64,
    /// `temperature: 0`: every choice is the same greedy sequence.
    pub greedy: bool,
    pub ignore_eos: bool,
}

/// Resolves max tokens (checking the context) and plans every choice, prompt-major.
pub(crate) fn build(
    kind: Kind,
    prompt_tokens: Vec<u32>,
    max_tokens: Option<u32>,
    sampling: Sampling,
    config: &SimConfig,
) -> Result<Plan, ApiError> {
    let context = config.max_model_len;
    let n = sampling.n as usize;
    if prompt_tokens.len().saturating_mul(n) > MAX_CHOICES {
        return Err(ApiError::bad_request(format!(
            "The simulator serves at most {MAX_CHOICES} choices per request (prompts × n)."
        ))
        .with_param("n"));
    }
    let mut choices = Vec::with_capacity(prompt_tokens.len() * n);
    for (prompt, &p) in prompt_tokens.iter().enumerate() {
        let max = match max_tokens {
            Some(m) if u64::from(p) + u64::from(m) > u64::from(context) => {
                return Err(ApiError::context_exceeded(context, p, m));
            }
            Some(m) => m,
            None if p >= context => return Err(ApiError::prompt_too_long(context, p)),
            None => context - p,
        };
        let (limit, finish) = if sampling.ignore_eos || max <= config.max_output_tokens {
            (max, Finish::Length)
        } else {
            (config.max_output_tokens, Finish::Stop)
        };
        for index in 0..sampling.n {
            let stream = tokens::choice_stream(sampling.seed, index, sampling.greedy);
            let mut choice = Choice {
                prompt,
                tokens: limit,
                finish,
                stream,
                cut: None,
            };
            if !sampling.stops.is_empty() {
                let cut = StopCut::generate(stream, limit, &sampling.stops);
                if cut.matched.is_some() {
                    choice.finish = Finish::Stop;
                }
                choice.tokens = cut.tokens;
                choice.cut = Some(cut);
            }
            choices.push(choice);
        }
    }
    Ok(Plan {
        kind,
        stream: sampling.stream,
        prompt_tokens,
        choices,
        stops: sampling.stops,
        prompt_ids: None,
    })
}

/// A length as `u32`, saturated.
pub(crate) fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on a bad fixture")]
mod tests {
    use axum::http::StatusCode;

    use super::*;
    use crate::request::{chat, completion};
    use crate::test_support::{config, err};

    #[test]
    fn chat_counts_prompt_tokens_and_resolves_max_tokens_like_vllm() {
        let c = config();
        let body = r#"{"messages":[{"role":"system","content":"be brief"},
            {"role":"user","content":[{"type":"text","text":"one two three"},
                                      {"type":"image_url","image_url":{}}]}],
            "max_tokens":50,"max_completion_tokens":4,"unknown":{"x":[1]}}"#;
        let plan = chat(body.as_bytes(), &c).unwrap();
        assert_eq!(plan.prompt_tokens, vec![(2 + 4) + (3 + 4) + 3]);
        assert_eq!(
            (plan.choices[0].tokens, plan.choices[0].finish),
            (4, Finish::Length)
        );
        assert_eq!(plan.stream, None);
        // No max: the rest of the context, which the EOS point (10) undercuts.
        let plan = chat(br#"{"messages":[{"role":"user","content":"hi"}]}"#, &c).unwrap();
        assert_eq!(
            (plan.choices[0].tokens, plan.choices[0].finish),
            (10, Finish::Stop)
        );
        // ignore_eos runs to max_tokens.
        let plan = chat(br#"{"messages":[],"max_tokens":30,"ignore_eos":true}"#, &c).unwrap();
        assert_eq!(
            (plan.choices[0].tokens, plan.choices[0].finish),
            (30, Finish::Length)
        );
    }

    #[test]
    fn completions_index_choices_prompt_major_and_default_to_16() {
        let c = SimConfig {
            max_output_tokens: 64,
            ..config()
        };
        let plan = completion(br#"{"prompt":["a b","c d e"],"n":2}"#, &c).unwrap();
        assert_eq!(plan.prompt_tokens, vec![3, 4]);
        let prompts: Vec<_> = plan.choices.iter().map(|ch| ch.prompt).collect();
        assert_eq!(prompts, vec![0, 0, 1, 1]);
        assert!(
            plan.choices
                .iter()
                .all(|ch| (ch.tokens, ch.finish) == (16, Finish::Length))
        );
        assert_eq!(
            (plan.total_prompt_tokens(), plan.total_completion_tokens()),
            (7, 64)
        );
        let ids = completion(br#"{"prompt":[[1,2,3],[4]],"max_tokens":2}"#, &c).unwrap();
        assert_eq!(ids.prompt_tokens, vec![3, 1]);
        let ids = completion(br#"{"prompt":[5,6,7,8]}"#, &c).unwrap();
        assert_eq!(ids.prompt_tokens, vec![4]);
    }

    #[test]
    fn seeded_greedy_output_is_reproducible_and_stop_strings_cut_it() {
        let c = config();
        let body = br#"{"prompt":"x","seed":9,"temperature":0,"n":2}"#;
        let (a, b) = (completion(body, &c).unwrap(), completion(body, &c).unwrap());
        let text = |p: &Plan, i: usize| {
            (0..p.choices[i].tokens)
                .map(|t| p.choices[i].delta(t))
                .collect::<String>()
        };
        assert_eq!(text(&a, 0), text(&b, 0));
        assert_eq!(text(&a, 0), text(&a, 1));
        let second_word = a.choices[0].delta(1).to_owned();
        let body = format!(r#"{{"prompt":"x","seed":9,"temperature":0,"stop":["{second_word}"]}}"#);
        let cut = completion(body.as_bytes(), &c).unwrap();
        assert_eq!(cut.choices[0].finish, Finish::Stop);
        assert_eq!(cut.choices[0].stop_reason(&cut), Some(second_word.as_str()));
        assert!(cut.choices[0].tokens <= 2);
    }

    #[test]
    fn prompt_plus_max_tokens_over_the_context_is_400() {
        let c = config();
        let e = err(completion(br#"{"prompt":"a b c","max_tokens":97}"#, &c));
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(
            e.message.contains("maximum context length is 100 tokens"),
            "{}",
            e.message
        );
        assert!(
            e.message
                .contains("you requested 101 tokens (4 in the messages, 97 in the completion)")
        );
        assert!(completion(br#"{"prompt":"a b c","max_tokens":96}"#, &c).is_ok());
        let long = format!(
            r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#,
            "w ".repeat(93)
        );
        let e = err(chat(long.as_bytes(), &c));
        assert!(
            e.message.contains("maximum context length"),
            "{}",
            e.message
        );
        assert!(completion(br#"{"prompt":"x","n":3000,"max_tokens":1}"#, &c).is_ok());
        let e = err(completion(br#"{"prompt":["a","b"],"n":3000}"#, &c));
        assert_eq!((e.status, e.param), (StatusCode::BAD_REQUEST, Some("n")));
    }
}
