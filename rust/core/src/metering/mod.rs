//! Usage events: one per dispatched request, recorded by an RAII guard on every path.
//!
//! Counts come from the worker's own `usage` (for streams, the cumulative usage on the last chunk
//! relayed to the client); for a request the worker took but reported no usage for, the gateway
//! counts them itself (`counting`). Events wait in an in-memory queue until the control plane drains them
//! into the ledger; this module neither prices nor persists them.

// Every number here may have come from a client or a worker: no arithmetic on one may wrap.
#![deny(clippy::arithmetic_side_effects)]

mod counting;

pub use counting::{Counter, Relayed, TOKENIZE_TIMEOUT};

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::time::Instant;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use tokio::sync::{Notify, oneshot};

use crate::api::request::Endpoint;
use crate::auth::Principal;
use crate::journal::{Ended, Journal, Progress, Record, Recovered, Started};
use crate::metrics::GatewayMetrics;
use crate::quota::Reservation;

/// Where every count and amount the gateway keeps stops: 2^53, the largest integer below which
/// doubles (Redis' Lua numbers, JSON readers) are exact, and far inside the ledger's BIGINTs. A
/// worker's usage is capped here as it is read; a client's numbers as admission reads them.
pub const COUNT_CAP: u64 = 1 << 53;

/// Token counts as a worker reports them in `usage`, each at most `COUNT_CAP`.
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
    /// Parses a `usage` member's value; `null` or anything unreadable is `None`. Counts past
    /// `COUNT_CAP` (no worker's, but a worker's number is not trusted) are `COUNT_CAP`.
    pub fn from_json(value: &[u8]) -> Option<Self> {
        let wire: Option<WireUsage> = serde_json::from_slice(value).ok()?;
        wire.map(|w| Self {
            prompt_tokens: w.prompt_tokens.min(COUNT_CAP),
            completion_tokens: w.completion_tokens.min(COUNT_CAP),
            cached_tokens: w
                .prompt_tokens_details
                .and_then(|d| d.cached_tokens)
                .unwrap_or(0)
                .min(COUNT_CAP),
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
    /// An index from `counting::MAX_CHOICES` on is not one a worker makes, and is ignored.
    pub fn observe(&mut self, choice: Option<u64>, usage: Usage) {
        match choice.map(|c| usize::try_from(c).unwrap_or(usize::MAX)) {
            None => self.total = Some(usage),
            Some(index) if index >= counting::MAX_CHOICES => {}
            Some(index) => {
                if self.choices.len() <= index {
                    self.choices.resize(index.saturating_add(1), (0, 0));
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
                .fold(0, u64::saturating_add)
                .min(COUNT_CAP),
            completion_tokens: self
                .choices
                .iter()
                .map(|u| u.1)
                .fold(0, u64::saturating_add)
                .min(COUNT_CAP),
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
    /// The process died while the request ran; billed for the usage it had relayed by then, as
    /// far as the journal knew it.
    Interrupted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UsageSource {
    /// Counts are the worker's own `usage`.
    Worker,
    /// The worker reported nothing before the request ended; the gateway counted the prompt
    /// with the worker's tokenizer and the completion from what it relayed (see `counting`).
    Gateway,
    /// Nothing was counted: the request never reached a worker, failed, or could not be
    /// counted; counts are zero.
    None,
}

impl Status {
    /// The name stored in the ledger (the same as the serialised form).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Cancelled => "cancelled",
            Self::Failed => "failed",
            Self::Interrupted => "interrupted",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        [
            Self::Completed,
            Self::Cancelled,
            Self::Failed,
            Self::Interrupted,
        ]
        .into_iter()
        .find(|s| s.as_str() == name)
    }
}

impl UsageSource {
    /// The name stored in the ledger (the same as the serialised form).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Worker => "worker",
            Self::Gateway => "gateway",
            Self::None => "none",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        [Self::Worker, Self::Gateway, Self::None]
            .into_iter()
            .find(|s| s.as_str() == name)
    }
}

impl UsageEvent {
    /// An event as the journal stored it; `None` for names this build does not know.
    pub fn from_journal(ended: Ended) -> Option<Self> {
        let endpoint = [Endpoint::ChatCompletions, Endpoint::Completions]
            .into_iter()
            .map(Endpoint::as_str)
            .find(|e| *e == ended.endpoint)?;
        Some(Self {
            event_id: ended.event_id,
            request_id: ended.request_id,
            tenant_id: ended.tenant_id.into(),
            key_id: ended.key_id.into(),
            model: ended.model,
            worker: ended.worker.map(Arc::from),
            endpoint,
            stream: ended.stream,
            status: Status::parse(&ended.status)?,
            http_status: ended.http_status,
            prompt_tokens: ended.prompt_tokens,
            cached_tokens: ended.cached_tokens,
            completion_tokens: ended.completion_tokens,
            usage_source: UsageSource::parse(&ended.usage_source)?,
            started_at_ms: ended.started_at_ms,
            finished_at_ms: ended.finished_at_ms,
        })
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

/// Events in the order they were recorded, numbered by `seq`: waiting to be drained, and drained
/// but not yet confirmed in the ledger.
#[derive(Debug, Default)]
struct Queue {
    events: VecDeque<(u64, UsageEvent)>,
    next_seq: u64,
    drained: VecDeque<u64>,
}

/// Recorded events waiting to be drained, oldest first, and the counters they feed; with a
/// journal, every event also goes to disk, and a request's start and progress too.
#[derive(Debug, Default)]
pub struct Meter {
    queue: Mutex<Queue>,
    metrics: GatewayMetrics,
    journal: Option<Journal>,
    /// Events being counted by the gateway (see `counting`), not yet recorded.
    counting: AtomicUsize,
    /// How often a running request's usage goes to the journal (ms).
    progress_every_ms: u64,
    counted: Notify,
}

/// Resolves once an event is on disk; `None` without a journal.
pub type Synced = Option<oneshot::Receiver<()>>;

impl Meter {
    /// A meter writing to `journal`, its queue holding first what the journal recovered; a
    /// running request's usage goes to it every `progress`.
    pub fn with_journal(journal: Journal, recovered: Recovered, progress: Duration) -> Self {
        let mut queue = Queue {
            next_seq: recovered.next_seq,
            ..Queue::default()
        };
        for ended in recovered.events {
            let seq = ended.seq;
            match UsageEvent::from_journal(ended) {
                Some(event) => queue.events.push_back((seq, event)),
                None => tracing::error!(seq, "a journal event this build cannot read was skipped"),
            }
        }
        Self {
            queue: Mutex::new(queue),
            journal: Some(journal),
            progress_every_ms: u64::try_from(progress.as_millis()).unwrap_or(u64::MAX),
            ..Self::default()
        }
    }

    pub fn record(&self, event: UsageEvent, elapsed: Duration) {
        self.record_synced(event, elapsed, false);
    }

    /// Records `event`; with `wait`, also returns what resolves once it is on disk.
    fn record_synced(&self, event: UsageEvent, elapsed: Duration, wait: bool) -> Synced {
        self.metrics.observe_event(&event, elapsed);
        let mut queue = self.lock();
        let seq = queue.next_seq;
        queue.next_seq = queue.next_seq.saturating_add(1);
        // Under the queue's lock, so the journal's order is the queue's.
        let synced = self.journal.as_ref().and_then(|journal| {
            let record = Record::End(Ended::of(&event, seq));
            if wait {
                Some(journal.write_synced(record))
            } else {
                journal.write(record);
                None
            }
        });
        queue.events.push_back((seq, event));
        synced
    }

    fn journal_start(&self, event: &UsageEvent) {
        if let Some(journal) = &self.journal {
            journal.write(Record::Start(Started::of(event)));
        }
    }

    fn journal_progress(&self, event_id: &str, usage: &Usage, at_ms: u64) {
        if let Some(journal) = &self.journal {
            journal.write(Record::Progress {
                event_id: event_id.to_owned(),
                progress: Progress::of(usage, at_ms),
            });
        }
    }

    pub fn metrics(&self) -> &GatewayMetrics {
        &self.metrics
    }

    pub fn drain(&self, max: usize) -> Vec<UsageEvent> {
        let mut queue = self.lock();
        let n = max.min(queue.events.len());
        let drained: Vec<(u64, UsageEvent)> = queue.events.drain(..n).collect();
        if self.journal.is_some() {
            queue.drained.extend(drained.iter().map(|(seq, _)| *seq));
        }
        drained.into_iter().map(|(_, event)| event).collect()
    }

    /// The oldest `count` drained events are in the ledger: the journal may forget them.
    pub fn committed(&self, count: usize) {
        let Some(journal) = &self.journal else { return };
        let last = {
            let mut queue = self.lock();
            let n = count.min(queue.drained.len());
            queue.drained.drain(..n).next_back()
        };
        if let Some(seq) = last {
            journal.committed(seq);
        }
    }

    pub fn pending(&self) -> usize {
        self.lock().events.len()
    }

    /// Waits up to `timeout` until no event is being counted; whether none is.
    pub async fn counts_settled(&self, timeout: Duration) -> bool {
        let settled = async {
            loop {
                let notified = self.counted.notified();
                if self.counting.load(Ordering::Acquire) == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, settled).await.is_ok()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
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
    /// When the journal last heard of this request's usage (unix ms).
    progress_at_ms: u64,
    /// Counts the request on its worker if the worker reports no usage.
    counter: Option<Counter>,
    /// What reached the client, for `counter`.
    relayed: Relayed,
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
        meter.journal_start(&event);
        Self {
            meter,
            event: Some(event),
            reservation: None,
            started: Instant::now(),
            progress_at_ms: started_at_ms,
            counter: None,
            relayed: Relayed::Nothing,
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

    /// Records nothing: for a request refused before it was dispatched (a journal that saw it
    /// start is told it will not end).
    pub fn discard(mut self) {
        if let Some(event) = self.event.take()
            && let Some(journal) = &self.meter.journal
        {
            journal.write(Record::Discard {
                event_id: event.event_id,
            });
        }
    }

    /// The request's id: the client's `X-Request-Id`, else the event id.
    pub fn request_id(&self) -> &str {
        self.event.as_ref().map_or("", |e| e.request_id.as_str())
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
            if self.meter.journal.is_some() {
                let now = now_ms();
                let every = self.meter.progress_every_ms;
                if now >= self.progress_at_ms.saturating_add(every) {
                    self.progress_at_ms = now;
                    self.meter.journal_progress(&event.event_id, &usage, now);
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
        event.status = status;
        event.finished_at_ms = now_ms();
        let reservation = self.reservation.take();
        let elapsed = self.started.elapsed();
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
                let synced = commit(&counting.meter, event, reservation, elapsed, done.is_some());
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
        commit(&self.meter, event, reservation, elapsed, wait)
    }
}

/// Settles the request's reservation with its event's usage and records the event.
fn commit(
    meter: &Meter,
    event: UsageEvent,
    reservation: Option<Reservation>,
    elapsed: Duration,
    wait: bool,
) -> Synced {
    if let Some(reservation) = reservation {
        reservation.settle(&Usage {
            prompt_tokens: event.prompt_tokens,
            completion_tokens: event.completion_tokens,
            cached_tokens: event.cached_tokens,
        });
    }
    meter.record_synced(event, elapsed, wait)
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
        let absurd =
            br#"{"prompt_tokens":18446744073709551615,"completion_tokens":9007199254740993}"#;
        assert_eq!(
            Usage::from_json(absurd),
            Some(Usage {
                prompt_tokens: COUNT_CAP,
                completion_tokens: COUNT_CAP,
                cached_tokens: 0
            }),
            "a worker's count is capped where it is read"
        )
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
