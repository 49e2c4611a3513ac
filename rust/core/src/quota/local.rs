//! Quota counters in this process: exact for one replica, and each replica's fallback share when
//! the shared Redis counters are out of reach.
//!
//! Each scope's counters sit behind their own mutex; a request locks its scopes in the order
//! given (tenant, then key, for every request, so two requests never wait on each other in a
//! cycle), checks every limit, and only then takes from all of them, so a refusal takes nothing.
//! Times are passed in: monotonic nanoseconds for rate limits, unix milliseconds for budget
//! periods.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use super::admission::{Demand, Exceeded, Granted, RateHeaders, Refusal, ScopeCheck, Taken};
use super::gcra::Gcra;
use super::policy::Scope;
use super::policy::{Limits, Period};

/// What one period's budget has spent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Spent {
    period: u32,
    tokens: u64,
    money: u64,
}

impl Spent {
    /// The counts for `period`, starting from zero when the period has rolled over.
    fn current(&mut self, period: u32) -> &mut Self {
        if self.period != period {
            *self = Self {
                period,
                ..Self::default()
            };
        }
        self
    }
}

#[derive(Debug, Default)]
struct Counters {
    requests: Gcra,
    tokens: Gcra,
    inflight: u64,
    held_tokens: u64,
    held_money: u64,
    day: Spent,
    month: Spent,
}

impl Counters {
    fn spent(&mut self, period: Period, unix_ms: u64) -> &mut Spent {
        let id = period.window(unix_ms).id;
        match period {
            Period::Day => self.day.current(id),
            Period::Month => self.month.current(id),
        }
    }

    /// The first limit `demand` would break, with when to retry and (for a budget) what was
    /// left of it.
    fn check(
        &mut self,
        limits: &Limits,
        demand: &Demand,
        now_ns: u64,
        unix_ms: u64,
    ) -> Option<(Exceeded, Duration, u64)> {
        if limits
            .max_concurrent
            .is_some_and(|max| self.inflight >= max)
        {
            return Some((Exceeded::Concurrency, Duration::from_secs(1), 0));
        }
        if let Some(limit) = limits.requests_per_minute
            && let Err(wait) = self.requests.check(now_ns, limit, 1)
        {
            return Some((Exceeded::Requests, wait, 0));
        }
        if let Some(limit) = limits.tokens_per_minute
            && let Err(wait) = self
                .tokens
                .check(now_ns, limit, demand.rate_tokens.min(limit))
        {
            return Some((Exceeded::Tokens, wait, 0));
        }
        let period = limits.budget_period;
        let (held_tokens, held_money) = (self.held_tokens, self.held_money);
        let spent = *self.spent(period, unix_ms);
        // Admitted only while its worst case fits in what is neither spent nor held: every
        // admitted request holds its worst case, so together they never spend past the budget.
        let until_period_end =
            || Duration::from_millis(period.window(unix_ms).end_ms.saturating_sub(unix_ms));
        let left =
            |budget: u64, spent: u64, held: u64| budget.saturating_sub(spent).saturating_sub(held);
        if let Some(budget) = limits.token_budget {
            let left = left(budget, spent.tokens, held_tokens);
            if demand.budget_tokens > left {
                return Some((Exceeded::TokenBudget, until_period_end(), left));
            }
        }
        if let Some(budget) = limits.money_budget_micros {
            let left = left(budget, spent.money, held_money);
            if demand.budget_money > left {
                return Some((Exceeded::MoneyBudget, until_period_end(), left));
            }
        }
        None
    }

    /// Takes `demand`, which `check` just passed under the same lock; returns the tokens its
    /// tokens-per-minute bucket gave and what each budget holds.
    fn take(&mut self, limits: &Limits, demand: &Demand, now_ns: u64) -> (u64, u64, u64) {
        self.inflight = self.inflight.saturating_add(1);
        if let Some(limit) = limits.requests_per_minute {
            let _ = self.requests.try_take(now_ns, limit, 1);
        }
        let mut rate_tokens = 0;
        if let Some(limit) = limits.tokens_per_minute {
            rate_tokens = demand.rate_tokens.min(limit);
            let _ = self.tokens.try_take(now_ns, limit, rate_tokens);
        }
        // Each hold fits its budget (checked), so these sums stay below the budgets.
        let hold_tokens = limits.token_budget.map_or(0, |_| demand.budget_tokens);
        let hold_money = limits
            .money_budget_micros
            .map_or(0, |_| demand.budget_money);
        self.held_tokens = self.held_tokens.saturating_add(hold_tokens);
        self.held_money = self.held_money.saturating_add(hold_money);
        (rate_tokens, hold_tokens, hold_money)
    }

