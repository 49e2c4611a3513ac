//! `gateway.v1.InferenceService`: each call is authenticated from its `authorization` metadata,
//! turned into the OpenAI request it stands for, and handed to `dispatch`, the HTTP API's own
//! path. The answer comes back as HTTP (a JSON body, an SSE stream, or an OpenAI error) and is
//! translated here. A stream is relayed event by event: a call the client cancels drops the
//! HTTP response, which cancels the worker's request and records the usage event as `cancelled`,
//! as an HTTP client's disconnect does.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::HeaderMap;
use http_body_util::BodyExt;
use tokio::time::Instant;
use tonic::metadata::MetadataMap;
use tonic::{Request, Status};

use super::convert;
use super::pb;
use super::pb::inference_service_server::InferenceService;
use super::status;
use crate::api::dispatch;
use crate::api::request::{Endpoint, InferenceRequest};
use crate::error::ApiError;
use crate::relay::SseSplitter;
use crate::state::AppState;

#[derive(serde::Deserialize)]
struct ModelList {
    data: Vec<ModelCard>,
}

#[derive(serde::Deserialize)]
struct ModelCard {
    id: String,
    #[serde(default)]
    owned_by: String,
    #[serde(default)]
    max_model_len: Option<u64>,
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateChunk, Status>> + Send>>;

#[derive(Debug, Clone)]
pub struct InferenceApi {
    state: Arc<AppState>,
}

impl InferenceApi {
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }

    /// Runs the call through the pipeline; an error it answers becomes the call's status.
    async fn generate(
        &self,
        endpoint: Endpoint,
        metadata: &MetadataMap,
        body: Bytes,
        request_id: &str,
    ) -> Result<Response, Status> {
        let headers = metadata.clone().into_headers();
        let limit = self.state.config.max_body_bytes;
        let admitted = self
            .state
            .keys
            .authenticate(&headers)
            .and_then(|principal| {
                // The HTTP API's body limit, on the body the call stands for.
                if body.len() > limit {
                    return Err(ApiError::PayloadTooLarge { limit });
                }
                let id = (!request_id.is_empty()).then(|| request_id.to_owned());
                InferenceRequest::from_json(endpoint, body, id).map(|request| (request, principal))
            });
        let (request, principal) = match admitted {
            Ok(admitted) => admitted,
            Err(error) => return Err(self.refuse(error).await),
        };
        let response = dispatch(&self.state, request, &principal).await;
        if response.status().is_success() {
            Ok(response)
        } else {
            Err(error_status(response).await)
        }
    }

    async fn refuse(&self, error: ApiError) -> Status {
        self.state.meter.metrics().reject(&error);
        error_status(error.into_response()).await
    }

    async fn unary(
        &self,
        endpoint: Endpoint,
        metadata: &MetadataMap,
        body: Bytes,
        request_id: &str,
    ) -> Result<tonic::Response<pb::GenerateResponse>, Status> {
        let call = async {
            let response = self.generate(endpoint, metadata, body, request_id).await?;
            let id = request_id_of(response.headers());
            let bytes = read(response.into_body()).await?;
            convert::response(&bytes, id)
                .map(tonic::Response::new)
                .ok_or_else(|| Status::internal("the worker's answer could not be read"))
        };
        within(deadline(metadata), call).await
    }

    async fn stream(
        &self,
        endpoint: Endpoint,
        metadata: &MetadataMap,
        body: Bytes,
        request_id: &str,
    ) -> Result<tonic::Response<ChunkStream>, Status> {
        let deadline = deadline(metadata);
        let response = within(
            deadline,
            self.generate(endpoint, metadata, body, request_id),
        )
        .await?;
        let id = request_id_of(response.headers());
        Ok(tonic::Response::new(chunks(
            response.into_body(),
            id,
            deadline,
        )))
    }
}

/// A little before the call's deadline (`grpc-timeout`), so that this gateway's answer,
/// DEADLINE_EXCEEDED, reaches the client first: tonic's own timer, started a moment earlier,
/// would end the call as CANCELLED.
fn deadline(metadata: &MetadataMap) -> Option<Instant> {
    const MARGIN: Duration = Duration::from_millis(5);
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (amount, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = amount.parse().ok()?;
    let timeout = match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    };
    Some(Instant::now() + timeout.saturating_sub(MARGIN))
}

fn deadline_exceeded() -> Status {
    Status::deadline_exceeded("the call's deadline passed")
}

/// `call`, or DEADLINE_EXCEEDED once `deadline` passes (dropping `call`, which cancels the
/// request at the worker and meters it as cancelled).
async fn within<T>(
    deadline: Option<Instant>,
    call: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    match deadline {
        None => call.await,
        Some(deadline) => tokio::time::timeout_at(deadline, call)
            .await
            .unwrap_or_else(|_| Err(deadline_exceeded())),
    }
}

