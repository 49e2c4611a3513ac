//! The circuit breaker of one worker: a worker whose answers fail past a threshold is ejected
//! from rotation for a backoff that doubles with each ejection in a row, after which one real
//! request, its trial, decides whether it returns.
//!
//! It judges how a worker answers, not whether it is up: a refused connection is the health
//! check's business (`Worker::set_healthy`, down until a good probe), and a 4xx is the client's
//! fault, so it counts as an answer. What is a failure is the caller's to say (`pipeline::attempt`
//! reports each attempt, `relay` a stream that breaks after its first event).
//!
//! The trip conditions, either one enough: `consecutive_failures` failures in a row, or at least
//! `failure_percent` percent of the last `window` outcomes, once `min_requests` of them are in.
//! An ejected worker is open until its backoff runs out (`backoff`, then twice that at each
//! ejection that follows a return before the worker has served `max(window,
//! consecutive_failures)` requests, at most `max_backoff`); then it is half-open: the next
//! request placed on it is its trial. A trial that gets an answer closes the breaker with an empty
//! window; one that fails opens it again for the next backoff; one that ends with neither (its
//! client left) gives the trial to the next request.
//!
//! Why a real request and not a probe of the gateway's own: `/health` stays 200 on a worker that
//! fails half its generations, and an inference of the gateway's own would spend tokens no tenant
//! is billed for (the worker's counters would then exceed the ledger's). A trial that fails is
//! retried on another worker like any failed attempt, before a byte reaches its client: the client
//! pays one failed attempt's latency per backoff at most.
//!
//! Time is `tokio::time::Instant`, so tests run on a paused clock.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::{MAX_BREAKER_WINDOW as MAX_WINDOW, RoutingConfig};

/// When a worker is ejected, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Failures in a row that eject; 0 turns this trigger off.
    pub consecutive_failures: u32,
    /// Outcomes the failure rate is taken over (at most [`MAX_WINDOW`]); 0 turns it off.
    pub window: u32,
    /// Outcomes in the window before its rate can eject.
    pub min_requests: u32,
    /// Failures, in percent of the window's outcomes, that eject.
    pub failure_percent: u32,
    /// The first ejection's length; each one in a row doubles it.
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl BreakerSettings {
    /// A breaker that never trips.
    pub const OFF: Self = Self {
        consecutive_failures: 0,
        window: 0,
        min_requests: 1,
        failure_percent: 100,
        backoff: Duration::ZERO,
        max_backoff: Duration::ZERO,
    };

    pub fn of(routing: &RoutingConfig) -> Self {
        Self {
            consecutive_failures: routing.breaker_consecutive_failures,
            window: routing.breaker_window.min(MAX_WINDOW),
            min_requests: routing.breaker_min_requests.max(1),
            failure_percent: routing.breaker_failure_percent.clamp(1, 100),
            backoff: Duration::from_millis(routing.breaker_backoff_ms.max(1)),
            max_backoff: Duration::from_millis(
                routing
                    .breaker_max_backoff_ms
                    .max(routing.breaker_backoff_ms),
            ),
        }
    }

    fn enabled(&self) -> bool {
        self.consecutive_failures > 0 || self.window > 0
    }

    /// Outcomes after a return that end a run of ejections: the next one starts from `backoff`.
    fn probation(&self) -> u32 {
        self.window.max(self.consecutive_failures)
    }

    /// The length of the `streak`-th ejection in a row (the first is 1).
    fn backoff_for(&self, streak: u32) -> Duration {
        let doublings = streak.saturating_sub(1).min(31);
        self.backoff
            .saturating_mul(1 << doublings)
            .min(self.max_backoff)
    }
}

/// Whether a worker may take a request, as far as its breaker is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// In rotation.
    Closed,
    /// Half-open: its backoff has run out and no trial is under way; the next request placed on it
    /// is its trial.
    Trial,
    /// Out of rotation: its backoff runs, or its trial is under way.
    Ejected,
}

/// Why a worker was ejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trip {
    /// This many failures in a row.
    Consecutive(u32),
    /// `failed` of the last `of` outcomes failed.
    Rate { failed: u32, of: u32 },
    /// Its trial request failed.
    Trial,
}

impl fmt::Display for Trip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Consecutive(n) => write!(f, "{n} failures in a row"),
            Self::Rate { failed, of } => write!(f, "{failed} of its last {of} requests failed"),
            Self::Trial => f.write_str("its trial request failed"),
        }
    }
}

