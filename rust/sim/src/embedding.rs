//! `/v1/embeddings` as vLLM's pooling runner serves it: the request's shapes and checks, a
//! deterministic unit vector per input, and the answer in each of vLLM's encodings (`float` and
//! `base64` in JSON; `bytes`, the raw vectors with a `metadata` header of their shapes and usage,
//! and `bytes_only`, without it).
//!
//! Prompt tokens are the simulator's tokenizer's (`tokens.rs`), as for completions; the vectors
//! model no meaning, only their shape: `EMBED_DIM` float32 numbers, of unit length, a function of
//! the input's tokens alone. The model is a Matryoshka one: `dimensions` keeps the leading ones.

use serde::Deserialize;

use super::config::SimConfig;
use super::plan::len_u32;
use super::request::{Message, Prompt};
use super::response::{ApiError, Head, push_u64};
use super::tokens::{self, splitmix64};

/// Numbers in one embedding.
pub(crate) const EMBED_DIM: usize = 32;

/// A `/v1/embeddings` body (vLLM's `EmbeddingCompletionRequest` or its chat forms).
#[derive(Deserialize)]
struct EmbeddingBody {
    model: Option<String>,
    input: Option<Input>,
    messages: Option<Chat>,
    encoding_format: Option<Encoding>,
    dimensions: Option<i64>,
}

#[derive(Deserialize)]
#[serde(
    untagged,
    expecting = "a string, a list of strings, token ids, lists of token ids, or chat messages"
)]
enum Input {
    Prompt(Prompt),
    Chat(Chat),
}

#[derive(Deserialize)]
#[serde(untagged, expecting = "chat messages, or a list of conversations")]
enum Chat {
    One(Vec<Message>),
    Batch(Vec<Vec<Message>>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Encoding {
    Float,
    Base64,
    Bytes,
    BytesOnly,
}

/// A validated embeddings request: each input's tokens, the encoding and the dimensions.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Embeddings {
    pub inputs: Vec<Vec<u32>>,
    pub encoding: Encoding,
    pub dimensions: usize,
}

impl Embeddings {
    pub(crate) fn prompt_tokens(&self) -> u64 {
        self.inputs.iter().map(|ids| ids.len() as u64).sum()
    }
}

/// Parses and checks a `/v1/embeddings` body in vLLM's order: its types, the model, the
/// dimensions, then the prompts.
pub(crate) fn parse(body: &[u8], config: &SimConfig) -> Result<Embeddings, ApiError> {
    let body: EmbeddingBody = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("Invalid request body: {e}")))?;
    if let Some(model) = body.model.as_deref().filter(|m| *m != config.model) {
        return Err(ApiError::model_not_found(model));
    }
    let dimensions = match body.dimensions {
        None => EMBED_DIM,
        Some(d) if (1..=EMBED_DIM as i64).contains(&d) => d as usize,
        Some(d) => {
            return Err(ApiError::bad_request(format!(
                "Model '{}' only supports dimensions in range [1, {EMBED_DIM}], got {d}.",
                config.model
            ))
            .with_param("dimensions"));
        }
    };
    let inputs = match (body.input, body.messages) {
        (Some(Input::Prompt(prompt)), _) => prompt_ids(&prompt)?,
        (Some(Input::Chat(chat)), _) | (None, Some(chat)) => chat_ids(&chat),
        (None, None) => {
            return Err(ApiError::bad_request("Field required: `input`").with_param("input"));
        }
    };
    if inputs.is_empty() {
        return Err(ApiError::bad_request("You must pass at least one prompt"));
    }
    if let Some(long) = inputs
        .iter()
        .find(|ids| ids.len() > config.max_model_len as usize)
    {
        return Err(ApiError::prompt_too_long(
            config.max_model_len,
            len_u32(long.len()),
        ));
    }
    Ok(Embeddings {
        inputs,
        encoding: body.encoding_format.unwrap_or(Encoding::Float),
        dimensions,
    })
}

/// The tokens of each prompt of a completions-style `input`; an empty one is refused.
fn prompt_ids(prompt: &Prompt) -> Result<Vec<Vec<u32>>, ApiError> {
    let text = |text: &str| {
        let mut ids = Vec::new();
        tokens::text_prompt_ids(text, &mut ids);
        ids
    };
    let inputs = match prompt {
        Prompt::Text(t) => vec![text(t)],
        Prompt::Texts(ts) => ts.iter().map(|t| text(t)).collect(),
        Prompt::Ids(ids) if ids.is_empty() => Vec::new(),
        Prompt::Ids(ids) => vec![ids.clone()],
        Prompt::IdLists(lists) => lists.clone(),
    };
    if inputs.iter().any(Vec::is_empty) {
        return Err(ApiError::bad_request("The decoder prompt cannot be empty"));
    }
    Ok(inputs)
}

