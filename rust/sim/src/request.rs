//! Parses and validates `/v1/chat/completions` and `/v1/completions` bodies the way vLLM does:
//! unknown fields ignored, wrong types and bad values a 400, an unknown model a 404.
//!
//! It only reads what was asked; `plan.rs` decides what will be generated.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::config::SimConfig;
use super::plan::{self, Kind, Plan, Sampling, StreamMode};
use super::response::ApiError;
use super::tokens;

/// Completions' `max_tokens` when the request names none.
const COMPLETIONS_DEFAULT_MAX_TOKENS: u32 = 16;

/// Declares a route's body: its own fields, then the fields every route takes (in this order,
/// which is also the order of the array form serde accepts), and `shared()`, which moves out
/// those `Shared::validate` checks; `max_tokens` stays, as each route resolves it its own way.
/// Not `#[serde(flatten)]`: that buffers every field into a map before deserialising it.
macro_rules! body {
    ($(#[$meta:meta])* struct $name:ident { $($field:ident: $ty:ty,)* }) => {
        $(#[$meta])*
        #[derive(Deserialize)]
        struct $name {
            $($field: $ty,)*
            model: Option<String>,
            max_tokens: Option<i64>,
            n: Option<i64>,
            stream: Option<bool>,
            stream_options: Option<Map<String, Value>>,
            stop: Option<Stop>,
            seed: Option<i64>,
            temperature: Option<f64>,
            ignore_eos: Option<bool>,
        }

        impl $name {
            /// Moves the fields `Shared` validates out of the body, leaving `None`.
            fn shared(&mut self) -> Shared {
                Shared {
                    model: self.model.take(),
                    n: self.n.take(),
                    stream: self.stream.take(),
                    stream_options: self.stream_options.take(),
                    stop: self.stop.take(),
                    seed: self.seed.take(),
                    temperature: self.temperature.take(),
                    ignore_eos: self.ignore_eos.take(),
                }
            }
        }
    };
}

body! {
    /// A `/v1/chat/completions` body.
    struct ChatBody {
        messages: Vec<Message>,
        max_completion_tokens: Option<i64>,
    }
}

body! {
    /// A `/v1/completions` body.
    struct CompletionBody {
        prompt: Prompt,
        return_token_ids: Option<bool>,
    }
}

/// One chat message; only what the fake chat template reads.
#[derive(Deserialize)]
pub(crate) struct Message {
    #[serde(rename = "role")]
    _role: String,
    content: Option<Content>,
}

impl Message {
    /// The message's text pieces (non-text parts such as images contribute none).
    pub(crate) fn texts(&self) -> impl Iterator<Item = &str> {
        let (text, parts) = match &self.content {
            None => (None, &[][..]),
            Some(Content::Text(text)) => (Some(text.as_str()), &[][..]),
            Some(Content::Parts(parts)) => (None, parts.as_slice()),
        };
        text.into_iter()
            .chain(parts.iter().filter_map(|p| p.text.as_deref()))
    }
}

#[derive(Deserialize)]
#[serde(untagged, expecting = "a string or an array of content parts")]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    _kind: String,
    text: Option<String>,
}

#[derive(Deserialize)]
#[serde(
    untagged,
    expecting = "a string, a list of strings, token ids, or lists of token ids"
)]
pub(crate) enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Deserialize)]
#[serde(untagged, expecting = "a string or an array of strings")]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// The fields both routes share, as sent.
struct Shared {
    model: Option<String>,
    n: Option<i64>,
    stream: Option<bool>,
    stream_options: Option<Map<String, Value>>,
    stop: Option<Stop>,
    seed: Option<i64>,
    temperature: Option<f64>,
    ignore_eos: Option<bool>,
}