/// A change of a breaker's state that the worker logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Ejected {
        trip: Trip,
        backoff: Duration,
    },
    /// Its trial got an answer; it was out of rotation for `out_for`.
    Returned {
        out_for: Duration,
    },
}

/// What `/metrics` shows of a breaker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BreakerStats {
    /// Out of rotation now (open or half-open).
    pub ejected: bool,
    pub ejections: u64,
    pub returns: u64,
    /// Trial requests sent to it while half-open.
    pub trials: u64,
}

#[derive(Debug)]
pub struct Breaker {
    settings: BreakerSettings,
    /// Whether `state.phase` is `Closed`, for the request path's check without the lock.
    /// Relaxed: a hint that publishes nothing; a request that reads it stale lands on a worker
    /// that was ejected a moment ago, which is harmless, and every transition is decided under
    /// the lock.
    closed: AtomicBool,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    phase: Phase,
    failures_in_a_row: u32,
    window: Window,
    /// Ejections since the worker last served its probation.
    streak: u32,
    /// Outcomes since its last return (or since the start).
    since_return: u32,
    stats: BreakerStats,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    Closed,
    /// Out of rotation since `since`, until `until`; `trial` while a trial request is under way.
    Open {
        since: Instant,
        until: Instant,
        trial: bool,
    },
}

/// The last `capacity` outcomes, a bit each (1: failed), in a ring.
#[derive(Debug, Default)]
struct Window {
    bits: u64,
    capacity: u32,
    len: u32,
    next: u32,
    failures: u32,
}

impl Window {
    fn new(capacity: u32) -> Self {
        Self {
            capacity: capacity.min(MAX_WINDOW),
            ..Self::default()
        }
    }

    fn push(&mut self, failed: bool) {
        if self.capacity == 0 {
            return;
        }
        let bit = 1u64 << self.next;
        if self.len == self.capacity {
            if self.bits & bit != 0 {
                self.failures = self.failures.saturating_sub(1);
            }
        } else {
            self.len = self.len.saturating_add(1);
        }
        if failed {
            self.bits |= bit;
            self.failures = self.failures.saturating_add(1);
        } else {
            self.bits &= !bit;
        }
        self.next = (self.next.saturating_add(1)) % self.capacity;
    }

    fn clear(&mut self) {
        *self = Self::new(self.capacity);
    }
}

impl Breaker {
    pub fn new(settings: BreakerSettings) -> Self {
        Self {
            settings,
            closed: AtomicBool::new(true),
            state: Mutex::new(State {
                phase: Phase::Closed,
                failures_in_a_row: 0,
                window: Window::new(settings.window),
                streak: 0,
                since_return: 0,
                stats: BreakerStats::default(),
            }),
        }
    }

    pub fn admission(&self) -> Admission {
        if self.closed.load(Ordering::Relaxed) {
            return Admission::Closed;
        }
        match self.lock().phase {
            Phase::Closed => Admission::Closed,
            Phase::Open { until, trial, .. } => {
                if !trial && Instant::now() >= until {
                    Admission::Trial
                } else {
                    Admission::Ejected
                }
            }
        }
    }

    /// Makes the request being placed on the worker its trial, if it is half-open with no trial
    /// under way; `true` when it did.
    pub fn claim_trial(&self) -> bool {
        if self.closed.load(Ordering::Relaxed) {
            return false;
        }
        let mut state = self.lock();
        let State { phase, stats, .. } = &mut *state;
        match phase {
            Phase::Open { until, trial, .. } if !*trial && Instant::now() >= *until => {
                *trial = true;
                stats.trials = stats.trials.saturating_add(1);
                true
            }
            _ => false,
        }
    }

    /// The trial request ended with neither an answer nor a failure (its client left, or it
    /// never reached the worker): the next request placed on the worker is its trial.
    pub fn abandon_trial(&self) {
        if let Phase::Open { trial, .. } = &mut self.lock().phase {
            *trial = false;
        }
    }

    /// A request on the worker got an answer (`failed` false) or failed; `trial` when it was
    /// the worker's trial. Outcomes of other requests while it is out of rotation (placed before
    /// its ejection, or while every worker was ejected) change nothing.
    pub fn record(&self, failed: bool, trial: bool) -> Option<Change> {
        if !self.settings.enabled() {
            return None;
        }
        let now = Instant::now();
        let mut state = self.lock();
        match state.phase {
            Phase::Closed => self.closed_outcome(&mut state, failed, now),
            Phase::Open {
                since, trial: true, ..
            } if trial => {
                if failed {
                    Some(self.eject(&mut state, Trip::Trial, since, now))
                } else {
                    state.phase = Phase::Closed;
                    state.failures_in_a_row = 0;
                    state.window.clear();
                    state.since_return = 0;
                    state.stats.returns = state.stats.returns.saturating_add(1);
                    state.stats.ejected = false;
                    self.closed.store(true, Ordering::Relaxed);
                    Some(Change::Returned {
                        out_for: now.saturating_duration_since(since),
                    })
                }
            }
            Phase::Open { .. } => None,
        }
    }