/// The tokens of each conversation, rendered by the fake chat template.
fn chat_ids(chat: &Chat) -> Vec<Vec<u32>> {
    let conversation = |messages: &[Message]| {
        let mut ids = Vec::new();
        for message in messages {
            tokens::chat_message_ids(message.texts(), &mut ids);
        }
        tokens::chat_closing_ids(&mut ids);
        ids
    };
    match chat {
        Chat::One(messages) => vec![conversation(messages)],
        Chat::Batch(batch) => batch.iter().map(|m| conversation(m)).collect(),
    }
}

/// The embedding of `ids`: `dimensions` numbers drawn from a hash of the tokens, of unit length.
pub(crate) fn vector(ids: &[u32], dimensions: usize) -> Vec<f32> {
    let seed = ids.iter().fold(0x243F_6A88_85A3_08D3, |h, &id| {
        splitmix64(h ^ u64::from(id))
    });
    let raw: Vec<f64> = (0..dimensions as u64)
        .map(|i| (splitmix64(seed ^ splitmix64(i)) >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0)
        .collect();
    let norm = raw.iter().map(|x| x * x).sum::<f64>().sqrt();
    if norm == 0.0 {
        let mut unit = vec![0.0; dimensions];
        unit[0] = 1.0;
        return unit;
    }
    raw.iter().map(|x| (x / norm) as f32).collect()
}

/// The JSON answer (`float` or `base64`), in vLLM's key order; `usage` is `null` for a server
/// that reports none.
pub(crate) fn json_body(head: &Head, request: &Embeddings, usage: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + request.inputs.len() * request.dimensions * 24);
    out.push(b'{');
    head.write(&mut out, "list");
    out.extend_from_slice(b",\"data\":[");
    for (index, ids) in request.inputs.iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"index\":");
        push_u64(&mut out, index as u64);
        out.extend_from_slice(b",\"object\":\"embedding\",\"embedding\":");
        let vector = vector(ids, request.dimensions);
        if request.encoding == Encoding::Base64 {
            out.push(b'"');
            base64(&little_endian(&vector), &mut out);
            out.push(b'"');
        } else {
            out.push(b'[');
            for (i, x) in vector.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(f64::from(*x).to_string().as_bytes());
            }
            out.push(b']');
        }
        out.push(b'}');
    }
    out.extend_from_slice(b"],\"usage\":");
    if usage {
        let prompt = request.prompt_tokens();
        out.extend_from_slice(b"{\"prompt_tokens\":");
        push_u64(&mut out, prompt);
        out.extend_from_slice(b",\"total_tokens\":");
        push_u64(&mut out, prompt);
        out.extend_from_slice(
            b",\"completion_tokens\":0,\"prompt_tokens_details\":null,\
              \"completion_tokens_details\":null}",
        );
    } else {
        out.extend_from_slice(b"null");
    }
    out.push(b'}');
    out
}

/// The binary answer (`bytes`, `bytes_only`): the vectors, float32 little-endian, one after the
/// other.
pub(crate) fn bytes_body(request: &Embeddings) -> Vec<u8> {
    let vectors: Vec<f32> = request
        .inputs
        .iter()
        .flat_map(|ids| vector(ids, request.dimensions))
        .collect();
    little_endian(&vectors)
}

/// The `metadata` header of a `bytes` answer, as vLLM writes it (Python's `json.dumps`).
pub(crate) fn metadata(head: &Head, request: &Embeddings, usage: bool) -> String {
    let size = request.dimensions * 4;
    let data: Vec<String> = (0..request.inputs.len())
        .map(|i| {
            format!(
                "{{\"index\": {i}, \"embed_dtype\": \"float32\", \"endianness\": \"native\", \
                 \"start\": {}, \"end\": {}, \"shape\": [{}]}}",
                i * size,
                (i + 1) * size,
                request.dimensions
            )
        })
        .collect();
    let prompt = request.prompt_tokens();
    let usage = if usage {
        format!("{{\"prompt_tokens\": {prompt}, \"total_tokens\": {prompt}}}")
    } else {
        "null".to_owned()
    };
    format!(
        "{{\"id\": {}, \"created\": {}, \"model\": {}, \"data\": [{}], \"usage\": {usage}}}",
        head.id_json,
        head.created,
        head.model_json,
        data.join(", ")
    )
}

fn little_endian(numbers: &[f32]) -> Vec<u8> {
    numbers.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Standard base64 with padding.
fn base64(bytes: &[u8], out: &mut Vec<u8>) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]);
            } else {
                out.push(b'=');
            }
        }
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on a bad fixture")]
mod tests {
    use axum::http::StatusCode;

    use super::*;
    use crate::test_support::{config, err};

    fn head() -> Head {
        Head {
            id_json: "\"embd-1\"".into(),
            created: 7,
            model_json: "\"sim-model\"".into(),
        }
    }

