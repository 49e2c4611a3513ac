//! The gateway in front of in-process simulators, over real sockets: retries, failover, the
//! usage stripping of streams and the one usage event per request.

#![expect(clippy::unwrap_used, reason = "tests fail loudly on a bad fixture")]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use gateway_core::Gateway;
use gateway_core::request::Endpoint;
use gateway_core::serve::ServerHandle;
use gateway_core::usage::{Status, UsageEvent, UsageSource};
use gateway_sim::SimConfig;
use hyper::StatusCode;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use common::{counting_relay, exchange, exchange_with, sim};

async fn gateway(workers: &[&ServerHandle]) -> (Gateway, SocketAddr) {
    let urls: Vec<String> = workers
        .iter()
        .map(|w| format!("http://{}", w.local_addr()))
        .collect();
    gateway_at(&urls, json!({})).await
}

/// A gateway in front of `urls`; `routing` overrides the test defaults.
async fn gateway_at(urls: &[String], routing: Value) -> (Gateway, SocketAddr) {
    let workers: Vec<Value> = urls.iter().map(|url| json!({ "url": url })).collect();
    gateway_with(workers, routing).await
}

async fn gateway_with_workers(workers: Vec<Value>) -> (Gateway, SocketAddr) {
    gateway_with(workers, json!({})).await
}

async fn gateway_with(workers: Vec<Value>, routing: Value) -> (Gateway, SocketAddr) {
    gateway_from(workers, json!({ "routing": routing })).await
}

/// A gateway in front of `workers`, its configuration the test defaults with `overrides`.
async fn gateway_from(workers: Vec<Value>, overrides: Value) -> (Gateway, SocketAddr) {
    let workers: Vec<Value> = workers
        .into_iter()
        .map(|worker| common::merged(json!({ "api_key": null }), worker))
        .collect();
    let defaults = json!({
        "workers": workers,
        "routing": { "health_interval_ms": 50, "max_attempts": 2 },
    });
    common::started(common::gateway_config(common::merged(defaults, overrides))).await
}

async fn post(addr: SocketAddr, path: &str, body: Value) -> (StatusCode, String) {
    let (status, _, body) = exchange(addr, "POST", path, Some(body)).await;
    (status, body)
}