    fn closed_outcome(&self, state: &mut State, failed: bool, now: Instant) -> Option<Change> {
        let settings = &self.settings;
        state.failures_in_a_row = if failed {
            state.failures_in_a_row.saturating_add(1)
        } else {
            0
        };
        state.window.push(failed);
        state.since_return = state.since_return.saturating_add(1);
        let window = &state.window;
        let trip = if settings.consecutive_failures > 0
            && state.failures_in_a_row >= settings.consecutive_failures
        {
            Some(Trip::Consecutive(state.failures_in_a_row))
        } else if settings.window > 0
            && window.len >= settings.min_requests
            && u64::from(window.failures) * 100
                >= u64::from(settings.failure_percent) * u64::from(window.len)
        {
            Some(Trip::Rate {
                failed: window.failures,
                of: window.len,
            })
        } else {
            None
        };
        match trip {
            Some(trip) => Some(self.eject(state, trip, now, now)),
            None => {
                if state.since_return >= settings.probation() {
                    state.streak = 0;
                }
                None
            }
        }
    }

    /// Opens the breaker (again) at `now`; `since` is when the worker left rotation.
    fn eject(&self, state: &mut State, trip: Trip, since: Instant, now: Instant) -> Change {
        state.streak = state.streak.saturating_add(1);
        let backoff = self.settings.backoff_for(state.streak);
        state.phase = Phase::Open {
            since,
            until: now.checked_add(backoff).unwrap_or(now),
            trial: false,
        };
        state.stats.ejections = state.stats.ejections.saturating_add(1);
        state.stats.ejected = true;
        self.closed.store(false, Ordering::Relaxed);
        Change::Ejected { trip, backoff }
    }

