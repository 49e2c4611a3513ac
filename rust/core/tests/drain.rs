//! Readiness over a real socket: `/ready` answers 200 while the gateway serves and 503 once it
//! drains, while requests are still served, each response then asking for `Connection: close`.

#![expect(clippy::unwrap_used, reason = "tests fail loudly on a bad fixture")]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use gateway_core::Gateway;
use gateway_core::serve::{HEADER_READ_TIMEOUT, ServerHandle};
use gateway_sim::{SimConfig, app};
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const KEY: &str = "tg-drain-test-key";

async fn gateway(worker: &ServerHandle) -> (Gateway, SocketAddr) {
    let config = common::gateway_config(json!({
        "workers": [{ "url": format!("http://{}", worker.local_addr()), "api_key": null }],
        "routing": { "health_interval_ms": 50 },
    }));
    let mut gateway = Gateway::new(config).unwrap();
    let hash: String = Sha256::digest(KEY.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let keys = json!({ "keys": [{ "hash": hash, "key_id": "key_1", "tenant_id": "ten_1" }] });
    gateway.control().set_keys(&keys.to_string()).unwrap();
    let addr = gateway.start().await.unwrap();
    (gateway, addr)
}

/// One request with the test key on a fresh connection; the whole response.
async fn exchange(
    addr: SocketAddr,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, HeaderMap, String) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let method = if body.is_some() { "POST" } else { "GET" };
    let request = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("authorization", format!("Bearer {KEY}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            body.map(|b| b.to_string()).unwrap_or_default(),
        )))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8(body.to_vec()).unwrap(),
    )
}

fn completion() -> Option<Value> {
    Some(json!({"model": "sim-model", "prompt": "x", "max_tokens": 2}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_until_drained_then_503_while_requests_are_still_served_with_connection_close() {
    let worker = ServerHandle::bind(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        app(SimConfig::default()),
        HEADER_READ_TIMEOUT,
    )
    .await
    .unwrap();
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
