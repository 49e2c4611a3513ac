//! Quota counters in Redis, shared by every replica.
//!
//! Admissions are decided by `admit.lua`, atomically per request and timed by Redis's clock;
//! settlements by `settle.lua`. Both are batched the way a database batches group commits: a task
//! per direction sends everything that queued while its previous script ran, as one script call,
//! so under load Redis reads and writes each scope once per batch rather than once per request,
//! and at low load a request waits for nobody. Settlements leave the request path entirely.
//!
//! Keys of one tenant carry its id as a hash tag (`tg:{ten_…}:…`), so a Redis Cluster keeps them
//! in one slot and a script may touch them all. A hold lives under a lease; if a replica dies
//! before settling, the lease expires after `lease_ms` and a later admission releases it.
//! Settlement is idempotent: it acts only on a hold record it finds, and removes it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;

use super::admission::{
    COUNT_CAP, Demand, Exceeded, Granted, RateHeaders, Refusal, ScopeCheck, Taken,
};
use super::gcra::RateInfo;
use super::local::{Actual, Hold};
use super::policy::Period;
use super::policy::Scope;
use crate::config::QuotaConfig;
use crate::usage::now_ms;

/// Most requests decided, or settled, by one script call.
const BATCH: usize = 256;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(String),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis answered with an unexpected reply: {0}")]
    Reply(String),
    #[error("the quota store has stopped")]
    Stopped,
}

type Decision = Result<Result<Granted, Refusal>, StoreError>;

/// A request waiting for the next admission batch.
struct AdmitJob {
    request_id: String,
    checks: Vec<ScopeCheck>,
    demand: Demand,
    decided: oneshot::Sender<Decision>,
}

/// A request waiting for the next settlement batch.
#[derive(Debug)]
struct SettleJob {
    request_id: String,
    holds: Vec<Hold>,
    actual: Actual,
}

/// How far the settlements have got: how many were ever queued, and how many of those (the
/// oldest, as they are sent in order) have been sent or given up.
#[derive(Debug, Default)]
struct SettleProgress {
    queued: AtomicU64,
    /// Release on increment, acquire on read: whoever sees a count sees those sends done.
    done: AtomicU64,
    changed: Notify,
}

impl SettleProgress {
    fn finished(&self, count: usize) {
        let count = u64::try_from(count).unwrap_or(u64::MAX);
        self.done.fetch_add(count, Ordering::Release);
        self.changed.notify_waiters();
    }

    fn unsent(&self) -> u64 {
        let done = self.done.load(Ordering::Acquire);
        self.queued.load(Ordering::Acquire).saturating_sub(done)
    }

    /// Waits until the first `target` settlements are sent, for at most `timeout`.
    async fn reached(&self, target: u64, timeout: Duration) {
        let wait = async {
            loop {
                let changed = self.changed.notified();
                if self.done.load(Ordering::Acquire) >= target {
                    return;
                }
                changed.await;
            }
        };
        let _ = tokio::time::timeout(timeout, wait).await;
    }
}

/// Queues settlements, counting them in `progress`.
#[derive(Debug, Clone)]
struct SettleQueue {
    jobs: mpsc::UnboundedSender<SettleJob>,
    progress: Arc<SettleProgress>,
}

impl SettleQueue {
    fn push(&self, job: SettleJob) {
        self.progress.queued.fetch_add(1, Ordering::AcqRel);
        if self.jobs.send(job).is_err() {
            self.progress.finished(1);
            tracing::error!("quota settlement dropped: the settlement task has stopped");
        }
    }
}

#[derive(Debug)]
pub struct RedisStore {
    admissions: mpsc::UnboundedSender<AdmitJob>,
    settlements: SettleQueue,
}

