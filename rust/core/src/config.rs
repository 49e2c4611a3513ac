//! The gateway's configuration document: what the control plane hands the core, resolved.
//!
//! The control plane owns every default, bound and its documentation (python/gateway/config.py,
//! whose `core_document()` writes this document with every member set). Here nothing has a
//! default: a member missing is an error, as is an unknown one, so the two sides cannot drift
//! apart silently. `validate` keeps only the invariants the core's own code relies on. It does not
//! read files.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

/// One worker to route to, a `vllm serve` (or `gateway sim`) base URL; or a DNS name whose
/// addresses are as many workers (`router::discovery`). Exactly one of `url` and `dns`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    pub url: Option<String>,
    /// `http://NAME:PORT`: each A and AAAA address of NAME is the worker `http://ADDR:PORT`.
    pub dns: Option<String>,
    /// The worker's own key (`vllm serve --api-key`), sent as `Authorization: Bearer` on every
    /// request and probe to it. Tenants' keys never reach workers.
    pub api_key: Option<String>,
    /// The gateway's requests it takes at once; past it, requests wait in the gateway's queue.
    pub max_concurrency: Option<u32>,
}

/// Most requests a circuit breaker's window holds (one bit each in a `u64`).
pub const MAX_BREAKER_WINDOW: u32 = 64;

/// Which worker serves a request, among those eligible (see `router::Policies`).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    /// The least-loaded worker.
    LeastLoad,
    /// The worker a consistent hash of the prompt's prefix (or the session) names, within a
    /// bound on its load.
    PrefixAffinity,
    /// Each worker in turn.
    RoundRobin,
}

/// Routing settings of one model, over `RoutingConfig`'s.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ModelRoutingConfig {
    /// `None`: `RoutingConfig::policy`.
    pub policy: Option<PolicyKind>,
    /// `None`: `RoutingConfig::coalesce_window_us`.
    pub coalesce_window_us: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// Period of the `/health` + `/v1/models` probe of every worker.
    pub health_interval_ms: u64,
    /// Period of the `/metrics` scrape that reads each worker's running and waiting requests and
    /// KV-cache use for routing; 0 routes on the gateway's own in-flight counts alone.
    pub load_interval_ms: u64,
    /// TCP connect timeout to a worker; a worker that does not accept in time is tried elsewhere.
    pub connect_timeout_ms: u64,
    /// How long one attempt may wait for a worker's answer: headers and then the first event of
    /// a stream, or the whole body otherwise.
    pub request_timeout_ms: u64,
    /// How long a started stream may go without a byte from its worker before it is cut.
    pub stream_idle_timeout_ms: u64,
    /// How many workers one request may be tried on before the first byte reaches the client.
    pub max_attempts: u32,
    /// How long a request may wait in the gateway's queue for a worker with room.
    pub queue_timeout_ms: u64,
    /// Requests one model's queue holds at most, and at most of one tenant.
    pub max_queued: u32,
    pub max_queued_per_tenant: u32,
    /// While `batch` requests wait, one grant in this many goes to them.
    pub batch_every: u32,
    /// Whether a worker without `max_concurrency` learns its capacity from the requests it
    /// reports waiting in its own queue.
    pub learn_capacity: bool,
    /// The circuit breaker (`router::breaker`): failures in a row that eject a worker (0: off).
    pub breaker_consecutive_failures: u32,
    /// Outcomes the failure rate is taken over, at most 64 (0: no rate trigger).
    pub breaker_window: u32,
    /// Outcomes in the window before its rate can eject.
    pub breaker_min_requests: u32,
    /// Failures, in percent of the window, that eject (1 to 100).
    pub breaker_failure_percent: u32,
    /// The first ejection's length; each ejection in a row doubles it, up to the maximum.
    pub breaker_backoff_ms: u64,
    pub breaker_max_backoff_ms: u64,
    /// The policy of every model without one of its own in `models`.
    pub policy: PolicyKind,
    /// `prefix_affinity`'s bound: a worker takes a request while its load is under
    /// `max(ceil(affinity_load_factor × (total load + 1) / workers), affinity_load_floor)`.
    pub affinity_load_factor: f64,
    pub affinity_load_floor: u32,
    /// Compatible non-streaming completions reaching one worker within this window go to it as
    /// one call (`coalesce`); 0 sends each on its own.
    pub coalesce_window_us: u64,
    /// Most prompts one coalesced call carries.
    pub coalesce_max_prompts: u32,
    /// Per model (by its name as requests give it), what differs from the above.
    pub models: BTreeMap<String, ModelRoutingConfig>,
    /// Period of the resolution of the workers given by a DNS name.
    pub discovery_interval_ms: u64,
    /// The name servers those names are resolved with; empty: the system's (`/etc/resolv.conf`).
    pub dns_servers: Vec<SocketAddr>,
}

