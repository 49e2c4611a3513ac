//! Admission: the current policies, the counter stores, and the choice between them.
//!
//! A request is checked against its tenant's limits and its key's, each scope with its own
//! counters. With Redis configured, the counters are shared by every replica; when Redis does
//! not answer, rate and concurrency limits fall back to this replica's share (or are skipped)
//! and budgets fail closed (or are skipped), as configured, and Redis is left alone for a
//! second before it is tried again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::time::Instant;

use super::admission::{Demand, Exceeded, Granted, Refusal, ScopeCheck};
use super::demand::Estimate;
use super::local::{Actual, Hold, LocalStore};
use super::policy::Scope;
use super::policy::{Limits, Period, Policies, PolicySnapshot, Price, QueueShare, SpentEntry};
use super::redis::{RedisStore, StoreError};
use super::reservation::{Reservation, Settle, Store};
use crate::auth::Principal;
use crate::config::{QuotaConfig, WhenRedisDown};
use crate::request::Priority;
use crate::usage::now_ms;

/// How long admission skips Redis after it failed to answer.
const REDIS_BACKOFF: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuotaError {
    #[error("over a limit: {refusal:?}")]
    Exceeded {
        refusal: Refusal,
        /// Whether the refusing scope is the key's (else the tenant's).
        on_key: bool,
        /// The value of the limit that refused.
        limit: u64,
        period: Period,
    },
    /// The tenant or key may not use this model.
    #[error("model not allowed")]
    ModelNotAllowed,
    /// The request generates more sequences (`n` × prompts) than a policy allows in one request.
    #[error("too many sequences: {limit} at most")]
    TooManySequences {
        limit: u64,
        /// Whether the limit is the key's (else the tenant's).
        on_key: bool,
    },
    /// A money budget applies and the model has no price.
    #[error("model has no price")]
    NotPriced,
    /// Redis is unreachable and budgets fail closed.
    #[error("quota counters unavailable")]
    Unavailable,
}

fn exceeded(checks: &[ScopeCheck], refusal: Refusal) -> QuotaError {
    let check = checks.get(refusal.scope);
    let limits = check.map(|c| &*c.limits);
    let limit = limits.and_then(|l| match refusal.exceeded {
        Exceeded::Concurrency => l.max_concurrent,
        Exceeded::Requests => l.requests_per_minute,
        Exceeded::Tokens => l.tokens_per_minute,
        Exceeded::TokenBudget => l.token_budget,
        Exceeded::MoneyBudget => l.money_budget_micros,
    });
    QuotaError::Exceeded {
        on_key: check.is_some_and(|c| c.scope.key.is_some()),
        limit: limit.unwrap_or(0),
        period: limits.map(|l| l.budget_period).unwrap_or_default(),
        refusal,
    }
}

#[derive(Debug)]
pub struct Quota {
    policies: ArcSwap<Policies>,
    pub(super) local: LocalStore,
    redis: OnceLock<RedisStore>,
    config: QuotaConfig,
    /// Origin of the monotonic nanoseconds the local rate limits count in.
    epoch: Instant,
    /// Monotonic ms (since `epoch`) before which Redis is not tried again; 0 = try it.
    /// Relaxed: a stale read only costs one extra try or one extra fallback.
    redis_down_until_ms: AtomicU64,
    redis_errors: AtomicU64,
    fallbacks: AtomicU64,
}

impl Quota {
    pub fn new(config: QuotaConfig) -> Self {
        Self {
            policies: ArcSwap::default(),
            local: LocalStore::default(),
            redis: OnceLock::new(),
            config,
            epoch: Instant::now(),
            redis_down_until_ms: AtomicU64::new(0),
            redis_errors: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
        }
    }

    pub fn config(&self) -> &QuotaConfig {
        &self.config
    }

    /// Connects the Redis store if one is configured and not yet connected; returns its tasks
    /// (admissions and settlements). Must run on a tokio runtime.
    pub fn connect(&self) -> Result<Vec<tokio::task::JoinHandle<()>>, StoreError> {
        let Some(url) = &self.config.redis_url else {
            return Ok(Vec::new());
        };
        if self.redis.get().is_some() {
            return Ok(Vec::new());
        }
        let (store, tasks) = RedisStore::new(url, &self.config)?;
        let _ = self.redis.set(store);
        Ok(tasks.into())
    }

    /// Waits until every settlement queued for Redis was sent (or given up), for at most
    /// `timeout`; returns whether the queue emptied. Called at shutdown after the last request.
    pub async fn flush(&self, timeout: Duration) -> bool {
        match self.redis.get() {
            Some(redis) => redis.flush(timeout).await,
            None => true,
        }
    }

    pub fn set_policies(&self, snapshot: PolicySnapshot) -> usize {
        let policies = Policies::from(snapshot);
        let count = policies.tenants.len().saturating_add(policies.keys.len());
        self.policies.store(Arc::new(policies));
        count
    }