impl std::fmt::Debug for AdmitJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdmitJob")
            .field("request_id", &self.request_id)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store connecting lazily (and reconnecting) to `url`, and its two tasks, which end once
    /// the store is dropped and their queues are empty. Must be called on a tokio runtime.
    pub fn new(url: &str, config: &QuotaConfig) -> Result<(Self, [JoinHandle<()>; 2]), StoreError> {
        let redis_error = |e: redis::RedisError| StoreError::Redis(e.to_string());
        let client = redis::Client::open(url).map_err(redis_error)?;
        let timeout = config.redis_timeout();
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout.max(Duration::from_millis(200))))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let conn =
            ConnectionManager::new_lazy_with_config(client, manager_config).map_err(redis_error)?;
        let names = KeyNames {
            prefix: config.redis_prefix.clone(),
        };
        let (settle_tx, settle_rx) = mpsc::unbounded_channel();
        let settlements = SettleQueue {
            jobs: settle_tx,
            progress: Arc::default(),
        };
        let (admit_tx, admit_rx) = mpsc::unbounded_channel();
        let tasks = [
            tokio::spawn(run_admissions(
                conn.clone(),
                names.clone(),
                (config.lease_ms, timeout),
                admit_rx,
                settlements.clone(),
            )),
            tokio::spawn(run_settlements(
                conn,
                names,
                settle_rx,
                settlements.progress.clone(),
                Duration::from_millis(config.lease_ms),
            )),
        ];
        let store = Self {
            admissions: admit_tx,
            settlements,
        };
        Ok((store, tasks))
    }

    /// Checks and reserves, in the next admission batch; `Err` when Redis did not answer that
    /// batch within the timeout (a reservation made after that is released at once). The time
    /// spent queued behind the previous batch does not count: a busy moment is not an outage.
    pub async fn admit(
        &self,
        request_id: &str,
        checks: &[ScopeCheck],
        demand: &Demand,
    ) -> Decision {
        let (decided, decision) = oneshot::channel();
        let job = AdmitJob {
            request_id: request_id.to_owned(),
            checks: checks.to_vec(),
            demand: *demand,
            decided,
        };
        if self.admissions.send(job).is_err() {
            return Err(StoreError::Stopped);
        }
        // The admission task answers every job: with a decision, or with the error of a script
        // call that failed or outlived the timeout.
        decision.await.unwrap_or(Err(StoreError::Stopped))
    }

    /// Queues the settlement of a request's holds for the next settlement batch.
    pub fn settle(&self, request_id: &str, holds: &[Hold], actual: Actual) {
        self.settlements.push(SettleJob {
            request_id: request_id.to_owned(),
            holds: holds.to_vec(),
            actual,
        });
    }

    /// Waits for the queued settlements, for at most `timeout`; returns whether none is left.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let now = tokio::time::Instant::now();
        let deadline = now.checked_add(timeout).unwrap_or(now);
        while self.settlements.progress.unsent() > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }
}

#[derive(Debug, Clone)]
struct KeyNames {
    prefix: String,
}

impl KeyNames {
    /// The scope's state hash; its lease set is named after it.
    fn state(&self, scope: &Scope) -> String {
        match &scope.key {
            None => format!("{}{{{}}}:t", self.prefix, scope.tenant),
            Some(key) => format!("{}{{{}}}:k:{key}", self.prefix, scope.tenant),
        }
    }
}

/// A batch's KEYS: every distinct scope once, as its (state, leases) pair.
#[derive(Default)]
struct BatchKeys {
    positions: HashMap<Scope, usize>,
    keys: Vec<String>,
}

impl BatchKeys {
    /// The 1-based position of `scope`'s pair.
    fn position(&mut self, scope: &Scope, names: &KeyNames) -> usize {
        if let Some(&position) = self.positions.get(scope) {
            return position;
        }
        let state = names.state(scope);
        self.keys.push(state);
        self.keys.push(format!(
            "{}:leases",
            self.keys.last().map_or("", String::as_str)
        ));
        let position = self.keys.len() / 2;
        self.positions.insert(scope.clone(), position);
        position
    }
}

/// A count or amount as the scripts read it: at most `COUNT_CAP`, where Lua's doubles are still
/// exact.
fn count(value: u64) -> u64 {
    value.min(COUNT_CAP)
}

