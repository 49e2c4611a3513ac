//! The simulated engine: sequence slots (capacity and queueing), the prefill/decode clock, token
//! counting (embeddings' prompts too), and the seeded dice of failure injection.
//!
//! It knows nothing of HTTP or JSON; `handlers.rs` drives a `Generation` and `sse.rs` /
//! `response.rs` render what it produced.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::config::SimConfig;
use super::faults::Faults;
use super::hold::Hold;
use super::metrics::{Metrics, Outcome};
use super::plan::{Finish, Plan};
use super::response::{ApiError, json_string};
use super::tokens::splitmix64;
use super::traces::Traceparents;

/// Shared state of one simulated worker.
#[derive(Debug)]
pub(crate) struct Engine {
    pub config: SimConfig,
    pub metrics: Metrics,
    /// The failure rates now (the config's until `/sim/faults` changes them).
    pub faults: Faults,
    /// The served model name, JSON-encoded once.
    pub model_json: String,
    /// The `traceparent` of the latest requests (`/sim/traceparents`).
    pub traceparents: Traceparents,
    /// Stalls admitted requests before their prefill while on (`/sim/hold`).
    pub hold: Hold,
    slots: Arc<Semaphore>,
    errors: Dice,
    deaths: Dice,
    ids: Dice,
}

impl Engine {
    /// `config` must already be normalized (at least one slot).
    pub(crate) fn new(config: SimConfig) -> Self {
        let clock = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Self {
            metrics: Metrics::new(&config.model, config.max_num_seqs, config.max_model_len),
            faults: Faults::new(&config),
            model_json: json_string(&config.model),
            traceparents: Traceparents::default(),
            hold: Hold::default(),
            slots: Arc::new(Semaphore::new(config.max_num_seqs)),
            errors: Dice::new(config.seed, 1),
            deaths: Dice::new(config.seed, 2),
            // Ids must differ between runs, so they are seeded from the clock, not the config.
            ids: Dice::new(clock, 3),
            config,
        }
    }

    /// Whether this generation request fails with a 500 (`error_rate`).
    pub(crate) fn roll_error(&self) -> bool {
        let hit = self.errors.hit(self.faults.error_rate());
        if hit {
            self.faults.injected(true);
        }
        hit
    }

    /// Whether this streaming request's connection dies halfway (`die_rate`).
    pub(crate) fn roll_death(&self) -> bool {
        let hit = self.deaths.hit(self.faults.die_rate());
        if hit {
            self.faults.injected(false);
        }
        hit
    }

    /// 32 lowercase hex digits, like the uuid4 hex vLLM uses for ids.
    pub(crate) fn random_hex(&self) -> String {
        format!("{:016x}{:016x}", self.ids.next(), self.ids.next())
    }

    /// Waits for a sequence slot, counted as waiting meanwhile and as running while held, then
    /// at the hold (`/sim/hold`) while it is on.
    async fn admit(self: &Arc<Self>) -> Result<Slot, ApiError> {
        let waiting = Waiting::enter(&self.metrics);
        let permit = Arc::clone(&self.slots).acquire_owned().await.map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the simulated engine is shut down",
            )
        })?;
        // Running goes up before waiting goes down, so a scrape never sees the request in neither.
        self.metrics.running_delta(true);
        drop(waiting);
        let slot = Slot {
            _permit: permit,
            engine: Arc::clone(self),
        };
        self.hold.pass().await;
        Ok(slot)
    }
}

impl Engine {
    /// An embeddings request of `inputs` prompts, `prompt_tokens` tokens in all, as vLLM's
    /// pooling runner serves it: it waits for a slot and the prefill (TTFT), then counts its
    /// prompt tokens and each input as a request finished with `stop`; nothing is generated.
    /// Dropped before the end (the client left), it counts nothing.
    pub(crate) async fn pool(
        self: &Arc<Self>,
        inputs: u64,
        prompt_tokens: u64,
    ) -> Result<(), ApiError> {
        let arrived = Instant::now();
        let slot = self.admit().await?;
        sleep(Duration::from_millis(self.config.ttft_ms)).await;
        let metrics = &self.metrics;
        metrics.add_prompt_tokens(prompt_tokens);
        metrics.observe_ttft(arrived.elapsed());
        metrics.add_outcome(Outcome::Finished(Finish::Stop), inputs);
        metrics.observe_e2e(arrived.elapsed());
        drop(slot);
        Ok(())
    }
}

/// Deterministic uniform draws: the k-th draw of a seed and stream is always the same.
#[derive(Debug)]
struct Dice {
    key: u64,
    counter: AtomicU64,
}

impl Dice {
    fn new(seed: u64, stream: u64) -> Self {
        Self {
            key: splitmix64(seed ^ splitmix64(stream)),
            counter: AtomicU64::new(0),
        }
    }

    fn next(&self) -> u64 {
        // Relaxed: the counter only hands out distinct draw numbers; nothing else is ordered by it.
        let k = self.counter.fetch_add(1, Ordering::Relaxed);
        splitmix64(self.key ^ splitmix64(k))
    }

