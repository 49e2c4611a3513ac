//! `gateway.v1.InferenceService`: each call is authenticated from its `authorization` metadata,
//! turned into the `InferenceRequest` it stands for, and run through the pipeline the HTTP API
//! uses; this file renders the pipeline's outcome as messages and statuses. A stream's message
//! carries what one read of the worker's stream brought. A call the client cancels drops the
//! relay, which cancels the worker's request and records the usage event as `cancelled`, as an
//! HTTP client's disconnect does.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::Either;
use futures_util::{FutureExt, Stream, StreamExt};
use tokio::time::Instant;
use tonic::metadata::MetadataMap;
use tonic::{Request, Status};

use super::convert;
use super::pb;
use super::pb::inference_service_server::InferenceService;
use super::status;
use crate::auth::Principal;
use crate::error::ApiError;
use crate::metering::{Arrival, Overhead};
use crate::pipeline::{Dispatched, Outcome, dispatch};
use crate::relay::{End, EventStream};
use crate::request::{InferenceRequest, Priority};
use crate::state::AppState;
use crate::telemetry;

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

    /// The caller, from the call's metadata.
    fn principal(&self, metadata: &MetadataMap) -> Result<Arc<Principal>, Status> {
        let value = metadata.get("authorization").map(|v| v.as_bytes());
        self.state
            .keys
            .authenticate_bearer(value)
            .map_err(|error| self.refuse(&error))
    }

    /// Counts a call refused before the pipeline, and its status.
    fn refuse(&self, error: &ApiError) -> Status {
        self.state.meter.metrics().reject(error);
        status::of_error(error)
    }

    /// Runs the call's request through the pipeline. The call's metadata may carry the
    /// client's trace context (`traceparent`, `tracestate`), as HTTP headers do.
    async fn run(
        &self,
        metadata: &MetadataMap,
        request: impl FnOnce(usize) -> Result<InferenceRequest, ApiError>,
    ) -> Result<(Dispatched, String), Status> {
        // The message is decoded by now: the gateway's time on the call starts here.
        let overhead = Overhead::start();
        let trace = telemetry::request_span("grpc", |name| {
            metadata.get(name).and_then(|value| value.to_str().ok())
        });
        let refuse = |error: ApiError| {
            telemetry::record_refusal(&trace, &error);
            self.refuse(&error)
        };
        let principal = self
            .state
            .keys
            .authenticate_bearer(metadata.get("authorization").map(|v| v.as_bytes()))
            .map_err(refuse)?;
        // `x-session-id` as over HTTP: prefix affinity places the call by it.
        let session_id = metadata
            .get("x-session-id")
            .map(|value| value.to_str().unwrap_or("\u{fffd}"));
        let mut request = request(self.state.config.load().max_body_bytes)
            .and_then(|request| request.with_session_id(session_id))
            .map_err(refuse)?;
        if let Some(value) = metadata.get("x-priority") {
            request.priority = Some(Priority::from_header(value.as_bytes()).map_err(refuse)?);
        }
        // The queue gives up a moment before the call's deadline, so that a call that waited
        // for a worker all along ends RESOURCE_EXHAUSTED (retry later), not DEADLINE_EXCEEDED.
        request.deadline = deadline(metadata)
            .map(|deadline| deadline.checked_sub(QUEUE_MARGIN).unwrap_or(deadline));
        let arrival = Arrival { overhead, trace };
        let dispatched = dispatch(&self.state, request, &principal, arrival).await;
        let request_id = match &dispatched.outcome {
            Outcome::Answer(answer) => answer.head.request_id.clone(),
            Outcome::Stream { head, .. } => head.request_id.clone(),
            Outcome::Refused(_) | Outcome::Failed(_) => None,
        }
        .and_then(|id| id.to_str().ok().map(str::to_owned))
        .or_else(|| dispatched.request_id.as_deref().map(str::to_owned))
        .unwrap_or_default();
        Ok((dispatched, request_id))
    }

    async fn unary(
        &self,
        metadata: &MetadataMap,
        request: impl FnOnce(usize) -> Result<InferenceRequest, ApiError>,
    ) -> Result<tonic::Response<pb::GenerateResponse>, Status> {
        let call = async {
            let (dispatched, request_id) = self.run(metadata, request).await?;
            match dispatched.outcome {
                Outcome::Refused(error) | Outcome::Failed(error) => Err(status::of_error(&error)),
                Outcome::Answer(answer) if answer.head.status.is_success() => {
                    convert::response(&answer.body, answer.usage, request_id)
                        .map(tonic::Response::new)
                        .ok_or_else(|| Status::internal("the worker's answer could not be read"))
                }
                Outcome::Answer(answer) => {
                    Err(status::from_worker(answer.head.status, &answer.body))
                }
                Outcome::Stream { .. } => Err(Status::internal("the worker streamed an answer")),
            }
        };
        within(deadline(metadata), call).await
    }

    async fn stream(
        &self,
        metadata: &MetadataMap,
        request: impl FnOnce(usize) -> Result<InferenceRequest, ApiError>,
    ) -> Result<tonic::Response<ChunkStream>, Status> {
        let deadline = deadline(metadata);
        let (dispatched, request_id) = within(deadline, self.run(metadata, request)).await?;
        match dispatched.outcome {
            Outcome::Refused(error) | Outcome::Failed(error) => Err(status::of_error(&error)),
            Outcome::Answer(answer) => Err(status::from_worker(answer.head.status, &answer.body)),
            Outcome::Stream { events, .. } => {
                // The response's headers wait for the first message (the relay already holds the
                // worker's first read): an answer that came in one read leaves as one write of
                // headers, message and trailers, and a stream that fails before its first
                // message ends as a trailers-only response.
                let mut messages = chunks(events.with_events(), request_id, deadline);
                let first = messages.next().await.unwrap_or_else(|| {
                    Err(Status::unavailable(
                        "the stream ended before its last event",
                    ))
                })?;
                let rest: ChunkStream =
                    Box::pin(futures_util::stream::once(async { Ok(first) }).chain(messages));
                Ok(tonic::Response::new(rest))
            }
        }
    }
}

