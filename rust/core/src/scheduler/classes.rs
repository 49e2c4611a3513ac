//! One model's queue: a tenant-fair queue (`fair`) per priority class, and the rule that orders
//! the classes. It holds requests; it does not know workers or capacity.
//!
//! The rule: the next request is the fair head of `interactive` while that class has requests
//! queued, except that while `batch` requests wait too, every `batch_every`-th grant in a row
//! goes to `batch` (so `batch` gets at least one worker in `batch_every` as long as it waits, and
//! every worker `interactive` leaves unused). A class is never starved: `interactive` waits for at
//! most one `batch` grant, `batch` for at most `batch_every - 1` `interactive` ones.

use std::sync::Arc;

use super::fair::{FairQueue, Ticket};
use crate::request::Priority;

/// Where a request waits: its class's queue, and its place there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassTicket {
    class: Priority,
    ticket: Ticket,
}

#[derive(Debug)]
pub struct ClassQueue<T> {
    interactive: FairQueue<T>,
    batch: FairQueue<T>,
    /// Grants to `interactive` in a row while `batch` waited.
    streak: u32,
    batch_every: u32,
}

impl<T> ClassQueue<T> {
    /// A queue that gives `batch` one grant in `batch_every` (at least 2) while it waits.
    pub fn new(batch_every: u32) -> Self {
        Self {
            interactive: FairQueue::default(),
            batch: FairQueue::default(),
            streak: 0,
            batch_every: batch_every.max(2),
        }
    }

    fn class(&self, class: Priority) -> &FairQueue<T> {
        match class {
            Priority::Interactive => &self.interactive,
            Priority::Batch => &self.batch,
        }
    }

    fn class_mut(&mut self, class: Priority) -> &mut FairQueue<T> {
        match class {
            Priority::Interactive => &mut self.interactive,
            Priority::Batch => &mut self.batch,
        }
    }

    /// Queues `item` in `class` for `tenant`, costing `cost` tokens at `weight`.
    pub fn push(
        &mut self,
        class: Priority,
        tenant: &Arc<str>,
        cost: u64,
        weight: u32,
        item: T,
    ) -> ClassTicket {
        let ticket = self.class_mut(class).push(tenant, cost, weight, item);
        ClassTicket { class, ticket }
    }

    /// Gives back to `tenant` tokens it was charged in `class` and did not use (see
    /// [`FairQueue::refund`]).
    pub fn refund(&mut self, class: Priority, tenant: &str, tokens: u64, weight: u32) {
        self.class_mut(class).refund(tenant, tokens, weight);
    }

    /// The class the next grant goes to.
    fn next(&self) -> Option<Priority> {
        match (self.interactive.is_empty(), self.batch.is_empty()) {
            (true, true) => None,
            (false, true) => Some(Priority::Interactive),
            (true, false) => Some(Priority::Batch),
            (false, false) if self.streak.saturating_add(1) >= self.batch_every => {
                Some(Priority::Batch)
            }
            (false, false) => Some(Priority::Interactive),
        }
    }

    /// The request to serve next, without taking it.
    pub fn peek(&self) -> Option<&T> {
        self.class(self.next()?).peek()
    }

    /// Takes the request to serve next.
    pub fn pop(&mut self) -> Option<T> {
        let class = self.next()?;
        self.streak = match class {
            Priority::Interactive if !self.batch.is_empty() => self.streak.saturating_add(1),
            _ => 0,
        };
        self.class_mut(class).pop()
    }

    /// Takes `ticket`'s request out unserved; `None` if it is no longer queued.
    pub fn remove(&mut self, ticket: ClassTicket) -> Option<T> {
        let item = self.class_mut(ticket.class).remove(ticket.ticket);
        if self.batch.is_empty() {
            self.streak = 0;
        }
        item
    }

    pub fn len(&self) -> usize {
        self.interactive.len().saturating_add(self.batch.len())
    }

    pub fn is_empty(&self) -> bool {
        self.interactive.is_empty() && self.batch.is_empty()
    }

    /// How many of `tenant`'s requests are queued, in both classes.
    pub fn queued(&self, tenant: &str) -> usize {
        self.interactive
            .queued(tenant)
            .saturating_add(self.batch.queued(tenant))
    }

    /// Each tenant's queued requests, by class.
    pub fn by_tenant(&self) -> impl Iterator<Item = (Priority, &Arc<str>, usize)> {
        Priority::ALL.into_iter().flat_map(move |class| {
            self.class(class)
                .tenants()
                .map(move |(tenant, queued)| (class, tenant, queued))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(queue: &mut ClassQueue<String>) -> Vec<String> {
        std::iter::from_fn(|| queue.pop()).collect()
    }

    #[test]
    fn interactive_first_and_batch_gets_one_grant_in_batch_every() {
        let tenant: Arc<str> = "t".into();
        let mut queue = ClassQueue::new(3);
        for i in 0..4 {
            queue.push(Priority::Batch, &tenant, 1, 1, format!("b{i}"));
        }
        for i in 0..5 {
            queue.push(Priority::Interactive, &tenant, 1, 1, format!("i{i}"));
        }
        assert_eq!((queue.len(), queue.queued("t")), (9, 9));
        assert_eq!(
            drain(&mut queue),
            ["i0", "i1", "b0", "i2", "i3", "b1", "i4", "b2", "b3"]
        );
        assert!(queue.is_empty());
    }

    #[test]
    fn the_streak_counts_only_while_batch_waits() {
        let tenant: Arc<str> = "t".into();
        let mut queue = ClassQueue::new(2);
        queue.push(Priority::Interactive, &tenant, 1, 1, "i0".to_owned());
        queue.push(Priority::Interactive, &tenant, 1, 1, "i1".to_owned());
        assert_eq!(queue.pop().as_deref(), Some("i0"));
        // Batch arrives after an interactive grant it did not wait for: interactive goes on.
        let b0 = queue.push(Priority::Batch, &tenant, 1, 1, "b0".to_owned());
        assert_eq!(queue.pop().as_deref(), Some("i1"));
        queue.push(Priority::Interactive, &tenant, 1, 1, "i2".to_owned());
        assert_eq!(queue.peek().map(String::as_str), Some("b0"));
        // The batch request leaves: the streak is forgotten with it.
        assert_eq!(queue.remove(b0).as_deref(), Some("b0"));
        queue.push(Priority::Batch, &tenant, 1, 1, "b1".to_owned());
        assert_eq!(drain(&mut queue), ["i2", "b1"]);
    }

    #[test]
    fn each_class_is_tenant_fair_and_counted_by_tenant() {
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let mut queue = ClassQueue::new(10);
        for i in 0..3 {
            queue.push(Priority::Batch, &a, 10, 1, format!("a{i}"));
        }
        queue.push(Priority::Batch, &b, 10, 1, "b0".to_owned());
        queue.push(Priority::Interactive, &b, 10, 1, "bi".to_owned());
        let mut counts: Vec<_> = queue
            .by_tenant()
            .map(|(class, tenant, n)| (class.as_str(), tenant.to_string(), n))
            .collect();
        counts.sort();
        assert_eq!(
            counts,
            [
                ("batch", "a".to_owned(), 3),
                ("batch", "b".to_owned(), 1),
                ("interactive", "b".to_owned(), 1)
            ]
        );
        assert_eq!(drain(&mut queue), ["bi", "a0", "b0", "a1", "a2"]);
    }
}
