//! The usage event: one per dispatched request, with the token counts (`Usage`) it is billed for,
//! how it ended (`Status`), where its counts come from (`UsageSource`), and its id.
//!
//! The bottom of the crate with `request`: it imports nothing above them. Recording, journalling
//! and settling events is `metering`'s; pricing and storing them is the control plane's.

// Every number here may have come from a worker: no arithmetic on one may wrap.
#![deny(clippy::arithmetic_side_effects)]

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::request::Endpoint;

/// Choice indexes from this one on are not a worker's (a request has at most this many choices):
/// their usage and text are ignored.
pub const MAX_CHOICES: usize = 1024;

/// Where every count and amount the gateway keeps stops: 2^53, the largest integer below which
/// doubles (Redis' Lua numbers, JSON readers) are exact, and far inside the ledger's BIGINTs. A
/// worker's usage is capped here as it is read; a client's numbers as admission reads them.
pub const COUNT_CAP: u64 = 1 << 53;

/// Token counts as a worker reports them in `usage`, each at most `COUNT_CAP`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Prompt tokens served from the prefix cache (a subset of `prompt_tokens`).
    pub cached_tokens: u64,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u64,
    /// Absent or `null` in answers that generate nothing (embeddings).
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<WireDetails>,
}

#[derive(Deserialize)]
struct WireDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

impl Usage {
    /// Parses a `usage` member's value; `null` or anything unreadable is `None`. Counts past
    /// `COUNT_CAP` (no worker's, but a worker's number is not trusted) are `COUNT_CAP`.
    pub fn from_json(value: &[u8]) -> Option<Self> {
        let wire: Option<WireUsage> = serde_json::from_slice(value).ok()?;
        wire.map(|w| Self {
            prompt_tokens: w.prompt_tokens.min(COUNT_CAP),
            completion_tokens: w.completion_tokens.unwrap_or(0).min(COUNT_CAP),
            cached_tokens: w
                .prompt_tokens_details
                .and_then(|d| d.cached_tokens)
                .unwrap_or(0)
                .min(COUNT_CAP),
        })
    }
}

/// Sums a stream's cumulative per-choice usage into the request's usage.
///
/// With `continuous_usage_stats`, vLLM puts on each choice chunk the usage of that choice alone
/// (its prompt's tokens and that choice's completion tokens so far); the final usage-only chunk
/// has the request's total. Until that final chunk arrives (a stream cut short), the total is
/// every prompt's tokens once plus every choice's latest completion count.
#[derive(Debug, Clone)]
pub struct StreamUsage {
    n: u64,
    /// Latest (prompt, completion) tokens per choice index.
    choices: Vec<(u64, u64)>,
    cached: u64,
    total: Option<Usage>,
}

impl StreamUsage {
    pub fn new(n: u64) -> Self {
        Self {
            n: n.max(1),
            choices: Vec::new(),
            cached: 0,
            total: None,
        }
    }

    /// Takes one event's usage: `choice` is its choice index, `None` for the usage-only event.
    /// An index from `MAX_CHOICES` on is not one a worker makes, and is ignored.
    pub fn observe(&mut self, choice: Option<u64>, usage: Usage) {
        match choice.map(|c| usize::try_from(c).unwrap_or(usize::MAX)) {
            None => self.total = Some(usage),
            Some(index) if index >= MAX_CHOICES => {}
            Some(index) => {
                if self.choices.len() <= index {
                    self.choices.resize(index.saturating_add(1), (0, 0));
                }
                self.choices[index] = (usage.prompt_tokens, usage.completion_tokens);
                if self.total.is_none() {
                    self.cached = self.cached.max(usage.cached_tokens);
                }
            }
        }
    }

    pub fn usage(&self) -> Usage {
        if let Some(total) = self.total {
            return total;
        }
        let n = usize::try_from(self.n).unwrap_or(usize::MAX);
        Usage {
            // Every choice of a prompt repeats that prompt's count; take it once per prompt.
            prompt_tokens: self
                .choices
                .chunks(n)
                .map(|c| c.iter().map(|u| u.0).max().unwrap_or(0))
                .fold(0, u64::saturating_add)
                .min(COUNT_CAP),
            completion_tokens: self
                .choices
                .iter()
                .map(|u| u.1)
                .fold(0, u64::saturating_add)
                .min(COUNT_CAP),
            cached_tokens: self.cached,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The response reached its end at the client.
    Completed,
    /// The client went away first.
    Cancelled,
    /// The gateway or the worker failed, or the worker refused the request.
    Failed,
    /// The process died while the request ran; billed for the usage it had relayed by then, as
    /// far as the journal knew it.
    Interrupted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UsageSource {
    /// Counts are the worker's own `usage`.
    Worker,
    /// The worker reported nothing before the request ended; the gateway counted the prompt
    /// with the worker's tokenizer and the completion from what it relayed (see `counting`).
    Gateway,
    /// Nothing was counted: the request never reached a worker, failed, or could not be
    /// counted; counts are zero.
    None,
}

impl Status {
    /// The name stored in the ledger (the same as the serialised form).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Cancelled => "cancelled",
            Self::Failed => "failed",
            Self::Interrupted => "interrupted",
        }
    }
}

impl UsageSource {
    /// The name stored in the ledger (the same as the serialised form).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Worker => "worker",
            Self::Gateway => "gateway",
            Self::None => "none",
        }
    }
}

