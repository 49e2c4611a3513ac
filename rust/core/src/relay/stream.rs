//! Relays a worker's answer: a live SSE stream read by read, or a complete body.
//!
//! Each response owns its request's `MeterGuard` and `Outstanding` guard, so metering and the
//! worker's load count settle however the response ends: at `[DONE]`, on an upstream failure, or
//! when the client disconnects and the response body is dropped (which also drops the upstream
//! body and so closes the worker connection, cancelling generation there). A worker that goes
//! silent mid-stream for longer than the idle timeout is taken out of rotation and the stream
//! ends with an error event, billed for what was relayed; a stream that breaks off counts as a
//! failure for the worker's circuit breaker.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http_body_util::BodyExt;

use super::answer::{self, Delta};
use super::frame::{
    self, ChoicesAt, FrameAction, Inspected, inspect_answer, inspect_in, with_fingerprint,
};
use super::sse::SseSplitter;
use crate::error::ApiError;
use crate::json;
use crate::metering::{MeterGuard, Synced};
use crate::request::{InferenceRequest, UsageOptions};
use crate::router::Outstanding;
use crate::upstream;
use crate::usage::{Status, StreamUsage, Usage};

/// How a worker's stream ends, as vLLM frames it.
pub const DONE: &[u8] = b"data: [DONE]\n\n";

/// Meters a complete (non-streaming) worker answer of `status`: its usage (`None` when the worker
/// reported none) is recorded, and on disk (when there is a journal), before this returns. The
/// usage is the `usage` member of `body`, or of `metadata` when the worker answered with one
/// (the JSON header of vLLM's binary embeddings, whose body is not JSON).
pub async fn complete(
    status: http::StatusCode,
    body: &Bytes,
    metadata: Option<&[u8]>,
    mut meter: MeterGuard,
) -> Option<Usage> {
    let json = metadata.unwrap_or(body);
    let usage = json::find_member(json, "usage").and_then(|s| Usage::from_json(&json[s.value]));
    match usage {
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
    usage
}

/// Waits until an event is on disk; a journal that failed to write it has logged why, and the
/// response goes on (its event is still on its way to the ledger).
async fn wait_synced(synced: Synced) {
    if let Some(synced) = synced {
        let _ = synced.await;
    }
}

/// What one read of the worker's stream became.
#[derive(Debug, Default)]
pub struct Relayed {
    /// What an HTTP client receives: whole SSE events, `usage` cut where the client did not ask
    /// for it, the fingerprint where vLLM would have put it, and the gateway's own error event
    /// if the stream failed. Only that error event when the surface renders its own messages
    /// (`EventStream::with_events`).
    pub bytes: Bytes,
    /// For a surface that renders its own messages (`EventStream::with_events`): what the
    /// read's choice events added to the answer, when they added anything.
    pub delta: Option<Delta>,
    /// The worker's own in-stream error event (its JSON payload), when this read had one.
    pub worker_error: Option<Bytes>,
    /// How the stream ended, if it ended here.
    pub end: Option<End>,
}

impl Relayed {
    /// Whether the read brought nothing a surface shows (an event split across reads, say).
    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
            && self.delta.is_none()
            && self.worker_error.is_none()
            && self.end.is_none()
    }
}

/// How a stream ended.
#[derive(Debug)]
pub enum End {
    /// At the worker's `[DONE]` (after its error event, if it sent one), with the request's
    /// usage.
    Done(Usage),
    /// The worker failed mid-stream: the gateway ended the stream with this error.
    Failed(ApiError),
}

/// A live stream from a worker whose first body chunk has already arrived, relayed read by read
/// and metered as it goes; the worker may go at most the idle timeout without sending a byte.
pub struct EventStream {
    relay: Relay,
    /// A read relayed ahead of the surface's first call (`relay_whole_first_read`).
    primed: Option<Relayed>,
}

impl EventStream {
    pub fn new(
        first: Bytes,
        body: upstream::Body,
        mut meter: MeterGuard,
        outstanding: Outstanding,
        request: &InferenceRequest,
        idle_timeout: Duration,
    ) -> Self {
        meter.set_http_status(200);
        let span = crate::child_span!(meter.trace(), "gateway.relay");
        Self {
            relay: Relay {
                _span: span,
                usage: StreamUsage::new(request.n),
                body,
                first: Some(first),
                splitter: SseSplitter::default(),
                choices_at: ChoicesAt::default(),
                client: request.client_usage,
                meter: Some(meter),
                saw_error: false,
                ended: false,
                held: Vec::new(),
                outstanding,
                synced: None,
                idle_timeout,
                delta: None,
            },
            primed: None,
        }
    }

    /// For an SSE client: when the worker's first read is its whole stream (it ends with
    /// `[DONE]`), relays it now, its usage event recorded, so that the response's head, its
    /// events and its end leave in one write (the head would otherwise go out alone while the
    /// event is recorded). A stream that goes on is left for `next`.
    pub async fn relay_whole_first_read(&mut self) {
        let whole = (self.relay.first.as_ref()).is_some_and(|first| first.ends_with(DONE));
        if whole && self.primed.is_none() {
            self.primed = self.relay.next_relayed().await;
        }
    }

