//! The simulator's hold, its own control route (`/sim/hold`, not part of vLLM's protocol): while
//! it is on, every generation and embedding request that has a sequence slot waits there, before
//! its prefill, until it is released, as an engine that has stalled would. A test holds a worker to
//! keep a state (a full worker, a queue in the gateway) for as long as it looks at it, instead of
//! for a TTFT that a busy machine may outrun.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Deserialize;
use tokio::sync::watch;

#[derive(Debug)]
pub(crate) struct Hold {
    held: watch::Sender<bool>,
    /// Requests waiting at the hold now. `Relaxed`: a tally that orders no other memory.
    holding: AtomicU64,
}

/// `POST /sim/hold`: `{"held": true}` holds from the next request on; `{"held": false}` releases
/// every request held.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HoldUpdate {
    held: bool,
}

impl Default for Hold {
    fn default() -> Self {
        Self {
            held: watch::Sender::new(false),
            holding: AtomicU64::new(0),
        }
    }
}

impl Hold {
    pub(crate) fn apply(&self, update: &HoldUpdate) {
        self.held.send_replace(update.held);
    }

    /// Returns at once unless held; then when released, or never if the request is dropped first
    /// (it is no longer counted as held then).
    pub(crate) async fn pass(&self) {
        let mut held = self.held.subscribe();
        if !*held.borrow_and_update() {
            return;
        }
        self.holding.fetch_add(1, Ordering::Relaxed);
        let _counted = Counted(&self.holding);
        // The sender lives in `self`, which outlives this wait: it cannot close.
        let _ = held.wait_for(|held| !*held).await;
    }

    /// `{"held":…,"holding":…}`: whether it holds, and how many requests wait at it now.
    pub(crate) fn body(&self) -> Vec<u8> {
        serde_json::json!({
            "held": *self.held.borrow(),
            "holding": self.holding.load(Ordering::Relaxed),
        })
        .to_string()
        .into_bytes()
    }
}

/// Takes a held request off the tally when it passes or is dropped.
struct Counted<'a>(&'a AtomicU64);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on a bad fixture")]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn body(hold: &Hold) -> serde_json::Value {
        serde_json::from_slice(&hold.body()).unwrap()
    }

    fn update(json: &str) -> HoldUpdate {
        serde_json::from_str(json).unwrap()
    }

    #[tokio::test]
    async fn a_held_request_waits_until_released_and_a_dropped_one_is_no_longer_counted() {
        let hold = Arc::new(Hold::default());
        hold.pass().await;
        hold.apply(&update(r#"{"held":true}"#));
        let waiting = tokio::spawn({
            let hold = Arc::clone(&hold);
            async move { hold.pass().await }
        });
        let dropped = tokio::spawn({
            let hold = Arc::clone(&hold);
            async move { hold.pass().await }
        });
        while body(&hold)["holding"] != 2 {
            tokio::task::yield_now().await;
        }
        dropped.abort();
        assert!(dropped.await.unwrap_err().is_cancelled());
        assert_eq!(body(&hold), serde_json::json!({"held": true, "holding": 1}));
        assert!(!waiting.is_finished());
        hold.apply(&update(r#"{"held":false}"#));
        waiting.await.unwrap();
        assert_eq!(
            body(&hold),
            serde_json::json!({"held": false, "holding": 0})
        );
    }

    #[test]
    fn an_update_names_held_and_nothing_else() {
        for bad in [r#"{}"#, r#"{"held":1}"#, r#"{"held":true,"x":1}"#] {
            assert!(serde_json::from_str::<HoldUpdate>(bad).is_err(), "{bad}");
        }
    }
}
