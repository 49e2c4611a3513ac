//! The streaming relay over real sockets, as worker bytes arrive: a whole stream in one read goes
//! to the client as one chunk with the end of the response behind it, events split across reads
//! are relayed whole and metered exactly, and either way the worker's connection is reused.

#![expect(clippy::unwrap_used, reason = "tests fail loudly on a bad fixture")]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use gateway_core::Gateway;
use gateway_core::usage::{Status, UsageEvent};
use gateway_sim::SimConfig;
use hyper::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::{KEY, counting_relay, exchange, sim};

/// A gateway in front of the worker at `url`, probing it rarely (requests alone use the pool).
async fn gateway(url: String) -> (Gateway, SocketAddr) {
    let document = json!({
        "workers": [{ "url": url, "api_key": null }],
        "routing": { "health_interval_ms": 60_000, "load_interval_ms": 0 },
    });
    common::started(common::gateway_config(document)).await
}

fn stream_body(max_tokens: u64, options: Value) -> Value {
    let mut body = json!({"model": "sim-model", "prompt": "one two", "max_tokens": max_tokens,
        "stream": true});
    if !options.is_null() {
        body["stream_options"] = options;
    }
    body
}

/// Waits for `n` usage events (recorded as responses end, possibly after the client read).
async fn events(gateway: &Gateway, n: usize) -> Vec<UsageEvent> {
    let mut events = Vec::new();
    for _ in 0..500 {
        let drained = gateway.control().drain_usage(usize::MAX);
        events.extend(drained.into_iter().map(|e| e.event));
        if events.len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    events
}

/// The events of an SSE body, each without its blank line.
fn frames(text: &str) -> Vec<&str> {
    text.split_inclusive("\n\n")
        .map(|f| {
            f.strip_suffix("\n\n")
                .unwrap_or_else(|| panic!("cut event: {f:?}"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_read_whole_is_relayed_as_one_chunk_intact_then_the_response_s_end() {
    let worker = sim(SimConfig::default()).await;
    let (gateway, addr) = gateway(format!("http://{}", worker.local_addr())).await;
    let body = stream_body(16, Value::Null).to_string();
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: gateway\r\nauthorization: Bearer {KEY}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    // The raw bytes, to see the chunked framing: up to the end of the chunked body.
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    while !response.ends_with(b"\r\n0\r\n\r\n") {
        let mut buffer = vec![0u8; 64 * 1024];
        let n = socket.read(&mut buffer).await.unwrap();
        assert!(
            n > 0,
            "closed early: {:?}",
            String::from_utf8_lossy(&response)
        );
        response.extend_from_slice(&buffer[..n]);
    }
    let response = String::from_utf8(response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    // The worker's sixteen events and `[DONE]` came in one read: they go on as one chunk, usage
    // cut from each, and the chunked body ends right behind it.
    let (_, chunked) = response.split_once("\r\n\r\n").unwrap();
    let (size, rest) = chunked.split_once("\r\n").unwrap();
    let size = usize::from_str_radix(size, 16).unwrap();
    assert_eq!(
        &rest[size..],
        "\r\n0\r\n\r\n",
        "one chunk, then the end: {chunked:?}"
    );
    let events = frames(&rest[..size]);
    assert_eq!(events.len(), 17, "16 tokens and [DONE]: {events:?}");
    assert_eq!(events[16], "data: [DONE]");
    for event in &events[..16] {
        let chunk: Value = serde_json::from_str(event.strip_prefix("data: ").unwrap()).unwrap();
        assert!(chunk.get("usage").is_none(), "{event}");
    }
    let event = events_of(&gateway).await;
    assert_eq!(
        (event.status, event.completion_tokens),
        (Status::Completed, 16)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_split_across_reads_are_relayed_whole_and_metered_exactly() {
    let worker = sim(SimConfig::default()).await;
    // Every event cut inside its usage member, and `[DONE]` in two.
    for cut in [&b"\"prompt_tok"[..], b"[DO"] {
        let (relay, _) =
            counting_relay(worker.local_addr(), Some(cut), Duration::from_millis(2)).await;
        let (gateway, addr) = gateway(format!("http://{relay}")).await;
        for options in [Value::Null, json!({"include_usage": true})] {
            let with_usage = !options.is_null();
            let (status, _, text) = exchange(
                addr,
                "POST",
                "/v1/completions",
                Some(stream_body(5, options)),
            )
            .await;
            assert_eq!(status, StatusCode::OK);
            let events = frames(&text);
            assert_eq!(events.len(), if with_usage { 7 } else { 6 }, "{events:?}");
            assert_eq!(events.last(), Some(&"data: [DONE]"));
            let chunks: Vec<Value> = events[..events.len() - 1]
                .iter()
                .map(|e| serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap())
                .collect();
            let usage: Vec<&Value> = chunks.iter().filter_map(|c| c.get("usage")).collect();
            if with_usage {
                assert_eq!(usage.len(), 1, "{events:?}");
                assert_eq!(usage[0]["completion_tokens"], 5);
            } else {
                assert!(usage.is_empty(), "{events:?}");
            }
            let event = events_of(&gateway).await;
            assert_eq!(event.status, Status::Completed);
            assert_eq!((event.prompt_tokens, event.completion_tokens), (3, 5));
        }
    }
}

async fn events_of(gateway: &Gateway) -> UsageEvent {
    let mut one = events(gateway, 1).await;
    assert_eq!(one.len(), 1);
    one.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_end_came_with_its_last_events_leaves_its_worker_connection_for_the_next() {
    let worker = sim(SimConfig::default()).await;
    let (relay, accepted) = counting_relay(worker.local_addr(), None, Duration::ZERO).await;
    let (gateway, addr) = gateway(format!("http://{relay}")).await;
    let stream = || async {
        let (status, _, text) = exchange(
            addr,
            "POST",
            "/v1/completions",
            Some(stream_body(4, Value::Null)),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    };
    // The first stream opens the connection the next ten should reuse.
    stream().await;
    let before = accepted.load(Ordering::SeqCst);
    for _ in 0..10 {
        stream().await;
    }
    let opened = accepted.load(Ordering::SeqCst) - before;
    // A connection may come back to the pool a moment after its body ends: a few new ones are
    // allowed, not one per stream.
    assert!(opened <= 2, "{opened} connections for 10 streams");
    let events = events(&gateway, 11).await;
    assert!(
        events
            .iter()
            .all(|e| e.status == Status::Completed && e.completion_tokens == 4),
        "{events:?}"
    );
}
