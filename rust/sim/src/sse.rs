//! The streaming answer: vLLM's SSE chunk shapes (`data: <compact JSON>\n\n` up to
//! `data: [DONE]\n\n`) and the body stream that paces them on a `Generation`'s clock.
//!
//! Frames are produced as the engine generates, never ahead: a token's frame exists only once
//! its decode step has run (and been counted). Timing and counting belong to `engine.rs`.

use std::io;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::stream;

use super::engine::Generation;
use super::plan::{Finish, Kind, StreamMode};
use super::response::{
    FINGERPRINT_MEMBER, Head, push_escaped, push_opt_str, push_u64, write_usage_fields,
};

const CONTENT_TYPE: &str = "text/event-stream; charset=utf-8";
const DONE: &[u8] = b"data: [DONE]\n\n";

/// Unpaced (`itl_ms: 0`) streams are cut into body chunks of about this size.
const MAX_CHUNK: usize = 64 * 1024;

/// Writes the chunks of one streaming request.
#[derive(Debug)]
pub(crate) struct Frames {
    kind: Kind,
    mode: StreamMode,
    /// `data: {"id":..,"object":..,"created":..,"model":..,"choices":[`
    prefix: Vec<u8>,
}

impl Frames {
    pub(crate) fn new(head: &Head, kind: Kind, mode: StreamMode) -> Self {
        let object = match kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        let mut prefix = Vec::with_capacity(160);
        prefix.extend_from_slice(b"data: {");
        head.write(&mut prefix, object);
        prefix.extend_from_slice(b",\"choices\":[");
        Self { kind, mode, prefix }
    }

    /// Chat's opening chunk of a choice: `"delta":{"role":"assistant","content":""}`.
    pub(crate) fn role(&self, out: &mut Vec<u8>, index: usize, usage: (u64, u64)) {
        out.extend_from_slice(&self.prefix);
        out.extend_from_slice(b"{\"index\":");
        push_u64(out, index as u64);
        out.extend_from_slice(
            b",\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\
              \"logprobs\":null,\"finish_reason\":null}]",
        );
        self.close(out, usage);
    }

    /// One token's chunk; the last token of a choice carries its finish reason.
    pub(crate) fn token(
        &self,
        out: &mut Vec<u8>,
        index: usize,
        text: &str,
        finish: Option<(Finish, Option<&str>)>,
        usage: (u64, u64),
    ) {
        out.extend_from_slice(&self.prefix);
        out.extend_from_slice(b"{\"index\":");
        push_u64(out, index as u64);
        match self.kind {
            Kind::Chat => out.extend_from_slice(b",\"delta\":{\"content\":\""),
            Kind::Completion => out.extend_from_slice(b",\"text\":\""),
        }
        push_escaped(out, text);
        match self.kind {
            Kind::Chat => out.extend_from_slice(b"\"},\"logprobs\":null,\"finish_reason\":"),
            Kind::Completion => out.extend_from_slice(b"\",\"logprobs\":null,\"finish_reason\":"),
        }
        match finish {
            Some((finish, stop_reason)) => {
                out.push(b'"');
                out.extend_from_slice(finish.as_str().as_bytes());
                out.extend_from_slice(b"\",\"stop_reason\":");
                push_opt_str(out, stop_reason);
            }
            None if self.kind == Kind::Completion => {
                out.extend_from_slice(b"null,\"stop_reason\":null");
            }
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b"}]");
        // As vLLM 0.32: terminal chunks carry the fingerprint unless a usage chunk will.
        if finish.is_some() && !self.mode.include_usage {
            out.extend_from_slice(FINGERPRINT_MEMBER);
        }
        self.close(out, usage);
    }

    /// The closing usage chunk (`"choices":[]`), only with `include_usage`.
    pub(crate) fn final_usage(&self, out: &mut Vec<u8>, prompt: u64, completion: u64) {
        if self.mode.include_usage {
            out.extend_from_slice(&self.prefix);
            out.extend_from_slice(b"],\"usage\":{");
            write_usage_fields(out, prompt, completion);
            out.push(b'}');
            out.extend_from_slice(FINGERPRINT_MEMBER);
            out.extend_from_slice(b"}\n\n");
        }
    }