    /// Reads each read's choice events into a `Delta` (`Relayed::delta`) instead of the
    /// client's SSE bytes.
    pub fn with_events(mut self: Box<Self>) -> Box<Self> {
        self.relay.delta = Some(Delta::default());
        self
    }

    /// The next read, relayed; `None` once the worker's body has ended (read to its end after
    /// `[DONE]`, so that its connection is reused: a surface keeps calling until `None`).
    pub async fn next(&mut self) -> Option<Relayed> {
        if let Some(primed) = self.primed.take() {
            return Some(primed);
        }
        self.relay.next_relayed().await
    }

    /// Whether the stream has nothing more to relay: the worker's body has ended (or failed),
    /// so the next `next` is `None`.
    pub(super) fn ended(&self) -> bool {
        self.primed.is_none() && self.relay.ended
    }
}

/// What one read's events told, for the end of the read.
#[derive(Default)]
struct Read {
    /// Each choice's last `usage` value in the read (`None`: the usage-only event's).
    latest: Vec<(Option<u64>, Bytes)>,
    done: bool,
    worker_error: Option<Bytes>,
}

struct Relay {
    /// `gateway.relay`, from the first event to the end of the stream (or the client's leaving).
    _span: tracing::Span,
    body: upstream::Body,
    /// A read not relayed yet: the stream's first, or bytes the worker sent behind `[DONE]`.
    first: Option<Bytes>,
    splitter: SseSplitter,
    /// Where the stream's events have their `choices`.
    choices_at: ChoicesAt,
    client: UsageOptions,
    usage: StreamUsage,
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
    /// What the read being processed added to the answer, when the surface asked for it.
    delta: Option<Delta>,
}

impl Relay {
    /// The next read relayed, or `None` at the end.
    async fn next_relayed(&mut self) -> Option<Relayed> {
        if self.ended {
            return None;
        }
        let out = self.next_read().await;
        wait_synced(self.synced.take()).await;
        out
    }

