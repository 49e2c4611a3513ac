//! One upstream call's wire part: the request sent to a worker, with the client's request id and
//! the trace context, and the wait for the worker's answer, as far as an attempt waits for it.
//! Choosing the worker, retrying and the circuit breaker belong to `attempt`.

use bytes::Bytes;
use http::response::Parts;
use http_body_util::BodyExt;
use tokio::time::Instant;
use tracing::Span;

use crate::metering::MeterGuard;
use crate::relay::DONE;
use crate::request::InferenceRequest;
use crate::router::Worker;
use crate::state::AppState;
use crate::telemetry::TraceHeaders;
use crate::upstream::{self, Carried, UpstreamError};

/// What a worker sent back, read as far as an attempt waits for it.
pub(super) enum Exchanged {
    /// A successful stream, its first chunk in.
    Stream {
        parts: Parts,
        first: Bytes,
        rest: upstream::Body,
    },
    /// A complete answer, of any status.
    Complete { parts: Parts, body: Bytes },
}

/// Sends the request to `worker` and waits for its answer, all of which is the worker's time:
/// the response head, then a successful stream's first event or else the whole body. The
/// `gateway.first_byte` span runs from the send to the first byte.
pub(super) async fn exchange(
    state: &AppState,
    request: &InferenceRequest,
    worker: &Worker,
    body: Bytes,
    trace: &TraceHeaders,
    meter: &MeterGuard,
    span: &Span,
) -> Result<Exchanged, UpstreamError> {
    let deadline = state.upstream.deadline();
    let first_byte = crate::child_span!(span, "gateway.first_byte");
    let response = state
        .upstream
        .post_json(
            worker.to(),
            worker.uri(request.endpoint),
            body,
            Carried {
                request_id: request.client_request_id.as_deref(),
                trace: Some(trace),
            },
            deadline,
        )
        .await?;
    let (parts, incoming) = response.into_parts();
    if request.stream && parts.status.is_success() {
        let (first, rest) = first_chunk(incoming, &worker.url, deadline).await?;
        state.meter.metrics().first_byte(meter.elapsed());
        return Ok(Exchanged::Stream { parts, first, rest });
    }
    if !request.stream {
        state.meter.metrics().first_byte(meter.elapsed());
    }
    drop(first_byte);
    let body = crate::upstream::collect(incoming, &worker.url, deadline).await?;
    Ok(Exchanged::Complete { parts, body })
}

/// Waits for the first non-empty body chunk of a stream.
async fn first_chunk(
    mut body: upstream::Body,
    worker: &str,
    deadline: Instant,
) -> Result<(Bytes, upstream::Body), UpstreamError> {
    let wait = async {
        loop {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data()
                        && !data.is_empty()
                    {
                        return Ok(data);
                    }
                }
                Some(Err(error)) => {
                    return Err(UpstreamError::Transport {
                        worker: worker.to_owned(),
                        detail: error.to_string(),
                    });
                }
                None => {
                    return Err(UpstreamError::Transport {
                        worker: worker.to_owned(),
                        detail: "empty stream".to_owned(),
                    });
                }
            }
        }
    };
    match tokio::time::timeout_at(deadline, wait).await {
        Ok(Ok(first)) => {
            if first.ends_with(DONE) {
                // The whole stream in one read (a short answer, or one the worker had ready):
                // its body's end is right behind it, read by the connection's task, woken by
                // this read. Letting that task run first, before the client's response head
                // exists, lets the relay send the events, `[DONE]` and the end of the response
                // in one write (`relay::body`).
                tokio::task::yield_now().await;
            }
            Ok((first, body))
        }
        Ok(Err(error)) => Err(error),
        Err(_) => Err(UpstreamError::Timeout {
            worker: worker.to_owned(),
        }),
    }
}
