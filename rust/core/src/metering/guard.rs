//! `MeterGuard`: the one usage event of an admitted request, recorded on every path.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::Span;

use super::counting::{self, Counter, Relayed};
use super::meter::{Meter, Synced};
use super::overhead::{Arrival, Overhead};
use crate::auth::Principal;
use crate::journal::Slot;
use crate::quota::Reservation;
use crate::request::InferenceRequest;
use crate::usage::{EventIds, Status, Usage, UsageEvent, UsageSource, now_ms};

/// What else learns a request's usage once its event is recorded (the scheduler, to correct
/// what it charged the request's tenant).
pub struct SettleHook(Box<dyn FnOnce(&Usage) + Send + Sync>);

impl SettleHook {
    pub fn new(hook: impl FnOnce(&Usage) + Send + Sync + 'static) -> Self {
        Self(Box::new(hook))
    }
}

impl std::fmt::Debug for SettleHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SettleHook")
    }
}

/// Records exactly one event for its request: explicitly through `finish`, or on drop as
/// `Cancelled` with whatever usage was last observed (a client disconnect drops the response).
/// The request's quota reservation, once attached, is settled with the usage of that event.
#[derive(Debug)]
pub struct MeterGuard {
    meter: Arc<Meter>,
    event: Option<UsageEvent>,
    /// The request's start in the journal.
    journal: Option<Slot>,
    reservation: Option<Reservation>,
    /// Told the usage once the event is recorded.
    on_settle: Option<SettleHook>,
    started: Instant,
    /// When the journal last heard of this request's usage (unix ms).
    progress_at_ms: u64,
    /// Counts the request on its worker if the worker reports no usage.
    counter: Option<Counter>,
    /// What reached the client, for `counter`.
    relayed: Relayed,
    /// The gateway's own time on the request (`tokengate_gateway_overhead_seconds`).
    overhead: Overhead,
    /// The request's root span; the event's outcome and counts are recorded on it.
    trace: Span,
}

impl MeterGuard {
    /// Starts metering an admitted request under the ids minted when it arrived.
    pub fn begin(
        meter: Arc<Meter>,
        ids: EventIds,
        principal: &Principal,
        request: &InferenceRequest,
    ) -> Self {
        let event = UsageEvent {
            event_id: ids.event_id,
            request_id: ids.request_id,
            tenant_id: principal.tenant_id.clone(),
            key_id: principal.key_id.clone(),
            model: request.model.as_str().into(),
            worker: None,
            endpoint: request.endpoint,
            stream: request.stream,
            status: Status::Cancelled,
            http_status: 499,
            prompt_tokens: 0,
            cached_tokens: 0,
            completion_tokens: 0,
            usage_source: UsageSource::None,
            started_at_ms: ids.started_at_ms,
            finished_at_ms: 0,
        };
        let journal = meter.journal_start(&event);
        Self {
            meter,
            journal,
            progress_at_ms: event.started_at_ms,
            event: Some(event),
            reservation: None,
            on_settle: None,
            started: Instant::now(),
            counter: None,
            relayed: Relayed::Nothing,
            overhead: Overhead::start(),
            trace: Span::none(),
        }
    }

    /// Takes over the request's time and span from its arrival.
    pub fn arrived(&mut self, arrival: Arrival) {
        self.overhead = arrival.overhead;
        self.trace = arrival.trace;
    }

    /// The request's root span.
    pub fn trace(&self) -> &Span {
        &self.trace
    }

    /// The request waits on its worker: the gateway's time on it stops.
    pub fn pause_overhead(&mut self) {
        self.overhead.pause();
    }

    /// The gateway works on the request again.
    pub fn resume_overhead(&mut self) {
        self.overhead.resume();
    }

    /// Settles `reservation` with this request's usage when the event is recorded.
    pub fn attach(&mut self, reservation: Reservation) {
        self.reservation = Some(reservation);
    }

    /// Tells `hook` this request's usage when the event is recorded, after its reservation.
    pub fn on_settle(&mut self, hook: SettleHook) {
        self.on_settle = Some(hook);
    }

