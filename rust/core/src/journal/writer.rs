//! The usage journal: an append-only directory of segments that every usage event reaches, on
//! disk and synced, before the client sees the end of its response.
//!
//! One thread writes. It takes every record queued while its previous sync ran, writes them in
//! one `write` (from then on a killed process cannot lose them, only a machine that stops), syncs
//! once (`fdatasync`), then tells the waiting requests: a group commit, so a sync is shared by all
//! the requests that end meanwhile. Records nobody waits for (starts, progress, the ends of
//! responses whose client left) wake nobody: they ride along with the next sync, or are written
//! and synced at most 5 ms after they were queued. Queueing is a push under a mutex; the writer
//! is woken only when it sleeps and has been given a reason (a waiter, or a first record).
//!
//! Segments are zero-filled to `segment_bytes` before use (the next one in the background), so a
//! sync flushes data alone. A segment is sealed once the next records do not fit; the next one
//! begins with the start (and last progress) of every request still open, so each segment holds
//! what recovery needs of the requests that were open when it began. A sealed segment is deleted once the ledger holds every
//! event it recorded (`committed`). On open, the segments left by the previous process are read:
//! their ended events are recorded again (the ledger ignores an event id it has), requests that
//! had started and not ended become `interrupted` events billed for their last progress, all of it
//! goes into a new segment, synced, and the old segments are deleted.
//!
//! A lock file keeps a second process out of a journal in use.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::record::{Ended, Progress, Record, Started};

/// How long the writer may wait for more requests to share a sync, under load.
const COMMIT_DELAY: Duration = Duration::from_micros(1000);

/// How long a record nobody waits for may stay unwritten.
const LINGER: Duration = Duration::from_millis(5);

/// What the request threads hand the writer.
#[derive(Default)]
struct Queue {
    records: Vec<Record>,
    /// Told once every record queued before them is synced.
    waiters: Vec<oneshot::Sender<()>>,
    /// When the oldest of `records` was queued.
    oldest: Option<Instant>,
    /// The ledger caught up: look for sealed segments to delete.
    checkpoint: bool,
    closed: bool,
    /// How the writer sleeps, which says whether a new record must wake it.
    sleep: Sleep,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Sleep {
    /// Awake: it looks at the queue before it sleeps again.
    #[default]
    Awake,
    /// Until records are `LINGER` old; only a waiter or `close` wakes it earlier.
    Lingering,
    /// Until anything at all is queued.
    Idle,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // Every change to the queue is a push or a flag: a poisoned queue is still a valid one.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Debug)]
pub struct Journal {
    shared: Arc<Shared>,
    /// The highest `seq` the ledger is known to hold. Relaxed: the writer reads it only to decide
    /// what to delete, and a stale value only delays a deletion.
    committed: Arc<AtomicU64>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Shared")
    }
}

/// What the previous process left: events to record again, the next free `seq`.
#[derive(Debug, Default)]
pub struct Recovered {
    pub events: Vec<Ended>,
    pub next_seq: u64,
}

/// A request started and not yet ended, with its last progress.
type OpenRequest = (Started, Option<Progress>);

fn segment_path(dir: &Path, index: u64) -> PathBuf {
    dir.join(format!("journal-{index:010}.jsonl"))
}

/// The segments in `dir`, oldest first.
fn segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let index = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("journal-"))
            .and_then(|n| n.strip_suffix(".jsonl"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(index) = index {
            found.push((index, path));
        }
    }
    found.sort();
    Ok(found)
}

/// Reads the segments in order: every ended event, and the requests still open at the end.
fn replay(paths: &[(u64, PathBuf)]) -> io::Result<(Vec<Ended>, Vec<OpenRequest>)> {
    let mut ended: Vec<Ended> = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut open: HashMap<String, OpenRequest> = HashMap::new();
    let mut order: Vec<String> = Vec::new();
    for (_, path) in paths {
        let bytes = fs::read(path)?;
        // A segment is zero-filled ahead of its records: its data ends at the first zero byte.
        let bytes = &bytes[..memchr::memchr(0, &bytes).unwrap_or(bytes.len())];
        for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            match Record::decode(line) {
                Some(Record::Start(started)) => {
                    if !seen.contains_key(&started.event_id)
                        && !open.contains_key(&started.event_id)
                    {
                        order.push(started.event_id.clone());
                        open.insert(started.event_id.clone(), (started, None));
                    }
                }
                Some(Record::Progress { event_id, progress }) => {
                    if let Some(entry) = open.get_mut(&event_id) {
                        entry.1 = Some(progress);
                    }
                }
                Some(Record::Discard { event_id }) => {
                    open.remove(&event_id);
                }
                Some(Record::End(end)) => {
                    open.remove(&end.event.event_id);
                    if !seen.contains_key(&end.event.event_id) {
                        seen.insert(end.event.event_id.clone(), ended.len());
                        ended.push(end);
                    }
                }
                None => {
                    tracing::warn!(path = %path.display(), "skipped an incomplete journal line")
                }
            }
        }
    }
    let still_open = order
        .into_iter()
        .filter_map(|id| open.remove(&id))
        .collect();
    Ok((ended, still_open))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A segment file zero-filled to `bytes` and synced, under a name recovery ignores until `adopt`
