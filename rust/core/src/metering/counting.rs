//! The gateway's own token counts, for a request its worker took but reported no usage for.
//!
//! That happens when the client leaves before the first token (vLLM reports usage with its
//! tokens), or when the worker does not report usage at all. Such a request is still billed for
//! its prompt and for what was relayed:
//! - prompt tokens come from the worker's own tokenizer: `POST /tokenize` of the request's
//!   `messages` (with its chat template options) or of each completions prompt or embeddings
//!   input (a conversation without the generation prompt, as vLLM embeds it); a prompt given as
//!   token ids is counted as given;
//! - completion tokens are the generated text relayed to the client (each choice's text, or its
//!   `reasoning_content` and `content`), tokenized again without special tokens. That is an
//!   estimate: text does not always tokenize back to the tokens that made it. For a stream it is
//!   at least the number of choice events that carried text, since each carried at least one
//!   token. Tool-call deltas are not counted.
//!
//! An event counted this way has `usage_source: "gateway"`. A count the worker cannot make in
//! time leaves the event as it was (`none`, zero tokens).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::request::Endpoint;
use crate::router::Worker;
use crate::upstream::{Carried, Upstream};
use crate::usage::{MAX_CHOICES, Usage};

/// How long one `/tokenize` call may take; an event waits at most this per prompt.
pub const TOKENIZE_TIMEOUT: Duration = Duration::from_secs(2);

/// What reached the client of a request without worker usage.
#[derive(Debug, Default)]
pub enum Relayed {
    /// Nothing, or nothing counted yet.
    #[default]
    Nothing,
    /// A stream's generated text per choice index, and how many choice events carried text
    /// (see [`collect_text`]).
    Stream { texts: Vec<String>, deltas: u64 },
    /// A complete response body.
    Body(Bytes),
}

/// Counts one request's tokens on the worker that served it.
#[derive(Debug)]
pub struct Counter {
    upstream: Upstream,
    worker: Arc<Worker>,
    endpoint: Endpoint,
    /// The request body as the client sent it.
    request: Bytes,
}

impl Counter {
    pub fn new(
        upstream: Upstream,
        worker: Arc<Worker>,
        endpoint: Endpoint,
        request: Bytes,
    ) -> Self {
        Self {
            upstream,
            worker,
            endpoint,
            request,
        }
    }

    /// The request's usage as the gateway counts it; `None` if the prompt cannot be counted.
    pub async fn count(&self, relayed: &Relayed) -> Option<Usage> {
        let Value::Object(request) = serde_json::from_slice(&self.request).ok()? else {
            return None;
        };
        let model = request.get("model")?;
        let prompt_tokens = self
            .prompt_tokens(prompts(self.endpoint, &request)?)
            .await?;
        let completion_tokens = match relayed {
            // Embeddings generate nothing: whatever came back is no completion.
            _ if !self.endpoint.generates() => 0,
            Relayed::Nothing => 0,
            Relayed::Stream { texts, deltas } => self.text_tokens(model, texts).await?.max(*deltas),
            Relayed::Body(body) => {
                let texts = choice_texts(self.endpoint, body)?;
                self.text_tokens(model, &texts).await?
            }
        };
        Some(Usage {
            prompt_tokens: prompt_tokens.min(crate::usage::COUNT_CAP),
            completion_tokens: completion_tokens.min(crate::usage::COUNT_CAP),
            cached_tokens: 0,
        })
    }

    async fn prompt_tokens(&self, prompts: Prompts) -> Option<u64> {
        let Prompts { bodies, counted } = prompts;
        let mut total = counted;
        for body in bodies {
            total = total.saturating_add(self.tokenize(body).await?);
        }
        Some(total)
    }

    async fn text_tokens(&self, model: &Value, texts: &[String]) -> Option<u64> {
        let mut total = 0u64;
        for text in texts.iter().filter(|text| !text.is_empty()) {
            let body = serde_json::json!({
                "model": model,
                "prompt": text,
                "add_special_tokens": false,
            });
            total = total.saturating_add(self.tokenize(body.to_string().into()).await?);
        }
        Some(total)
    }