/// One request's usage: the record the meter makes, the journal stores, the binding hands to the
/// control plane, the ledger writes and the billing surfaces render. Its serialised member names are
/// the ledger's columns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageEvent {
    pub event_id: Arc<str>,
    pub request_id: Arc<str>,
    pub tenant_id: Arc<str>,
    pub key_id: Arc<str>,
    pub model: Arc<str>,
    pub worker: Option<Arc<str>>,
    pub endpoint: Endpoint,
    pub stream: bool,
    pub status: Status,
    pub http_status: u16,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    pub usage_source: UsageSource,
    pub started_at_ms: u64,
    pub finished_at_ms: u64,
}

/// A request's ids, minted as it arrives and before it is admitted: its usage event's id (unique,
/// the ledger's idempotency key), its request id (the client's `X-Request-Id`, else the event
/// id), and its start, by which its event is priced and bucketed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventIds {
    pub event_id: Arc<str>,
    pub request_id: Arc<str>,
    pub started_at_ms: u64,
}

impl EventIds {
    pub fn mint(client_request_id: Option<&str>) -> Self {
        let started_at_ms = now_ms();
        let mut text = uuid::Uuid::encode_buffer();
        let event_id: Arc<str> = new_event_id(started_at_ms)
            .hyphenated()
            .encode_lower(&mut text)
            .into();
        Self {
            request_id: client_request_id.map_or_else(|| event_id.clone(), Arc::from),
            event_id,
            started_at_ms,
        }
    }
}

/// A new event id, a UUIDv7 whose timestamp is `ms` (the request's start) and whose 74 random
/// bits come from `uuid`'s thread-local generator (no system call per id).
pub fn new_event_id(ms: u64) -> Uuid {
    let ts = uuid::Timestamp::from_unix(
        uuid::NoContext,
        ms / 1000,
        u32::try_from(ms % 1000)
            .unwrap_or(0)
            .saturating_mul(1_000_000),
    );
    Uuid::new_v7(ts)
}

/// Now, in unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Prices in micro-units of currency per million tokens of each class.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub prompt: u64,
    pub cached: u64,
    pub completion: u64,
}

impl Price {
    /// The cost of `usage` in micro-units, rounded up: neither budgets nor the ledger round in a tenant's favour.
    /// Cached prompt tokens are priced as cached, the rest of the prompt as prompt.
    pub fn cost(&self, usage: &Usage) -> u64 {
        let cached = usage.cached_tokens.min(usage.prompt_tokens);
        let uncached = usage.prompt_tokens.saturating_sub(cached);
        // Each product of two u64 fits a u128; their sum saturates (at 3 × 2^128, never reached
        // by u64 inputs, but the type cannot know that).
        let fine = (u128::from(uncached).saturating_mul(u128::from(self.prompt)))
            .saturating_add(u128::from(cached).saturating_mul(u128::from(self.cached)))
            .saturating_add(
                u128::from(usage.completion_tokens).saturating_mul(u128::from(self.completion)),
            );
        u64::try_from(fine.div_ceil(1_000_000)).unwrap_or(u64::MAX)
    }
}

