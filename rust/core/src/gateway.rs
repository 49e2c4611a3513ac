//! The gateway as one object: build it from a config, start it, push keys, drain usage, reload
//! its configuration, stop it.
//!
//! Async methods run on the caller's tokio runtime; the Python binding owns that runtime.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::task::JoinHandle;

use crate::api::app;
use crate::auth::{KeyStore, SnapshotError};
use crate::coalesce::Coalescer;
use crate::config::GatewayConfig;
use crate::grpc::GrpcServer;
use crate::journal::{Ended, Journal, Options as JournalOptions};
use crate::ledger::UsageReader;
use crate::metering::{Meter, Refused, TOKENIZE_TIMEOUT};
use crate::quota::Quota;
use crate::router::{
    Change, Fleet, Policies, Registry, Resolver, probe, probe_all, run_health_checks,
    run_load_scrapes,
};
use crate::scheduler::{QueueLimits, Scheduler};
use crate::serve::ServerHandle;
use crate::state::{AppState, Readiness};
use crate::upstream::Upstream;

#[derive(Debug)]
pub struct Gateway {
    state: Arc<AppState>,
    server: Option<ServerHandle>,
    grpc: Option<GrpcServer>,
    /// The health loop and the load scrapes; aborted on shutdown and on drop.
    background: Vec<JoinHandle<()>>,
}

impl Gateway {
    /// The gateway of `config`: its workers given by URL are in the registry at once (to be
    /// probed at start), those given by a DNS name once `start` has resolved it.
    pub fn new(config: GatewayConfig) -> Result<Self, crate::config::ConfigError> {
        let registry = Arc::new(Registry::new(Vec::new()));
        let policies = Arc::new(Policies::new(&config.routing, &registry));
        let fleet = Arc::new(Fleet::new(
            config.workers.clone(),
            &config.routing,
            registry.clone(),
            policies.clone(),
        ));
        fleet.install()?;
        let meter = match &config.journal {
            None => Meter::default(),
            Some(settings) => {
                let (journal, recovered) =
                    Journal::open(Path::new(&settings.dir), JournalOptions::of(settings)).map_err(
                        |e| crate::config::ConfigError::Invalid {
                            field: "journal.dir",
                            message: e.to_string(),
                        },
                    )?;
                let progress = Duration::from_millis(settings.progress_interval_ms);
                Meter::with_journal(journal, recovered, progress)
            }
        };
        let state = AppState {
            upstream: Upstream::new(&config.routing),
            coalescer: Coalescer::new(
                config.routing.coalesce_windows(),
                config.routing.coalesce_max_prompts,
            ),
            scheduler: Scheduler::new(
                registry.clone(),
                Box::new(policies.clone()),
                QueueLimits::of(&config.routing),
            ),
            policies,
            registry,
            fleet,
            resolver: Arc::new(Resolver::default()),
            keys: KeyStore::default(),
            meter: Arc::new(meter),
            quota: Arc::new(Quota::new(config.quota.clone())),
            usage_reader: std::sync::OnceLock::new(),
            readiness: Readiness::default(),
            config: ArcSwap::from_pointee(config),
        };
        Ok(Self {
            state: Arc::new(state),
            server: None,
            grpc: None,
            background: Vec::new(),
        })
    }

    /// The control plane's handle on this gateway: keys, policies, usage. It never waits on
    /// start or shutdown.
    pub fn control(&self) -> Control {
        Control {
            state: self.state.clone(),
        }
    }

    /// Probes every worker once (so the model list is known before the first request), starts
    /// the health loop and the load scrapes, and binds. Returns the bound address.
    pub async fn start(&mut self) -> io::Result<SocketAddr> {
        if let Some(server) = &self.server {
            return Ok(server.local_addr());
        }
        let quota = self.state.quota.connect().map_err(io::Error::other)?;
        self.background.extend(quota);
        let config = self.state.config.load_full();
        if crate::telemetry::install(&config.telemetry).map_err(io::Error::other)? {
            tracing::info!(
                endpoint = config.telemetry.otlp_endpoint.as_deref(),
                "exporting traces"
            );
        }
        let interval = config.routing.health_interval();
        if self.state.fleet.has_names() {
            // Probes the workers it finds, too.
            rediscover(&self.state, &config.routing).await;
        }
        probe_all(
            &self.state.upstream,
            &self.state.registry,
            interval.max(Duration::from_millis(500)),
        )
        .await;
        let state = self.state.clone();
        self.background.push(tokio::spawn(run_health_checks(
            self.state.upstream.clone(),
            self.state.registry.clone(),
            move || state.config.load().routing.health_interval(),
        )));
        let state = self.state.clone();
        self.background
            .push(tokio::spawn(async move { state.scheduler.run().await }));
        let state = self.state.clone();
        self.background.push(tokio::spawn(run_load_scrapes(
            self.state.upstream.clone(),
            self.state.registry.clone(),
            move || state.config.load().routing.load_interval(),
        )));
        self.background
            .push(tokio::spawn(run_discovery(self.state.clone())));
        if let Some(listen) = config.grpc_listen {
            let grpc = GrpcServer::bind(listen, self.state.clone()).await?;
            tracing::info!(addr = %grpc.local_addr(), "gRPC API listening");
            self.grpc = Some(grpc);
        }
        let server = ServerHandle::bind(
            config.listen,
            app(self.state.clone()),
            config.header_read_timeout(),
        )
        .await?;
        let addr = server.local_addr();
        tracing::info!(%addr, "gateway listening");
        self.server = Some(server);
        self.state.readiness.serving();
        Ok(addr)
    }

