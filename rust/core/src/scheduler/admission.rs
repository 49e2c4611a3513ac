//! The scheduler: each attempt of an admitted request is placed on a worker the routing policy
//! chooses among the eligible workers with room. A worker has room while the gateway's requests
//! on it are under its capacity: its `max_concurrency`, or what it learned from its own reports
//! (see `Worker::set_load`); none when neither applies. When every eligible worker is full, the
//! request waits in its model's queue, in class and tenant-fair order (`classes`, `fair`), until
//! a worker has room, its wait runs out (its own deadline or the queue's timeout: 429
//! `queue_timeout`), or its client leaves (its place is freed at once and no worker sees it). A
//! full queue refuses at once (429 `queue_full`).
//!
//! The set of workers may change while requests wait: a change raises the registry's `room`, so
//! each head is placed again among the workers there are now (none left: it is told so).
//!
//! With no worker bounded, nothing is ever queued and a placement is what it was without a
//! scheduler: the policy's choice, counted on the worker. While nothing is queued anywhere, a
//! placement takes no lock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::classes::{ClassQueue, ClassTicket};
use crate::config::RoutingConfig;
use crate::error::ApiError;
use crate::metering::SettleHook;
use crate::metrics::QueuedSample;
use crate::request::{Endpoint, InferenceRequest, Priority};
use crate::router::{
    Features, LeastLoad, Outstanding, OwnedPrefix, Pick, Registry, RoutingPolicy, WorkerId,
};

/// The bounds of every model's queue.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    /// Requests a model's queue holds at most.
    pub max_queued: usize,
    /// Requests of one tenant a model's queue holds at most.
    pub max_queued_per_tenant: usize,
    /// How long a request may wait for a worker.
    pub timeout: Duration,
    /// While `batch` requests wait, one grant in this many goes to them (see `classes`).
    pub batch_every: u32,
}

impl QueueLimits {
    pub fn of(routing: &RoutingConfig) -> Self {
        Self {
            max_queued: routing.max_queued as usize,
            max_queued_per_tenant: routing.max_queued_per_tenant as usize,
            timeout: Duration::from_millis(routing.queue_timeout_ms.max(1)),
            batch_every: routing.batch_every,
        }
    }
}

/// Whose a request is, as its model's queue orders it.
#[derive(Debug, Clone)]
pub struct Claim {
    pub tenant: Arc<str>,
    /// Its tenant's weight (at least 1).
    pub weight: u32,
    pub class: Priority,
    /// Its estimated tokens.
    pub cost: u64,
}

/// A request placed on a worker: counted there until `outstanding` drops.
#[derive(Debug)]
pub struct Placement {
    /// The worker is `outstanding.worker()`.
    pub outstanding: Outstanding,
    /// How long it waited in the queue, if it had to.
    pub waited: Option<Duration>,
}

/// What a queued request needs for its worker to be chosen without it.
#[derive(Debug)]
struct Waiter {
    model: Arc<str>,
    endpoint: Endpoint,
    prompt_bytes: usize,
    sequences: u64,
    prefix: OwnedPrefix,
    tried: Vec<WorkerId>,
    /// `None`: no eligible worker is left (all down or tried) while it waited.
    grant: oneshot::Sender<Option<Placement>>,
}

impl Waiter {
    fn features(&self) -> Features<'_> {
        Features {
            model: &self.model,
            endpoint: self.endpoint,
            prompt_bytes: self.prompt_bytes,
            sequences: self.sequences,
            prefix: self.prefix.view(),
        }
    }
}

#[derive(Debug)]
pub struct Scheduler {
    registry: Arc<Registry>,
    policy: Box<dyn RoutingPolicy>,
    /// Replaced by a reload; read once per placement.
    limits: ArcSwap<QueueLimits>,
    /// Shared with the hooks that correct a tenant's charge when its request ends.
    queues: Arc<Mutex<HashMap<Arc<str>, ClassQueue<Waiter>>>>,
    /// Requests queued over every model. Relaxed: a gauge and a hint; the queues' mutex orders
    /// everything else.
    queued: AtomicUsize,
}

impl Scheduler {
    pub fn new(
        registry: Arc<Registry>,
        policy: Box<dyn RoutingPolicy>,
        limits: QueueLimits,
    ) -> Self {
        Self {
            registry,
            policy,
            limits: ArcSwap::from_pointee(limits),
            queues: Arc::new(Mutex::new(HashMap::new())),
            queued: AtomicUsize::new(0),
        }
    }

    /// Bounds the queues by `limits` from now on (a request queued already keeps its wait).
    pub fn set_limits(&self, limits: QueueLimits) {
        self.limits.store(Arc::new(limits));
    }

    /// Whether any worker may be full: without one nothing is ever queued.
    fn bounded(&self) -> bool {
        self.registry.is_bounded()
    }

    /// Least-loaded routing over `registry`, queues bounded by `limits`.
    pub fn least_load(registry: Arc<Registry>, limits: QueueLimits) -> Self {
        Self::new(registry, Box::new(LeastLoad::default()), limits)
    }

