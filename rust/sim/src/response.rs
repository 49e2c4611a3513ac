//! JSON shapes of the simulator's non-streaming answers (completions, chat, models, errors),
//! written by hand into one buffer in vLLM's key order, plus the JSON writing helpers `sse.rs`
//! shares.
//!
//! It decides nothing about what to answer; handlers and the engine do.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::plan::{Kind, Plan};

/// An OpenAI error envelope with its HTTP status, as vLLM ≥ 0.10.1 sends it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<&'static str>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub(crate) fn with_param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    pub(crate) fn model_not_found(model: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            format!("The model `{model}` does not exist."),
        )
        .with_param("model")
    }

    /// Prompt plus requested tokens over the context.
    pub(crate) fn context_exceeded(context: u32, prompt: u32, max_tokens: u32) -> Self {
        let total = u64::from(prompt) + u64::from(max_tokens);
        Self::bad_request(format!(
            "This model's maximum context length is {context} tokens. However, you requested \
             {total} tokens ({prompt} in the messages, {max_tokens} in the completion). Please \
             reduce the length of the messages or completion."
        ))
    }

    /// The prompt alone fills the context, leaving no default room to generate.
    pub(crate) fn prompt_too_long(context: u32, prompt: u32) -> Self {
        Self::bad_request(format!(
            "This model's maximum context length is {context} tokens. However, your request has \
             {prompt} input tokens. Please reduce the length of the input messages."
        ))
    }

    pub(crate) fn simulated_failure() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "simulated engine failure",
        )
    }

    /// The `type` the `openai` SDK expects for this status.
    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            400 => "BadRequestError",
            401 => "AuthenticationError",
            403 => "PermissionDeniedError",
            404 => "NotFoundError",
            429 => "RateLimitError",
            s if s >= 500 => "InternalServerError",
            _ => "BadRequestError",
        }
    }

    /// `{"error":{"message":..,"type":..,"param":..,"code":..}}`.
    pub(crate) fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"error\":{\"message\":");
        push_str(out, &self.message);
        out.extend_from_slice(b",\"type\":\"");
        out.extend_from_slice(self.kind().as_bytes());
        out.extend_from_slice(b"\",\"param\":");
        match self.param {
            Some(p) => push_str(out, p),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"code\":");
        push_u64(out, u64::from(self.status.as_u16()));
        out.extend_from_slice(b"}}");
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = Vec::with_capacity(128 + self.message.len());
        self.write_json(&mut body);
        json_response(self.status, body)
    }
}

/// A compact JSON body with `content-type: application/json`.
pub(crate) fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// The fields every response and chunk of one request opens with, pre-rendered.
/// `,"system_fingerprint":..`: vLLM's is `vllm-<version>-<config hash>`; this one is fixed.
pub(crate) const FINGERPRINT_MEMBER: &[u8] = b",\"system_fingerprint\":\"vllm-0.32.0-gatewaysim\"";

#[derive(Debug, Clone)]
pub(crate) struct Head {
    /// The whole response id, JSON-encoded with its quotes (`"chatcmpl-…"`).
    pub id_json: String,
    pub created: u64,
    /// The served model name, JSON-encoded with its quotes.
    pub model_json: String,
}

impl Head {
    /// `"id":..,"object":"<object>","created":..,"model":..` (no braces).
    pub(crate) fn write(&self, out: &mut Vec<u8>, object: &str) {
        out.extend_from_slice(b"\"id\":");
        out.extend_from_slice(self.id_json.as_bytes());
        out.extend_from_slice(b",\"object\":\"");
        out.extend_from_slice(object.as_bytes());
        out.extend_from_slice(b"\",\"created\":");
        push_u64(out, self.created);
        out.extend_from_slice(b",\"model\":");
        out.extend_from_slice(self.model_json.as_bytes());
    }
}

