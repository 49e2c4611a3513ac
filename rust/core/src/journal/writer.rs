//! The usage journal: an append-only directory of segments that every usage event reaches before
//! the client sees the end of its response.
//!
//! A request's end is written by the thread that records it, while its response is still open:
//! copied into the segment's mapping (`segments::Segment`), so into the page cache, with no system
//! call. From then on a killed process cannot lose it. A request's start and progress are kept in
//! memory and written at the syncer's next tick, for the requests still open then: a request that
//! ends within a tick costs one record, its end (`frame` says how a record is written). When a
//! written record is safe from a machine that stops is the `Durability`:
//! - `Interval`: the syncer (`syncer`) `fdatasync`s what was written at most one tick after it
//!   was, and no request waits for it, as Redis's `appendfsync everysec` and PostgreSQL's
//!   `synchronous_commit = off` trade a window for latency;
//! - `Always`: an end's caller gets a receiver that resolves once its record is synced; the
//!   syncer syncs as soon as anyone waits, so the ends written during one sync share the next (a
//!   group commit).
//!
//! Segments are prepared ahead of use (a spare used again, or a new file of zeros; its head
//! synced, named, mapped), the next one in the background. A segment is sealed once the next
//! records do not fit; the next one begins with the start (and last progress) of every open
//! request whose start was written, so each segment holds what recovery needs of the requests
//! that were open when it began. A sealed segment is retired once the ledger holds every event it
//! recorded (`committed`): kept as one of the spares the next segments are made of, as
//! PostgreSQL recycles its WAL segments, or deleted. On open, the segments left by the previous
//! process are read: their ended events are recorded again (the ledger ignores an event id it
//! has), requests that had started and not ended become `interrupted` events billed for their
//! last progress, all of it goes into a new segment, synced, and the old segments and spares are
//! deleted.
//!
//! A lock file keeps a second process out of a journal in use.

use std::fs::{self, File};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::oneshot;

use super::frame::Names;
use super::record::{Ended, Line, Progress};
use super::segments::{prepare, remove_unadopted, replay, segments};
use super::state::{OpenRequests, Shared, Sleep, Slot, State, SyncMetrics, prepare_next};
use crate::config::{Durability, JournalConfig};
use crate::usage::UsageEvent;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Size past which a segment is sealed (at least 4 KiB).
    pub segment_bytes: u64,
    pub durability: Durability,
    /// The syncer's tick: how long a written record may stay unsynced, and a request's start and
    /// progress unwritten.
    pub interval: Duration,
}

#[derive(Debug)]
pub struct Journal {
    shared: Arc<Shared>,
    durability: Durability,
    syncer: Mutex<Option<JoinHandle<()>>>,
    _lock: File,
}

impl Options {
    pub fn of(config: &JournalConfig) -> Self {
        Self {
            segment_bytes: config.segment_bytes,
            durability: config.sync,
            interval: Duration::from_millis(config.sync_interval_ms),
        }
    }
}

/// What the previous process left: events to record again, the next free `seq`.
#[derive(Debug, Default)]
pub struct Recovered {
    pub events: Vec<Ended>,
    pub next_seq: u64,
}

