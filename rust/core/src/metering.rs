//! Usage events: one per dispatched request, recorded by an RAII guard on every path.
//!
//! Counts come from the worker's own `usage` (for streams, the cumulative usage on the last chunk
//! relayed to the client). Events wait in an in-memory queue until the control plane drains them
//! into the ledger; this module neither prices nor persists them.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::api::request::Endpoint;
use crate::auth::Principal;
use crate::metrics::GatewayMetrics;
use crate::quota::Reservation;

/// Token counts as a worker reports them in `usage`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Prompt tokens served from the prefix cache (a subset of `prompt_tokens`).
    pub cached_tokens: u64,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default)]
    prompt_tokens_details: Option<WireDetails>,
}

#[derive(Deserialize)]
struct WireDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

impl Usage {
    /// Parses a `usage` member's value; `null` or anything unreadable is `None`.
    pub fn from_json(value: &[u8]) -> Option<Self> {
        let wire: Option<WireUsage> = serde_json::from_slice(value).ok()?;
        wire.map(|w| Self {
            prompt_tokens: w.prompt_tokens,
            completion_tokens: w.completion_tokens,
            cached_tokens: w
                .prompt_tokens_details
                .and_then(|d| d.cached_tokens)
                .unwrap_or(0),
        })
    }
}

/// Sums a stream's cumulative per-choice usage into the request's usage.
///
/// With `continuous_usage_stats`, vLLM puts on each choice chunk the usage of that choice alone
/// (its prompt's tokens and that choice's completion tokens so far); the final usage-only chunk
/// has the request's total. Until that final chunk arrives (a stream cut short), the total is
/// every prompt's tokens once plus every choice's latest completion count.
#[derive(Debug, Clone)]
pub struct StreamUsage {
    n: u64,
    /// Latest (prompt, completion) tokens per choice index.
    choices: Vec<(u64, u64)>,
    cached: u64,
    total: Option<Usage>,
}

impl StreamUsage {
    pub fn new(n: u64) -> Self {
        Self {
            n: n.max(1),
            choices: Vec::new(),
            cached: 0,
            total: None,
        }
    }

    /// Takes one event's usage: `choice` is its choice index, `None` for the usage-only event.
    pub fn observe(&mut self, choice: Option<u64>, usage: Usage) {
        match choice.and_then(|c| usize::try_from(c).ok()) {
            None => self.total = Some(usage),
            Some(index) => {
                if self.choices.len() <= index {
                    self.choices.resize(index + 1, (0, 0));
                }
                self.choices[index] = (usage.prompt_tokens, usage.completion_tokens);
                if self.total.is_none() {
                    self.cached = self.cached.max(usage.cached_tokens);
                }
            }
        }
    }

    pub fn usage(&self) -> Usage {
        if let Some(total) = self.total {
            return total;
        }
        let n = usize::try_from(self.n).unwrap_or(usize::MAX);
        Usage {
            // Every choice of a prompt repeats that prompt's count; take it once per prompt.
            prompt_tokens: self
                .choices
                .chunks(n)
                .map(|c| c.iter().map(|u| u.0).max().unwrap_or(0))
                .sum(),
            completion_tokens: self.choices.iter().map(|u| u.1).sum(),
            cached_tokens: self.cached,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The response reached its end at the client.
    Completed,
    /// The client went away first.
    Cancelled,
    /// The gateway or the worker failed, or the worker refused the request.
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UsageSource {
    /// Counts are the worker's own `usage`.
    Worker,
    /// The worker reported nothing before the request ended; counts are zero.
    None,
}

impl Status {
    /// The name stored in the ledger (the same as the serialised form).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Cancelled => "cancelled",
            Self::Failed => "failed",
        }
    }
}

impl UsageSource {
    /// The name stored in the ledger (the same as the serialised form).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Worker => "worker",
            Self::None => "none",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct UsageEvent {
    pub event_id: String,
    pub request_id: String,
    pub tenant_id: Arc<str>,
    pub key_id: Arc<str>,
    pub model: String,
    pub worker: Option<Arc<str>>,
    pub endpoint: &'static str,
    pub stream: bool,
    pub status: Status,
    pub http_status: u16,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    pub usage_source: UsageSource,
    pub started_at_ms: u64,
    pub finished_at_ms: u64,
}

/// Recorded events waiting to be drained, oldest first, and the counters they feed.
#[derive(Debug, Default)]
pub struct Meter {
    queue: Mutex<VecDeque<UsageEvent>>,
    metrics: GatewayMetrics,
}

impl Meter {
    pub fn record(&self, event: UsageEvent, elapsed: Duration) {
        self.metrics.observe_event(&event, elapsed);
        self.lock().push_back(event);
    }