impl RoutingConfig {
    pub fn health_interval(&self) -> Duration {
        Duration::from_millis(self.health_interval_ms.max(10))
    }
    pub fn load_interval(&self) -> Option<Duration> {
        (self.load_interval_ms > 0).then(|| Duration::from_millis(self.load_interval_ms.max(10)))
    }
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms.max(1))
    }
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms.max(1))
    }
    /// Each model's coalescing window where it differs from `coalesce_window_us`, which is the
    /// rest's (zero: off).
    pub fn coalesce_windows(&self) -> (Duration, BTreeMap<String, Duration>) {
        let by_model = self
            .models
            .iter()
            .filter_map(|(model, settings)| {
                let window = settings.coalesce_window_us?;
                Some((model.clone(), Duration::from_micros(window)))
            })
            .collect();
        (Duration::from_micros(self.coalesce_window_us), by_model)
    }

    pub fn stream_idle_timeout(&self) -> Duration {
        Duration::from_millis(self.stream_idle_timeout_ms.max(1))
    }

    pub fn discovery_interval(&self) -> Duration {
        Duration::from_millis(self.discovery_interval_ms.max(100))
    }

    fn validate_breaker(&self) -> Result<(), ConfigError> {
        let invalid = |field, message: &str| {
            Err(ConfigError::Invalid {
                field,
                message: message.to_owned(),
            })
        };
        if self.breaker_window > MAX_BREAKER_WINDOW {
            return invalid("routing.breaker_window", "must be at most 64");
        }
        if self.breaker_min_requests == 0
            || (self.breaker_window > 0 && self.breaker_min_requests > self.breaker_window)
        {
            return invalid(
                "routing.breaker_min_requests",
                "must be at least 1 and at most routing.breaker_window",
            );
        }
        if !(1..=100).contains(&self.breaker_failure_percent) {
            return invalid("routing.breaker_failure_percent", "must be 1 to 100");
        }
        if self.breaker_backoff_ms == 0 {
            return invalid("routing.breaker_backoff_ms", "must be at least 1");
        }
        if self.breaker_max_backoff_ms < self.breaker_backoff_ms {
            return invalid(
                "routing.breaker_max_backoff_ms",
                "must be at least routing.breaker_backoff_ms",
            );
        }
        Ok(())
    }
}

/// What admission does with a kind of limit while Redis cannot be reached.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WhenRedisDown {
    /// Refuse (503): budgets fail closed by default.
    Reject,
    /// Skip the check.
    Allow,
    /// Enforce `1 / replicas` of the limit in this process.
    LocalShare,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    /// Where the counters live when several replicas share them; `None` keeps them in process.
    pub redis_url: Option<String>,
    /// Prefix of every Redis key the gateway writes.
    pub redis_prefix: String,
    /// How long one admission waits for Redis before it counts as unreachable.
    pub redis_timeout_ms: u64,
    /// Replicas sharing the counters; each enforces `1 / replicas` of a limit when Redis is down.
    pub replicas: u32,
    /// Budgets (token and money) while Redis is unreachable: `reject` or `allow`.
    pub budgets_when_redis_down: WhenRedisDown,
    /// Rate and concurrency limits while Redis is unreachable: `local_share` or `allow`.
    pub rate_limits_when_redis_down: WhenRedisDown,
    /// How long a request's hold and concurrency slot live in Redis when its replica dies before
    /// releasing them.
    pub lease_ms: u64,
    /// Completion tokens reserved for a request without `max_tokens` when the model's context
    /// length is unknown.
    pub default_max_tokens: u64,
}

