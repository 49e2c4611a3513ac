//! The journal's syncer thread: at each tick it writes the starts and progress of the requests
//! still open and `fdatasync`s what was written; with `Durability::Always` it also syncs as soon
//! as an end waits, then tells the ends it synced. After a sync it maps for writing the pages the
//! next records will go to (`Segment::map_ahead`), which the sync write-protected or which were
//! mapped for reading: the page faults are its own, not the requests'. It retires the sealed
//! segments the ledger has caught up with (`segments::retire`). It never holds the journal's lock
//! while the disk works, but to read back a page of the mapping that memory pressure took from
//! the page cache as it maps ahead, which a request's append would otherwise read under the lock.
//!
//! With `Durability::Interval` no response waits for it, and while the process leaves CPU to
//! spare it runs in the batch class (`thread_class::Chooser`): its wake-ups (the tick, each of
//! the disk's completions) wait for the request threads to sleep, a fraction of a millisecond,
//! where they would preempt them mid-response (3.4 times a tick at saturation; what that adds to
//! p99 at a moderate load, this machine did not resolve: `benchmarks/RESULTS.md`). While the
//! process is busy, or after a tick began more than half an interval late, it runs in the
//! default class, so that a tick keeps to its interval (on a saturated core the batch class made
//! the window a machine's loss costs twice as long: `tokengate_journal_unsynced_age_seconds`).
//! With `Always`, responses wait for it, and it stays in the default class.

use std::sync::PoisonError;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::segments::retire;
use super::state::{Shared, Sleep, Unsynced};
use crate::config::Durability;
use crate::thread_class::Chooser;

pub(super) fn run(shared: &Shared, durability: Durability) {
    let mut class = (durability == Durability::Interval).then(Chooser::new);
    #[cfg(test)]
    if let Ok(tid) = crate::thread_class::current_tid() {
        let _ = shared.syncer_tid.set(tid);
    }
    let mut waiting = Vec::new();
    loop {
        let (
            Unsynced {
                files,
                since,
                grown,
            },
            closed,
            checkpoint,
            late,
        ) = {
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
            let now = Instant::now();
            let tick = state.closed || state.due.is_some_and(|due| now >= due);
            // How late a tick began: `None` when this round is no tick.
            let late = tick.then(|| state.due.map_or(Duration::ZERO, |due| now - due));
            if tick {
                state.due = None;
                state.write_open();
            }
            waiting.append(&mut state.waiters);
            (
                state.take_unsynced(),
                state.closed,
                std::mem::take(&mut state.checkpoint),
                late.map(|late| (late, state.interval / 2)),
            )
        };
        if let (Some(class), Some((late, tolerance))) = (&mut class, late) {
            class.choose(late, tolerance);
        }
        let mut synced = true;
        let metrics = shared.sync_metrics.get();
        for file in &files {
            let began = Instant::now();
            if let Err(error) = file.sync_data() {
                tracing::error!(%error, "usage journal sync failed");
                synced = false;
            }
            if let Some(metrics) = metrics {
                metrics.seconds.observe(began.elapsed().as_secs_f64());
            }
        }
        if synced && since.is_some() {
            shared.lock().map_ahead(grown);
        }
        if synced && let (Some(since), Some(metrics)) = (since, metrics) {
            metrics.unsynced_age.observe(since.elapsed().as_secs_f64());
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
            retire_committed(shared);
        }
        if closed {
            if let Some(next) = shared.lock().take_next() {
                let _ = next.join();
            }
            return;
        }
    }
}

/// Retires the sealed segments the ledger holds every event of (`segments::retire`: kept as
/// spares, or deleted); one that cannot be retired stays listed, for the next checkpoint.
fn retire_committed(shared: &Shared) {
    let committed = shared.committed.load(Ordering::Relaxed);
    let (done, dir, bytes) = {
        let mut state = shared.lock();
        let done = state.take_committed(committed);
        (done, state.dir.clone(), state.segment_bytes)
    };
    let mut kept = Vec::new();
    for (index, max_seq) in done {
        if let Err(error) = retire(&dir, index, bytes) {
            tracing::warn!(%error, index, "could not retire a journal segment");
            kept.push((index, max_seq));
        }
    }
    if !kept.is_empty() {
        let mut state = shared.lock();
        state.sealed.extend(kept);
        state.sealed.sort_unstable();
    }
}
