//! What the journal's lock guards: the current segment and where its records end, the requests
//! open, the waiters; and the appends, the tick's writing and the rotation done under it, by
//! whichever thread holds it (a request's, or the syncer).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::oneshot;

use super::frame::Names;
use super::record::{Line, Progress, Started};
use super::segments::{Segment, prepare};
use crate::thread_class;
use crate::usage::UsageEvent;

/// A request started and not yet ended.
#[derive(Debug)]
pub(super) struct Open {
    pub(super) started: Started,
    pub(super) progress: Option<Progress>,
    /// Its start is in the journal.
    pub(super) written: bool,
    /// `progress` is newer than what the journal holds.
    pub(super) progress_unwritten: bool,
}

impl Open {
    fn of(event: &UsageEvent) -> Self {
        Self {
            started: Started::of(event),
            progress: None,
            written: false,
            progress_unwritten: false,
        }
    }
}

/// A started request's place among the open ones: `Journal::start` hands it out, `Journal::end`
/// takes it back (so a request ends once), and its slot serves the next request to start.
#[derive(Debug)]
pub struct Slot(usize);

/// The requests started and not yet ended, each in a slot: no key to hash or copy on a request's
/// path, and a tick visits them in one pass. A start shares its event's strings (`Arc`s): what
/// a slot takes is a reference to each, and no allocation once the slots have served as many
/// requests at once as the gateway runs.
#[derive(Debug, Default)]
pub(super) struct OpenRequests {
    slots: Vec<Option<Open>>,
    vacant: Vec<usize>,
}

impl OpenRequests {
    pub(super) fn insert(&mut self, event: &UsageEvent) -> Slot {
        if let Some(i) = self.vacant.pop()
            && let Some(slot) = self.slots.get_mut(i)
        {
            *slot = Some(Open::of(event));
            return Slot(i);
        }
        self.slots.push(Some(Open::of(event)));
        Slot(self.slots.len() - 1)
    }

    pub(super) fn get_mut(&mut self, slot: &Slot) -> Option<&mut Open> {
        self.slots.get_mut(slot.0)?.as_mut()
    }

