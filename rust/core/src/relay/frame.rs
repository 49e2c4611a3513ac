//! What one worker SSE event becomes for the client, and the usage it carries.
//!
//! The gateway always asks the worker for cumulative usage on every chunk; the client gets
//! exactly what it would have got from vLLM with its own `stream_options`: `usage` members are
//! cut out byte-exactly where the client did not ask for them, and the trailing usage-only chunk
//! is dropped unless the client asked for usage.
//!
//! One more member moves with usage. vLLM (0.32) stamps `system_fingerprint` on a stream's terminal
//! chunks (those with a `finish_reason`) when the client did not ask for usage, and on the
//! usage-only chunk instead when it did. So for a client without usage, the gateway marks terminal
//! chunks and reads the fingerprint off the usage-only chunk it drops; the relay puts it back where
//! vLLM would have ([`with_fingerprint`]).

use super::answer::Answer;
use crate::json;
use crate::request::UsageOptions;
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
    /// A choice's terminal chunk, for a client without usage: vLLM would have stamped it with the
    /// stream's `system_fingerprint`.
    pub terminal: bool,
    /// For a client without usage, where the usage-only event's `system_fingerprint` value is.
    pub fingerprint: Option<Range<usize>>,
}

const DATA: &[u8] = b"data:";

/// The JSON payload of a `data:` event, trimmed; `None` for other events and `[DONE]`.
pub fn payload(event: &[u8]) -> Option<&[u8]> {
    let payload = event.strip_prefix(DATA)?.trim_ascii();
    (payload != b"[DONE]").then_some(payload)
}

/// Where the `choices` value starts in a stream's events. vLLM writes the same `id`, `object`,
/// `created` and `model` ahead of every chunk's `choices`, so an event whose bytes up to that
/// point are the last one's has its `choices` at the same place: a comparison of those bytes
/// instead of a scan of the members before it. Exact: the scan reads nothing past that point.
#[derive(Debug, Default)]
pub struct ChoicesAt {
    /// The last payload's bytes up to and including the first byte of its `choices` value.
    prefix: Vec<u8>,
}

impl ChoicesAt {
    /// `json::value_start(payload, "choices")`.
    fn find(&mut self, payload: &[u8]) -> Option<usize> {
        if let Some(last) = self.prefix.len().checked_sub(1)
            && payload.get(..self.prefix.len()) == Some(&self.prefix[..])
        {
            return Some(last);
        }
        let start = json::value_start(payload, "choices")?;
        if let Some(prefix) = payload.get(..=start) {
            self.prefix.clear();
            self.prefix.extend_from_slice(prefix);
        }
        Some(start)
    }
}

/// Inspects one complete event (with its trailing blank line).
#[cfg(test)]
pub fn inspect(event: &[u8], client: UsageOptions) -> Inspected {
    inspect_in(event, client, &mut ChoicesAt::default())
}

