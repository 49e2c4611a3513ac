//! The internal request type every API surface translates into, and its parsing from OpenAI JSON.
//!
//! Only the members the gateway acts on are read and type-checked; everything else passes to the
//! worker untouched (vLLM's extras included). It does not check what only the worker can judge,
//! such as whether a prompt fits the context.

mod embedding;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

use crate::error::ApiError;
use crate::json;

/// The longest `X-Request-Id` (or gRPC `request_id`) accepted: it is stored with the usage event
/// and echoed in the response.
pub const MAX_REQUEST_ID_BYTES: usize = 256;

/// The longest `X-Session-Id` accepted: routing hashes it, so any longer gains nothing and costs
/// a hostile client's bytes.
pub const MAX_SESSION_ID_BYTES: usize = 256;

/// The longest `model` accepted: it is stored with the usage event.
pub const MAX_MODEL_BYTES: usize = 512;

/// The members the gateway reads, by name (for errors that must name one).
pub(crate) const MEMBERS: [&str; 10] = [
    "model",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "messages",
    "prompt",
    "priority",
    "input",
];

/// The longest wait a client may ask for (`X-Request-Timeout`): a day.
pub const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(86_400);

/// A request's priority class. While requests wait for a worker, `Interactive` ones are served
/// before `Batch` ones, within the rule the scheduler states against starving `Batch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    Batch,
    Interactive,
}

impl Priority {
    /// Both classes, most urgent first.
    pub const ALL: [Self; 2] = [Self::Interactive, Self::Batch];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Interactive => "interactive",
            Self::Batch => "batch",
        }
    }

    /// The class an `X-Priority` header (or gRPC `x-priority` metadata) names.
    pub fn from_header(value: &[u8]) -> Result<Self, ApiError> {
        match value {
            b"interactive" => Ok(Self::Interactive),
            b"batch" => Ok(Self::Batch),
            _ => Err(ApiError::bad_request(
                "`X-Priority` must be `interactive` or `batch`",
                Some("x-priority"),
            )),
        }
    }

    /// The class of vLLM's `priority` member: lower is more urgent, 0 the default; above 0 is
    /// `Batch`.
    fn from_vllm(priority: i64) -> Self {
        if priority > 0 {
            Self::Batch
        } else {
            Self::Interactive
        }
    }
}

/// How long a client lets its request wait for a worker: an `X-Request-Timeout` header, in
/// seconds (a decimal number, above 0, at most a day).
pub fn request_timeout(value: &[u8]) -> Result<Duration, ApiError> {
    std::str::from_utf8(value)
        .ok()
        .filter(|text| text.len() <= 32)
        .and_then(|text| text.trim().parse::<f64>().ok())
        .filter(|seconds| seconds.is_finite() && *seconds > 0.0)
        .and_then(|seconds| Duration::try_from_secs_f64(seconds).ok())
        .filter(|timeout| *timeout <= MAX_REQUEST_TIMEOUT)
        .ok_or_else(|| {
            ApiError::bad_request(
                "`X-Request-Timeout` must be a number of seconds above 0 and at most 86400",
                Some("x-request-timeout"),
            )
        })
}

/// Which OpenAI endpoint a request is for; serialised as its name in usage events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Endpoint {
    #[serde(rename = "chat.completions")]
    ChatCompletions,
    #[serde(rename = "completions")]
    Completions,
    /// Embeddings of an `input`: a prompt read, nothing generated.
    #[serde(rename = "embeddings")]
    Embeddings,
}

impl Endpoint {
    /// Every endpoint, in a fixed order.
    pub const ALL: [Self; 3] = [Self::ChatCompletions, Self::Completions, Self::Embeddings];

    /// The worker path this endpoint is served at.
    pub fn path(self) -> &'static str {
        match self {
            Self::ChatCompletions => "/v1/chat/completions",
            Self::Completions => "/v1/completions",
            Self::Embeddings => "/v1/embeddings",
        }
    }

    /// The name recorded in usage events.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat.completions",
            Self::Completions => "completions",
            Self::Embeddings => "embeddings",
        }
    }

    /// Whether it generates tokens (and so has `max_tokens`, `n`, streams): embeddings do not.
    pub fn generates(self) -> bool {
        !matches!(self, Self::Embeddings)
    }
}

