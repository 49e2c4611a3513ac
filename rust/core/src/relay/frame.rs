//! What one worker SSE event becomes for the client, and the usage it carries.
//!
//! The gateway always asks the worker for cumulative usage on every chunk; the client gets
//! exactly what it would have got from vLLM with its own `stream_options`: `usage` members are
//! cut out byte-exactly where the client did not ask for them, and the trailing usage-only chunk
//! is dropped unless the client asked for usage.

use crate::api::request::StreamUsage;
use crate::json;
use std::ops::Range;

#[derive(Debug, PartialEq, Eq)]
pub enum FrameAction {
    /// Relay the event unchanged.
    Keep,
    /// Relay nothing.
    Drop,
    /// Relay the event without these bytes (a `usage` member and its comma).
    Strip(std::ops::Range<usize>),
}

#[derive(Debug, PartialEq, Eq)]
pub struct Inspected {
    pub action: FrameAction,
    /// Where the event's cumulative `usage` value is (a range of the event), if it has one;
    /// parse it with `Usage::from_json`. Left unparsed because only the last one of a chunk
    /// per choice counts.
    pub usage: Option<Range<usize>>,
    /// Whose usage it is: the index of the event's choice, or `None` for the stream's
    /// usage-only event, whose usage covers every choice. (vLLM's continuous usage on a choice
    /// chunk counts that choice's tokens only.)
    pub choice: Option<u64>,
    /// The event is the stream's `data: [DONE]`.
    pub done: bool,
    /// The event is an in-stream error (`data: {"error": ...}`).
    pub error: bool,
}

const DATA: &[u8] = b"data:";

/// Inspects one complete event (with its trailing blank line).
pub fn inspect(event: &[u8], client: StreamUsage) -> Inspected {
    let mut inspected = Inspected {
        action: FrameAction::Keep,
        usage: None,
        choice: None,
        done: false,
        error: false,
    };
    let Some(payload) = event.strip_prefix(DATA) else {
        return inspected;
    };
    let offset = DATA.len() + (payload.len() - payload.trim_ascii_start().len());
    let payload = payload.trim_ascii();
    if payload == b"[DONE]" {
        inspected.done = true;
        return inspected;
    }
    let Some(span) = json::find_member(payload, "usage") else {
        inspected.error = json::find_member(payload, "error").is_some();
        return inspected;
    };
    inspected.usage = Some(offset + span.value.start..offset + span.value.end);
    // Only the start of `choices` matters: `[]` marks the usage-only event, otherwise the first
    // choice's `index` says whose usage this is.
    let choices = json::value_start(payload, "choices").map(|start| &payload[start..]);
    let usage_only = choices.is_some_and(|c| {
        c.strip_prefix(b"[")
            .is_some_and(|rest| rest.trim_ascii_start().starts_with(b"]"))
    });
    if !usage_only {
        inspected.choice = choices.and_then(first_choice_index);
    }
    inspected.action = if usage_only {
        if client.include_usage {
            FrameAction::Keep
        } else {
            FrameAction::Drop
        }
    } else if client.include_usage && client.continuous_usage_stats {
        FrameAction::Keep
    } else {
        FrameAction::Strip(offset + span.removal.start..offset + span.removal.end)
    };
    inspected
}

/// The `index` of the first object of the `choices` array that `choices` starts with.
fn first_choice_index(choices: &[u8]) -> Option<u64> {
    let object = choices.strip_prefix(b"[")?.trim_ascii_start();
    let start = json::value_start(object, "index")?;
    let digits = object[start..]
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(object.len() - start);
    std::str::from_utf8(&object[start..start + digits])
        .ok()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metering::Usage;

    const CHUNK: &str = r#"data: {"id":"c","choices":[{"index":0,"text":" a"}],"usage":{"prompt_tokens":3,"total_tokens":5,"completion_tokens":2}}

"#;
    const FINAL: &str = r#"data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"total_tokens":6,"completion_tokens":3}}

"#;

    fn usage(prompt: u64, completion: u64) -> Option<Usage> {
        Some(Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            cached_tokens: 0,
        })
    }

    /// The usage an event carries, parsed.
    fn usage_of(event: &str, inspected: &Inspected) -> Option<Usage> {
        let range = inspected.usage.clone()?;
        Usage::from_json(&event.as_bytes()[range])
    }

    const NONE: StreamUsage = StreamUsage {
        include_usage: false,
        continuous_usage_stats: false,
    };
    const FINAL_ONLY: StreamUsage = StreamUsage {
        include_usage: true,
        continuous_usage_stats: false,
    };
    const CONTINUOUS: StreamUsage = StreamUsage {
        include_usage: true,
        continuous_usage_stats: true,
    };

    #[test]
    fn client_without_usage_gets_chunks_stripped_and_no_usage_chunk() {
        let chunk = inspect(CHUNK.as_bytes(), NONE);
        assert_eq!(usage_of(CHUNK, &chunk), usage(3, 2));
        assert_eq!(chunk.choice, Some(0));
        let FrameAction::Strip(cut) = chunk.action else {
            panic!("usage not stripped: {:?}", chunk.action)
        };
        let stripped = [&CHUNK.as_bytes()[..cut.start], &CHUNK.as_bytes()[cut.end..]].concat();
        assert_eq!(
            stripped,
            b"data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"text\":\" a\"}]}\n\n"
        );
        let last = inspect(FINAL.as_bytes(), NONE);
        assert_eq!(usage_of(FINAL, &last), usage(3, 3));
        assert_eq!(last.choice, None);
        assert_eq!(last.action, FrameAction::Drop);
    }

    #[test]
    fn client_with_include_usage_keeps_only_the_usage_chunk() {
        assert!(matches!(
            inspect(CHUNK.as_bytes(), FINAL_ONLY).action,
            FrameAction::Strip(_)
        ));
        assert_eq!(
            inspect(FINAL.as_bytes(), FINAL_ONLY).action,
            FrameAction::Keep
        );
    }

    #[test]
    fn client_with_continuous_usage_gets_everything_unchanged() {
        assert_eq!(
            inspect(CHUNK.as_bytes(), CONTINUOUS).action,
            FrameAction::Keep
        );
        assert_eq!(
            inspect(FINAL.as_bytes(), CONTINUOUS).action,
            FrameAction::Keep
        );
    }

    #[test]
    fn choice_index_of_a_later_choice() {
        let event = b"data: {\"choices\":[ {\"text\":\"x\",\"index\":3}],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\n\n";
        assert_eq!(inspect(event, NONE).choice, Some(3));
    }

    #[test]
    fn done_and_error_events() {
        let done = inspect(b"data: [DONE]\n\n", NONE);
        assert!(done.done);
        assert_eq!(done.action, FrameAction::Keep);
        let error = inspect(b"data: {\"error\":{\"message\":\"x\"}}\n\n", NONE);
        assert!(error.error);
        assert_eq!(error.action, FrameAction::Keep);
        assert_eq!(inspect(b": comment\n\n", NONE).action, FrameAction::Keep);
    }
}
