//! Translation between `gateway.v1` messages and the pipeline's types: a call becomes the
//! `InferenceRequest` it stands for (with the OpenAI body a worker is sent); a worker's answer, or
//! the choice events of one read of its stream, become a response message. Each worker JSON is
//! parsed once, here; usage comes typed from the pipeline.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::pb;
use crate::error::ApiError;
use crate::request::{Endpoint, Fields, InferenceRequest, UsageOptions};
use crate::usage::Usage;

/// The request a chat call stands for; `limit` bounds the body it makes (the HTTP API's).
pub fn chat_request(
    call: &pb::ChatCompletionRequest,
    stream: bool,
    limit: usize,
) -> Result<InferenceRequest, ApiError> {
    let body = chat_body(call, stream);
    request(
        Endpoint::ChatCompletions,
        &call.model,
        call.params.as_ref(),
        &call.request_id,
        1,
        stream,
        body,
        limit,
    )
}

/// The request a completion call stands for.
pub fn completion_request(
    call: &pb::CompletionRequest,
    stream: bool,
    limit: usize,
) -> Result<InferenceRequest, ApiError> {
    let body = completion_body(call, stream);
    let prompts = u64::try_from(call.prompt.len()).unwrap_or(u64::MAX);
    let request = request(
        Endpoint::Completions,
        &call.model,
        call.params.as_ref(),
        &call.request_id,
        prompts,
        stream,
        body,
        limit,
    )?;
    if prompts == 0 {
        return Err(ApiError::bad_request(
            "`prompt` is required",
            Some("prompt"),
        ));
    }
    Ok(request)
}