    /// Requests waiting for a worker, over every model.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// The requests queued now, by model, tenant and class.
    pub fn queued_counts(&self) -> Vec<QueuedSample> {
        if !self.bounded() && self.queued() == 0 {
            return Vec::new();
        }
        let queues = self.lock();
        queues
            .iter()
            .flat_map(|(model, queue)| {
                queue
                    .by_tenant()
                    .map(|(class, tenant, count)| QueuedSample {
                        model: model.clone(),
                        tenant: tenant.clone(),
                        class,
                        count,
                    })
            })
            .collect()
    }

    /// Places the next attempt at `request` for `claim`, never on a worker whose id is in
    /// `tried`; waits in the model's queue while every eligible worker is full, at
    /// most until the request's deadline or the queue's timeout. `Ok(None)` when no eligible
    /// worker is left.
    pub async fn place(
        &self,
        request: &InferenceRequest,
        claim: &Claim,
        tried: &[WorkerId],
    ) -> Result<Option<Placement>, ApiError> {
        let features = Features::of(request);
        let bounded = self.bounded();
        // Nothing queued anywhere: no one to overtake, so no lock. (A request queued meanwhile
        // may be overtaken by this one; the next grant is its.)
        if !bounded || self.queued() == 0 {
            match self.registry.pick(self.policy.as_ref(), &features, tried) {
                Pick::Placed(outstanding) => return Ok(Some(placed(outstanding))),
                Pick::NoneEligible => return Ok(None),
                Pick::AllFull if !bounded => return Ok(None),
                Pick::AllFull => {}
            }
        }
        let limits = **self.limits.load();
        let started = Instant::now();
        let give_up = request
            .deadline
            .map_or(started + limits.timeout, |deadline| {
                deadline.min(started + limits.timeout)
            });
        let (ticket, mut granted) = {
            let mut queues = self.lock();
            let model_queue = queues.get(request.model.as_str());
            if model_queue.is_none_or(ClassQueue::is_empty) {
                match self.registry.pick(self.policy.as_ref(), &features, tried) {
                    Pick::Placed(outstanding) => return Ok(Some(placed(outstanding))),
                    Pick::NoneEligible => return Ok(None),
                    Pick::AllFull => {}
                }
            }
            if give_up <= started {
                return Err(self.timed_out(Duration::ZERO));
            }
            let batch_every = limits.batch_every;
            let queue = queues
                .entry(Arc::from(request.model.as_str()))
                .or_insert_with(|| ClassQueue::new(batch_every));
            if queue.len() >= limits.max_queued
                || queue.queued(&claim.tenant) >= limits.max_queued_per_tenant
            {
                return Err(ApiError::QueueFull {
                    retry_after: self.retry_after(),
                });
            }
            let (grant, granted) = oneshot::channel();
            let waiter = Waiter {
                model: Arc::from(request.model.as_str()),
                endpoint: request.endpoint,
                prompt_bytes: features.prompt_bytes,
                sequences: features.sequences,
                prefix: features.prefix.owned(),
                tried: tried.to_vec(),
                grant,
            };
            self.queued.fetch_add(1, Ordering::Relaxed);
            let ticket = queue.push(claim.class, &claim.tenant, claim.cost, claim.weight, waiter);
            (ticket, granted)
        };
        let mut place = Queued {
            scheduler: self,
            model: &request.model,
            ticket: Some(ticket),
        };
        let granted = match tokio::time::timeout_at(give_up, &mut granted).await {
            Ok(granted) => granted,
            Err(_) if place.leave() => return Err(self.timed_out(started.elapsed())),
            // Granted as the wait ran out: the place is in the channel already.
            Err(_) => granted.await,
        };
        place.ticket = None;
        Ok(granted.ok().flatten().map(|placement| Placement {
            waited: Some(started.elapsed()),
            ..placement
        }))
    }

    /// What corrects `claim`'s charge when its request ends: its model's queue gives its tenant
    /// back the estimated tokens the request did not use, so a tenant whose requests ask for far
    /// more `max_tokens` than they use is not served less for it. Only a request that waited in
    /// the queue was charged (for its last wait, if it waited more than once).
    pub fn refund_on_settle(&self, model: &str, claim: &Claim) -> SettleHook {
        let queues = Arc::clone(&self.queues);
        let model: Arc<str> = Arc::from(model);
        let (tenant, class, weight, cost) =
            (claim.tenant.clone(), claim.class, claim.weight, claim.cost);
        SettleHook::new(move |usage| {
            let used = usage.prompt_tokens.saturating_add(usage.completion_tokens);
            let unused = cost.saturating_sub(used);
            if unused == 0 {
                return;
            }
            let mut queues = queues.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(queue) = queues.get_mut(&*model) {
                queue.refund(class, &tenant, unused, weight);
            }
        })
    }

    fn retry_after(&self) -> Duration {
        self.limits.load().timeout.min(Duration::from_secs(1))
    }

    fn timed_out(&self, waited: Duration) -> ApiError {
        ApiError::QueueTimeout {
            waited,
            retry_after: self.retry_after(),
        }
    }