/// How long before the service's deadline (`deadline`) a call's wait for a worker ends.
const QUEUE_MARGIN: Duration = Duration::from_millis(2);

/// A little before the call's deadline (`grpc-timeout`), so that this gateway's answer
/// (DEADLINE_EXCEEDED, or RESOURCE_EXHAUSTED for a wait for a worker) reaches the client before
/// the client's own timer ends the call (tonic's timer, started a moment earlier, would end it as
/// CANCELLED). The margin is a twentieth of the timeout, from 5 to 50 ms: a busy machine's
/// scheduling delays, not only the wire, stand between this answer and the client's timer.
fn deadline(metadata: &MetadataMap) -> Option<Instant> {
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
    let margin = (timeout / 20).clamp(Duration::from_millis(5), Duration::from_millis(50));
    Some(Instant::now() + timeout.saturating_sub(margin))
}

fn deadline_exceeded() -> Status {
    Status::deadline_exceeded("the call's deadline passed")
}

/// `call`, or DEADLINE_EXCEEDED once `deadline` passes (dropping `call`, which cancels the
/// request at the worker and meters it as cancelled). The future is `call`'s own, or `call` with
/// a timer: not an `async fn`, whose state would hold `call` twice (as its argument and as what
/// it awaits), and which every call's boxed future would copy.
fn within<T>(
    deadline: Option<Instant>,
    call: impl Future<Output = Result<T, Status>>,
) -> impl Future<Output = Result<T, Status>> {
    match deadline {
        None => Either::Left(call),
        Some(deadline) => Either::Right(
            tokio::time::timeout_at(deadline, call)
                .map(|timed| timed.unwrap_or_else(|_| Err(deadline_exceeded()))),
        ),
    }
}

