//! `Overhead`: the stopwatch of a request's time in the gateway itself, apart from the time it
//! waits on a worker (`tokengate_gateway_overhead_seconds`), and `Arrival`, which a surface hands
//! the pipeline with it. It only measures; the surfaces and the pipeline say when the gateway's
//! turn starts and ends, and the meter observes the total.

use std::time::Duration;

use tokio::time::Instant;
use tracing::Span;

/// Time accumulated over the request's gateway-side stretches: from its receipt to its upstream
/// request (less the read of its body), again after a failed attempt, once the worker's answer
/// is in (a complete body, or each read of a stream while it is relayed), until its usage event
/// is recorded.
#[derive(Debug, Clone, Copy)]
pub struct Overhead {
    spent: Duration,
    /// When the stretch running now began; `None` while the request waits on someone else.
    since: Option<Instant>,
}

impl Overhead {
    /// A request just received: the gateway's turn.
    pub fn start() -> Self {
        Self {
            spent: Duration::ZERO,
            since: Some(Instant::now()),
        }
    }

    /// The request now waits on a worker (or its client): the stretch ends.
    pub fn pause(&mut self) {
        if let Some(since) = self.since.take() {
            self.spent = self.spent.saturating_add(since.elapsed());
        }
    }

    /// The gateway's turn again; a stretch already running goes on.
    pub fn resume(&mut self) {
        if self.since.is_none() {
            self.since = Some(Instant::now());
        }
    }

    /// The time accumulated, the stretch running now included; ends it.
    pub fn total(&mut self) -> Duration {
        self.pause();
        self.spent
    }
}

/// What a surface hands the pipeline with a request besides the request itself: the gateway's
/// time on it so far, and its root span (`Span::none()` while tracing is off).
#[derive(Debug)]
pub struct Arrival {
    pub overhead: Overhead,
    pub trace: Span,
}

impl Arrival {
    /// A request arriving now, untraced.
    pub fn now() -> Self {
        Self {
            overhead: Overhead::start(),
            trace: Span::none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn counts_the_gateways_stretches_only() {
        let mut overhead = Overhead::start();
        tokio::time::advance(Duration::from_millis(2)).await;
        overhead.pause();
        // The worker's time.
        tokio::time::advance(Duration::from_millis(100)).await;
        overhead.pause();
        overhead.resume();
        tokio::time::advance(Duration::from_millis(3)).await;
        overhead.resume();
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(overhead.total(), Duration::from_millis(6));
        tokio::time::advance(Duration::from_millis(50)).await;
        assert_eq!(overhead.total(), Duration::from_millis(6));
    }
}