impl Shared {
    fn validate(self) -> Result<(Option<String>, Sampling), ApiError> {
        let stream = self.stream.unwrap_or(false);
        // vLLM tests truthiness: `{}` and null pass on a non-streaming request, the rest fails.
        let options = self.stream_options.filter(|o| !o.is_empty() || stream);
        if options.is_some() && !stream {
            return Err(ApiError::bad_request(
                "Stream options can only be defined when `stream=True`.",
            )
            .with_param("stream_options"));
        }
        let stream = if stream {
            Some(stream_mode(options.as_ref())?)
        } else {
            None
        };
        let n = match self.n {
            None => 1,
            Some(n) if n >= 1 => u32::try_from(n).unwrap_or(u32::MAX),
            Some(n) => {
                return Err(
                    ApiError::bad_request(format!("n must be at least 1, got {n}."))
                        .with_param("n"),
                );
            }
        };
        let mut stops = match self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        };
        stops.retain(|s| !s.is_empty());
        let sampling = Sampling {
            n,
            stream,
            stops,
            // Negative seeds are valid in vLLM; only the bits matter here.
            seed: self.seed.map_or(0, |s| s as u64),
            greedy: self.temperature == Some(0.0),
            ignore_eos: self.ignore_eos.unwrap_or(false),
        };
        Ok((self.model, sampling))
    }
}

fn stream_mode(options: Option<&Map<String, Value>>) -> Result<StreamMode, ApiError> {
    let Some(options) = options else {
        return Ok(StreamMode {
            include_usage: false,
            continuous_usage: false,
        });
    };
    let flag = |key: &str, absent: bool| match options.get(key) {
        None => Ok(absent),
        Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::bad_request(format!(
            "stream_options.{key}: Input should be a valid boolean"
        ))),
    };
    // `stream_options: {}` already means `include_usage: true` (vLLM's pydantic default).
    let include_usage = flag("include_usage", true)?;
    let continuous_usage = include_usage && flag("continuous_usage_stats", false)?;
    Ok(StreamMode {
        include_usage,
        continuous_usage,
    })
}

fn max_tokens(value: Option<i64>, name: &str) -> Result<Option<u32>, ApiError> {
    match value {
        None => Ok(None),
        Some(v) if v >= 0 => Ok(Some(u32::try_from(v).unwrap_or(u32::MAX))),
        Some(v) => Err(
            ApiError::bad_request(format!("{name} must be at least 0, got {v}."))
                .with_param("max_tokens"),
        ),
    }
}

fn parse_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("Invalid request body: {e}")))
}

fn check_model(model: Option<&str>, config: &SimConfig) -> Result<(), ApiError> {
    match model {
        Some(m) if m != config.model => Err(ApiError::model_not_found(m)),
        _ => Ok(()),
    }
}

/// Parses a `/v1/chat/completions` body.
pub(crate) fn chat(body: &[u8], config: &SimConfig) -> Result<Plan, ApiError> {
    let mut b: ChatBody = parse_json(body)?;
    let completion = max_tokens(b.max_completion_tokens, "max_completion_tokens")?;
    let legacy = max_tokens(b.max_tokens, "max_tokens")?;
    let (model, sampling) = b.shared().validate()?;
    check_model(model.as_deref(), config)?;
    let prompt = tokens::chat_prompt_tokens(
        b.messages
            .iter()
            .map(|m| {
                let words = m.texts().map(tokens::words).fold(0, u32::saturating_add);
                tokens::chat_message_tokens(words)
            })
            .fold(0, u32::saturating_add),
    );
    let max = completion.or(legacy);
    plan::build(Kind::Chat, vec![prompt], max, sampling, config)
}

/// Parses a `/v1/completions` body.
pub(crate) fn completion(body: &[u8], config: &SimConfig) -> Result<Plan, ApiError> {
    let mut b: CompletionBody = parse_json(body)?;
    let max = max_tokens(b.max_tokens, "max_tokens")?;
    let (model, sampling) = b.shared().validate()?;
    check_model(model.as_deref(), config)?;
    let prompts = prompt_tokens(&b.prompt)?;
    let max = Some(max.unwrap_or(COMPLETIONS_DEFAULT_MAX_TOKENS));
    let mut plan = plan::build(Kind::Completion, prompts, max, sampling, config)?;
    if b.return_token_ids == Some(true) {
        plan.prompt_ids = Some(prompt_ids(&b.prompt));
    }
    Ok(plan)
}

/// Each prompt's token ids, as `return_token_ids` gives them back.
fn prompt_ids(prompt: &Prompt) -> Vec<Vec<u32>> {
    let text = |t: &str| {
        let mut ids = Vec::new();
        tokens::text_prompt_ids(t, &mut ids);
        ids
    };
    match prompt {
        Prompt::Text(t) => vec![text(t)],
        Prompt::Texts(ts) => ts.iter().map(|t| text(t)).collect(),
        Prompt::Ids(ids) => vec![ids.clone()],
        Prompt::IdLists(lists) => lists.clone(),
    }
}