    /// `POST /tokenize`: the `count` of its answer.
    async fn tokenize(&self, body: Bytes) -> Option<u64> {
        #[derive(Deserialize)]
        struct Tokenized {
            count: u64,
        }
        let worker = &self.worker;
        let now = tokio::time::Instant::now();
        let deadline = now.checked_add(TOKENIZE_TIMEOUT).unwrap_or(now);
        let exchange = async {
            let response = self
                .upstream
                .post_json(
                    worker.to(),
                    worker.tokenize_uri.clone(),
                    body,
                    Carried::default(),
                    deadline,
                )
                .await
                .ok()?;
            if !response.status().is_success() {
                return None;
            }
            let body = http_body_util::BodyExt::collect(response.into_body())
                .await
                .ok()?
                .to_bytes();
            serde_json::from_slice::<Tokenized>(&body).ok()
        };
        match tokio::time::timeout_at(deadline, exchange).await {
            Ok(Some(tokenized)) => Some(tokenized.count),
            _ => {
                tracing::warn!(worker = %worker.url, "could not count a prompt with /tokenize");
                None
            }
        }
    }
}

/// What counting a request's prompts takes: `/tokenize` bodies, and tokens already counted
/// (prompts given as token ids).
#[derive(Debug, Default, PartialEq)]
struct Prompts {
    bodies: Vec<Bytes>,
    counted: u64,
}

/// Members of a chat request that shape its prompt, as vLLM's `/tokenize` takes them.
const CHAT_TEMPLATE_MEMBERS: [&str; 7] = [
    "messages",
    "tools",
    "chat_template",
    "chat_template_kwargs",
    "add_generation_prompt",
    "continue_final_message",
    "add_special_tokens",
];

/// The `/tokenize` bodies of a request's prompts (`members` are the request's JSON members).
fn prompts(endpoint: Endpoint, members: &Map<String, Value>) -> Option<Prompts> {
    let model = members.get("model")?;
    match endpoint {
        Endpoint::ChatCompletions => Some(Prompts {
            bodies: vec![chat_body(model, members.get("messages")?, members, true)],
            counted: 0,
        }),
        Endpoint::Completions => text_prompts(model, members.get("prompt")?, members),
        Endpoint::Embeddings => {
            let given = |name| members.get(name).filter(|v| !v.is_null());
            let (input, chat) = match given("input") {
                Some(input) => (input, false),
                None => (given("messages")?, true),
            };
            let first = input.as_array().and_then(|items| items.first());
            if !(chat || first.is_some_and(|f| f.is_object() || is_conversation(f))) {
                return text_prompts(model, input, members);
            }
            // One conversation, or a batch of them.
            let batch = match input {
                Value::Array(items) if first.is_some_and(Value::is_array) => items.as_slice(),
                _ => std::slice::from_ref(input),
            };
            conversations(model, batch, members)
        }
    }
}

/// Whether `value` is a conversation: an array of chat messages.
fn is_conversation(value: &Value) -> bool {
    value
        .as_array()
        .and_then(|messages| messages.first())
        .is_some_and(Value::is_object)
}

/// The `/tokenize` body of a conversation, with the request's chat-template options; vLLM's
/// `/tokenize` adds the generation prompt unless told not to, which a chat request wants
/// (`generation_prompt`) and an embeddings request, by vLLM's default, does not.
fn chat_body(
    model: &Value,
    messages: &Value,
    members: &Map<String, Value>,
    generation_prompt: bool,
) -> Bytes {
    let mut body = Map::new();
    body.insert("model".to_owned(), model.clone());
    body.insert("messages".to_owned(), messages.clone());
    if !generation_prompt {
        body.insert("add_generation_prompt".to_owned(), Value::Bool(false));
    }
    for name in CHAT_TEMPLATE_MEMBERS
        .into_iter()
        .filter(|&n| n != "messages")
    {
        if let Some(value) = members.get(name).filter(|v| !v.is_null()) {
            body.insert(name.to_owned(), value.clone());
        }
    }
    Value::Object(body).to_string().into()
}