    fn headers(&self, limits: &Limits, now_ns: u64, headers: &mut RateHeaders) {
        headers.merge(
            limits
                .requests_per_minute
                .map(|l| self.requests.info(now_ns, l)),
            limits
                .tokens_per_minute
                .map(|l| self.tokens.info(now_ns, l)),
        );
    }
}

/// One scope's part of a reservation, as the store needs it back at settlement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub scope: Scope,
    /// The tokens-per-minute limit the reservation was taken under, if any.
    pub tokens_per_minute: Option<u64>,
    pub rate_tokens: u64,
    /// What the scope's token and money budgets hold for the request (0 without a budget).
    pub tokens: u64,
    pub money: u64,
}

impl Hold {
    /// A granted request's holds: one per scope checked, with what its bucket gave and what
    /// its budgets hold.
    pub fn of(checks: &[ScopeCheck], taken: &[Taken]) -> Vec<Self> {
        checks
            .iter()
            .zip(taken)
            .map(|(check, taken)| Self {
                scope: check.scope.clone(),
                tokens_per_minute: check.limits.tokens_per_minute,
                rate_tokens: taken.rate_tokens,
                tokens: taken.tokens,
                money: taken.money,
            })
            .collect()
    }
}

/// A request's actual consumption, settled against its holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Actual {
    pub tokens: u64,
    pub money: u64,
}

#[derive(Debug, Default)]
pub struct LocalStore {
    scopes: RwLock<HashMap<Scope, Arc<Mutex<Counters>>>>,
}

fn lock(counters: &Mutex<Counters>) -> MutexGuard<'_, Counters> {
    // Every update under this lock is a few integer writes with no panicking call between
    // them, so a poisoned lock still guards consistent counters.
    counters.lock().unwrap_or_else(PoisonError::into_inner)
}

impl LocalStore {
    fn counters(&self, scope: &Scope) -> Arc<Mutex<Counters>> {
        let known = self
            .scopes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(scope)
            .cloned();
        known.unwrap_or_else(|| {
            self.scopes
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(scope.clone())
                .or_default()
                .clone()
        })
    }

    /// Checks every scope, then takes `demand` from all of them, or from none.
    pub fn admit(
        &self,
        checks: &[ScopeCheck],
        demand: &Demand,
        now_ns: u64,
        unix_ms: u64,
    ) -> Result<Granted, Refusal> {
        let cells: Vec<_> = checks.iter().map(|c| self.counters(&c.scope)).collect();
        let mut guards: Vec<_> = cells.iter().map(|c| lock(c)).collect();
        let mut refusal = None;
        for (index, (check, counters)) in checks.iter().zip(guards.iter_mut()).enumerate() {
            if let Some(found) = counters.check(&check.limits, demand, now_ns, unix_ms) {
                refusal = Some((index, found));
                break;
            }
        }
        let mut headers = RateHeaders::default();
        if let Some((scope, (exceeded, retry_after, left))) = refusal {
            for (check, counters) in checks.iter().zip(&guards) {
                counters.headers(&check.limits, now_ns, &mut headers);
            }
            return Err(Refusal {
                scope,
                exceeded,
                retry_after,
                left,
                headers,
            });
        }
        let mut taken = Vec::with_capacity(checks.len());
        for (check, counters) in checks.iter().zip(guards.iter_mut()) {
            let (rate_tokens, tokens, money) = counters.take(&check.limits, demand, now_ns);
            taken.push(Taken {
                rate_tokens,
                tokens,
                money,
            });
            counters.headers(&check.limits, now_ns, &mut headers);
        }
        Ok(Granted { taken, headers })
    }

    /// Releases `holds` and charges `actual`: budgets of both periods, and each tokens-per-minute
    /// bucket the difference between what it gave and what was used.
    pub fn settle(&self, holds: &[Hold], actual: Actual, now_ns: u64, unix_ms: u64) {
        for hold in holds {
            let cell = self.counters(&hold.scope);
            let mut counters = lock(&cell);
            counters.inflight = counters.inflight.saturating_sub(1);
            counters.held_tokens = counters.held_tokens.saturating_sub(hold.tokens);
            counters.held_money = counters.held_money.saturating_sub(hold.money);
            for period in [Period::Day, Period::Month] {
                let spent = counters.spent(period, unix_ms);
                spent.tokens = spent.tokens.saturating_add(actual.tokens);
                spent.money = spent.money.saturating_add(actual.money);
            }
            if let Some(limit) = hold.tokens_per_minute {
                // Two u64 differ by less than i128's range; past i64's it saturates.
                let delta = i128::from(actual.tokens).saturating_sub(i128::from(hold.rate_tokens));
                let delta =
                    i64::try_from(delta).unwrap_or(if delta < 0 { i64::MIN } else { i64::MAX });
                counters.tokens.adjust(now_ns, limit, delta);
            }
        }
    }