/// What usage reporting the client itself asked for on a stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageOptions {
    pub include_usage: bool,
    pub continuous_usage_stats: bool,
}

/// One request for a worker (a generation, or embeddings), surface-neutral.
#[derive(Debug, Clone)]
pub struct InferenceRequest {
    pub endpoint: Endpoint,
    pub model: String,
    pub stream: bool,
    /// Meaningful only when `stream` is true.
    pub client_usage: UsageOptions,
    /// The client's `max_completion_tokens` / `max_tokens`, when given.
    pub max_tokens: Option<u64>,
    /// Choices per prompt.
    pub n: u64,
    /// Prompts in one request: a completions `prompt` or an embeddings `input` may be a batch;
    /// chat has one.
    pub prompts: u64,
    /// The client's `X-Request-Id`, forwarded so the worker bases its response id on it.
    pub client_request_id: Option<String>,
    /// The class the client asked for (`X-Priority`, or vLLM's `priority` member); its key's and
    /// tenant's ceiling clamps it, and sets it when absent.
    pub priority: Option<Priority>,
    /// When the client stops waiting for a worker (`X-Request-Timeout`, gRPC's deadline).
    pub deadline: Option<tokio::time::Instant>,
    /// The client's `X-Session-Id`: `prefix_affinity` places the request by it instead of by
    /// its prompt's prefix. Never sent to the worker.
    pub session_id: Option<Arc<str>>,
    /// The JSON body as the client sent it.
    body: Bytes,
}

/// The members the gateway acts on, read and type-checked, before the checks every surface
/// shares (`InferenceRequest::new`).
#[derive(Debug, Clone, Default)]
pub struct Fields {
    pub model: Option<String>,
    pub stream: bool,
    pub client_usage: UsageOptions,
    pub max_tokens: Option<u64>,
    pub n: Option<u64>,
    pub prompts: u64,
    pub priority: Option<Priority>,
}

/// The members the gateway reads, each kept raw so its type error can name it.
#[derive(Deserialize)]
struct Members<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(borrow, default)]
    stream: Option<&'a RawValue>,
    #[serde(borrow, default)]
    stream_options: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_completion_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    n: Option<&'a RawValue>,
    #[serde(borrow, default)]
    messages: Option<&'a RawValue>,
    #[serde(borrow, default)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow, default)]
    priority: Option<&'a RawValue>,
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
    continuous_usage_stats: Option<bool>,
}

/// Reads `raw` as `T`; JSON `null` or absence is `None`.
fn member<T: DeserializeOwned>(
    raw: Option<&RawValue>,
    name: &'static str,
    expected: &str,
) -> Result<Option<T>, ApiError> {
    let Some(raw) = raw else { return Ok(None) };
    if raw.get() == "null" {
        return Ok(None);
    }
    serde_json::from_str(raw.get())
        .map(Some)
        .map_err(|_| ApiError::bad_request(format!("`{name}` must be {expected}"), Some(name)))
}

/// `raw` must start with one of `openers` (`[`, `{`, `"`), i.e. be of that JSON kind.
fn require_kind(
    raw: Option<&RawValue>,
    name: &'static str,
    openers: &[u8],
    expected: &str,
) -> Result<(), ApiError> {
    match raw.map(|r| r.get().as_bytes().first().copied()) {
        None | Some(Some(b'n')) => Err(ApiError::bad_request(
            format!("`{name}` is required"),
            Some(name),
        )),
        Some(Some(c)) if openers.contains(&c) => Ok(()),
        Some(_) => Err(ApiError::bad_request(
            format!("`{name}` must be {expected}"),
            Some(name),
        )),
    }
}

/// How many prompts a completions `prompt` holds: a string or one array of token ids is one; an
/// array of strings or of token-id arrays is a batch.
fn prompt_count(raw: &RawValue) -> u64 {
    let text = raw.get();
    if !text.starts_with('[') {
        return 1;
    }
    let Ok(items) = serde_json::from_str::<Vec<&RawValue>>(text) else {
        return 1;
    };
    match items.first().and_then(|item| item.get().bytes().next()) {
        Some(b'"' | b'[') => u64::try_from(items.len()).unwrap_or(u64::MAX),
        _ => 1,
    }
}

