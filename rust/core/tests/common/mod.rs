//! What the core's integration tests share: the control plane's resolved configuration document
//! (`config.json`, kept equal to `core_document()`'s by a Python test), with overrides; a
//! simulated worker; a started gateway that knows the test key; one request with that key.

#![expect(dead_code, reason = "each test binary uses its own part")]
#![expect(clippy::expect_used, reason = "tests fail loudly on a bad fixture")]

use std::net::SocketAddr;

use bytes::Bytes;
use gateway_core::Gateway;
use gateway_core::config::{GatewayConfig, QuotaConfig};
use gateway_core::serve::{HEADER_READ_TIMEOUT, ServerHandle};
use gateway_sim::{SimConfig, app};
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// The API key `started` gateways know: tenant `ten_1`, key id `key_1`.
pub const KEY: &str = "tg-core-test-key";

/// The document for one worker at `http://127.0.0.1:9`, no journal, no gRPC.
pub fn document() -> Value {
    serde_json::from_str(include_str!("config.json")).expect("the fixture is JSON")
}

/// `base` with `overrides` laid over it, objects merged member by member.
pub fn merged(mut base: Value, overrides: Value) -> Value {
    match (&mut base, overrides) {
        (Value::Object(base), Value::Object(overrides)) => {
            for (name, value) in overrides {
                let slot = base.entry(name).or_insert(Value::Null);
                *slot = merged(slot.take(), value);
            }
        }
        (slot, value) => *slot = value,
    }
    base
}

/// The gateway's configuration: the resolved document with `overrides`.
pub fn gateway_config(overrides: Value) -> GatewayConfig {
    GatewayConfig::from_json(&merged(document(), overrides).to_string()).expect("a valid config")
}

/// The quota section of the resolved document with `overrides`.
pub fn quota_config(overrides: Value) -> QuotaConfig {
    serde_json::from_value(merged(document()["quota"].take(), overrides))
        .expect("a valid quota config")
}

/// A simulated worker on a free loopback port.
pub async fn sim(config: SimConfig) -> ServerHandle {
    ServerHandle::bind(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        app(config),
        HEADER_READ_TIMEOUT,
    )
    .await
    .expect("a loopback port")
}

/// A gateway over `config` that knows `KEY`, started; its HTTP address.
pub async fn started(config: GatewayConfig) -> (Gateway, SocketAddr) {
    let mut gateway = Gateway::new(config).expect("a gateway");
    let hash: String = Sha256::digest(KEY.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let keys = json!({ "keys": [{ "hash": hash, "key_id": "key_1", "tenant_id": "ten_1" }] });
    gateway
        .control()
        .set_keys(&keys.to_string())
        .expect("the key snapshot");
    let addr = gateway.start().await.expect("the gateway starts");
    (gateway, addr)
}

/// One request with `KEY` on a fresh connection; the whole response.
pub async fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, HeaderMap, String) {
    exchange_with(addr, method, path, body, &[]).await
}

/// One request with `KEY` and `headers` on a fresh connection; the whole response.
pub async fn exchange_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, String) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut request = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("authorization", format!("Bearer {KEY}"))
        .header("content-type", "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Full::new(Bytes::from(
            body.map(|b| b.to_string()).unwrap_or_default(),
        )))
        .expect("a request");
    let response = client.request(request).await.expect("a response");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("the body").to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8(body.to_vec()).expect("UTF-8"),
    )
}