    pub fn stats(&self) -> BreakerStats {
        self.lock().stats
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every change under the lock is made whole before anything that could panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn settings() -> BreakerSettings {
        BreakerSettings {
            consecutive_failures: 5,
            window: 20,
            min_requests: 10,
            failure_percent: 40,
            backoff: 100 * MS,
            max_backoff: 350 * MS,
        }
    }

    /// Records `outcomes` ('F' failed, '.' answered) as ordinary requests; the last change.
    fn feed(breaker: &Breaker, outcomes: &str) -> Option<Change> {
        outcomes
            .chars()
            .filter_map(|c| breaker.record(c == 'F', false))
            .last()
    }

    fn ejected(trip: Trip, ms: u64) -> Option<Change> {
        Some(Change::Ejected {
            trip,
            backoff: Duration::from_millis(ms),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn failures_in_a_row_eject_and_an_answer_resets_the_count() {
        let breaker = Breaker::new(settings());
        assert_eq!(feed(&breaker, "FFFF.FFFF"), None);
        assert_eq!(breaker.admission(), Admission::Closed);
        assert_eq!(feed(&breaker, "F"), ejected(Trip::Consecutive(5), 100));
        assert_eq!(breaker.admission(), Admission::Ejected);
        let stats = breaker.stats();
        assert!(stats.ejected);
        assert_eq!((stats.ejections, stats.returns, stats.trials), (1, 0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn the_failure_rate_ejects_once_the_window_has_its_minimum() {
        let breaker = Breaker::new(settings());
        // 4 of 9 failed (44%), but fewer than 10 outcomes: no judgement yet.
        assert_eq!(feed(&breaker, "F.F.F.F.."), None);
        // 4 of 10 is 40%.
        assert_eq!(
            feed(&breaker, "."),
            ejected(Trip::Rate { failed: 4, of: 10 }, 100)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_forgets_what_slid_out_of_it() {
        let breaker = Breaker::new(BreakerSettings {
            consecutive_failures: 0,
            min_requests: 20,
            ..settings()
        });
        // 7 of 20 (35%); then each failure pushes an older failure out: still 7 of 20.
        assert_eq!(feed(&breaker, &format!("FFFFFFF{}", ".".repeat(13))), None);
        assert_eq!(feed(&breaker, "FFFFFFF"), None);
        // Now it pushes an answer out: 8 of 20.
        assert_eq!(
            feed(&breaker, "F"),
            ejected(Trip::Rate { failed: 8, of: 20 }, 100)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn after_its_backoff_one_trial_decides_and_an_answer_returns_it() {
        let breaker = Breaker::new(settings());
        feed(&breaker, "FFFFF");
        tokio::time::advance(99 * MS).await;
        assert_eq!(breaker.admission(), Admission::Ejected);
        assert!(!breaker.claim_trial());
        tokio::time::advance(MS).await;
        assert_eq!(breaker.admission(), Admission::Trial);
        assert!(breaker.claim_trial());
        // One trial at a time.
        assert_eq!(breaker.admission(), Admission::Ejected);
        assert!(!breaker.claim_trial());
        // Requests placed before the ejection end meanwhile: they decide nothing.
        assert_eq!(breaker.record(true, false), None);
        assert_eq!(breaker.record(false, false), None);
        tokio::time::advance(5 * MS).await;
        assert_eq!(
            breaker.record(false, true),
            Some(Change::Returned { out_for: 105 * MS })
        );
        assert_eq!(breaker.admission(), Admission::Closed);
        let stats = breaker.stats();
        assert!(!stats.ejected);
        assert_eq!((stats.ejections, stats.returns, stats.trials), (1, 1, 1));
        // The window starts empty: 4 failures are not 5 in a row, nor judged as a rate yet.
        assert_eq!(feed(&breaker, "FFFF"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_trial_doubles_the_backoff_up_to_its_maximum() {
        let breaker = Breaker::new(settings());
        feed(&breaker, "FFFFF");
        for backoff in [200, 350, 350] {
            tokio::time::advance(Duration::from_secs(1)).await;
            assert!(breaker.claim_trial());
            assert_eq!(breaker.record(true, true), ejected(Trip::Trial, backoff));
            tokio::time::advance(Duration::from_millis(backoff - 1)).await;
            assert_eq!(breaker.admission(), Admission::Ejected);
        }
        let stats = breaker.stats();
        assert_eq!((stats.ejections, stats.returns, stats.trials), (4, 0, 3));
        tokio::time::advance(MS).await;
        assert!(breaker.claim_trial());
        // Out since the first ejection: three seconds and the last three backoffs' tails.
        let out_for = Duration::from_millis(3 * 1000 + 199 + 349 + 349 + 1);
        assert_eq!(
            breaker.record(false, true),
            Some(Change::Returned { out_for })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_return_before_probation_keeps_the_streak_and_probation_ends_it() {
        let breaker = Breaker::new(settings());
        feed(&breaker, "FFFFF");
        tokio::time::advance(100 * MS).await;
        assert!(breaker.claim_trial());
        breaker.record(false, true);
        // Ejected again before 20 outcomes since the return: a run of ejections, 200 ms.
        assert_eq!(
            feed(&breaker, "..FFFFF"),
            ejected(Trip::Consecutive(5), 200)
        );
        tokio::time::advance(200 * MS).await;
        assert!(breaker.claim_trial());
        breaker.record(false, true);
        // 20 outcomes served since the return: the next ejection starts over at 100 ms.
        assert_eq!(feed(&breaker, &".".repeat(20)), None);
        assert_eq!(feed(&breaker, "FFFFF"), ejected(Trip::Consecutive(5), 100));
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_trial_passes_to_the_next_request() {
        let breaker = Breaker::new(settings());
        feed(&breaker, "FFFFF");
        tokio::time::advance(100 * MS).await;
        assert!(breaker.claim_trial());
        breaker.abandon_trial();
        assert_eq!(breaker.admission(), Admission::Trial);
        assert!(breaker.claim_trial());
        assert_eq!(breaker.stats().trials, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn with_both_triggers_off_nothing_ejects() {
        let breaker = Breaker::new(BreakerSettings::OFF);
        assert_eq!(feed(&breaker, &"F".repeat(100)), None);
        assert_eq!(breaker.admission(), Admission::Closed);
        let only_rate = Breaker::new(BreakerSettings {
            consecutive_failures: 0,
            ..settings()
        });
        assert_eq!(
            feed(&only_rate, &"F".repeat(10)),
            ejected(Trip::Rate { failed: 10, of: 10 }, 100)
        );
    }

    #[test]
    fn backoffs_double_without_overflow() {
        let s = BreakerSettings {
            max_backoff: Duration::MAX,
            ..settings()
        };
        assert_eq!(s.backoff_for(1), 100 * MS);
        assert_eq!(s.backoff_for(4), 800 * MS);
        assert_eq!(s.backoff_for(u32::MAX), 100 * MS * (1 << 31));
    }
}