/// A limit as the scripts read it: -1 for none, else at most `COUNT_CAP - 1`, below any count
/// `count` caps.
fn limit(value: Option<u64>) -> i64 {
    value.map_or(-1, |v| {
        i64::try_from(v.min(COUNT_CAP - 1)).unwrap_or(i64::MAX)
    })
}

/// Decides batches of admissions until the store is dropped; a script call that takes longer
/// than `timeout` fails its batch. A batch goes after every settlement queued before it (waiting
/// at most `timeout` for them): a client that sends its next request once its last one ended
/// finds that one's concurrency slot and spend settled, however far the settlements lag.
async fn run_admissions(
    mut conn: ConnectionManager,
    names: KeyNames,
    (lease_ms, timeout): (u64, Duration),
    mut jobs: mpsc::UnboundedReceiver<AdmitJob>,
    settlements: SettleQueue,
) {
    let script = Script::new(include_str!("admit.lua"));
    let mut batch = Vec::with_capacity(BATCH);
    while jobs.recv_many(&mut batch, BATCH).await > 0 {
        let queued = settlements.progress.queued.load(Ordering::Acquire);
        settlements.progress.reached(queued, timeout).await;
        let mut keys = BatchKeys::default();
        let mut invocation = script.prepare_invoke();
        let unix_ms = now_ms();
        let (day, month) = (Period::Day.window(unix_ms), Period::Month.window(unix_ms));
        invocation
            .arg(lease_ms)
            .arg(day.id)
            .arg(month.id)
            .arg(day.end_ms.saturating_sub(unix_ms))
            .arg(month.end_ms.saturating_sub(unix_ms))
            .arg(batch.len());
        let mut taken: Vec<Vec<Taken>> = Vec::with_capacity(batch.len());
        for job in &batch {
            let demand = &job.demand;
            invocation.arg(&job.request_id).arg(job.checks.len());
            let mut scopes = Vec::with_capacity(job.checks.len());
            for check in &job.checks {
                let limits = &check.limits;
                let rate = count(
                    limits
                        .tokens_per_minute
                        .map_or(0, |l| demand.rate_tokens.min(l)),
                );
                let hold_tokens = limits
                    .token_budget
                    .map_or(0, |_| count(demand.budget_tokens));
                let hold_money = limits
                    .money_budget_micros
                    .map_or(0, |_| count(demand.budget_money));
                scopes.push(Taken {
                    rate_tokens: rate,
                    tokens: hold_tokens,
                    money: hold_money,
                });
                invocation
                    .arg(keys.position(&check.scope, &names))
                    .arg(limit(limits.requests_per_minute))
                    .arg(limit(limits.tokens_per_minute))
                    .arg(limit(limits.max_concurrent))
                    .arg(limit(limits.token_budget))
                    .arg(limit(limits.money_budget_micros))
                    .arg(rate)
                    .arg(hold_tokens)
                    .arg(hold_money)
                    .arg(match limits.budget_period {
                        Period::Day => 0,
                        Period::Month => 1,
                    })
                    .arg(format!("{hold_tokens} {hold_money} {rate}"));
            }
            taken.push(scopes);
        }
        for key in &keys.keys {
            invocation.key(key);
        }
        let reply = tokio::time::timeout(timeout, invocation.invoke_async::<Vec<i64>>(&mut conn));
        let decisions = match reply.await {
            Ok(Ok(reply)) => parse_admit_reply(&reply, &batch, taken),
            Ok(Err(error)) => Err(StoreError::Redis(error.to_string())),
            Err(_) => Err(StoreError::Timeout(timeout)),
        };
        match decisions {
            Ok(decisions) => {
                for (job, decision) in batch.drain(..).zip(decisions) {
                    deliver(job, decision, &settlements);
                }
            }
            Err(error) => {
                for job in batch.drain(..) {
                    let _ = job.decided.send(Err(error.clone()));
                }
            }
        }
    }
}

