//! The meter: recorded events in the order they were recorded, numbered by `seq`, waiting to be
//! drained, and the counters they feed; with a journal, every event goes to disk too.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};

use crate::journal::{Ended, Journal, Progress, Recovered, Slot};
use crate::metrics::GatewayMetrics;
use crate::usage::{Usage, UsageEvent};

use super::Refusals;
use super::queue::EventQueue;

/// Events waiting to be drained, oldest first, and the next `seq`.
#[derive(Debug, Default)]
struct Queue {
    events: EventQueue,
    next_seq: u64,
}

#[derive(Debug, Default)]
pub struct Meter {
    queue: Mutex<Queue>,
    metrics: GatewayMetrics,
    refusals: Refusals,
    journal: Option<Journal>,
    /// Events being counted by the gateway (see `counting`), not yet recorded.
    pub(super) counting: AtomicUsize,
    /// How often a running request's usage goes to the journal (ms).
    pub(super) progress_every_ms: u64,
    pub(super) counted: Notify,
}

/// Resolves once an event is durable; `None` when nothing is to wait for (no journal, or one
/// that syncs on an interval).
pub type Synced = Option<oneshot::Receiver<()>>;

impl Meter {
    /// A meter writing to `journal`, its queue holding first what the journal recovered; a
    /// running request's usage goes to it every `progress`.
    pub fn with_journal(journal: Journal, recovered: Recovered, progress: Duration) -> Self {
        let queue = Queue {
            next_seq: recovered.next_seq,
            events: recovered.events.into(),
        };
        let metrics = GatewayMetrics::default();
        let (seconds, unsynced_age) = metrics.journal_syncs();
        journal.observe_syncs(seconds, unsynced_age);
        Self {
            queue: Mutex::new(queue),
            metrics,
            journal: Some(journal),
            progress_every_ms: u64::try_from(progress.as_millis()).unwrap_or(u64::MAX),
            ..Self::default()
        }
    }

    /// Records `event`; with `wait`, also returns what resolves once it is on disk.
    pub(super) fn record(
        &self,
        event: UsageEvent,
        slot: Option<Slot>,
        elapsed: Duration,
        overhead: Duration,
        wait: bool,
    ) -> Synced {
        self.metrics.observe_event(&event, elapsed, overhead);
        let mut queue = self.lock();
        let seq = queue.next_seq;
        queue.next_seq = queue.next_seq.saturating_add(1);
        let ended = Ended { seq, event };
        // Under the queue's lock, so the journal's order is the queue's.
        let synced = self
            .journal
            .as_ref()
            .and_then(|journal| journal.end(&ended, slot, wait));
        queue.events.push(ended);
        synced
    }

    /// Where the journal keeps the request's start, if there is a journal.
    pub(super) fn journal_start(&self, event: &UsageEvent) -> Option<Slot> {
        self.journal.as_ref()?.start(event)
    }

    pub(super) fn journal_progress(&self, slot: &Slot, usage: &Usage, at_ms: u64) {
        if let Some(journal) = &self.journal {
            journal.progress(slot, Progress::of(usage, at_ms));
        }
    }

    pub fn metrics(&self) -> &GatewayMetrics {
        &self.metrics
    }

    /// Requests refused to a known principal, by tenant, key and reason.
    pub fn refusals(&self) -> &Refusals {
        &self.refusals
    }

    /// Takes up to `max` events, oldest first, each with its `seq`.
    pub fn drain(&self, max: usize) -> Vec<Ended> {
        let mut taken = self.lock().events.take(max);
        // Copied out of the chunks with the lock released: a request's end waits for no drain.
        let events = taken.events();
        self.lock().events.recycle(taken);
        events
    }

    /// Every drained event up to `seq` is in the ledger: the journal may forget them. Events are
    /// drained in `seq` order, so the control plane acknowledges a batch by its last `seq`.
    pub fn committed(&self, seq: u64) {
        if let Some(journal) = &self.journal {
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
