//! The relay's JSON work on one worker answer, without HTTP: for each event of a 16-token
//! streamed completion as `gateway sim` (and vLLM) sends it, with continuous usage, what
//! `relay::frame::inspect` looks up for an SSE client (the event's `usage` member, the start of
//! its `choices`), and what a typed surface (gRPC) reads of them (`relay::answer`); and the
//! `usage` member of the same answer unstreamed.
//!
//!     cargo bench -p gateway-core --bench json
//!
//! Prints one JSON object: nanoseconds per streamed answer and per unstreamed body. Run by
//! `cargo test` (no `--bench` argument), it only checks itself on a few thousand answers.

#![expect(
    clippy::unwrap_used,
    reason = "a benchmark fails loudly on a bad fixture"
)]

use std::hint::black_box;
use std::time::Instant;

use gateway_core::json;
use gateway_core::relay::answer;
use serde_json::json;

const ID: &str = "cmpl-c4a912a7105e9a636f5dc244d55a2492";
const TOKENS: usize = 16;

/// The payloads of a streamed answer's events: one per token, then the usage-only event.
fn stream_payloads() -> Vec<String> {
    let mut payloads: Vec<String> = (1..=TOKENS)
        .map(|n| {
            let finish = if n == TOKENS { r#""length""# } else { "null" };
            format!(
                r#"{{"id":"{ID}","object":"text_completion","created":1796440213,"model":"sim-model","choices":[{{"index":0,"text":" tok{n}","logprobs":null,"finish_reason":{finish},"stop_reason":null}}],"usage":{{"prompt_tokens":3,"total_tokens":{},"completion_tokens":{n}}}}}"#,
                3 + n
            )
        })
        .collect();
    payloads.push(format!(
        r#"{{"id":"{ID}","object":"text_completion","created":1796440213,"model":"sim-model","choices":[],"usage":{{"prompt_tokens":3,"total_tokens":{},"completion_tokens":{TOKENS}}},"system_fingerprint":"vllm-0.32.0-gatewaysim"}}"#,
        3 + TOKENS
    ));
    payloads
}

/// The same answer unstreamed, members in vLLM's order.
fn body() -> String {
    let text: String = (1..=TOKENS).map(|n| format!(" tok{n}")).collect();
    format!(
        r#"{{"id":"{ID}","object":"text_completion","created":1796440213,"model":"sim-model","choices":[{{"index":0,"text":"{text}","logprobs":null,"finish_reason":"length","stop_reason":null,"prompt_logprobs":null}}],"service_tier":null,"system_fingerprint":"vllm-0.32.0-gatewaysim","usage":{{"prompt_tokens":3,"total_tokens":{},"completion_tokens":{TOKENS},"prompt_tokens_details":null}},"kv_transfer_params":null}}"#,
        3 + TOKENS
    )
}

/// What `inspect` looks up in one answer's events; returns a checksum of the offsets found.
fn inspect_stream(payloads: &[String]) -> usize {
    payloads
        .iter()
        .map(|p| {
            let p = black_box(p.as_bytes());
            let usage = json::find_member(p, "usage").unwrap().value.start;
            usage + json::value_start(p, "choices").unwrap()
        })
        .sum()
}

/// A typed surface's read of the same events (`relay::answer`), the first whole, the rest without
/// their head; returns a checksum of the choices read.
fn read_stream(payloads: &[String]) -> usize {
    payloads
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let p = black_box(p.as_bytes());
            let answer = if i == 0 {
                answer::read(p)
            } else {
                answer::read_choices(p)
            };
            answer.unwrap().choices.len()
        })
        .sum()
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let n: usize = if bench { 1_000_000 } else { 2_000 };
    let payloads = stream_payloads();
    let body = body();
    for p in payloads.iter().chain([&body]) {
        serde_json::from_str::<serde_json::Value>(p).unwrap();
    }

    let expected = inspect_stream(&payloads);
    let started = Instant::now();
    for _ in 0..n {
        assert_eq!(inspect_stream(&payloads), expected);
    }
    let stream_ns = started.elapsed().as_nanos() as f64 / n as f64;

    assert_eq!(read_stream(&payloads), TOKENS);
    let started = Instant::now();
    for _ in 0..n {
        assert_eq!(read_stream(&payloads), TOKENS);
    }
    let read_ns = started.elapsed().as_nanos() as f64 / n as f64;

    let usage = json::find_member(body.as_bytes(), "usage").unwrap().value;
    assert!(body[usage.clone()].starts_with(r#"{"prompt_tokens":3"#));
    let started = Instant::now();
    for _ in 0..n {
        let found = json::find_member(black_box(body.as_bytes()), "usage").unwrap();
        assert_eq!(found.value, usage);
    }
    let body_ns = started.elapsed().as_nanos() as f64 / n as f64;

    println!(
        "{}",
        json!({
            "answers": n,
            "events_per_stream": payloads.len(),
            "ns_per_streamed_answer": stream_ns,
            "ns_per_streamed_answer_read_typed": read_ns,
            "ns_per_unstreamed_body": body_ns,
        })
    );
}