    /// Hands freed places to the queues' heads whenever a worker may have gained room or the
    /// set of workers changed. Runs for the gateway's life (a reload may bound a worker that was
    /// not).
    pub async fn run(&self) {
        let room = self.registry.room().clone();
        loop {
            room.notified().await;
            self.grant();
        }
    }

    /// Gives each queue's head, in fair order, a worker with room, until none has room.
    fn grant(&self) {
        // Places whose waiter left in the meantime: dropped once the lock is released, since
        // dropping one gives its room back (and raises `room` again).
        let mut unclaimed = Vec::new();
        {
            let mut queues = self.lock();
            for queue in queues.values_mut() {
                while let Some(head) = queue.peek() {
                    let placement = match self.registry.pick(
                        self.policy.as_ref(),
                        &head.features(),
                        &head.tried,
                    ) {
                        Pick::AllFull => break,
                        Pick::NoneEligible => None,
                        Pick::Placed(outstanding) => Some(placed(outstanding)),
                    };
                    let Some(waiter) = queue.pop() else { break };
                    self.queued.fetch_sub(1, Ordering::Relaxed);
                    if let Err(Some(placement)) = waiter.grant.send(placement) {
                        unclaimed.push(placement);
                    }
                }
            }
            // An empty queue stays (one per model that ever queued: only models some worker
            // serves get that far): a ticket names its place only within its queue's life, so
            // a queue made anew could hand a leaving request's stale ticket to another request.
        }
        drop(unclaimed);
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<str>, ClassQueue<Waiter>>> {
        // A panic while holding it leaves the queues consistent (every change is one call).
        self.queues.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Placed at once, without a wait.
fn placed(outstanding: Outstanding) -> Placement {
    Placement {
        outstanding,
        waited: None,
    }
}

/// A request's place in its model's queue, given back if its client leaves (the future is
/// dropped) before a worker is granted.
struct Queued<'a> {
    scheduler: &'a Scheduler,
    model: &'a str,
    ticket: Option<ClassTicket>,
}

impl Queued<'_> {
    /// Takes the request out of its queue; `false` if it was no longer queued (granted).
    fn leave(&mut self) -> bool {
        let Some(ticket) = self.ticket.take() else {
            return false;
        };
        let mut queues = self.scheduler.lock();
        let left = queues
            .get_mut(self.model)
            .and_then(|queue| queue.remove(ticket))
            .is_some();
        if left {
            self.scheduler.queued.fetch_sub(1, Ordering::Relaxed);
        }
        left
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.leave();
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll, Waker};

    use bytes::Bytes;
    use serde_json::value::RawValue;

    use super::*;
    use crate::router::{ModelCard, Worker};

    fn scheduler() -> Scheduler {
        let Ok(worker) = Worker::new("http://w") else {
            panic!("bad url")
        };
        let worker = worker.with_max_concurrency(1);
        let card = RawValue::from_string(r#"{"id":"m"}"#.to_owned()).ok();
        worker.set_models(
            card.map(|card| ModelCard {
                id: "m".to_owned(),
                max_model_len: None,
                card,
            })
            .into_iter()
            .collect(),
        );
        worker.set_healthy(true);
        let limits = QueueLimits {
            max_queued: 8,
            max_queued_per_tenant: 8,
            timeout: Duration::from_secs(60),
            batch_every: 10,
        };
        Scheduler::least_load(Arc::new(Registry::new(vec![Arc::new(worker)])), limits)
    }

    fn request() -> InferenceRequest {
        let body = Bytes::from_static(br#"{"model":"m","prompt":"x"}"#);
        match InferenceRequest::from_json(Endpoint::Completions, body, None) {
            Ok(request) => request,
            Err(error) => panic!("{error:?}"),
        }
    }

    /// Polls `future` once, as a runtime would when it is woken.
    fn poll<F: Future + Unpin>(future: &mut F) -> Poll<F::Output> {
        Pin::new(future).poll(&mut Context::from_waker(Waker::noop()))
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_dropped_once_granted_leaves_the_next_one_queued() {
        let scheduler = scheduler();
        let (request, claim) = (
            request(),
            Claim {
                tenant: "t".into(),
                weight: 1,
                class: Priority::Interactive,
                cost: 10,
            },
        );
        let held = scheduler.place(&request, &claim, &[]).await;
        assert!(matches!(held, Ok(Some(_))));
        let mut first = Box::pin(scheduler.place(&request, &claim, &[]));
        assert!(poll(&mut first).is_pending());
        // The worker frees up and the queue's head gets it, but its client leaves before it
        // sees the grant: the queue is empty meanwhile, and a second request queues.
        drop(held);
        scheduler.grant();
        let mut second = Box::pin(scheduler.place(&request, &claim, &[]));
        assert!(poll(&mut second).is_pending());
        assert_eq!(scheduler.queued(), 1);
        drop(first);
        // The first one's place went back to the worker; the second one takes it.
        assert_eq!(scheduler.queued(), 1);
        scheduler.grant();
        match poll(&mut second) {
            Poll::Ready(Ok(Some(placement))) => {
                assert_eq!(&*placement.outstanding.worker().url, "http://w")
            }
            other => panic!("{other:?}"),
        }
    }
}