    /// True with probability `rate`; rates of 0 and 1 draw nothing.
    fn hit(&self, rate: f64) -> bool {
        if rate <= 0.0 {
            return false;
        }
        if rate >= 1.0 {
            return true;
        }
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < rate
    }
}

/// Holds `vllm:num_requests_waiting` up while a request queues for a slot.
struct Waiting<'a>(&'a Metrics);

impl<'a> Waiting<'a> {
    fn enter(metrics: &'a Metrics) -> Self {
        metrics.waiting_delta(true);
        Self(metrics)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting_delta(false);
    }
}

/// A held sequence slot: released, and `running` decremented, on drop (cancellation included).
#[derive(Debug)]
struct Slot {
    _permit: OwnedSemaphorePermit,
    engine: Arc<Engine>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.engine.metrics.running_delta(false);
    }
}

/// Where a generation is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Queued,
    Decoding,
    Done,
}

/// One request going through the engine: queue, prefill (TTFT), then decode steps, one token per
/// unfinished choice per step. Tokens are counted the moment a step runs, so a generation dropped
/// between steps (client gone) has counted exactly the tokens it produced. Dropping it before
/// `finish`/`fail` counts its choices as aborted.
#[derive(Debug)]
pub(crate) struct Generation {
    engine: Arc<Engine>,
    plan: Plan,
    arrived: Instant,
    slot: Option<Slot>,
    state: State,
    /// Decode steps done: every choice has generated `min(step, choice.tokens)` tokens.
    step: u32,
    steps: u32,
    next_token_at: Instant,
}

impl Generation {
    pub(crate) fn new(engine: Arc<Engine>, plan: Plan) -> Self {
        let now = Instant::now();
        Self {
            steps: plan.steps(),
            engine,
            plan,
            arrived: now,
            slot: None,
            state: State::Queued,
            step: 0,
            next_token_at: now,
        }
    }

    pub(crate) fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Decode steps done so far.
    pub(crate) fn step(&self) -> u32 {
        self.step
    }

    /// Decode steps in all.
    pub(crate) fn steps(&self) -> u32 {
        self.steps
    }

    pub(crate) fn is_done(&self) -> bool {
        self.step >= self.steps
    }

    pub(crate) fn itl(&self) -> Duration {
        Duration::from_millis(self.engine.config.itl_ms)
    }

    /// Waits for a slot, then for TTFT; then counts the prompt tokens as prefilled.
    pub(crate) async fn prefill(&mut self) -> Result<(), ApiError> {
        let slot = self.engine.admit().await?;
        self.slot = Some(slot);
        sleep(Duration::from_millis(self.engine.config.ttft_ms)).await;
        let metrics = &self.engine.metrics;
        metrics.add_prompt_tokens(self.plan.prefilled_prompt_tokens());
        let now = Instant::now();
        metrics.observe_ttft(now - self.arrived);
        self.next_token_at = now;
        self.state = State::Decoding;
        Ok(())
    }

    /// Waits until the next decode step is due (`itl` after the previous one; the first is due
    /// at once).
    pub(crate) async fn wait_for_step(&mut self) {
        if self.next_token_at > Instant::now() {
            tokio::time::sleep_until(self.next_token_at).await;
        }
    }

    /// Runs one decode step and counts its tokens; returns the token position it generated.
    pub(crate) fn decode_step(&mut self) -> u32 {
        let pos = self.step;
        let tokens = self.plan.choices.iter().filter(|c| c.tokens > pos).count();
        self.engine.metrics.add_generation_tokens(tokens as u64);
        self.step += 1;
        self.next_token_at += self.itl();
        pos
    }

    /// Runs every remaining step at once (inter-token latency 0).
    pub(crate) fn decode_rest(&mut self) {
        let done = self.step;
        let remaining: u64 = self
            .plan
            .choices
            .iter()
            .map(|c| u64::from(c.tokens.saturating_sub(done)))
            .sum();
        self.engine.metrics.add_generation_tokens(remaining);
        self.step = self.steps;
    }

    /// Runs the remaining steps on the engine's clock.
    pub(crate) async fn decode_all(&mut self) {
        if self.itl().is_zero() {
            self.decode_rest();
            return;
        }
        while !self.is_done() {
            self.wait_for_step().await;
            self.decode_step();
        }
    }

    /// Tokens choice `index` has generated so far.
    pub(crate) fn generated(&self, index: usize) -> u32 {
        self.plan
            .choices
            .get(index)
            .map_or(0, |c| c.tokens.min(self.step))
    }

    /// Completes the request: success counted per choice, slot released.
    pub(crate) fn finish(&mut self) {
        if self.state == State::Done {
            return;
        }
        self.state = State::Done;
        let metrics = &self.engine.metrics;
        for choice in &self.plan.choices {
            metrics.add_outcome(Outcome::Finished(choice.finish), 1);
        }
        metrics.observe_e2e(self.arrived.elapsed());
        self.slot = None;
    }

    /// Ends the request as failed (the simulated worker died), slot released.
    pub(crate) fn fail(&mut self) {
        if self.state == State::Done {
            return;
        }
        self.state = State::Done;
        let choices = self.plan.choices.len() as u64;
        self.engine.metrics.add_outcome(Outcome::Error, choices);
        self.slot = None;
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        if self.state != State::Done {
            let choices = self.plan.choices.len() as u64;
            self.engine.metrics.add_outcome(Outcome::Abort, choices);
        }
    }
}

