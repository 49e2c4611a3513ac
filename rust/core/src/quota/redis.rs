//! Quota counters in Redis, shared by every replica: one atomic script per admission
//! (`admit.lua`), timed by Redis's clock, and one per settlement (`settle.lua`), sent in
//! pipelined batches off the request path.
//!
//! Keys of one tenant carry its id as a hash tag (`tg:{ten_…}:…`), so a Redis Cluster keeps
//! them in one slot and a script may touch them all. A hold lives under a lease; if a replica
//! dies before settling, the lease expires after `lease_ms` and the next admission releases it.
//! Settlement is idempotent: it acts only on a hold record it finds, and removes it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError, Script, ServerErrorKind};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::admission::{Demand, Exceeded, Granted, RateHeaders, Refusal, Scope, ScopeCheck};
use super::enforcer::unix_ms;
use super::gcra::RateInfo;
use super::local::{Actual, Hold};
use super::policy::{Limits, Period};
use crate::config::QuotaConfig;

/// Most settlements sent in one pipeline.
const SETTLE_BATCH: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis answered with an unexpected reply: {0}")]
    Reply(String),
}

/// One settlement's script invocation, ready to send.
#[derive(Debug)]
struct Settlement {
    keys: Vec<String>,
    args: Vec<String>,
}

pub struct RedisStore {
    conn: ConnectionManager,
    admit: Script,
    prefix: String,
    timeout: Duration,
    lease_ms: u64,
    settlements: mpsc::UnboundedSender<Settlement>,
    /// Settlements queued and not yet sent or given up. Release on decrement, acquire on read,
    /// so a flush that sees 0 sees the sends done.
    unsent: Arc<AtomicUsize>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store connecting lazily (and reconnecting) to `url`, and the task that sends its
    /// settlements; that task ends once the store is dropped and every settlement is sent (or
    /// given up after `lease_ms`). Must be called on a tokio runtime.
    pub fn new(url: &str, config: &QuotaConfig) -> Result<(Self, JoinHandle<()>), StoreError> {
        let client = redis::Client::open(url)?;
        let timeout = config.redis_timeout();
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout.max(Duration::from_millis(200))))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client, manager_config)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let unsent = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(send_settlements(
            conn.clone(),
            rx,
            unsent.clone(),
            Duration::from_millis(config.lease_ms),
        ));
        let store = Self {
            conn,
            admit: Script::new(include_str!("admit.lua")),
            prefix: config.redis_prefix.clone(),
            timeout,
            lease_ms: config.lease_ms,
            settlements: tx,
            unsent,
        };
        Ok((store, task))
    }

    /// The scope's state hash; its lease set is named after it.
    fn state_key(&self, scope: &Scope) -> String {
        match &scope.key {
            None => format!("{}{{{}}}:t", self.prefix, scope.tenant),
            Some(key) => format!("{}{{{}}}:k:{key}", self.prefix, scope.tenant),
        }
    }

    /// Checks and reserves in one script; `Err` only when Redis could not answer.
    pub async fn admit(
        &self,
        request_id: &str,
        checks: &[ScopeCheck],
        demand: &Demand,
    ) -> Result<Result<Granted, Refusal>, StoreError> {
        let mut invocation = self.admit.prepare_invoke();
        let unix_ms = unix_ms();
        let (day, month) = (Period::Day.window(unix_ms), Period::Month.window(unix_ms));
        invocation
            .arg(request_id)
            .arg(self.lease_ms)
            .arg(checks.len())
            .arg(day.id)
            .arg(month.id)
            .arg(day.end_ms.saturating_sub(unix_ms))
            .arg(month.end_ms.saturating_sub(unix_ms))
            .arg(demand.prompt_tokens)
            .arg(demand.prompt_money);
        let mut rate_tokens = Vec::with_capacity(checks.len());
        for check in checks {
            let state = self.state_key(&check.scope);
            let limits: &Limits = &check.limits;
            invocation.key(&state).key(format!("{state}:leases"));
            let limit = |l: Option<u64>| l.map_or(-1, |v| i64::try_from(v).unwrap_or(i64::MAX));
            let rate = limits
                .tokens_per_minute
                .map_or(0, |l| demand.rate_tokens.min(l));
            rate_tokens.push(rate);
            let (hold_tokens, hold_money) = if limits.has_budget() {
                (demand.budget_tokens, demand.budget_money)
            } else {
                (0, 0)
            };
            invocation
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
                });
        }
        let mut conn = self.conn.clone();
        let reply: Vec<i64> =
            tokio::time::timeout(self.timeout, invocation.invoke_async(&mut conn))
                .await
                .map_err(|_| StoreError::Timeout(self.timeout))??;
        parse_admit_reply(&reply, checks, rate_tokens)
    }

    /// Queues the settlement of a request's holds; it reaches Redis in the next batch.
    pub fn settle(&self, request_id: &str, holds: &[Hold], actual: Actual) {
        let mut keys = Vec::with_capacity(holds.len() * 2);
        let unix_ms = unix_ms();
        let mut args = vec![
            request_id.to_owned(),
            holds.len().to_string(),
            actual.tokens.to_string(),
            actual.money.to_string(),
            Period::Day.window(unix_ms).id.to_string(),
            Period::Month.window(unix_ms).id.to_string(),
        ];
        for hold in holds {
            let state = self.state_key(&hold.scope);
            let leases = format!("{state}:leases");
            keys.extend([state, leases]);
            args.push(
                hold.tokens_per_minute
                    .map_or_else(|| "-1".to_owned(), |l| l.to_string()),
            );
        }
        self.unsent.fetch_add(1, Ordering::Relaxed);
        if self.settlements.send(Settlement { keys, args }).is_err() {
            self.unsent.fetch_sub(1, Ordering::Release);
            tracing::error!("quota settlement dropped: the sender task has stopped");
        }
    }

    /// Waits for the queued settlements, for at most `timeout`; returns whether none is left.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.unsent.load(Ordering::Acquire) > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }
}