    pub fn metrics(&self) -> &GatewayMetrics {
        &self.metrics
    }

    pub fn drain(&self, max: usize) -> Vec<UsageEvent> {
        let mut queue = self.lock();
        let n = max.min(queue.len());
        queue.drain(..n).collect()
    }

    pub fn pending(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<UsageEvent>> {
        // A panic while holding this lock cannot leave the queue half-updated (push and drain
        // are single calls), so a poisoned queue is still a valid one.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A UUIDv7 event id: the millisecond timestamp, then 74 bits from a per-thread generator.
///
/// `Uuid::now_v7` asks the OS for randomness on every call (a syscall per request); this seeds a
/// SplitMix64 stream once per thread from std's randomly keyed hasher instead. Ids stay unique
/// across threads and restarts with overwhelming probability, and sort by time.
fn new_event_id(ms: u64) -> Uuid {
    use std::cell::Cell;
    use std::hash::{BuildHasher, Hasher};
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u64(now_ms());
            hasher.finish()
        });
    }
    let next = || {
        STATE.with(|state| {
            let mut z = state.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
            state.set(z);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        })
    };
    let mut random = [0u8; 10];
    random[..8].copy_from_slice(&next().to_le_bytes());
    random[8..].copy_from_slice(&next().to_le_bytes()[..2]);
    uuid::Builder::from_unix_timestamp_millis(ms, &random).into_uuid()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Records exactly one event for its request: explicitly through `finish`, or on drop as
/// `Cancelled` with whatever usage was last observed (a client disconnect drops the response).
/// The request's quota reservation, once attached, is settled with the usage of that event.
#[derive(Debug)]
pub struct MeterGuard {
    meter: Arc<Meter>,
    event: Option<UsageEvent>,
    reservation: Option<Reservation>,
    started: Instant,
}

impl MeterGuard {
    pub fn begin(
        meter: Arc<Meter>,
        principal: &Principal,
        model: &str,
        endpoint: Endpoint,
        stream: bool,
        request_id: Option<&str>,
    ) -> Self {
        let started_at_ms = now_ms();
        let event_id = new_event_id(started_at_ms).to_string();
        let event = UsageEvent {
            request_id: request_id.map_or_else(|| event_id.clone(), str::to_owned),
            event_id,
            tenant_id: principal.tenant_id.clone(),
            key_id: principal.key_id.clone(),
            model: model.to_owned(),
            worker: None,
            endpoint: endpoint.as_str(),
            stream,
            status: Status::Cancelled,
            http_status: 499,
            prompt_tokens: 0,
            cached_tokens: 0,
            completion_tokens: 0,
            usage_source: UsageSource::None,
            started_at_ms,
            finished_at_ms: 0,
        };
        Self {
            meter,
            event: Some(event),
            reservation: None,
            started: Instant::now(),
        }
    }

    /// The gateway-generated id of this request's usage event (unique, unlike `request_id`).
    pub fn event_id(&self) -> &str {
        self.event.as_ref().map_or("", |e| e.event_id.as_str())
    }

    /// Settles `reservation` with this request's usage when the event is recorded.
    pub fn attach(&mut self, reservation: Reservation) {
        self.reservation = Some(reservation);
    }

    /// Records nothing: for a request refused before it was dispatched.
    pub fn discard(mut self) {
        self.event = None;
    }

    /// The request's id: the client's `X-Request-Id`, else the event id.
    pub fn request_id(&self) -> &str {
        self.event.as_ref().map_or("", |e| e.request_id.as_str())
    }

    /// Time since the request was dispatched.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn set_worker(&mut self, worker: Arc<str>) {
        if let Some(event) = &mut self.event {
            event.worker = Some(worker);
        }
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
        }
    }

    pub fn finish(mut self, status: Status) {
        self.record(status);
    }