/// Prompt token counts of each prompt of a completions request.
pub(crate) fn prompt_tokens(prompt: &Prompt) -> Result<Vec<u32>, ApiError> {
    let counts: Vec<u32> = match prompt {
        Prompt::Text(t) => vec![tokens::text_prompt_tokens(t)],
        Prompt::Texts(ts) => ts.iter().map(|t| tokens::text_prompt_tokens(t)).collect(),
        Prompt::Ids(ids) => vec![plan::len_u32(ids.len())],
        Prompt::IdLists(lists) => lists.iter().map(|ids| plan::len_u32(ids.len())).collect(),
    };
    if counts.is_empty() || counts.contains(&0) {
        return Err(
            ApiError::bad_request("The decoder prompt cannot be empty").with_param("prompt")
        );
    }
    Ok(counts)
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on a bad fixture")]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    use crate::plan::StreamMode;
    use crate::test_support::{config, err};

    #[test]
    fn stream_options_follow_vllm() {
        let c = config();
        let mode = |body: &str| completion(body.as_bytes(), &c).map(|p| p.stream);
        let with_options =
            |o: &str| format!(r#"{{"prompt":"x","stream":true,"stream_options":{o}}}"#);
        let off = StreamMode {
            include_usage: false,
            continuous_usage: false,
        };
        let usage = StreamMode {
            include_usage: true,
            continuous_usage: false,
        };
        let both = StreamMode {
            include_usage: true,
            continuous_usage: true,
        };
        assert_eq!(mode(r#"{"prompt":"x","stream":true}"#), Ok(Some(off)));
        assert_eq!(
            mode(r#"{"prompt":"x","stream":true,"stream_options":{}}"#),
            Ok(Some(usage))
        );
        assert_eq!(
            mode(&with_options(
                r#"{"include_usage":true,"continuous_usage_stats":true}"#
            )),
            Ok(Some(both))
        );
        assert_eq!(
            mode(&with_options(
                r#"{"include_usage":false,"continuous_usage_stats":true}"#
            )),
            Ok(Some(off))
        );
        // vLLM checks truthiness: an empty object or null on a non-streaming request passes.
        assert_eq!(mode(r#"{"prompt":"x","stream_options":{}}"#), Ok(None));
        assert_eq!(
            mode(r#"{"prompt":"x","stream":false,"stream_options":null}"#),
            Ok(None)
        );
        let e = mode(r#"{"prompt":"x","stream_options":{"include_usage":true}}"#).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            e.message,
            "Stream options can only be defined when `stream=True`."
        );
    }

    #[test]
    fn malformed_requests_are_400_and_unknown_models_404() {
        let c = config();
        for body in [
            "not json",
            "[1]",
            r#"{"prompt":"x","model":5}"#,
            r#"{"prompt":{"a":1}}"#,
            r#"{"prompt":[]}"#,
            r#"{"prompt":"x","max_tokens":-1}"#,
            r#"{"prompt":"x","max_tokens":1.5}"#,
            r#"{"prompt":"x","n":0}"#,
            r#"{"prompt":"x","stream":"yes"}"#,
            r#"{"prompt":"x","stream":true,"stream_options":5}"#,
            r#"{"model":"sim-model"}"#,
        ] {
            let e = err(completion(body.as_bytes(), &c));
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}: {e:?}");
        }
        for body in [
            r#"{"messages":"hi"}"#,
            r#"{"messages":[{"content":"no role"}]}"#,
            r#"{"messages":[{"role":"user","content":7}]}"#,
            r#"{"messages":[],"max_completion_tokens":"4"}"#,
        ] {
            let e = err(chat(body.as_bytes(), &c));
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}: {e:?}");
        }
        let e = err(chat(br#"{"model":"gpt-4","messages":[]}"#, &c));
        assert_eq!((e.status, e.param), (StatusCode::NOT_FOUND, Some("model")));
        assert_eq!(e.message, "The model `gpt-4` does not exist.");
    }
}