    /// How `principal`'s requests queue: its tenant's weight, and the most urgent class its
    /// tenant's and key's policies both allow.
    pub fn queue_share(&self, principal: &Principal) -> QueueShare {
        let policies = self.policies.load();
        let tenant = policies.tenants.get(&principal.tenant_id);
        let key = policies.keys.get(&principal.key_id);
        let ceiling = |limits: Option<&Arc<Limits>>| {
            limits
                .and_then(|l| l.priority)
                .unwrap_or(Priority::Interactive)
        };
        QueueShare {
            weight: tenant.and_then(|t| t.weight).unwrap_or(1).max(1),
            ceiling: ceiling(tenant).min(ceiling(key)),
        }
    }

    /// The allow-list that applies to `principal`, if any (tenant's and key's intersected).
    pub fn model_filter(&self, principal: &Principal) -> Option<Vec<String>> {
        let policies = self.policies.load();
        let lists = [
            policies.tenants.get(&principal.tenant_id),
            policies.keys.get(&principal.key_id),
        ];
        let mut allowed: Option<Vec<String>> = None;
        for list in lists
            .into_iter()
            .flatten()
            .filter_map(|l| l.models.as_ref())
        {
            allowed = Some(match allowed {
                None => list.clone(),
                Some(current) => current.into_iter().filter(|m| list.contains(m)).collect(),
            });
        }
        allowed
    }

    /// `set_policies` from the control plane's JSON document.
    pub fn set_policies_json(&self, text: &str) -> Result<usize, serde_json::Error> {
        Ok(self.set_policies(serde_json::from_str(text)?))
    }

    /// Adds spending recorded before this process started to the in-process counters, from the
    /// control plane's JSON list of `SpentEntry`; all entries or, on any error, none.
    pub fn seed_json(&self, text: &str) -> Result<usize, serde_json::Error> {
        use serde::de::Error;
        let entries: Vec<SpentEntry> = serde_json::from_str(text)?;
        let scopes = entries
            .iter()
            .map(SpentEntry::scope)
            .collect::<Result<Vec<_>, _>>()
            .map_err(serde_json::Error::custom)?;
        let now = now_ms();
        for (entry, scope) in entries.iter().zip(&scopes) {
            self.local
                .seed(scope, entry.period, entry.tokens, entry.money_micros, now);
        }
        Ok(entries.len())
    }