#[expect(
    clippy::too_many_arguments,
    reason = "the members both calls share, read once"
)]
fn request(
    endpoint: Endpoint,
    model: &str,
    params: Option<&pb::SamplingParams>,
    request_id: &str,
    prompts: u64,
    stream: bool,
    body: Bytes,
    limit: usize,
) -> Result<InferenceRequest, ApiError> {
    // The HTTP API's body limit, on the body the call stands for.
    if body.len() > limit {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let fields = Fields {
        model: (!model.is_empty()).then(|| model.to_owned()),
        stream,
        // A stream's usage comes on its last message.
        client_usage: UsageOptions {
            include_usage: stream,
            continuous_usage_stats: false,
        },
        max_tokens: params.and_then(|p| p.max_tokens).map(u64::from),
        n: params.and_then(|p| p.n).map(u64::from),
        prompts,
    };
    let id = (!request_id.is_empty()).then(|| request_id.to_owned());
    InferenceRequest::new(endpoint, fields, id, body)
}

/// The body of a chat completion request; `stream` asks for the usage on the last event.
fn chat_body(request: &pb::ChatCompletionRequest, stream: bool) -> Bytes {
    let mut body = Map::new();
    model(&mut body, &request.model);
    let messages: Vec<Value> = request
        .messages
        .iter()
        .map(|m| {
            let mut message = json!({"role": m.role, "content": m.content});
            if let Some(name) = &m.name {
                message["name"] = json!(name);
            }
            message
        })
        .collect();
    body.insert("messages".into(), Value::Array(messages));
    finish(body, request.params.as_ref(), stream)
}

/// The body of a completion request: one prompt as a string, several as a batch.
fn completion_body(request: &pb::CompletionRequest, stream: bool) -> Bytes {
    let mut body = Map::new();
    model(&mut body, &request.model);
    match request.prompt.as_slice() {
        [] => {}
        [one] => {
            body.insert("prompt".into(), json!(one));
        }
        many => {
            body.insert("prompt".into(), json!(many));
        }
    }
    finish(body, request.params.as_ref(), stream)
}

/// An empty model is left out, so the pipeline answers that `model` is required.
fn model(body: &mut Map<String, Value>, model: &str) {
    if !model.is_empty() {
        body.insert("model".into(), json!(model));
    }
}

fn finish(
    mut body: Map<String, Value>,
    params: Option<&pb::SamplingParams>,
    stream: bool,
) -> Bytes {
    if let Some(p) = params {
        let mut set = |name: &str, value: Option<Value>| {
            if let Some(value) = value {
                body.insert(name.into(), value);
            }
        };
        set("max_tokens", p.max_tokens.map(Value::from));
        set("temperature", p.temperature.map(decimal));
        set("top_p", p.top_p.map(decimal));
        set("n", p.n.map(Value::from));
        set("seed", p.seed.map(Value::from));
        set("presence_penalty", p.presence_penalty.map(decimal));
        set("frequency_penalty", p.frequency_penalty.map(decimal));
        if !p.stop.is_empty() {
            set("stop", Some(json!(p.stop)));
        }
    }
    if stream {
        body.insert("stream".into(), json!(true));
        body.insert("stream_options".into(), json!({"include_usage": true}));
    }
    // Serialising a map of JSON values cannot fail.
    Bytes::from(serde_json::to_vec(&Value::Object(body)).unwrap_or_default())
}

/// An `f32` as the decimal it was written as (0.7, not 0.699999988079071).
fn decimal(value: f32) -> Value {
    value
        .to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

#[derive(Deserialize)]
struct WireAnswer {
    #[serde(default)]
    id: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    created: i64,
    #[serde(default)]
    choices: Vec<WireChoice>,
}

#[derive(Deserialize)]
struct WireChoice {
    #[serde(default)]
    index: u32,
    /// Completions.
    #[serde(default)]
    text: Option<String>,
    /// Chat, whole.
    #[serde(default)]
    message: Option<WireContent>,
    /// Chat, streamed.
    #[serde(default)]
    delta: Option<WireContent>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireContent {
    #[serde(default)]
    content: Option<String>,
}

impl WireChoice {
    fn into_choice(self) -> pb::Choice {
        let text = self
            .text
            .or_else(|| self.message.and_then(|m| m.content))
            .or_else(|| self.delta.and_then(|d| d.content))
            .unwrap_or_default();
        pb::Choice {
            index: self.index,
            text,
            finish_reason: self.finish_reason.unwrap_or_default(),
        }
    }
}

/// Usage as the messages carry it.
pub fn usage(usage: Usage) -> pb::Usage {
    pb::Usage {
        prompt_tokens: usage.prompt_tokens,
        cached_tokens: usage.cached_tokens,
        completion_tokens: usage.completion_tokens,
    }
}

/// A worker's complete answer, its usage as the pipeline metered it; `None` if the body is not
/// an answer.
pub fn response(
    body: &[u8],
    usage_seen: Option<Usage>,
    request_id: String,
) -> Option<pb::GenerateResponse> {
    let answer: WireAnswer = serde_json::from_slice(body).ok()?;
    Some(pb::GenerateResponse {
        id: answer.id,
        model: answer.model,
        created: answer.created,
        choices: answer
            .choices
            .into_iter()
            .map(WireChoice::into_choice)
            .collect(),
        usage: usage_seen.map(usage),
        request_id,
    })
}

/// Adds one choice event of a stream (the worker's JSON payload) to `chunk`: the first event
/// gives its id, model and creation time; a choice already in it gets the text appended and its
/// finish reason. Whether the payload was an event.
pub fn add_event(chunk: &mut pb::GenerateChunk, payload: &[u8]) -> bool {
    let Ok(event) = serde_json::from_slice::<WireAnswer>(payload) else {
        return false;
    };
    if chunk.id.is_empty() {
        chunk.id = event.id;
        chunk.model = event.model;
        chunk.created = event.created;
    }
    for choice in event.choices.into_iter().map(WireChoice::into_choice) {
        match chunk.choices.iter_mut().find(|c| c.index == choice.index) {
            Some(known) => {
                known.text.push_str(&choice.text);
                if !choice.finish_reason.is_empty() {
                    known.finish_reason = choice.finish_reason;
                }
            }
            None => chunk.choices.push(choice),
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(body: &Bytes) -> Value {
        serde_json::from_slice(body).unwrap_or_default()
    }

    #[test]
    fn a_chat_call_becomes_the_openai_body() {
        let request = pb::ChatCompletionRequest {
            model: "m".into(),
            messages: vec![pb::ChatMessage {
                role: "user".into(),
                content: "hi".into(),
                name: Some("ann".into()),
            }],
            params: Some(pb::SamplingParams {
                max_tokens: Some(5),
                temperature: Some(0.7),
                stop: vec!["\n".into()],
                seed: Some(-3),
                ..pb::SamplingParams::default()
            }),
            request_id: String::new(),
        };
        assert_eq!(
            parsed(&chat_body(&request, true)),
            json!({
                "model": "m",
                "messages": [{"role": "user", "content": "hi", "name": "ann"}],
                "max_tokens": 5, "temperature": 0.7, "stop": ["\n"], "seed": -3,
                "stream": true, "stream_options": {"include_usage": true},
            })
        );
    }

    #[test]
    fn prompts_are_a_string_or_a_batch_and_an_empty_model_is_absent() {
        let mut request = pb::CompletionRequest {
            prompt: vec!["a".into()],
            ..pb::CompletionRequest::default()
        };
        assert_eq!(
            parsed(&completion_body(&request, false)),
            json!({"prompt": "a"})
        );
        request.prompt.push("b".into());
        assert_eq!(
            parsed(&completion_body(&request, false)),
            json!({"prompt": ["a", "b"]})
        );
    }

    #[test]
    fn answers_and_chunks_take_text_finish_reasons_and_usage() {
        let body = br#"{"id":"x","model":"m","created":7,"choices":[{"index":0,"message":{"role":"assistant","content":"hey"},"finish_reason":"stop"}],"usage":{"prompt_tokens":4,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":1}}}"#;
        let answer = response(body, Usage::from_json(br#"{"prompt_tokens":4,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":1}}"#), "r".into()).unwrap_or_default();
        assert_eq!(answer.choices[0].text, "hey");
        assert_eq!(answer.choices[0].finish_reason, "stop");
        assert_eq!(
            answer.usage,
            Some(pb::Usage {
                prompt_tokens: 4,
                cached_tokens: 1,
                completion_tokens: 2
            })
        );
        let mut piece = pb::GenerateChunk::default();
        for event in [
            &br#"{"id":"x","choices":[{"index":1,"delta":{"content":"yo"},"finish_reason":null}]}"#
                [..],
            br#"{"id":"x","choices":[{"index":0,"delta":{"content":"a"},"finish_reason":null}]}"#,
            br#"{"id":"x","choices":[{"index":1,"delta":{"content":"!"},"finish_reason":"stop"}]}"#,
        ] {
            assert!(add_event(&mut piece, event));
        }
        assert!(!add_event(&mut piece, b"not json"));
        let texts: Vec<_> = piece
            .choices
            .iter()
            .map(|c| (c.index, c.text.as_str(), c.finish_reason.as_str()))
            .collect();
        assert_eq!(texts, [(1, "yo!", "stop"), (0, "a", "")]);
        assert_eq!(piece.id, "x");
        assert_eq!(piece.usage, None);
    }
}