/// The `/tokenize` bodies of an embeddings batch of conversations.
fn conversations(
    model: &Value,
    conversations: &[Value],
    members: &Map<String, Value>,
) -> Option<Prompts> {
    let bodies = conversations
        .iter()
        .map(|messages| {
            messages
                .is_array()
                .then(|| chat_body(model, messages, members, false))
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Prompts { bodies, counted: 0 })
}

/// The prompts of a completions `prompt` or an embeddings `input` of texts or token ids: each
/// text tokenized, token ids counted as given.
fn text_prompts(model: &Value, prompt: &Value, members: &Map<String, Value>) -> Option<Prompts> {
    let special = members.get("add_special_tokens").filter(|v| v.is_boolean());
    let text_body = |text: &Value| {
        let mut body = Map::new();
        body.insert("model".to_owned(), model.clone());
        body.insert("prompt".to_owned(), text.clone());
        if let Some(special) = special {
            body.insert("add_special_tokens".to_owned(), special.clone());
        }
        Bytes::from(Value::Object(body).to_string())
    };
    let mut prompts = Prompts::default();
    match prompt {
        text @ Value::String(_) => prompts.bodies.push(text_body(text)),
        Value::Array(items) if items.iter().all(Value::is_number) => {
            prompts.counted = items.len() as u64;
        }
        Value::Array(items) => {
            for item in items {
                match item {
                    Value::String(_) => prompts.bodies.push(text_body(item)),
                    Value::Array(ids) => {
                        let ids = u64::try_from(ids.len()).unwrap_or(u64::MAX);
                        prompts.counted = prompts.counted.saturating_add(ids);
                    }
                    _ => return None,
                }
            }
        }
        _ => return None,
    }
    Some(prompts)
}

/// The generated texts of a complete response body, one per choice.
fn choice_texts(endpoint: Endpoint, body: &[u8]) -> Option<Vec<String>> {
    #[derive(Deserialize)]
    struct Body {
        choices: Vec<Choice>,
    }
    #[derive(Deserialize)]
    struct Choice {
        text: Option<String>,
        message: Option<Message>,
    }
    #[derive(Deserialize)]
    struct Message {
        content: Option<String>,
        reasoning_content: Option<String>,
    }
    let body: Body = serde_json::from_slice(body).ok()?;
    Some(
        body.choices
            .into_iter()
            .map(|choice| match endpoint {
                Endpoint::Completions | Endpoint::Embeddings => choice.text.unwrap_or_default(),
                Endpoint::ChatCompletions => choice.message.map_or_else(String::new, |m| {
                    m.reasoning_content.unwrap_or_default() + &m.content.unwrap_or_default()
                }),
            })
            .filter(|text| !text.is_empty())
            .collect(),
    )
}

/// Appends the generated text of one SSE event's payload (`data: {...}`) to `texts`, by choice
/// index: a choice's `text`, or its delta's `reasoning_content` and `content`. Returns how many
/// of its choices carried text.
pub fn collect_text(payload: &[u8], texts: &mut Vec<String>) -> u64 {
    #[derive(Deserialize)]
    struct Chunk {
        #[serde(default)]
        choices: Vec<Choice>,
    }
    #[derive(Deserialize)]
    struct Choice {
        #[serde(default)]
        index: usize,
        text: Option<String>,
        delta: Option<Delta>,
    }
    #[derive(Deserialize)]
    struct Delta {
        content: Option<String>,
        reasoning_content: Option<String>,
    }
    let Ok(chunk) = serde_json::from_slice::<Chunk>(payload) else {
        return 0;
    };
    let mut carried = 0u64;
    for choice in chunk.choices {
        if choice.index >= MAX_CHOICES {
            continue;
        }
        let (reasoning, content) = choice
            .delta
            .map_or((None, None), |d| (d.reasoning_content, d.content));
        let parts = [choice.text, reasoning, content];
        let mut parts = parts
            .into_iter()
            .flatten()
            .filter(|p| !p.is_empty())
            .peekable();
        if parts.peek().is_none() {
            continue;
        }
        carried = carried.saturating_add(1);
        if texts.len() <= choice.index {
            // Below MAX_CHOICES, checked above.
            texts.resize(choice.index.saturating_add(1), String::new());
        }
        for part in parts {
            texts[choice.index].push_str(&part);
        }
    }
    carried
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on a bad fixture")]
mod tests {
    use super::*;

    fn members(request: &[u8]) -> Map<String, Value> {
        serde_json::from_slice(request).unwrap()
    }

    fn bodies(prompts: &Prompts) -> Vec<Value> {
        prompts
            .bodies
            .iter()
            .map(|b| serde_json::from_slice(b).unwrap())
            .collect()
    }

    #[test]
    fn a_chat_prompt_is_tokenized_with_its_template_options() {
        let p = prompts(
            Endpoint::ChatCompletions,
            &members(
                br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":5,
                "chat_template_kwargs":{"enable_thinking":false},"tools":null,"stream":true}"#,
            ),
        )
        .unwrap();
        assert_eq!(p.counted, 0);
        assert_eq!(
            bodies(&p),
            [serde_json::json!({
                "model": "m",
                "messages": [{"role": "user", "content": "hi"}],
                "chat_template_kwargs": {"enable_thinking": false},
            })]
        );
    }

    #[test]
    fn completions_prompts_are_tokenized_one_by_one_and_token_ids_counted_as_given() {
        let p = prompts(
            Endpoint::Completions,
            &members(br#"{"model":"m","prompt":"a b"}"#),
        )
        .unwrap();
        assert_eq!(
            bodies(&p),
            [serde_json::json!({"model": "m", "prompt": "a b"})]
        );
        let p = prompts(
            Endpoint::Completions,
            &members(br#"{"model":"m","prompt":[1,2,3]}"#),
        )
        .unwrap();
        assert_eq!((p.bodies.len(), p.counted), (0, 3));
        let p = prompts(
            Endpoint::Completions,
            &members(br#"{"model":"m","prompt":["x",[4,5],"y"],"add_special_tokens":false}"#),
        )
        .unwrap();
        assert_eq!(p.counted, 2);
        assert_eq!(
            bodies(&p),
            [
                serde_json::json!({"model": "m", "prompt": "x", "add_special_tokens": false}),
                serde_json::json!({"model": "m", "prompt": "y", "add_special_tokens": false}),
            ]
        );
        assert_eq!(
            prompts(
                Endpoint::Completions,
                &members(br#"{"model":"m","prompt":7}"#)
            ),
            None
        );
    }

    #[test]
    fn embeddings_inputs_are_counted_as_vllm_embeds_them() {
        let p = prompts(
            Endpoint::Embeddings,
            &members(br#"{"model":"m","input":["x",[4,5]],"prompt":"ignored"}"#),
        )
        .unwrap();
        assert_eq!(p.counted, 2);
        assert_eq!(
            bodies(&p),
            [serde_json::json!({"model": "m", "prompt": "x"})]
        );
        let p = prompts(
            Endpoint::Embeddings,
            &members(br#"{"model":"m","input":[1,2,3]}"#),
        )
        .unwrap();
        assert_eq!((p.bodies.len(), p.counted), (0, 3));
        let chat = serde_json::json!([{"role": "user", "content": "hi"}]);
        let tokenized = serde_json::json!({
            "model": "m", "messages": chat, "add_generation_prompt": false,
        });
        for request in [
            serde_json::json!({"model": "m", "input": chat}),
            serde_json::json!({"model": "m", "input": null, "messages": chat}),
        ] {
            let p = prompts(
                Endpoint::Embeddings,
                &members(request.to_string().as_bytes()),
            );
            assert_eq!(
                bodies(&p.unwrap()),
                std::slice::from_ref(&tokenized),
                "{request}"
            );
        }
        let batch = serde_json::json!({
            "model": "m", "input": [chat, chat], "add_generation_prompt": true,
        });
        let p = prompts(Endpoint::Embeddings, &members(batch.to_string().as_bytes())).unwrap();
        let asked = serde_json::json!({
            "model": "m", "messages": chat, "add_generation_prompt": true,
        });
        assert_eq!(bodies(&p), [asked.clone(), asked]);
        assert_eq!(
            prompts(Endpoint::Embeddings, &members(br#"{"model":"m"}"#)),
            None
        );
    }

    #[test]
    fn stream_text_is_collected_per_choice() {
        let mut texts = Vec::new();
        let mut carried = Vec::new();
        for event in [
            &br#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#[..],
            br#"{"choices":[{"index":0,"delta":{"reasoning_content":"hm"}}]}"#,
            br#"{"choices":[{"index":0,"delta":{"content":" the"}}]}"#,
            br#"{"choices":[{"index":2,"text":" b"},{"index":0,"text":" a"}]}"#,
            br#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
            br#"{"choices":[{"index":5000,"text":"lost"}]}"#,
            b"not json",
        ] {
            carried.push(collect_text(event, &mut texts));
        }
        assert_eq!(texts, ["hm the a", "", " b"]);
        assert_eq!(carried, [0, 1, 1, 2, 0, 0, 0]);
    }

    #[test]
    fn body_texts_are_the_choices_generated_text() {
        let chat = br#"{"choices":[{"message":{"role":"assistant","content":"x y"}},
                                   {"message":{"content":null}}]}"#;
        assert_eq!(
            choice_texts(Endpoint::ChatCompletions, chat).unwrap(),
            ["x y"]
        );
        let completion = br#"{"choices":[{"text":" a"},{"text":" b c"}]}"#;
        assert_eq!(
            choice_texts(Endpoint::Completions, completion).unwrap(),
            [" a", " b c"]
        );
    }
}
