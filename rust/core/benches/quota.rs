//! The cost of quota admission and settlement, without HTTP: `Quota::admit` plus the settlement
//! of its reservation, for a tenant and a key that both have every kind of limit.
//!
//!     cargo bench -p gateway-core --bench quota                         # in process only
//!     cargo bench -p gateway-core --bench quota -- --redis-url redis://127.0.0.1:6379/0
//!
//! Prints one JSON object: nanoseconds per admit+settle in process (one thread; two threads on
//! the same tenant), and with Redis the admissions per second at a given concurrency (settlements
//! pipelined in the background, as in the gateway) and the latency of one admission.
//! `benchmarks/quota.py` runs it and records the figures.

#![expect(
    clippy::unwrap_used,
    reason = "a benchmark fails loudly on a bad fixture"
)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use gateway_core::auth::Principal;
use gateway_core::quota::{COUNT_CAP, Estimate, Quota};
use gateway_core::usage::Usage;
use serde_json::json;

const USAGE: Usage = Usage {
    prompt_tokens: 20,
    completion_tokens: 16,
    cached_tokens: 0,
};

fn quota(redis_url: Option<&str>) -> Arc<Quota> {
    let quota = Arc::new(Quota::new(common::quota_config(
        json!({ "redis_url": redis_url }),
    )));
    let limits = json!({
        "requests_per_minute": 1_000_000_000u64,
        "tokens_per_minute": 1_000_000_000_000u64,
        "max_concurrent": 1_000_000u64,
        "token_budget": 1_000_000_000_000_000u64,
        "money_budget_micros": 1_000_000_000_000_000u64,
        "budget_period": "month",
        "models": ["m"],
    });
    let policies = json!({
        "tenants": { "ten_bench": limits },
        "keys": { "key_bench": limits },
        "prices": { "m": { "prompt": 150_000, "cached": 75_000, "completion": 600_000 } },
    });
    quota.set_policies_json(&policies.to_string()).unwrap();
    quota
}

fn principal() -> Principal {
    Principal {
        tenant_id: "ten_bench".into(),
        key_id: "key_bench".into(),
    }
}

const ESTIMATE: Estimate = Estimate {
    prompt_upper: 80,
    prompt_expected: 20,
    completion_max: 16,
    sequences: 1,
    total_max: COUNT_CAP,
    max_tokens_set: true,
};

/// Admit + settle `n` times on this thread; in process the future never waits, so it is polled
/// once, with no runtime in the way.
fn in_process_loop(quota: &Arc<Quota>, n: u64) -> Duration {
    let principal = principal();
    let started = Instant::now();
    for _ in 0..n {
        let admitted = quota
            .admit(&principal, "m", &ESTIMATE, "request-id")
            .now_or_never()
            .unwrap()
            .unwrap()
            .unwrap();
        admitted.settle(&USAGE);
    }
    started.elapsed()
}

fn per_op_ns(elapsed: Duration, n: u64) -> f64 {
    elapsed.as_nanos() as f64 / n as f64
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let redis_url = args
        .iter()
        .position(|a| a == "--redis-url")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let n: u64 = 2_000_000;

    let local = quota(None);
    in_process_loop(&local, n / 10);
    let one_thread = per_op_ns(in_process_loop(&local, n), n);
    let contended = {
        let started = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| in_process_loop(&local, n / 2));
            }
        });
        per_op_ns(started.elapsed(), n)
    };
    let mut report = json!({
        "in_process_ns_per_admit_and_settle": one_thread,
        "in_process_ns_per_admit_and_settle_two_threads_one_tenant": contended,
    });

    if let Some(url) = redis_url {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let figures = runtime.block_on(async {
            let quota = quota(Some(&url));
            drop(quota.connect().unwrap());
            let admit_settle = |quota: Arc<Quota>, id: String| async move {
                let admitted = quota.admit(&principal(), "m", &ESTIMATE, &id).await;
                admitted.unwrap().unwrap().settle(&USAGE);
            };
            // Warm up: connection, script load.
            for i in 0..1000 {
                admit_settle(quota.clone(), format!("w{i}")).await;
            }
            let one = 5_000;
            let started = Instant::now();
            for i in 0..one {
                admit_settle(quota.clone(), format!("s{i}")).await;
            }
            let latency_us = started.elapsed().as_secs_f64() * 1e6 / f64::from(one);
            let concurrency = 64;
            let total: usize = 100_000;
            let started = Instant::now();
            let tasks: Vec<_> = (0..concurrency)
                .map(|t| {
                    let quota = quota.clone();
                    tokio::spawn(async move {
                        for i in (t..total).step_by(concurrency) {
                            admit_settle(quota.clone(), format!("c{i}")).await;
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await.unwrap();
            }
            let admitted_per_s = total as f64 / started.elapsed().as_secs_f64();
            assert!(quota.flush(Duration::from_secs(30)).await);
            json!({
                "redis_admit_latency_us_one_at_a_time": latency_us,
                "redis_admissions_per_s_at_64": admitted_per_s,
                "redis_concurrency": concurrency,
            })
        });
        if let (Some(report), Some(figures)) = (report.as_object_mut(), figures.as_object()) {
            report.extend(figures.clone());
        }
    }
    println!("{report}");
}