/// The non-streaming body of a finished generation; without `usage`, `"usage":null`.
pub(crate) fn completion_body(head: &Head, plan: &Plan, usage: bool) -> Vec<u8> {
    let text_len: usize = plan.choices.iter().map(|c| c.tokens as usize * 8).sum();
    let mut out = Vec::with_capacity(400 + plan.choices.len() * 260 + text_len);
    out.push(b'{');
    let object = match plan.kind {
        Kind::Chat => "chat.completion",
        Kind::Completion => "text_completion",
    };
    head.write(&mut out, object);
    out.extend_from_slice(b",\"choices\":[");
    for (index, choice) in plan.choices.iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"index\":");
        push_u64(&mut out, index as u64);
        match plan.kind {
            Kind::Chat => {
                out.extend_from_slice(b",\"message\":{\"role\":\"assistant\",\"content\":\"")
            }
            Kind::Completion => out.extend_from_slice(b",\"text\":\""),
        }
        for pos in 0..choice.tokens {
            push_escaped(&mut out, choice.delta(pos));
        }
        out.push(b'"');
        if plan.kind == Kind::Chat {
            out.extend_from_slice(
                b",\"refusal\":null,\"annotations\":null,\"audio\":null,\"function_call\":null,\
                  \"tool_calls\":[],\"reasoning_content\":null}",
            );
        }
        out.extend_from_slice(b",\"logprobs\":null,\"finish_reason\":\"");
        out.extend_from_slice(choice.finish.as_str().as_bytes());
        out.extend_from_slice(b"\",\"stop_reason\":");
        push_opt_str(&mut out, choice.stop_reason(plan));
        if plan.kind == Kind::Completion {
            // vLLM's order: `token_ids`, `prompt_logprobs`, `prompt_token_ids`; the ids are null
            // unless the request asked for them (`return_token_ids`).
            let prompt_ids = plan.prompt_ids.as_ref().and_then(|p| p.get(choice.prompt));
            out.extend_from_slice(b",\"token_ids\":");
            if prompt_ids.is_some() {
                let ids: Vec<u32> = (0..choice.tokens).map(|pos| choice.token_id(pos)).collect();
                push_ids(&mut out, &ids);
            } else {
                out.extend_from_slice(b"null");
            }
            out.extend_from_slice(b",\"prompt_logprobs\":null,\"prompt_token_ids\":");
            match prompt_ids {
                Some(ids) => push_ids(&mut out, ids),
                None => out.extend_from_slice(b"null"),
            }
        }
        out.push(b'}');
    }
    out.extend_from_slice(b"],\"service_tier\":null");
    out.extend_from_slice(FINGERPRINT_MEMBER);
    out.extend_from_slice(b",\"usage\":");
    if usage {
        out.push(b'{');
        write_usage_fields(
            &mut out,
            plan.total_prompt_tokens(),
            plan.total_completion_tokens(),
        );
        out.extend_from_slice(b",\"prompt_tokens_details\":null}");
    } else {
        out.extend_from_slice(b"null");
    }
    if plan.kind == Kind::Chat {
        out.extend_from_slice(b",\"prompt_logprobs\":null,\"prompt_token_ids\":null");
    }
    out.extend_from_slice(b",\"kv_transfer_params\":null}");
    out
}

/// A JSON array of token ids.
fn push_ids(out: &mut Vec<u8>, ids: &[u32]) {
    out.push(b'[');
    for (i, &id) in ids.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        push_u64(out, u64::from(id));
    }
    out.push(b']');
}

/// `"prompt_tokens":P,"total_tokens":P+C,"completion_tokens":C` (vLLM's field order, no braces).
pub(crate) fn write_usage_fields(out: &mut Vec<u8>, prompt: u64, completion: u64) {
    out.extend_from_slice(b"\"prompt_tokens\":");
    push_u64(out, prompt);
    out.extend_from_slice(b",\"total_tokens\":");
    push_u64(out, prompt + completion);
    out.extend_from_slice(b",\"completion_tokens\":");
    push_u64(out, completion);
}