    /// In-flight requests and held (tokens, money) of a scope in this process's counters.
    pub fn held_locally(&self, scope: &Scope) -> (u64, u64, u64) {
        self.local.held(scope)
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Checks `principal`'s limits for one request and reserves its worst case. `Ok(None)`:
    /// nothing limits this principal, so there is nothing to settle.
    pub async fn admit(
        self: &Arc<Self>,
        principal: &Principal,
        model: &str,
        estimate: &Estimate,
        request_id: &str,
    ) -> Result<Option<Reservation>, QuotaError> {
        let (checks, price) = {
            let policies = self.policies.load();
            let tenant = policies.tenants.get(&principal.tenant_id);
            let key = policies.keys.get(&principal.key_id);
            if ![tenant, key]
                .into_iter()
                .flatten()
                .all(|limits| limits.allows_model(model))
            {
                return Err(QuotaError::ModelNotAllowed);
            }
            for (limits, on_key) in [(tenant, false), (key, true)] {
                if let Some(limit) = limits.and_then(|l| l.max_sequences)
                    && estimate.sequences > limit
                {
                    return Err(QuotaError::TooManySequences { limit, on_key });
                }
            }
            let mut checks = Vec::with_capacity(2);
            if let Some(limits) = tenant.filter(|l| l.has_counters()) {
                checks.push(ScopeCheck {
                    scope: Scope {
                        tenant: principal.tenant_id.clone(),
                        key: None,
                    },
                    limits: limits.clone(),
                });
            }
            if let Some(limits) = key.filter(|l| l.has_counters()) {
                checks.push(ScopeCheck {
                    scope: Scope {
                        tenant: principal.tenant_id.clone(),
                        key: Some(principal.key_id.clone()),
                    },
                    limits: limits.clone(),
                });
            }
            (checks, policies.prices.get(model).copied())
        };
        if checks.is_empty() {
            return Ok(None);
        }
        if price.is_none()
            && checks
                .iter()
                .any(|c| c.limits.money_budget_micros.is_some())
        {
            return Err(QuotaError::NotPriced);
        }
        let demand = estimate.demand(price.as_ref());
        if let Some(redis) = self.redis.get().filter(|_| self.redis_is_up()) {
            match redis.admit(request_id, &checks, &demand).await {
                Ok(Ok(granted)) => {
                    return Ok(Some(self.reservation(
                        Store::Redis,
                        request_id,
                        &checks,
                        granted,
                        (demand, price),
                    )));
                }
                Ok(Err(refusal)) => return Err(exceeded(&checks, refusal)),
                Err(error) => self.redis_failed(&error),
            }
        }
        if self.config.redis_url.is_some() {
            let admitted = self.admit_fallback(checks, demand, price, request_id);
            if admitted.is_ok() {
                self.fallbacks.fetch_add(1, Ordering::Relaxed);
            }
            return admitted;
        }
        self.admit_local(checks, demand, price, request_id)
    }

    fn admit_local(
        self: &Arc<Self>,
        checks: Vec<ScopeCheck>,
        demand: Demand,
        price: Option<Price>,
        request_id: &str,
    ) -> Result<Option<Reservation>, QuotaError> {
        match self.local.admit(&checks, &demand, self.now_ns(), now_ms()) {
            Ok(granted) => Ok(Some(self.reservation(
                Store::Local,
                request_id,
                &checks,
                granted,
                (demand, price),
            ))),
            Err(refusal) => Err(exceeded(&checks, refusal)),
        }
    }

    /// Admission while Redis is unreachable, on this replica's counters (`admit` counts the
    /// requests it lets through in `fallbacks`).
    fn admit_fallback(
        self: &Arc<Self>,
        checks: Vec<ScopeCheck>,
        demand: Demand,
        price: Option<Price>,
        request_id: &str,
    ) -> Result<Option<Reservation>, QuotaError> {
        let keep_budgets = match self.config.budgets_when_redis_down {
            WhenRedisDown::Reject if checks.iter().any(|c| c.limits.has_budget()) => {
                return Err(QuotaError::Unavailable);
            }
            _ => false,
        };
        let share = self.config.rate_limits_when_redis_down == WhenRedisDown::LocalShare;
        let checks: Vec<ScopeCheck> = checks
            .into_iter()
            .map(|c| {
                let limits = if share {
                    c.limits.local_share(self.config.replicas, keep_budgets)
                } else {
                    Limits::default()
                };
                ScopeCheck {
                    scope: c.scope,
                    limits: Arc::new(limits),
                }
            })
            .filter(|c| c.limits.has_counters())
            .collect();
        if checks.is_empty() {
            return Ok(None);
        }
        self.admit_local(checks, demand, price, request_id)
    }

    /// The reservation of a granted request: its holds, and what settlement needs.
    fn reservation(
        self: &Arc<Self>,
        store: Store,
        request_id: &str,
        checks: &[ScopeCheck],
        granted: Granted,
        (demand, price): (Demand, Option<Price>),
    ) -> Reservation {
        Reservation::new(
            self.clone(),
            store,
            request_id.to_owned(),
            Hold::of(checks, &granted.taken),
            demand,
            price,
            granted.headers,
        )
    }

    fn redis_is_up(&self) -> bool {
        let until = self.redis_down_until_ms.load(Ordering::Relaxed);
        until == 0 || self.now_ms() >= until
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn redis_failed(&self, error: &StoreError) {
        self.redis_errors.fetch_add(1, Ordering::Relaxed);
        let backoff = u64::try_from(REDIS_BACKOFF.as_millis()).unwrap_or(1000);
        let until = self.now_ms().saturating_add(backoff);
        let previous = self.redis_down_until_ms.swap(until, Ordering::Relaxed);
        if previous == 0 || self.now_ms() >= previous {
            tracing::warn!(
                %error,
                budgets = ?self.config.budgets_when_redis_down,
                rate_limits = ?self.config.rate_limits_when_redis_down,
                "quota counters in Redis unreachable; enforcing the fallback for {REDIS_BACKOFF:?}"
            );
        }
    }

    /// Counters for `/metrics`: Redis errors, requests admitted on the fallback, and the in-process
    /// in-flight requests and held tokens.
    pub fn stats(&self) -> QuotaStats {
        let (inflight, held_tokens) = self.local.totals();
        QuotaStats {
            redis_errors: self.redis_errors.load(Ordering::Relaxed),
            fallbacks: self.fallbacks.load(Ordering::Relaxed),
            local_inflight: inflight,
            local_held_tokens: held_tokens,
        }
    }
}

impl Settle for Quota {
    /// Settles a reservation in the store it was taken from.
    fn settle(&self, store: Store, request_id: &str, holds: &[Hold], actual: Actual) {
        match (store, self.redis.get()) {
            (Store::Redis, Some(redis)) => redis.settle(request_id, holds, actual),
            (Store::Redis, None) => {
                tracing::error!("a Redis reservation outlived the Redis store; left to its lease");
            }
            (Store::Local, _) => {
                self.local.settle(holds, actual, self.now_ns(), now_ms());
            }
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuotaStats {
    pub redis_errors: u64,
    pub fallbacks: u64,
    pub local_inflight: u64,
    pub local_held_tokens: u64,
}
