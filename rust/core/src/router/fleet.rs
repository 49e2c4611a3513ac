//! The fleet: the workers the configuration names, by URL or by a DNS name (`discovery`), made
//! into the registry's set, and changed while the gateway serves: when a name's addresses change
//! and when a reload brings another list.
//!
//! A worker the new set keeps (same URL and key) is the same object, with its health, circuit
//! breaker, learned capacity and requests in flight; only its limits follow the new entry. A new
//! worker enters unhealthy, so it takes requests once its first probe passes (the caller probes
//! it at once). A worker left out takes no new request; its requests in flight hold it and end as
//! they would have, metered once like any other. It does not resolve names itself (`discovery`
//! does) and does not probe.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use super::breaker::BreakerSettings;
use super::policies::Policies;
use super::registry::Registry;
use super::worker::Worker;
use crate::config::{ConfigError, RoutingConfig, WorkerConfig};

/// One worker the configuration asks for, its address resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Wanted {
    url: String,
    api_key: Option<String>,
    max_concurrency: Option<u32>,
}

/// What the fleet is made from: the entries as configured and the last addresses of each name.
#[derive(Debug)]
pub(super) struct Sources {
    pub(super) entries: Vec<WorkerConfig>,
    /// Each DNS entry's last good resolution, by its `dns` value; a failed one keeps the last.
    pub(super) resolved: BTreeMap<String, Vec<IpAddr>>,
    breaker: BreakerSettings,
    /// Whether a worker without `max_concurrency` learns its capacity.
    learns: bool,
}

#[derive(Debug)]
pub struct Fleet {
    registry: Arc<Registry>,
    policies: Arc<Policies>,
    pub(super) sources: Mutex<Sources>,
    /// Held by a `refresh` from its resolution to its probes.
    pub(super) refreshing: tokio::sync::Mutex<()>,
}

/// What one change did to the set.
#[derive(Debug, Default)]
pub struct Change {
    /// Workers new to the set: not probed yet, out of rotation until they are.
    pub added: Vec<Arc<Worker>>,
    pub removed: usize,
    /// Workers in the set now.
    pub workers: usize,
    /// Names whose resolution failed or found nothing (their last workers stayed).
    pub failures: usize,
}

/// Whether workers without `max_concurrency` learn their capacity under `routing`: learning
/// needs their reports, which only the load scrape reads.
fn learns(routing: &RoutingConfig) -> bool {
    routing.learn_capacity && routing.load_interval().is_some()
}

/// `http://ADDR:PORT` for an address of the name in `dns` (`http://NAME:PORT`).
pub(super) fn address_url(dns: &str, ip: IpAddr) -> Option<String> {
    let uri = dns.parse::<http::Uri>().ok()?;
    let port = uri.port_u16().unwrap_or(80);
    Some(match ip {
        IpAddr::V4(v4) => format!("http://{v4}:{port}"),
        IpAddr::V6(v6) => format!("http://[{v6}]:{port}"),
    })
}

impl Sources {
    /// Every worker wanted now, each URL once (the first entry naming it wins).
    fn wanted(&self) -> Vec<Wanted> {
        let mut wanted: Vec<Wanted> = Vec::new();
        for entry in &self.entries {
            let urls: Vec<String> = match (&entry.url, &entry.dns) {
                (Some(url), _) => vec![url.trim_end_matches('/').to_owned()],
                (None, Some(dns)) => self
                    .resolved
                    .get(dns)
                    .into_iter()
                    .flatten()
                    .filter_map(|&ip| address_url(dns, ip))
                    .collect(),
                (None, None) => Vec::new(),
            };
            for url in urls {
                if wanted.iter().all(|w| w.url != url) {
                    wanted.push(Wanted {
                        url,
                        api_key: entry.api_key.clone(),
                        max_concurrency: entry.max_concurrency,
                    });
                }
            }
        }
        wanted
    }