impl Journal {
    /// Opens the journal in `dir` (created if missing), recovers what the previous process left
    /// (see the module's documentation) and starts the syncer.
    pub fn open(dir: &Path, options: Options) -> io::Result<(Self, Recovered)> {
        fs::create_dir_all(dir)?;
        let lock = File::create(dir.join("LOCK"))?;
        lock.try_lock().map_err(|_| {
            io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("the journal {} is in use by another process", dir.display()),
            )
        })?;
        remove_unadopted(dir)?;
        let old = segments(dir)?;
        let (mut events, open) = replay(&old)?;
        let mut next_seq = events.iter().map(|e| e.seq + 1).max().unwrap_or(0);
        for (started, progress) in open {
            events.push(started.interrupted(progress, next_seq));
            next_seq += 1;
        }
        let index = old.last().map_or(0, |(i, _)| i + 1);
        let segment_bytes = options.segment_bytes.max(4096);
        let mut segment = prepare(dir, index, segment_bytes)?;
        let (mut buffer, mut names) = (Vec::new(), Names::default());
        for event in &events {
            Line::End(event).encode(&mut buffer, &mut names);
        }
        segment.append_frames(&mut buffer)?;
        segment.file().sync_data()?;
        for (_, path) in &old {
            fs::remove_file(path)?;
        }
        if !old.is_empty() {
            tracing::info!(
                recovered = events.len(),
                "usage journal recovered what the previous process left"
            );
        }
        let state = State {
            dir: dir.to_owned(),
            segment_bytes,
            interval: options.interval.max(Duration::from_millis(1)),
            index,
            segment,
            unsynced_since: None,
            sealed_unsynced: Vec::new(),
            next: Some(prepare_next(dir, index + 1, segment_bytes)),
            max_seq: next_seq.checked_sub(1),
            sealed: Vec::new(),
            open: OpenRequests::default(),
            names,
            buffer,
            waiters: Vec::new(),
            due: None,
            checkpoint: false,
            closed: false,
            sleep: Sleep::Awake,
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            wake: Condvar::new(),
            committed: AtomicU64::new(0),
            sync_metrics: OnceLock::new(),
            #[cfg(test)]
            syncer_tid: OnceLock::new(),
        });
        let syncer = std::thread::Builder::new()
            .name("usage-journal".to_owned())
            .spawn({
                let shared = shared.clone();
                let durability = options.durability;
                move || super::syncer::run(&shared, durability)
            })?;
        let journal = Self {
            shared,
            durability: options.durability,
            syncer: Mutex::new(Some(syncer)),
            _lock: lock,
        };
        Ok((journal, Recovered { events, next_seq }))
    }

    /// The syncer's thread id, once it runs.
    #[cfg(test)]
    pub(super) fn syncer_tid(&self) -> Option<i32> {
        self.shared.syncer_tid.get().copied()
    }

    /// Reports, from now on, how long each sync takes to `seconds`, and the age of the oldest
    /// record each sync made durable, when it ended, to `unsynced_age` (the first call only).
    pub fn observe_syncs(&self, seconds: Histogram, unsynced_age: Histogram) {
        let _ = self.shared.sync_metrics.set(SyncMetrics {
            seconds,
            unsynced_age,
        });
    }

    /// A request started: its start goes to the journal at the next tick if it is still open.
    /// `None` once the journal is closed.
    pub fn start(&self, event: &UsageEvent) -> Option<Slot> {
        let mut state = self.shared.lock();
        if state.closed {
            return None;
        }
        let slot = state.open.insert(event);
        state.ticks_soon(&self.shared);
        Some(slot)
    }

    /// A running request's usage so far: it goes to the journal at the next tick.
    pub fn progress(&self, slot: &Slot, progress: Progress) {
        let mut state = self.shared.lock();
        if let Some(open) = state.open.get_mut(slot) {
            open.progress = Some(progress);
            open.progress_unwritten = true;
            state.ticks_soon(&self.shared);
        }
    }

    /// Writes a request's end before returning, and forgets its start (`slot`). With `wait` and
    /// `Durability::Always`, the receiver resolves once it is synced (or fails if it could not be
    /// written or synced).
    pub fn end(
        &self,
        ended: &Ended,
        slot: Option<Slot>,
        wait: bool,
    ) -> Option<oneshot::Receiver<()>> {
        let mut state = self.shared.lock();
        if state.closed {
            tracing::error!("usage journal has stopped; an event was not written");
            return None;
        }
        if let Some(slot) = slot {
            state.open.remove(slot);
        }
        let result = state.append(|out, names, _| Line::End(ended).encode(out, names));
        if let Err(error) = result {
            // The event stays in memory, on its way to the ledger.
            tracing::error!(%error, "usage journal write failed");
            return wait.then(|| oneshot::channel().1);
        }
        state.max_seq = Some(state.max_seq.map_or(ended.seq, |m| m.max(ended.seq)));
        state.ticks_soon(&self.shared);
        if !wait || self.durability == Durability::Interval {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        state.waiters.push(tx);
        if state.sleep != Sleep::Awake {
            state.sleep = Sleep::Awake;
            self.shared.wake.notify_one();
        }
        Some(rx)
    }

    /// The ledger now holds every event up to `seq`: segments recording nothing later can go.
    pub fn committed(&self, seq: u64) {
        self.shared
            .committed
            .fetch_max(seq.saturating_add(1), Ordering::Relaxed);
        let mut state = self.shared.lock();
        state.checkpoint = true;
        if state.sleep == Sleep::Idle {
            state.sleep = Sleep::Awake;
            self.shared.wake.notify_one();
        }
    }

    /// Stops the syncer after it has written every open request's start and progress and
    /// synced everything.
    pub fn close(&self) {
        {
            let mut state = self.shared.lock();
            state.closed = true;
            state.sleep = Sleep::Awake;
            self.shared.wake.notify_one();
        }
        let syncer = self
            .syncer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(syncer) = syncer {
            let _ = syncer.join();
        }
    }
}

#[cfg(test)]
impl Journal {
    /// Does a tick's writing now.
    pub(super) fn tick_now(&self) {
        self.shared.lock().write_open();
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.close();
    }
}
