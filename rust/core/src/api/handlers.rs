//! Thin HTTP handlers: authenticate, read and parse the body, hand over to the pipeline, render
//! its outcome; `/ready`, `/health` and `/metrics` for whoever watches the gateway.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::map_response_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::time::Instant;

use super::render::render;
use crate::auth::Principal;
use crate::error::ApiError;
use crate::metering::{Arrival, Overhead};
use crate::pipeline::{Outcome, dispatch};
use crate::request::{Endpoint, InferenceRequest, Priority, check_request_id, request_timeout};
use crate::state::{AppState, Phase};
use crate::telemetry;

/// The gateway's routes over `state`; tests drive it without a socket.
pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/ready", get(ready))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(map_response_with_state(state.clone(), close_while_draining))
        .with_state(state)
}

/// While draining, every response asks its client to close the connection (hyper honours the
/// header and closes it once the response is out), so that keep-alive clients reconnect, through
/// a load balancer that no longer picks this gateway, before the listener closes.
async fn close_while_draining(
    State(state): State<Arc<AppState>>,
    mut response: Response,
) -> Response {
    if state.readiness.phase() == Phase::Draining {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    generate(&state, Endpoint::ChatCompletions, &headers, body).await
}

async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    generate(&state, Endpoint::Completions, &headers, body).await
}

async fn embeddings(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    generate(&state, Endpoint::Embeddings, &headers, body).await
}

/// A request's trace starts here (the child of the client's `traceparent`, if it sent one), and
/// so does the gateway's time on it (less the read of its body, which is the client's).
async fn generate(
    state: &AppState,
    endpoint: Endpoint,
    headers: &HeaderMap,
    body: Body,
) -> Response {
    let mut overhead = Overhead::start();
    let trace = telemetry::request_span("http", |name| {
        headers.get(name).and_then(|value| value.to_str().ok())
    });
    match admit(state, endpoint, headers, body, &mut overhead).await {
        Ok((request, principal)) => {
            let arrival = Arrival { overhead, trace };
            let mut dispatched = dispatch(state, request, &principal, arrival).await;
            if let Outcome::Stream { events, .. } = &mut dispatched.outcome {
                events.relay_whole_first_read().await;
            }
            render(dispatched)
        }
        Err(error) => {
            telemetry::record_refusal(&trace, &error);
            reject(state, error)
        }
    }
}

/// Authentication, then the body, then its parse: each failure answers before any worker is
/// involved.
async fn admit(
    state: &AppState,
    endpoint: Endpoint,
    headers: &HeaderMap,
    body: Body,
    overhead: &mut Overhead,
) -> Result<(InferenceRequest, Arc<Principal>), ApiError> {
    let principal = state.keys.authenticate(headers)?;
    let (max_body_bytes, body_read_timeout) = {
        let config = state.config.load();
        (config.max_body_bytes, config.body_read_timeout())
    };
    overhead.pause();
    let body = read_body(body, headers, max_body_bytes, body_read_timeout).await;
    overhead.resume();
    let body = body?;
    let request_id = match headers.get("x-request-id") {
        None => None,
        Some(value) => {
            let id = value.to_str().unwrap_or("\u{fffd}");
            check_request_id(id)?;
            Some(id.to_owned())
        }
    };
    let session_id = headers
        .get("x-session-id")
        .map(|value| value.to_str().unwrap_or("\u{fffd}"));
    let mut request =
        InferenceRequest::from_json(endpoint, body, request_id)?.with_session_id(session_id)?;
    if let Some(value) = headers.get("x-priority") {
        request.priority = Some(Priority::from_header(value.as_bytes())?);
    }
    if let Some(value) = headers.get("x-request-timeout") {
        request.deadline = Some(Instant::now() + request_timeout(value.as_bytes())?);
    }
    Ok((request, principal))
}

/// Answers a refused request, counting it.
fn reject(state: &AppState, error: ApiError) -> Response {
    state.meter.metrics().reject(&error);
    error.into_response()
}

/// Reads the whole body within `timeout`, refusing more than `limit` bytes without reading past
/// it.
async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let collected = tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await;
    match collected.map_err(|_| ApiError::RequestTimeout(timeout))? {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<LengthLimitError>() => Err(ApiError::PayloadTooLarge { limit }),
        Err(error) => Err(ApiError::bad_request(
            format!("could not read the request body: {error}"),
            None,
        )),
    }
}

/// The models the caller may use: every worker's, less those its allow-list excludes.
async fn models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let principal = match state.keys.authenticate(&headers) {
        Ok(principal) => principal,
        Err(error) => return reject(&state, error),
    };
    let document = match state.quota.model_filter(&principal) {
        None => state.registry.models_document(),
        Some(allowed) => state
            .registry
            .models_document_where(|model| allowed.iter().any(|m| m == model)),
    };
    ([(header::CONTENT_TYPE, "application/json")], document).into_response()
}

/// 200 while the gateway serves, 503 before (starting) and once it drains; with
/// `{"status":"ready"|"starting"|"draining"}`. Not about the workers: every replica shares them.
async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let phase = state.readiness.phase();
    let status = if phase == Phase::Serving {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = format!(r#"{{"status":"{}"}}"#, phase.name());
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// 200 while at least one worker is healthy, else 503; always with a small JSON summary.
async fn health(State(state): State<Arc<AppState>>) -> Response {
    let workers = state.registry.workers();
    let healthy = workers.iter().filter(|w| w.is_healthy()).count();
    let status = if healthy > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = format!(
        r#"{{"status":"{}","workers":{},"healthy_workers":{healthy}}}"#,
        if healthy > 0 { "ok" } else { "unavailable" },
        workers.len()
    );
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Prometheus text; no key needed, like `/health`.
async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let body = state.meter.metrics().render(
        &state.registry,
        state.meter.pending(),
        state.quota.stats(),
        state.scheduler.queued_counts(),
        state.policies.affinity_counts(),
    );
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], body).into_response()
}

async fn unknown_route(State(state): State<Arc<AppState>>) -> Response {
    reject(&state, ApiError::UnknownRoute)
}

async fn method_not_allowed(State(state): State<Arc<AppState>>) -> Response {
    reject(&state, ApiError::MethodNotAllowed)
}
