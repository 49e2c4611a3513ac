//! One worker as the router sees it: address, health, circuit breaker, models served, requests in
//! flight and the load it last reported.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use http::{HeaderValue, Uri};
use serde_json::value::RawValue;
use tokio::sync::Notify;

use super::breaker::{Admission, Breaker, BreakerSettings, BreakerStats, Change};
use super::load::Load;
use crate::request::Endpoint;
use crate::upstream::Connections;

/// A model as a worker lists it in `/v1/models`: its id and the card exactly as sent.
#[derive(Debug)]
pub struct ModelCard {
    pub id: String,
    /// The context length vLLM reports (`max_model_len`), when it does.
    pub max_model_len: Option<u64>,
    pub card: Box<RawValue>,
}

/// A worker's identity for as long as it is in the registry and after (its requests in flight
/// hold it): never reused, unlike a place in the worker list, which a change of the fleet moves.
pub type WorkerId = u64;

/// The next worker's id. Relaxed: only uniqueness matters.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

#[derive(Debug)]
pub struct Worker {
    pub id: WorkerId,
    pub url: Arc<str>,
    /// `Bearer <api_key>` when the worker has a key of its own.
    pub(crate) authorization: Option<HeaderValue>,
    /// The `Host` its requests carry: host, and port unless the scheme's default (none for a
    /// URL without a host, which the client refuses).
    pub(crate) host: Option<HeaderValue>,
    /// Its connections: closed with the last reference to it.
    connections: Arc<Connections>,
    chat_uri: Uri,
    completions_uri: Uri,
    embeddings_uri: Uri,
    pub(crate) health_uri: Uri,
    pub(crate) models_uri: Uri,
    pub(crate) metrics_uri: Uri,
    pub(crate) tokenize_uri: Uri,
    // Relaxed everywhere below: each atomic is an independent hint read by the routing policy;
    // nothing else is published through it.
    healthy: AtomicBool,
    /// Ejects it while its answers fail; apart from `healthy`, which says whether it is up.
    breaker: Breaker,
    outstanding: AtomicUsize,
    /// The models of the last successful probe, kept while the worker is down so that a request
    /// for its model is answered 503 (temporarily unavailable), not 404 (no such model).
    models: ArcSwap<Vec<ModelCard>>,
    /// Whether a probe has ever read this worker's model list.
    listed: AtomicBool,
    /// The last scraped [`Load`], packed so that one load reads a consistent snapshot;
    /// [`NO_LOAD`] when unknown.
    load: AtomicU64,
    /// Tokens per block of its KV cache, as its `/metrics` last said; 0 while unknown.
    block_size: AtomicU32,
    /// The `system_fingerprint` (raw JSON value) of the worker's last stream that carried one.
    fingerprint: ArcSwapOption<Bytes>,
    /// The gateway's requests it takes at once; 0: no limit. A reload may change it (Relaxed,
    /// like the load).
    max_concurrency: AtomicUsize,
    /// Whether, without a `max_concurrency`, its capacity is learned from the load it reports.
    learns: AtomicBool,
    /// The capacity learned from its reports: 0 while it has not been seen full. Relaxed like
    /// the load it comes from.
    learned: AtomicUsize,
    /// Raised when it may have gained room: one of its requests ended, or it came back up.
    room: OnceLock<Arc<Notify>>,
}

const NO_LOAD: u64 = u64::MAX;
const COUNT_BITS: u32 = 22;
const COUNT_MAX: u32 = (1 << COUNT_BITS) - 1;
const KV_BITS: u32 = 20;
/// KV-cache use is kept in millionths: a small model on a large cache uses a few millionths of
/// it, which must not read as zero.
const KV_MILLIONTHS: f64 = 1_000_000.0;

/// Packs running (22 bits), waiting (22 bits) and KV-cache use in millionths (20 bits).
fn pack(load: Load) -> u64 {
    let running = u64::from(load.running.min(COUNT_MAX));
    let waiting = u64::from(load.waiting.min(COUNT_MAX));
    let kv = (load.kv_cache_usage.clamp(0.0, 1.0) * KV_MILLIONTHS).round() as u64;
    (running << (COUNT_BITS + KV_BITS)) | (waiting << KV_BITS) | kv
}

