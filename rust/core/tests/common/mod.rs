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

/// A TCP relay to `to` that counts the connections it accepts. Each read from the worker is
/// passed on in pieces, cut right after every occurrence of `cut` (none: whole), each piece
/// written on its own `pause` after the one before, so that the gateway reads them apart.
pub async fn counting_relay(
    to: SocketAddr,
    cut: Option<&'static [u8]>,
    pause: std::time::Duration,
) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let addr = listener.local_addr().expect("the relay's address");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let Ok(outbound) = tokio::net::TcpStream::connect(to).await else {
                    return;
                };
                let _ = inbound.set_nodelay(true);
                let (mut client_read, mut client_write) = inbound.into_split();
                let (mut worker_read, mut worker_write) = outbound.into_split();
                let up = tokio::io::copy(&mut client_read, &mut worker_write);
                let down = async move {
                    let mut buffer = vec![0u8; 64 * 1024];
                    loop {
                        let n = match worker_read.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        for (i, piece) in pieces(&buffer[..n], cut).into_iter().enumerate() {
                            if i > 0 {
                                tokio::time::sleep(pause).await;
                            }
                            if client_write.write_all(piece).await.is_err() {
                                return;
                            }
                        }
                    }
                };
                let _ = tokio::join!(up, down);
            });
        }
    });
    (addr, accepted)
}

/// `bytes` cut right after each occurrence of `cut`; an empty last piece is left out.
fn pieces<'a>(bytes: &'a [u8], cut: Option<&[u8]>) -> Vec<&'a [u8]> {
    let Some(cut) = cut else {
        return vec![bytes];
    };
    let mut pieces = Vec::new();
    let mut start = 0;
    for at in memchr::memmem::find_iter(bytes, cut) {
        pieces.push(&bytes[start..at + cut.len()]);
        start = at + cut.len();
    }
    if start < bytes.len() {
        pieces.push(&bytes[start..]);
    }
    pieces
}