/// gives it its own: records then overwrite blocks the file already has, so a sync flushes data
/// alone, where a write that grew the file would make every sync commit the file system's own
/// journal as well.
fn preallocated(dir: &Path, index: u64, bytes: u64) -> io::Result<File> {
    let temp = prepared_path(dir, index);
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&temp)?;
    let zeros = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left.min(1 << 20)).unwrap_or(1 << 20);
        file.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    file.sync_all()?;
    Ok(file)
}

fn prepared_path(dir: &Path, index: u64) -> PathBuf {
    dir.join(format!("journal-{index:010}.prep"))
}

/// Makes a prepared segment the segment `index`.
fn adopt(dir: &Path, index: u64) -> io::Result<()> {
    fs::rename(prepared_path(dir, index), segment_path(dir, index))?;
    sync_dir(dir)
}

impl Journal {
    /// Opens the journal in `dir` (created if missing), recovers what the previous process left
    /// (see the module's documentation) and starts the writer.
    pub fn open(dir: &Path, segment_bytes: u64) -> io::Result<(Self, Recovered)> {
        fs::create_dir_all(dir)?;
        let lock = File::create(dir.join("LOCK"))?;
        lock.try_lock().map_err(|_| {
            io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("the journal {} is in use by another process", dir.display()),
            )
        })?;
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "prep") {
                fs::remove_file(path)?;
            }
        }
        let old = segments(dir)?;
        let (mut events, open) = replay(&old)?;
        let mut next_seq = events.iter().map(|e| e.seq + 1).max().unwrap_or(0);
        for (started, progress) in open {
            events.push(started.interrupted(progress, next_seq));
            next_seq += 1;
        }
        let index = old.last().map_or(0, |(i, _)| i + 1);
        let segment_bytes = segment_bytes.max(4096);
        let file = preallocated(dir, index, segment_bytes)?;
        adopt(dir, index)?;
        let mut buffer = Vec::new();
        for event in &events {
            Record::End(event.clone()).encode(&mut buffer);
        }
        file.write_all_at(&buffer, 0)?;
        file.sync_data()?;
        for (_, path) in &old {
            fs::remove_file(path)?;
        }
        if !old.is_empty() {
            tracing::info!(
                recovered = events.len(),
                "usage journal recovered what the previous process left"
            );
        }
        let committed = Arc::new(AtomicU64::new(0));
        let shared = Arc::new(Shared::default());
        let next_dir = dir.to_owned();
        let writer = Writer {
            dir: dir.to_owned(),
            segment_bytes,
            index,
            file,
            next: Some(std::thread::spawn(move || {
                preallocated(&next_dir, index + 1, segment_bytes)
            })),
            unsynced: false,
            written: u64::try_from(buffer.len()).unwrap_or(u64::MAX),
            max_seq: next_seq.checked_sub(1),
            sealed: Vec::new(),
            open: HashMap::new(),
            committed: committed.clone(),
            _lock: lock,
        };
        let thread = std::thread::Builder::new()
            .name("usage-journal".to_owned())
            .spawn({
                let shared = shared.clone();
                move || writer.run(&shared)
            })?;
        let journal = Self {
            shared,
            committed,
            writer: Mutex::new(Some(thread)),
        };
        Ok((journal, Recovered { events, next_seq }))
    }

    /// Queues a record for the next sync, without waiting for it.
    pub fn write(&self, record: Record) {
        let mut queue = self.shared.lock();
        if queue.closed {
            tracing::error!("usage journal writer has stopped; a record was not written");
            return;
        }
        queue.records.push(record);
        queue.oldest.get_or_insert_with(Instant::now);
        if queue.sleep == Sleep::Idle {
            queue.sleep = Sleep::Awake;
            self.shared.wake.notify_one();
        }
    }

    /// Queues a record; the receiver resolves once it is on disk and synced (or fails if the
    /// writer stopped).
    pub fn write_synced(&self, record: Record) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let mut queue = self.shared.lock();
        if queue.closed {
            tracing::error!("usage journal writer has stopped; a record was not written");
            return rx;
        }
        queue.records.push(record);
        queue.oldest.get_or_insert_with(Instant::now);
        queue.waiters.push(tx);
        if queue.sleep != Sleep::Awake {
            queue.sleep = Sleep::Awake;
            self.shared.wake.notify_one();
        }
        rx
    }

    /// The ledger now holds every event up to `seq`: segments recording nothing later can go.
    pub fn committed(&self, seq: u64) {
        self.committed.fetch_max(seq + 1, Ordering::Relaxed);
        let mut queue = self.shared.lock();
        queue.checkpoint = true;
        if queue.sleep == Sleep::Idle {
            queue.sleep = Sleep::Awake;
            self.shared.wake.notify_one();
        }
    }

    /// Stops the writer after it has written and synced everything queued.
    pub fn close(&self) {
        {
            let mut queue = self.shared.lock();
            queue.closed = true;
            queue.sleep = Sleep::Awake;
            self.shared.wake.notify_one();
        }
        if let Some(thread) = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            let _ = thread.join();
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.close();
    }
}

