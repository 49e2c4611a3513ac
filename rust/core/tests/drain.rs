//! Readiness over a real socket: `/ready` answers 200 while the gateway serves and 503 once it
//! drains, while requests are still served, each response then asking for `Connection: close`.

#![expect(clippy::unwrap_used, reason = "tests fail loudly on a bad fixture")]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use gateway_core::Gateway;
use gateway_core::serve::ServerHandle;
use gateway_sim::SimConfig;
use hyper::{HeaderMap, StatusCode};
use serde_json::{Value, json};

async fn gateway(worker: &ServerHandle) -> (Gateway, SocketAddr) {
    common::started(common::gateway_config(json!({
        "workers": [{ "url": format!("http://{}", worker.local_addr()), "api_key": null }],
        "routing": { "health_interval_ms": 50 },
    })))
    .await
}

/// One request with the test key on a fresh connection (a POST when it has a body).
async fn exchange(
    addr: SocketAddr,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, HeaderMap, String) {
    let method = if body.is_some() { "POST" } else { "GET" };
    common::exchange(addr, method, path, body).await
}

fn completion() -> Option<Value> {
    Some(json!({"model": "sim-model", "prompt": "x", "max_tokens": 2}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_until_drained_then_503_while_requests_are_still_served_with_connection_close() {
    let worker = common::sim(SimConfig::default()).await;
    let (mut gateway, addr) = gateway(&worker).await;

    let (status, _, body) = exchange(addr, "/ready", None).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, r#"{"status":"ready"}"#)
    );
    let (status, headers, _) = exchange(addr, "/v1/completions", completion()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers.get("connection").is_none(), "{headers:?}");

    assert!(gateway.control().drain());
    assert!(!gateway.control().drain());
    let (status, headers, body) = exchange(addr, "/ready", None).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, r#"{"status":"draining"}"#)
    );
    assert_eq!(headers["connection"], "close");
    let (status, headers, body) = exchange(addr, "/v1/completions", completion()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(headers["connection"], "close");
    // Workers are not readiness: `/health` still says they are well.
    let (status, _, _) = exchange(addr, "/health", None).await;
    assert_eq!(status, StatusCode::OK);

    gateway.shutdown(Duration::from_secs(5)).await.unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    assert_eq!(gateway.control().drain_usage(usize::MAX).len(), 2);
    worker.shutdown(Duration::ZERO).await.unwrap();
}
