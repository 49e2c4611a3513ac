//! Property tests: admission, settlement and pricing fed extreme values (0, 1, 2^53, 2^64 - 1
//! and everything between). In a test build arithmetic overflow panics, so a wrap anywhere is a
//! failure here, besides the invariants each property states.

use std::sync::Arc;

use proptest::prelude::*;

use super::admission::{COUNT_CAP, Demand, ScopeCheck};
use super::demand::Estimate;
use super::local::{Actual, Hold, LocalStore};
use super::policy::Scope;
use super::policy::{Limits, Period, Price};
use crate::usage::Usage;

const NOON: u64 = 1_795_957_200_000;

/// A number a client or a worker could send: the edges more often than chance would pick them.
fn hostile() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0),
        Just(1),
        Just(COUNT_CAP - 1),
        Just(COUNT_CAP),
        Just(u64::MAX),
        Just(u64::MAX - 1),
        0..10_000u64,
        any::<u64>(),
    ]
}

fn limit() -> impl Strategy<Value = Option<u64>> {
    prop_oneof![
        Just(None),
        (1..COUNT_CAP).prop_map(Some),
        (1..5_000u64).prop_map(Some)
    ]
}

fn limits() -> impl Strategy<Value = Limits> {
    (limit(), limit(), limit(), limit(), limit()).prop_map(
        |(requests_per_minute, tokens_per_minute, max_concurrent, token_budget, money)| Limits {
            requests_per_minute,
            tokens_per_minute,
            max_concurrent,
            token_budget,
            money_budget_micros: money,
            budget_period: Period::Day,
            ..Limits::default()
        },
    )
}

fn demand() -> impl Strategy<Value = Demand> {
    (hostile(), hostile(), hostile()).prop_map(|(rate_tokens, budget_tokens, budget_money)| {
        Demand {
            rate_tokens,
            budget_tokens,
            budget_money,
        }
    })
}

#[derive(Debug, Clone)]
enum Op {
    Admit(Demand),
    /// Settles the admitted request at this index (modulo those still open), having used this
    /// share (per mille, up to 1000: never more than it held) or these absolute amounts.
    Settle(usize, Used),
}

#[derive(Debug, Clone, Copy)]
enum Used {
    Share(u64),
    Anything(u64, u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        demand().prop_map(Op::Admit),
        (any::<usize>(), 0..=1000u64).prop_map(|(i, share)| Op::Settle(i, Used::Share(share))),
        (any::<usize>(), hostile(), hostile())
            .prop_map(|(i, tokens, money)| Op::Settle(i, Used::Anything(tokens, money))),
    ]
}

