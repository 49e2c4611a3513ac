//! The journal's syncer thread: at each tick it writes the starts and progress of the requests
//! still open and `fdatasync`s what was written; with `Durability::Always` it also syncs as soon
//! as an end waits, then tells the ends it synced. It deletes the sealed segments the ledger has
//! caught up with. It never holds the journal's lock while the disk works.

use std::fs;
use std::sync::PoisonError;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::state::{Shared, Sleep};

pub(super) fn run(shared: &Shared) {
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