    pub(super) fn remove(&mut self, slot: Slot) {
        if let Some(open) = self.slots.get_mut(slot.0)
            && open.take().is_some()
        {
            self.vacant.push(slot.0);
        }
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Open> {
        self.slots.iter().flatten()
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = &mut Open> {
        self.slots.iter_mut().flatten()
    }
}

/// What a sync is to make durable (`State::take_unsynced`).
#[derive(Debug)]
pub(super) struct Unsynced {
    pub(super) files: Vec<Arc<File>>,
    /// When the oldest record among them was written: `None` when there is none.
    pub(super) since: Option<Instant>,
    /// Bytes the current segment took since the last sync took it.
    pub(super) grown: u64,
}

/// How the syncer sleeps, which says whether a writer must wake it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sleep {
    /// Awake: it looks at the state before it sleeps again.
    #[default]
    Awake,
    /// Until the tick is due; a waiter or `close` wakes it earlier.
    Ticking,
    /// Until anything at all is written or started.
    Idle,
}

/// Everything behind the journal's lock.
#[derive(Debug)]
pub(super) struct State {
    pub(super) dir: PathBuf,
    pub(super) segment_bytes: u64,
    pub(super) interval: Duration,
    pub(super) index: u64,
    pub(super) segment: Segment,
    /// When the oldest record written since the last sync was written (in the current segment
    /// or a sealed one): `None` when everything written is synced.
    pub(super) unsynced_since: Option<Instant>,
    /// Sealed segments whose last records may be unsynced.
    pub(super) sealed_unsynced: Vec<Arc<File>>,
    /// The next segment, being prepared in the background.
    pub(super) next: Option<JoinHandle<io::Result<Segment>>>,
    /// The highest `seq` written so far.
    pub(super) max_seq: Option<u64>,
    /// Sealed segments and the highest `seq` written when each was sealed.
    pub(super) sealed: Vec<(u64, Option<u64>)>,
    pub(super) open: OpenRequests,
    /// The names the segment's frames have defined (`frame::Names`).
    pub(super) names: Names,
    pub(super) buffer: Vec<u8>,
    /// Told once every record written before them is synced.
    pub(super) waiters: Vec<oneshot::Sender<()>>,
    /// When the syncer's next tick is due: set by the first record or start after a tick.
    pub(super) due: Option<Instant>,
    /// The ledger caught up: look for sealed segments to delete.
    pub(super) checkpoint: bool,
    pub(super) closed: bool,
    pub(super) sleep: Sleep,
}

#[derive(Debug)]
pub(super) struct Shared {
    pub(super) state: Mutex<State>,
    pub(super) wake: Condvar,
    /// One more than the highest `seq` the ledger holds (0: none). Relaxed: read only to decide
    /// what to delete, and a stale value only delays a deletion.
    pub(super) committed: AtomicU64,
    /// Where each sync's duration, and the age of the oldest record it made durable, go once
    /// someone asks (`observe_syncs`).
    pub(super) sync_metrics: OnceLock<SyncMetrics>,
    /// The syncer's thread id, for the tests to read its scheduling class.
    #[cfg(test)]
    pub(super) syncer_tid: OnceLock<i32>,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // Every change to the state completes before its lock is released, or fails as a whole
        // (an I/O error leaves the offsets as they were): a poisoned state is still a valid one.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The histograms the syncer reports to.
#[derive(Debug)]
pub(super) struct SyncMetrics {
    /// Each sync's duration.
    pub(super) seconds: Histogram,
    /// The age of the oldest record each sync made durable, when it ended.
    pub(super) unsynced_age: Histogram,
}

/// Prepares segment `index` on a thread of the batch class (`thread_class`): background work
/// with seconds to spare (a segment lasts that long at a core's saturation), whose wake-ups
/// should not preempt a response.
pub(super) fn prepare_next(dir: &Path, index: u64, bytes: u64) -> JoinHandle<io::Result<Segment>> {
    let dir = dir.to_owned();
    std::thread::spawn(move || {
        let _ = thread_class::enter_batch();
        prepare(&dir, index, bytes)
    })
}

impl State {
    /// Something waits for the next tick: make it due `interval` from now unless it already is,
    /// and wake the syncer if it sleeps with no tick in view.
    pub(super) fn ticks_soon(&mut self, shared: &Shared) {
        if self.due.is_none() {
            self.due = Some(Instant::now() + self.interval);
        }
        if self.sleep == Sleep::Idle {
            self.sleep = Sleep::Awake;
            shared.wake.notify_one();
        }
    }

    /// Writes the start of every open request not yet written, and the progress each made since
    /// the last tick.
    pub(super) fn write_open(&mut self) {
        let unwritten = |out: &mut Vec<u8>, names: &mut Names, open: &OpenRequests| {
            for open in open.iter() {
                if !open.written {
                    Line::Start(&open.started).encode(out, names);
                }
                if open.progress_unwritten
                    && let Some(progress) = &open.progress
                {
                    let event_id = &open.started.event_id;
                    Line::Progress { event_id, progress }.encode(out, names);
                }
            }
        };
        match self.append(unwritten) {
            Ok(()) => {
                for open in self.open.iter_mut() {
                    open.written = true;
                    open.progress_unwritten = false;
                }
            }
            Err(error) => tracing::error!(%error, "usage journal write failed"),
        }
    }

    /// Writes the frames `encode` makes (given the segment's names and the open requests) after
    /// what the segment holds. If they do not fit, the segment is sealed first and they are made
    /// again, for the next one and its names (and written past its end if they do not fit in it
    /// either). On an error the segment and its names are as they were.
    pub(super) fn append(
        &mut self,
        encode: impl Fn(&mut Vec<u8>, &mut Names, &OpenRequests),
    ) -> io::Result<()> {
        let mut frames = std::mem::take(&mut self.buffer);
        let result = self.append_with(&mut frames, &encode);
        self.buffer = frames;
        result
    }

