//! `gateway sim` over real HTTP: route shapes, usage numbers, SSE framing, queueing, counters
//! after a client disconnect, and failure injection.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests fail loudly on a bad fixture"
)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use gateway_core::serve::ServerHandle;
use gateway_sim::{SimConfig, app};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Sim {
    server: ServerHandle,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Sim {
    async fn start(config: SimConfig) -> Self {
        let server = ServerHandle::bind(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            app(config),
            gateway_core::serve::HEADER_READ_TIMEOUT,
        )
        .await
        .unwrap();
        let client = Client::builder(TokioExecutor::new()).build_http();
        Self { server, client }
    }

    fn addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: &str,
        headers: &[(&str, &str)],
    ) -> Response<Incoming> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr()))
            .header("content-type", "application/json");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        self.client.request(request).await.unwrap()
    }

    /// Status, content type and whole body text.
    async fn call(&self, method: Method, path: &str, body: &str) -> (StatusCode, String, String) {
        let response = self.send(method, path, body, &[]).await;
        let status = response.status();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            content_type,
            String::from_utf8(bytes.to_vec()).unwrap(),
        )
    }

    async fn post_json(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let (status, content_type, text) = self.call(Method::POST, path, &body.to_string()).await;
        assert_eq!(content_type, "application/json", "{text}");
        (status, serde_json::from_str(&text).unwrap())
    }

    async fn metric(&self, name: &str) -> f64 {
        let (_, _, text) = self.call(Method::GET, "/metrics", "").await;
        metric(&text, name)
    }
}

/// The value of the first sample line of `name` (labels ignored, filter by appending `{…`).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|line| line.starts_with(name) && line[name.len()..].starts_with(['{', ' ']))
        .and_then(|line| line.rsplit(' ').next())
        .map(|v| v.parse().unwrap())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// SSE payloads (without `data: `) of a finished stream.
fn events(text: &str) -> Vec<String> {
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    text.split_terminator("\n\n")
        .map(|e| {
            e.strip_prefix("data: ")
                .expect("every event is one data line")
                .to_owned()
        })
        .collect()
}

/// Test names carry `sim::` so `cargo test -p gateway-sim sim` selects them.
mod sim {
    use super::*;

    #[tokio::test]
    async fn models_list_and_small_routes_have_vllm_shapes() {
        let sim = Sim::start(SimConfig {
            model: "m-1".into(),
            max_model_len: 2048,
            ..SimConfig::default()
        })
        .await;
        let (status, content_type, text) = sim.call(Method::GET, "/v1/models", "").await;
        assert_eq!(
            (status, content_type.as_str()),
            (StatusCode::OK, "application/json")
        );
        let models: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(models["object"], "list");
        let card = &models["data"][0];
        assert_eq!(models["data"].as_array().unwrap().len(), 1);
        for (key, value) in [
            ("id", json!("m-1")),
            ("object", json!("model")),
            ("owned_by", json!("vllm")),
            ("root", json!("m-1")),
            ("parent", Value::Null),
            ("max_model_len", json!(2048)),
        ] {
            assert_eq!(card[key], value, "{key}");
        }
        assert!(card["created"].as_u64().unwrap() > 1_600_000_000);
        assert_eq!(card["permission"][0]["object"], "model_permission");

        assert_eq!(
            sim.call(Method::GET, "/health", "").await,
            (StatusCode::OK, String::new(), String::new())
        );
        assert_eq!(sim.call(Method::GET, "/ping", "").await.0, StatusCode::OK);
        let (status, _, version) = sim.call(Method::GET, "/version", "").await;
        assert_eq!(
            (status, version.as_str()),
            (StatusCode::OK, r#"{"version":"0.32.0-sim"}"#)
        );
        assert_eq!(
            sim.call(Method::GET, "/nope", "").await.0,
            StatusCode::NOT_FOUND
        );

        let (status, tokens) = sim
            .post_json("/tokenize", json!({"prompt": "one two three"}))
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            (tokens["count"].as_u64(), tokens["max_model_len"].as_u64()),
            (Some(4), Some(2048))
        );
        assert_eq!(tokens["tokens"].as_array().unwrap().len(), 4);
        let (_, tokens) = sim
            .post_json(
                "/tokenize",
                json!({"messages": [{"role": "user", "content": "a b"}]}),
            )
            .await;
        assert_eq!(tokens["count"], 2 + 4 + 3);
    }

