//! Requests refused to a known principal (after its key was accepted), counted by tenant, key
//! and reason until the control plane drains the counts into the ledger's refusal rollups, where
//! a tenant sees its 429s over time. Requests refused before authentication have no tenant: they
//! are in `/metrics` only.
//!
//! Not durable, unlike usage: counts not yet drained are lost with the process. A refusal bills
//! nothing, and a reason is one of the core's own codes, never a client's string, so a flood of
//! refusals grows no table: at most keys × reasons entries between two drains.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use serde::Serialize;

use crate::auth::Principal;

/// Refusals of one key for one reason since the last drain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refused {
    pub tenant_id: String,
    pub key_id: String,
    /// The error's code (`ApiError::reason`), such as `rate_limit_exceeded`.
    pub reason: &'static str,
    pub count: u64,
}

#[derive(Debug, Default)]
pub struct Refusals {
    counts: Mutex<HashMap<(Principal, &'static str), u64>>,
}

impl Refusals {
    /// Counts one refusal of `principal`'s request for `reason`.
    pub fn add(&self, principal: &Principal, reason: &'static str) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        match counts.get_mut(&(principal.clone(), reason)) {
            Some(count) => *count = count.saturating_add(1),
            None => {
                counts.insert((principal.clone(), reason), 1);
            }
        }
    }

    /// Takes every count since the last drain, by tenant, key and reason.
    pub fn drain(&self) -> Vec<Refused> {
        let counts =
            std::mem::take(&mut *self.counts.lock().unwrap_or_else(PoisonError::into_inner));
        let mut drained: Vec<Refused> = counts
            .into_iter()
            .map(|((principal, reason), count)| Refused {
                tenant_id: principal.tenant_id.to_string(),
                key_id: principal.key_id.to_string(),
                reason,
                count,
            })
            .collect();
        drained.sort_by(|a, b| {
            (&a.tenant_id, &a.key_id, a.reason).cmp(&(&b.tenant_id, &b.key_id, b.reason))
        });
        drained
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn principal(tenant: &str, key: &str) -> Principal {
        Principal {
            tenant_id: Arc::from(tenant),
            key_id: Arc::from(key),
        }
    }

    #[test]
    fn counts_by_tenant_key_and_reason_until_drained() {
        let refusals = Refusals::default();
        let (a, b) = (principal("ten_a", "key_a"), principal("ten_b", "key_b"));
        refusals.add(&a, "rate_limit_exceeded");
        refusals.add(&a, "rate_limit_exceeded");
        refusals.add(&a, "insufficient_quota");
        refusals.add(&b, "rate_limit_exceeded");
        let drained = refusals.drain();
        let counts: Vec<_> = drained
            .iter()
            .map(|r| (r.tenant_id.as_str(), r.reason, r.count))
            .collect();
        assert_eq!(
            counts,
            [
                ("ten_a", "insufficient_quota", 1),
                ("ten_a", "rate_limit_exceeded", 2),
                ("ten_b", "rate_limit_exceeded", 1),
            ]
        );
        assert!(refusals.drain().is_empty(), "a drain takes the counts");
        refusals.add(&b, "rate_limit_exceeded");
        assert_eq!(
            refusals.drain()[0].count,
            1,
            "counting starts again from zero"
        );
    }
}