    fn record(&mut self, status: Status) {
        if let Some(mut event) = self.event.take() {
            event.status = status;
            event.finished_at_ms = now_ms();
            if let Some(reservation) = self.reservation.take() {
                reservation.settle(&Usage {
                    prompt_tokens: event.prompt_tokens,
                    completion_tokens: event.completion_tokens,
                    cached_tokens: event.cached_tokens,
                });
            }
            self.meter.record(event, self.started.elapsed());
        }
    }
}

impl Drop for MeterGuard {
    fn drop(&mut self) {
        self.record(Status::Cancelled);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal() -> Principal {
        Principal {
            tenant_id: "ten_1".into(),
            key_id: "key_1".into(),
        }
    }

    #[test]
    fn usage_parses_worker_shapes() {
        let usage = Usage::from_json(
            br#"{"prompt_tokens":5,"total_tokens":8,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":2}}"#,
        );
        assert_eq!(
            usage,
            Some(Usage {
                prompt_tokens: 5,
                completion_tokens: 3,
                cached_tokens: 2
            })
        );
        assert_eq!(
            Usage::from_json(
                br#"{"prompt_tokens":5,"completion_tokens":0,"prompt_tokens_details":null}"#
            )
            .map(|u| u.cached_tokens),
            Some(0)
        );
        assert_eq!(Usage::from_json(b"null"), None);
    }

    fn u(prompt: u64, completion: u64) -> Usage {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            cached_tokens: 0,
        }
    }

    #[test]
    fn stream_usage_sums_choices_until_the_total_arrives() {
        // Two prompts (5 and 7 tokens) with n = 2: choices 0,1 are prompt 0; 2,3 prompt 1.
        let mut usage = StreamUsage::new(2);
        usage.observe(Some(0), u(5, 1));
        usage.observe(Some(1), u(5, 1));
        usage.observe(Some(0), u(5, 2));
        usage.observe(Some(3), u(7, 4));
        assert_eq!(usage.usage(), u(12, 2 + 1 + 4));
        usage.observe(None, u(12, 9));
        usage.observe(Some(1), u(5, 3));
        assert_eq!(usage.usage(), u(12, 9), "the final total wins");
    }

    #[test]
    fn stream_usage_with_one_choice_is_the_latest() {
        let mut usage = StreamUsage::new(1);
        usage.observe(Some(0), u(3, 0));
        usage.observe(Some(0), u(3, 1));
        assert_eq!(usage.usage(), u(3, 1));
    }

    #[test]
    fn dropped_guard_records_one_cancelled_event_with_last_usage() {
        let meter = Arc::new(Meter::default());
        let mut guard = MeterGuard::begin(
            meter.clone(),
            &principal(),
            "m",
            Endpoint::Completions,
            true,
            None,
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
        let events = meter.drain(10);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].status, Status::Cancelled);
        assert_eq!(events[0].completion_tokens, 2);
        assert_eq!(events[0].usage_source, UsageSource::Worker);
        assert_eq!(meter.pending(), 0);
    }

    #[test]
    fn event_ids_are_unique_v7_uuids() {
        let ids: std::collections::HashSet<Uuid> = (0..10_000).map(|_| new_event_id(42)).collect();
        assert_eq!(ids.len(), 10_000);
        assert!(ids.iter().all(|id| id.get_version_num() == 7));
    }

    #[test]
    fn names_match_the_serialised_form() {
        for status in [Status::Completed, Status::Cancelled, Status::Failed] {
            assert_eq!(
                serde_json::to_value(status).ok(),
                Some(serde_json::Value::from(status.as_str()))
            );
        }
        for source in [UsageSource::Worker, UsageSource::None] {
            assert_eq!(
                serde_json::to_value(source).ok(),
                Some(serde_json::Value::from(source.as_str()))
            );
        }
    }

    #[test]
    fn finished_guard_records_once() {
        let meter = Arc::new(Meter::default());
        let guard = MeterGuard::begin(
            meter.clone(),
            &principal(),
            "m",
            Endpoint::ChatCompletions,
            false,
            Some("req-1"),
        );
        guard.finish(Status::Completed);
        let events = meter.drain(10);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].status, Status::Completed);
        assert_eq!(events[0].request_id, "req-1");
        assert_ne!(events[0].event_id, "req-1");
    }
}