/// The stream's messages, one per read of the worker's stream that brought text or usage: the
/// first carries `request_id`, the last the usage. The worker's error event ends the call with
/// its status, `[DONE]` with OK, a failed worker with UNAVAILABLE, and a `deadline` that passes
/// with DEADLINE_EXCEEDED.
fn chunks(events: Box<EventStream>, request_id: String, deadline: Option<Instant>) -> ChunkStream {
    struct Relay {
        events: Box<EventStream>,
        ready: VecDeque<Result<pb::GenerateChunk, Status>>,
        request_id: Option<String>,
        /// The worker's error event, reported once its stream ends.
        worker_error: Option<Status>,
        /// The id, model and creation time of the stream's first event, for a last message
        /// that has only the usage.
        first: Option<(String, String, i64)>,
        done: bool,
        /// At `[DONE]`: the worker's body is read to its end (so that its connection is reused)
        /// before the last message goes, which then leaves with the call's trailers in one
        /// write. The call ends no later for it: its trailers wait for that end either way.
        drain: bool,
    }
    let relay = Relay {
        events,
        ready: VecDeque::new(),
        request_id: Some(request_id),
        worker_error: None,
        first: None,
        done: false,
        drain: false,
    };
    Box::pin(futures_util::stream::unfold(
        relay,
        move |mut relay| async move {
            loop {
                if std::mem::take(&mut relay.drain) {
                    let rest = async {
                        while relay.events.next().await.is_some() {}
                        Ok(())
                    };
                    let _ = within(deadline, rest).await;
                }
                if let Some(item) = relay.ready.pop_front() {
                    return Some((item, relay));
                }
                if relay.done {
                    return None;
                }
                let next = within(deadline, async { Ok(relay.events.next().await) }).await;
                let relayed = match next {
                    Ok(Some(relayed)) => relayed,
                    Ok(None) => {
                        relay.done = true;
                        let status = Status::unavailable("the stream ended before its last event");
                        relay.ready.push_back(Err(status));
                        continue;
                    }
                    Err(status) => {
                        relay.done = true;
                        relay.ready.push_back(Err(status));
                        continue;
                    }
                };
                let mut chunk = relayed.delta.map(convert::chunk).unwrap_or_default();
                if relay.first.is_none() && !chunk.id.is_empty() {
                    relay.first = Some((chunk.id.clone(), chunk.model.clone(), chunk.created));
                }
                if let Some(payload) = &relayed.worker_error {
                    relay.worker_error = Some(status::from_worker_event(payload));
                }
                let end = match relayed.end {
                    None => None,
                    Some(End::Done(usage)) => {
                        relay.done = true;
                        relay.drain = true;
                        if relay.worker_error.is_none() {
                            chunk.usage = Some(convert::usage(usage));
                            if chunk.id.is_empty()
                                && let Some((id, model, created)) = relay.first.clone()
                            {
                                (chunk.id, chunk.model, chunk.created) = (id, model, created);
                            }
                        }
                        relay.worker_error.take().map(Err)
                    }
                    Some(End::Failed(error)) => {
                        relay.done = true;
                        Some(Err(status::of_stream_error(&error)))
                    }
                };
                if !chunk.choices.is_empty() || chunk.usage.is_some() {
                    if let Some(id) = relay.request_id.take() {
                        chunk.request_id = id;
                    }
                    relay.ready.push_back(Ok(chunk));
                }
                if let Some(end) = end {
                    relay.ready.push_back(end);
                }
            }
        },
    ))
}

#[tonic::async_trait]
impl InferenceService for InferenceApi {
    async fn chat_completion(
        &self,
        request: Request<pb::ChatCompletionRequest>,
    ) -> Result<tonic::Response<pb::GenerateResponse>, Status> {
        let (metadata, _, message) = request.into_parts();
        self.unary(&metadata, |limit| {
            convert::chat_request(&message, false, limit)
        })
        .await
    }

    type StreamChatCompletionStream = ChunkStream;

    async fn stream_chat_completion(
        &self,
        request: Request<pb::ChatCompletionRequest>,
    ) -> Result<tonic::Response<ChunkStream>, Status> {
        let (metadata, _, message) = request.into_parts();
        self.stream(&metadata, |limit| {
            convert::chat_request(&message, true, limit)
        })
        .await
    }

    async fn completion(
        &self,
        request: Request<pb::CompletionRequest>,
    ) -> Result<tonic::Response<pb::GenerateResponse>, Status> {
        let (metadata, _, message) = request.into_parts();
        self.unary(&metadata, |limit| {
            convert::completion_request(&message, false, limit)
        })
        .await
    }

    type StreamCompletionStream = ChunkStream;

    async fn stream_completion(
        &self,
        request: Request<pb::CompletionRequest>,
    ) -> Result<tonic::Response<ChunkStream>, Status> {
        let (metadata, _, message) = request.into_parts();
        self.stream(&metadata, |limit| {
            convert::completion_request(&message, true, limit)
        })
        .await
    }

    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<tonic::Response<pb::ListModelsResponse>, Status> {
        let principal = self.principal(request.metadata())?;
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