    /// Ends a choice chunk: cumulative usage with `continuous_usage_stats`, then the frame end.
    fn close(&self, out: &mut Vec<u8>, (prompt, completion): (u64, u64)) {
        if self.mode.continuous_usage {
            out.extend_from_slice(b",\"usage\":{");
            write_usage_fields(out, prompt, completion);
            out.push(b'}');
        }
        out.extend_from_slice(b"}\n\n");
    }
}

/// Drives a `Generation` and turns it into body chunks.
struct Streamer {
    generation: Generation,
    frames: Frames,
    /// Steps after which the simulated worker dies (`die_rate`), if it does.
    die_after: Option<u32>,
    phase: Phase,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Start,
    Decoding,
    Dying,
    Done,
}

/// The 200 `text/event-stream` response; headers go out at once, frames as they are generated.
pub(crate) fn response(generation: Generation, frames: Frames, dies: bool) -> Response {
    let die_after = dies.then(|| generation.steps() / 2);
    let streamer = Streamer {
        generation,
        frames,
        die_after,
        phase: Phase::Start,
    };
    let body = stream::unfold(streamer, |mut s| async move {
        let item = s.next_chunk().await?;
        Some((item, s))
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE))],
        Body::from_stream(body),
    )
        .into_response()
}

fn death() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "simulated worker death")
}

impl Streamer {
    async fn next_chunk(&mut self) -> Option<io::Result<Bytes>> {
        let mut out = Vec::new();
        match self.phase {
            Phase::Done => return None,
            Phase::Dying => {
                self.phase = Phase::Done;
                // Pending once first, so hyper flushes the frames already handed to it; then an
                // error from the body makes it drop the connection without the closing chunk:
                // the client sees a cut connection, no `[DONE]`, no error frame.
                tokio::task::yield_now().await;
                return Some(Err(death()));
            }
            Phase::Start => {
                if let Err(err) = self.generation.prefill().await {
                    // Only reachable if the engine shut down: vLLM's after-200 error shape.
                    out.extend_from_slice(b"data: ");
                    err.write_json(&mut out);
                    out.extend_from_slice(b"\n\n");
                    out.extend_from_slice(DONE);
                    self.generation.fail();
                    self.phase = Phase::Done;
                    return Some(Ok(out.into()));
                }
                if self.frames.kind == Kind::Chat {
                    self.role_frames(&mut out);
                }
                self.phase = Phase::Decoding;
            }
            Phase::Decoding => self.generation.wait_for_step().await,
        }
        let paced = !self.generation.itl().is_zero();
        loop {
            if self.die_after == Some(self.generation.step()) {
                self.generation.fail();
                if out.is_empty() {
                    self.phase = Phase::Done;
                    return Some(Err(death()));
                }
                self.phase = Phase::Dying;
                break;
            }
            if self.generation.is_done() {
                self.finish_frames(&mut out);
                self.generation.finish();
                self.phase = Phase::Done;
                break;
            }
            let pos = self.generation.decode_step();
            self.token_frames(&mut out, pos);
            // Paced, a chunk is one step (the end follows the last token at once). Unpaced, a
            // chunk is as many steps as fit in `MAX_CHUNK`, so hyper's backpressure bounds memory.
            let step = self.generation.step();
            let ends_here = self.generation.is_done() || self.die_after == Some(step);
            if !ends_here && (paced || out.len() >= MAX_CHUNK) {
                break;
            }
        }
        Some(Ok(out.into()))
    }

    fn role_frames(&self, out: &mut Vec<u8>) {
        let plan = self.generation.plan();
        for (index, choice) in plan.choices.iter().enumerate() {
            let prompt = u64::from(plan.prompt_tokens[choice.prompt]);
            self.frames.role(out, index, (prompt, 0));
        }
    }

    fn token_frames(&self, out: &mut Vec<u8>, pos: u32) {
        let plan = self.generation.plan();
        for (index, choice) in plan.choices.iter().enumerate() {
            if choice.tokens <= pos {
                continue;
            }
            let finish =
                (pos + 1 == choice.tokens).then(|| (choice.finish, choice.stop_reason(plan)));
            let prompt = u64::from(plan.prompt_tokens[choice.prompt]);
            let usage = (prompt, u64::from(self.generation.generated(index)));
            self.frames
                .token(out, index, choice.delta(pos), finish, usage);
        }
    }

