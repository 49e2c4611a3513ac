//! The scheduler's cost when there is no contention: one `Scheduler::place` plus the release of
//! its `Placement` (the request ends), for a model four idle workers serve, on a current-thread
//! tokio runtime. Not measured: HTTP, the worker's answer, contention between threads, and the
//! wake-up of a `run` task on another thread of a multi-thread runtime.
//!
//!     cargo bench -p gateway-core --bench scheduler
//!
//! Criterion groups:
//! - `place+release`: workers unbounded (no lock, no queue), bounded with room (the lockless
//!   path while nothing is queued), learning their capacity without having learned one, and
//!   bounded while another model's request is queued (the locked path);
//! - `place+release+grant pass`: bounded with room, with the scheduler's `run` task spawned, so
//!   that each release wakes it and it looks for queued requests to grant; the iteration yields
//!   to let it run, and `yield alone` is that yield's own cost, to subtract;
//! - `policy`: `Registry::pick` with `LeastLoad` alone (its choice, and the request counted on
//!   the worker and released), the routing policy's share.
//!
//! Run by `cargo test` (no `--bench` argument), criterion runs each case once.

#![expect(
    clippy::unwrap_used,
    reason = "a benchmark fails loudly on a bad fixture"
)]

use std::hint::black_box;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use gateway_core::request::{Endpoint, InferenceRequest, Priority};
use gateway_core::router::{Features, LeastLoad, ModelCard, Pick, Registry, Worker};
use gateway_core::scheduler::{Claim, QueueLimits, Scheduler};
use serde_json::value::RawValue;
use tokio::runtime::Runtime;

/// Workers serving the measured model.
const WORKERS: usize = 4;

/// How a worker bounds the gateway's requests on it.
#[derive(Clone, Copy)]
enum Bound {
    None,
    MaxConcurrency(usize),
    Learning,
}

