//! Sends an admitted request to a worker, retrying on another until the first byte is relayed.
//!
//! A request may move to another worker while nothing has reached the client: when a worker
//! cannot be reached, breaks the connection, answers 5xx, or (streaming) fails before its first
//! event. From the first relayed byte on, the response belongs to that worker. Each attempt's
//! outcome feeds the worker's circuit breaker (`router::breaker`).

use std::sync::Arc;

use bytes::Bytes;
use http::HeaderValue;
use http::response::Parts;
use tracing::Span;

use super::exchange::{Exchanged, exchange};
use super::outcome::{Answer, Head, METADATA, Outcome};
use crate::coalesce::{Joined, Route};
use crate::error::ApiError;
use crate::metering::{Counter, MeterGuard};
use crate::relay::{EventStream, complete};
use crate::request::{Endpoint, InferenceRequest};
use crate::router::{Outstanding, Worker, WorkerId};
use crate::scheduler::Claim;
use crate::state::AppState;
use crate::telemetry::TraceHeaders;
use crate::upstream::{self, UpstreamError};
use crate::usage::Status;

/// Why an attempt did not produce a response for the client.
enum Failure {
    Gateway(ApiError),
    /// A worker's own 5xx, relayed as is when no attempt is left.
    Worker {
        parts: Parts,
        body: Bytes,
    },
}

/// What a worker that answered sent.
enum Reply {
    /// A stream whose first chunk has arrived.
    Stream {
        parts: Parts,
        first: Bytes,
        rest: upstream::Body,
        outstanding: Outstanding,
    },
    /// A complete answer below 500.
    Complete { parts: Parts, body: Bytes },
}

/// Tries the workers the scheduler places the request on, in turn, until one answers or the
/// attempts run out; the outcome owns the request's meter. `claim` orders it in its model's
/// queue if it has to wait for a worker.
pub(super) async fn run(
    state: &AppState,
    request: &InferenceRequest,
    claim: &Claim,
    mut meter: MeterGuard,
) -> Outcome {
    let body = request.upstream_body();
    let trace = meter.trace().clone();
    let (max_attempts, stream_idle_timeout) = {
        let config = state.config.load();
        let routing = &config.routing;
        (routing.max_attempts as usize, routing.stream_idle_timeout())
    };
    let mut tried: Vec<WorkerId> = Vec::with_capacity(max_attempts);
    let mut failure = Failure::Gateway(ApiError::NoHealthyWorker(request.model.clone()));
    while tried.len() < max_attempts {
        // Queueing (when every worker is full) and the routing policy's choice.
        let route = crate::child_span!(
            &trace,
            "gateway.route",
            worker = tracing::field::Empty,
            queue.waited_ms = tracing::field::Empty,
        );
        let placement = match state.scheduler.place(request, claim, &tried).await {
            Ok(Some(placement)) => placement,
            Ok(None) => break,
            Err(error) => {
                failure = Failure::Gateway(error);
                break;
            }
        };
        let worker = placement.outstanding.worker().clone();
        if !route.is_none() {
            route.record("worker", &*worker.url);
            let waited = placement.waited.unwrap_or_default();
            route.record("queue.waited_ms", waited.as_secs_f64() * 1e3);
        }
        drop(route);
        if let Some(waited) = placement.waited {
            state
                .meter
                .metrics()
                .queue_wait(&request.model, &claim.tenant, waited);
            meter.on_settle(state.scheduler.refund_on_settle(&request.model, claim));
        }
        state.meter.metrics().attempt(!tried.is_empty());
        let span = crate::child_span!(
            &trace,
            "gateway.attempt",
            otel.kind = "client",
            worker = &*worker.url,
            // Signed: the OpenTelemetry layer writes unsigned integers as text.
            attempt = tried.len() as i64 + 1,
            outcome = tracing::field::Empty,
        );
        tried.push(worker.id);
        meter.set_worker(
            worker.url.clone(),
            Counter::new(
                state.upstream.clone(),
                worker.clone(),
                request.endpoint,
                request.body(),
            ),
        );
        let replied = attempt(
            state,
            request,
            placement.outstanding,
            body.clone(),
            &mut meter,
            &span,
        )
        .await;
        if !span.is_none() {
            span.record(
                "outcome",
                match &replied {
                    Ok(_) => "answered",
                    Err(Failure::Worker { .. }) => "worker_error",
                    Err(Failure::Gateway(_)) => "failed",
                },
            );
        }
        drop(span);
        match replied {
            Ok(Reply::Stream {
                parts,
                first,
                rest,
                outstanding,
            }) => {
                let events = Box::new(EventStream::new(
                    first,
                    rest,
                    meter,
                    outstanding,
                    request,
                    stream_idle_timeout,
                ));
                let head = Head::of(parts.status, &parts.headers);
                return Outcome::Stream { head, events };
            }
            Ok(Reply::Complete { parts, body }) => {
                return answer(request, parts, body, meter).await;
            }
            Err(next) => failure = next,
        }
    }
    match failure {
        Failure::Worker { parts, body } => answer(request, parts, body, meter).await,
        Failure::Gateway(error) => {
            meter.set_http_status(error.status().as_u16());
            meter.finish(Status::Failed);
            Outcome::Failed(error)
        }
    }
}