/// Waits for `n` events (they are recorded as responses end, possibly after the client read).
async fn events(gateway: &Gateway, n: usize) -> Vec<UsageEvent> {
    let mut events = Vec::new();
    for _ in 0..200 {
        events.extend(
            gateway
                .control()
                .drain_usage(usize::MAX)
                .into_iter()
                .map(|e| e.event),
        );
        if events.len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    events
}

/// Six small completions through the gateway, each answered 200, and their usage events.
async fn complete_six(gateway: &Gateway, addr: SocketAddr) -> Vec<UsageEvent> {
    for _ in 0..6 {
        let (status, body) = post(
            addr,
            "/v1/completions",
            json!({"model": "sim-model", "prompt": "a b", "max_tokens": 2}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    events(gateway, 6).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_worker_is_retried_on_another() {
    let broken = sim(SimConfig {
        error_rate: 1.0,
        ..SimConfig::default()
    })
    .await;
    let good = sim(SimConfig::default()).await;
    let (gateway, addr) = gateway(&[&broken, &good]).await;
    let events = complete_six(&gateway, addr).await;
    let good_url = format!("http://{}", good.local_addr());
    assert_eq!(events.len(), 6);
    assert!(events.iter().all(|e| e.status == Status::Completed));
    assert!(
        events
            .iter()
            .all(|e| e.worker.as_deref() == Some(good_url.as_str()))
    );
    assert!(
        events
            .iter()
            .all(|e| e.prompt_tokens == 3 && e.completion_tokens == 2)
    );
}

/// The value of a sample of the gateway's (or a simulator's) `/metrics`, 0 when absent.
async fn sample(addr: SocketAddr, series: &str) -> f64 {
    let (_, _, text) = exchange(addr, "GET", "/metrics", None).await;
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |value| value.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_worker_is_ejected_and_its_trial_returns_it_once_it_recovers() {
    let failing = sim(SimConfig {
        error_rate: 1.0,
        ..SimConfig::default()
    })
    .await;
    let good = sim(SimConfig::default()).await;
    let urls = [&failing, &good].map(|w| format!("http://{}", w.local_addr()));
    let breaker = json!({ "breaker_backoff_ms": 20, "breaker_max_backoff_ms": 20 });
    let (gateway, addr) = gateway_at(&urls, breaker).await;
    let series = |name: &str| format!("tokengate_worker_{name}{{worker=\"{}\"}}", urls[0]);
    let request = json!({"model": "sim-model", "prompt": "a b", "max_tokens": 2});
    let mut sent = 0;
    // Five failures in a row eject it; each failed request is retried on the other worker.
    while sample(addr, &series("ejected")).await == 0.0 {
        assert!(sent < 20, "not ejected after {sent} requests");
        let (status, body) = post(addr, "/v1/completions", request.clone()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        sent += 1;
    }
    assert_eq!(sample(addr, &series("ejections_total")).await, 1.0);
    // Healthy all along: ejected is not down.
    assert_eq!(sample(addr, &series("healthy")).await, 1.0);
    let (status, _) = post(
        failing.local_addr(),
        "/sim/faults",
        json!({"error_rate": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // Once its backoff has run out, the next request is its trial, and brings it back.
    while sample(addr, &series("returns_total")).await == 0.0 {
        assert!(sent < 2_000, "not back after {sent} requests");
        let (status, body) = post(addr, "/v1/completions", request.clone()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        sent += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(sample(addr, &series("trial_requests_total")).await, 1.0);
    assert_eq!(sample(addr, &series("ejected")).await, 0.0);
    // Every request answered and metered to the token the workers generated, trial included.
    let events = events(&gateway, sent).await;
    assert_eq!(events.len(), sent);
    assert!(events.iter().all(|e| e.status == Status::Completed));
    let tokens = r#"vllm:generation_tokens_total{engine="0",model_name="sim-model"}"#;
    let generated =
        sample(failing.local_addr(), tokens).await + sample(good.local_addr(), tokens).await;
    let metered: u64 = events.iter().map(|e| e.completion_tokens).sum();
    assert_eq!(metered as f64, generated);
    assert!(
        events
            .iter()
            .any(|e| e.worker.as_deref() == Some(urls[0].as_str()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_are_retried_like_completions_and_metered_from_their_usage() {
    let broken = sim(SimConfig {
        error_rate: 1.0,
        ..SimConfig::default()
    })
    .await;
    let good = sim(SimConfig::default()).await;
    let (gateway, addr) = gateway(&[&broken, &good]).await;
    for _ in 0..4 {
        let (status, body) = post(
            addr,
            "/v1/embeddings",
            json!({"model": "sim-model", "input": ["a b", "c d e"], "stream": true}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let answer: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(answer["usage"]["prompt_tokens"], 3 + 4);
        assert_eq!(answer["data"].as_array().map(Vec::len), Some(2));
    }
    let events = events(&gateway, 4).await;
    let good_url = format!("http://{}", good.local_addr());
    assert_eq!(events.len(), 4);
    for event in events {
        assert_eq!(event.endpoint, Endpoint::Embeddings);
        assert_eq!(event.status, Status::Completed);
        assert!(!event.stream, "an embeddings request never streams");
        assert_eq!(event.worker.as_deref(), Some(good_url.as_str()));
        assert_eq!((event.prompt_tokens, event.completion_tokens), (7, 0));
        assert_eq!(event.usage_source, UsageSource::Worker);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_5xx_on_the_last_attempt_is_relayed_as_sent() {
    let broken = sim(SimConfig {
        error_rate: 1.0,
        ..SimConfig::default()
    })
    .await;
    let (gateway, addr) = gateway(&[&broken]).await;
    let (status, body) = post(
        addr,
        "/v1/completions",
        json!({"model": "sim-model", "prompt": "x"}),
    )
    .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(body.contains("simulated engine failure"), "{body}");
    let events = events(&gateway, 1).await;
    assert_eq!(events[0].status, Status::Failed);
    assert_eq!(events[0].http_status, 500);
    assert_eq!(events[0].completion_tokens, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_usage_is_metered_and_stripped_unless_asked_for() {
    let worker = sim(SimConfig::default()).await;
    let (gateway, addr) = gateway(&[&worker]).await;
    let request = |options: Value| {
        let mut body =
            json!({"model": "sim-model", "prompt": "one two", "max_tokens": 3, "stream": true});
        if !options.is_null() {
            body["stream_options"] = options;
        }
        post(addr, "/v1/completions", body)
    };
    let frames = |text: &str| -> Vec<String> {
        text.split("\n\n")
            .filter(|f| !f.is_empty())
            .map(str::to_owned)
            .collect()
    };

    let (status, plain) = request(Value::Null).await;
    assert_eq!(status, StatusCode::OK);
    let plain = frames(&plain);
    assert_eq!(plain.len(), 4, "three tokens and [DONE]: {plain:?}");
    assert!(plain.iter().all(|f| !f.contains("usage")), "{plain:?}");
    assert_eq!(plain.last().map(String::as_str), Some("data: [DONE]"));

    let (_, with_usage) = request(json!({"include_usage": true})).await;
    let with_usage = frames(&with_usage);
    assert_eq!(with_usage.len(), 5);
    let usage_frames: Vec<_> = with_usage.iter().filter(|f| f.contains("usage")).collect();
    assert_eq!(usage_frames.len(), 1);
    assert!(usage_frames[0].contains(r#""choices":[]"#));

    let events = events(&gateway, 2).await;
    assert_eq!(events.len(), 2);
    for event in events {
        assert_eq!(event.status, Status::Completed);
        assert_eq!((event.prompt_tokens, event.completion_tokens), (3, 3));
        assert!(event.stream);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_model_is_503_while_a_worker_has_not_listed_its_models() {
    let worker = sim(SimConfig::default()).await;
    // Nothing listens there: like a vLLM worker still loading its model.
    let starting = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let starting_url = format!("http://{}", starting.local_addr().unwrap());
    drop(starting);
    let (_gateway, addr) = gateway_at(
        &[format!("http://{}", worker.local_addr()), starting_url],
        json!({}),
    )
    .await;
    let body = json!({"model": "other-model", "prompt": "x"});
    let (status, text) = post(addr, "/v1/completions", body.clone()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    let (_gateway, addr) = gateway(&[&worker]).await;
    let (status, _) = post(addr, "/v1/completions", body).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_does_not_answer_in_time_is_a_504() {
    let slow = sim(SimConfig {
        ttft_ms: 5_000,
        ..SimConfig::default()
    })
    .await;
    let urls = [format!("http://{}", slow.local_addr())];
    let (gateway, addr) = gateway_at(&urls, json!({ "request_timeout_ms": 200 })).await;
    for stream in [false, true] {
        let body = json!({"model": "sim-model", "prompt": "x", "stream": stream});
        let (status, text) = post(addr, "/v1/completions", body).await;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{text}");
        assert!(text.contains("upstream_timeout"), "{text}");
    }
    let events = events(&gateway, 2).await;
    assert!(
        events
            .iter()
            .all(|e| e.status == Status::Failed && e.http_status == 504)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_api_key_is_sent_on_requests_and_probes() {
    let locked = sim(SimConfig {
        api_key: Some("vllm-secret".into()),
        ..SimConfig::default()
    })
    .await;
    let url = format!("http://{}", locked.local_addr());
    let body = json!({"model": "sim-model", "prompt": "x", "max_tokens": 1});

    let worker = json!({ "url": url, "api_key": "vllm-secret" });
    let (_gateway, addr) = gateway_with_workers(vec![worker]).await;
    let (status, text) = post(addr, "/v1/completions", body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{text}");

    // Without the key the worker's model list stays unreadable: it never joins rotation.
    let (_gateway, addr) = gateway_with_workers(vec![json!({ "url": url })]).await;
    let (status, text) = post(addr, "/v1/completions", body).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_past_its_grace_cuts_streams_and_has_metered_them_when_it_returns() {
    let worker = sim(SimConfig {
        itl_ms: 50,
        max_output_tokens: 1_000,
        ..SimConfig::default()
    })
    .await;
    let (mut gateway, addr) = gateway(&[&worker]).await;
    let client = tokio::spawn(post(
        addr,
        "/v1/completions",
        json!({"model": "sim-model", "prompt": "x", "max_tokens": 1000, "stream": true}),
    ));
    for _ in 0..200 {
        if gateway.control().workers()[0].outstanding > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    gateway.shutdown(Duration::from_millis(100)).await.unwrap();
    // No waiting: the cut stream's event is already recorded.
    let events = gateway.control().drain_usage(usize::MAX);
    assert_eq!(events.len(), 1);
    let event = &events[0].event;
    assert_eq!(event.status, Status::Cancelled);
    assert!(event.completion_tokens > 0, "{event:?}");
    assert_eq!(gateway.control().workers()[0].outstanding, 0);
    client.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_avoid_a_worker_that_reports_a_queue_from_other_clients() {
    let busy = sim(SimConfig {
        max_num_seqs: 1,
        itl_ms: 20,
        ..SimConfig::default()
    })
    .await;
    let idle = sim(SimConfig::default()).await;
    let (gateway, addr) = gateway_at(
        &[
            format!("http://{}", busy.local_addr()),
            format!("http://{}", idle.local_addr()),
        ],
        json!({ "load_interval_ms": 20 }),
    )
    .await;
    // Another client (say, another gateway replica) fills the busy worker: one running, two
    // waiting. This gateway has nothing in flight there; only the worker's /metrics tells.
    let busy_addr = busy.local_addr();
    let others: Vec<_> = (0..3)
        .map(|_| {
            tokio::spawn(post(
                busy_addr,
                "/v1/completions",
                json!({"model": "sim-model", "prompt": "x", "max_tokens": 50, "ignore_eos": true}),
            ))
        })
        .collect();
    let control = gateway.control();
    let mut seen = None;
    for _ in 0..200 {
        seen = control.workers()[0].load;
        if seen.is_some_and(|load| load.waiting >= 2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        seen.is_some_and(|l| l.running == 1 && l.waiting >= 2),
        "{seen:?}"
    );

    let idle_url = format!("http://{}", idle.local_addr());
    let events = complete_six(&gateway, addr).await;
    assert_eq!(events.len(), 6);
    assert!(
        events
            .iter()
            .all(|e| e.worker.as_deref() == Some(idle_url.as_str())),
        "{:?}",
        events.iter().map(|e| &e.worker).collect::<Vec<_>>()
    );
    for other in others {
        assert_eq!(other.await.unwrap().0, StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_headers_on_both_kinds_of_response_then_429_with_retry_after() {
    let worker = sim(SimConfig::default()).await;
    let (gateway, addr) = gateway(&[&worker]).await;
    let policy = json!({ "tenants": { "ten_1": {
        "requests_per_minute": 2, "tokens_per_minute": 100_000 } } });
    gateway.control().set_policies(&policy.to_string()).unwrap();
    let request = |stream: bool| json!({"model": "sim-model", "prompt": "a b", "max_tokens": 2, "stream": stream});
    let mut remaining = Vec::new();
    for stream in [false, true] {
        let (status, headers, body) =
            exchange(addr, "POST", "/v1/completions", Some(request(stream))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(headers["x-ratelimit-limit-requests"], "2");
        assert_eq!(headers["x-ratelimit-limit-tokens"], "100000");
        assert!(headers.contains_key("x-ratelimit-reset-tokens"));
        remaining.push(headers["x-ratelimit-remaining-requests"].clone());
        assert!(body.contains(if stream { "data: [DONE]" } else { "\"usage\"" }));
    }
    assert_eq!(remaining, ["1", "0"]);
    let (status, headers, body) =
        exchange(addr, "POST", "/v1/completions", Some(request(true))).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let error: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["error"]["type"], "rate_limit_exceeded", "{body}");
    assert_eq!(headers["x-ratelimit-remaining-requests"], "0");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(
        (29..=30).contains(&retry),
        "one request refills every 30 s: {retry}"
    );
    assert!(headers.contains_key("retry-after-ms"));
    // Two events, both settled: the refused request has none.
    let events = events(&gateway, 2).await;
    assert_eq!(events.len(), 2);
    assert!(gateway.control().drain_usage(10).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_outside_the_allow_list_does_not_exist_for_the_tenant() {
    let worker = sim(SimConfig::default()).await;
    let (gateway, addr) = gateway(&[&worker]).await;
    let (_, _, listed) = exchange(addr, "GET", "/v1/models", None).await;
    assert!(listed.contains("sim-model"));
    let policy = json!({ "tenants": { "ten_1": { "models": ["other-model"] } } });
    gateway.control().set_policies(&policy.to_string()).unwrap();
    let (status, _, listed) = exchange(addr, "GET", "/v1/models", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_str::<Value>(&listed).unwrap()["data"],
        json!([])
    );
    let (status, body) = post(
        addr,
        "/v1/completions",
        json!({"model": "sim-model", "prompt": "a", "max_tokens": 1}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, unknown) = post(
        addr,
        "/v1/completions",
        json!({"model": "no-such-model", "prompt": "a", "max_tokens": 1}),
    )
    .await;
    assert_eq!(
        body.replace("sim-model", "M"),
        unknown.replace("no-such-model", "M"),
        "an excluded model is answered exactly like an unknown one"
    );
}

/// Every record in the journal at `dir`, as the JSON `gateway journal dump` prints; none torn.
fn journal_records(dir: &std::path::Path) -> Vec<Value> {
    let (records, torn, unreadable) = gateway_core::journal::read_dir(dir).unwrap();
    assert_eq!((torn, unreadable), (0, 0));
    records
        .iter()
        .map(|record| serde_json::to_value(record).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_writes_nothing_to_the_journal_and_is_counted() {
    let worker = sim(SimConfig::default()).await;
    let dir = std::env::temp_dir().join(format!("tokengate-refused-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // No tick during the test: a request's start is written only if it is still open at one.
    let journal = json!({
        "dir": dir, "segment_bytes": 1 << 20, "progress_interval_ms": 100,
        "sync": "interval", "sync_interval_ms": 3_600_000,
    });
    let (gateway, addr) = gateway_from(
        vec![json!({ "url": format!("http://{}", worker.local_addr()) })],
        json!({ "journal": journal }),
    )
    .await;
    let policy = json!({ "tenants": { "ten_1": { "requests_per_minute": 1 } } });
    gateway.control().set_policies(&policy.to_string()).unwrap();
    let request = json!({"model": "sim-model", "prompt": "a", "max_tokens": 1});
    assert_eq!(
        post(addr, "/v1/completions", request.clone()).await.0,
        StatusCode::OK
    );
    assert_eq!(events(&gateway, 1).await.len(), 1);
    let (status, _) = post(addr, "/v1/completions", request).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let (_, _, metrics) = exchange(addr, "GET", "/metrics", None).await;
    assert!(
        metrics.contains("tokengate_rejected_total{reason=\"rate_limit_exceeded\"} 1"),
        "{metrics}"
    );
    // The admitted request ended within a tick: one record, its end. The refused one left
    // nothing, in the journal or among the open requests whose starts closing writes.
    let kinds = || -> Vec<String> {
        journal_records(&dir)
            .iter()
            .map(|record| record["r"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(kinds(), ["end"]);
    drop(gateway);
    assert_eq!(kinds(), ["end"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_stream_leaves_its_worker_connection_for_the_next_request() {
    let worker = sim(SimConfig::default()).await;
    // From the worker, the relay passes a stream's `data: [DONE]` on first and the rest (the
    // body's end) a moment later, as a network may.
    let (relay, accepted) = counting_relay(
        worker.local_addr(),
        Some(b"[DONE]\n\n"),
        Duration::from_millis(20),
    )
    .await;
    // Probes far apart, so that the requests alone use the pool.
    let (_gateway, addr) = gateway_at(
        &[format!("http://{relay}")],
        json!({ "health_interval_ms": 60_000, "load_interval_ms": 0 }),
    )
    .await;
    let body = json!({"model": "sim-model", "prompt": "x", "max_tokens": 4, "stream": true});
    let (status, _) = post(addr, "/v1/completions", body.clone()).await;
    assert_eq!(status, StatusCode::OK);
    let before = accepted.load(Ordering::SeqCst);
    for _ in 0..10 {
        let (status, text) = post(addr, "/v1/completions", body.clone()).await;
        assert_eq!(status, StatusCode::OK);
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    }
    let opened = accepted.load(Ordering::SeqCst) - before;
    // A connection may come back to the pool a moment after its body ends: a few new ones are
    // allowed, not one per stream.
    assert!(
        opened <= 2,
        "{opened} connections for 10 streams: a stream is read to its end, its connection reused"
    );
}

/// Holds (`true`) or releases the simulator's requests before their prefill (`/sim/hold`), so a
/// worker stays busy for as long as a test looks at the state that makes.
async fn hold(worker: &ServerHandle, held: bool) {
    let (status, _, text) = exchange(
        worker.local_addr(),
        "POST",
        "/sim/hold",
        Some(json!({ "held": held })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
}

/// Polls `ready` until it holds (a state the gateway reaches on its own, not a time).
async fn until(mut ready: impl FnMut() -> bool) {
    for _ in 0..500 {
        if ready() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the gateway never reached the awaited state");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_worker_s_requests_wait_in_the_gateway_one_at_a_time() {
    const TTFT_MS: u64 = 100;
    let slow = sim(SimConfig {
        ttft_ms: TTFT_MS,
        ..SimConfig::default()
    })
    .await;
    let url = format!("http://{}", slow.local_addr());
    let worker = json!({ "url": url, "max_concurrency": 1 });
    let (gateway, addr) = gateway_with(vec![worker], json!({ "queue_timeout_ms": 60_000 })).await;
    let body = json!({"model": "sim-model", "prompt": "x", "max_tokens": 1});
    hold(&slow, true).await;
    let calls: Vec<_> = (0..3)
        .map(|_| tokio::spawn(post(addr, "/v1/completions", body.clone())))
        .collect();
    until(|| gateway.control().queued() == 2).await;
    assert_eq!(gateway.control().workers()[0].outstanding, 1);
    let (_, _, metrics) = exchange(addr, "GET", "/metrics", None).await;
    assert!(
        metrics.contains(
            "tokengate_queued_requests{model=\"sim-model\",tenant=\"ten_1\",priority=\"interactive\"} 2"
        ),
        "{metrics}"
    );
    let released = tokio::time::Instant::now();
    hold(&slow, false).await;
    for call in calls {
        let (status, text) = call.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{text}");
    }
    // One at a time: each prefill began after the one before had ended.
    assert!(released.elapsed() >= Duration::from_millis(3 * TTFT_MS));
    assert_eq!(gateway.control().queued(), 0);
    let (_, _, metrics) = exchange(addr, "GET", "/metrics", None).await;
    assert!(
        metrics
            .contains("tokengate_queue_wait_seconds_count{model=\"sim-model\",tenant=\"ten_1\"} 2"),
        "{metrics}"
    );
    let events = events(&gateway, 3).await;
    assert!(events.iter().all(|e| e.status == Status::Completed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_request_times_out_as_429_and_one_whose_client_leaves_frees_its_place() {
    let slow = sim(SimConfig::default()).await;
    let url = format!("http://{}", slow.local_addr());
    let worker = json!({ "url": url, "max_concurrency": 1 });
    let routing = json!({ "queue_timeout_ms": 150, "max_queued_per_tenant": 1 });
    let (gateway, addr) = gateway_with(vec![worker], routing).await;
    let body = json!({"model": "sim-model", "prompt": "x", "max_tokens": 1});
    hold(&slow, true).await;
    let busy = tokio::spawn(post(addr, "/v1/completions", body.clone()));
    until(|| gateway.control().workers()[0].outstanding == 1).await;

    let (status, headers, text) =
        exchange(addr, "POST", "/v1/completions", Some(body.clone())).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{text}");
    let error: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(error["error"]["code"], "queue_timeout", "{text}");
    assert!(headers.contains_key("retry-after"), "{headers:?}");
    assert_eq!(gateway.control().queued(), 0);

    // A client that leaves while queued: its place is freed and no worker sees it.
    let left = tokio::spawn(post(addr, "/v1/completions", body.clone()));
    until(|| gateway.control().queued() == 1).await;
    left.abort();
    until(|| gateway.control().queued() == 0).await;
    hold(&slow, false).await;
    let (status, _) = busy.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let events = events(&gateway, 3).await;
    let statuses: Vec<_> = events.iter().map(|e| (e.status, e.http_status)).collect();
    assert!(statuses.contains(&(Status::Completed, 200)), "{statuses:?}");
    assert!(statuses.contains(&(Status::Failed, 429)), "{statuses:?}");
    let cancelled = events.iter().find(|e| e.status == Status::Cancelled);
    let tokens = cancelled.map(|e| e.prompt_tokens + e.cached_tokens + e.completion_tokens);
    assert_eq!(tokens, Some(0), "{statuses:?}");
    assert!(
        cancelled.is_some_and(|e| e.worker.is_none()),
        "{statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waits_no_longer_than_it_says_and_interactive_goes_before_batch() {
    // A TTFT that sets the requests' ends milliseconds apart, so that their order shows.
    let slow = sim(SimConfig {
        ttft_ms: 20,
        ..SimConfig::default()
    })
    .await;
    let url = format!("http://{}", slow.local_addr());
    let worker = json!({ "url": url, "max_concurrency": 1 });
    let (gateway, addr) = gateway_with(vec![worker], json!({ "queue_timeout_ms": 60_000 })).await;
    let body = json!({"model": "sim-model", "prompt": "x", "max_tokens": 1});
    hold(&slow, true).await;
    let busy = tokio::spawn(post(addr, "/v1/completions", body.clone()));
    until(|| gateway.control().workers()[0].outstanding == 1).await;

    // Its own deadline, far shorter than the queue's: 429 `queue_timeout` while the worker is busy.
    let timeout = [("x-request-timeout", "0.05")];
    let (status, headers, text) = exchange_with(
        addr,
        "POST",
        "/v1/completions",
        Some(body.clone()),
        &timeout,
    )
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{text}");
    let error: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(error["error"]["code"], "queue_timeout", "{text}");
    assert!(headers.contains_key("retry-after"), "{headers:?}");
    for (name, value) in [
        ("x-request-timeout", "soon"),
        ("x-request-timeout", "0"),
        ("x-request-timeout", "1e300"),
        ("x-priority", "urgent"),
    ] {
        let (status, _, text) = exchange_with(
            addr,
            "POST",
            "/v1/completions",
            Some(body.clone()),
            &[(name, value)],
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{name}: {value}: {text}");
        let error: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(error["error"]["param"], name, "{text}");
    }

    // Batch asked for by header, then by vLLM's own `priority`, then an interactive request:
    // the worker serves the interactive one first, then the batch ones in their order.
    let send = |id: &'static str, priority: Option<&'static str>, body: Value| {
        tokio::spawn(async move {
            let mut headers = vec![("x-request-id", id)];
            headers.extend(priority.map(|p| ("x-priority", p)));
            exchange_with(addr, "POST", "/v1/completions", Some(body), &headers).await
        })
    };
    let batch_header = send("batch-header", Some("batch"), body.clone());
    until(|| gateway.control().queued() == 1).await;
    let mut vllm_priority = body.clone();
    vllm_priority["priority"] = json!(1);
    let batch_body = send("batch-body", None, vllm_priority);
    until(|| gateway.control().queued() == 2).await;
    let interactive = send("interactive", None, body.clone());
    until(|| gateway.control().queued() == 3).await;
    let (_, _, metrics) = exchange(addr, "GET", "/metrics", None).await;
    for (class, count) in [("batch", 2), ("interactive", 1)] {
        let sample = format!(
            "tokengate_queued_requests{{model=\"sim-model\",tenant=\"ten_1\",priority=\"{class}\"}} {count}"
        );
        assert!(metrics.contains(&sample), "{sample}: {metrics}");
    }
    hold(&slow, false).await;
    assert_eq!(busy.await.unwrap().0, StatusCode::OK);
    for call in [batch_header, batch_body, interactive] {
        let (status, _, text) = call.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{text}");
    }
    let mut served: Vec<_> = events(&gateway, 6)
        .await
        .into_iter()
        .filter(|e| e.status == Status::Completed && e.request_id != e.event_id)
        .map(|e| (e.finished_at_ms, e.request_id))
        .collect();
    served.sort();
    let order: Vec<_> = served.iter().map(|(_, id)| &**id).collect();
    assert_eq!(order, ["interactive", "batch-header", "batch-body"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_queues_is_full_and_further_requests_wait_in_the_gateway() {
    let slow = sim(SimConfig {
        max_num_seqs: 1,
        ..SimConfig::default()
    })
    .await;
    let url = format!("http://{}", slow.local_addr());
    let routing = json!({ "load_interval_ms": 20, "queue_timeout_ms": 60_000 });
    let (gateway, addr) = gateway_with(vec![json!({ "url": url })], routing).await;
    until(|| gateway.control().workers()[0].healthy).await;
    hold(&slow, true).await;
    let body = json!({"model": "sim-model", "prompt": "x", "max_tokens": 1});
    let mut calls = Vec::new();
    // Unbounded at first: both reach the worker, which runs one (held) and queues the other.
    for outstanding in [1, 2] {
        calls.push(tokio::spawn(post(addr, "/v1/completions", body.clone())));
        until(|| gateway.control().workers()[0].outstanding == outstanding).await;
    }
    // Its report of a queue teaches the gateway that it runs one; the next waits in the gateway.
    until(|| gateway.control().workers()[0].capacity == Some(1)).await;
    calls.push(tokio::spawn(post(addr, "/v1/completions", body.clone())));
    until(|| gateway.control().queued() == 1).await;
    assert_eq!(gateway.control().workers()[0].outstanding, 2);
    hold(&slow, false).await;
    for call in calls {
        let (status, text) = call.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{text}");
    }
    assert_eq!(gateway.control().queued(), 0);
}