/// `admit.lua`'s reply as an admission result; the rate-limit headers come from the TATs it
/// returns, read against each scope's limits.
fn parse_admit_reply(
    reply: &[i64],
    checks: &[ScopeCheck],
    rate_tokens: Vec<u64>,
) -> Result<Result<Granted, Refusal>, StoreError> {
    let bad = || StoreError::Reply(format!("{reply:?}"));
    let (&admitted, rest) = reply.split_first().ok_or_else(bad)?;
    let (head, rest) = if admitted == 1 {
        (&[][..], rest)
    } else {
        rest.split_at_checked(3).ok_or_else(bad)?
    };
    let (&now_us, tats) = rest.split_first().ok_or_else(bad)?;
    if tats.len() != checks.len() * 2 {
        return Err(bad());
    }
    let mut headers = RateHeaders::default();
    for (check, tat) in checks.iter().zip(tats.chunks_exact(2)) {
        let info = |limit: Option<u64>, tat: i64| {
            limit.map(|limit| rate_info(limit, tat.saturating_sub(now_us).max(0).unsigned_abs()))
        };
        headers.merge(
            info(check.limits.requests_per_minute, tat[0]),
            info(check.limits.tokens_per_minute, tat[1]),
        );
    }
    if admitted == 1 {
        return Ok(Ok(Granted {
            rate_tokens,
            headers,
        }));
    }
    let scope = usize::try_from(head[0] - 1).map_err(|_| bad())?;
    let exceeded = Exceeded::from_code(head[1]).ok_or_else(bad)?;
    Ok(Err(Refusal {
        scope,
        exceeded,
        retry_after: Duration::from_millis(head[2].max(0).unsigned_abs()),
        headers,
    }))
}

/// A bucket's headers from how far ahead of now (µs) its TAT is (see `Gcra::info`).
fn rate_info(limit: u64, used_us: u64) -> RateInfo {
    const WINDOW_US: u64 = 60_000_000;
    let free = WINDOW_US.saturating_sub(used_us);
    let remaining = u128::from(free) * u128::from(limit) / u128::from(WINDOW_US);
    RateInfo {
        limit,
        remaining: u64::try_from(remaining).unwrap_or(u64::MAX),
        reset: Duration::from_micros(used_us),
    }
}