    fn finish_frames(&self, out: &mut Vec<u8>) {
        let plan = self.generation.plan();
        let completion = plan.total_completion_tokens();
        self.frames
            .final_usage(out, plan.total_prompt_tokens(), completion);
        out.extend_from_slice(DONE);
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on a bad fixture")]
mod tests {
    use std::sync::Arc;

    use http_body_util::BodyExt;
    use serde_json::Value;

    use super::*;
    use crate::config::SimConfig;
    use crate::engine::Engine;
    use crate::request;

    fn head() -> Head {
        Head {
            id_json: "\"chatcmpl-abc\"".to_owned(),
            created: 1,
            model_json: "\"sim-model\"".to_owned(),
        }
    }

    /// Runs one streaming request through `response` and returns its SSE payloads, or the
    /// payloads seen before the body failed.
    async fn stream(config: SimConfig, kind: Kind, body: &str, dies: bool) -> (Vec<String>, bool) {
        let engine = Arc::new(Engine::new(config.normalized()));
        let plan = match kind {
            Kind::Chat => request::chat(body.as_bytes(), &engine.config),
            Kind::Completion => request::completion(body.as_bytes(), &engine.config),
        }
        .unwrap();
        let frames = Frames::new(&head(), kind, plan.stream.unwrap());
        let response = response(Generation::new(engine, plan), frames, dies);
        assert_eq!(response.headers()[header::CONTENT_TYPE], CONTENT_TYPE);
        let mut body = response.into_body();
        let mut text = String::new();
        let mut failed = false;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => text.push_str(std::str::from_utf8(frame.data_ref().unwrap()).unwrap()),
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        assert!(text.ends_with("\n\n") || text.is_empty());
        let events = text
            .split_terminator("\n\n")
            .map(|e| e.strip_prefix("data: ").unwrap().to_owned())
            .collect();
        (events, failed)
    }

    fn json(event: &str) -> Value {
        serde_json::from_str(event).unwrap()
    }

    #[tokio::test]
    async fn chat_stream_opens_with_role_and_ends_with_done_without_usage() {
        let (events, failed) = stream(
            SimConfig::default(),
            Kind::Chat,
            r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":3,"stream":true}"#,
            false,
        )
        .await;
        assert!(!failed);
        assert_eq!(events.len(), 1 + 3 + 1);
        assert_eq!(events[4], "[DONE]");
        let role = json(&events[0]);
        assert_eq!(role["object"], "chat.completion.chunk");
        assert_eq!(
            role["choices"][0]["delta"],
            serde_json::json!({"role":"assistant","content":""})
        );
        for (i, event) in events[1..4].iter().enumerate() {
            let chunk = json(event);
            assert!(chunk.get("usage").is_none());
            let choice = &chunk["choices"][0];
            assert!(
                choice["delta"]["content"]
                    .as_str()
                    .unwrap()
                    .starts_with(' ')
            );
            let finish = if i == 2 {
                Value::from("length")
            } else {
                Value::Null
            };
            assert_eq!(choice["finish_reason"], finish);
        }
        assert!(!events.iter().any(|e| e.contains("usage")));
    }

    #[tokio::test]
    async fn include_usage_adds_one_final_chunk_and_continuous_usage_counts_per_chunk() {
        let body = r#"{"messages":[{"role":"user","content":"a b"}],"max_tokens":2,"stream":true,
                       "stream_options":{"include_usage":true}}"#;
        let (events, _) = stream(SimConfig::default(), Kind::Chat, body, false).await;
        assert_eq!(events.len(), 1 + 2 + 1 + 1);
        let last = json(&events[3]);
        assert_eq!(last["choices"], serde_json::json!([]));
        assert_eq!(
            last["usage"],
            serde_json::json!({"prompt_tokens":9,"total_tokens":11,"completion_tokens":2})
        );
        assert!(events[..3].iter().all(|e| !e.contains("usage")));

        let body = body.replace(
            r#""include_usage":true"#,
            r#""include_usage":true,"continuous_usage_stats":true"#,
        );
        let (events, _) = stream(SimConfig::default(), Kind::Chat, &body, false).await;
        let completions: Vec<_> = events[..4]
            .iter()
            .map(|e| json(e)["usage"]["completion_tokens"].as_u64().unwrap())
            .collect();
        assert_eq!(completions, vec![0, 1, 2, 2]);
    }

    #[tokio::test]
    async fn completions_stream_interleaves_n_choices_without_a_role_chunk() {
        let body =
            r#"{"prompt":["x","y z"],"n":2,"max_tokens":2,"stream":true,"stream_options":{}}"#;
        let (events, _) = stream(SimConfig::default(), Kind::Completion, body, false).await;
        assert_eq!(events.len(), 4 * 2 + 1 + 1);
        let indices: Vec<_> = events[..8]
            .iter()
            .map(|e| json(e)["choices"][0]["index"].as_u64().unwrap())
            .collect();
        assert_eq!(indices, vec![0, 1, 2, 3, 0, 1, 2, 3]);
        let first = json(&events[0]);
        assert_eq!(first["object"], "text_completion");
        assert!(first["choices"][0]["text"].is_string());
        assert_eq!(first["choices"][0]["stop_reason"], Value::Null);
        let usage = &json(&events[8])["usage"];
        assert_eq!(
            (
                usage["prompt_tokens"].as_u64(),
                usage["completion_tokens"].as_u64()
            ),
            (Some(2 + 3), Some(8))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_dying_worker_cuts_the_body_after_half_the_tokens() {
        let config = SimConfig {
            itl_ms: 5,
            ..SimConfig::default()
        };
        let body = r#"{"prompt":"x","max_tokens":6,"stream":true}"#;
        let (events, failed) = stream(config, Kind::Completion, body, true).await;
        assert!(failed);
        assert_eq!(events.len(), 3);
        assert!(
            !events
                .iter()
                .any(|e| e.contains("DONE") || e.contains("error"))
        );
    }

    async fn chunks(config: SimConfig, body: &str) -> Vec<(tokio::time::Instant, Bytes)> {
        let engine = Arc::new(Engine::new(config.normalized()));
        let plan = request::chat(body.as_bytes(), &engine.config).unwrap();
        let frames = Frames::new(&head(), Kind::Chat, plan.stream.unwrap());
        let mut body = response(Generation::new(engine, plan), frames, false).into_body();
        let mut chunks = Vec::new();
        while let Some(frame) = body.frame().await {
            let data = frame.unwrap().into_data().unwrap();
            chunks.push((tokio::time::Instant::now(), data));
        }
        chunks
    }

    #[tokio::test(start_paused = true)]
    async fn paced_streams_send_one_step_per_chunk_on_the_engine_clock() {
        let config = SimConfig {
            ttft_ms: 100,
            itl_ms: 10,
            ..SimConfig::default()
        };
        let start = tokio::time::Instant::now();
        let body = r#"{"messages":[],"max_tokens":3,"stream":true}"#;
        let chunks = chunks(config, body).await;
        let at: Vec<_> = chunks
            .iter()
            .map(|(t, _)| (*t - start).as_millis())
            .collect();
        assert_eq!(at, vec![100, 110, 120]);
        let events = |b: &Bytes| b.windows(6).filter(|w| w == b"data: ").count();
        let per_chunk: Vec<_> = chunks.iter().map(|(_, b)| events(b)).collect();
        // Role and first token together; the last token together with `[DONE]`.
        assert_eq!(per_chunk, vec![2, 1, 2]);
    }

    #[tokio::test]
    async fn long_unpaced_streams_are_cut_into_bounded_chunks() {
        let config = SimConfig {
            max_model_len: 100_000,
            ..SimConfig::default()
        };
        let body = r#"{"messages":[],"max_tokens":5000,"ignore_eos":true,"stream":true}"#;
        let chunks = chunks(config, body).await;
        assert!(chunks.len() > 5, "{}", chunks.len());
        assert!(chunks.iter().all(|(_, b)| b.len() < MAX_CHUNK + 1024));
        let text: Vec<u8> = chunks.iter().flat_map(|(_, b)| b.to_vec()).collect();
        assert_eq!(
            text.windows(6).filter(|w| w == b"data: ").count(),
            1 + 5000 + 1
        );
    }
}
