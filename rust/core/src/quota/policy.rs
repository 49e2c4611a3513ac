//! Quota policies and prices as the control plane pushes them, and the UTC calendar periods that
//! budgets run over.
//!
//! A snapshot replaces every policy at once; the next admission reads the new one. This module
//! holds no counters.

use std::collections::HashMap;
use std::sync::Arc;

use jiff::Timestamp;
use jiff::civil::Time;
use jiff::tz::Offset;
use serde::Deserialize;

use crate::request::Priority;
pub use crate::usage::Price;

/// One tenant's or one key's limits; `None` is no limit.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(default)]
    pub requests_per_minute: Option<u64>,
    /// Prompt plus completion tokens.
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
    #[serde(default)]
    pub max_concurrent: Option<u64>,
    /// Prompt plus completion tokens per budget period.
    #[serde(default)]
    pub token_budget: Option<u64>,
    /// Micro-units of currency per budget period.
    #[serde(default)]
    pub money_budget_micros: Option<u64>,
    #[serde(default)]
    pub budget_period: Period,
    /// Most sequences (`n` × prompts) one request may generate.
    #[serde(default)]
    pub max_sequences: Option<u64>,
    /// Models this tenant or key may use; `None` is every model.
    #[serde(default)]
    pub models: Option<Vec<String>>,
    /// A tenant's share of a busy model's queue, against other tenants' (a key's is not used);
    /// `None` is 1.
    #[serde(default)]
    pub weight: Option<u32>,
    /// The most urgent class this tenant's or key's requests may take, and the class of those
    /// that ask for none; `None` is `Interactive`.
    #[serde(default)]
    pub priority: Option<Priority>,
}

impl Limits {
    pub fn allows_model(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|models| models.iter().any(|m| m == model))
    }

    pub fn has_budget(&self) -> bool {
        self.token_budget.is_some() || self.money_budget_micros.is_some()
    }

    /// Whether any counter applies (the allow-list alone needs none).
    pub fn has_counters(&self) -> bool {
        self.requests_per_minute.is_some()
            || self.tokens_per_minute.is_some()
            || self.max_concurrent.is_some()
            || self.has_budget()
    }

    /// This replica's share when the shared counters are out of reach: every rate and
    /// concurrency limit divided by `replicas` (rounded up, so never below 1); budgets kept only
    /// if `keep_budgets`.
    pub fn local_share(&self, replicas: u32, keep_budgets: bool) -> Self {
        let share = |limit: Option<u64>| limit.map(|l| l.div_ceil(u64::from(replicas.max(1))));
        Self {
            requests_per_minute: share(self.requests_per_minute),
            tokens_per_minute: share(self.tokens_per_minute),
            max_concurrent: share(self.max_concurrent),
            token_budget: self.token_budget.filter(|_| keep_budgets),
            money_budget_micros: self.money_budget_micros.filter(|_| keep_budgets),
            budget_period: self.budget_period,
            max_sequences: None,
            models: None,
            weight: None,
            priority: None,
        }
    }

    /// Rate and concurrency limits removed, budgets kept.
    pub fn budgets_only(&self) -> Self {
        Self {
            token_budget: self.token_budget,
            money_budget_micros: self.money_budget_micros,
            budget_period: self.budget_period,
            ..Self::default()
        }
    }
}

/// How a principal's requests share a busy model's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueShare {
    /// Its tenant's weight against other tenants (at least 1).
    pub weight: u32,
    /// The most urgent class its requests may take; also the class of those that ask for none.
    pub ceiling: Priority,
}

impl QueueShare {
    /// The class a request that asked for `asked` takes.
    pub fn class(&self, asked: Option<Priority>) -> Priority {
        asked.map_or(self.ceiling, |asked| asked.min(self.ceiling))
    }
}

/// The calendar period a budget covers, in UTC.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Day,
    #[default]
    Month,
}

/// One concrete period: its id (`20261129` for a day, `202611` for a month) and its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeriodWindow {
    pub id: u32,
    pub end_ms: u64,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Day => "day",
            Self::Month => "month",
        }
    }

    /// The period containing the unix time `unix_ms` (saturating at jiff's last instant,
    /// the year 9999).
    pub fn window(self, unix_ms: u64) -> PeriodWindow {
        let ms = i64::try_from(unix_ms).unwrap_or(i64::MAX);
        let at = Timestamp::from_millisecond(ms).unwrap_or(Timestamp::MAX);
        let date = Offset::UTC.to_datetime(at).date();
        let (year, month, day) = (
            u32::try_from(date.year()).unwrap_or(0),
            u32::try_from(date.month()).unwrap_or(0),
            u32::try_from(date.day()).unwrap_or(0),
        );
        let (id, next) = match self {
            Self::Day => (
                year.saturating_mul(10_000)
                    .saturating_add(month.saturating_mul(100))
                    .saturating_add(day),
                date.tomorrow(),
            ),
            Self::Month => (
                year.saturating_mul(100).saturating_add(month),
                date.last_of_month().tomorrow(),
            ),
        };
        let end_ms = next
            .ok()
            .and_then(|next| {
                Offset::UTC
                    .to_timestamp(next.to_datetime(Time::midnight()))
                    .ok()
            })
            .map_or(u64::MAX, |end| {
                u64::try_from(end.as_millisecond()).unwrap_or(u64::MAX)
            });
        PeriodWindow { id, end_ms }
    }
}

/// The control plane's document (`gateway._core.Gateway.set_policies`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySnapshot {
    #[serde(default)]
    pub tenants: HashMap<String, Limits>,
    #[serde(default)]
    pub keys: HashMap<String, Limits>,
    #[serde(default)]
    pub prices: HashMap<String, Price>,
}

