//! The journal's lines, written by hand: the bytes `serde_json` makes of a `Line` (the members in
//! the same order, strings escaped alike), without a serializer's per-member dispatch. A request's
//! thread encodes its end record while its response is open, so this is on every request's path;
//! `record::Record::decode` reads the lines back with serde, and the property test below holds the
//! two to the same bytes.

use super::record::{Ended, Line, Progress, Started};

impl Line<'_> {
    /// One line, newline included.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Line::Start(started) => start(out, started),
            Line::Progress { event_id, progress } => progress_line(out, event_id, progress),
            Line::End(ended) => end(out, ended),
        }
        out.extend_from_slice(b"}\n");
    }
}

fn start(out: &mut Vec<u8>, s: &Started) {
    out.extend_from_slice(br#"{"r":"start""#);
    string(out, "event_id", &s.event_id);
    string(out, "request_id", &s.request_id);
    string(out, "tenant_id", &s.tenant_id);
    string(out, "key_id", &s.key_id);
    string(out, "model", &s.model);
    string(out, "endpoint", s.endpoint.as_str());
    boolean(out, "stream", s.stream);
    number(out, "started_at_ms", s.started_at_ms);
}

fn progress_line(out: &mut Vec<u8>, event_id: &str, p: &Progress) {
    out.extend_from_slice(br#"{"r":"progress""#);
    string(out, "event_id", event_id);
    number(out, "prompt_tokens", p.prompt_tokens);
    number(out, "completion_tokens", p.completion_tokens);
    number(out, "cached_tokens", p.cached_tokens);
    number(out, "at_ms", p.at_ms);
}

fn end(out: &mut Vec<u8>, ended: &Ended) {
    let e = &ended.event;
    out.extend_from_slice(br#"{"r":"end""#);
    number(out, "seq", ended.seq);
    string(out, "event_id", &e.event_id);
    string(out, "request_id", &e.request_id);
    string(out, "tenant_id", &e.tenant_id);
    string(out, "key_id", &e.key_id);
    string(out, "model", &e.model);
    match &e.worker {
        Some(worker) => string(out, "worker", worker),
        None => member(out, "worker", b"null"),
    }
    string(out, "endpoint", e.endpoint.as_str());
    boolean(out, "stream", e.stream);
    string(out, "status", e.status.as_str());
    number(out, "http_status", u64::from(e.http_status));
    number(out, "prompt_tokens", e.prompt_tokens);
    number(out, "cached_tokens", e.cached_tokens);
    number(out, "completion_tokens", e.completion_tokens);
    string(out, "usage_source", e.usage_source.as_str());
    number(out, "started_at_ms", e.started_at_ms);
    number(out, "finished_at_ms", e.finished_at_ms);
}

/// `,"name":` then `value`, written as is.
fn member(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    name_of(out, name);
    out.extend_from_slice(value);
}

/// `,"name":` (member names here need no escaping).
fn name_of(out: &mut Vec<u8>, name: &str) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
}

fn number(out: &mut Vec<u8>, name: &str, value: u64) {
    member(out, name, itoa::Buffer::new().format(value).as_bytes());
}

fn boolean(out: &mut Vec<u8>, name: &str, value: bool) {
    member(out, name, if value { b"true" } else { b"false" });
}

/// Whether JSON must escape `byte` in a string: a quote, a backslash, a control character.
fn escaped(byte: u8) -> bool {
    byte < 0x20 || byte == b'"' || byte == b'\\'
}

/// A JSON string, escaped as `serde_json` escapes it.
fn string(out: &mut Vec<u8>, name: &str, value: &str) {
    name_of(out, name);
    out.push(b'"');
    let bytes = value.as_bytes();
    // Most strings need no escape: one pass over them (a fold, so no early exit keeps it from
    // running on whole vectors), then one copy.
    if !bytes.iter().fold(false, |any, &b| any | escaped(b)) {
        out.extend_from_slice(bytes);
    } else {
        let mut run = 0;
        for (i, &b) in bytes.iter().enumerate() {
            if !escaped(b) {
                continue;
            }
            out.extend_from_slice(&bytes[run..i]);
            run = i + 1;
            match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                0x08 => out.extend_from_slice(b"\\b"),
                0x0c => out.extend_from_slice(b"\\f"),
                _ => {
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    out.extend_from_slice(b"\\u00");
                    out.push(HEX[usize::from(b >> 4)]);
                    out.push(HEX[usize::from(b & 0xf)]);
                }
            }
        }
        out.extend_from_slice(&bytes[run..]);
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::super::record::Record;
    use super::*;
    use crate::request::Endpoint;
    use crate::usage::{Status, UsageEvent, UsageSource};

    /// What serde makes of a line: the bytes `encode` must match.
    fn serde_line(line: &Line<'_>) -> Vec<u8> {
        let mut out = serde_json::to_vec(line).unwrap_or_default();
        out.push(b'\n');
        out
    }

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9-]{0,40}",
            // Quotes, backslashes, every control character, non-ASCII, DEL.
            "[\"\\\\\\x00-\\x1f\\x7f é漢😀a-z]{0,24}",
            any::<String>(),
        ]
    }

    fn event() -> impl Strategy<Value = UsageEvent> {
        let endpoint = prop_oneof![
            Just(Endpoint::ChatCompletions),
            Just(Endpoint::Completions),
            Just(Endpoint::Embeddings)
        ];
        let status = prop_oneof![
            Just(Status::Completed),
            Just(Status::Cancelled),
            Just(Status::Failed),
            Just(Status::Interrupted)
        ];
        let source = prop_oneof![
            Just(UsageSource::Worker),
            Just(UsageSource::Gateway),
            Just(UsageSource::None)
        ];
        (
            (text(), text(), text(), text(), text()),
            proptest::option::of(text()),
            (endpoint, any::<bool>(), status, any::<u16>(), source),
            (
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
            ),
        )
            .prop_map(
                |(
                    (event_id, request_id, tenant_id, key_id, model),
                    worker,
                    (endpoint, stream, status, http_status, usage_source),
                    (prompt_tokens, cached_tokens, completion_tokens, started, finished),
                )| UsageEvent {
                    event_id,
                    request_id,
                    tenant_id: Arc::from(tenant_id),
                    key_id: Arc::from(key_id),
                    model,
                    worker: worker.map(Arc::from),
                    endpoint,
                    stream,
                    status,
                    http_status,
                    prompt_tokens,
                    cached_tokens,
                    completion_tokens,
                    usage_source,
                    started_at_ms: started,
                    finished_at_ms: finished,
                },
            )
    }

    proptest! {
        #[test]
        fn every_line_is_the_bytes_serde_makes_and_reads_back(
            event in event(),
            seq in any::<u64>(),
            progress in (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()),
        ) {
            let ended = Ended { seq, event };
            let started = Started::of(&ended.event);
            let progress = Progress {
                prompt_tokens: progress.0,
                completion_tokens: progress.1,
                cached_tokens: progress.2,
                at_ms: progress.3,
            };
            let event_id = started.event_id.as_str();
            let lines = [
                (Line::Start(&started), Record::Start(started.clone())),
                (
                    Line::Progress { event_id, progress: &progress },
                    Record::Progress { event_id: event_id.to_owned(), progress },
                ),
                (Line::End(&ended), Record::End(ended.clone())),
            ];
            for (line, record) in lines {
                let mut out = Vec::new();
                line.encode(&mut out);
                let expected = serde_line(&line);
                prop_assert_eq!(String::from_utf8_lossy(&out), String::from_utf8_lossy(&expected));
                prop_assert_eq!(out.last(), Some(&b'\n'));
                prop_assert_eq!(Record::decode(&out[..out.len() - 1]), Some(record));
            }
        }
    }
}