    /// The gRPC API's bound address, once started with one.
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc.as_ref().map(GrpcServer::local_addr)
    }

    /// Turns readiness off (if `Control::drain` has not), stops accepting, drains in-flight
    /// requests for up to `grace`, then stops the background loops.
    /// Usage of every request, finished or cut off, is in the meter when this returns, and its
    /// spans (when tracing is on) at the collector, or given up after the export timeout.
    pub async fn shutdown(&mut self, grace: Duration) -> io::Result<()> {
        self.state.readiness.drain();
        let (grpc, server) = (self.grpc.take(), self.server.take());
        let grpc = async {
            if let Some(grpc) = grpc {
                grpc.shutdown(grace).await;
            }
        };
        let http = async {
            match server {
                Some(server) => server.shutdown(grace).await,
                None => Ok(()),
            }
        };
        let ((), result) = tokio::join!(grpc, http);
        // Requests the gateway is counting itself record their events within a few tokenize calls.
        if !self.state.meter.counts_settled(4 * TOKENIZE_TIMEOUT).await {
            tracing::warn!("usage events were still being counted at shutdown");
        }
        if !self.state.quota.flush(Duration::from_secs(5)).await {
            tracing::warn!(
                "quota settlements still unsent to Redis at shutdown; leases will expire"
            );
        }
        self.stop_background();
        // The spans of the last requests go to the collector before the process can exit.
        if crate::telemetry::on() {
            let _ = tokio::task::spawn_blocking(crate::telemetry::flush).await;
        }
        result
    }
}

/// Resolves the worker DNS names once and counts the names that failed (`Fleet::refresh`).
async fn rediscover(state: &AppState, routing: &crate::config::RoutingConfig) -> Change {
    let change = state
        .fleet
        .refresh(&state.resolver, routing, &state.upstream)
        .await;
    let metrics = state.meter.metrics();
    if change.failures > 0 {
        metrics.discovery_failed(change.failures);
    }
    metrics.discovery_round();
    change
}

/// Resolves the worker DNS names every `routing.discovery_interval_ms` (as the configuration in
/// effect says at each round) for the gateway's life.
async fn run_discovery(state: Arc<AppState>) {
    loop {
        let interval = state.config.load().routing.discovery_interval();
        tokio::time::sleep(interval).await;
        if state.fleet.has_names() {
            let config = state.config.load_full();
            rediscover(&state, &config.routing).await;
        }
    }
}

/// What a reload applied.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Reloaded {
    /// Workers in rotation or on their way (probed, not yet healthy) now.
    pub workers: usize,
    pub added: usize,
    pub removed: usize,
    /// Options the new document changes that need a restart: they keep their running value.
    pub restart_required: Vec<&'static str>,
}

/// What the control plane pushes into a gateway and pulls out of it, whatever the gateway's
/// lifecycle is doing.
#[derive(Debug, Clone)]
pub struct Control {
    state: Arc<AppState>,
}

/// A worker as the admin API shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct WorkerStatus {
    pub url: String,
    pub healthy: bool,
    /// Out of rotation by its circuit breaker (healthy or not).
    pub ejected: bool,
    /// Times its circuit breaker ejected it.
    pub ejections: u64,
    pub outstanding: usize,
    /// The gateway's requests it takes at once: its `max_concurrency` or the capacity learned
    /// from its reports; `None` when unbounded.
    pub capacity: Option<usize>,
    pub models: Vec<String>,
    /// What the worker reported at its last load scrape; `None` before one succeeded.
    pub load: Option<crate::router::Load>,
}

/// One tenant's requests waiting in one priority class of one model's queue.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct QueueStatus {
    pub model: String,
    pub tenant_id: String,
    pub class: &'static str,
    pub count: usize,
}