/// The answer to a body serde could not read as the members the gateway reads.
fn parse_error(error: serde_json::Error) -> ApiError {
    if !error.is_data() {
        return ApiError::bad_request(format!("the request body is not valid JSON: {error}"), None);
    }
    // serde names a member given twice (under any spelling, escapes included) in its message.
    let text = error.to_string();
    if let Some(name) = MEMBERS
        .into_iter()
        .find(|name| text.starts_with(&format!("duplicate field `{name}`")))
    {
        return ApiError::bad_request(
            format!("the request body has the member `{name}` more than once"),
            Some(name),
        );
    }
    ApiError::bad_request(
        format!("the request body is not a valid request: {text}"),
        None,
    )
}

/// The model, which is required and at most `MAX_MODEL_BYTES` long.
fn checked_model(model: Option<String>) -> Result<String, ApiError> {
    let model = model.ok_or_else(|| ApiError::bad_request("`model` is required", Some("model")))?;
    if model.len() > MAX_MODEL_BYTES {
        return Err(ApiError::bad_request(
            format!("`model` must be at most {MAX_MODEL_BYTES} bytes long"),
            Some("model"),
        ));
    }
    Ok(model)
}

/// `n`, when given, is at least 1.
fn check_n(n: Option<u64>) -> Result<(), ApiError> {
    if n == Some(0) {
        return Err(ApiError::bad_request("`n` must be at least 1", Some("n")));
    }
    Ok(())
}

/// A client's request id: at most `MAX_REQUEST_ID_BYTES`, printable ASCII.
pub fn check_request_id(id: &str) -> Result<(), ApiError> {
    if id.len() > MAX_REQUEST_ID_BYTES || !id.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return Err(ApiError::bad_request(
            format!(
                "the request id (`X-Request-Id`) must be at most {MAX_REQUEST_ID_BYTES} printable \
                 ASCII characters"
            ),
            Some("x-request-id"),
        ));
    }
    Ok(())
}

/// A client's session id: 1 to `MAX_SESSION_ID_BYTES` printable ASCII characters.
pub fn check_session_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty()
        || id.len() > MAX_SESSION_ID_BYTES
        || !id.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
    {
        return Err(ApiError::bad_request(
            format!(
                "the session id (`X-Session-Id`) must be 1 to {MAX_SESSION_ID_BYTES} printable \
                 ASCII characters"
            ),
            Some("x-session-id"),
        ));
    }
    Ok(())
}

