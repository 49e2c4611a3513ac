//! The journal's syncer thread: at each tick it writes the starts and progress of the requests
//! still open and `fdatasync`s what was written; with `Durability::Always` it also syncs as soon
//! as an end waits, then tells the ends it synced. It deletes the sealed segments the ledger has
//! caught up with. It never holds the journal's lock while the disk works.

use std::fs;
use std::sync::PoisonError;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::state::{Shared, Sleep};

/// How much nicer than the thread that started it a background thread of the journal makes
/// itself: at nice 10 a thread weighs about a tenth of one at 0, still several times the share of
/// a core the syncer's ticks take at saturation (about 1.5%), while a request's thread no longer
/// waits behind a tick or a segment's zero-filling.
const NICER: i32 = 10;

/// Lowers the calling thread's priority by `NICER` (to 19 at most).
pub(super) fn yield_to_requests() {
    let tid = Some(rustix::thread::gettid());
    let nicer = rustix::process::getpriority_process(tid)
        .and_then(|nice| rustix::process::setpriority_process(tid, (nice + NICER).min(19)));
    if let Err(error) = nicer {
        tracing::debug!(%error, "a usage journal thread keeps its priority");
    }
}

/// Runs until the journal closes. With `yields` (`Durability::Interval`: no response waits for a
/// sync) the thread first yields to requests, so a tick runs in the gaps between them rather than
/// in front of them.
pub(super) fn run(shared: &Shared, yields: bool) {
    if yields {
        yield_to_requests();
    }
    let mut waiting = Vec::new();
    loop {
        let (files, closed, checkpoint) = {
            let mut state = shared.lock();
            loop {
                let due = state.due.is_some_and(|due| Instant::now() >= due);
                if state.closed || state.checkpoint || due || !state.waiters.is_empty() {
                    break;
                }
                state = match state.due {
                    Some(due) => {
                        state.sleep = Sleep::Ticking;
                        let left = due.saturating_duration_since(Instant::now());
                        shared
                            .wake
                            .wait_timeout(state, left)
                            .unwrap_or_else(PoisonError::into_inner)
                            .0
                    }
                    None => {
                        state.sleep = Sleep::Idle;
                        shared
                            .wake
                            .wait(state)
                            .unwrap_or_else(PoisonError::into_inner)
                    }
                };
            }
            state.sleep = Sleep::Awake;
            let tick = state.closed || state.due.is_some_and(|due| Instant::now() >= due);
            if tick {
                state.due = None;
                state.write_open();
            }
            waiting.append(&mut state.waiters);
            let files = state.take_unsynced();
            (files, state.closed, std::mem::take(&mut state.checkpoint))
        };
        let mut synced = true;
        for file in &files {
            let began = Instant::now();
            if let Err(error) = file.sync_data() {
                tracing::error!(%error, "usage journal sync failed");
                synced = false;
            }
            if let Some(histogram) = shared.sync_seconds.get() {
                histogram.observe(began.elapsed().as_secs_f64());
            }
        }
        if synced {
            for waiter in waiting.drain(..) {
                let _ = waiter.send(());
            }
        } else {
            // Their receivers fail: the responses end all the same, their events in memory.
            waiting.clear();
        }
        if checkpoint {
            delete_committed(shared);
        }
        if closed {
            if let Some(next) = shared.lock().take_next() {
                let _ = next.join();
            }
            return;
        }
    }
}

/// Deletes the sealed segments the ledger holds every event of; one that cannot be deleted stays
/// listed, for the next checkpoint.
fn delete_committed(shared: &Shared) {
    let committed = shared.committed.load(Ordering::Relaxed);
    let done = shared.lock().take_committed(committed);
    let mut kept = Vec::new();
    for (index, max_seq, path) in done {
        if let Err(error) = fs::remove_file(&path) {
            tracing::warn!(%error, index, "could not delete a journal segment");
            kept.push((index, max_seq));
        }
    }
    if !kept.is_empty() {
        let mut state = shared.lock();
        state.sealed.extend(kept);
        state.sealed.sort_unstable();
    }
}