    fn append_with(
        &mut self,
        frames: &mut Vec<u8>,
        encode: &impl Fn(&mut Vec<u8>, &mut Names, &OpenRequests),
    ) -> io::Result<()> {
        let mut named = self.names.len();
        frames.clear();
        encode(frames, &mut self.names, &self.open);
        if frames.is_empty() {
            return Ok(());
        }
        let len = u64::try_from(frames.len()).unwrap_or(u64::MAX);
        if !self.segment.is_empty()
            && self.segment.written().saturating_add(len) > self.segment_bytes
        {
            self.names.truncate(named);
            self.rotate()?;
            named = self.names.len();
            frames.clear();
            encode(frames, &mut self.names, &self.open);
        }
        if let Err(error) = self.segment.append_frames(frames) {
            self.names.truncate(named);
            return Err(error);
        }
        self.unsynced_since.get_or_insert_with(Instant::now);
        Ok(())
    }

    /// Seals the segment and continues in the next, which begins with the start (and last
    /// progress) of every open request whose start was written, and its own names. The sealed
    /// segment's last records are synced by the syncer's next round.
    fn rotate(&mut self) -> io::Result<()> {
        let index = self.index + 1;
        let mut segment = match self.next.take().map(JoinHandle::join) {
            Some(Ok(Ok(segment))) => segment,
            Some(Ok(Err(error))) => return Err(error),
            Some(Err(_)) | None => prepare(&self.dir, index, self.segment_bytes)?,
        };
        let mut names = Names::default();
        let mut carried = Vec::new();
        for open in self.open.iter().filter(|open| open.written) {
            Line::Start(&open.started).encode(&mut carried, &mut names);
            if let Some(progress) = &open.progress {
                let event_id = &open.started.event_id;
                Line::Progress { event_id, progress }.encode(&mut carried, &mut names);
            }
        }
        segment.append_frames(&mut carried)?;
        let sealed = std::mem::replace(&mut self.segment, segment);
        self.names = names;
        if self.unsynced_since.is_some() {
            self.sealed_unsynced.push(sealed.file().clone());
        }
        self.sealed.push((self.index, self.max_seq));
        self.index = index;
        self.unsynced_since.get_or_insert_with(Instant::now);
        self.next = Some(prepare_next(&self.dir, index + 1, self.segment_bytes));
        Ok(())
    }

    /// What to sync for everything written so far to be durable: the files, when the oldest
    /// record among them was written, and how many bytes the current segment took since it was
    /// last taken (what to map ahead once they are synced: `map_ahead`). The segment's pages no
    /// append touches again are unmapped first (`Segment::release_written`: a sealed segment is
    /// unmapped whole).
    pub(super) fn take_unsynced(&mut self) -> Unsynced {
        let mut files = std::mem::take(&mut self.sealed_unsynced);
        let since = self.unsynced_since.take();
        let mut grown = 0;
        if since.is_some() {
            grown = self.segment.written_since_taken();
            if let Err(error) = self.segment.release_written() {
                tracing::debug!(%error, "could not unmap the journal's written pages");
            }
            files.push(self.segment.file().clone());
        }
        Unsynced {
            files,
            since,
            grown,
        }
    }

    /// After a sync: maps for writing the pages the next `bytes` of records will go to
    /// (`Segment::map_ahead`), so that the requests' threads write them without a fault.
    pub(super) fn map_ahead(&self, bytes: u64) {
        if let Err(error) = self.segment.map_ahead(bytes) {
            tracing::debug!(%error, "could not map the journal's next pages for writing");
        }
    }

    /// The sealed segments the ledger has caught up with, no longer listed as sealed: their
    /// indexes and highest `seq`s.
    pub(super) fn take_committed(&mut self, committed: u64) -> Vec<(u64, Option<u64>)> {
        let mut done = Vec::new();
        self.sealed.retain(|&(index, max_seq)| {
            if max_seq.is_some_and(|seq| seq >= committed) {
                return true;
            }
            done.push((index, max_seq));
            false
        });
        done
    }

    /// The next segment's preparation, to wait for before the process ends.
    pub(super) fn take_next(&mut self) -> Option<JoinHandle<io::Result<Segment>>> {
        self.next.take()
    }
}