    fn build(&self, wanted: &Wanted) -> Result<Arc<Worker>, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            field: "workers",
            message,
        };
        let worker = Worker::new(&wanted.url)
            .map_err(|e| invalid(e.to_string()))?
            .with_breaker(self.breaker);
        let worker = match &wanted.api_key {
            Some(key) => worker
                .with_api_key(key)
                .map_err(|_| invalid("api_key is not a valid header value".to_owned()))?,
            None => worker,
        };
        let worker = match wanted.max_concurrency {
            Some(limit) => worker.with_max_concurrency(limit as usize),
            None if self.learns => worker.learning_capacity(),
            None => worker,
        };
        Ok(Arc::new(worker))
    }
}

impl Fleet {
    /// The fleet of `entries` over `registry` (emptied until `install`), routed by `policies`.
    pub fn new(
        entries: Vec<WorkerConfig>,
        routing: &RoutingConfig,
        registry: Arc<Registry>,
        policies: Arc<Policies>,
    ) -> Self {
        Self {
            registry,
            policies,
            sources: Mutex::new(Sources {
                entries,
                resolved: BTreeMap::new(),
                breaker: BreakerSettings::of(routing),
                learns: learns(routing),
            }),
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    /// Whether some entry is a DNS name (else there is nothing to resolve).
    pub fn has_names(&self) -> bool {
        self.lock().entries.iter().any(|e| e.dns.is_some())
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Sources> {
        // Every change to the sources is one assignment: a panic leaves them consistent.
        self.sources.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes the registry's set what the sources ask for now.
    pub fn install(&self) -> Result<Change, ConfigError> {
        let sources = self.lock();
        self.install_locked(&sources)
    }

    /// A reload: `entries` from now on, with `routing`'s `learn_capacity` (the circuit breaker's
    /// settings are the ones the fleet started with: a kept worker keeps its breaker's history).
    /// Names are resolved by the caller afterwards; until then a name keeps its last addresses.
    pub fn reconfigure(
        &self,
        entries: Vec<WorkerConfig>,
        routing: &RoutingConfig,
    ) -> Result<Change, ConfigError> {
        let mut sources = self.lock();
        let entries = std::mem::replace(&mut sources.entries, entries);
        let learned = std::mem::replace(&mut sources.learns, learns(routing));
        let change = match self.install_locked(&sources) {
            Ok(change) => change,
            Err(error) => {
                // Nothing was replaced: the old entries stay.
                sources.entries = entries;
                sources.learns = learned;
                return Err(error);
            }
        };
        let names: Vec<String> = sources
            .entries
            .iter()
            .filter_map(|e| e.dns.clone())
            .collect();
        sources.resolved.retain(|name, _| names.contains(name));
        Ok(change)
    }

    fn install_locked(&self, sources: &Sources) -> Result<Change, ConfigError> {
        let current = self.registry.workers();
        let wanted = sources.wanted();
        let mut next: Vec<Arc<Worker>> = Vec::with_capacity(wanted.len());
        let mut added = Vec::new();
        for want in &wanted {
            let kept = current
                .iter()
                .find(|w| *w.url == *want.url && w.api_key_matches(want.api_key.as_deref()));
            match kept {
                Some(worker) => {
                    worker.set_limits(want.max_concurrency.map(|l| l as usize), sources.learns);
                    next.push(worker.clone());
                }
                None => {
                    let worker = sources.build(want)?;
                    added.push(worker.clone());
                    next.push(worker);
                }
            }
        }
        let removed: Vec<&Arc<Worker>> = current
            .iter()
            .filter(|w| next.iter().all(|n| n.id != w.id))
            .collect();
        for worker in &removed {
            tracing::info!(
                worker = %worker.url,
                in_flight = worker.outstanding(),
                "worker left the fleet; its requests in flight finish"
            );
        }
        for worker in &added {
            tracing::info!(worker = %worker.url, "worker joined the fleet; in rotation once its probe passes");
        }
        let change = Change {
            removed: removed.len(),
            workers: next.len(),
            added,
            failures: 0,
        };
        if change.added.is_empty() && change.removed == 0 {
            // Same set: only limits may have changed, and `set_limits` applied them.
            self.registry.replace(next);
            return Ok(change);
        }
        // The ring first: a request placed in between on a new worker off the ring goes by
        // least load, and one whose worker left is skipped.
        self.policies.set_workers(&next);
        self.registry.replace(next);
        Ok(change)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(url: Option<&str>, dns: Option<&str>, limit: Option<u32>) -> WorkerConfig {
        WorkerConfig {
            url: url.map(str::to_owned),
            dns: dns.map(str::to_owned),
            api_key: None,
            max_concurrency: limit,
        }
    }

    fn routing() -> RoutingConfig {
        let document: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/common/config.json"))
                .unwrap_or_default();
        match serde_json::from_value(document["routing"].clone()) {
            Ok(routing) => routing,
            Err(error) => panic!("{error}"),
        }
    }

    fn fleet(entries: Vec<WorkerConfig>) -> (Fleet, Arc<Registry>) {
        let registry = Arc::new(Registry::new(Vec::new()));
        let policies = Arc::new(Policies::new(&routing(), &registry));
        let fleet = Fleet::new(entries, &routing(), registry.clone(), policies);
        (fleet, registry)
    }

    fn urls(registry: &Registry) -> Vec<String> {
        registry
            .workers()
            .iter()
            .map(|w| w.url.to_string())
            .collect()
    }

    #[test]
    fn a_kept_worker_is_the_same_worker_with_its_new_limits() {
        let (fleet, registry) = fleet(vec![
            entry(Some("http://a:1"), None, None),
            entry(Some("http://b:1"), None, Some(2)),
        ]);
        let first = fleet.install().map(|c| c.added.len()).unwrap_or_default();
        assert_eq!(first, 2);
        let b = registry.workers()[1].clone();
        let held = b.begin();
        let change = fleet.reconfigure(
            vec![
                entry(Some("http://b:1/"), None, Some(5)),
                entry(Some("http://c:1"), None, None),
            ],
            &routing(),
        );
        let change = change.unwrap_or_default();
        assert_eq!(
            (change.added.len(), change.removed, change.workers),
            (1, 1, 2)
        );
        assert_eq!(urls(&registry), ["http://b:1", "http://c:1"]);
        let kept = registry.workers()[0].clone();
        assert_eq!(kept.id, b.id);
        assert_eq!((kept.outstanding(), kept.capacity()), (1, Some(5)));
        drop(held);
        assert_eq!(kept.outstanding(), 0);
    }

    #[test]
    fn a_name_s_addresses_are_workers_each_url_once() {
        let dns = "http://workers.test:8001";
        let (fleet, registry) = fleet(vec![
            entry(None, Some(dns), Some(3)),
            entry(Some("http://10.0.0.2:8001"), None, None),
        ]);
        let ips: Vec<IpAddr> = ["10.0.0.1", "10.0.0.2", "::1"]
            .iter()
            .filter_map(|ip| ip.parse().ok())
            .collect();
        fleet.lock().resolved.insert(dns.to_owned(), ips);
        assert!(fleet.install().is_ok());
        assert_eq!(
            urls(&registry),
            [
                "http://10.0.0.1:8001",
                "http://10.0.0.2:8001",
                "http://[::1]:8001"
            ]
        );
        assert!(registry.workers().iter().all(|w| w.capacity() == Some(3)));
        // The name left the configuration: its addresses go with it.
        let change = fleet.reconfigure(
            vec![entry(Some("http://10.0.0.2:8001"), None, None)],
            &routing(),
        );
        assert_eq!(change.map(|c| c.removed).unwrap_or_default(), 2);
        assert_eq!(urls(&registry), ["http://10.0.0.2:8001"]);
        assert!(fleet.lock().resolved.is_empty());
    }
}