    #[test]
    fn every_input_shape_counts_its_tokens() {
        let c = config();
        let tokens = |body: &str| {
            let parsed = parse(body.as_bytes(), &c).unwrap();
            parsed.inputs.iter().map(Vec::len).collect::<Vec<_>>()
        };
        assert_eq!(tokens(r#"{"input":"a b"}"#), [3]);
        assert_eq!(tokens(r#"{"input":["a b","c"]}"#), [3, 2]);
        assert_eq!(tokens(r#"{"input":[5,6,7,8]}"#), [4]);
        assert_eq!(tokens(r#"{"input":[[5],[6,7]]}"#), [1, 2]);
        let hi = r#"{"role":"user","content":"hi there"}"#;
        assert_eq!(tokens(&format!(r#"{{"input":[{hi}]}}"#)), [2 + 4 + 3]);
        assert_eq!(
            tokens(&format!(r#"{{"messages":[{hi},{hi}]}}"#)),
            [2 * (2 + 4) + 3]
        );
        assert_eq!(tokens(&format!(r#"{{"input":[[{hi}],[{hi}]]}}"#)), [9, 9]);
    }

    #[test]
    fn bad_requests_are_answered_as_vllm_answers_them() {
        let c = config();
        for body in [
            "not json",
            r#"{"model":"sim-model"}"#,
            r#"{"input":5}"#,
            r#"{"input":[1,"a"]}"#,
            r#"{"input":[]}"#,
            r#"{"input":[[]]}"#,
            r#"{"input":"x","encoding_format":"hex"}"#,
            r#"{"input":"x","dimensions":0}"#,
            r#"{"input":"x","dimensions":33}"#,
        ] {
            let e = err(parse(body.as_bytes(), &c));
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}: {e:?}");
        }
        let e = err(parse(br#"{"model":"gpt","input":"x"}"#, &c));
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        let long = format!(r#"{{"input":"{}"}}"#, "w ".repeat(c.max_model_len as usize));
        assert_eq!(
            err(parse(long.as_bytes(), &c)).status,
            StatusCode::BAD_REQUEST
        );
        let ok = parse(br#"{"input":"x","stream":true,"n":9,"dimensions":8}"#, &c).unwrap();
        assert_eq!((ok.encoding, ok.dimensions), (Encoding::Float, 8));
    }

    #[test]
    fn vectors_are_unit_length_functions_of_the_tokens() {
        let a = vector(&[1, 2, 3], EMBED_DIM);
        assert_eq!(a, vector(&[1, 2, 3], EMBED_DIM));
        assert_ne!(a, vector(&[1, 2, 4], EMBED_DIM));
        for v in [&a[..], &vector(&[9], 5)] {
            let norm: f64 = v.iter().map(|x| f64::from(*x).powi(2)).sum();
            assert!((norm - 1.0).abs() < 1e-5, "{norm}");
        }
        assert_eq!(vector(&[1], 5).len(), 5);
    }

    #[test]
    fn the_json_answer_has_vllms_shape_and_usage() {
        let c = config();
        let request = parse(br#"{"input":["a b","c"]}"#, &c).unwrap();
        let body: serde_json::Value =
            serde_json::from_slice(&json_body(&head(), &request, true)).unwrap();
        assert_eq!(body["object"], "list");
        assert_eq!(body["data"][1]["index"], 1);
        assert_eq!(body["data"][1]["object"], "embedding");
        assert_eq!(
            body["data"][0]["embedding"].as_array().unwrap().len(),
            EMBED_DIM
        );
        assert_eq!(
            body["usage"],
            serde_json::json!({"prompt_tokens": 5, "total_tokens": 5, "completion_tokens": 0,
                "prompt_tokens_details": null, "completion_tokens_details": null})
        );
        let quiet = json_body(&head(), &request, false);
        assert!(quiet.ends_with(b"\"usage\":null}"));
    }

    #[test]
    fn base64_and_bytes_carry_the_float32_vectors() {
        let c = config();
        let request = parse(br#"{"input":"a b","encoding_format":"base64"}"#, &c).unwrap();
        let body: serde_json::Value =
            serde_json::from_slice(&json_body(&head(), &request, true)).unwrap();
        let mut expected = Vec::new();
        base64(
            &little_endian(&vector(&request.inputs[0], EMBED_DIM)),
            &mut expected,
        );
        assert_eq!(
            body["data"][0]["embedding"],
            String::from_utf8(expected).unwrap()
        );
        assert_eq!(bytes_body(&request).len(), EMBED_DIM * 4);
        let metadata: serde_json::Value =
            serde_json::from_str(&metadata(&head(), &request, true)).unwrap();
        assert_eq!(metadata["data"][0]["end"], EMBED_DIM * 4);
        assert_eq!(metadata["usage"]["prompt_tokens"], 3);
    }

    #[test]
    fn base64_pads_as_the_standard_says() {
        let encode = |bytes: &[u8]| {
            let mut out = Vec::new();
            base64(bytes, &mut out);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(encode(b""), "");
        assert_eq!(encode(b"f"), "Zg==");
        assert_eq!(encode(b"fo"), "Zm8=");
        assert_eq!(encode(b"foo"), "Zm9v");
        assert_eq!(encode(b"foobar"), "Zm9vYmFy");
    }
}
