//! A request's reservation: what admission took from the counters, given back or settled to the
//! actual usage exactly once, on every path.
//!
//! The request's `MeterGuard` owns it and settles it with the usage it records, whether the
//! response completed, failed, or was cut off by a client that went away; a reservation dropped
//! without being settled (a panic, a future dropped mid-flight) releases everything it held
//! and charges nothing.

use std::sync::Arc;

use super::admission::{Demand, RateHeaders};
use super::local::{Actual, Hold};
use super::policy::Price;
use crate::usage::Usage;

/// Where a reservation goes back to: the quota that took it.
pub trait Settle: std::fmt::Debug + Send + Sync {
    /// Releases `holds` in `store` and charges `actual`.
    fn settle(&self, store: Store, request_id: &str, holds: &[Hold], actual: Actual);
}

/// Which counters a reservation was taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    Local,
    Redis,
}

#[derive(Debug)]
pub struct Reservation {
    quota: Arc<dyn Settle>,
    store: Store,
    request_id: String,
    holds: Vec<Hold>,
    demand: Demand,
    price: Option<Price>,
    headers: RateHeaders,
    settled: bool,
}

impl Reservation {
    pub(super) fn new(
        quota: Arc<dyn Settle>,
        store: Store,
        request_id: String,
        holds: Vec<Hold>,
        demand: Demand,
        price: Option<Price>,
        headers: RateHeaders,
    ) -> Self {
        Self {
            quota,
            store,
            request_id,
            holds,
            demand,
            price,
            headers,
            settled: false,
        }
    }

    /// The rate limits as they stood right after this reservation, for `x-ratelimit-*`.
    pub fn headers(&self) -> &RateHeaders {
        &self.headers
    }

    pub fn demand(&self) -> &Demand {
        &self.demand
    }

    /// Releases the holds and charges `usage` (priced at the model's price when admitted).
    pub fn settle(mut self, usage: &Usage) {
        self.settle_with(usage);
    }

    fn settle_with(&mut self, usage: &Usage) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        let actual = Actual {
            tokens: usage.prompt_tokens.saturating_add(usage.completion_tokens),
            money: self.price.map_or(0, |p| p.cost(usage)),
        };
        self.quota
            .settle(self.store, &self.request_id, &self.holds, actual);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.settle_with(&Usage::default());
    }
}