impl QuotaConfig {
    pub fn redis_timeout(&self) -> Duration {
        Duration::from_millis(self.redis_timeout_ms.max(1))
    }
}

/// The durable usage journal.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct JournalConfig {
    /// Its directory; one gateway process at a time.
    pub dir: String,
    /// Size past which a segment is sealed and a new one begun.
    pub segment_bytes: u64,
    /// How often a running request's usage goes to the journal: an interrupted request is billed
    /// for what it had relayed at most this long before the process died.
    pub progress_interval_ms: u64,
    /// When a written event is safe from a machine that stops.
    pub sync: Durability,
    /// How long a written event may stay unsynced, and a request's start and progress unwritten.
    pub sync_interval_ms: u64,
}

/// When a written usage event is safe from a machine that stops (`journal::writer`'s
/// documentation says how each works).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Synced every `sync_interval_ms`; no response waits for a disk.
    Interval,
    /// Synced before each response's last bytes leave.
    Always,
}

/// OpenTelemetry traces (the `telemetry` module's), resolved by the control plane from the file and
/// the standard `OTEL_*` variables.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// The OTLP/gRPC collector (`http://host:4317`); without one, no span is built.
    pub otlp_endpoint: Option<String>,
    /// The share of new traces sampled, 0 to 1; a client's sampled trace context is honoured.
    pub sample_ratio: f64,
    /// The `service.name` of the exported spans.
    pub service_name: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    /// How long a client may take to send a request's headers.
    pub header_read_timeout_ms: u64,
    /// How long a client may take to send a request's body once its headers are in.
    pub body_read_timeout_ms: u64,
    pub workers: Vec<WorkerConfig>,
    pub routing: RoutingConfig,
    pub quota: QuotaConfig,
    /// Without one, usage events live in memory until the control plane drains them.
    pub journal: Option<JournalConfig>,
    /// Where the gRPC API listens; without it, there is none.
    pub grpc_listen: Option<SocketAddr>,
    pub telemetry: TelemetryConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid gateway configuration: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("invalid gateway configuration: {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

impl GatewayConfig {
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms.max(1))
    }

    pub fn body_read_timeout(&self) -> Duration {
        Duration::from_millis(self.body_read_timeout_ms.max(1))
    }

    /// What a running gateway applies of `new` (a reload): the workers, the routing policies,
    /// queue limits, the timeouts of an attempt and of a connect, intervals and DNS settings;
    /// and, kept at their running value, the options that need a restart, named in the list
    /// returned when `new` changes them: the listeners and their read limits (bound at start),
    /// the journal and the quota's store (opened at start), tracing (installed once per
    /// process), the coalescing windows (the coalescer's), and the circuit breaker's settings (a
    /// kept worker keeps its breaker's history, whose window they size).
    pub fn reloaded(&self, new: Self) -> (Self, Vec<&'static str>) {
        let mut kept = Vec::new();
        let mut effective = new;
        macro_rules! keep {
            ($($field:ident).+, $name:literal) => {
                if effective.$($field).+ != self.$($field).+ {
                    kept.push($name);
                    effective.$($field).+ = self.$($field).+.clone();
                }
            };
        }
        keep!(listen, "server.host/server.port");
        keep!(grpc_listen, "grpc.host/grpc.port");
        keep!(max_body_bytes, "server.max_body_bytes");
        keep!(header_read_timeout_ms, "server.header_read_timeout_ms");
        keep!(body_read_timeout_ms, "server.body_read_timeout_ms");
        keep!(journal, "journal");
        keep!(quota, "quota");
        keep!(telemetry, "telemetry");
        keep!(routing.coalesce_max_prompts, "routing.coalesce_max_prompts");
        if effective.routing.coalesce_windows() != self.routing.coalesce_windows() {
            kept.push("routing.coalesce_window_us/routing.models.*.coalesce_window_us");
            effective.routing.coalesce_window_us = self.routing.coalesce_window_us;
            for (model, settings) in &mut effective.routing.models {
                settings.coalesce_window_us = self
                    .routing
                    .models
                    .get(model)
                    .and_then(|m| m.coalesce_window_us);
            }
        }
        keep!(
            routing.breaker_consecutive_failures,
            "routing.breaker_consecutive_failures"
        );
        keep!(routing.breaker_window, "routing.breaker_window");
        keep!(routing.breaker_min_requests, "routing.breaker_min_requests");
        keep!(
            routing.breaker_failure_percent,
            "routing.breaker_failure_percent"
        );
        keep!(routing.breaker_backoff_ms, "routing.breaker_backoff_ms");
        keep!(
            routing.breaker_max_backoff_ms,
            "routing.breaker_max_backoff_ms"
        );
        (effective, kept)
    }

    /// Parses and validates the JSON document.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let config: Self = serde_json::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, message: &str| ConfigError::Invalid {
            field,
            message: message.to_owned(),
        };
        if self.workers.is_empty() {
            return Err(invalid("workers", "at least one worker is required"));
        }
        for worker in &self.workers {
            let (field, url) = match (&worker.url, &worker.dns) {
                (Some(url), None) => ("workers.url", url),
                (None, Some(dns)) => ("workers.dns", dns),
                _ => {
                    return Err(invalid(
                        "workers",
                        "each worker has exactly one of `url` and `dns`",
                    ));
                }
            };
            let parsed = url.parse::<http::Uri>();
            if parsed.is_err() || !url.starts_with("http://") {
                return Err(ConfigError::Invalid {
                    field,
                    message: format!("{url:?} is not an http:// URL"),
                });
            }
            if field == "workers.dns"
                && parsed
                    .ok()
                    .and_then(|uri| uri.host().map(|h| h.parse::<std::net::IpAddr>().is_ok()))
                    .unwrap_or(true)
            {
                return Err(ConfigError::Invalid {
                    field,
                    message: format!("{url:?} does not name a host to resolve"),
                });
            }
        }
        if self.routing.max_attempts == 0 {
            return Err(invalid("routing.max_attempts", "must be at least 1"));
        }
        self.routing.validate_breaker()?;
        // Below 1 the bound could leave no worker under it; NaN compares false everywhere.
        if !(1.0..=100.0).contains(&self.routing.affinity_load_factor) {
            return Err(invalid(
                "routing.affinity_load_factor",
                "must be between 1 and 100",
            ));
        }
        let quota = &self.quota;
        if quota.replicas == 0 {
            return Err(invalid("quota.replicas", "must be at least 1"));
        }
        if quota.budgets_when_redis_down == WhenRedisDown::LocalShare {
            return Err(invalid(
                "quota.budgets_when_redis_down",
                "must be `reject` or `allow`: a budget has no per-replica share",
            ));
        }
        if quota.rate_limits_when_redis_down == WhenRedisDown::Reject {
            return Err(invalid(
                "quota.rate_limits_when_redis_down",
                "must be `local_share` or `allow`",
            ));
        }
        if quota.redis_url.as_deref().is_some_and(|url| {
            !["redis://", "rediss://", "unix://"]
                .iter()
                .any(|s| url.starts_with(s))
        }) {
            return Err(invalid(
                "quota.redis_url",
                "must be a redis://, rediss:// or unix:// URL",
            ));
        }
        if self.max_body_bytes < 1024 {
            return Err(invalid("max_body_bytes", "must be at least 1024"));
        }
        self.telemetry.validate()
    }
}

