//! The simulator's HTTP surface: `app(config)` and one thin handler per vLLM route.
//!
//! Handlers only parse, pick the response kind and hand over; validation is `request.rs`,
//! timing and counting `engine.rs`, byte shapes `response.rs` and `sse.rs`.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;

use super::config::SimConfig;
use super::embedding::{self, Encoding};
use super::engine::{Engine, Generation};
use super::faults::FaultsUpdate;
use super::hold::HoldUpdate;
use super::plan::{Kind, StreamMode};
use super::request::{self, Message};
use super::response::{self, ApiError, Head, json_response};
use super::sse::{self, Frames};
use super::tokens;

/// Request bodies up to this size are read (long prompts are long).
const BODY_LIMIT: usize = 64 * 1024 * 1024;

const VERSION_BODY: &[u8] = b"{\"version\":\"0.32.0-sim\"}";

type AppState = Arc<Engine>;

/// The simulator as an axum `Router`, with its engine state built inside. Out-of-range config
/// values are clamped (see `SimConfig::validate` to reject them instead).
pub fn app(config: SimConfig) -> Router {
    let engine: AppState = Arc::new(Engine::new(config.normalized()));
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/health", get(empty_ok))
        .route("/ping", get(empty_ok).post(empty_ok))
        .route("/version", get(version))
        .route("/metrics", get(metrics))
        .route("/tokenize", post(tokenize))
        .route("/sim/faults", get(faults).post(set_faults))
        .route("/sim/hold", get(hold).post(set_hold))
        .route("/sim/traceparents", get(traceparents))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn_with_state(
            engine.clone(),
            require_api_key,
        ))
        .with_state(engine)
}

/// vLLM's `--api-key` check: `/v1/...` routes need the key (and the simulator's own `/sim/...`);
/// health, metrics and the rest don't.
async fn require_api_key(
    State(engine): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(key) = engine.config.api_key.as_deref()
        && ["/v1", "/sim/"]
            .iter()
            .any(|prefix| request.uri().path().starts_with(prefix))
    {
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if presented != Some(key) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::CONTENT_TYPE, "application/json")],
                r#"{"error":"Unauthorized"}"#,
            )
                .into_response();
        }
    }
    next.run(request).await
}

async fn chat_completions(
    State(engine): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    generate(engine, Kind::Chat, &headers, &body).await
}

async fn completions(State(engine): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    generate(engine, Kind::Completion, &headers, &body).await
}

async fn generate(engine: AppState, kind: Kind, headers: &HeaderMap, body: &[u8]) -> Response {
    engine.traceparents.record(headers);
    let parsed = match kind {
        Kind::Chat => request::chat(body, &engine.config),
        Kind::Completion => request::completion(body, &engine.config),
    };
    let mut plan = match parsed {
        Ok(plan) => plan,
        Err(err) => return err.into_response(),
    };
    if !engine.config.report_usage
        && let Some(mode) = plan.stream.as_mut()
    {
        *mode = StreamMode::NO_USAGE;
    }
    if engine.roll_error() {
        return ApiError::simulated_failure().into_response();
    }
    let head = Head {
        id_json: response_id(&engine, kind, headers),
        created: unix_now(),
        model_json: engine.model_json.clone(),
    };
    if let Some(mode) = plan.stream {
        let dies = engine.roll_death();
        let frames = Frames::new(&head, kind, mode);
        return sse::response(Generation::new(engine, plan), frames, dies);
    }
    let report_usage = engine.config.report_usage;
    let mut generation = Generation::new(engine, plan);
    if let Err(err) = generation.prefill().await {
        return err.into_response();
    }
    generation.decode_all().await;
    generation.finish();
    let body = response::completion_body(&head, generation.plan(), report_usage);
    json_response(StatusCode::OK, body)
}

/// `/v1/embeddings`: parsed, pooled by the engine, and answered in the encoding asked for.
async fn embeddings(State(engine): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    engine.traceparents.record(&headers);
    let request = match embedding::parse(&body, &engine.config) {
        Ok(request) => request,
        Err(err) => return err.into_response(),
    };
    if engine.roll_error() {
        return ApiError::simulated_failure().into_response();
    }
    let inputs = request.inputs.len() as u64;
    if let Err(err) = engine.pool(inputs, request.prompt_tokens()).await {
        return err.into_response();
    }
    let head = Head {
        id_json: prefixed_id(&engine, "embd-", &headers),
        created: unix_now(),
        model_json: engine.model_json.clone(),
    };
    let usage = engine.config.report_usage;
    match request.encoding {
        Encoding::Float | Encoding::Base64 => {
            json_response(StatusCode::OK, embedding::json_body(&head, &request, usage))
        }
        Encoding::Bytes | Encoding::BytesOnly => {
            let mut response = (
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                )],
                embedding::bytes_body(&request),
            )
                .into_response();
            if request.encoding == Encoding::Bytes
                && let Ok(value) =
                    HeaderValue::from_str(&embedding::metadata(&head, &request, usage))
            {
                response.headers_mut().insert("metadata", value);
            }
            response
        }
    }
}

