//! Translation between `gateway.v1` messages and the pipeline's types: a call becomes the
//! `InferenceRequest` it stands for (with the OpenAI body a worker is sent); a worker's answer, or
//! what one read of its stream added (the relay's `Delta`), becomes a response message. Each
//! worker JSON is read once (`relay::answer`); usage comes typed from the pipeline.

use std::borrow::Cow;

use bytes::Bytes;
use serde::Serialize;

use super::pb;
use crate::error::ApiError;
use crate::relay::answer::{self, Delta};
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
        priority: None,
    };
    let id = (!request_id.is_empty()).then(|| request_id.to_owned());
    InferenceRequest::new(endpoint, fields, id, body)
}

/// The OpenAI body a call stands for, in the members an OpenAI client would have sent.
#[derive(Serialize)]
struct Body<'a> {
    /// An empty model is left out, so the pipeline answers that `model` is required.
    #[serde(skip_serializing_if = "str::is_empty")]
    model: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    messages: Option<Vec<Message<'a>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt: Option<Prompt<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    n: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    presence_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frequency_penalty: Option<f64>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'a str,
    content: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
}

/// One prompt as a string, several as a batch.
#[derive(Serialize)]
#[serde(untagged)]
enum Prompt<'a> {
    One(&'a str),
    Batch(&'a [String]),
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

impl<'a> Body<'a> {
    fn new(model: &'a str, params: Option<&'a pb::SamplingParams>, stream: bool) -> Self {
        Self {
            model,
            messages: None,
            prompt: None,
            max_tokens: params.and_then(|p| p.max_tokens),
            temperature: params.and_then(|p| p.temperature).and_then(decimal),
            top_p: params.and_then(|p| p.top_p).and_then(decimal),
            n: params.and_then(|p| p.n),
            seed: params.and_then(|p| p.seed),
            presence_penalty: params.and_then(|p| p.presence_penalty).and_then(decimal),
            frequency_penalty: params.and_then(|p| p.frequency_penalty).and_then(decimal),
            stop: params.map_or(&[], |p| p.stop.as_slice()),
            // A stream asks for the usage on its last event.
            stream,
            stream_options: stream.then_some(StreamOptions {
                include_usage: true,
            }),
        }
    }

    fn bytes(&self) -> Bytes {
        // Serialising strings and numbers cannot fail.
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }
}

/// The body of a chat completion request.
fn chat_body(request: &pb::ChatCompletionRequest, stream: bool) -> Bytes {
    let mut body = Body::new(&request.model, request.params.as_ref(), stream);
    body.messages = Some(
        request
            .messages
            .iter()
            .map(|m| Message {
                role: &m.role,
                content: &m.content,
                name: m.name.as_deref(),
            })
            .collect(),
    );
    body.bytes()
}

/// The body of a completion request.
fn completion_body(request: &pb::CompletionRequest, stream: bool) -> Bytes {
    let mut body = Body::new(&request.model, request.params.as_ref(), stream);
    body.prompt = match request.prompt.as_slice() {
        [] => None,
        [one] => Some(Prompt::One(one)),
        many => Some(Prompt::Batch(many)),
    };
    body.bytes()
}

/// An `f32` as the decimal it was written as (0.7, not 0.699999988079071); none for NaN or an
/// infinity, which JSON cannot carry.
fn decimal(value: f32) -> Option<f64> {
    value
        .to_string()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
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
    let answer = answer::read(body)?;
    Some(pb::GenerateResponse {
        id: answer.id.into_owned(),
        model: answer.model.into_owned(),
        created: answer.created,
        choices: answer
            .choices
            .into_iter()
            .map(|c| pb::Choice {
                index: c.index.unwrap_or_default(),
                text: c.text.map(Cow::into_owned).unwrap_or_default(),
                finish_reason: c.finish_reason.map(Cow::into_owned).unwrap_or_default(),
            })
            .collect(),
        usage: usage_seen.map(usage),
        request_id,
    })
}

/// The message for what one read of a stream added (its usage, if any, is set by the caller).
pub fn chunk(delta: Delta) -> pb::GenerateChunk {
    pb::GenerateChunk {
        id: delta.id,
        model: delta.model,
        created: delta.created,
        choices: delta
            .choices
            .into_iter()
            .map(|c| pb::Choice {
                index: c.index,
                text: c.text,
                finish_reason: c.finish_reason.unwrap_or_default(),
            })
            .collect(),
        ..pb::GenerateChunk::default()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

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
        let mut delta = Delta::default();
        for event in [
            &br#"{"id":"x","choices":[{"index":1,"delta":{"content":"yo"},"finish_reason":null}]}"#
                [..],
            br#"{"id":"x","choices":[{"index":0,"delta":{"content":"a"},"finish_reason":null}]}"#,
            br#"{"id":"x","choices":[{"index":1,"delta":{"content":"!"},"finish_reason":"stop"}]}"#,
        ] {
            delta.add(answer::read(event).unwrap_or_default());
        }
        let piece = chunk(delta);
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