/// Hands a decision to its request; one whose request stopped waiting (it timed out and fell
/// back) is released at once, so it holds nothing until its lease expires.
fn deliver(job: AdmitJob, decision: Result<Granted, Refusal>, settlements: &SettleQueue) {
    let AdmitJob {
        request_id,
        checks,
        decided,
        ..
    } = job;
    let Err(Ok(Ok(granted))) = decided.send(Ok(decision)) else {
        return;
    };
    settlements.push(SettleJob {
        request_id,
        holds: Hold::of(&checks, &granted.taken),
        actual: Actual::default(),
    });
}

/// `admit.lua`'s reply, one decision per job; the rate-limit headers come from the TATs it
/// returns, read against each scope's limits.
fn parse_admit_reply(
    reply: &[i64],
    batch: &[AdmitJob],
    taken: Vec<Vec<Taken>>,
) -> Result<Vec<Result<Granted, Refusal>>, StoreError> {
    let bad = || StoreError::Reply(format!("{reply:?}"));
    let (&now_us, mut rest) = reply.split_first().ok_or_else(bad)?;
    let mut decisions = Vec::with_capacity(batch.len());
    for (job, taken) in batch.iter().zip(taken) {
        let (head, after) = rest.split_at_checked(5).ok_or_else(bad)?;
        let (tats, after) = after
            .split_at_checked(job.checks.len().saturating_mul(2))
            .ok_or_else(bad)?;
        rest = after;
        let mut headers = RateHeaders::default();
        for (check, tat) in job.checks.iter().zip(tats.chunks_exact(2)) {
            let info = |limit: Option<u64>, tat: i64| {
                limit.map(|limit| {
                    let ahead = tat.saturating_sub(now_us).max(0).unsigned_abs();
                    RateInfo::of(limit, Duration::from_micros(ahead))
                })
            };
            headers.merge(
                info(check.limits.requests_per_minute, tat[0]),
                info(check.limits.tokens_per_minute, tat[1]),
            );
        }
        decisions.push(if head[0] == 1 {
            Ok(Granted { taken, headers })
        } else {
            Err(Refusal {
                scope: usize::try_from(head[1].saturating_sub(1)).map_err(|_| bad())?,
                exceeded: Exceeded::from_code(head[2]).ok_or_else(bad)?,
                retry_after: Duration::from_millis(head[3].max(0).unsigned_abs()),
                left: head[4].max(0).unsigned_abs(),
                headers,
            })
        });
    }
    if !rest.is_empty() {
        return Err(bad());
    }
    Ok(decisions)
}