impl Control {
    /// Installs how the gRPC usage service reads the ledger; only the first call counts.
    pub fn set_usage_reader(&self, reader: Arc<dyn UsageReader>) -> bool {
        self.state.usage_reader.set(reader).is_ok()
    }

    /// Replaces every API key; returns how many there are.
    pub fn set_keys(&self, snapshot_json: &str) -> Result<usize, SnapshotError> {
        self.state.keys.replace_json(snapshot_json)
    }

    /// Replaces every quota policy and price; returns how many tenants and keys have a policy.
    pub fn set_policies(&self, snapshot_json: &str) -> Result<usize, serde_json::Error> {
        self.state.quota.set_policies_json(snapshot_json)
    }

    /// Seeds what the ledger says was spent in the current periods; returns how many entries.
    pub fn seed_spent(&self, entries_json: &str) -> Result<usize, serde_json::Error> {
        self.state.quota.seed_json(entries_json)
    }

    /// Turns readiness off: `/ready` answers 503, the gRPC health service NOT_SERVING, and every
    /// HTTP response carries `Connection: close`, while both listeners go on serving. True the
    /// first time only. `Gateway::shutdown` then closes the listeners.
    pub fn drain(&self) -> bool {
        self.state.readiness.drain()
    }

    /// Takes up to `max` recorded usage events, oldest first, each with its `seq`.
    pub fn drain_usage(&self, max: usize) -> Vec<Ended> {
        self.state.meter.drain(max)
    }

    /// Every drained event up to `seq` is in the ledger.
    pub fn usage_committed(&self, seq: u64) {
        self.state.meter.committed(seq);
    }

    /// Takes the counts of requests refused to known principals since the last call.
    pub fn drain_refusals(&self) -> Vec<Refused> {
        self.state.meter.refusals().drain()
    }

    pub fn pending_usage(&self) -> usize {
        self.state.meter.pending()
    }

    /// Applies what can change while serving of `config` (see `GatewayConfig::reloaded`): the
    /// workers (kept ones keep their state, new ones are probed at once and names resolved
    /// again), routing policies, queue limits, attempt timeouts and intervals. Nothing is applied
    /// when the new workers cannot be built. Requests in flight finish as they started.
    pub async fn reload(
        &self,
        config: GatewayConfig,
    ) -> Result<Reloaded, crate::config::ConfigError> {
        let state = &self.state;
        let (config, restart_required) = state.config.load().reloaded(config);
        let change = state
            .fleet
            .reconfigure(config.workers.clone(), &config.routing)?;
        let config = Arc::new(config);
        state.config.store(config.clone());
        state.policies.configure(&config.routing);
        state.scheduler.set_limits(QueueLimits::of(&config.routing));
        state.upstream.reconfigure(&config.routing);
        let timeout = config
            .routing
            .health_interval()
            .max(Duration::from_millis(500));
        futures_util::future::join_all(
            change
                .added
                .iter()
                .map(|worker| probe(&state.upstream, worker, timeout)),
        )
        .await;
        let (mut added, mut removed) = (change.added.len(), change.removed);
        if state.fleet.has_names() {
            let found = rediscover(state, &config.routing).await;
            added = added.saturating_add(found.added.len());
            removed = removed.saturating_add(found.removed);
        }
        let reloaded = Reloaded {
            workers: state.registry.workers().len(),
            added,
            removed,
            restart_required,
        };
        tracing::info!(
            workers = reloaded.workers,
            added = reloaded.added,
            removed = reloaded.removed,
            "configuration reloaded"
        );
        Ok(reloaded)
    }

    /// Requests waiting in the gateway's queues for a worker with room.
    pub fn queued(&self) -> usize {
        self.state.scheduler.queued()
    }

    /// The requests waiting now, by model, tenant and priority class.
    pub fn queues(&self) -> Vec<QueueStatus> {
        self.state
            .scheduler
            .queued_counts()
            .into_iter()
            .map(|sample| QueueStatus {
                model: sample.model.to_string(),
                tenant_id: sample.tenant.to_string(),
                class: sample.class.as_str(),
                count: sample.count,
            })
            .collect()
    }

    pub fn workers(&self) -> Vec<WorkerStatus> {
        self.state
            .registry
            .workers()
            .iter()
            .map(|w| (w, w.breaker_stats()))
            .map(|(w, breaker)| WorkerStatus {
                url: w.url.to_string(),
                healthy: w.is_healthy(),
                ejected: breaker.ejected,
                ejections: breaker.ejections,
                outstanding: w.outstanding(),
                capacity: w.capacity(),
                models: w.models().iter().map(|m| m.id.clone()).collect(),
                load: w.load(),
            })
            .collect()
    }
}

impl Gateway {
    fn stop_background(&mut self) {
        for task in self.background.drain(..) {
            task.abort();
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop_background();
    }
}