fn per_mille(value: u64, share: u64) -> u64 {
    let share = u128::from(value).saturating_mul(u128::from(share)) / 1000;
    u64::try_from(share).unwrap_or(u64::MAX)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Any sequence of admissions and settlements, over a tenant's and a key's scopes: nothing
    /// wraps, every hold comes back, and while no request uses more than it held, no budget is
    /// spent past.
    #[test]
    fn holds_come_back_and_budgets_hold(
        tenant in limits(),
        key in limits(),
        ops in prop::collection::vec(op(), 1..64),
    ) {
        let store = LocalStore::default();
        let scope = |key: Option<&str>| Scope { tenant: "t".into(), key: key.map(Arc::from) };
        let checks = [
            ScopeCheck { scope: scope(None), limits: Arc::new(tenant.clone()) },
            ScopeCheck { scope: scope(Some("k")), limits: Arc::new(key.clone()) },
        ];
        let mut open: Vec<(Vec<Hold>, Demand)> = Vec::new();
        let mut overused = false;
        let mut now_ns = 0u64;
        for op in ops {
            now_ns = now_ns.saturating_add(1_000_000_000);
            match op {
                Op::Admit(demand) => {
                    if let Ok(granted) = store.admit(&checks, &demand, now_ns, NOON) {
                        open.push((Hold::of(&checks, &granted.taken), demand));
                    }
                }
                Op::Settle(_, _) if open.is_empty() => {}
                Op::Settle(index, used) => {
                    let (holds, demand) = open.swap_remove(index.checked_rem(open.len()).unwrap_or(0));
                    let actual = match used {
                        Used::Share(share) => Actual {
                            tokens: per_mille(demand.budget_tokens, share),
                            money: per_mille(demand.budget_money, share),
                        },
                        Used::Anything(tokens, money) => {
                            overused |= tokens > demand.budget_tokens || money > demand.budget_money;
                            Actual { tokens, money }
                        }
                    };
                    store.settle(&holds, actual, now_ns, NOON);
                }
            }
        }
        for (holds, _) in open.drain(..) {
            store.settle(&holds, Actual::default(), now_ns, NOON);
        }
        for (check, limits) in checks.iter().zip([&tenant, &key]) {
            prop_assert_eq!(store.held(&check.scope), (0, 0, 0));
            let (tokens, money) = store.spent(&check.scope, Period::Day, NOON);
            if !overused {
                prop_assert!(limits.token_budget.is_none_or(|budget| tokens <= budget));
                prop_assert!(limits.money_budget_micros.is_none_or(|budget| money <= budget));
            }
        }
    }

    /// Cost never wraps, rounds up, and grows with every count and price.
    #[test]
    fn pricing_is_exact_and_saturates(
        (prompt, cached, completion) in (hostile(), hostile(), hostile()),
        (p, c, o) in (hostile(), hostile(), hostile()),
    ) {
        let price = Price { prompt: p, cached: c, completion: o };
        let usage = Usage { prompt_tokens: prompt, cached_tokens: cached, completion_tokens: completion };
        let cost = price.cost(&usage);
        let more = Usage { completion_tokens: completion.saturating_add(1), ..usage };
        prop_assert!(price.cost(&more) >= cost);
        let dearer = Price { completion: o.saturating_add(1), ..price };
        prop_assert!(dearer.cost(&usage) >= cost);
        // Where the exact figure fits in u128 without saturating, the cost is its ceiling.
        let cached = u128::from(cached.min(prompt));
        let exact = u128::from(prompt)
            .saturating_sub(cached)
            .checked_mul(u128::from(p))
            .and_then(|a| cached.checked_mul(u128::from(c)).and_then(|b| a.checked_add(b)))
            .and_then(|a| u128::from(completion).checked_mul(u128::from(o)).and_then(|b| a.checked_add(b)));
        if let Some(exact) = exact {
            let expected = u64::try_from(exact.div_ceil(1_000_000)).unwrap_or(u64::MAX);
            prop_assert_eq!(cost, expected);
        }
    }

    /// A request's estimate from any counts a client may send stays within the cap, bounds
    /// its worst case by the context, and prices without wrapping.
    #[test]
    fn estimates_stay_within_the_cap(
        (prompt_upper, prompt_expected, completion_max) in (hostile(), hostile(), hostile()),
        (sequences, total_max) in (1..=COUNT_CAP, 1..=COUNT_CAP),
        price in (hostile(), hostile(), hostile()),
        left in hostile(),
    ) {
        let estimate = Estimate {
            prompt_upper: prompt_upper.min(COUNT_CAP),
            prompt_expected: prompt_expected.min(COUNT_CAP),
            completion_max: completion_max.min(COUNT_CAP),
            sequences,
            total_max,
            max_tokens_set: true,
        };
        let price = Price { prompt: price.0, cached: price.1, completion: price.2 };
        let demand = estimate.demand(Some(&price));
        prop_assert!(demand.budget_tokens <= total_max);
        prop_assert!(demand.rate_tokens <= total_max);
        prop_assert!(demand.budget_money <= COUNT_CAP);
        if let Some(max_tokens) = estimate.max_tokens_within(left) {
            let worst = estimate.prompt_upper.saturating_add(max_tokens.saturating_mul(sequences));
            prop_assert!(worst <= left);
        }
    }
}
