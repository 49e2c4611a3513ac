//! The scheduler: each attempt of an admitted request is placed on a worker the routing policy
//! chooses among the eligible workers with room. A worker has room while the gateway's requests
//! on it are under its `max_concurrency` (no limit when unset). When every eligible worker is
//! full, the request waits in its model's queue, in tenant-fair order (`fair`), until a request
//! on one of them ends, its wait runs out (429 `queue_timeout`), or its client leaves (its place
//! is freed at once and no worker sees it). A full queue refuses at once (429 `queue_full`).
//!
//! With no `max_concurrency` set on any worker, nothing is ever queued and a placement is what it
//! was without a scheduler: the policy's choice, counted on the worker.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use super::fair::{FairQueue, Ticket};
use crate::config::RoutingConfig;
use crate::error::ApiError;
use crate::request::{Endpoint, InferenceRequest};
use crate::router::{Features, LeastLoad, Outstanding, OwnedPrefix, Pick, Registry, RoutingPolicy};

/// The bounds of every model's queue.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    /// Requests a model's queue holds at most.
    pub max_queued: usize,
    /// Requests of one tenant a model's queue holds at most.
    pub max_queued_per_tenant: usize,
    /// How long a request may wait for a worker.
    pub timeout: Duration,
}

impl QueueLimits {
    pub fn of(routing: &RoutingConfig) -> Self {
        Self {
            max_queued: routing.max_queued as usize,
            max_queued_per_tenant: routing.max_queued_per_tenant as usize,
            timeout: Duration::from_millis(routing.queue_timeout_ms.max(1)),
        }
    }
}

/// A request placed on a worker: counted there until `outstanding` drops.
#[derive(Debug)]
pub struct Placement {
    /// The worker's place in the registry.
    pub index: usize,
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
    tried: Vec<usize>,
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
    limits: QueueLimits,
    /// Whether any worker has a `max_concurrency`: without one nothing is ever queued.
    bounded: bool,
    queues: Mutex<HashMap<Arc<str>, FairQueue<Waiter>>>,
    /// Requests queued over every model. Relaxed: a gauge and a hint; the queues' mutex orders
    /// everything else.
    queued: AtomicUsize,
    /// Raised when a worker may have gained room (a request on it ended, it came back up):
    /// `run` then hands freed places to the queues' heads.
    room: Arc<Notify>,
}

impl Scheduler {
    pub fn new(
        registry: Arc<Registry>,
        policy: Box<dyn RoutingPolicy>,
        limits: QueueLimits,
    ) -> Self {
        let room = Arc::new(Notify::new());
        let mut bounded = false;
        for worker in registry.workers() {
            bounded |= worker.max_concurrency().is_some();
            worker.notify_room(room.clone());
        }
        Self {
            registry,
            policy,
            limits,
            bounded,
            queues: Mutex::new(HashMap::new()),
            queued: AtomicUsize::new(0),
            room,
        }
    }

    /// Least-loaded routing over `registry`, queues bounded by `limits`.
    pub fn least_load(registry: Arc<Registry>, limits: QueueLimits) -> Self {
        Self::new(registry, Box::new(LeastLoad::default()), limits)
    }

    /// Requests waiting for a worker, over every model.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Each model's queued requests, for models that have a queue now.
    pub fn queued_by_model(&self) -> Vec<(Arc<str>, usize)> {
        if !self.bounded {
            return Vec::new();
        }
        let queues = self.lock();
        queues
            .iter()
            .map(|(model, queue)| (model.clone(), queue.len()))
            .collect()
    }

    /// Places the next attempt at `request` for `tenant` (`cost`: its estimated tokens), never on
    /// a worker whose registry index is in `tried`; waits in the model's queue while every
    /// eligible worker is full, at most until `deadline` or the queue's timeout. `Ok(None)` when
    /// no eligible worker is left.
    pub async fn place(
        &self,
        request: &InferenceRequest,
        tenant: &Arc<str>,
        cost: u64,
        tried: &[usize],
    ) -> Result<Option<Placement>, ApiError> {
        let features = Features::of(request);
        if !self.bounded {
            // Every worker always has room: nothing to queue, nor to lock.
            return Ok(
                match self.registry.pick(self.policy.as_ref(), &features, tried) {
                    Pick::Placed(index, worker) => Some(Placement {
                        index,
                        outstanding: worker.begin(),
                        waited: None,
                    }),
                    Pick::AllFull | Pick::NoneEligible => None,
                },
            );
        }
        let (ticket, mut granted) = {
            let mut queues = self.lock();
            let model_queue = queues.get(request.model.as_str());
            if model_queue.is_none_or(FairQueue::is_empty) {
                match self.registry.pick(self.policy.as_ref(), &features, tried) {
                    Pick::Placed(index, worker) => {
                        return Ok(Some(Placement {
                            index,
                            outstanding: worker.begin(),
                            waited: None,
                        }));
                    }
                    Pick::NoneEligible => return Ok(None),
                    Pick::AllFull => {}
                }
            }
            let queue = queues.entry(Arc::from(request.model.as_str())).or_default();
            if queue.len() >= self.limits.max_queued
                || queue.queued(tenant) >= self.limits.max_queued_per_tenant
            {
                return Err(ApiError::QueueFull {
                    retry_after: self.limits.timeout.min(Duration::from_secs(1)),
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
            (queue.push(tenant, cost, 1, waiter), granted)
        };
        let mut place = Queued {
            scheduler: self,
            model: &request.model,
            ticket: Some(ticket),
        };
        let started = Instant::now();
        let granted = match tokio::time::timeout(self.limits.timeout, &mut granted).await {
            Ok(granted) => granted,
            Err(_) if place.leave() => {
                return Err(ApiError::QueueTimeout {
                    waited: started.elapsed(),
                    retry_after: self.limits.timeout.min(Duration::from_secs(1)),
                });
            }
            // Granted as the wait ran out: the place is in the channel already.
            Err(_) => granted.await,
        };
        place.ticket = None;
        Ok(granted.ok().flatten().map(|placement| Placement {
            waited: Some(started.elapsed()),
            ..placement
        }))
    }

    /// Hands freed places to the queues' heads whenever a worker may have gained room. Runs for
    /// the gateway's life.
    pub async fn run(&self) {
        if !self.bounded {
            return;
        }
        loop {
            self.room.notified().await;
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
                        Pick::Placed(index, worker) => Some(Placement {
                            index,
                            outstanding: worker.begin(),
                            waited: None,
                        }),
                    };
                    let Some(waiter) = queue.pop() else { break };
                    self.queued.fetch_sub(1, Ordering::Relaxed);
                    if let Err(Some(placement)) = waiter.grant.send(placement) {
                        unclaimed.push(placement);
                    }
                }
            }
            queues.retain(|_, queue| !queue.is_empty());
        }
        drop(unclaimed);
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<str>, FairQueue<Waiter>>> {
        // A panic while holding it leaves the queues consistent (every change is one call).
        self.queues.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A request's place in its model's queue, given back if its client leaves (the future is
/// dropped) before a worker is granted.
struct Queued<'a> {
    scheduler: &'a Scheduler,
    model: &'a str,
    ticket: Option<Ticket>,
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
