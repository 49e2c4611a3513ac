//! Start-time fair queuing over tenants, by tokens: the order in which queued requests get a
//! worker. It holds the queue; it does not know workers or capacity.
//!
//! Each tenant has a finish tag in virtual tokens. A request of cost `c` (its estimated tokens)
//! from a tenant of weight `w` starts at `max(V, F)`, where `V` is the start tag of the request
//! last served and `F` the tenant's finish tag, and moves `F` to that start plus `c / w`. The
//! request with the smallest start tag is served first (ties: the earlier arrival). So a tenant
//! that floods the queue waits behind its own backlog, not in front of everyone else's, and over
//! any busy period each tenant's served tokens track its weight (Goyal et al., SFQ, 1996).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Virtual tokens are kept in 1/SCALE of a token, so that a weight divides without losing
/// precision on small costs.
const SCALE: u128 = 1 << 16;

/// Where a request waits: its start tag and arrival number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket {
    start: u128,
    seq: u64,
}

#[derive(Debug)]
struct Queued<T> {
    tenant: Arc<str>,
    /// Its tenant's finish tag before it came, to roll back to if it leaves unserved as the
    /// tenant's last request.
    previous_finish: u128,
    finish: u128,
    item: T,
}

#[derive(Debug, Default)]
struct Tenant {
    finish: u128,
    queued: usize,
}

#[derive(Debug)]
pub struct FairQueue<T> {
    queued: BTreeMap<Ticket, Queued<T>>,
    tenants: HashMap<Arc<str>, Tenant>,
    /// `V`: the start tag of the request served last.
    virtual_time: u128,
    seq: u64,
}

impl<T> Default for FairQueue<T> {
    fn default() -> Self {
        Self {
            queued: BTreeMap::new(),
            tenants: HashMap::new(),
            virtual_time: 0,
            seq: 0,
        }
    }
}

impl<T> FairQueue<T> {
    /// Queues `item` for `tenant`, costing `cost` tokens at `weight` (0 counts as 1).
    pub fn push(&mut self, tenant: &Arc<str>, cost: u64, weight: u32, item: T) -> Ticket {
        let state = self.tenants.entry(tenant.clone()).or_default();
        let start = self.virtual_time.max(state.finish);
        let step = u128::from(cost).saturating_mul(SCALE) / u128::from(weight.max(1));
        let finish = start.saturating_add(step.max(1));
        let previous_finish = std::mem::replace(&mut state.finish, finish);
        state.queued = state.queued.saturating_add(1);
        let ticket = Ticket {
            start,
            seq: self.seq,
        };
        self.seq = self.seq.wrapping_add(1);
        self.queued.insert(
            ticket,
            Queued {
                tenant: tenant.clone(),
                previous_finish,
                finish,
                item,
            },
        );
        ticket
    }

    /// The request to serve next, without taking it.
    pub fn peek(&self) -> Option<&T> {
        self.queued.first_key_value().map(|(_, q)| &q.item)
    }

    /// Takes the request to serve next; its start tag becomes the virtual time.
    pub fn pop(&mut self) -> Option<T> {
        let (ticket, queued) = self.queued.pop_first()?;
        self.virtual_time = self.virtual_time.max(ticket.start);
        self.left(&queued.tenant, None);
        Some(queued.item)
    }

    /// Gives back to `tenant` (of `weight`) `tokens` it was charged and did not use: a request's
    /// cost is estimated when it queues and known when it ends. Its debt shrinks, never below
    /// the virtual time (an idle tenant banks no credit); a tenant no longer remembered (its busy
    /// period ended) has nothing to correct.
    pub fn refund(&mut self, tenant: &str, tokens: u64, weight: u32) {
        let Some(state) = self.tenants.get_mut(tenant) else {
            return;
        };
        let step = u128::from(tokens).saturating_mul(SCALE) / u128::from(weight.max(1));
        state.finish = state.finish.saturating_sub(step).max(self.virtual_time);
    }

    /// Takes `ticket`'s request out unserved (its client left, or its wait ran out); `None` if
    /// it is no longer queued. A tenant's last request gives back the virtual time it took.
    pub fn remove(&mut self, ticket: Ticket) -> Option<T> {
        let queued = self.queued.remove(&ticket)?;
        self.left(
            &queued.tenant,
            Some((queued.finish, queued.previous_finish)),
        );
        Some(queued.item)
    }

    fn left(&mut self, tenant: &Arc<str>, rollback: Option<(u128, u128)>) {
        let Some(state) = self.tenants.get_mut(tenant) else {
            return;
        };
        state.queued = state.queued.saturating_sub(1);
        if let Some((finish, previous)) = rollback
            && state.finish == finish
        {
            state.finish = previous;
        }
        // A tenant with nothing queued whose finish tag the virtual time has passed has no
        // advantage or debt left to remember; an empty queue ends the busy period, and with it
        // every tenant's.
        if state.queued == 0 && state.finish <= self.virtual_time {
            self.tenants.remove(tenant);
        }
        if self.queued.is_empty() {
            self.tenants.clear();
        }
    }

    pub fn len(&self) -> usize {
        self.queued.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queued.is_empty()
    }

    /// How many of `tenant`'s requests are queued.
    pub fn queued(&self, tenant: &str) -> usize {
        self.tenants.get(tenant).map_or(0, |t| t.queued)
    }