impl InferenceRequest {
    /// Parses an OpenAI JSON body for `endpoint`.
    pub fn from_json(
        endpoint: Endpoint,
        body: Bytes,
        client_request_id: Option<String>,
    ) -> Result<Self, ApiError> {
        // serde would also accept a struct written as an array; OpenAI bodies are objects.
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object",
                None,
            ));
        }
        let members: Members<'_> = serde_json::from_slice(&body).map_err(parse_error)?;
        // The model and the request id first: their errors come before any other member's.
        let model = checked_model(member(members.model, "model", "a string")?)?;
        if let Some(id) = &client_request_id {
            check_request_id(id)?;
        }
        if endpoint == Endpoint::Embeddings {
            // vLLM reads no `stream`, `n` nor `max_tokens` on embeddings (it ignores them, and so
            // does the gateway: they pass through).
            let fields = Fields {
                prompts: embedding::prompts(members.input, members.messages)?,
                priority: member::<i64>(members.priority, "priority", "an integer")?
                    .map(Priority::from_vllm),
                ..Fields::default()
            };
            return Ok(Self::checked(
                endpoint,
                model,
                fields,
                client_request_id,
                body,
            ));
        }
        let stream = member::<bool>(members.stream, "stream", "a boolean")?.unwrap_or(false);
        let options: Option<StreamOptions> =
            member(members.stream_options, "stream_options", "an object")?;
        let max_completion_tokens = member::<u64>(
            members.max_completion_tokens,
            "max_completion_tokens",
            "a non-negative integer",
        )?;
        let max_tokens = member::<u64>(members.max_tokens, "max_tokens", "a non-negative integer")?;
        let n = member::<u64>(members.n, "n", "a positive integer")?;
        check_n(n)?;
        let priority = member::<i64>(members.priority, "priority", "an integer")?;
        let prompts = if endpoint == Endpoint::ChatCompletions {
            require_kind(members.messages, "messages", b"[", "an array of messages")?;
            1
        } else {
            require_kind(
                members.prompt,
                "prompt",
                b"[\"",
                "a string, an array of strings or an array of token ids",
            )?;
            members.prompt.map_or(1, prompt_count)
        };
        // vLLM (like OpenAI) treats `stream_options: {}` as asking for usage.
        let client_usage = options.map_or_else(UsageOptions::default, |o| UsageOptions {
            include_usage: o.include_usage.unwrap_or(true),
            continuous_usage_stats: o.continuous_usage_stats.unwrap_or(false),
        });
        let max_tokens = if endpoint == Endpoint::ChatCompletions {
            max_completion_tokens.or(max_tokens)
        } else {
            max_tokens
        };
        let fields = Fields {
            model: None,
            stream,
            client_usage,
            max_tokens,
            n,
            prompts,
            priority: priority.map(Priority::from_vllm),
        };
        Ok(Self::checked(
            endpoint,
            model,
            fields,
            client_request_id,
            body,
        ))
    }

    /// A request from members already read (by a surface with typed messages), and the JSON
    /// `body` they stand for, which goes to the worker: the checks every surface shares.
    pub fn new(
        endpoint: Endpoint,
        mut fields: Fields,
        client_request_id: Option<String>,
        body: Bytes,
    ) -> Result<Self, ApiError> {
        let model = checked_model(fields.model.take())?;
        if let Some(id) = &client_request_id {
            check_request_id(id)?;
        }
        check_n(fields.n)?;
        Ok(Self::checked(
            endpoint,
            model,
            fields,
            client_request_id,
            body,
        ))
    }

    /// A request whose model, request id and `n` have passed the checks (`fields.model` is not
    /// read).
    fn checked(
        endpoint: Endpoint,
        model: String,
        fields: Fields,
        client_request_id: Option<String>,
        body: Bytes,
    ) -> Self {
        Self {
            endpoint,
            model,
            stream: fields.stream,
            client_usage: fields.client_usage,
            max_tokens: fields.max_tokens,
            n: fields.n.unwrap_or(1),
            prompts: fields.prompts,
            client_request_id,
            priority: fields.priority,
            deadline: None,
            session_id: None,
            body,
        }
    }

    /// The same request with the client's session id (`X-Session-Id`), once checked.
    pub fn with_session_id(mut self, id: Option<&str>) -> Result<Self, ApiError> {
        if let Some(id) = id {
            check_session_id(id)?;
            self.session_id = Some(Arc::from(id));
        }
        Ok(self)
    }

    /// The JSON body as the client sent it, borrowed.
    pub fn raw_body(&self) -> &Bytes {
        &self.body
    }

    /// The JSON body as the client sent it.
    pub fn body(&self) -> Bytes {
        self.body.clone()
    }

    /// The size of the body as the client sent it.
    pub fn body_len(&self) -> usize {
        self.body.len()
    }

    /// The body to send to a worker. Non-streaming bodies go as the client sent them (a
    /// `stream_options` there is the worker's to reject, as vLLM does). Streaming bodies get
    /// `stream_options` replaced so the worker reports cumulative usage on every chunk, which is
    /// what lets a stream cut short be billed for exactly what was relayed.
    pub fn upstream_body(&self) -> Bytes {
        if !self.stream {
            return self.body.clone();
        }
        const OPTIONS: &[u8] =
            br#""stream_options":{"include_usage":true,"continuous_usage_stats":true}"#;
        let body = match json::find_member(&self.body, "stream_options") {
            Some(span) => json::without(&self.body, &span),
            None => self.body.to_vec(),
        };
        let Some(open) = body.iter().position(|&b| b == b'{') else {
            return self.body.clone();
        };
        let rest_is_empty = body[open + 1..]
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_none_or(|&b| b == b'}');
        let mut out = Vec::with_capacity(body.len() + OPTIONS.len() + 1);
        out.extend_from_slice(&body[..=open]);
        out.extend_from_slice(OPTIONS);
        if !rest_is_empty {
            out.push(b',');
        }
        out.extend_from_slice(&body[open + 1..]);
        Bytes::from(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(endpoint: Endpoint, body: &str) -> Result<InferenceRequest, ApiError> {
        InferenceRequest::from_json(endpoint, Bytes::copy_from_slice(body.as_bytes()), None)
    }

    fn param_of(result: Result<InferenceRequest, ApiError>) -> Option<&'static str> {
        match result {
            Err(ApiError::BadRequest { param, .. }) => param,
            _ => Some("<not a bad request>"),
        }
    }

    #[test]
    fn reads_what_the_gateway_needs() {
        let request = parse(
            Endpoint::ChatCompletions,
            r#"{"model":"m","messages":[],"stream":true,"max_completion_tokens":7,"max_tokens":9,"top_k":3}"#,
        );
        let Ok(request) = request else {
            panic!("valid request rejected")
        };
        assert_eq!(request.model, "m");
        assert!(request.stream);
        assert_eq!(request.max_tokens, Some(7));
        assert_eq!(request.client_usage, UsageOptions::default());
    }

    #[test]
    fn type_errors_name_the_field() {
        let chat = Endpoint::ChatCompletions;
        assert_eq!(
            param_of(parse(chat, r#"{"model":1,"messages":[]}"#)),
            Some("model")
        );
        assert_eq!(param_of(parse(chat, r#"{"messages":[]}"#)), Some("model"));
        assert_eq!(
            param_of(parse(chat, r#"{"model":"m","messages":[],"stream":"yes"}"#)),
            Some("stream")
        );
        assert_eq!(
            param_of(parse(
                chat,
                r#"{"model":"m","messages":[],"max_tokens":-1}"#
            )),
            Some("max_tokens")
        );
        assert_eq!(
            param_of(parse(chat, r#"{"model":"m","messages":"hi"}"#)),
            Some("messages")
        );
        assert_eq!(
            param_of(parse(chat, r#"{"model":"m","messages":[],"n":0}"#)),
            Some("n")
        );
        assert_eq!(
            param_of(parse(Endpoint::Completions, r#"{"model":"m","prompt":5}"#)),
            Some("prompt")
        );
        assert_eq!(param_of(parse(chat, "{not json")), None);
        assert_eq!(param_of(parse(chat, "[1,2]")), None);
        let long = format!(r#"{{"model":"{}","messages":[]}}"#, "m".repeat(513));
        assert_eq!(param_of(parse(chat, &long)), Some("model"));
    }

    #[test]
    fn embeddings_read_their_inputs_and_nothing_of_generation() {
        let embed = |body: &str| parse(Endpoint::Embeddings, body);
        let text = r#"{"model":"m","input":["a","b"],"stream":"yes","n":0,"max_tokens":-1,"encoding_format":"base64","dimensions":8}"#;
        let Ok(request) = embed(text) else {
            panic!("valid embeddings request rejected")
        };
        assert_eq!(request.endpoint, Endpoint::Embeddings);
        assert_eq!(request.prompts, 2);
        assert_eq!(
            (request.stream, request.n, request.max_tokens),
            (false, 1, None),
            "vLLM ignores them on embeddings, and so does the gateway"
        );
        assert_eq!(&request.upstream_body()[..], text.as_bytes());
        assert_eq!(param_of(embed(r#"{"input":"x"}"#)), Some("model"));
        assert_eq!(param_of(embed(r#"{"model":"m"}"#)), Some("input"));
        assert_eq!(
            param_of(embed(r#"{"model":"m","input":[]}"#)),
            Some("input")
        );
        assert_eq!(param_of(embed(r#"{"model":"m","input":7}"#)), Some("input"));
        assert_eq!(
            param_of(embed(r#"{"model":"m","input":"x","input":"y"}"#)),
            Some("input")
        );
        let chat = embed(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#);
        assert_eq!(chat.map(|r| r.prompts).ok(), Some(1));
    }

    #[test]
    fn a_member_twice_is_named_under_any_spelling() {
        let twice = parse(
            Endpoint::Completions,
            r#"{"model":"m","prompt":"x","stream_options":{},"stream_opti\u006fns":{}}"#,
        );
        let Err(ApiError::BadRequest { message, param }) = twice else {
            panic!("a duplicate member was accepted")
        };
        assert_eq!(param, Some("stream_options"));
        assert!(message.contains("more than once"), "{message}");
    }

    #[test]
    fn request_ids_are_bounded_printable_ascii() {
        let body = Bytes::from_static(br#"{"model":"m","prompt":"x"}"#);
        let with_id = |id: &str| {
            InferenceRequest::from_json(Endpoint::Completions, body.clone(), Some(id.to_owned()))
        };
        assert!(with_id(&"r".repeat(256)).is_ok());
        assert_eq!(param_of(with_id(&"r".repeat(257))), Some("x-request-id"));
        assert_eq!(param_of(with_id("tab\there")), Some("x-request-id"));
    }

    #[test]
    fn session_ids_are_bounded_printable_ascii() {
        let body = Bytes::from_static(br#"{"model":"m","prompt":"x"}"#);
        let Ok(request) = InferenceRequest::from_json(Endpoint::Completions, body, None) else {
            panic!("valid request rejected")
        };
        let with = |id: &str| request.clone().with_session_id(Some(id));
        assert_eq!(
            with(&"s".repeat(256)).ok().and_then(|r| r.session_id),
            Some(Arc::from("s".repeat(256)))
        );
        for bad in [
            "s".repeat(257),
            String::new(),
            "new\nline".to_owned(),
            "é".to_owned(),
        ] {
            assert_eq!(param_of(with(&bad)), Some("x-session-id"), "{bad:?}");
        }
        assert_eq!(
            request.with_session_id(None).ok().map(|r| r.session_id),
            Some(None)
        );
    }

    #[test]
    fn an_escaped_stream_options_is_replaced_not_doubled() {
        let Ok(request) = parse(
            Endpoint::Completions,
            r#"{"model":"m","prompt":"x","stream":true,"stream_opti\u006fns":{"include_usage":false}}"#,
        ) else {
            panic!("valid request rejected")
        };
        let body = request.upstream_body();
        let members: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&body).unwrap_or_default();
        assert_eq!(members.len(), 4, "{}", String::from_utf8_lossy(&body));
        assert!(!String::from_utf8_lossy(&body).contains("opti\\u006fns"));
        assert_eq!(
            members.get("stream_options"),
            Some(&serde_json::json!({"include_usage": true, "continuous_usage_stats": true}))
        );
    }

    #[test]
    fn empty_stream_options_means_include_usage() {
        let Ok(request) = parse(
            Endpoint::Completions,
            r#"{"model":"m","prompt":"x","stream":true,"stream_options":{}}"#,
        ) else {
            panic!("valid request rejected")
        };
        assert!(request.client_usage.include_usage);
        assert!(!request.client_usage.continuous_usage_stats);
    }

    #[test]
    fn streaming_body_asks_for_continuous_usage_and_keeps_the_rest() {
        let Ok(request) = parse(
            Endpoint::Completions,
            r#"{"model":"m","stream_options":{"include_usage":false},"prompt":"x","stream":true,"min_p":0.1}"#,
        ) else {
            panic!("valid request rejected")
        };
        let body = request.upstream_body();
        assert_eq!(
            std::str::from_utf8(&body).ok(),
            Some(
                r#"{"stream_options":{"include_usage":true,"continuous_usage_stats":true},"model":"m","prompt":"x","stream":true,"min_p":0.1}"#
            )
        );
    }

    #[test]
    fn non_streaming_body_is_untouched() {
        let text = r#"{"model":"m","prompt":"x","stream_options":{"include_usage":true}}"#;
        let Ok(request) = parse(Endpoint::Completions, text) else {
            panic!("valid request rejected")
        };
        assert_eq!(&request.upstream_body()[..], text.as_bytes());
    }
}