fn request_id_of(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

async fn read(body: Body) -> Result<Bytes, Status> {
    body.collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .map_err(|error| Status::unavailable(format!("the answer was cut off: {error}")))
}

async fn error_status(response: Response) -> Status {
    let (parts, body) = response.into_parts();
    match read(body).await {
        Ok(bytes) => status::from_http(parts.status, &parts.headers, &bytes),
        Err(status) => status,
    }
}

/// The SSE events of `body` as chunks; the first carries `request_id`, an error event ends the
/// call with its status, `[DONE]` ends it with OK, and a `deadline` that passes with
/// DEADLINE_EXCEEDED.
fn chunks(body: Body, request_id: String, deadline: Option<Instant>) -> ChunkStream {
    struct Relay {
        body: axum::body::BodyDataStream,
        splitter: SseSplitter,
        ready: std::collections::VecDeque<Bytes>,
        request_id: Option<String>,
        done: bool,
    }
    let relay = Relay {
        body: body.into_data_stream(),
        splitter: SseSplitter::default(),
        ready: std::collections::VecDeque::new(),
        request_id: Some(request_id),
        done: false,
    };
    Box::pin(futures_util::stream::unfold(
        relay,
        move |mut relay| async move {
            loop {
                if relay.done {
                    return None;
                }
                while let Some(event) = relay.ready.pop_front() {
                    let Some(data) = event_data(&event) else {
                        continue;
                    };
                    if data == b"[DONE]" {
                        return None;
                    }
                    if let Some(error) = status::from_event(data) {
                        relay.done = true;
                        return Some((Err(error), relay));
                    }
                    let Some(mut chunk) = convert::chunk(data) else {
                        continue;
                    };
                    if let Some(id) = relay.request_id.take() {
                        chunk.request_id = id;
                    }
                    return Some((Ok(chunk), relay));
                }
                let next = within(deadline, async { Ok(relay.body.next().await) }).await;
                let next = match next {
                    Ok(next) => next,
                    Err(status) => {
                        relay.done = true;
                        return Some((Err(status), relay));
                    }
                };
                match next {
                    Some(Ok(bytes)) => relay.ready.extend(relay.splitter.push(bytes)),
                    Some(Err(error)) => {
                        relay.done = true;
                        let status =
                            Status::unavailable(format!("the stream was cut off: {error}"));
                        return Some((Err(status), relay));
                    }
                    None => {
                        relay.done = true;
                        let status = Status::unavailable("the stream ended before its last event");
                        return Some((Err(status), relay));
                    }
                }
            }
        },
    ))
}

/// The payload of an SSE event's `data:` line.
fn event_data(event: &[u8]) -> Option<&[u8]> {
    let line = event
        .split(|&b| b == b'\n')
        .find(|l| l.starts_with(b"data:"))?;
    let data = &line[5..];
    Some(data.strip_prefix(b" ").unwrap_or(data))
}

#[tonic::async_trait]
impl InferenceService for InferenceApi {
    async fn chat_completion(
        &self,
        request: Request<pb::ChatCompletionRequest>,
    ) -> Result<tonic::Response<pb::GenerateResponse>, Status> {
        let (metadata, _, message) = request.into_parts();
        let body = convert::chat_body(&message, false);
        self.unary(
            Endpoint::ChatCompletions,
            &metadata,
            body,
            &message.request_id,
        )
        .await
    }

    type StreamChatCompletionStream = ChunkStream;

    async fn stream_chat_completion(
        &self,
        request: Request<pb::ChatCompletionRequest>,
    ) -> Result<tonic::Response<ChunkStream>, Status> {
        let (metadata, _, message) = request.into_parts();
        let body = convert::chat_body(&message, true);
        self.stream(
            Endpoint::ChatCompletions,
            &metadata,
            body,
            &message.request_id,
        )
        .await
    }

    async fn completion(
        &self,
        request: Request<pb::CompletionRequest>,
    ) -> Result<tonic::Response<pb::GenerateResponse>, Status> {
        let (metadata, _, message) = request.into_parts();
        let body = convert::completion_body(&message, false);
        self.unary(Endpoint::Completions, &metadata, body, &message.request_id)
            .await
    }

    type StreamCompletionStream = ChunkStream;

    async fn stream_completion(
        &self,
        request: Request<pb::CompletionRequest>,
    ) -> Result<tonic::Response<ChunkStream>, Status> {
        let (metadata, _, message) = request.into_parts();
        let body = convert::completion_body(&message, true);
        self.stream(Endpoint::Completions, &metadata, body, &message.request_id)
            .await
    }

    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<tonic::Response<pb::ListModelsResponse>, Status> {
        let headers = request.metadata().clone().into_headers();
        let principal = match self.state.keys.authenticate(&headers) {
            Ok(principal) => principal,
            Err(error) => return Err(self.refuse(error).await),
        };
        // The model list the HTTP API serves this caller, read back.
        let document = match self.state.quota.model_filter(&principal) {
            None => self.state.registry.models_document(),
            Some(allowed) => self
                .state
                .registry
                .models_document_where(|model| allowed.iter().any(|m| m == model)),
        };
        let models = serde_json::from_slice::<ModelList>(&document)
            .map_err(|_| Status::internal("the model list could not be read"))?
            .data
            .into_iter()
            .map(|card| pb::Model {
                id: card.id,
                owned_by: card.owned_by,
                max_model_len: card.max_model_len,
            })
            .collect();
        Ok(tonic::Response::new(pb::ListModelsResponse { models }))
    }
}
