//! DNS discovery: each `[[workers]] dns = "http://NAME:PORT"` entry is resolved to all of NAME's
//! A and AAAA addresses (a Kubernetes headless Service lists one per ready pod) every
//! `routing.discovery_interval_ms`, and the fleet (`fleet`) made of what was found. New workers
//! are probed at once, so they enter rotation as soon as they answer.
//!
//! A resolution that fails, or finds no address, keeps the name's last addresses: a DNS server
//! that is briefly unreachable, or a Service whose endpoints flap to empty during a rollout, must
//! not empty the fleet, while a worker that really went away is taken out by its failed health
//! probes anyway. Each such resolution is logged and counted
//! (`tokengate_discovery_failures_total`). Answers are not cached here: every round asks the
//! server, so a change shows within one interval whatever the records' TTL.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use futures_util::future::join_all;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;

use super::fleet::{Change, Fleet};
use super::health::probe;
use crate::config::RoutingConfig;
use crate::upstream::Upstream;

/// How long one resolution may take, over all its tries.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// The resolver of worker names, built for the configured name servers.
#[derive(Debug, Default)]
pub struct Resolver {
    /// With the servers it asks; rebuilt when a reload changes them.
    current: ArcSwapOption<(Vec<SocketAddr>, TokioResolver)>,
}

fn build(servers: &[SocketAddr]) -> Result<TokioResolver, String> {
    let mut builder = if servers.is_empty() {
        TokioResolver::builder_tokio()
            .map_err(|e| format!("reading the system's resolver configuration: {e}"))?
    } else {
        let name_servers = servers
            .iter()
            .map(|server| {
                let mut config = NameServerConfig::udp_and_tcp(server.ip());
                for connection in &mut config.connections {
                    connection.port = server.port();
                }
                config
            })
            .collect();
        TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(name_servers),
            TokioRuntimeProvider::default(),
        )
    };
    let options = builder.options_mut();
    options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    options.cache_size = 0;
    options.timeout = RESOLVE_TIMEOUT / 2;
    options.attempts = 2;
    builder.build().map_err(|e| e.to_string())
}

impl Resolver {
    /// The resolver for `servers` (the system's when empty), built at its first use.
    fn for_servers(
        &self,
        servers: &[SocketAddr],
    ) -> Result<Arc<(Vec<SocketAddr>, TokioResolver)>, String> {
        if let Some(current) = self.current.load_full()
            && current.0 == servers
        {
            return Ok(current);
        }
        let built = Arc::new((servers.to_vec(), build(servers)?));
        self.current.store(Some(built.clone()));
        Ok(built)
    }
}

/// The host to resolve in `dns` (`http://NAME:PORT`).
fn host(dns: &str) -> Option<String> {
    let uri = dns.parse::<http::Uri>().ok()?;
    uri.host().map(str::to_owned)
}

/// Every address of `dns`'s host, sorted, each once; an error when there is none.
async fn resolve(resolver: &TokioResolver, dns: &str) -> Result<Vec<IpAddr>, String> {
    let host = host(dns).ok_or_else(|| "no host to resolve".to_owned())?;
    let lookup = tokio::time::timeout(RESOLVE_TIMEOUT * 2, resolver.lookup_ip(host.as_str()))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let mut ips: Vec<IpAddr> = lookup.iter().collect();
    ips.sort_unstable();
    ips.dedup();
    if ips.is_empty() {
        return Err("no address".to_owned());
    }
    Ok(ips)
}

impl Fleet {
    /// Resolves every name once, installs the set found and probes its new workers (so they are
    /// in rotation as soon as they answer). One refresh at a time: a reload's waits for the
    /// discovery round's.
    pub async fn refresh(
        &self,
        resolver: &Resolver,
        routing: &RoutingConfig,
        upstream: &Upstream,
    ) -> Change {
        let _one_at_a_time = self.refreshing.lock().await;
        let mut failures = 0usize;
        let names: Vec<String> = self
            .lock()
            .entries
            .iter()
            .filter_map(|entry| entry.dns.clone())
            .collect();
        if !names.is_empty() {
            match resolver.for_servers(&routing.dns_servers) {
                Ok(current) => {
                    let found = join_all(names.iter().map(|dns| resolve(&current.1, dns))).await;
                    let mut sources = self.lock();
                    for (dns, found) in names.iter().zip(found) {
                        match found {
                            Ok(ips) => {
                                sources.resolved.insert(dns.clone(), ips);
                            }
                            Err(error) => {
                                failures += 1;
                                let kept = sources.resolved.get(dns).map_or(0, Vec::len);
                                tracing::warn!(name = %dns, %error, kept, "worker name not resolved; its last known workers stay");
                            }
                        }
                    }
                }
                Err(error) => {
                    for dns in &names {
                        failures += 1;
                        tracing::warn!(name = %dns, %error, "worker name not resolved; its last known workers stay");
                    }
                }
            }
        }
        let change = match self.install() {
            Ok(change) => change,
            Err(error) => {
                tracing::error!(%error, "the workers found could not be installed");
                return Change {
                    failures,
                    ..Change::default()
                };
            }
        };
        let timeout = routing.health_interval().max(Duration::from_millis(500));
        join_all(
            change
                .added
                .iter()
                .map(|worker| probe(upstream, worker, timeout)),
        )
        .await;
        Change { failures, ..change }
    }
}
