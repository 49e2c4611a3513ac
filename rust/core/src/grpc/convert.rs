//! Translation between `gateway.v1` messages and the OpenAI JSON the pipeline speaks: a call
//! becomes the request body an OpenAI client would have sent; a worker's answer (a JSON body, or
//! one SSE event of a stream) becomes a response message.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use super::pb;
use crate::metering::Usage;

/// The body of a chat completion request; `stream` asks for the usage on the last event.
pub fn chat_body(request: &pb::ChatCompletionRequest, stream: bool) -> Bytes {
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
pub fn completion_body(request: &pb::CompletionRequest, stream: bool) -> Bytes {
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
struct WireAnswer<'a> {
    #[serde(default)]
    id: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    created: i64,
    #[serde(default)]
    choices: Vec<WireChoice>,
    #[serde(borrow, default)]
    usage: Option<&'a RawValue>,
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

fn usage(raw: Option<&RawValue>) -> Option<pb::Usage> {
    let usage = Usage::from_json(raw?.get().as_bytes())?;
    Some(pb::Usage {
        prompt_tokens: usage.prompt_tokens,
        cached_tokens: usage.cached_tokens,
        completion_tokens: usage.completion_tokens,
    })
}

/// What an answer and a chunk share: id, model, creation time, choices and usage.
struct Parts {
    id: String,
    model: String,
    created: i64,
    choices: Vec<pb::Choice>,
    usage: Option<pb::Usage>,
}

fn parts(json: &[u8]) -> Option<Parts> {
    let answer: WireAnswer<'_> = serde_json::from_slice(json).ok()?;
    Some(Parts {
        id: answer.id,
        model: answer.model,
        created: answer.created,
        usage: usage(answer.usage),
        choices: answer
            .choices
            .into_iter()
            .map(WireChoice::into_choice)
            .collect(),
    })
}

/// A complete answer; `None` if it is not one.
pub fn response(body: &[u8], request_id: String) -> Option<pb::GenerateResponse> {
    let p = parts(body)?;
    Some(pb::GenerateResponse {
        id: p.id,
        model: p.model,
        created: p.created,
        choices: p.choices,
        usage: p.usage,
        request_id,
    })
}

/// One event's JSON as a chunk; `None` if it is not one.
pub fn chunk(data: &[u8]) -> Option<pb::GenerateChunk> {
    let p = parts(data)?;
    Some(pb::GenerateChunk {
        id: p.id,
        model: p.model,
        created: p.created,
        choices: p.choices,
        usage: p.usage,
        request_id: String::new(),
    })
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
        let answer = response(body, "r".into()).unwrap_or_default();
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
        let event =
            br#"{"id":"x","choices":[{"index":1,"delta":{"content":"yo"},"finish_reason":null}]}"#;
        let piece = chunk(event).unwrap_or_default();
        assert_eq!(
            (piece.choices[0].index, piece.choices[0].text.as_str()),
            (1, "yo")
        );
        assert_eq!(piece.usage, None);
    }
}