    async fn next_read(&mut self) -> Option<Relayed> {
        if let Some(first) = self.first.take() {
            // A first read that ends the stream had its worker's body end read already (see
            // `pipeline::exchange`); a later one waits for nothing.
            let relayed = self.process(first);
            self.note_body_end(&relayed);
            return Some(relayed);
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
                        let relayed = self.process(data);
                        if matches!(relayed.end, Some(End::Done(_))) {
                            // The worker's body ends right behind `[DONE]`, read by its
                            // connection's task: once that task has run (nothing of this
                            // stream waits in the client's connection to be written), the end
                            // is known and goes out with the read.
                            tokio::task::yield_now().await;
                            self.note_body_end(&relayed);
                        }
                        if !relayed.is_empty() {
                            return Some(relayed);
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

    /// After the read that relayed `[DONE]`: whether the worker's body has ended too, without
    /// waiting for it. If it has, the stream has nothing more to relay and its connection is
    /// back in the pool; if not, the next read waits for the end, so that the connection goes
    /// back to the pool before the client's response ends. Bytes behind `[DONE]` are relayed by
    /// the next read, as any others.
    fn note_body_end(&mut self, relayed: &Relayed) {
        if !matches!(relayed.end, Some(End::Done(_))) {
            return;
        }
        match self.body.frame().now_or_never() {
            // Ended, or broke off after `[DONE]` (the response was whole; nothing to meter).
            Some(None | Some(Err(_))) => self.ended = true,
            Some(Some(Ok(frame))) => self.first = frame.into_data().ok(),
            None => {}
        }
    }

    /// Turns one read of worker bytes into what the client gets, metering every event relayed;
    /// the gateway's own time, for its overhead.
    fn process(&mut self, chunk: Bytes) -> Relayed {
        if let Some(meter) = self.meter.as_mut() {
            meter.resume_overhead();
        }
        let relayed = self.process_read(chunk);
        if let Some(meter) = self.meter.as_mut() {
            meter.pause_overhead();
        }
        relayed
    }

    fn process_read(&mut self, chunk: Bytes) -> Relayed {
        let mut out = BytesMut::new();
        let mut read = Read::default();
        for event in self.splitter.push(chunk) {
            if self.delta.is_some() && self.read_choice_event(&event, &mut read) {
                continue;
            }
            let inspected = inspect_in(&event, self.client, &mut self.choices_at);
            self.meter_event(&event, &inspected, &mut read);
            if self.delta.is_some() {
                self.collect_event(&event, &inspected, &mut read);
            } else {
                self.relay_event(&event, &inspected, &mut out);
            }
        }
        self.observe_usage(read.latest);
        let end = read.done.then(|| self.finish());
        let delta = match &mut self.delta {
            Some(delta) if !delta.is_empty() => Some(std::mem::take(delta)),
            _ => None,
        };
        Relayed {
            bytes: out.freeze(),
            delta,
            worker_error: read.worker_error,
            end,
        }
    }

    /// A surface's common case: a choice event, read once for its content and its usage
    /// together. `false` for any other event, which is inspected as an SSE client's would be.
    fn read_choice_event(&mut self, event: &Bytes, read: &mut Read) -> bool {
        let Some(payload) = frame::payload(event) else {
            return false;
        };
        // The read's first event gives the message its id, model and creation time.
        let first = self.delta.as_ref().is_none_or(|delta| delta.id.is_empty());
        let read_event = if first {
            answer::read
        } else {
            answer::read_choices
        };
        let Some(answer) = read_event(payload) else {
            return false;
        };
        let Some(inspected) = inspect_answer(event, payload, &answer) else {
            return false;
        };
        self.meter_event(event, &inspected, read);
        if let Some(delta) = self.delta.as_mut() {
            delta.add(answer);
        }
        true
    }

    /// Notes what `event` means for the request's usage and outcome.
    fn meter_event(&mut self, event: &Bytes, inspected: &Inspected, read: &mut Read) {
        if let Some(range) = inspected.usage.clone() {
            // Usage is cumulative and a read is relayed whole, so only each choice's last usage
            // in the read needs parsing.
            let usage = event.slice(range);
            match read.latest.iter_mut().find(|(c, _)| *c == inspected.choice) {
                Some(slot) => slot.1 = usage,
                None => read.latest.push((inspected.choice, usage)),
            }
        } else if !inspected.error
            && let (Some(meter), Some(payload)) = (self.meter.as_mut(), frame::payload(event))
        {
            // A worker that reports no usage: the gateway counts what it relays.
            meter.relayed_event(payload);
        }
        self.saw_error |= inspected.error;
        read.done |= inspected.done;
        if let Some(range) = inspected.fingerprint.clone() {
            self.outstanding
                .worker()
                .set_fingerprint(event.slice(range));
        }
    }

    /// For a surface that renders its own messages, what an event that is not a plain choice
    /// event adds: the worker's error, or an answer's content.
    fn collect_event(&mut self, event: &Bytes, inspected: &Inspected, read: &mut Read) {
        let Some(delta) = self.delta.as_mut() else {
            return;
        };
        let usage_only = inspected.usage.is_some() && inspected.choice.is_none();
        if inspected.done || usage_only {
            return;
        }
        if let Some(payload) = frame::payload(event) {
            if inspected.error {
                read.worker_error = Some(event.slice_ref(payload));
            } else if let Some(answer) = answer::read(payload) {
                delta.add(answer);
            }
        }
    }

    /// Appends what the client gets of `event` to `out`: the event less the usage it did not ask
    /// for, terminal chunks held until the stream's fingerprint is known (see `frame`).
    fn relay_event(&mut self, event: &Bytes, inspected: &Inspected, out: &mut BytesMut) {
        let (head, tail): (&[u8], &[u8]) = match &inspected.action {
            FrameAction::Keep => (event, &[]),
            FrameAction::Drop => {
                // The usage-only chunk: whatever waited for its fingerprint goes now.
                self.release_held(out);
                return;
            }
            FrameAction::Strip(cut) => (&event[..cut.start], &event[cut.end..]),
        };
        if inspected.done || inspected.error {
            self.release_held(out);
        }
        if self.held.is_empty() && !inspected.terminal {
            // The common case: relayed straight into the client's bytes.
            out.extend_from_slice(head);
            out.extend_from_slice(tail);
            return;
        }
        let relayed = Bytes::from([head, tail].concat());
        match self.outstanding.worker().fingerprint() {
            Some(fingerprint) if self.held.is_empty() => {
                out.extend_from_slice(&with_fingerprint(&relayed, &fingerprint));
            }
            _ => self.held.push((relayed, inspected.terminal)),
        }
    }

    /// Parses the read's last usage of each choice and hands the request's total to the meter.
    fn observe_usage(&mut self, latest: Vec<(Option<u64>, Bytes)>) {
        let Some(meter) = self.meter.as_mut() else {
            return;
        };
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

    /// The stream reached `[DONE]`: its event is recorded, and on disk, before the client can
    /// see `[DONE]` (a client that leaves right after it still got the whole response). The
    /// worker's body is still read to its end by the next call, so that its connection goes back
    /// to the pool.
    fn finish(&mut self) -> End {
        if let Some(meter) = self.meter.take() {
            self.synced = meter.finish_synced(if self.saw_error {
                Status::Failed
            } else {
                Status::Completed
            });
        }
        End::Done(self.usage.usage())
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

    /// Ends the client's stream with an error event, unless it already ended properly; the
    /// worker's circuit breaker counts the failure (its start counted as an answer).
    fn fail(&mut self, reason: &'static str) -> Option<Relayed> {
        let meter = self.meter.take()?;
        self.outstanding.failed();
        self.synced = meter.finish_synced(Status::Failed);
        let mut out = BytesMut::new();
        self.release_held(&mut out);
        let error = ApiError::Upstream(reason);
        out.extend_from_slice(&error.sse_frame());
        Some(Relayed {
            bytes: out.freeze(),
            delta: None,
            worker_error: None,
            end: Some(End::Failed(error)),
        })
    }
}