/// `GET /v1/models`: the one served model, with a vLLM-like permission object.
pub(crate) fn models_body(
    model_json: &str,
    max_model_len: u32,
    created: u64,
    perm_id: &str,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(b"{\"object\":\"list\",\"data\":[{\"id\":");
    out.extend_from_slice(model_json.as_bytes());
    out.extend_from_slice(b",\"object\":\"model\",\"created\":");
    push_u64(&mut out, created);
    out.extend_from_slice(b",\"owned_by\":\"vllm\",\"root\":");
    out.extend_from_slice(model_json.as_bytes());
    out.extend_from_slice(b",\"parent\":null,\"max_model_len\":");
    push_u64(&mut out, u64::from(max_model_len));
    out.extend_from_slice(b",\"permission\":[{\"id\":\"modelperm-");
    out.extend_from_slice(perm_id.as_bytes());
    out.extend_from_slice(b"\",\"object\":\"model_permission\",\"created\":");
    push_u64(&mut out, created);
    out.extend_from_slice(
        b",\"allow_create_engine\":false,\"allow_sampling\":true,\"allow_logprobs\":true,\
          \"allow_search_indices\":false,\"allow_view\":true,\"allow_fine_tuning\":false,\
          \"organization\":\"*\",\"group\":null,\"is_blocking\":false}]}]}",
    );
    out
}

/// `POST /tokenize`: `{"count":N,"max_model_len":M,"tokens":[...],"token_strs":null}`.
pub(crate) fn tokenize_body(ids: &[u32], max_model_len: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + ids.len() * 6);
    out.extend_from_slice(b"{\"count\":");
    push_u64(&mut out, ids.len() as u64);
    out.extend_from_slice(b",\"max_model_len\":");
    push_u64(&mut out, u64::from(max_model_len));
    out.extend_from_slice(b",\"tokens\":[");
    for (i, &id) in ids.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        push_u64(&mut out, u64::from(id));
    }
    out.extend_from_slice(b"],\"token_strs\":null}");
    out
}

/// Appends `s` as a JSON string, quotes included.
pub(crate) fn push_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    push_escaped(out, s);
    out.push(b'"');
}

/// Appends a JSON string or `null`.
pub(crate) fn push_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => push_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

/// `s` JSON-encoded with its quotes, as a `String`.
pub(crate) fn json_string(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len() + 2);
    push_str(&mut out, s);
    // Escaping only ever replaces whole ASCII bytes, so valid UTF-8 stays valid.
    String::from_utf8(out).unwrap_or_default()
}

/// Appends the inside of a JSON string: quotes, backslashes and control characters escaped,
/// everything else (UTF-8 included) copied in runs.
pub(crate) fn push_escaped(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if escape.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.extend_from_slice(escape);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

/// Appends `v` in decimal without going through `fmt`.
pub(crate) fn push_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on a bad fixture")]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn escaping_round_trips_through_serde_json() {
        for s in [
            "plain",
            "q\"uote\\",
            "line\nfeed\t\u{1}\u{1f}",
            "ünïcødé ✓",
            "",
        ] {
            let encoded = json_string(s);
            assert_eq!(serde_json::from_str::<String>(&encoded).unwrap(), s);
        }
    }

    #[test]
    fn integers_print_in_decimal() {
        for v in [0, 7, 10, 1234567890, u64::MAX] {
            let mut out = Vec::new();
            push_u64(&mut out, v);
            assert_eq!(out, v.to_string().into_bytes());
        }
    }

    #[test]
    fn error_envelope_has_the_openai_shape() {
        let mut out = Vec::new();
        ApiError::model_not_found("x\"y").write_json(&mut out);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            json!({"error": {"message": "The model `x\"y` does not exist.",
                   "type": "NotFoundError", "param": "model", "code": 404}})
        );
        let mut out = Vec::new();
        ApiError::context_exceeded(10, 8, 5).write_json(&mut out);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["error"]["type"], "BadRequestError");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("maximum context length is 10")
        );
    }

    #[test]
    fn models_body_lists_the_model_with_root() {
        let body = models_body(&json_string("m"), 2048, 1700000000, "abc");
        let v: Value = serde_json::from_slice(&body).unwrap();
        let card = &v["data"][0];
        assert_eq!(
            (card["id"].as_str(), card["root"].as_str()),
            (Some("m"), Some("m"))
        );
        assert_eq!(card["max_model_len"], 2048);
        assert_eq!(card["permission"][0]["object"], "model_permission");
    }
}
