//! A per-minute rate limit as a generic cell rate algorithm (GCRA): a token bucket of `limit`
//! units refilling continuously at `limit` per minute, stored as one number, the theoretical
//! arrival time (TAT).
//!
//! Times are nanoseconds on a monotonic clock chosen by the caller; the Redis script
//! (`admit.lua`) runs the same arithmetic in microseconds on Redis's clock.

use std::time::Duration;

/// The refill window: a limit is "per minute".
pub const WINDOW_NS: u64 = 60_000_000_000;

/// What a bucket reports for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateInfo {
    pub limit: u64,
    pub remaining: u64,
    /// Time until the bucket is full again.
    pub reset: Duration,
}

impl RateInfo {
    /// A bucket of `limit` whose TAT is `used` ahead of now: what is left of it, and when it is
    /// full again.
    pub fn of(limit: u64, used: Duration) -> Self {
        let window = Duration::from_nanos(WINDOW_NS);
        let free = window.saturating_sub(used).as_nanos();
        let remaining = free
            .saturating_mul(u128::from(limit))
            .checked_div(u128::from(WINDOW_NS))
            .unwrap_or(0);
        Self {
            limit,
            remaining: u64::try_from(remaining).unwrap_or(u64::MAX),
            reset: used,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gcra {
    /// When the bucket will be full again; at or before `now` means full.
    tat_ns: u64,
}

/// The time `units` take to refill at `limit` per window, rounded up.
fn refill_ns(units: u64, limit: u64) -> u64 {
    let ns = u128::from(units)
        .saturating_mul(u128::from(WINDOW_NS))
        .div_ceil(u128::from(limit.max(1)));
    u64::try_from(ns).unwrap_or(u64::MAX)
}

impl Gcra {
    /// Takes `cost` units if the bucket holds them; otherwise takes nothing and returns how long
    /// until it would. A `cost` above `limit` is never admitted: callers cap it.
    pub fn try_take(&mut self, now_ns: u64, limit: u64, cost: u64) -> Result<(), Duration> {
        let next = self
            .tat_ns
            .max(now_ns)
            .saturating_add(refill_ns(cost, limit));
        let ahead = next.saturating_sub(now_ns);
        if ahead > WINDOW_NS {
            return Err(Duration::from_nanos(ahead.saturating_sub(WINDOW_NS)));
        }
        self.tat_ns = next;
        Ok(())
    }

    /// Whether `try_take` would succeed, without taking.
    pub fn check(&self, now_ns: u64, limit: u64, cost: u64) -> Result<(), Duration> {
        self.clone().try_take(now_ns, limit, cost)
    }

    /// Settles a reservation: gives back `units` not used (`delta` < 0) or takes the excess
    /// used beyond it (`delta` > 0), which may leave the bucket in debt.
    pub fn adjust(&mut self, now_ns: u64, limit: u64, delta: i64) {
        let base = self.tat_ns.max(now_ns);
        let span = refill_ns(delta.unsigned_abs(), limit);
        self.tat_ns = if delta >= 0 {
            base.saturating_add(span)
        } else {
            base.saturating_sub(span).max(now_ns)
        };
    }

    pub fn info(&self, now_ns: u64, limit: u64) -> RateInfo {
        RateInfo::of(
            limit,
            Duration::from_nanos(self.tat_ns.saturating_sub(now_ns)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn a_full_bucket_admits_its_limit_then_refuses() {
        let mut bucket = Gcra::default();
        let now = 100 * SECOND;
        for _ in 0..6 {
            assert!(bucket.try_take(now, 6, 1).is_ok());
        }
        // One unit refills every 10 s.
        assert_eq!(
            bucket.try_take(now, 6, 1),
            Err(Duration::from_secs(10)),
            "the refusal says when one unit is back"
        );
        assert_eq!(bucket.info(now, 6).remaining, 0);
        assert_eq!(bucket.info(now, 6).reset, Duration::from_secs(60));
        assert!(bucket.try_take(now + 10 * SECOND, 6, 1).is_ok());
    }

    #[test]
    fn refill_is_continuous_at_the_configured_rate() {
        let mut bucket = Gcra::default();
        let now = 5 * SECOND;
        assert!(bucket.try_take(now, 120, 120).is_ok());
        // 120 per minute is 2 per second.
        assert_eq!(bucket.info(now + SECOND, 120).remaining, 2);
        assert_eq!(bucket.info(now + 30 * SECOND, 120).remaining, 60);
        assert_eq!(
            bucket.info(now + 90 * SECOND, 120).remaining,
            120,
            "never above the limit"
        );
    }

    #[test]
    fn a_refused_take_consumes_nothing() {
        let mut bucket = Gcra::default();
        assert!(bucket.try_take(0, 10, 8).is_ok());
        let before = bucket;
        assert!(bucket.try_take(0, 10, 3).is_err());
        assert_eq!(bucket, before);
        assert!(bucket.check(0, 10, 2).is_ok());
        assert_eq!(bucket, before, "check takes nothing");
    }

    #[test]
    fn adjust_refunds_and_charges_debt() {
        let mut bucket = Gcra::default();
        assert!(bucket.try_take(0, 100, 100).is_ok());
        bucket.adjust(0, 100, -40);
        assert_eq!(bucket.info(0, 100).remaining, 40);
        bucket.adjust(0, 100, 90);
        assert_eq!(bucket.info(0, 100).remaining, 0);
        // 50 units in debt: full again at 90 s, so one unit fits again from 30.6 s on.
        assert!(bucket.try_take(30 * SECOND, 100, 1).is_err());
        assert!(bucket.try_take(31 * SECOND, 100, 1).is_ok());
        let mut full = Gcra::default();
        full.adjust(0, 100, -1_000);
        assert_eq!(full.info(0, 100).remaining, 100, "a refund never overfills");
    }
}