/// A completed, non-streaming completions event of `completion_tokens` for tests: tenant `t`,
/// key `k`, model `m`, 3 prompt tokens of which 1 cached, ids `e` and `r`.
#[cfg(test)]
pub(crate) fn test_event(status: Status, completion_tokens: u64) -> UsageEvent {
    UsageEvent {
        event_id: "e".into(),
        request_id: "r".into(),
        tenant_id: "t".into(),
        key_id: "k".into(),
        model: "m".into(),
        worker: None,
        endpoint: Endpoint::Completions,
        stream: false,
        status,
        http_status: 200,
        prompt_tokens: 3,
        cached_tokens: 1,
        completion_tokens,
        usage_source: UsageSource::Worker,
        started_at_ms: 0,
        finished_at_ms: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_parses_worker_shapes() {
        let usage = Usage::from_json(
            br#"{"prompt_tokens":5,"total_tokens":8,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":2}}"#,
        );
        assert_eq!(
            usage,
            Some(Usage {
                prompt_tokens: 5,
                completion_tokens: 3,
                cached_tokens: 2
            })
        );
        assert_eq!(
            Usage::from_json(
                br#"{"prompt_tokens":5,"completion_tokens":0,"prompt_tokens_details":null}"#
            )
            .map(|u| u.cached_tokens),
            Some(0)
        );
        assert_eq!(Usage::from_json(b"null"), None);
        for embeddings in [
            &br#"{"prompt_tokens":4,"total_tokens":4,"completion_tokens":0,"prompt_tokens_details":null,"completion_tokens_details":null}"#[..],
            br#"{"prompt_tokens": 4, "total_tokens": 4}"#,
            br#"{"prompt_tokens":4,"total_tokens":4,"completion_tokens":null}"#,
        ] {
            assert_eq!(
                Usage::from_json(embeddings),
                Some(Usage {
                    prompt_tokens: 4,
                    completion_tokens: 0,
                    cached_tokens: 0
                }),
                "{}",
                String::from_utf8_lossy(embeddings)
            );
        }
        let absurd =
            br#"{"prompt_tokens":18446744073709551615,"completion_tokens":9007199254740993}"#;
        assert_eq!(
            Usage::from_json(absurd),
            Some(Usage {
                prompt_tokens: COUNT_CAP,
                completion_tokens: COUNT_CAP,
                cached_tokens: 0
            }),
            "a worker's count is capped where it is read"
        )
    }

    fn u(prompt: u64, completion: u64) -> Usage {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            cached_tokens: 0,
        }
    }

    #[test]
    fn stream_usage_sums_choices_until_the_total_arrives() {
        // Two prompts (5 and 7 tokens) with n = 2: choices 0,1 are prompt 0; 2,3 prompt 1.
        let mut usage = StreamUsage::new(2);
        usage.observe(Some(0), u(5, 1));
        usage.observe(Some(1), u(5, 1));
        usage.observe(Some(0), u(5, 2));
        usage.observe(Some(3), u(7, 4));
        assert_eq!(usage.usage(), u(12, 2 + 1 + 4));
        usage.observe(None, u(12, 9));
        usage.observe(Some(1), u(5, 3));
        assert_eq!(usage.usage(), u(12, 9), "the final total wins");
    }

    #[test]
    fn stream_usage_with_one_choice_is_the_latest() {
        let mut usage = StreamUsage::new(1);
        usage.observe(Some(0), u(3, 0));
        usage.observe(Some(0), u(3, 1));
        assert_eq!(usage.usage(), u(3, 1));
    }

    #[test]
    fn event_ids_are_unique_v7_uuids() {
        let ids: std::collections::HashSet<Uuid> = (0..10_000).map(|_| new_event_id(42)).collect();
        assert_eq!(ids.len(), 10_000);
        assert!(ids.iter().all(|id| id.get_version_num() == 7));
    }

    #[test]
    fn names_match_the_serialised_form() {
        for status in [Status::Completed, Status::Cancelled, Status::Failed] {
            assert_eq!(
                serde_json::to_value(status).ok(),
                Some(serde_json::Value::from(status.as_str()))
            );
        }
        for endpoint in Endpoint::ALL {
            assert_eq!(
                serde_json::to_value(endpoint).ok(),
                Some(serde_json::Value::from(endpoint.as_str()))
            );
        }
        for source in [UsageSource::Worker, UsageSource::None] {
            assert_eq!(
                serde_json::to_value(source).ok(),
                Some(serde_json::Value::from(source.as_str()))
            );
        }
    }

    #[test]
    fn events_round_trip_through_their_serialised_form() {
        let event = UsageEvent {
            event_id: new_event_id(7).to_string().into(),
            request_id: "r".into(),
            tenant_id: "t".into(),
            key_id: "k".into(),
            model: "m".into(),
            worker: Some("http://w".into()),
            endpoint: Endpoint::ChatCompletions,
            stream: true,
            status: Status::Interrupted,
            http_status: 200,
            prompt_tokens: 1,
            cached_tokens: 2,
            completion_tokens: 3,
            usage_source: UsageSource::Gateway,
            started_at_ms: 7,
            finished_at_ms: 8,
        };
        let json = serde_json::to_value(&event).unwrap_or_default();
        assert_eq!(json["endpoint"], "chat.completions");
        assert_eq!(json["status"], "interrupted");
        assert_eq!(serde_json::from_value::<UsageEvent>(json).ok(), Some(event));
    }

    #[test]
    fn cost_rounds_up_and_prices_cached_tokens_apart() {
        let price = Price {
            prompt: 150_000,
            cached: 75_000,
            completion: 600_000,
        };
        let usage = Usage {
            prompt_tokens: 1000,
            completion_tokens: 10,
            cached_tokens: 400,
        };
        // 600 × 0.15 + 400 × 0.075 + 10 × 0.6 = 90 + 30 + 6 micro-units.
        assert_eq!(price.cost(&usage), 126);
        let one = Usage {
            prompt_tokens: 1,
            completion_tokens: 0,
            cached_tokens: 0,
        };
        assert_eq!(price.cost(&one), 1, "a fraction of a micro-unit rounds up");
        assert_eq!(Price::default().cost(&one), 0);
    }
}
