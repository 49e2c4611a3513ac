//! Builds the client response from a worker response: a live SSE relay or a buffered body.
//!
//! Each response owns its request's `MeterGuard` and `Outstanding` guard, so metering and the
//! worker's load count settle however the response ends: at `[DONE]`, on an upstream failure, or
//! when the client disconnects and the response body is dropped (which also drops the upstream
//! body and so closes the worker connection, cancelling generation there). A worker that goes
//! silent mid-stream for longer than the idle timeout is taken out of rotation and the stream
//! ends with an error event, billed for what was relayed.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderName, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::frame::{self, FrameAction, inspect, with_fingerprint};
use super::sse::SseSplitter;
use crate::api::request::{InferenceRequest, StreamUsage};
use crate::error::ApiError;
use crate::json;
use crate::metering::{MeterGuard, Status, StreamUsage as UsageSum, Synced, Usage};
use crate::router::Outstanding;

/// Worker response headers the client sees; framing headers are the gateway's own.
const RELAYED_HEADERS: [HeaderName; 2] = [CONTENT_TYPE, HeaderName::from_static("x-request-id")];

fn response(status: StatusCode, upstream: &HeaderMap, body: Body) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    for name in RELAYED_HEADERS {
        if let Some(value) = upstream.get(&name) {
            response.headers_mut().insert(name, value.clone());
        }
    }
    response
}

/// A complete (non-streaming) worker response, relayed byte for byte once its usage event is on
/// disk (when there is a journal).
pub async fn buffered_response(
    status: StatusCode,
    headers: &HeaderMap,
    body: Bytes,
    mut meter: MeterGuard,
) -> Response {
    match json::find_member(&body, "usage").and_then(|s| Usage::from_json(&body[s.value])) {
        Some(usage) => meter.observe(usage),
        None => meter.set_relayed_body(body.clone()),
    }
    meter.set_http_status(status.as_u16());
    let synced = meter.finish_synced(if status.is_success() {
        Status::Completed
    } else {
        Status::Failed
    });
    wait_synced(synced).await;
    response(status, headers, Body::from(body))
}

/// Waits until an event is on disk; a journal that failed to write it has logged why, and the
/// response goes on (its event is still on its way to the ledger).
async fn wait_synced(synced: Synced) {
    if let Some(synced) = synced {
        let _ = synced.await;
    }
}

/// A streaming worker response whose first body chunk has already arrived; the worker may then
/// go at most `idle_timeout` without sending a byte.
pub fn streaming_response(
    (status, headers): (StatusCode, &HeaderMap),
    first: Bytes,
    body: Incoming,
    mut meter: MeterGuard,
    outstanding: Outstanding,
    request: &InferenceRequest,
    idle_timeout: Duration,
) -> Response {
    meter.set_http_status(status.as_u16());
    let relay = Relay {
        usage: UsageSum::new(request.n),
        body,
        first: Some(first),
        splitter: SseSplitter::default(),
        client: request.client_usage,
        meter: Some(meter),
        saw_error: false,
        ended: false,
        held: Vec::new(),
        outstanding,
        synced: None,
        idle_timeout,
    };
    let stream = futures_util::stream::unfold(relay, |mut relay| async move {
        let chunk = relay.next_chunk().await?;
        Some((Ok::<_, Infallible>(chunk), relay))
    });
    response(status, headers, Body::from_stream(stream))
}

struct Relay {
    body: Incoming,
    first: Option<Bytes>,
    splitter: SseSplitter,
    client: StreamUsage,
    usage: UsageSum,
    /// Present until the stream's outcome is recorded.
    meter: Option<MeterGuard>,
    saw_error: bool,
    ended: bool,
    /// Events held back, in order, from a terminal chunk on, until the stream's fingerprint is
    /// known (see `frame`); `true` marks a terminal chunk. Empty unless the worker's fingerprint
    /// was not known yet when a terminal chunk arrived.
    held: Vec<(Bytes, bool)>,
    outstanding: Outstanding,
    /// The stream's usage event on its way to disk: its last bytes wait for it.
    synced: Synced,
    /// How long the worker may go without sending a byte.
    idle_timeout: Duration,
}