    /// Adds spending recorded before this process started to a period's budget counters.
    pub fn seed(&self, scope: &Scope, period: Period, tokens: u64, money: u64, unix_ms: u64) {
        let cell = self.counters(scope);
        let mut counters = lock(&cell);
        let spent = counters.spent(period, unix_ms);
        spent.tokens = spent.tokens.saturating_add(tokens);
        spent.money = spent.money.saturating_add(money);
    }

    /// What a scope spent in `period`'s current window: (tokens, money).
    #[cfg(test)]
    pub fn spent(&self, scope: &Scope, period: Period, unix_ms: u64) -> (u64, u64) {
        let cell = self.counters(scope);
        let mut counters = lock(&cell);
        let spent = counters.spent(period, unix_ms);
        (spent.tokens, spent.money)
    }

    /// In-flight requests and held (tokens, money) of a scope.
    pub fn held(&self, scope: &Scope) -> (u64, u64, u64) {
        let cell = self.counters(scope);
        let counters = lock(&cell);
        (counters.inflight, counters.held_tokens, counters.held_money)
    }

    /// Every scope's in-flight requests and held tokens summed, for `/metrics`.
    pub fn totals(&self) -> (u64, u64) {
        let scopes = self.scopes.read().unwrap_or_else(PoisonError::into_inner);
        scopes.values().fold((0, 0), |(inflight, held), cell| {
            let counters = lock(cell);
            (
                inflight.saturating_add(counters.inflight),
                held.saturating_add(counters.held_tokens),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;
    const NOON: u64 = 1_795_957_200_000;

    fn scope(tenant: &str, key: Option<&str>) -> Scope {
        Scope {
            tenant: tenant.into(),
            key: key.map(Arc::from),
        }
    }

    fn check(scope: Scope, limits: Limits) -> ScopeCheck {
        ScopeCheck {
            scope,
            limits: Arc::new(limits),
        }
    }

    fn demand(tokens: u64) -> Demand {
        Demand {
            rate_tokens: tokens,
            budget_tokens: tokens,
            budget_money: 0,
        }
    }

    fn holds(checks: &[ScopeCheck], granted: &Granted) -> Vec<Hold> {
        Hold::of(checks, &granted.taken)
    }

    fn rate_tokens(granted: &Granted) -> Vec<u64> {
        granted.taken.iter().map(|t| t.rate_tokens).collect()
    }

    #[test]
    fn a_refusal_by_one_limit_takes_nothing_from_the_others() {
        let store = LocalStore::default();
        let checks = [
            check(
                scope("t", None),
                Limits {
                    requests_per_minute: Some(100),
                    tokens_per_minute: Some(1000),
                    max_concurrent: Some(10),
                    ..Limits::default()
                },
            ),
            check(
                scope("t", Some("k")),
                Limits {
                    requests_per_minute: Some(1),
                    ..Limits::default()
                },
            ),
        ];
        let first = store.admit(&checks, &demand(100), 0, NOON);
        assert!(first.is_ok());
        let refused = store.admit(&checks, &demand(100), 0, NOON);
        assert_eq!(
            refused.as_ref().map_err(|r| (r.scope, r.exceeded)).err(),
            Some((1, Exceeded::Requests))
        );
        // The tenant's counters show only the first request.
        assert_eq!(store.held(&scope("t", None)).0, 1);
        let headers = refused.err().map(|r| r.headers).unwrap_or_default();
        assert_eq!(headers.requests.map(|r| r.remaining), Some(0));
        assert_eq!(headers.tokens.map(|t| t.remaining), Some(900));
    }

    #[test]
    fn concurrency_slots_come_back_at_settlement() {
        let store = LocalStore::default();
        let checks = [check(
            scope("t", None),
            Limits {
                max_concurrent: Some(2),
                ..Limits::default()
            },
        )];
        let a = store
            .admit(&checks, &demand(1), 0, NOON)
            .unwrap_or_default();
        let _b = store
            .admit(&checks, &demand(1), 0, NOON)
            .unwrap_or_default();
        let refused = store.admit(&checks, &demand(1), 0, NOON);
        assert_eq!(
            refused.map_err(|r| r.exceeded).err(),
            Some(Exceeded::Concurrency)
        );
        store.settle(&holds(&checks, &a), Actual::default(), 0, NOON);
        assert!(store.admit(&checks, &demand(1), 0, NOON).is_ok());
    }

    #[test]
    fn budgets_admit_while_the_worst_case_fits_and_settle_to_the_actual() {
        let store = LocalStore::default();
        let checks = [check(
            scope("t", None),
            Limits {
                token_budget: Some(1000),
                budget_period: Period::Day,
                ..Limits::default()
            },
        )];
        // At most 400 tokens each: two fit in 1000, a third does not.
        let worst = demand(400);
        let a = store.admit(&checks, &worst, 0, NOON).unwrap_or_default();
        let b = store.admit(&checks, &worst, 0, NOON).unwrap_or_default();
        let refused = store.admit(&checks, &worst, 0, NOON);
        let refusal = refused.err();
        assert_eq!(
            refusal.as_ref().map(|r| (r.exceeded, r.left)),
            Some((Exceeded::TokenBudget, 200))
        );
        assert_eq!(
            refusal.map(|r| r.retry_after),
            Some(Duration::from_secs(11 * 3600)),
            "a budget refusal says when its period ends"
        );
        assert!(
            store.admit(&checks, &demand(200), 0, NOON).is_ok(),
            "what is left is for a request that fits in it"
        );
        let actual = Actual {
            tokens: 100,
            money: 0,
        };
        store.settle(&holds(&checks, &a), actual, 0, NOON);
        store.settle(&holds(&checks, &b), actual, 0, NOON);
        assert_eq!(store.held(&scope("t", None)), (1, 200, 0));
        // 200 spent and 200 held: another 400 fits, twice; the next day starts from zero.
        assert!(store.admit(&checks, &worst, 0, NOON).is_ok());
        store.seed(&scope("t", None), Period::Day, 200, 0, NOON);
        assert!(store.admit(&checks, &worst, 0, NOON).is_err());
        assert!(
            store
                .admit(&checks, &worst, 0, NOON + 12 * 3_600_000)
                .is_ok()
        );
    }

    #[test]
    fn a_money_budget_holds_money_and_no_tokens() {
        let store = LocalStore::default();
        let checks = [check(
            scope("t", None),
            Limits {
                money_budget_micros: Some(10),
                ..Limits::default()
            },
        )];
        let costly = Demand {
            rate_tokens: 1,
            budget_tokens: u64::MAX,
            budget_money: 6,
        };
        let granted = store.admit(&checks, &costly, 0, NOON).unwrap_or_default();
        assert_eq!(store.held(&scope("t", None)), (1, 0, 6));
        assert!(store.admit(&checks, &costly, 0, NOON).is_err());
        store.settle(
            &holds(&checks, &granted),
            Actual {
                tokens: 9,
                money: 2,
            },
            0,
            NOON,
        );
        assert_eq!(store.held(&scope("t", None)), (0, 0, 0));
        assert!(store.admit(&checks, &costly, 0, NOON).is_ok());
    }

    #[test]
    fn tokens_per_minute_settles_to_the_actual_and_refills() {
        let store = LocalStore::default();
        let checks = [check(
            scope("t", None),
            Limits {
                tokens_per_minute: Some(600),
                ..Limits::default()
            },
        )];
        let granted = store
            .admit(&checks, &demand(500), 0, NOON)
            .unwrap_or_default();
        assert_eq!(rate_tokens(&granted), vec![500]);
        assert!(store.admit(&checks, &demand(500), 0, NOON).is_err());
        store.settle(
            &holds(&checks, &granted),
            Actual {
                tokens: 50,
                money: 0,
            },
            0,
            NOON,
        );
        let after = store
            .admit(&checks, &demand(500), 0, NOON)
            .unwrap_or_default();
        assert_eq!(after.headers.tokens.map(|t| t.remaining), Some(50));
        // 600 per minute refills 10 per second.
        let later = store.admit(&checks, &demand(100), 5 * SECOND, NOON);
        assert_eq!(
            later
                .ok()
                .and_then(|g| g.headers.tokens)
                .map(|t| t.remaining),
            Some(0)
        );
        // A request larger than the bucket takes the whole bucket rather than never passing.
        let big = store
            .admit(&checks, &demand(10_000), 120 * SECOND, NOON)
            .unwrap_or_default();
        assert_eq!(rate_tokens(&big), vec![600]);
    }
}