/// Inspects one complete event (with its trailing blank line) of the stream whose `choices`
/// were last seen at `choices_at`.
pub fn inspect_in(event: &[u8], client: UsageOptions, choices_at: &mut ChoicesAt) -> Inspected {
    let mut inspected = Inspected {
        action: FrameAction::Keep,
        usage: None,
        choice: None,
        done: false,
        error: false,
        terminal: false,
        fingerprint: None,
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
    let choices = choices_at.find(payload).map(|start| &payload[start..]);
    let usage_only = choices.is_some_and(|c| {
        c.strip_prefix(b"[")
            .is_some_and(|rest| rest.trim_ascii_start().starts_with(b"]"))
    });
    if usage_only {
        if !client.include_usage {
            inspected.fingerprint = json::find_member(payload, "system_fingerprint")
                .map(|span| offset + span.value.start..offset + span.value.end);
        }
    } else {
        inspected.choice = choices.and_then(first_choice_index);
        inspected.terminal = !client.include_usage && choices.is_some_and(first_choice_finished);
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

/// What `inspect` finds in a choice event that `answer::read` has read (`payload` is the event's,
/// as `payload` gives it): where its usage is and whose it is, without reading the event again.
/// `None` for any other event (usage-only, an error, no choice), which `inspect` reads. Nothing
/// in it depends on the client's usage options: a choice event's action and `terminal` matter
/// only to an SSE client, whose events `inspect` reads.
pub fn inspect_answer(event: &[u8], payload: &[u8], answer: &Answer<'_>) -> Option<Inspected> {
    let first = answer.choices.first()?;
    if answer.error {
        return None;
    }
    let offset = (payload.as_ptr() as usize).checked_sub(event.as_ptr() as usize)?;
    Some(Inspected {
        action: FrameAction::Keep,
        usage: (answer.usage.as_ref()).map(|range| offset + range.start..offset + range.end),
        choice: first.index.map(u64::from),
        done: false,
        error: false,
        terminal: false,
        fingerprint: None,
    })
}

/// Whether the first object of the `choices` array has a non-null `finish_reason`.
fn first_choice_finished(choices: &[u8]) -> bool {
    choices
        .strip_prefix(b"[")
        .map(<[u8]>::trim_ascii_start)
        .and_then(|object| Some(&object[json::value_start(object, "finish_reason")?..]))
        .is_some_and(|value| !value.starts_with(b"null"))
}

/// `event` (one `data: {...}` event) with `"system_fingerprint":<fingerprint>` as the object's
/// last member, where vLLM puts it.
pub fn with_fingerprint(event: &[u8], fingerprint: &[u8]) -> Vec<u8> {
    let Some(close) = event.iter().rposition(|&b| b == b'}') else {
        return event.to_vec();
    };
    let mut out = Vec::with_capacity(event.len() + fingerprint.len() + 22);
    out.extend_from_slice(&event[..close]);
    out.extend_from_slice(b",\"system_fingerprint\":");
    out.extend_from_slice(fingerprint);
    out.extend_from_slice(&event[close..]);
    out
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
    use crate::usage::Usage;

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

    const NONE: UsageOptions = UsageOptions {
        include_usage: false,
        continuous_usage_stats: false,
    };
    const FINAL_ONLY: UsageOptions = UsageOptions {
        include_usage: true,
        continuous_usage_stats: false,
    };
    const CONTINUOUS: UsageOptions = UsageOptions {
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
    fn fingerprint_moves_from_the_usage_chunk_to_terminal_chunks_for_a_client_without_usage() {
        let terminal = "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"text\":\"!\",\"finish_reason\":\"length\"}],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":3}}\n\n";
        let last = "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":3},\"system_fingerprint\":\"vllm-0.32.0-x\"}\n\n";
        let inspected = inspect(terminal.as_bytes(), NONE);
        assert!(inspected.terminal);
        assert!(!inspect(CHUNK.as_bytes(), NONE).terminal);
        assert!(!inspect(terminal.as_bytes(), FINAL_ONLY).terminal);
        let usage_only = inspect(last.as_bytes(), NONE);
        let Some(range) = usage_only.fingerprint else {
            panic!("fingerprint not found")
        };
        assert_eq!(&last[range.clone()], "\"vllm-0.32.0-x\"");
        assert_eq!(inspect(last.as_bytes(), FINAL_ONLY).fingerprint, None);
        let FrameAction::Strip(cut) = inspected.action else {
            panic!("usage not stripped")
        };
        let stripped = [
            &terminal.as_bytes()[..cut.start],
            &terminal.as_bytes()[cut.end..],
        ]
        .concat();
        assert_eq!(
            String::from_utf8_lossy(&with_fingerprint(&stripped, last[range].as_bytes())),
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"text\":\"!\",\"finish_reason\":\"length\"}],\"system_fingerprint\":\"vllm-0.32.0-x\"}\n\n"
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