    #[tokio::test]
    async fn embeddings_have_vllms_shape_and_count_their_prompts_in_the_metrics() {
        let sim = Sim::start(SimConfig::default()).await;
        let body = json!({"model": "sim-model", "input": ["one two", "three"], "stream": true});
        let response = sim
            .send(
                Method::POST,
                "/v1/embeddings",
                &body.to_string(),
                &[("x-request-id", "e1")],
            )
            .await;
        assert_eq!(response.status(), StatusCode::OK);
        let text = response.into_body().collect().await.unwrap().to_bytes();
        let v: Value = serde_json::from_slice(&text).unwrap();
        // vLLM's key order.
        let text = String::from_utf8(text.to_vec()).unwrap();
        assert!(
            text.starts_with(r#"{"id":"embd-e1","object":"list","created":"#),
            "{text}"
        );
        let data = r#","model":"sim-model","data":[{"index":0,"object":"embedding","embedding":["#;
        assert!(text.contains(data), "{text}");
        let usage = r#""completion_tokens":0,"prompt_tokens_details":null,"completion_tokens_details":null}}"#;
        assert!(text.ends_with(usage), "{text}");
        assert_eq!(v["data"][1]["index"], 1);
        assert_eq!(v["usage"]["prompt_tokens"], 3 + 2);
        assert_eq!(v["usage"]["total_tokens"], 3 + 2);
        assert_eq!(sim.metric("vllm:prompt_tokens_total").await, 5.0);
        assert_eq!(sim.metric("vllm:generation_tokens_total").await, 0.0);

        let (status, v) = sim
            .post_json("/v1/embeddings", json!({"model": "sim-model", "input": []}))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(v["error"]["message"], "You must pass at least one prompt");
        let (status, _) = sim
            .post_json("/v1/embeddings", json!({"model": "other", "input": "x"}))
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND);

        let binary =
            json!({"model": "sim-model", "input": [[1, 2], [3]], "encoding_format": "bytes"});
        let response = sim
            .send(Method::POST, "/v1/embeddings", &binary.to_string(), &[])
            .await;
        assert_eq!(
            response.headers()["content-type"],
            "application/octet-stream"
        );
        let metadata: Value =
            serde_json::from_slice(response.headers()["metadata"].as_bytes()).unwrap();
        assert_eq!(metadata["usage"]["prompt_tokens"], 3);
        let vectors = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            vectors.len() as u64,
            metadata["data"][1]["end"].as_u64().unwrap()
        );
        assert_eq!(sim.metric("vllm:prompt_tokens_total").await, 5.0 + 3.0);
    }

    #[tokio::test]
    async fn non_streaming_chat_reports_usage_and_vllm_message_fields() {
        let sim = Sim::start(SimConfig {
            max_output_tokens: 5,
            ..SimConfig::default()
        })
        .await;
        let messages = json!([{"role": "user", "content": "hello there world"}]);
        let body = json!({"model": "sim-model", "messages": messages,
                      "max_tokens": 3, "top_k": 5, "chat_template_kwargs": {"x": 1}});
        let (status, v) = sim.post_json("/v1/chat/completions", body).await;
        assert_eq!(status, StatusCode::OK);
        assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert_eq!(
            (v["object"].as_str(), v["model"].as_str()),
            (Some("chat.completion"), Some("sim-model"))
        );
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 10, "total_tokens": 13, "completion_tokens": 3,
                                  "prompt_tokens_details": null})
        );
        let choice = &v["choices"][0];
        assert_eq!(
            (choice["index"].as_u64(), choice["finish_reason"].as_str()),
            (Some(0), Some("length"))
        );
        let message = &choice["message"];
        assert_eq!(message["role"], "assistant");
        assert_eq!(
            message["content"]
                .as_str()
                .unwrap()
                .split_whitespace()
                .count(),
            3
        );
        assert_eq!(message["tool_calls"], json!([]));
        assert_eq!(message["reasoning_content"], Value::Null);
        assert_eq!(choice["stop_reason"], Value::Null);

        // Without max tokens: the EOS point (5) ends it with "stop".
        let (_, v) = sim
            .post_json(
                "/v1/chat/completions",
                json!({"messages": [{"role": "user", "content": "hi"}]}),
            )
            .await;
        assert_eq!(
            (
                v["usage"]["completion_tokens"].as_u64(),
                v["choices"][0]["finish_reason"].as_str()
            ),
            (Some(5), Some("stop"))
        );

        // X-Request-Id becomes the base of the id.
        let response = sim
            .send(
                Method::POST,
                "/v1/chat/completions",
                r#"{"messages":[]}"#,
                &[("x-request-id", "req-42")],
            )
            .await;
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["id"], "chatcmpl-req-42");
    }

    #[tokio::test]
    async fn non_streaming_completions_index_prompts_times_n() {
        let sim = Sim::start(SimConfig::default()).await;
        let (status, v) = sim
            .post_json(
                "/v1/completions",
                json!({"prompt": ["a b", "c d e f"], "n": 3, "max_tokens": 4}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
        assert_eq!(v["object"], "text_completion");
        let choices = v["choices"].as_array().unwrap();
        let indices: Vec<_> = choices
            .iter()
            .map(|c| c["index"].as_u64().unwrap())
            .collect();
        assert_eq!(indices, (0..6).collect::<Vec<_>>());
        assert!(
            choices
                .iter()
                .all(|c| c["text"].as_str().unwrap().split_whitespace().count() == 4)
        );
        assert!(
            choices
                .iter()
                .all(|c| c["logprobs"].is_null() && c["finish_reason"] == "length")
        );
        assert_eq!(v["usage"]["prompt_tokens"], 3 + 5);
        assert_eq!(v["usage"]["completion_tokens"], 6 * 4);
        assert_eq!(v["usage"]["total_tokens"], 8 + 24);

        // Default max_tokens 16; seeded greedy output repeats exactly.
        let body = json!({"prompt": "x", "seed": 1, "temperature": 0});
        let (_, a) = sim.post_json("/v1/completions", body.clone()).await;
        let (_, b) = sim.post_json("/v1/completions", body).await;
        assert_eq!(a["usage"]["completion_tokens"], 16);
        assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
    }

    #[tokio::test]
    async fn streaming_frames_with_and_without_usage() {
        let sim = Sim::start(SimConfig::default()).await;
        let chat = |extra: Value| {
            let messages = json!([{"role": "user", "content": "x y"}]);
            let mut body = json!({"messages": messages, "max_tokens": 3, "stream": true});
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            body.to_string()
        };
        let (status, content_type, text) = sim
            .call(Method::POST, "/v1/chat/completions", &chat(json!({})))
            .await;
        assert_eq!(
            (status, content_type.as_str()),
            (StatusCode::OK, "text/event-stream; charset=utf-8")
        );
        let plain = events(&text);
        assert_eq!(plain.len(), 1 + 3 + 1);
        assert!(!text.contains("usage"));
        let role: Value = serde_json::from_str(&plain[0]).unwrap();
        assert_eq!(
            role["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );
        let last: Value = serde_json::from_str(&plain[3]).unwrap();
        assert_eq!(last["choices"][0]["finish_reason"], "length");

        let (_, _, text) = sim
            .call(
                Method::POST,
                "/v1/chat/completions",
                &chat(json!({"stream_options": {"include_usage": true}})),
            )
            .await;
        let with_usage = events(&text);
        assert_eq!(with_usage.len(), plain.len() + 1);
        let usage: Value = serde_json::from_str(&with_usage[4]).unwrap();
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(
            usage["usage"],
            json!({"prompt_tokens": 9, "total_tokens": 12, "completion_tokens": 3})
        );
        assert!(with_usage[..4].iter().all(|e| !e.contains("usage")));

        let options =
            json!({"stream_options": {"include_usage": true, "continuous_usage_stats": true}});
        let (_, _, text) = sim
            .call(Method::POST, "/v1/chat/completions", &chat(options))
            .await;
        let continuous = events(&text);
        let seen: Vec<_> = continuous[..5]
            .iter()
            .map(|e| {
                serde_json::from_str::<Value>(e).unwrap()["usage"]["completion_tokens"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(seen, vec![0, 1, 2, 3, 3]);

        // Completions: no role chunk, `text` per token, n=2 choices indexed 0 and 1.
        let body = json!({"prompt": "p", "n": 2, "max_tokens": 2, "stream": true}).to_string();
        let (_, _, text) = sim.call(Method::POST, "/v1/completions", &body).await;
        let frames = events(&text);
        assert_eq!(frames.len(), 2 * 2 + 1);
        let indices: Vec<_> = frames[..4]
            .iter()
            .map(|e| {
                serde_json::from_str::<Value>(e).unwrap()["choices"][0]["index"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(indices, vec![0, 1, 0, 1]);
    }

    #[tokio::test]
    async fn streaming_headers_are_sent_before_the_first_token() {
        let sim = Sim::start(SimConfig {
            ttft_ms: 5_000,
            ..SimConfig::default()
        })
        .await;
        let body = json!({"prompt": "p", "max_tokens": 1, "stream": true}).to_string();
        let head = tokio::time::timeout(
            Duration::from_secs(2),
            sim.send(Method::POST, "/v1/completions", &body, &[]),
        );
        let response = head.await.expect("headers must not wait for TTFT");
        assert_eq!(response.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn validation_errors_are_400_and_unknown_models_404() {
        let sim = Sim::start(SimConfig {
            max_model_len: 50,
            ..SimConfig::default()
        })
        .await;
        for (path, body) in [
            ("/v1/chat/completions", "{not json"),
            ("/v1/chat/completions", "[]"),
            (
                "/v1/chat/completions",
                r#"{"messages":[{"role":"user","content":"x"}],"n":0}"#,
            ),
            (
                "/v1/chat/completions",
                r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":"ten"}"#,
            ),
            (
                "/v1/chat/completions",
                r#"{"messages":[],"stream_options":{"include_usage":true}}"#,
            ),
            ("/v1/completions", r#"{"prompt":"x","max_tokens":50}"#),
            ("/v1/completions", r#"{"prompt":true}"#),
        ] {
            let (status, content_type, text) = sim.call(Method::POST, path, body).await;
            assert_eq!(
                (status, content_type.as_str()),
                (StatusCode::BAD_REQUEST, "application/json"),
                "{body}"
            );
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(
                (v["error"]["type"].as_str(), v["error"]["code"].as_u64()),
                (Some("BadRequestError"), Some(400))
            );
        }
        let (_, _, text) = sim
            .call(
                Method::POST,
                "/v1/completions",
                r#"{"prompt":"x","max_tokens":50}"#,
            )
            .await;
        assert!(text.contains("maximum context length"), "{text}");
        let (status, v) = sim
            .post_json("/v1/completions", json!({"model": "other", "prompt": "x"}))
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(
            v,
            json!({"error": {"message": "The model `other` does not exist.",
                             "type": "NotFoundError", "param": "model", "code": 404}})
        );
        // Nothing was generated for any of them.
        assert_eq!(sim.metric("vllm:generation_tokens_total").await, 0.0);
    }

    #[tokio::test]
    async fn max_num_seqs_queues_excess_requests_visibly_in_metrics() {
        let sim = Sim::start(SimConfig {
            max_num_seqs: 1,
            itl_ms: 20,
            max_output_tokens: 1000,
            ..SimConfig::default()
        })
        .await;
        let body = json!({"prompt": "p", "max_tokens": 500, "stream": true}).to_string();
        let mut first = sim
            .send(Method::POST, "/v1/completions", &body, &[])
            .await
            .into_body();
        first.frame().await.unwrap().unwrap();
        let mut second = sim
            .send(Method::POST, "/v1/completions", &body, &[])
            .await
            .into_body();
        let (_, _, text) = sim.call(Method::GET, "/metrics", "").await;
        assert_eq!(metric(&text, "vllm:num_requests_running"), 1.0);
        assert_eq!(metric(&text, "vllm:num_requests_waiting"), 1.0);
        assert_eq!(metric(&text, "vllm:kv_cache_usage_perc"), 1.0);
        // Closing the first stream frees its slot; the second starts generating.
        drop(first);
        let frame = tokio::time::timeout(Duration::from_secs(5), second.frame())
            .await
            .unwrap();
        assert!(
            frame
                .unwrap()
                .unwrap()
                .data_ref()
                .unwrap()
                .starts_with(b"data: {")
        );
        assert_eq!(sim.metric("vllm:num_requests_waiting").await, 0.0);
        assert_eq!(sim.metric("vllm:num_requests_running").await, 1.0);
    }

    #[tokio::test]
    async fn counters_after_a_mid_stream_disconnect_match_what_was_generated() {
        let sim = Sim::start(SimConfig {
            itl_ms: 25,
            max_output_tokens: 1000,
            ..SimConfig::default()
        })
        .await;
        let body =
            json!({"prompt": "three word prompt", "max_tokens": 400, "stream": true}).to_string();
        let mut socket = TcpStream::connect(sim.addr()).await.unwrap();
        let request = format!(
            "POST /v1/completions HTTP/1.1\r\nhost: sim\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
            body.len()
        );
        socket.write_all(request.as_bytes()).await.unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        let frames = |bytes: &[u8]| bytes.windows(7).filter(|w| w == b"data: {").count();
        while frames(&seen) < 5 {
            let n = socket.read(&mut buf).await.unwrap();
            assert!(n > 0, "stream ended early");
            seen.extend_from_slice(&buf[..n]);
        }
        let received = frames(&seen) as f64;
        drop(socket);
        // The engine notices the disconnect at its next token; wait until it has let the
        // request go, then read what it counted.
        let aborted = |text: &str| {
            text.lines()
                .find(|l| l.contains("finished_reason=\"abort\""))
                .is_some_and(|l| l.ends_with("} 1.0"))
        };
        let text = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let (_, _, text) = sim.call(Method::GET, "/metrics", "").await;
                if metric(&text, "vllm:num_requests_running") == 0.0 && aborted(&text) {
                    return text;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the engine never let the disconnected request go");
        let generated = metric(&text, "vllm:generation_tokens_total");
        assert!(
            (received..=received + 1.0).contains(&generated),
            "client saw {received}, engine generated {generated}"
        );
        assert_eq!(metric(&text, "vllm:prompt_tokens_total"), 4.0);
    }

    #[tokio::test]
    async fn error_rate_one_answers_500_before_generating() {
        let sim = Sim::start(SimConfig {
            error_rate: 1.0,
            ..SimConfig::default()
        })
        .await;
        for stream in [false, true] {
            let (status, v) = sim
                .post_json("/v1/completions", json!({"prompt": "x", "stream": stream}))
                .await;
            assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
            assert_eq!(
                v,
                json!({"error": {"message": "simulated engine failure",
                                 "type": "InternalServerError", "param": null, "code": 500}})
            );
        }
        assert_eq!(sim.metric("vllm:prompt_tokens_total").await, 0.0);
        assert_eq!(sim.metric("vllm:generation_tokens_total").await, 0.0);
    }

    #[tokio::test]
    async fn die_rate_one_cuts_streams_halfway_without_done() {
        let sim = Sim::start(SimConfig {
            die_rate: 1.0,
            ..SimConfig::default()
        })
        .await;
        let body = json!({"prompt": "x", "max_tokens": 10, "stream": true}).to_string();
        let response = sim.send(Method::POST, "/v1/completions", &body, &[]).await;
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let mut text = Vec::new();
        let failed = loop {
            match body.frame().await {
                Some(Ok(frame)) => text.extend_from_slice(frame.data_ref().unwrap()),
                Some(Err(_)) => break true,
                None => break false,
            }
        };
        assert!(failed, "the body must end in an error, not a clean end");
        let text = String::from_utf8(text).unwrap();
        assert_eq!(text.matches("data: {").count(), 5);
        assert!(!text.contains("[DONE]") && !text.contains("error"));
        assert_eq!(sim.metric("vllm:generation_tokens_total").await, 5.0);
        // Non-streaming requests never die.
        let (status, _) = sim
            .post_json("/v1/completions", json!({"prompt": "x", "max_tokens": 2}))
            .await;
        assert_eq!(status, StatusCode::OK);
    }

    #[tokio::test]
    async fn faults_change_while_it_runs() {
        let sim = Sim::start(SimConfig {
            error_rate: 1.0,
            ..SimConfig::default()
        })
        .await;
        let request = json!({"prompt": "x", "max_tokens": 1});
        let (status, _) = sim.post_json("/v1/completions", request.clone()).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        let (status, v) = sim
            .post_json("/sim/faults", json!({"error_rate": 0.0}))
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            v,
            json!({"error_rate": 0.0, "die_rate": 0.0, "errors_injected": 1, "deaths_injected": 0})
        );
        let (status, _) = sim.post_json("/v1/completions", request).await;
        assert_eq!(status, StatusCode::OK);
        for bad in [
            json!({"error_rate": 2.0}),
            json!({"error_rate": "0"}),
            json!({"errors": 0}),
        ] {
            let (status, v) = sim.post_json("/sim/faults", bad.clone()).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(v["error"]["type"], "BadRequestError", "{v}");
        }
        let (status, _, body) = sim.call(Method::GET, "/sim/faults", "").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains(r#""error_rate":0.0"#), "{body}");
    }

    #[tokio::test]
    async fn a_held_request_keeps_its_slot_before_its_prefill_until_released() {
        let sim = Sim::start(SimConfig::default()).await;
        let (status, v) = sim.post_json("/sim/hold", json!({"held": true})).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(v, json!({"held": true, "holding": 0}));
        let body = json!({"prompt": "p", "max_tokens": 2, "stream": true}).to_string();
        let mut held = sim
            .send(Method::POST, "/v1/completions", &body, &[])
            .await
            .into_body();
        loop {
            let (_, _, text) = sim.call(Method::GET, "/sim/hold", "").await;
            if serde_json::from_str::<Value>(&text).unwrap()["holding"] == 1 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(sim.metric("vllm:num_requests_running").await, 1.0);
        assert_eq!(sim.metric("vllm:prompt_tokens_total").await, 0.0);
        for bad in [
            json!({}),
            json!({"held": "no"}),
            json!({"held": false, "x": 1}),
        ] {
            let (status, v) = sim.post_json("/sim/hold", bad.clone()).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(v["error"]["type"], "BadRequestError", "{v}");
        }
        let (status, v) = sim.post_json("/sim/hold", json!({"held": false})).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(v["held"], false);
        let mut text = Vec::new();
        while let Some(frame) = held.frame().await {
            text.extend_from_slice(frame.unwrap().data_ref().unwrap());
        }
        assert!(text.ends_with(b"data: [DONE]\n\n"));
        assert_eq!(sim.metric("vllm:generation_tokens_total").await, 2.0);
        let (_, _, text) = sim.call(Method::GET, "/sim/hold", "").await;
        assert_eq!(text, r#"{"held":false,"holding":0}"#);
    }

    #[tokio::test]
    async fn api_key_guards_v1_routes_like_vllm() {
        let sim = Sim::start(SimConfig {
            api_key: Some("k1".into()),
            ..SimConfig::default()
        })
        .await;
        let (status, _, body) = sim.call(Method::GET, "/v1/models", "").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body, r#"{"error":"Unauthorized"}"#);
        let (status, _, _) = sim.call(Method::GET, "/health", "").await;
        assert_eq!(status, StatusCode::OK);
        // The simulator's own control route is guarded too.
        let (status, _, _) = sim.call(Method::GET, "/sim/faults", "").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let wrong = sim
            .send(
                Method::GET,
                "/v1/models",
                "",
                &[("authorization", "Bearer k2")],
            )
            .await;
        assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
        let right = sim
            .send(
                Method::GET,
                "/v1/models",
                "",
                &[("authorization", "Bearer k1")],
            )
            .await;
        assert_eq!(right.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn prompt_counter_counts_each_prompt_once_per_sequence_as_vllm_does() {
        let sim = Sim::start(SimConfig::default()).await;
        let (status, v) = sim
            .post_json(
                "/v1/completions",
                json!({"prompt": ["a b c", "d e"], "n": 3, "max_tokens": 2}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        let billed = v["usage"]["prompt_tokens"].as_f64().unwrap_or_default();
        assert!(billed > 0.0);
        assert_eq!(sim.metric("vllm:prompt_tokens_total").await, 3.0 * billed);
    }
}