fn unpack(packed: u64) -> Option<Load> {
    let mask = u64::from(COUNT_MAX);
    (packed != NO_LOAD).then(|| Load {
        running: ((packed >> (COUNT_BITS + KV_BITS)) & mask) as u32,
        waiting: ((packed >> KV_BITS) & mask) as u32,
        kv_cache_usage: (packed & ((1 << KV_BITS) - 1)) as f64 / KV_MILLIONTHS,
    })
}

impl Worker {
    pub fn new(url: &str) -> Result<Self, http::uri::InvalidUri> {
        let base = url.trim_end_matches('/');
        let uri = |path: &str| format!("{base}{path}").parse::<Uri>();
        let completions_uri = uri(Endpoint::Completions.path())?;
        Ok(Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            url: base.into(),
            authorization: None,
            host: crate::upstream::host(&completions_uri),
            connections: Arc::new(Connections::new(&completions_uri)),
            chat_uri: uri(Endpoint::ChatCompletions.path())?,
            completions_uri,
            embeddings_uri: uri(Endpoint::Embeddings.path())?,
            health_uri: uri("/health")?,
            models_uri: uri("/v1/models")?,
            metrics_uri: uri("/metrics")?,
            tokenize_uri: uri("/tokenize")?,
            healthy: AtomicBool::new(false),
            breaker: Breaker::new(BreakerSettings::OFF),
            outstanding: AtomicUsize::new(0),
            models: ArcSwap::from_pointee(Vec::new()),
            listed: AtomicBool::new(false),
            load: AtomicU64::new(NO_LOAD),
            block_size: AtomicU32::new(0),
            fingerprint: ArcSwapOption::empty(),
            max_concurrency: AtomicUsize::new(0),
            learns: AtomicBool::new(false),
            learned: AtomicUsize::new(0),
            room: OnceLock::new(),
        })
    }

    /// Takes at most `limit` of the gateway's requests at once (at least 1).
    pub fn with_max_concurrency(self, limit: usize) -> Self {
        self.max_concurrency.store(limit.max(1), Ordering::Relaxed);
        self
    }

    /// Without a `max_concurrency`, learns its capacity from the load it reports (see
    /// [`Worker::set_load`]).
    pub fn learning_capacity(self) -> Self {
        let learns = self.max_concurrency().is_none();
        self.learns.store(learns, Ordering::Relaxed);
        self
    }

    /// A reload's new limits for a worker it keeps: at most `limit` requests at once (at least
    /// 1), or none, learned from its reports when `learn`. What it learned so far stays.
    pub fn set_limits(&self, limit: Option<usize>, learn: bool) {
        self.max_concurrency
            .store(limit.map_or(0, |l| l.max(1)), Ordering::Relaxed);
        self.learns
            .store(learn && limit.is_none(), Ordering::Relaxed);
        self.gained_room();
    }

    /// Ejected by a circuit breaker with these `settings` (without one it never is).
    pub fn with_breaker(mut self, settings: BreakerSettings) -> Self {
        self.breaker = Breaker::new(settings);
        self
    }

    pub fn max_concurrency(&self) -> Option<usize> {
        Some(self.max_concurrency.load(Ordering::Relaxed)).filter(|&limit| limit > 0)
    }

    fn learns(&self) -> bool {
        self.learns.load(Ordering::Relaxed)
    }

    /// Whether it may ever be full: it has a `max_concurrency`, or learns its capacity.
    pub fn is_bounded(&self) -> bool {
        self.max_concurrency().is_some() || self.learns()
    }

    /// The gateway's requests it takes at once now: its `max_concurrency`, else what it has
    /// learned; `None` when unbounded.
    pub fn capacity(&self) -> Option<usize> {
        self.max_concurrency().or_else(|| {
            let learned = self.learned.load(Ordering::Relaxed);
            (learned > 0).then_some(learned)
        })
    }

    /// Whether it takes another request now: under its capacity, if it has one.
    pub fn has_room(&self) -> bool {
        self.capacity()
            .is_none_or(|limit| self.outstanding() < limit)
    }

    /// Raises `room` whenever this worker may have gained room (the first call sets it).
    pub fn notify_room(&self, room: Arc<Notify>) {
        let _ = self.room.set(room);
    }

    fn gained_room(&self) {
        if self.is_bounded()
            && let Some(room) = self.room.get()
        {
            room.notify_one();
        }
    }

    /// Sends `Authorization: Bearer <api_key>` to this worker; a key that is not a valid header
    /// value is refused.
    pub fn with_api_key(mut self, api_key: &str) -> Result<Self, http::header::InvalidHeaderValue> {
        let mut value = HeaderValue::from_str(&format!("Bearer {api_key}"))?;
        value.set_sensitive(true);
        self.authorization = Some(value);
        Ok(self)
    }

    /// Whether it sends `api_key` (or none, for `None`) to its worker.
    pub fn api_key_matches(&self, api_key: Option<&str>) -> bool {
        match (&self.authorization, api_key) {
            (None, None) => true,
            (Some(sent), Some(key)) => {
                sent.as_bytes().strip_prefix(b"Bearer ") == Some(key.as_bytes())
            }
            _ => false,
        }
    }

    /// Where its requests go, for `Upstream::post_json`.
    pub fn to(&self) -> crate::upstream::To<'_> {
        crate::upstream::To {
            worker: &self.url,
            host: self.host.as_ref(),
            authorization: self.authorization.as_ref(),
            connections: &self.connections,
        }
    }

    pub fn uri(&self, endpoint: Endpoint) -> Uri {
        match endpoint {
            Endpoint::ChatCompletions => self.chat_uri.clone(),
            Endpoint::Completions => self.completions_uri.clone(),
            Endpoint::Embeddings => self.embeddings_uri.clone(),
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn set_healthy(&self, healthy: bool) {
        let was = self.healthy.swap(healthy, Ordering::Relaxed);
        if was != healthy {
            tracing::info!(worker = %self.url, healthy, "worker health changed");
            self.gained_room();
        }
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// Whether its circuit breaker lets a request in (see `breaker`).
    pub fn admission(&self) -> Admission {
        self.breaker.admission()
    }

    pub fn breaker_stats(&self) -> BreakerStats {
        self.breaker.stats()
    }

    /// Feeds one request's outcome to the breaker and logs what that changed.
    fn report(&self, failed: bool, trial: bool) {
        match self.breaker.record(failed, trial) {
            None => {}
            Some(Change::Ejected { trip, backoff }) => tracing::warn!(
                worker = %self.url,
                reason = %trip,
                backoff_ms = backoff.as_millis() as u64,
                "worker ejected by its circuit breaker; a trial request after the backoff decides its return"
            ),
            Some(Change::Returned { out_for }) => {
                tracing::info!(
                    worker = %self.url,
                    out_for_ms = out_for.as_millis() as u64,
                    "worker returned to rotation: its trial request was answered"
                );
                self.gained_room();
            }
        }
    }

    pub fn serves(&self, model: &str) -> bool {
        self.models.load().iter().any(|m| m.id == model)
    }

    pub fn models(&self) -> arc_swap::Guard<Arc<Vec<ModelCard>>> {
        self.models.load()
    }

    pub fn set_models(&self, models: Vec<ModelCard>) {
        self.models.store(Arc::new(models));
        self.listed.store(true, Ordering::Relaxed);
    }

    /// Whether its model list is known: a worker still starting up (vLLM takes a while to load)
    /// may serve any model.
    pub fn has_listed(&self) -> bool {
        self.listed.load(Ordering::Relaxed)
    }

    /// What the worker reported at its last successful scrape of `/metrics`.
    pub fn load(&self) -> Option<Load> {
        unpack(self.load.load(Ordering::Relaxed))
    }

    /// Stores the load the worker reported (`None`: unknown). A worker that learns its
    /// capacity is full while it reports requests waiting in its own queue: its capacity becomes
    /// the gateway's requests on it less those waiting (at least 1). A report of none waiting
    /// raises a learned capacity by a quarter (at least 1); once the gateway has fewer than half
    /// of it in flight, the worker is unbounded again until it next queues.
    pub fn set_load(&self, load: Option<Load>) {
        self.load
            .store(load.map_or(NO_LOAD, pack), Ordering::Relaxed);
        let Some(load) = load.filter(|_| self.learns()) else {
            return;
        };
        let outstanding = self.outstanding();
        let learned = self.learned.load(Ordering::Relaxed);
        let next = if load.waiting > 0 {
            outstanding.saturating_sub(load.waiting as usize).max(1)
        } else if learned == 0 || outstanding.saturating_mul(2) < learned {
            0
        } else {
            learned.saturating_add((learned / 4).max(1))
        };
        self.learned.store(next, Ordering::Relaxed);
        if learned > 0 && (next == 0 || next > learned) {
            self.gained_room();
        }
    }

    /// Tokens per block of its KV cache (`vllm:cache_config_info{block_size}`), once a scrape
    /// has read it.
    pub fn block_size(&self) -> Option<u32> {
        Some(self.block_size.load(Ordering::Relaxed)).filter(|&size| size > 0)
    }

    pub fn set_block_size(&self, size: u32) {
        self.block_size.store(size, Ordering::Relaxed);
    }

    /// The worker's `system_fingerprint` as its last stream reported it (a raw JSON value); it
    /// changes only when the worker restarts with another configuration.
    pub fn fingerprint(&self) -> Option<Arc<Bytes>> {
        self.fingerprint.load_full()
    }

    pub fn set_fingerprint(&self, fingerprint: Bytes) {
        if self.fingerprint.load().as_deref() != Some(&fingerprint) {
            self.fingerprint.store(Some(Arc::new(fingerprint)));
        }
    }

    /// Counts a request against this worker whether or not it has room, for tests that set up
    /// a load; a request is placed with `try_begin`.
    #[cfg(test)]
    pub(crate) fn begin(self: &Arc<Self>) -> Outstanding {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        self.counted()
    }

    /// Counts a request against this worker until the returned guard drops, only if it has
    /// room: the check and the count are one step, so requests placed at once never take it
    /// past its capacity. When its circuit breaker is half-open, the request is its trial.
    pub fn try_begin(self: &Arc<Self>) -> Option<Outstanding> {
        let capacity = self.capacity();
        self.outstanding
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |outstanding| {
                capacity
                    .is_none_or(|limit| outstanding < limit)
                    .then_some(outstanding + 1)
            })
            .ok()?;
        Some(self.counted())
    }

    /// The guard of a request just counted in `outstanding`.
    fn counted(self: &Arc<Self>) -> Outstanding {
        let trial = self.breaker.claim_trial();
        if trial {
            tracing::info!(worker = %self.url, "worker half-open: a trial request goes to it");
        }
        Outstanding {
            worker: self.clone(),
            trial,
        }
    }
}

/// One request in flight on a worker; it reports the request's outcome to the worker's circuit
/// breaker.
#[derive(Debug)]
pub struct Outstanding {
    worker: Arc<Worker>,
    /// Whether it is the worker's trial and its outcome is not in yet.
    trial: bool,
}

impl Outstanding {
    pub fn worker(&self) -> &Arc<Worker> {
        &self.worker
    }

    /// The worker answered: a status below 500 (a 4xx is the client's fault), or a stream's first
    /// event.
    pub fn answered(&mut self) {
        self.worker.report(false, std::mem::take(&mut self.trial));
    }

    /// The worker failed the request: a 5xx, a broken connection, no answer in time, or a
    /// stream that broke off. A connection it refused is not reported: that worker is down,
    /// which its health checks handle.
    pub fn failed(&mut self) {
        self.worker.report(true, std::mem::take(&mut self.trial));
    }
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        if self.trial {
            // Neither answered nor failed: the client left, or the worker was not reached.
            self.worker.breaker.abandon_trial();
        }
        self.worker.outstanding.fetch_sub(1, Ordering::Relaxed);
        self.worker.gained_room();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_header_names_the_port_unless_it_is_the_scheme_s_default() {
        let host = |url: &str| {
            Worker::new(url)
                .ok()
                .and_then(|worker| worker.host)
                .and_then(|value| value.to_str().ok().map(str::to_owned))
        };
        assert_eq!(host("http://10.0.0.7:8000/"), Some("10.0.0.7:8000".into()));
        assert_eq!(host("http://vllm-0.svc"), Some("vllm-0.svc".into()));
        assert_eq!(host("http://vllm-0.svc:80"), Some("vllm-0.svc".into()));
        assert_eq!(host("https://w.example:443"), Some("w.example".into()));
        assert_eq!(host("https://w.example:80"), Some("w.example:80".into()));
        assert_eq!(host("http://[::1]:9000"), Some("[::1]:9000".into()));
    }

    #[test]
    fn load_round_trips_through_its_packing() {
        let Ok(worker) = Worker::new("http://w") else {
            panic!("bad url")
        };
        assert_eq!(worker.load(), None);
        let load = Load {
            running: 1_000,
            waiting: 70_000,
            kv_cache_usage: 0.5,
        };
        worker.set_load(Some(load));
        assert_eq!(worker.load(), Some(load));
        worker.set_load(Some(Load {
            kv_cache_usage: 3e-6,
            ..load
        }));
        assert_eq!(worker.load().map(|l| l.kv_cache_usage), Some(3e-6));
        worker.set_load(Some(Load {
            running: u32::MAX,
            waiting: 0,
            kv_cache_usage: 1.0,
        }));
        assert_eq!(
            worker.load().map(|l| (l.running, l.kv_cache_usage)),
            Some((COUNT_MAX, 1.0))
        );
        worker.set_load(None);
        assert_eq!(worker.load(), None);
    }

    #[test]
    fn capacity_is_learned_from_the_worker_s_own_queue() {
        let Ok(worker) = Worker::new("http://w") else {
            panic!("bad url")
        };
        let worker = Arc::new(worker.learning_capacity());
        let report = |waiting| {
            Some(Load {
                running: 4,
                waiting,
                kv_cache_usage: 0.5,
            })
        };
        let held: Vec<_> = (0..6).map(|_| worker.begin()).collect();
        worker.set_load(report(0));
        assert_eq!(worker.capacity(), None, "never seen full: unbounded");
        // Two of our six wait in its queue: it runs four of ours.
        worker.set_load(report(2));
        assert_eq!(worker.capacity(), Some(4));
        assert!(!worker.has_room());
        // No queue any more: a quarter more (at least one), each report.
        worker.set_load(report(0));
        assert_eq!(worker.capacity(), Some(5));
        worker.set_load(None);
        assert_eq!(
            worker.capacity(),
            Some(5),
            "an unknown load teaches nothing"
        );
        // A queue of other clients' requests longer than ours: at least one.
        worker.set_load(report(u32::MAX));
        assert_eq!(worker.capacity(), Some(1));
        // Far below what it learned: unbounded again.
        drop(held);
        worker.set_load(report(0));
        assert_eq!(worker.capacity(), None);
        assert!(worker.has_room());
    }

    #[test]
    fn a_request_is_counted_only_while_there_is_room_even_when_placed_at_once() {
        let Ok(worker) = Worker::new("http://w") else {
            panic!("bad url")
        };
        let worker = Arc::new(worker.with_max_concurrency(2));
        let first = worker.try_begin();
        let second = worker.try_begin();
        assert!(first.is_some() && second.is_some());
        assert!(worker.try_begin().is_none());
        assert_eq!(worker.outstanding(), 2);
        drop(first);
        assert!(worker.try_begin().is_some());
        drop(second);
        // Four threads placing on it at once: never more than its two at a time.
        let most = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..20_000 {
                        if let Some(_placed) = worker.try_begin() {
                            most.fetch_max(worker.outstanding(), Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert!(most.load(Ordering::Relaxed) <= 2, "{most:?} at once");
        assert_eq!(worker.outstanding(), 0);
    }

    #[test]
    fn a_configured_limit_is_never_learned_over() {
        let Ok(worker) = Worker::new("http://w") else {
            panic!("bad url")
        };
        let worker = Arc::new(worker.with_max_concurrency(3).learning_capacity());
        let _held = worker.begin();
        worker.set_load(Some(Load {
            running: 1,
            waiting: 5,
            kv_cache_usage: 0.0,
        }));
        assert_eq!(worker.capacity(), Some(3));
        assert!(worker.is_bounded());
    }
}