/// `chatcmpl-<X-Request-Id>` / `cmpl-<X-Request-Id>`, or a random hex id, JSON-encoded.
fn response_id(engine: &Engine, kind: Kind, headers: &HeaderMap) -> String {
    let prefix = match kind {
        Kind::Chat => "chatcmpl-",
        Kind::Completion => "cmpl-",
    };
    prefixed_id(engine, prefix, headers)
}

/// `<prefix><X-Request-Id>`, or `<prefix>` and a random hex id, JSON-encoded.
fn prefixed_id(engine: &Engine, prefix: &str, headers: &HeaderMap) -> String {
    let base = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map_or_else(|| engine.random_hex(), str::to_owned);
    response::json_string(&format!("{prefix}{base}"))
}

async fn models(State(engine): State<AppState>) -> Response {
    let body = response::models_body(
        &engine.model_json,
        engine.config.max_model_len,
        unix_now(),
        &engine.random_hex(),
    );
    json_response(StatusCode::OK, body)
}

async fn empty_ok() -> StatusCode {
    StatusCode::OK
}

async fn version() -> Response {
    json_response(StatusCode::OK, VERSION_BODY.to_vec())
}

async fn metrics(State(engine): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        engine.metrics.render(),
    )
        .into_response()
}

/// `GET /sim/faults`: the failure rates now and the failures injected so far (the simulator's own
/// route, not vLLM's).
async fn faults(State(engine): State<AppState>) -> Response {
    json_response(StatusCode::OK, engine.faults.body())
}

/// `GET /sim/hold`: whether requests are held before their prefill, and how many wait there now
/// (the simulator's own route, not vLLM's).
async fn hold(State(engine): State<AppState>) -> Response {
    json_response(StatusCode::OK, engine.hold.body())
}

/// `POST /sim/hold` with `{"held": true}` or `{"held": false}`: holds requests from the next one
/// to get a slot, or releases every one held; answers as `GET` does.
async fn set_hold(State(engine): State<AppState>, body: Bytes) -> Response {
    match serde_json::from_slice::<HoldUpdate>(&body) {
        Ok(update) => {
            engine.hold.apply(&update);
            json_response(StatusCode::OK, engine.hold.body())
        }
        Err(e) => ApiError::bad_request(format!("Invalid request body: {e}")).into_response(),
    }
}

/// `GET /sim/traceparents`: the W3C `traceparent` of the latest generation and embedding
/// requests, oldest first (the simulator's own route: which traces reached this worker).
async fn traceparents(State(engine): State<AppState>) -> Response {
    json_response(StatusCode::OK, engine.traceparents.body())
}

/// `POST /sim/faults` with `{"error_rate": 0.0, "die_rate": 0.1}` (either may be left out): the
/// rates from the next request on; answers as `GET` does.
async fn set_faults(State(engine): State<AppState>, body: Bytes) -> Response {
    let update: FaultsUpdate = match serde_json::from_slice(&body) {
        Ok(update) => update,
        Err(e) => {
            return ApiError::bad_request(format!("Invalid request body: {e}")).into_response();
        }
    };
    match engine.faults.apply(&update) {
        Ok(()) => json_response(StatusCode::OK, engine.faults.body()),
        Err(name) => ApiError::bad_request(format!("{name} must be a fraction between 0 and 1"))
            .into_response(),
    }
}

/// `/tokenize` takes a completions-style `prompt` string or chat `messages`.
#[derive(Deserialize)]
struct TokenizeBody {
    model: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<Message>>,
    /// For a `prompt`: whether BOS is counted (vLLM's default, `true`).
    add_special_tokens: Option<bool>,
}

async fn tokenize(State(engine): State<AppState>, body: Bytes) -> Response {
    let parsed: TokenizeBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return ApiError::bad_request(format!("Invalid request body: {e}")).into_response();
        }
    };
    if let Some(model) = parsed
        .model
        .as_deref()
        .filter(|m| *m != engine.config.model)
    {
        return ApiError::model_not_found(model).into_response();
    }
    let mut ids = Vec::new();
    match (&parsed.prompt, &parsed.messages) {
        (Some(prompt), None) => {
            tokens::text_prompt_ids(prompt, &mut ids);
            if parsed.add_special_tokens == Some(false) {
                ids.remove(0);
            }
        }
        (None, Some(messages)) => {
            for message in messages {
                tokens::chat_message_ids(message.texts(), &mut ids);
            }
            tokens::chat_closing_ids(&mut ids);
        }
        _ => {
            return ApiError::bad_request("Exactly one of `prompt` or `messages` is required.")
                .into_response();
        }
    }
    json_response(
        StatusCode::OK,
        response::tokenize_body(&ids, engine.config.max_model_len),
    )
}

/// FastAPI's 404 body, which vLLM answers for unknown paths.
async fn not_found() -> Response {
    json_response(
        StatusCode::NOT_FOUND,
        b"{\"detail\":\"Not Found\"}".to_vec(),
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