struct Writer {
    dir: PathBuf,
    segment_bytes: u64,
    index: u64,
    file: File,
    /// The next segment, being zero-filled in the background.
    next: Option<JoinHandle<io::Result<File>>>,
    /// Whether the segment holds records written since its last sync.
    unsynced: bool,
    written: u64,
    /// The highest `seq` written so far.
    max_seq: Option<u64>,
    /// Sealed segments and the highest `seq` written when each was sealed.
    sealed: Vec<(u64, Option<u64>)>,
    /// Requests started and not yet ended, with their last progress.
    open: HashMap<String, OpenRequest>,
    /// One more than the highest `seq` the ledger holds (0: none).
    committed: Arc<AtomicU64>,
    _lock: File,
}

impl Writer {
    /// Takes everything queued once there is a reason to (a waiter, records `LINGER` old, a
    /// checkpoint, or `close`), writes it to the file at once and syncs it; then tells the
    /// waiters. Records nobody waits for never cost a
    /// sync of their own, nor a wake-up while others keep the writer busy.
    fn run(mut self, shared: &Shared) {
        let mut buffer = Vec::with_capacity(1 << 16);
        let mut records = Vec::new();
        let mut waiting = Vec::new();
        let mut last_waiters = 0;
        loop {
            let (closed, checkpoint) = {
                let mut queue = shared.lock();
                loop {
                    let lingered = queue.oldest.is_some_and(|t| t.elapsed() >= LINGER);
                    if queue.closed || queue.checkpoint || lingered || !queue.waiters.is_empty() {
                        break;
                    }
                    queue = match queue.oldest {
                        Some(since) => {
                            queue.sleep = Sleep::Lingering;
                            let left = LINGER.saturating_sub(since.elapsed());
                            shared
                                .wake
                                .wait_timeout(queue, left)
                                .unwrap_or_else(PoisonError::into_inner)
                                .0
                        }
                        None => {
                            queue.sleep = Sleep::Idle;
                            shared
                                .wake
                                .wait(queue)
                                .unwrap_or_else(PoisonError::into_inner)
                        }
                    };
                }
                // Under load (the last sync had company), give others a moment to join.
                if last_waiters >= 2 && !queue.closed {
                    let until = Instant::now() + COMMIT_DELAY;
                    while queue.waiters.len() < last_waiters * 2 {
                        let left = until.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            break;
                        }
                        queue.sleep = Sleep::Lingering;
                        queue = shared
                            .wake
                            .wait_timeout(queue, left)
                            .unwrap_or_else(PoisonError::into_inner)
                            .0;
                    }
                }
                queue.sleep = Sleep::Awake;
                std::mem::swap(&mut records, &mut queue.records);
                waiting.append(&mut queue.waiters);
                queue.oldest = None;
                (queue.closed, std::mem::take(&mut queue.checkpoint))
            };
            last_waiters = waiting.len();
            for record in records.drain(..) {
                self.track(&record);
                record.encode(&mut buffer);
            }
            if !buffer.is_empty() {
                if let Err(error) = self.write_out(&buffer) {
                    // The waiting requests see their receiver fail; their events stay in
                    // memory, on their way to the ledger.
                    tracing::error!(%error, "usage journal write failed");
                    waiting.clear();
                }
                buffer.clear();
            }
            if checkpoint && let Err(error) = self.maintain() {
                tracing::error!(%error, "usage journal segment deletion failed");
            }
            self.sync(&mut waiting);
            if closed {
                if let Some(next) = self.next.take() {
                    let _ = next.join();
                }
                return;
            }
        }
    }

    /// Syncs what was written, then tells `waiting`.
    fn sync(&mut self, waiting: &mut Vec<oneshot::Sender<()>>) {
        if !self.unsynced {
            return;
        }
        match self.file.sync_data() {
            Ok(()) => {
                self.unsynced = false;
                for synced in waiting.drain(..) {
                    let _ = synced.send(());
                }
            }
            Err(error) => {
                tracing::error!(%error, "usage journal sync failed");
                waiting.clear();
            }
        }
    }

    fn track(&mut self, record: &Record) {
        match record {
            Record::Start(started) => {
                self.open
                    .insert(started.event_id.clone(), (started.clone(), None));
            }
            Record::Progress { event_id, progress } => {
                if let Some(entry) = self.open.get_mut(event_id) {
                    entry.1 = Some(*progress);
                }
            }
            Record::Discard { event_id } => {
                self.open.remove(event_id);
            }
            Record::End(ended) => {
                self.open.remove(&ended.event.event_id);
                self.max_seq = Some(self.max_seq.map_or(ended.seq, |m| m.max(ended.seq)));
            }
        }
    }

    /// Writes `bytes` after what the segment holds (sealing it first if they do not fit),
    /// without syncing.
    fn write_out(&mut self, bytes: &[u8]) -> io::Result<()> {
        let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        if self.written > 0 && self.written + len > self.segment_bytes {
            self.rotate()?;
        }
        self.file.write_all_at(bytes, self.written)?;
        self.written += len;
        self.unsynced = true;
        Ok(())
    }

    /// Seals the segment and continues in the next, which begins with the start (and last
    /// progress) of every request still open.
    fn rotate(&mut self) -> io::Result<()> {
        if self.unsynced {
            self.file.sync_data()?;
            self.unsynced = false;
        }
        let index = self.index + 1;
        let file = match self.next.take().map(JoinHandle::join) {
            Some(Ok(Ok(file))) => file,
            Some(Ok(Err(error))) => return Err(error),
            Some(Err(_)) | None => preallocated(&self.dir, index, self.segment_bytes)?,
        };
        adopt(&self.dir, index)?;
        let mut carried = Vec::new();
        for (started, progress) in self.open.values() {
            Record::Start(started.clone()).encode(&mut carried);
            if let Some(progress) = progress {
                Record::Progress {
                    event_id: started.event_id.clone(),
                    progress: *progress,
                }
                .encode(&mut carried);
            }
        }
        file.write_all_at(&carried, 0)?;
        file.sync_data()?;
        self.sealed.push((self.index, self.max_seq));
        self.index = index;
        self.file = file;
        self.written = u64::try_from(carried.len()).unwrap_or(u64::MAX);
        let (dir, bytes) = (self.dir.clone(), self.segment_bytes);
        self.next = Some(std::thread::spawn(move || {
            preallocated(&dir, index + 1, bytes)
        }));
        Ok(())
    }

    /// Deletes the sealed segments the ledger has caught up with.
    fn maintain(&mut self) -> io::Result<()> {
        let committed = self.committed.load(Ordering::Relaxed);
        let dir = &self.dir;
        self.sealed.retain(|&(index, max_seq)| {
            if max_seq.is_some_and(|seq| seq >= committed) {
                return true;
            }
            match fs::remove_file(segment_path(dir, index)) {
                Ok(()) => false,
                Err(error) => {
                    tracing::warn!(%error, index, "could not delete a journal segment");
                    true
                }
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system's temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "tokengate-journal-{name}-{}-{:?}",
                std::process::id(),
                std::time::SystemTime::now()
            ));
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn started(id: &str) -> Started {
        Started {
            event_id: id.into(),
            request_id: id.into(),
            tenant_id: "t".into(),
            key_id: "k".into(),
            model: "m".into(),
            endpoint: crate::request::Endpoint::Completions,
            stream: true,
            started_at_ms: 1,
        }
    }

    fn ended(id: &str, seq: u64) -> Ended {
        let mut ended = started(id).interrupted(None, seq);
        ended.event.status = crate::usage::Status::Completed;
        ended.event.completion_tokens = 5;
        ended
    }

    fn progress(id: &str, completion: u64) -> Record {
        Record::Progress {
            event_id: id.into(),
            progress: Progress {
                prompt_tokens: 3,
                completion_tokens: completion,
                cached_tokens: 0,
                at_ms: 2,
            },
        }
    }

    fn open(dir: &TempDir, segment_bytes: u64) -> (Journal, Recovered) {
        Journal::open(&dir.0, segment_bytes).unwrap_or_else(|e| panic!("open: {e}"))
    }

    #[test]
    fn a_synced_record_is_on_disk_when_its_receiver_resolves() {
        let dir = TempDir::new("synced");
        let (journal, recovered) = open(&dir, 1 << 20);
        assert!(recovered.events.is_empty());
        let synced = journal.write_synced(Record::End(ended("a", 0)));
        assert!(synced.blocking_recv().is_ok());
        let on_disk: String = segments(&dir.0)
            .unwrap_or_default()
            .iter()
            .map(|(_, p)| fs::read_to_string(p).unwrap_or_default())
            .collect();
        assert!(on_disk.contains(r#""event_id":"a""#), "{on_disk}");
    }

    #[test]
    fn reopening_records_ended_events_again_and_interrupts_open_requests() {
        let dir = TempDir::new("recover");
        {
            let (journal, _) = open(&dir, 1 << 20);
            journal.write(Record::Start(started("done")));
            journal.write(Record::Start(started("cut")));
            journal.write(Record::Start(started("refused")));
            journal.write(progress("cut", 4));
            journal.write(progress("cut", 7));
            journal.write(Record::Discard {
                event_id: "refused".into(),
            });
            let synced = journal.write_synced(Record::End(ended("done", 0)));
            assert!(synced.blocking_recv().is_ok());
        }
        // A crash can cut the last line short.
        let (_, last) = segments(&dir.0)
            .unwrap_or_default()
            .pop()
            .unwrap_or_default();
        let mut file = OpenOptions::new()
            .append(true)
            .open(&last)
            .unwrap_or_else(|e| panic!("{e}"));
        let _ = file.write_all(br#"{"r":"end","seq":9,"event_id":"half"#);
        drop(file);

        let (journal, recovered) = open(&dir, 1 << 20);
        let ids: Vec<(&str, &str, u64)> = recovered
            .events
            .iter()
            .map(|e| {
                (
                    e.event.event_id.as_str(),
                    e.event.status.as_str(),
                    e.event.completion_tokens,
                )
            })
            .collect();
        assert_eq!(ids, [("done", "completed", 5), ("cut", "interrupted", 7)]);
        assert_eq!(recovered.next_seq, 2);
        assert_eq!(
            segments(&dir.0).unwrap_or_default().len(),
            1,
            "old segments deleted"
        );
        drop(journal);

        // Recovering again finds the same events, once each.
        let (_, again) = open(&dir, 1 << 20);
        assert_eq!(again.events, recovered.events);
    }

    #[test]
    fn one_process_at_a_time() {
        let dir = TempDir::new("lock");
        let (_journal, _) = open(&dir, 1 << 20);
        let second = Journal::open(&dir.0, 1 << 20);
        assert!(second.is_err_and(|e| e.to_string().contains("in use")));
    }

    #[test]
    fn sealed_segments_go_once_committed_and_open_requests_are_carried_forward() {
        let dir = TempDir::new("rotate");
        {
            let (journal, _) = open(&dir, 4096);
            journal.write(Record::Start(started("long")));
            journal.write(progress("long", 1));
            for seq in 0..100 {
                let id = format!("e{seq}");
                journal.write(Record::Start(started(&id)));
                let synced = journal.write_synced(Record::End(ended(&id, seq)));
                assert!(synced.blocking_recv().is_ok());
            }
            assert!(
                segments(&dir.0).unwrap_or_default().len() > 2,
                "segments rotated"
            );
            journal.committed(99);
            let synced = journal.write_synced(progress("long", 2));
            assert!(synced.blocking_recv().is_ok());
            assert_eq!(
                segments(&dir.0).unwrap_or_default().len(),
                1,
                "every sealed segment is in the ledger"
            );
        }
        // The live segment's ended events come back (the ledger ignores ids it has), the sealed
        // ones do not, and the request open since the first segment is closed as interrupted.
        let (_, recovered) = open(&dir, 4096);
        let (last, replayed) = recovered
            .events
            .split_last()
            .unwrap_or_else(|| panic!("empty"));
        assert_eq!(
            (
                last.event.event_id.as_str(),
                last.event.status.as_str(),
                last.event.completion_tokens
            ),
            ("long", "interrupted", 2)
        );
        assert!(replayed.len() < 50, "{} replayed", replayed.len());
        assert!(
            replayed
                .iter()
                .all(|e| e.event.status == crate::usage::Status::Completed)
        );
        assert_eq!(recovered.next_seq, 101);
    }
}
