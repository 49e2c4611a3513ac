//! The gateway's configuration document: what the control plane hands the core, validated once.
//!
//! The control plane owns defaults and documentation (python/gateway/config.py); this struct
//! rejects unknown fields so a typo never passes silently. It does not read files.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

/// One worker to route to: a `vllm serve` (or `gateway sim`) base URL.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    pub url: String,
    /// The worker's own key (`vllm serve --api-key`), sent as `Authorization: Bearer` on every
    /// request and probe to it. Tenants' keys never reach workers.
    #[serde(default)]
    pub api_key: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
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
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            health_interval_ms: 500,
            load_interval_ms: 100,
            connect_timeout_ms: 1_000,
            request_timeout_ms: 600_000,
            stream_idle_timeout_ms: 60_000,
            max_attempts: 3,
        }
    }
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
    pub fn stream_idle_timeout(&self) -> Duration {
        Duration::from_millis(self.stream_idle_timeout_ms.max(1))
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
#[serde(deny_unknown_fields, default)]
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

impl Default for QuotaConfig {
    fn default() -> Self {
        Self {
            redis_url: None,
            redis_prefix: "tg:".to_owned(),
            redis_timeout_ms: 100,
            replicas: 1,
            budgets_when_redis_down: WhenRedisDown::Reject,
            rate_limits_when_redis_down: WhenRedisDown::LocalShare,
            lease_ms: 900_000,
            default_max_tokens: 4096,
        }
    }
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
    #[serde(default = "default_segment_bytes")]
    pub segment_bytes: u64,
    /// How often a running request's usage goes to the journal: an interrupted request is billed
    /// for what it had relayed at most this long before the process died.
    #[serde(default = "default_progress_interval_ms")]
    pub progress_interval_ms: u64,
}

fn default_progress_interval_ms() -> u64 {
    100
}

fn default_segment_bytes() -> u64 {
    16 * 1024 * 1024
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// How long a client may take to send a request's headers.
    #[serde(default = "default_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// How long a client may take to send a request's body once its headers are in.
    #[serde(default = "default_read_timeout_ms")]
    pub body_read_timeout_ms: u64,
    pub workers: Vec<WorkerConfig>,
    #[serde(default)]
    pub routing: RoutingConfig,
    #[serde(default)]
    pub quota: QuotaConfig,
    /// Without one, usage events live in memory until the control plane drains them.
    #[serde(default)]
    pub journal: Option<JournalConfig>,
    /// Where the gRPC API listens; without it, there is none.
    #[serde(default)]
    pub grpc_listen: Option<SocketAddr>,
}

fn default_max_body_bytes() -> usize {
    4 * 1024 * 1024
}

fn default_read_timeout_ms() -> u64 {
    30_000
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
            if worker.url.parse::<http::Uri>().is_err() || !worker.url.starts_with("http://") {
                return Err(ConfigError::Invalid {
                    field: "workers.url",
                    message: format!("{:?} is not an http:// URL", worker.url),
                });
            }
        }
        if self.routing.max_attempts == 0 {
            return Err(invalid("routing.max_attempts", "must be at least 1"));
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
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_document_takes_defaults() {
        let config = GatewayConfig::from_json(
            r#"{"listen":"127.0.0.1:0","workers":[{"url":"http://127.0.0.1:9"}]}"#,
        );
        let config = config.ok();
        assert_eq!(config.map(|c| c.routing), Some(RoutingConfig::default()));
    }

    #[test]
    fn unknown_field_is_named() {
        let err = GatewayConfig::from_json(r#"{"listen":"127.0.0.1:0","workers":[],"retries":3}"#)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("retries"), "{err}");
    }

    #[test]
    fn rejects_bad_worker_url_and_empty_fleet() {
        for doc in [
            r#"{"listen":"127.0.0.1:0","workers":[]}"#,
            r#"{"listen":"127.0.0.1:0","workers":[{"url":"ftp://x"}]}"#,
            r#"{"listen":"127.0.0.1:0","workers":[{"url":"http://x"}],"routing":{"max_attempts":0}}"#,
        ] {
            assert!(GatewayConfig::from_json(doc).is_err(), "{doc}");
        }
    }
}