/// `tokio::time::sleep`, skipped entirely for zero (no timer registration, no yield).
async fn sleep(d: Duration) {
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on a bad fixture")]
mod tests {
    use super::*;
    use crate::request;

    fn engine(config: SimConfig) -> Arc<Engine> {
        Arc::new(Engine::new(config.normalized()))
    }

    fn plan(engine: &Engine, body: &str) -> Plan {
        request::completion(body.as_bytes(), &engine.config).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn excess_requests_wait_for_a_slot_and_show_as_waiting() {
        let engine = engine(SimConfig {
            max_num_seqs: 1,
            ttft_ms: 100,
            itl_ms: 10,
            ..SimConfig::default()
        });
        let plan = plan(&engine, r#"{"prompt":"a b","max_tokens":3}"#);
        let start = Instant::now();
        let run = |engine: Arc<Engine>, plan: Plan| async move {
            let mut g = Generation::new(engine, plan);
            g.prefill().await.unwrap();
            g.decode_all().await;
            g.finish();
            Instant::now()
        };
        let a = tokio::spawn(run(Arc::clone(&engine), plan.clone()));
        let b = tokio::spawn(run(Arc::clone(&engine), plan));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (running, waiting, prompt, generated) = engine.metrics.snapshot();
        assert_eq!((running, waiting, prompt, generated), (1, 1, 0, 0));
        let (a, b) = (a.await.unwrap(), b.await.unwrap());
        // TTFT 100 ms, then two more tokens 10 ms apart; the second request starts after.
        assert_eq!(
            (a - start, b - start),
            (Duration::from_millis(120), Duration::from_millis(240))
        );
        assert_eq!(engine.metrics.snapshot(), (0, 0, 2 * 3, 2 * 3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_generation_counted_exactly_what_it_generated() {
        let engine = engine(SimConfig {
            itl_ms: 20,
            ..SimConfig::default()
        });
        let plan = plan(&engine, r#"{"prompt":"x","max_tokens":10,"n":3}"#);
        let mut g = Generation::new(Arc::clone(&engine), plan);
        g.prefill().await.unwrap();
        for _ in 0..4 {
            g.wait_for_step().await;
            g.decode_step();
        }
        // The prompt (2 tokens) counts once per sequence, as vLLM counts it.
        assert_eq!(engine.metrics.snapshot(), (1, 0, 2 * 3, 4 * 3));
        drop(g);
        assert_eq!(engine.metrics.snapshot(), (1 - 1, 0, 2 * 3, 4 * 3));
        let text = engine.metrics.render();
        let aborted = text
            .lines()
            .find(|l| l.contains("finished_reason=\"abort\""));
        assert!(aborted.unwrap().ends_with("} 3.0"), "{text}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_dropped_while_queued_leaves_no_trace_in_the_gauges() {
        let engine = engine(SimConfig {
            max_num_seqs: 1,
            ..SimConfig::default()
        });
        let held = engine.admit().await.unwrap();
        let mut g = Generation::new(Arc::clone(&engine), plan(&engine, r#"{"prompt":"x"}"#));
        let queued = tokio::time::timeout(Duration::from_millis(5), g.prefill()).await;
        assert!(queued.is_err());
        drop(g);
        assert_eq!(engine.metrics.snapshot(), (1, 0, 0, 0));
        drop(held);
        assert_eq!(engine.metrics.snapshot(), (0, 0, 0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn embeddings_count_their_prompts_after_the_prefill_and_generate_nothing() {
        let engine = engine(SimConfig {
            max_num_seqs: 1,
            ttft_ms: 100,
            ..SimConfig::default()
        });
        let start = Instant::now();
        let pooled = tokio::spawn({
            let engine = Arc::clone(&engine);
            async move { engine.pool(2, 7).await.map(|()| Instant::now()) }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(engine.metrics.snapshot(), (1, 0, 0, 0));
        let done = pooled.await.unwrap().unwrap();
        assert_eq!(done - start, Duration::from_millis(100));
        assert_eq!(engine.metrics.snapshot(), (0, 0, 7, 0));
        let text = engine.metrics.render();
        let stopped = text
            .lines()
            .find(|l| l.contains("finished_reason=\"stop\""));
        assert!(stopped.unwrap().ends_with("} 2.0"), "{text}");
    }

    #[test]
    fn dice_are_deterministic_per_seed_and_respect_the_rate() {
        let draws = |seed| {
            let dice = Dice::new(seed, 1);
            (0..1000).map(|_| dice.hit(0.3)).collect::<Vec<_>>()
        };
        assert_eq!(draws(42), draws(42));
        assert_ne!(draws(42), draws(43));
        let hits = draws(42).iter().filter(|&&h| h).count();
        assert!((200..400).contains(&hits), "{hits}");
        let dice = Dice::new(0, 1);
        assert!(dice.hit(1.0) && !dice.hit(0.0));
    }
}