impl Relay {
    /// The next bytes for the client, or `None` at the end.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if self.ended {
            return None;
        }
        let out = self.next_bytes().await;
        wait_synced(self.synced.take()).await;
        out
    }

    async fn next_bytes(&mut self) -> Option<Bytes> {
        if let Some(first) = self.first.take() {
            return Some(self.process(first));
        }
        loop {
            let Ok(frame) = tokio::time::timeout(self.idle_timeout, self.body.frame()).await else {
                self.ended = true;
                let worker = self.outstanding.worker();
                tracing::warn!(
                    worker = %worker.url,
                    timeout = ?self.idle_timeout,
                    "worker went silent mid-stream; out of rotation until its next good probe"
                );
                worker.set_healthy(false);
                return self.fail("the worker stopped sending tokens");
            };
            match frame {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        let out = self.process(data);
                        if !out.is_empty() {
                            return Some(out);
                        }
                    }
                }
                Some(Err(error)) => {
                    self.ended = true;
                    tracing::warn!(%error, "worker stream broke");
                    return self.fail("the worker's stream broke off");
                }
                None => {
                    self.ended = true;
                    // A stream must end with `[DONE]`; one that just stops was cut short.
                    return self.fail("the worker's stream ended early");
                }
            }
        }
    }

    /// Turns worker bytes into client bytes, metering every event relayed.
    fn process(&mut self, chunk: Bytes) -> Bytes {
        let events = self.splitter.push(chunk);
        let mut out = BytesMut::new();
        // Usage is cumulative and a chunk is relayed whole, so only each choice's last usage in
        // the chunk needs parsing.
        let mut latest: Vec<(Option<u64>, Bytes)> = Vec::new();
        let mut done = false;
        for event in events {
            let inspected = inspect(&event, self.client);
            if let Some(range) = inspected.usage.clone() {
                let usage = event.slice(range);
                match latest.iter_mut().find(|(c, _)| *c == inspected.choice) {
                    Some(slot) => slot.1 = usage,
                    None => latest.push((inspected.choice, usage)),
                }
            }
            if inspected.usage.is_none()
                && !inspected.error
                && let (Some(meter), Some(payload)) = (self.meter.as_mut(), frame::payload(&event))
            {
                // A worker that reports no usage: the gateway counts what it relays.
                meter.relayed_event(payload);
            }
            self.saw_error |= inspected.error;
            done |= inspected.done;
            if let Some(range) = inspected.fingerprint.clone() {
                self.outstanding
                    .worker()
                    .set_fingerprint(event.slice(range));
            }
            let (head, tail): (&[u8], &[u8]) = match inspected.action {
                FrameAction::Keep => (&event, &[]),
                FrameAction::Drop => {
                    // The usage-only chunk: whatever waited for its fingerprint goes now.
                    self.release_held(&mut out);
                    continue;
                }
                FrameAction::Strip(cut) => (&event[..cut.start], &event[cut.end..]),
            };
            if inspected.done || inspected.error {
                self.release_held(&mut out);
            }
            if self.held.is_empty() && !inspected.terminal {
                // The common case: relayed straight into the client's bytes.
                out.extend_from_slice(head);
                out.extend_from_slice(tail);
                continue;
            }
            let relayed = Bytes::from([head, tail].concat());
            let fingerprint = self.outstanding.worker().fingerprint();
            match fingerprint {
                Some(fingerprint) if self.held.is_empty() => {
                    out.extend_from_slice(&with_fingerprint(&relayed, &fingerprint));
                }
                _ => self.held.push((relayed, inspected.terminal)),
            }
        }
        if let Some(meter) = self.meter.as_mut()
            && !latest.is_empty()
        {
            let mut observed = false;
            for (choice, value) in latest {
                if let Some(usage) = Usage::from_json(&value) {
                    self.usage.observe(choice, usage);
                    observed = true;
                }
            }
            if observed {
                meter.observe(self.usage.usage());
            }
        }
        if done {
            // Recorded, and on disk, before the client can see `[DONE]`: a client that leaves
            // right after it still got the whole response.
            if let Some(meter) = self.meter.take() {
                self.synced = meter.finish_synced(if self.saw_error {
                    Status::Failed
                } else {
                    Status::Completed
                });
            }
        }
        out.freeze()
    }

    /// Appends the held events to `out`, terminal chunks stamped with the worker's fingerprint
    /// if it is known by now.
    fn release_held(&mut self, out: &mut BytesMut) {
        if self.held.is_empty() {
            return;
        }
        let fingerprint = self.outstanding.worker().fingerprint();
        for (event, terminal) in self.held.drain(..) {
            match (&fingerprint, terminal) {
                (Some(fingerprint), true) => {
                    out.extend_from_slice(&with_fingerprint(&event, fingerprint));
                }
                _ => out.extend_from_slice(&event),
            }
        }
    }

    /// Ends the client's stream with an error event, unless it already ended properly.
    fn fail(&mut self, reason: &'static str) -> Option<Bytes> {
        let meter = self.meter.take()?;
        self.synced = meter.finish_synced(Status::Failed);
        let mut out = BytesMut::new();
        self.release_held(&mut out);
        out.extend_from_slice(&ApiError::Upstream(reason).sse_frame());
        Some(out.freeze())
    }
}