/// Whose counters: a tenant's, or one of its keys' (keys are named with their tenant so the
/// Redis keys of one tenant share a cluster slot).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scope {
    pub tenant: Arc<str>,
    pub key: Option<Arc<str>>,
}

/// One entry of the control plane's `seed_spent` document: what the ledger recorded in a
/// current budget period before this process started.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpentEntry {
    pub scope: ScopeKind,
    pub id: String,
    /// The tenant of a key (a key's counters are kept under its tenant); required for keys.
    #[serde(default)]
    pub tenant_id: Option<String>,
    pub period: Period,
    pub tokens: u64,
    pub money_micros: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScopeKind {
    Tenant,
    Key,
}

impl SpentEntry {
    pub fn scope(&self) -> Result<Scope, String> {
        match (self.scope, &self.tenant_id) {
            (ScopeKind::Tenant, _) => Ok(Scope {
                tenant: self.id.as_str().into(),
                key: None,
            }),
            (ScopeKind::Key, Some(tenant)) => Ok(Scope {
                tenant: tenant.as_str().into(),
                key: Some(self.id.as_str().into()),
            }),
            (ScopeKind::Key, None) => Err(format!("key {}: `tenant_id` is required", self.id)),
        }
    }
}

/// Policies as admission reads them.
#[derive(Debug, Default)]
pub struct Policies {
    pub tenants: HashMap<Arc<str>, Arc<Limits>>,
    pub keys: HashMap<Arc<str>, Arc<Limits>>,
    pub prices: HashMap<String, Price>,
}

impl From<PolicySnapshot> for Policies {
    fn from(snapshot: PolicySnapshot) -> Self {
        let index = |map: HashMap<String, Limits>| {
            map.into_iter()
                .map(|(id, limits)| (Arc::from(id), Arc::new(limits)))
                .collect()
        };
        Self {
            tenants: index(snapshot.tenants),
            keys: index(snapshot.keys),
            prices: snapshot.prices,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS_2026_11_29_13H: u64 = 1_795_957_200_000;

    #[test]
    fn a_request_s_class_is_clamped_to_its_ceiling_and_defaults_to_it() {
        let interactive = QueueShare {
            weight: 1,
            ceiling: Priority::Interactive,
        };
        let batch = QueueShare {
            ceiling: Priority::Batch,
            ..interactive
        };
        assert_eq!(interactive.class(None), Priority::Interactive);
        assert_eq!(interactive.class(Some(Priority::Batch)), Priority::Batch);
        assert_eq!(batch.class(None), Priority::Batch);
        assert_eq!(batch.class(Some(Priority::Interactive)), Priority::Batch);
        let limits: Limits =
            serde_json::from_str(r#"{"weight": 3, "priority": "batch"}"#).unwrap_or_default();
        assert_eq!(
            (limits.weight, limits.priority),
            (Some(3), Some(Priority::Batch))
        );
    }

    #[test]
    fn leap_days_and_year_ends() {
        // 2000-02-29T12:00:00Z
        let leap = Period::Day.window(951_825_600_000);
        assert_eq!(leap.id, 20_000_229);
        assert_eq!(
            Period::Month.window(951_825_600_000).end_ms,
            951_868_800_000
        );
        assert_eq!(Period::Day.window(0).id, 19_700_101);
        assert_eq!(Period::Month.window(u64::MAX).end_ms, u64::MAX);
    }

    #[test]
    fn windows_are_utc_calendar_periods() {
        let day = Period::Day.window(MS_2026_11_29_13H);
        assert_eq!(day.id, 20_261_129);
        assert_eq!(day.end_ms, 1_795_996_800_000);
        let month = Period::Month.window(MS_2026_11_29_13H);
        assert_eq!(month.id, 202_611);
        // 2026-12-01T00:00:00Z
        assert_eq!(month.end_ms, 1_796_083_200_000);
        let december = Period::Month.window(month.end_ms);
        assert_eq!(december.id, 202_612);
        assert_eq!(Period::Month.window(december.end_ms).id, 202_701);
        assert_eq!(Period::Month.window(month.end_ms - 1).id, 202_611);
    }

    #[test]
    fn local_share_divides_rate_limits_and_drops_budgets_on_request() {
        let limits = Limits {
            requests_per_minute: Some(10),
            max_concurrent: Some(1),
            token_budget: Some(100),
            ..Limits::default()
        };
        let share = limits.local_share(3, false);
        assert_eq!(share.requests_per_minute, Some(4));
        assert_eq!(share.max_concurrent, Some(1));
        assert_eq!(share.token_budget, None);
        assert_eq!(limits.local_share(3, true).token_budget, Some(100));
    }

    #[test]
    fn snapshot_rejects_unknown_fields() {
        let bad = r#"{"tenants":{"t":{"requests_per_minute":1,"rpm":2}}}"#;
        assert!(serde_json::from_str::<PolicySnapshot>(bad).is_err());
        let good = r#"{"tenants":{"t":{"requests_per_minute":1,"budget_period":"day","models":["m"]}},"prices":{"m":{"prompt":1,"cached":0,"completion":2}}}"#;
        let policies =
            Policies::from(serde_json::from_str::<PolicySnapshot>(good).unwrap_or_default());
        let limits = policies.tenants.get("t").cloned().unwrap_or_default();
        assert_eq!(limits.budget_period, Period::Day);
        assert!(limits.allows_model("m") && !limits.allows_model("x"));
        assert_eq!(policies.prices.get("m").map(|p| p.completion), Some(2));
    }
}
