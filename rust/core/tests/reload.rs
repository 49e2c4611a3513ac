//! A reload while requests run, over real sockets in front of in-process simulators: a stream
//! on a worker the reload removes runs to its end and is metered once, the new worker takes the
//! next requests, a kept worker keeps its state, and an invalid document changes nothing.

#![expect(clippy::unwrap_used, reason = "tests fail loudly on a bad fixture")]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use gateway_core::serve::ServerHandle;
use gateway_core::usage::Status;
use gateway_core::{Gateway, Reloaded};
use gateway_sim::SimConfig;
use hyper::StatusCode;
use serde_json::{Value, json};

async fn sim(config: SimConfig) -> (ServerHandle, String) {
    let handle = common::sim(config).await;
    let url = format!("http://{}", handle.local_addr());
    (handle, url)
}

/// The test defaults with these workers (each `{"url": ...}` or `{"dns": ...}`).
fn config(workers: Value) -> Value {
    common::merged(
        common::document(),
        json!({"workers": workers, "routing": {"health_interval_ms": 50}}),
    )
}

async fn gateway(document: Value) -> (Gateway, SocketAddr) {
    let config = gateway_core::config::GatewayConfig::from_json(&document.to_string()).unwrap();
    common::started(config).await
}

async fn complete(addr: SocketAddr, body: Value) -> (StatusCode, String) {
    let (status, _, body) = common::exchange(addr, "POST", "/v1/completions", Some(body)).await;
    (status, body)
}

async fn until(mut ready: impl FnMut() -> bool) {
    for _ in 0..500 {
        if ready() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the gateway never reached the awaited state");
}

fn urls(gateway: &Gateway) -> Vec<String> {
    gateway
        .control()
        .workers()
        .into_iter()
        .map(|w| w.url)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_on_a_removed_worker_finishes_and_is_metered_once() {
    let slow = SimConfig {
        itl_ms: 20,
        ..SimConfig::default()
    };
    let (_a, a) = sim(slow).await;
    let (_b, b) = sim(SimConfig::default()).await;
    let (gateway, addr) = gateway(config(json!([{ "url": a }]))).await;
    let stream = tokio::spawn(complete(
        addr,
        json!({"model": "sim-model", "prompt": "x", "max_tokens": 20, "stream": true}),
    ));
    until(|| gateway.control().workers()[0].outstanding > 0).await;
    let reloaded = gateway
        .control()
        .reload(common::gateway_config(config(json!([{ "url": b }]))))
        .await
        .unwrap();
    assert_eq!(
        reloaded,
        Reloaded {
            workers: 1,
            added: 1,
            removed: 1,
            restart_required: Vec::new()
        }
    );
    // Probed before the reload returned: in rotation at once.
    let workers = gateway.control().workers();
    assert_eq!(urls(&gateway), std::slice::from_ref(&b));
    assert!(workers[0].healthy);
    let (status, body) = complete(
        addr,
        json!({"model": "sim-model", "prompt": "y", "max_tokens": 3}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = stream.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("data: [DONE]"), "{body}");
    let mut events = Vec::new();
    until(|| {
        events.extend(gateway.control().drain_usage(usize::MAX));
        events.len() >= 2
    })
    .await;
    let by_worker = |url: &str| {
        events
            .iter()
            .filter(|e| e.event.worker.as_deref() == Some(url))
            .map(|e| (e.event.status, e.event.completion_tokens))
            .collect::<Vec<_>>()
    };
    assert_eq!(by_worker(&a), [(Status::Completed, 20)]);
    assert_eq!(by_worker(&b), [(Status::Completed, 3)]);
    assert_eq!(events.len(), 2, "one event per request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_worker_keeps_its_requests_and_takes_its_new_limit() {
    let slow = SimConfig {
        itl_ms: 20,
        ..SimConfig::default()
    };
    let (_a, a) = sim(slow).await;
    let (_b, b) = sim(SimConfig::default()).await;
    let (gateway, addr) = gateway(config(json!([{ "url": a }]))).await;
    let stream = tokio::spawn(complete(
        addr,
        json!({"model": "sim-model", "prompt": "x", "max_tokens": 10, "stream": true}),
    ));
    until(|| gateway.control().workers()[0].outstanding > 0).await;
    let next = config(json!([{ "url": a, "max_concurrency": 4 }, { "url": b }]));
    let reloaded = gateway
        .control()
        .reload(common::gateway_config(next))
        .await
        .unwrap();
    assert_eq!((reloaded.added, reloaded.removed), (1, 0));
    let kept = &gateway.control().workers()[0];
    assert_eq!((kept.url.as_str(), kept.outstanding), (a.as_str(), 1));
    assert_eq!(kept.capacity, Some(4));
    assert!(kept.healthy);
    assert_eq!(stream.await.unwrap().0, StatusCode::OK);
    // An invalid document (a worker that is not an http:// URL) changes nothing.
    let mut bad = next_with_bad_worker(&b);
    assert!(
        gateway_core::config::GatewayConfig::from_json(&bad.to_string()).is_err(),
        "{bad}"
    );
    bad["workers"] = json!([{ "url": b, "api_key": "not\na header" }]);
    let refused = gateway.control().reload(common::gateway_config(bad)).await;
    assert!(refused.is_err());
    assert_eq!(urls(&gateway), [a, b]);
}

fn next_with_bad_worker(b: &str) -> Value {
    config(json!([{ "url": b }, { "url": "ftp://not-a-worker" }]))
}