    /// The request's id: the client's `X-Request-Id`, else the event id.
    pub fn request_id(&self) -> &str {
        self.event.as_ref().map_or("", |e| &*e.request_id)
    }

    /// The id of the API key the request came with.
    pub fn key_id(&self) -> &str {
        self.event.as_ref().map_or("", |e| &*e.key_id)
    }

    /// Time since the request was dispatched.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The request goes to `counter`'s worker, which counts it if it reports no usage.
    pub fn set_worker(&mut self, worker: Arc<str>, counter: Counter) {
        if let Some(event) = &mut self.event {
            event.worker = Some(worker);
        }
        self.counter = Some(counter);
    }

    /// One more SSE event of a stream without worker usage reached the client: its `data:`
    /// payload.
    pub fn relayed_event(&mut self, payload: &[u8]) {
        if self.counter.is_none() {
            return;
        }
        if !matches!(self.relayed, Relayed::Stream { .. }) {
            self.relayed = Relayed::Stream {
                texts: Vec::new(),
                deltas: 0,
            };
        }
        if let Relayed::Stream { texts, deltas } = &mut self.relayed {
            *deltas = deltas.saturating_add(counting::collect_text(payload, texts));
        }
    }

    /// The complete response body reached the client.
    pub fn set_relayed_body(&mut self, body: Bytes) {
        self.relayed = Relayed::Body(body);
    }

    pub fn set_http_status(&mut self, status: u16) {
        if let Some(event) = &mut self.event {
            event.http_status = status;
        }
    }

    /// The latest usage relayed to the client; counts are cumulative, so the last one wins.
    pub fn observe(&mut self, usage: Usage) {
        if let Some(event) = &mut self.event {
            event.prompt_tokens = usage.prompt_tokens;
            event.completion_tokens = usage.completion_tokens;
            event.cached_tokens = usage.cached_tokens;
            event.usage_source = UsageSource::Worker;
            if let Some(slot) = &self.journal {
                let now = now_ms();
                let every = self.meter.progress_every_ms;
                if now >= self.progress_at_ms.saturating_add(every) {
                    self.progress_at_ms = now;
                    self.meter.journal_progress(slot, &usage, now);
                }
            }
        }
    }

    pub fn finish(mut self, status: Status) {
        self.record(status, false);
    }

    /// Records the event; what it returns resolves once the event is on disk (`None` without a
    /// journal). The end of the response waits for it.
    pub fn finish_synced(mut self, status: Status) -> Synced {
        self.record(status, true)
    }

    fn record(&mut self, status: Status, wait: bool) -> Synced {
        let mut event = self.event.take()?;
        let journal = self.journal.take();
        event.status = status;
        event.finished_at_ms = now_ms();
        let settle = Settle {
            reservation: self.reservation.take(),
            hook: self.on_settle.take(),
        };
        let elapsed = self.started.elapsed();
        let overhead = self.overhead.total();
        let timing = Timing { elapsed, overhead };
        // Counted only if the client got what it was owed or chose to leave: a failed request
        // is not billed for work the worker did not report.
        let countable = event.usage_source == UsageSource::None
            && matches!(status, Status::Completed | Status::Cancelled);
        if countable
            && let Some(counter) = self.counter.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let relayed = std::mem::take(&mut self.relayed);
            let counting = Counting::begin(self.meter.clone());
            let trace = self.trace.clone();
            let (done, synced) = if wait {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            } else {
                (None, None)
            };
            runtime.spawn(async move {
                if let Some(usage) = counter.count(&relayed).await {
                    event.prompt_tokens = usage.prompt_tokens;
                    event.completion_tokens = usage.completion_tokens;
                    event.usage_source = UsageSource::Gateway;
                }
                let synced = commit(
                    &counting.meter,
                    event,
                    journal,
                    settle,
                    timing,
                    &trace,
                    done.is_some(),
                );
                drop(counting);
                if let Some(done) = done {
                    if let Some(synced) = synced {
                        let _ = synced.await;
                    }
                    let _ = done.send(());
                }
            });
            return synced;
        }
        commit(
            &self.meter,
            event,
            journal,
            settle,
            timing,
            &self.trace,
            wait,
        )
    }
}

