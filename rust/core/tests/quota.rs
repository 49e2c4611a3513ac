//! Quota admission against its two stores: in process on a paused clock, and a real
//! `redis-server` on loopback shared by several `Quota`s standing for replicas.

#![expect(clippy::unwrap_used, reason = "tests fail loudly on a bad fixture")]

mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use gateway_core::auth::Principal;
use gateway_core::quota::{Estimate, Exceeded, QueueShare, Quota, QuotaError, Reservation, Scope};
use gateway_core::request::Priority;
use gateway_core::usage::Usage;
use serde_json::json;

/// A `redis-server` on a free loopback port, killed on drop.
struct RedisServer {
    child: Child,
    url: String,
}

impl RedisServer {
    #[expect(
        clippy::zombie_processes,
        reason = "owned by Self at once, whose Drop kills and waits"
    )]
    async fn start() -> Self {
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server (make services installs it): {e}")
            });
        let url = format!("redis://127.0.0.1:{port}/0");
        let client = redis::Client::open(url.as_str()).unwrap();
        for _ in 0..200 {
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok()
            {
                return Self { child, url };
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("redis-server did not answer on {url}");
    }

    async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn principal(tenant: &str, key: &str) -> Principal {
    Principal {
        tenant_id: tenant.into(),
        key_id: key.into(),
    }
}

/// A request of `tokens` at most: half of them prompt, half completion.
fn estimate(tokens: u64) -> Estimate {
    Estimate {
        prompt_upper: tokens / 2,
        prompt_expected: tokens / 2,
        completion_max: tokens - tokens / 2,
        ..Estimate::default()
    }
}

fn quota(config: serde_json::Value, policies: serde_json::Value) -> Arc<Quota> {
    let quota = Arc::new(Quota::new(common::quota_config(config)));
    quota.set_policies_json(&policies.to_string()).unwrap();
    drop(quota.connect().unwrap());
    quota
}

fn tenant_policy(limits: serde_json::Value) -> serde_json::Value {
    json!({ "tenants": { "ten_a": limits } })
}

async fn admit(quota: &Arc<Quota>, tokens: u64, id: &str) -> Result<Reservation, QuotaError> {
    quota
        .admit(&principal("ten_a", "key_a"), "m", &estimate(tokens), id)
        .await
        .map(|r| r.unwrap())
}

fn exceeded(result: &Result<Reservation, QuotaError>) -> Option<Exceeded> {
    match result {
        Err(QuotaError::Exceeded { refusal, .. }) => Some(refusal.exceeded),
        _ => None,
    }
}

/// The same rules hold in process and in Redis: a concurrency slot comes back at settlement,
/// requests per minute count admissions, and a refusal takes nothing.
async fn concurrency_and_requests(quota: Arc<Quota>) {
    let a = admit(&quota, 1, "a").await.unwrap();
    let b = admit(&quota, 1, "b").await.unwrap();
    assert_eq!(
        b.headers().requests.map(|r| (r.limit, r.remaining)),
        Some((3, 1))
    );
    let c = admit(&quota, 1, "c").await;
    assert_eq!(exceeded(&c), Some(Exceeded::Concurrency));
    drop(a);
    assert!(quota.flush(Duration::from_secs(5)).await);
    let c = admit(&quota, 1, "c").await.unwrap();
    drop(b);
    assert!(quota.flush(Duration::from_secs(5)).await);
    let d = admit(&quota, 1, "d").await;
    assert_eq!(exceeded(&d), Some(Exceeded::Requests));
    let Err(QuotaError::Exceeded { refusal, limit, .. }) = d else {
        panic!("not refused")
    };
    assert_eq!(limit, 3);
    // One request refills every 20 s; the first of the three was taken just now.
    assert!(refusal.retry_after > Duration::from_secs(19), "{refusal:?}");
    assert!(
        refusal.retry_after <= Duration::from_secs(20),
        "{refusal:?}"
    );
    assert_eq!(refusal.headers.requests.map(|r| r.remaining), Some(0));
    drop(c);
}

fn concurrency_policy() -> serde_json::Value {
    tenant_policy(json!({ "max_concurrent": 2, "requests_per_minute": 3 }))
}

#[tokio::test]
async fn in_process_concurrency_and_requests() {
    concurrency_and_requests(quota(json!({}), concurrency_policy())).await;
}

#[tokio::test]
async fn redis_concurrency_and_requests() {
    let redis = RedisServer::start().await;
    concurrency_and_requests(quota(
        json!({ "redis_url": redis.url }),
        concurrency_policy(),
    ))
    .await;
}

#[tokio::test(start_paused = true)]
async fn limits_refill_at_the_configured_rate_on_a_paused_clock() {
    let quota = quota(
        json!({}),
        tenant_policy(json!({ "requests_per_minute": 60, "tokens_per_minute": 6000 })),
    );
    let mut held = Vec::new();
    for i in 0..60 {
        held.push(admit(&quota, 10, &i.to_string()).await.unwrap());
    }
    let refused = admit(&quota, 10, "x").await;
    assert_eq!(exceeded(&refused), Some(Exceeded::Requests));
    tokio::time::advance(Duration::from_millis(999)).await;
    assert_eq!(
        exceeded(&admit(&quota, 10, "x").await),
        Some(Exceeded::Requests)
    );
    tokio::time::advance(Duration::from_millis(1)).await;
    held.push(admit(&quota, 10, "y").await.unwrap());
    tokio::time::advance(Duration::from_secs(30)).await;
    let mut admitted = 0;
    while admit(&quota, 10, "z").await.map(|r| held.push(r)).is_ok() {
        admitted += 1;
    }
    assert_eq!(admitted, 30, "one request per second for 30 s");

    // Tokens: 6000 per minute is 100 per second; a reservation settles to what was used.
    tokio::time::advance(Duration::from_secs(60)).await;
    let big = admit(&quota, 6000, "big").await.unwrap();
    assert_eq!(big.headers().tokens.map(|t| t.remaining), Some(0));
    big.settle(&Usage {
        prompt_tokens: 1000,
        completion_tokens: 0,
        cached_tokens: 0,
    });
    let after = admit(&quota, 1, "after").await.unwrap();
    assert_eq!(after.headers().tokens.map(|t| t.remaining), Some(4999));
    tokio::time::advance(Duration::from_secs(5)).await;
    let later = admit(&quota, 1, "later").await.unwrap();
    assert_eq!(later.headers().tokens.map(|t| t.remaining), Some(5498));
}

#[tokio::test]
async fn a_budget_shared_by_replicas_through_redis_overshoots_by_at_most_one_request() {
    let redis = RedisServer::start().await;
    let policy = tenant_policy(json!({ "token_budget": 1000, "budget_period": "day" }));
    let config = json!({ "redis_url": redis.url });
    let replicas: Vec<Arc<Quota>> = (0..3)
        .map(|_| quota(config.clone(), policy.clone()))
        .collect();
    let attempts = (0..30).map(|i| {
        let replica = replicas[i % 3].clone();
        async move { admit(&replica, 300, &format!("r{i}")).await }
    });
    let results = futures_util::future::join_all(attempts).await;
    let admitted: Vec<Reservation> = results.into_iter().filter_map(Result::ok).collect();
    // Each holds 300 and needs room for its prompt of 150: with 0, 300 and 600 held it fits in
    // 1000, with 900 it does not. Three are admitted, never more.
    assert_eq!(admitted.len(), 3);
    for reservation in admitted {
        reservation.settle(&Usage {
            prompt_tokens: 150,
            completion_tokens: 150,
            cached_tokens: 0,
        });
    }
    for replica in &replicas {
        assert!(replica.flush(Duration::from_secs(5)).await);
    }
    let mut conn = redis.conn().await;
    let state = "tg:{ten_a}:t";
    let held: Option<i64> = redis::cmd("HGET")
        .arg(state)
        .arg("ht")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(held, Some(0), "every hold released");
    let leases: i64 = redis::cmd("ZCARD")
        .arg(format!("{state}:leases"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(leases, 0, "every lease released");
    let refused = admit(&replicas[1], 300, "late").await;
    assert_eq!(
        exceeded(&refused),
        Some(Exceeded::TokenBudget),
        "900 of 1000 spent: no room for a prompt of 150"
    );
}

#[tokio::test]
async fn an_expired_lease_frees_its_slot_and_its_usage_is_still_charged_once() {
    let redis = RedisServer::start().await;
    let policy = tenant_policy(json!({ "max_concurrent": 1, "token_budget": 100 }));
    let quota = quota(json!({ "redis_url": redis.url, "lease_ms": 300 }), policy);
    let stuck = admit(&quota, 10, "stuck").await.unwrap();
    assert_eq!(
        exceeded(&admit(&quota, 10, "next").await),
        Some(Exceeded::Concurrency)
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    // The stuck request's replica "died": its lease expired, so its slot and hold are free.
    let next = admit(&quota, 10, "next").await.unwrap();
    stuck.settle(&Usage {
        prompt_tokens: 40,
        completion_tokens: 0,
        cached_tokens: 0,
    });
    next.settle(&Usage {
        prompt_tokens: 50,
        completion_tokens: 0,
        cached_tokens: 0,
    });
    assert!(quota.flush(Duration::from_secs(5)).await);
    let mut conn = redis.conn().await;
    let spent: i64 = redis::cmd("HGET")
        .arg("tg:{ten_a}:t")
        .arg("mt")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(spent, 90, "both requests charged, each once");
    let held: i64 = redis::cmd("HGET")
        .arg("tg:{ten_a}:t")
        .arg("ht")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(held, 0, "the expired hold is not released twice");
}

#[tokio::test]
async fn without_redis_budgets_fail_closed_and_rate_limits_fall_back_to_a_share() {
    let down = format!("redis://127.0.0.1:{}/0", free_port());
    let config = json!({ "redis_url": down, "replicas": 2, "redis_timeout_ms": 50 });
    let policies = json!({
        "tenants": {
            "ten_a": { "requests_per_minute": 10 },
            "ten_b": { "token_budget": 1000 },
        }
    });
    let quota = quota(config, policies);
    let mut admitted = Vec::new();
    while let Ok(r) = admit(&quota, 1, "a").await {
        admitted.push(r);
        assert!(admitted.len() <= 10);
    }
    assert_eq!(
        admitted.len(),
        5,
        "half of 10 per minute for one of two replicas"
    );
    let budget = quota
        .admit(&principal("ten_b", "key_b"), "m", &estimate(1), "b")
        .await;
    assert!(matches!(budget, Err(QuotaError::Unavailable)), "{budget:?}");
    assert!(quota.stats().redis_errors >= 1);
    assert_eq!(
        quota.stats().fallbacks,
        5,
        "the requests admitted on the fallback: neither the refused one nor the budget's"
    );

    let open = json!({ "redis_url": format!("redis://127.0.0.1:{}/0", free_port()),
                       "budgets_when_redis_down": "allow", "rate_limits_when_redis_down": "allow" });
    let lenient = self::quota(
        open,
        json!({ "tenants": { "ten_b": { "token_budget": 1, "requests_per_minute": 1 } } }),
    );
    for i in 0..3 {
        let admitted = lenient
            .admit(
                &principal("ten_b", "key_b"),
                "m",
                &estimate(1),
                &i.to_string(),
            )
            .await;
        assert!(matches!(admitted, Ok(None)), "{admitted:?}");
    }
}

#[tokio::test]
async fn a_key_is_checked_with_its_tenant_and_a_refusal_by_either_takes_nothing() {
    let redis = RedisServer::start().await;
    let policies = json!({
        "tenants": { "ten_a": { "requests_per_minute": 100, "models": ["m", "n"] } },
        "keys": { "key_a": { "requests_per_minute": 1, "models": ["m"] } },
    });
    let quota = quota(json!({ "redis_url": redis.url }), policies);
    let first = admit(&quota, 1, "1").await.unwrap();
    assert_eq!(
        first.headers().requests.map(|r| (r.limit, r.remaining)),
        Some((1, 0))
    );
    for i in 0..5 {
        assert_eq!(
            exceeded(&admit(&quota, 1, &format!("x{i}")).await),
            Some(Exceeded::Requests)
        );
    }
    // Another key of the tenant: only the tenant's limit, which saw one request.
    let other = quota
        .admit(&principal("ten_a", "key_b"), "n", &estimate(1), "o")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(other.headers().requests.map(|r| r.remaining), Some(98));
    let denied = quota
        .admit(&principal("ten_a", "key_a"), "n", &estimate(1), "d")
        .await;
    assert!(matches!(denied, Err(QuotaError::ModelNotAllowed)));
    assert_eq!(
        quota.model_filter(&principal("ten_a", "key_a")),
        Some(vec!["m".to_owned()])
    );
    let scope = Scope {
        tenant: "ten_a".into(),
        key: None,
    };
    assert_eq!(
        quota.held_locally(&scope).0,
        0,
        "Redis counters, not local ones"
    );
}

#[tokio::test]
async fn a_settlement_queued_before_an_admission_is_applied_before_it() {
    let redis = RedisServer::start().await;
    let policy = tenant_policy(json!({ "max_concurrent": 1 }));
    let quota = quota(json!({ "redis_url": redis.url }), policy);
    // Each request ends before the next begins, as one client's do: the next always finds the
    // slot free, however the two tasks (admissions, settlements) are scheduled.
    for i in 0..300 {
        let reservation = admit(&quota, 1, &format!("r{i}")).await;
        assert!(reservation.is_ok(), "request {i}: {:?}", reservation.err());
        if let Ok(reservation) = reservation {
            reservation.settle(&Usage::default());
        }
    }
}

#[test]
fn a_principal_queues_with_its_tenant_s_weight_under_the_stricter_ceiling() {
    let policies = json!({
        "tenants": { "ten_a": { "weight": 3 }, "ten_b": { "priority": "batch" } },
        "keys": { "key_a": { "weight": 50, "priority": "batch" } },
    });
    let quota = quota(json!({}), policies);
    let share = |tenant, key| quota.queue_share(&principal(tenant, key));
    // A key's weight is not used; its ceiling is, with the tenant's.
    assert_eq!(
        share("ten_a", "key_a"),
        QueueShare {
            weight: 3,
            ceiling: Priority::Batch
        }
    );
    assert_eq!(share("ten_a", "key_x").ceiling, Priority::Interactive);
    assert_eq!(share("ten_b", "key_x").ceiling, Priority::Batch);
    assert_eq!(
        share("ten_none", "key_none"),
        QueueShare {
            weight: 1,
            ceiling: Priority::Interactive
        }
    );
}