/// A worker's complete answer, metered: from the `usage` in its body, or for binary embeddings
/// (vLLM's `encoding_format: "bytes"`, whose body is only the vectors) in its `metadata` header.
async fn answer(
    request: &InferenceRequest,
    parts: Parts,
    body: Bytes,
    meter: MeterGuard,
) -> Outcome {
    let metadata = match request.endpoint {
        Endpoint::Embeddings => parts.headers.get(METADATA).map(HeaderValue::as_bytes),
        Endpoint::ChatCompletions | Endpoint::Completions => None,
    };
    let _relay = crate::child_span!(meter.trace(), "gateway.relay");
    let usage = complete(parts.status, &body, metadata, meter).await;
    Outcome::Answer(Answer {
        head: Head::of(parts.status, &parts.headers),
        body,
        usage,
    })
}

/// One attempt on the worker `outstanding` counts it on: its answer, or why there is none to
/// relay. The outcome goes to the worker's circuit breaker: an answer below 500 (a 4xx is the
/// client's fault) or a stream's first event is an answer; a 5xx, a broken connection or no
/// answer in time is a failure; a refused connection marks the worker down instead. The time
/// spent waiting on the worker is not the gateway's (`meter`'s overhead pauses); the upstream
/// request carries `span`'s trace context.
async fn attempt(
    state: &AppState,
    request: &InferenceRequest,
    mut outstanding: Outstanding,
    body: Bytes,
    meter: &mut MeterGuard,
    span: &Span,
) -> Result<Reply, Failure> {
    let worker = outstanding.worker().clone();
    if let Some(joined) = coalesced(state, request, &worker, &body, meter).await {
        match joined {
            Joined::Answer { parts, body } => {
                state.meter.metrics().first_byte(meter.elapsed());
                return complete_reply(parts, body, outstanding);
            }
            Joined::Failed(error) => {
                return Err(upstream_failure(error, &mut outstanding, request));
            }
            Joined::Alone => {}
        }
    }
    let trace = TraceHeaders::of(span);
    meter.pause_overhead();
    let exchanged = exchange(state, request, &worker, body, &trace, meter, span).await;
    meter.resume_overhead();
    match exchanged {
        Ok(Exchanged::Stream { parts, first, rest }) => {
            outstanding.answered();
            Ok(Reply::Stream {
                parts,
                first,
                rest,
                outstanding,
            })
        }
        Ok(Exchanged::Complete { parts, body }) => complete_reply(parts, body, outstanding),
        Err(error) => Err(upstream_failure(error, &mut outstanding, request)),
    }
}

/// A worker's complete answer: relayed if below 500, else a failure of its attempt.
#[expect(
    clippy::result_large_err,
    reason = "what `attempt` returns, moved once; boxing the 5xx would allocate for nothing"
)]
fn complete_reply(
    parts: Parts,
    body: Bytes,
    mut outstanding: Outstanding,
) -> Result<Reply, Failure> {
    if parts.status.is_server_error() {
        outstanding.failed();
        Err(Failure::Worker { parts, body })
    } else {
        outstanding.answered();
        Ok(Reply::Complete { parts, body })
    }
}

/// An attempt that got no answer from its worker.
fn upstream_failure(
    error: UpstreamError,
    outstanding: &mut Outstanding,
    request: &InferenceRequest,
) -> Failure {
    tracing::warn!(%error, "worker attempt failed");
    Failure::Gateway(if matches!(error, UpstreamError::Connect { .. }) {
        // Down, not misbehaving: out of rotation until a probe succeeds, and if no worker is
        // left the answer is "no healthy worker", not a bad gateway.
        outstanding.worker().set_healthy(false);
        ApiError::NoHealthyWorker(request.model.clone())
    } else {
        outstanding.failed();
        gateway_error(error)
    })
}

/// With coalescing on, a non-streaming completion joins its worker's open batch
/// (`crate::coalesce`); `None` when it goes on its own from the start.
async fn coalesced(
    state: &AppState,
    request: &InferenceRequest,
    worker: &Arc<Worker>,
    body: &Bytes,
    meter: &mut MeterGuard,
) -> Option<Joined> {
    let coalescer = state.coalescer.as_ref()?;
    if request.stream || !matches!(request.endpoint, Endpoint::Completions) {
        return None;
    }
    let part = coalescer.part(&request.model, body, request.n)?;
    let route = Route {
        upstream: state.upstream.clone(),
        worker: worker.clone(),
        meter: state.meter.clone(),
    };
    let request_id = request.client_request_id.as_deref();
    meter.pause_overhead();
    let joined = coalescer
        .join(&route, meter.key_id(), request_id, part)
        .await;
    meter.resume_overhead();
    Some(joined)
}

/// The client's answer to a failed attempt; the error itself, which names the worker, is logged.
fn gateway_error(error: UpstreamError) -> ApiError {
    match error {
        UpstreamError::Timeout { .. } => ApiError::UpstreamTimeout,
        UpstreamError::Connect { .. } => ApiError::Upstream("the worker could not be reached"),
        UpstreamError::Transport { .. } => {
            ApiError::Upstream("the worker broke the connection before it answered")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_attempt_does_not_name_the_worker() {
        let worker = "http://10.0.0.11:8000".to_owned();
        for error in [
            UpstreamError::Connect {
                worker: worker.clone(),
                detail: "connection refused (os error 111) at 10.0.0.11".into(),
            },
            UpstreamError::Transport {
                worker: worker.clone(),
                detail: "connection reset".into(),
            },
            UpstreamError::Timeout { worker },
        ] {
            let body = String::from_utf8(gateway_error(error).body()).unwrap_or_default();
            assert!(!body.contains("10.0.0.11"), "{body}");
            assert!(body.contains("upstream"), "{body}");
        }
    }
}