fn worker(url: &str, model: &str, bound: Bound) -> Arc<Worker> {
    let worker = Worker::new(url).unwrap();
    let worker = match bound {
        Bound::None => worker,
        Bound::MaxConcurrency(limit) => worker.with_max_concurrency(limit),
        Bound::Learning => worker.learning_capacity(),
    };
    worker.set_models(vec![ModelCard {
        id: model.to_owned(),
        max_model_len: None,
        card: RawValue::from_string(format!(r#"{{"id":"{model}"}}"#)).unwrap(),
    }]);
    worker.set_healthy(true);
    Arc::new(worker)
}

/// `WORKERS` workers serving `m` bounded by `bound`, then `others`.
fn registry(bound: Bound, others: Vec<Arc<Worker>>) -> Arc<Registry> {
    let mut workers: Vec<_> = (0..WORKERS)
        .map(|i| worker(&format!("http://w{i}"), "m", bound))
        .collect();
    workers.extend(others);
    Arc::new(Registry::new(workers))
}

fn scheduler(registry: Arc<Registry>) -> Scheduler {
    let limits = QueueLimits {
        max_queued: 1024,
        max_queued_per_tenant: 1024,
        // Longer than any run: a parked request stays queued.
        timeout: Duration::from_secs(86_400),
        batch_every: 10,
    };
    Scheduler::least_load(registry, limits)
}

fn request(model: &str) -> InferenceRequest {
    let body = format!(r#"{{"model":"{model}","prompt":"Say hello."}}"#);
    InferenceRequest::from_json(Endpoint::Completions, Bytes::from(body), None).unwrap()
}

fn claim() -> Claim {
    Claim {
        tenant: "ten_bench".into(),
        weight: 1,
        class: Priority::Interactive,
        cost: 64,
    }
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Polls `future` once, as a runtime would when it is woken.
fn poll<F: Future + Unpin>(future: &mut F) -> Poll<F::Output> {
    Pin::new(future).poll(&mut Context::from_waker(Waker::noop()))
}

/// The workers of `registry` have no request of the gateway's left on them.
fn all_released(registry: &Registry) {
    for worker in registry.workers().iter() {
        assert_eq!(worker.outstanding(), 0, "{}", worker.url);
    }
}

/// Measures place + release of requests for `m` on `scheduler`, as `name` in `group`.
fn place_release(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    runtime: &Runtime,
    scheduler: &Scheduler,
) {
    let (request, claim) = (request("m"), claim());
    group.bench_function(name, |b| {
        b.to_async(runtime).iter(|| async {
            let placement = scheduler.place(&request, &claim, &[]).await.unwrap();
            let placement = placement.unwrap();
            assert!(placement.waited.is_none());
            placement.outstanding.worker().id
        });
    });
}

fn idle(c: &mut Criterion) {
    let runtime = runtime();
    let mut group = c.benchmark_group("place+release");
    group.bench_function("baseline: empty async iteration", |b| {
        b.to_async(&runtime).iter(|| async {});
    });
    for (name, bound) in [
        ("unbounded", Bound::None),
        ("bounded, idle", Bound::MaxConcurrency(64)),
        ("learning, idle", Bound::Learning),
    ] {
        let registry = registry(bound, Vec::new());
        let scheduler = scheduler(registry.clone());
        place_release(&mut group, name, &runtime, &scheduler);
        all_released(&registry);
        assert_eq!(scheduler.queued(), 0);
    }

    // A second model, `n`, whose only worker is full: one of its requests is on it, the next
    // waits in the queue, so every placement for `m` takes the queues' lock.
    let full = worker("http://full", "n", Bound::MaxConcurrency(1));
    let registry = registry(Bound::MaxConcurrency(64), vec![full]);
    let scheduler = scheduler(registry.clone());
    let (request_n, claim) = (request("n"), claim());
    let held = runtime
        .block_on(scheduler.place(&request_n, &claim, &[]))
        .unwrap()
        .unwrap();
    assert_eq!(&*held.outstanding.worker().url, "http://full");
    let mut parked = {
        // Its queue wait starts a timer: it needs the runtime's context.
        let _context = runtime.enter();
        let mut parked = Box::pin(scheduler.place(&request_n, &claim, &[]));
        assert!(poll(&mut parked).is_pending());
        parked
    };
    assert_eq!(scheduler.queued(), 1);
    place_release(
        &mut group,
        "bounded, queue not empty elsewhere",
        &runtime,
        &scheduler,
    );
    assert_eq!(scheduler.queued(), 1, "the parked request is still queued");
    assert!(poll(&mut parked).is_pending());
    drop(parked);
    drop(held);
    all_released(&registry);
    assert_eq!(scheduler.queued(), 0);
    group.finish();
}

fn grant_pass(c: &mut Criterion) {
    let runtime = runtime();
    let mut group = c.benchmark_group("place+release+grant pass");
    let registry = registry(Bound::MaxConcurrency(64), Vec::new());
    let scheduler = Arc::new(scheduler(registry.clone()));
    let run = {
        let scheduler = scheduler.clone();
        runtime.spawn(async move { scheduler.run().await })
    };
    group.bench_function("yield alone", |b| {
        b.to_async(&runtime).iter(tokio::task::yield_now);
    });
    let (request, claim) = (request("m"), claim());
    group.bench_function("bounded, idle", |b| {
        b.to_async(&runtime).iter(|| async {
            let placement = scheduler.place(&request, &claim, &[]).await.unwrap();
            drop(placement.unwrap());
            // The release woke `run`: let it look for requests to grant.
            tokio::task::yield_now().await;
        });
    });
    run.abort();
    all_released(&registry);
    group.finish();
}

fn policy(c: &mut Criterion) {
    let mut group = c.benchmark_group("policy");
    let registry = registry(Bound::None, Vec::new());
    let policy = LeastLoad::default();
    let request = request("m");
    let features = Features::of(&request);
    group.bench_function("Registry::pick, LeastLoad", |b| {
        b.iter(|| match registry.pick(&policy, black_box(&features), &[]) {
            Pick::Placed(placed) => placed.worker().id,
            Pick::AllFull | Pick::NoneEligible => panic!("no worker placed"),
        });
    });
    group.finish();
}

criterion_group!(benches, idle, grant_pass, policy);
criterion_main!(benches);
