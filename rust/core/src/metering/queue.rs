//! The meter's queue of recorded events waiting to be drained: a FIFO of fixed-size chunks.
//!
//! One contiguous buffer would double when the queue outgrew it, copying every waiting event
//! under the meter's lock while each request's end waits for that lock: with the ledger a few
//! seconds behind, tens of megabytes and fresh pages, a stop of tens of milliseconds for every
//! request in flight. Here a push fills the last chunk or starts a new one, never moving an event
//! already queued, and a drain moves whole chunks out under the lock; emptied chunks are kept for
//! reuse, so a queue that stays at its usual depth allocates nothing.

use std::collections::VecDeque;

use crate::journal::Ended;

/// Events a chunk holds.
pub(super) const CHUNK: usize = 512;
/// Emptied chunks kept for reuse (the rest are freed).
const SPARE: usize = 16;

#[derive(Debug, Default)]
pub(super) struct EventQueue {
    /// Oldest first; each holds at most `CHUNK` events, none is empty.
    chunks: VecDeque<VecDeque<Ended>>,
    len: usize,
    /// Emptied chunks, each with room for `CHUNK` events.
    spare: Vec<VecDeque<Ended>>,
}

/// Events taken from the queue under its lock: whole chunks, moved, not copied, and the front of
/// the next one.
#[derive(Debug, Default)]
pub(super) struct Taken {
    chunks: Vec<VecDeque<Ended>>,
}

impl EventQueue {
    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn push(&mut self, ended: Ended) {
        match self.chunks.back_mut() {
            Some(last) if last.len() < CHUNK => last.push_back(ended),
            _ => {
                let mut chunk = self
                    .spare
                    .pop()
                    .unwrap_or_else(|| VecDeque::with_capacity(CHUNK));
                chunk.push_back(ended);
                self.chunks.push_back(chunk);
            }
        }
        self.len = self.len.saturating_add(1);
    }

    /// Takes up to `max` events, oldest first.
    pub(super) fn take(&mut self, max: usize) -> Taken {
        let mut taken = Taken::default();
        let mut left = max.min(self.len);
        self.len = self.len.saturating_sub(left);
        while left > 0 {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            if front.len() <= left {
                left = left.saturating_sub(front.len());
                taken.chunks.extend(self.chunks.pop_front());
            } else {
                let mut part = self
                    .spare
                    .pop()
                    .unwrap_or_else(|| VecDeque::with_capacity(CHUNK));
                part.extend(front.drain(..left));
                taken.chunks.push(part);
                left = 0;
            }
        }
        taken
    }

    /// Keeps `taken`'s emptied chunks for reuse, up to `SPARE`.
    pub(super) fn recycle(&mut self, taken: Taken) {
        for chunk in taken.chunks {
            if self.spare.len() >= SPARE {
                break;
            }
            debug_assert!(chunk.is_empty());
            self.spare.push(chunk);
        }
    }
}

impl From<Vec<Ended>> for EventQueue {
    fn from(events: Vec<Ended>) -> Self {
        let mut queue = Self::default();
        for ended in events {
            queue.push(ended);
        }
        queue
    }
}

impl Taken {
    /// Moves the events out, oldest first, leaving the chunks empty for `EventQueue::recycle`.
    pub(super) fn events(&mut self) -> Vec<Ended> {
        let len = self.chunks.iter().map(VecDeque::len).sum();
        let mut events = Vec::with_capacity(len);
        for chunk in &mut self.chunks {
            events.extend(chunk.drain(..));
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::{Status, test_event};

    fn ended(seq: u64) -> Ended {
        Ended {
            seq,
            event: test_event(Status::Completed, seq),
        }
    }

    fn seqs(events: &[Ended]) -> Vec<u64> {
        events.iter().map(|ended| ended.seq).collect()
    }

    fn drain(queue: &mut EventQueue, max: usize) -> Vec<Ended> {
        let mut taken = queue.take(max);
        let events = taken.events();
        queue.recycle(taken);
        events
    }

    #[test]
    fn events_come_out_in_the_order_they_went_in_across_chunks() {
        let mut queue = EventQueue::default();
        let n = 3 * CHUNK as u64 + 7;
        (0..n).for_each(|seq| queue.push(ended(seq)));
        assert_eq!(queue.len(), 3 * CHUNK + 7);
        let mut out = Vec::new();
        for max in [1, CHUNK - 1, CHUNK + 3, 5, 10 * CHUNK] {
            let events = drain(&mut queue, max);
            assert_eq!(events.len(), max.min(n as usize - out.len()));
            out.extend(seqs(&events));
            assert_eq!(queue.len(), n as usize - out.len());
        }
        assert_eq!(out, (0..n).collect::<Vec<_>>());
        assert!(drain(&mut queue, 10).is_empty());
    }

    #[test]
    fn pushes_between_drains_keep_the_order() {
        let mut queue = EventQueue::default();
        let mut next = 0;
        let mut out = Vec::new();
        for round in 0..50 {
            for _ in 0..(round * 37 % 700) {
                queue.push(ended(next));
                next += 1;
            }
            out.extend(seqs(&drain(&mut queue, round * 53 % 900)));
        }
        out.extend(seqs(&drain(&mut queue, usize::MAX)));
        assert_eq!(out, (0..next).collect::<Vec<_>>());
        assert_eq!(queue.len(), 0);
    }

    #[test]
    fn no_chunk_outgrows_its_first_allocation_and_drained_chunks_are_reused() {
        let mut queue = EventQueue::default();
        for round in 0..20 {
            (0..(2 * CHUNK + round)).for_each(|seq| queue.push(ended(seq as u64)));
            for chunk in &queue.chunks {
                assert!(chunk.len() <= CHUNK && chunk.capacity() < 2 * CHUNK);
            }
            drain(&mut queue, usize::MAX);
        }
        assert!(
            !queue.spare.is_empty() && queue.spare.len() <= SPARE,
            "emptied chunks are kept, up to SPARE: {}",
            queue.spare.len()
        );
        assert!(queue.spare.iter().all(VecDeque::is_empty));
    }

    #[test]
    fn recovered_events_are_queued_in_their_order() {
        let queue = EventQueue::from((0..1_000).map(ended).collect::<Vec<_>>());
        let mut queue = queue;
        assert_eq!(
            seqs(&drain(&mut queue, 2_000)),
            (0..1_000).collect::<Vec<_>>()
        );
    }
}
