//! The vocabulary both counter stores speak: which scopes a request is checked against, what it
//! asks of them, and the answer (granted with rate-limit headers, or refused with the limit hit).

use std::sync::Arc;
use std::time::Duration;

pub use crate::error::format_reset;

use http::{HeaderMap, HeaderName, HeaderValue};

use super::gcra::RateInfo;
use super::policy::{Limits, Scope};
/// Counts and amounts stop at `COUNT_CAP`; policies allow at most `COUNT_CAP - 1`, so a demand
/// capped there is still refused by every budget.
pub use crate::usage::COUNT_CAP;

/// One scope with the limits that apply to it now.
#[derive(Debug, Clone)]
pub struct ScopeCheck {
    pub scope: Scope,
    pub limits: Arc<Limits>,
}

/// What one request asks of every scope it is checked against, each figure at most `COUNT_CAP`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Demand {
    /// Expected prompt tokens plus the most completion tokens it may generate: taken from a
    /// tokens-per-minute bucket (capped at the bucket's size) and settled to the actual count.
    pub rate_tokens: u64,
    /// Worst case tokens (an upper bound of the prompt plus the completion maximum, within
    /// what the context allows): held against a token budget until the request ends. A budget
    /// admits a request only while this fits in what is neither spent nor held.
    pub budget_tokens: u64,
    /// Worst case cost in micro-units, held against a money budget likewise.
    pub budget_money: u64,
}

/// The limit that refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    Concurrency,
    Requests,
    Tokens,
    TokenBudget,
    MoneyBudget,
}

impl Exceeded {
    /// Codes shared with the Redis script's replies.
    pub fn from_code(code: i64) -> Option<Self> {
        Some(match code {
            1 => Self::Concurrency,
            2 => Self::Requests,
            3 => Self::Tokens,
            4 => Self::TokenBudget,
            5 => Self::MoneyBudget,
            _ => return None,
        })
    }

    pub fn is_budget(self) -> bool {
        matches!(self, Self::TokenBudget | Self::MoneyBudget)
    }

    /// The limit's name in policies and error messages.
    pub fn limit_name(self) -> &'static str {
        match self {
            Self::Concurrency => "max_concurrent",
            Self::Requests => "requests_per_minute",
            Self::Tokens => "tokens_per_minute",
            Self::TokenBudget => "token_budget",
            Self::MoneyBudget => "money_budget_micros",
        }
    }
}

/// The tightest request and token rate limits of a request's scopes, for `x-ratelimit-*`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateHeaders {
    pub requests: Option<RateInfo>,
    pub tokens: Option<RateInfo>,
}

impl RateHeaders {
    /// Keeps, for each kind, the scope with the fewest remaining.
    pub fn merge(&mut self, requests: Option<RateInfo>, tokens: Option<RateInfo>) {
        fn tighter(current: &mut Option<RateInfo>, next: Option<RateInfo>) {
            if let Some(next) = next
                && current.is_none_or(|c| next.remaining < c.remaining)
            {
                *current = Some(next);
            }
        }
        tighter(&mut self.requests, requests);
        tighter(&mut self.tokens, tokens);
    }

    /// OpenAI's six headers, for the kinds that are limited.
    pub fn write(&self, headers: &mut HeaderMap) {
        const NAMES: [[HeaderName; 3]; 2] = [
            [
                HeaderName::from_static("x-ratelimit-limit-requests"),
                HeaderName::from_static("x-ratelimit-remaining-requests"),
                HeaderName::from_static("x-ratelimit-reset-requests"),
            ],
            [
                HeaderName::from_static("x-ratelimit-limit-tokens"),
                HeaderName::from_static("x-ratelimit-remaining-tokens"),
                HeaderName::from_static("x-ratelimit-reset-tokens"),
            ],
        ];
        for (names, info) in NAMES.into_iter().zip([self.requests, self.tokens]) {
            let Some(info) = info else { continue };
            let [limit, remaining, reset] = names;
            headers.insert(limit, HeaderValue::from(info.limit));
            headers.insert(remaining, HeaderValue::from(info.remaining));
            if let Ok(value) = HeaderValue::try_from(format_reset(info.reset)) {
                headers.insert(reset, value);
            }
        }
    }
}

/// What one scope gave a granted request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Taken {
    /// Tokens taken from its tokens-per-minute bucket.
    pub rate_tokens: u64,
    /// Tokens and micro-units its budgets hold (0 for a budget it does not have).
    pub tokens: u64,
    pub money: u64,
}

/// A request the counters accepted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Granted {
    /// Per scope, in the order checked.
    pub taken: Vec<Taken>,
    pub headers: RateHeaders,
}

/// A request the counters refused; nothing was taken from any counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Index of the refusing scope in the checks.
    pub scope: usize,
    pub exceeded: Exceeded,
    /// When it is worth trying again (for a budget: when its period ends).
    pub retry_after: Duration,
    /// For a budget: what was left of it (neither spent nor held), in tokens or micro-units.
    pub left: u64,
    pub headers: RateHeaders,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_format_follows_openai() {
        assert_eq!(format_reset(Duration::from_millis(0)), "0ms");
        assert_eq!(format_reset(Duration::from_millis(250)), "250ms");
        assert_eq!(format_reset(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_reset(Duration::from_secs(6)), "6s");
        assert_eq!(format_reset(Duration::from_secs(360)), "6m0s");
        assert_eq!(format_reset(Duration::from_secs(3723)), "1h2m3s");
    }

    #[test]
    fn headers_report_the_tightest_scope() {
        let info = |limit, remaining| RateInfo {
            limit,
            remaining,
            reset: Duration::from_secs(1),
        };
        let mut headers = RateHeaders::default();
        headers.merge(Some(info(100, 50)), None);
        headers.merge(Some(info(10, 9)), Some(info(1000, 10)));
        headers.merge(Some(info(60, 59)), None);
        assert_eq!(headers.requests, Some(info(10, 9)));
        assert_eq!(headers.tokens, Some(info(1000, 10)));
        let mut map = HeaderMap::new();
        headers.write(&mut map);
        assert_eq!(map["x-ratelimit-limit-requests"], "10");
        assert_eq!(map["x-ratelimit-remaining-tokens"], "10");
        assert_eq!(map["x-ratelimit-reset-tokens"], "1s");
        assert_eq!(map.len(), 6);
    }
}