/// Sends queued settlements in pipelined batches until the channel closes, retrying a batch
/// while Redis is unreachable for up to `give_up_after` (by then its leases have expired and
/// their holds are released anyway). Settlements are idempotent, so resending a batch that
/// partly ran is safe.
async fn send_settlements(
    mut conn: ConnectionManager,
    mut rx: mpsc::UnboundedReceiver<Settlement>,
    unsent: Arc<AtomicUsize>,
    give_up_after: Duration,
) {
    let script = Script::new(include_str!("settle.lua"));
    let mut batch = Vec::with_capacity(SETTLE_BATCH);
    while rx.recv_many(&mut batch, SETTLE_BATCH).await > 0 {
        let count = batch.len();
        let started = tokio::time::Instant::now();
        let mut delay = Duration::from_millis(50);
        while !batch.is_empty() {
            let error = match send_batch(&mut conn, &script, &mut batch).await {
                Ok(()) => continue,
                Err(error) => error,
            };
            if started.elapsed() > give_up_after {
                tracing::error!(
                    %error,
                    count = batch.len(),
                    "quota settlements given up; their leases have expired"
                );
                batch.clear();
                break;
            }
            tracing::warn!(%error, count = batch.len(), "quota settlements failed; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
        unsent.fetch_sub(count, Ordering::Release);
    }
}

/// Sends `batch` in one pipeline and removes from it every settlement that ran (or that failed
/// in the script itself, which a resend cannot fix: logged). Leaves those to resend after the
/// script had to be loaded; `Err` when the pipeline itself failed.
async fn send_batch(
    conn: &mut ConnectionManager,
    script: &Script,
    batch: &mut Vec<Settlement>,
) -> Result<(), RedisError> {
    let mut pipe = redis::pipe();
    for settlement in batch.iter() {
        pipe.cmd("EVALSHA")
            .arg(script.get_hash())
            .arg(settlement.keys.len())
            .arg(&settlement.keys)
            .arg(&settlement.args);
    }
    let replies: Vec<redis::Value> = match pipe.query_async(conn).await {
        Ok(replies) => replies,
        Err(error) if error.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
            script.prepare_invoke().load_async(conn).await?;
            return Ok(());
        }
        Err(error) => return Err(error),
    };
    let mut unloaded = false;
    let mut replies = replies.into_iter();
    batch.retain(|_| match replies.next() {
        Some(redis::Value::ServerError(error))
            if error.kind() == Some(ServerErrorKind::NoScript) =>
        {
            unloaded = true;
            true
        }
        Some(redis::Value::ServerError(error)) => {
            tracing::error!(%error, "a quota settlement failed in Redis");
            false
        }
        _ => false,
    });
    if unloaded {
        script.prepare_invoke().load_async(conn).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admit_replies_parse() {
        use std::sync::Arc;
        let check = |rpm: Option<u64>, tpm: Option<u64>| ScopeCheck {
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
        let now = 1_000_000_000_000;
        // 6 s of a 60-per-minute bucket used: 54 left, full again in 6 s.
        let granted = parse_admit_reply(
            &[1, now, now + 6_000_000, 0],
            &[check(Some(60), None)],
            vec![0],
        );
        let granted = granted.ok().and_then(Result::ok).unwrap_or_default();
        let requests = granted.headers.requests;
        assert_eq!(requests.map(|r| (r.limit, r.remaining)), Some((60, 54)));
        assert_eq!(requests.map(|r| r.reset), Some(Duration::from_secs(6)));
        assert_eq!(granted.headers.tokens, None);
        let checks = [check(None, None), check(Some(10), Some(100))];
        let refused = parse_admit_reply(
            &[0, 2, 4, 5000, now, 0, 0, 0, now + 60_000_000],
            &checks,
            vec![0, 0],
        );
        let refusal = refused.ok().and_then(Result::err);
        assert_eq!(refusal.as_ref().map(|r| r.scope), Some(1));
        assert_eq!(
            refusal.as_ref().map(|r| r.exceeded),
            Some(Exceeded::TokenBudget)
        );
        assert_eq!(
            refusal.as_ref().map(|r| r.retry_after),
            Some(Duration::from_secs(5))
        );
        let headers = refusal.map(|r| r.headers).unwrap_or_default();
        assert_eq!(
            headers.requests.map(|r| r.remaining),
            Some(10),
            "a TAT in the past is a full bucket"
        );
        assert_eq!(headers.tokens.map(|r| r.remaining), Some(0));
        assert!(parse_admit_reply(&[1, now], &checks, vec![0]).is_err());
        assert!(parse_admit_reply(&[0, 1, 9, 0, now, 0, 0], &checks[..1], vec![0]).is_err());
    }
}