/// A request's whole time at the gateway and the gateway's own part of it.
#[derive(Debug, Clone, Copy)]
struct Timing {
    elapsed: Duration,
    overhead: Duration,
}

/// What learns a request's usage when its event is recorded.
struct Settle {
    reservation: Option<Reservation>,
    hook: Option<SettleHook>,
}

/// Settles the request's reservation and hook with its event's usage and records the event,
/// and its outcome on the request's span.
fn commit(
    meter: &Meter,
    event: UsageEvent,
    journal: Option<Slot>,
    settle: Settle,
    timing: Timing,
    trace: &Span,
    wait: bool,
) -> Synced {
    let _metering = crate::child_span!(trace, "gateway.metering");
    crate::telemetry::record_event(trace, &event);
    let usage = Usage {
        prompt_tokens: event.prompt_tokens,
        completion_tokens: event.completion_tokens,
        cached_tokens: event.cached_tokens,
    };
    if let Some(reservation) = settle.reservation {
        reservation.settle(&usage);
    }
    if let Some(SettleHook(hook)) = settle.hook {
        hook(&usage);
    }
    meter.record(event, journal, timing.elapsed, timing.overhead, wait)
}

/// One event being counted, for `Meter::counts_settled`.
struct Counting {
    meter: Arc<Meter>,
}

impl Counting {
    fn begin(meter: Arc<Meter>) -> Self {
        meter.counting.fetch_add(1, Ordering::AcqRel);
        Self { meter }
    }
}

impl Drop for Counting {
    fn drop(&mut self) {
        if self.meter.counting.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.meter.counted.notify_waiters();
        }
    }
}

impl Drop for MeterGuard {
    fn drop(&mut self) {
        self.record(Status::Cancelled, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::Endpoint;

    fn request(stream: bool) -> InferenceRequest {
        let body = if stream {
            r#"{"model":"m","prompt":"p","stream":true}"#
        } else {
            r#"{"model":"m","messages":[]}"#
        };
        let endpoint = if stream {
            Endpoint::Completions
        } else {
            Endpoint::ChatCompletions
        };
        InferenceRequest::from_json(endpoint, bytes::Bytes::from(body), None)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn principal() -> Principal {
        Principal {
            tenant_id: "ten_1".into(),
            key_id: "key_1".into(),
        }
    }

    #[test]
    fn dropped_guard_records_one_cancelled_event_with_last_usage() {
        let meter = Arc::new(Meter::default());
        let mut guard = MeterGuard::begin(
            meter.clone(),
            EventIds::mint(None),
            &principal(),
            &request(true),
        );
        guard.observe(Usage {
            prompt_tokens: 4,
            completion_tokens: 1,
            cached_tokens: 0,
        });
        guard.observe(Usage {
            prompt_tokens: 4,
            completion_tokens: 2,
            cached_tokens: 0,
        });
        drop(guard);
        let events: Vec<UsageEvent> = meter.drain(10).into_iter().map(|e| e.event).collect();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].status, Status::Cancelled);
        assert_eq!(events[0].completion_tokens, 2);
        assert_eq!(events[0].usage_source, UsageSource::Worker);
        assert_eq!(meter.pending(), 0);
    }

    #[test]
    fn finished_guard_records_once() {
        let meter = Arc::new(Meter::default());
        let guard = MeterGuard::begin(
            meter.clone(),
            EventIds::mint(Some("req-1")),
            &principal(),
            &request(false),
        );
        guard.finish(Status::Completed);
        let events: Vec<UsageEvent> = meter.drain(10).into_iter().map(|e| e.event).collect();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].status, Status::Completed);
        assert_eq!(&*events[0].request_id, "req-1");
        assert_ne!(&*events[0].event_id, "req-1");
    }
}