impl TelemetryConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, message: &str| ConfigError::Invalid {
            field,
            message: message.to_owned(),
        };
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(invalid("telemetry.sample_ratio", "must be between 0 and 1"));
        }
        if self.otlp_endpoint.as_deref().is_some_and(|url| {
            url.len() > 2048 || !url.starts_with("http://") || url.parse::<http::Uri>().is_err()
        }) {
            return Err(invalid(
                "telemetry.otlp_endpoint",
                "must be an http:// URL of an OTLP/gRPC collector",
            ));
        }
        if self.service_name.is_empty() || self.service_name.len() > 256 {
            return Err(invalid(
                "telemetry.service_name",
                "must be 1 to 256 characters",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The control plane's document for one worker, every member set (as
    /// `rust/core/tests/common/config.json`, which a Python test keeps equal to what
    /// `core_document()` writes).
    const RESOLVED: &str = include_str!("../tests/common/config.json");

    fn document() -> serde_json::Value {
        serde_json::from_str(RESOLVED).unwrap_or_default()
    }

    #[test]
    fn the_resolved_document_is_read_as_it_is() {
        let config = GatewayConfig::from_json(RESOLVED).ok();
        assert_eq!(config.as_ref().map(|c| c.routing.max_attempts), Some(3));
        assert_eq!(
            config.map(|c| c.routing.policy),
            Some(PolicyKind::LeastLoad)
        );
    }

    #[test]
    fn a_model_gets_a_policy_of_its_own() {
        let mut doc = document();
        doc["routing"]["models"] = serde_json::json!({
            "tiny": {"policy": "prefix_affinity", "coalesce_window_us": null},
            "b": {"policy": "round_robin", "coalesce_window_us": 0},
            "c": {"policy": null, "coalesce_window_us": 500},
        });
        let config = GatewayConfig::from_json(&doc.to_string()).ok();
        let policies: Option<Vec<_>> = config.map(|c| {
            c.routing
                .models
                .iter()
                .map(|(model, routing)| (model.clone(), routing.policy))
                .collect()
        });
        assert_eq!(
            policies,
            Some(vec![
                ("b".to_owned(), Some(PolicyKind::RoundRobin)),
                ("c".to_owned(), None),
                ("tiny".to_owned(), Some(PolicyKind::PrefixAffinity))
            ])
        );
    }

    #[test]
    fn a_model_s_coalescing_window_overrides_the_default() {
        let mut doc = document();
        doc["routing"]["coalesce_window_us"] = serde_json::json!(200);
        doc["routing"]["models"] = serde_json::json!({
            "off": {"policy": null, "coalesce_window_us": 0},
            "longer": {"policy": null, "coalesce_window_us": 5000},
            "as-default": {"policy": "round_robin", "coalesce_window_us": null},
        });
        let windows = GatewayConfig::from_json(&doc.to_string())
            .ok()
            .map(|c| c.routing.coalesce_windows());
        let micros = |us| Duration::from_micros(us);
        assert_eq!(
            windows,
            Some((
                micros(200),
                BTreeMap::from([
                    ("longer".to_owned(), micros(5000)),
                    ("off".to_owned(), micros(0))
                ])
            ))
        );
    }

    #[test]
    fn a_missing_member_is_named_not_defaulted() {
        for (section, member) in [
            (None, "max_body_bytes"),
            (Some("routing"), "max_attempts"),
            (Some("quota"), "lease_ms"),
        ] {
            let mut doc = document();
            let object = match section {
                Some(name) => doc[name].as_object_mut(),
                None => doc.as_object_mut(),
            };
            object.map(|o| o.remove(member));
            let err = GatewayConfig::from_json(&doc.to_string())
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains(member), "{member}: {err}");
        }
    }

    #[test]
    fn unknown_field_is_named() {
        let mut doc = document();
        doc["retries"] = 3.into();
        let err = GatewayConfig::from_json(&doc.to_string())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("retries"), "{err}");
    }

    #[test]
    fn rejects_bad_worker_url_and_empty_fleet() {
        let mut empty = document();
        empty["workers"] = serde_json::json!([]);
        let mut ftp = document();
        ftp["workers"] = serde_json::json!([{"url": "ftp://x", "api_key": null}]);
        let mut no_attempts = document();
        no_attempts["routing"]["max_attempts"] = 0.into();
        let mut loose_bound = document();
        loose_bound["routing"]["affinity_load_factor"] = 0.99.into();
        let mut unknown_policy = document();
        unknown_policy["routing"]["models"] = serde_json::json!({"m": {"policy": "random"}});
        for doc in [empty, ftp, no_attempts, loose_bound, unknown_policy] {
            assert!(GatewayConfig::from_json(&doc.to_string()).is_err(), "{doc}");
        }
    }

    #[test]
    fn a_reload_keeps_what_needs_a_restart_and_names_it() {
        let running = GatewayConfig::from_json(RESOLVED).ok();
        let mut doc = document();
        doc["listen"] = "127.0.0.1:9999".into();
        doc["routing"]["policy"] = "round_robin".into();
        doc["routing"]["max_queued"] = 7.into();
        doc["routing"]["breaker_window"] = 10.into();
        doc["routing"]["coalesce_window_us"] = 300.into();
        doc["workers"] = serde_json::json!([{"dns": "http://w.test:80", "api_key": null}]);
        let new = GatewayConfig::from_json(&doc.to_string()).ok();
        let Some((effective, kept)) = running.as_ref().zip(new).map(|(r, n)| r.reloaded(n)) else {
            panic!("documents do not parse")
        };
        assert_eq!(
            kept,
            [
                "server.host/server.port",
                "routing.coalesce_window_us/routing.models.*.coalesce_window_us",
                "routing.breaker_window"
            ]
        );
        assert_eq!(Some(effective.listen), running.as_ref().map(|r| r.listen));
        assert_eq!(effective.routing.breaker_window, 20);
        assert_eq!(effective.routing.coalesce_window_us, 0);
        assert_eq!(effective.routing.policy, PolicyKind::RoundRobin);
        assert_eq!(effective.routing.max_queued, 7);
        assert_eq!(
            effective.workers[0].dns.as_deref(),
            Some("http://w.test:80")
        );
        let unchanged = running.map(|r| r.reloaded(r.clone()).1);
        assert_eq!(unchanged, Some(Vec::new()));
    }

    #[test]
    fn a_worker_has_a_url_or_a_dns_name_not_both_nor_an_address_as_a_name() {
        for workers in [
            serde_json::json!([{"url": "http://a:1", "dns": "http://b:1"}]),
            serde_json::json!([{"api_key": null}]),
            serde_json::json!([{"dns": "http://10.0.0.1:80"}]),
            serde_json::json!([{"dns": "ftp://b:1"}]),
        ] {
            let mut doc = document();
            doc["workers"] = workers.clone();
            let err = GatewayConfig::from_json(&doc.to_string())
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains("workers"), "{workers}: {err}");
        }
    }

    #[test]
    fn breaker_settings_out_of_range_are_named() {
        for (member, value) in [
            ("breaker_window", 65),
            ("breaker_min_requests", 0),
            ("breaker_min_requests", 21),
            ("breaker_failure_percent", 0),
            ("breaker_failure_percent", 101),
            ("breaker_backoff_ms", 0),
            ("breaker_max_backoff_ms", 10),
        ] {
            let mut doc = document();
            doc["routing"][member] = value.into();
            let err = GatewayConfig::from_json(&doc.to_string())
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains(member), "{member} = {value}: {err}");
        }
        let mut rate_off = document();
        rate_off["routing"]["breaker_window"] = 0.into();
        rate_off["routing"]["breaker_min_requests"] = 21.into();
        assert!(GatewayConfig::from_json(&rate_off.to_string()).is_ok());
    }
}