    /// Each tenant with requests queued, and how many.
    pub fn tenants(&self) -> impl Iterator<Item = (&Arc<str>, usize)> {
        self.tenants
            .iter()
            .filter(|(_, state)| state.queued > 0)
            .map(|(tenant, state)| (tenant, state.queued))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(name: &str) -> Arc<str> {
        name.into()
    }

    fn drain(queue: &mut FairQueue<String>) -> Vec<String> {
        std::iter::from_fn(|| queue.pop()).collect()
    }

    #[test]
    fn a_flood_waits_behind_itself_not_in_front_of_others() {
        let (a, b) = (tenant("a"), tenant("b"));
        let mut queue = FairQueue::default();
        for i in 0..10 {
            queue.push(&a, 100, 1, format!("a{i}"));
        }
        queue.push(&b, 100, 1, "b0".to_owned());
        queue.push(&b, 100, 1, "b1".to_owned());
        assert_eq!(
            (queue.len(), queue.queued("a"), queue.queued("b")),
            (12, 10, 2)
        );
        let order = drain(&mut queue);
        assert_eq!(&order[..4], ["a0", "b0", "a1", "b1"]);
        assert!(queue.is_empty() && queue.queued("a") == 0);
    }

    #[test]
    fn tokens_not_requests_are_shared_and_weights_scale_the_share() {
        let (small, big, heavy) = (tenant("small"), tenant("big"), tenant("heavy"));
        let mut queue = FairQueue::default();
        // `big` asks 4x the tokens a request: it gets a quarter of the requests.
        for i in 0..8 {
            queue.push(&small, 100, 1, format!("s{i}"));
            queue.push(&big, 400, 1, format!("b{i}"));
        }
        let first: Vec<String> = drain(&mut queue).into_iter().take(10).collect();
        let bigs = first.iter().filter(|r| r.starts_with('b')).count();
        assert_eq!(bigs, 2, "{first:?}");
        // Weight 4 buys the same tokens back.
        for i in 0..8 {
            queue.push(&small, 100, 1, format!("s{i}"));
            queue.push(&heavy, 400, 4, format!("h{i}"));
        }
        let first: Vec<String> = drain(&mut queue).into_iter().take(8).collect();
        let heavies = first.iter().filter(|r| r.starts_with('h')).count();
        assert_eq!(heavies, 4, "{first:?}");
    }

    #[test]
    fn an_idle_tenant_banks_no_credit_and_a_busy_one_keeps_its_debt() {
        let (a, b) = (tenant("a"), tenant("b"));
        let mut queue = FairQueue::default();
        for i in 0..4 {
            queue.push(&a, 100, 1, format!("a{i}"));
        }
        assert_eq!(queue.pop().as_deref(), Some("a0"));
        assert_eq!(queue.pop().as_deref(), Some("a1"));
        // b arrives now: it starts at the virtual time (a1's start), not at 0, so it takes one
        // turn and then alternates, rather than the next several turns for having been idle.
        queue.push(&b, 100, 1, "b0".to_owned());
        queue.push(&b, 100, 1, "b1".to_owned());
        queue.push(&b, 100, 1, "b2".to_owned());
        assert_eq!(drain(&mut queue), ["b0", "a2", "b1", "a3", "b2"]);
    }

    #[test]
    fn a_request_that_leaves_frees_its_place_and_its_tenant_s_virtual_time() {
        let (a, b) = (tenant("a"), tenant("b"));
        let mut queue = FairQueue::default();
        let a0 = queue.push(&a, 100, 1, "a0".to_owned());
        let a1 = queue.push(&a, 100, 1, "a1".to_owned());
        queue.push(&b, 100, 1, "b0".to_owned());
        assert_eq!(queue.remove(a1).as_deref(), Some("a1"));
        assert_eq!(queue.remove(a1), None);
        assert_eq!(queue.queued("a"), 1);
        // a's next request takes a1's place: it was a's last, so its time was given back.
        queue.push(&a, 100, 1, "a2".to_owned());
        assert_eq!(queue.remove(a0).as_deref(), Some("a0"));
        assert_eq!(drain(&mut queue), ["b0", "a2"]);
        assert!(queue.tenants.is_empty(), "{:?}", queue.tenants);
    }

    #[test]
    fn a_refund_of_unused_tokens_brings_a_tenant_s_turn_forward_but_banks_no_credit() {
        let (a, b) = (tenant("a"), tenant("b"));
        let run = |refund: bool| {
            let mut queue = FairQueue::default();
            queue.push(&a, 1000, 1, "a0".to_owned());
            for i in 0..3 {
                queue.push(&b, 100, 1, format!("b{i}"));
            }
            assert_eq!(queue.pop().as_deref(), Some("a0"));
            // a0 was charged 1000 tokens and used 100.
            if refund {
                queue.refund("a", 900, 1);
            }
            queue.push(&a, 100, 1, "a1".to_owned());
            drain(&mut queue)
        };
        assert_eq!(run(true), ["b0", "b1", "a1", "b2"]);
        assert_eq!(run(false), ["b0", "b1", "b2", "a1"]);

        // More than it was charged: never before the virtual time; an unknown tenant: nothing.
        let mut queue = FairQueue::default();
        queue.push(&a, 100, 1, "a0".to_owned());
        queue.push(&b, 100, 1, "b0".to_owned());
        assert_eq!(queue.pop().as_deref(), Some("a0"));
        queue.refund("a", u64::MAX, 0);
        queue.refund("nobody", 5, 1);
        assert_eq!(queue.tenants["a"].finish, queue.virtual_time);
    }

    #[test]
    fn huge_costs_and_zero_weights_saturate_instead_of_wrapping() {
        let a = tenant("a");
        let mut queue = FairQueue::default();
        for i in 0..3 {
            queue.push(&a, u64::MAX, 0, i);
        }
        queue.push(&tenant("b"), 1, u32::MAX, 9);
        assert_eq!(queue.pop(), Some(0));
        assert_eq!(queue.pop(), Some(9));
        assert_eq!(queue.len(), 2);
    }
}