/// Sends settlements in batches until the store is dropped, retrying a batch while Redis is
/// unreachable for up to `give_up_after` (by then its leases have expired and their holds are
/// released anyway). Settlement is idempotent, so a batch that ran but whose answer was lost is
/// safely sent again.
async fn run_settlements(
    mut conn: ConnectionManager,
    names: KeyNames,
    mut jobs: mpsc::UnboundedReceiver<SettleJob>,
    progress: Arc<SettleProgress>,
    give_up_after: Duration,
) {
    let script = Script::new(include_str!("settle.lua"));
    let mut batch = Vec::with_capacity(BATCH);
    while jobs.recv_many(&mut batch, BATCH).await > 0 {
        let mut keys = BatchKeys::default();
        let mut invocation = script.prepare_invoke();
        let unix_ms = now_ms();
        invocation
            .arg(Period::Day.window(unix_ms).id)
            .arg(Period::Month.window(unix_ms).id)
            .arg(batch.len());
        for job in &batch {
            invocation
                .arg(&job.request_id)
                .arg(count(job.actual.tokens))
                .arg(count(job.actual.money))
                .arg(job.holds.len());
            for hold in &job.holds {
                invocation
                    .arg(keys.position(&hold.scope, &names))
                    .arg(limit(hold.tokens_per_minute));
            }
        }
        for key in &keys.keys {
            invocation.key(key);
        }
        let started = tokio::time::Instant::now();
        let mut delay = Duration::from_millis(50);
        loop {
            let error = match invocation.invoke_async::<i64>(&mut conn).await {
                Ok(_) => break,
                Err(error) => error,
            };
            if started.elapsed() > give_up_after {
                tracing::error!(
                    %error,
                    count = batch.len(),
                    "quota settlements given up; their leases have expired"
                );
                break;
            }
            tracing::warn!(%error, count = batch.len(), "quota settlements failed; retrying");
            tokio::time::sleep(delay).await;
            delay = delay.saturating_mul(2).min(Duration::from_secs(2));
        }
        progress.finished(batch.len());
        batch.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::quota::policy::Limits;

    fn job(rpm: Option<u64>, tpm: Option<u64>, scopes: usize) -> AdmitJob {
        let check = ScopeCheck {
            scope: Scope {
                tenant: "t".into(),
                key: None,
            },
            limits: Arc::new(Limits {
                requests_per_minute: rpm,
                tokens_per_minute: tpm,
                ..Limits::default()
            }),
        };
        AdmitJob {
            request_id: "r".into(),
            checks: vec![check; scopes],
            demand: Demand::default(),
            decided: oneshot::channel().0,
        }
    }

    #[test]
    fn admit_replies_parse() {
        let now = 1_000_000_000_000;
        let batch = [job(Some(60), None, 1), job(Some(10), Some(100), 2)];
        // First: admitted, 6 s of a 60-per-minute bucket used: 54 left, full again in 6 s.
        // Second: refused by its second scope's token budget, retry in 5 s.
        let reply = [
            now,
            1,
            0,
            0,
            0,
            0,
            now + 6_000_000,
            0,
            0,
            2,
            4,
            5000,
            123,
            0,
            0,
            0,
            now + 60_000_000,
        ];
        let taken = || vec![vec![Taken::default()], vec![Taken::default(); 2]];
        let decisions = parse_admit_reply(&reply, &batch, taken()).unwrap_or_default();
        let granted = decisions[0].clone().unwrap_or_default();
        let requests = granted.headers.requests;
        assert_eq!(requests.map(|r| (r.limit, r.remaining)), Some((60, 54)));
        assert_eq!(requests.map(|r| r.reset), Some(Duration::from_secs(6)));
        let refusal = decisions[1].clone().err();
        assert_eq!(refusal.as_ref().map(|r| r.scope), Some(1));
        assert_eq!(
            refusal.as_ref().map(|r| (r.exceeded, r.left)),
            Some((Exceeded::TokenBudget, 123))
        );
        assert_eq!(
            refusal.as_ref().map(|r| r.retry_after),
            Some(Duration::from_secs(5))
        );
        let headers = refusal.map(|r| r.headers).unwrap_or_default();
        assert_eq!(
            headers.requests.map(|r| r.remaining),
            Some(10),
            "a past TAT: a full bucket"
        );
        assert_eq!(headers.tokens.map(|r| r.remaining), Some(0));
        assert!(parse_admit_reply(&reply[..10], &batch, taken()).is_err());
        let mut longer = reply.to_vec();
        longer.push(1);
        assert!(parse_admit_reply(&longer, &batch, taken()).is_err());
    }

    #[test]
    fn numbers_reach_the_scripts_exact() {
        assert_eq!(count(u64::MAX), COUNT_CAP);
        assert_eq!(count(7), 7);
        assert_eq!(limit(None), -1);
        assert_eq!(
            limit(Some(u64::MAX)),
            i64::try_from(COUNT_CAP - 1).unwrap_or(0)
        );
    }

    #[test]
    fn batch_keys_name_each_scope_once() {
        let names = KeyNames {
            prefix: "tg:".into(),
        };
        let mut keys = BatchKeys::default();
        let tenant = Scope {
            tenant: "ten_a".into(),
            key: None,
        };
        let key = Scope {
            tenant: "ten_a".into(),
            key: Some("key_b".into()),
        };
        assert_eq!(keys.position(&tenant, &names), 1);
        assert_eq!(keys.position(&key, &names), 2);
        assert_eq!(keys.position(&tenant, &names), 1);
        assert_eq!(
            keys.keys,
            [
                "tg:{ten_a}:t",
                "tg:{ten_a}:t:leases",
                "tg:{ten_a}:k:key_b",
                "tg:{ten_a}:k:key_b:leases"
            ]
        );
    }
}
