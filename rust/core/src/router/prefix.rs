//! The key `prefix_affinity` places a request by: a hash of the leading part of its prompt, the
//! part a worker's prefix cache would serve again, or of the client's session id.
//!
//! It reads the request's raw body only when a policy asks for the key, and never more of it
//! than the key covers (plus, for chat, the members and messages before it). It does not choose
//! a worker (`affinity` does).
//!
//! How much of a prompt the key covers is a trade-off. vLLM caches whole KV blocks only, so a
//! prefix shorter than one block gains nothing from landing where it landed before; a key longer
//! than what the turns of one conversation share sends its turns to different workers.
//! - Completions: the prompt's first `block × BYTES_PER_TOKEN` bytes (a batch: its first
//!   prompt's), or its first `block` token ids. Eight bytes a token is a generous bound (English
//!   averages about four with Llama-class tokenizers), so the key covers at least one block; a
//!   conversation whose first prompt is shorter than that keeps its key only once every turn is
//!   longer, and gets no cached block from its first turn either.
//! - Chat: the conversation's opening, which every later turn repeats unchanged: the leading
//!   `system` (or `developer`) messages and the first message after them, as the client's JSON
//!   writes them, at most `MAX_OPENING_BYTES`. Two conversations that open alike (same system
//!   prompt, same first question) share a key; conversations that share only a system prompt do
//!   not, so each conversation's own history stays on one worker, and the shared prompt is
//!   cached once per worker.
//! - `X-Session-Id`, when given, stands for the prompt: the client says which requests belong
//!   together.

use std::sync::Arc;

use bytes::Bytes;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::json::{self, Reader};
use crate::request::Endpoint;

/// The most bytes of text one token is taken to stand for.
pub const BYTES_PER_TOKEN: usize = 8;

/// The block size assumed while no worker has reported one: vLLM's default on GPUs.
pub const DEFAULT_BLOCK_TOKENS: u32 = 16;

/// The most of a chat's opening hashed: what a hostile body can make the key cost.
pub const MAX_OPENING_BYTES: usize = 64 * 1024;

/// Seeds a session's hash apart from prompts' (a session id equal to some prompt's bytes must
/// not share its key). Any fixed value; every replica must use the same.
const SESSION_SEED: u64 = 0x7365_7373_696f_6e31;

/// What a request's key is made from, borrowed from the request: building it costs nothing.
#[derive(Debug, Clone, Copy)]
pub struct Prefix<'a> {
    /// The JSON body as the client sent it.
    pub body: &'a Bytes,
    /// The client's `X-Session-Id`.
    pub session: Option<&'a Arc<str>>,
}

/// A [`Prefix`] kept beyond its request's borrow (by a request waiting in a queue): two
/// reference counts.
#[derive(Debug, Clone, Default)]
pub struct OwnedPrefix {
    body: Bytes,
    session: Option<Arc<str>>,
}

impl OwnedPrefix {
    pub fn view(&self) -> Prefix<'_> {
        Prefix {
            body: &self.body,
            session: self.session.as_ref(),
        }
    }
}

impl Prefix<'_> {
    pub fn owned(&self) -> OwnedPrefix {
        OwnedPrefix {
            body: self.body.clone(),
            session: self.session.cloned(),
        }
    }

    /// The request's key for workers whose KV blocks hold `block_tokens` tokens; `None` when it
    /// has nothing to hash (no messages, an empty prompt).
    pub fn key(&self, endpoint: Endpoint, block_tokens: u32) -> Option<u64> {
        if let Some(session) = self.session {
            return Some(xxh3_64_with_seed(session.as_bytes(), SESSION_SEED));
        }
        let block = usize::try_from(block_tokens.max(1)).unwrap_or(usize::MAX);
        let covered = match endpoint {
            Endpoint::Completions => completion_prefix(self.body, block)?,
            Endpoint::ChatCompletions => chat_opening(self.body)?,
            // An embedding reads its input once and generates nothing: no prefix to keep warm.
            Endpoint::Embeddings => return None,
        };
        Some(xxh3_64(covered))
    }
}

/// The leading part of a completion's (first) prompt covering one block of `block` tokens.
fn completion_prefix(body: &[u8], block: usize) -> Option<&[u8]> {
    let start = json::value_start(body, "prompt")?;
    let text = &body[start..];
    let limit = block.saturating_mul(BYTES_PER_TOKEN);
    let covered = match text.first()? {
        b'"' => string_prefix(text, limit),
        b'[' => {
            let first = skip_ws(text, 1);
            match text.get(first)? {
                b'"' => string_prefix(&text[first..], limit),
                b'[' => token_prefix(&text[first..], block)?,
                _ => token_prefix(text, block)?,
            }
        }
        _ => return None,
    };
    // `""` or `[]`: nothing to place by.
    (covered.len() > 2).then_some(covered)
}

/// The JSON string `text` starts with, quotes included, cut after `limit` bytes of its inside
/// (escapes counted as written). Never reads past the cut.
fn string_prefix(text: &[u8], limit: usize) -> &[u8] {
    let window = &text[..text.len().min(limit.saturating_add(1))];
    let mut i = 1;
    while let Some(found) = window
        .get(i..)
        .and_then(|rest| memchr::memchr2(b'"', b'\\', rest))
    {
        i += found;
        if window[i] == b'"' {
            return &window[..=i];
        }
        i += 2;
    }
    window
}

/// The array of token ids `text` starts with, cut after its first `count` ids.
fn token_prefix(text: &[u8], count: usize) -> Option<&[u8]> {
    let mut end = 0;
    let mut seen = 0usize;
    let _ = Reader::new(text).array(|reader| {
        end = reader.skip_span()?.end;
        seen += 1;
        // Stops the walk once the block is covered.
        (seen < count).then_some(())
    });
    (end > 0).then(|| &text[..end])
}

/// The opening of a chat's `messages`: from its `[` through the first message that is not a
/// `system` or `developer` message, at most `MAX_OPENING_BYTES`.
fn chat_opening(body: &[u8]) -> Option<&[u8]> {
    let start = json::value_start(body, "messages")?;
    let text = &body[start..];
    let mut end = 0;
    let _ = Reader::new(text).array(|reader| {
        let span = reader.skip_span()?;
        if span.start >= MAX_OPENING_BYTES {
            return None;
        }
        end = span.end;
        let message = &text[span];
        let role =
            json::value_start(message, "role").and_then(|at| Reader::new(&message[at..]).string());
        // Stops the walk after the first message of the conversation proper.
        matches!(role.as_deref(), Some("system" | "developer")).then_some(())
    });
    (end > 0).then(|| &text[..end.min(MAX_OPENING_BYTES)])
}

fn skip_ws(text: &[u8], mut pos: usize) -> usize {
    while matches!(text.get(pos), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        pos += 1;
    }
    pos
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(endpoint: Endpoint, body: &str, block: u32) -> Option<u64> {
        let body = Bytes::copy_from_slice(body.as_bytes());
        Prefix {
            body: &body,
            session: None,
        }
        .key(endpoint, block)
    }

    fn chat(messages: &serde_json::Value) -> String {
        serde_json::json!({"model": "m", "messages": messages, "max_tokens": 16}).to_string()
    }

    fn turn(system: &str, first: &str, later: usize) -> serde_json::Value {
        let mut messages = vec![
            serde_json::json!({"role": "system", "content": system}),
            serde_json::json!({"role": "user", "content": first}),
        ];
        for i in 0..later {
            messages
                .push(serde_json::json!({"role": "assistant", "content": format!("answer {i}")}));
            messages.push(serde_json::json!({"role": "user", "content": format!("question {i}")}));
        }
        serde_json::Value::Array(messages)
    }

    #[test]
    fn a_chat_keeps_its_key_across_turns_and_conversations_differ() {
        let system = "You are a helpful assistant. ".repeat(20);
        let keys: Vec<_> = (0..6)
            .map(|later| {
                key_of(
                    Endpoint::ChatCompletions,
                    &chat(&turn(&system, "hi", later)),
                    32,
                )
            })
            .collect();
        assert!(keys[0].is_some());
        assert!(keys.iter().all(|k| *k == keys[0]), "{keys:?}");
        // Another first question, same system prompt: another conversation.
        let other = key_of(
            Endpoint::ChatCompletions,
            &chat(&turn(&system, "hello", 2)),
            32,
        );
        assert_ne!(other, keys[0]);
        // Other members around the messages do not matter; the block size does not either.
        let reordered =
            serde_json::json!({"stream": true, "messages": turn(&system, "hi", 3), "model": "m"});
        assert_eq!(
            key_of(Endpoint::ChatCompletions, &reordered.to_string(), 128),
            keys[0]
        );
    }

    #[test]
    fn a_chat_without_a_system_prompt_is_keyed_by_its_first_message() {
        let first = serde_json::json!([{"role": "user", "content": "q"}]);
        let later = serde_json::json!([
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"},
            {"role": "user", "content": "q2"}
        ]);
        assert_eq!(
            key_of(Endpoint::ChatCompletions, &chat(&first), 16),
            key_of(Endpoint::ChatCompletions, &chat(&later), 16)
        );
        assert_eq!(
            key_of(Endpoint::ChatCompletions, &chat(&serde_json::json!([])), 16),
            None
        );
    }

    #[test]
    fn a_completion_is_keyed_by_one_block_of_its_prompt() {
        let head = "w".repeat(16 * BYTES_PER_TOKEN);
        let prompt = |tail: &str| format!(r#"{{"model":"m","prompt":"{head}{tail}"}}"#);
        let a = key_of(Endpoint::Completions, &prompt(" one"), 16);
        assert!(a.is_some());
        assert_eq!(
            a,
            key_of(Endpoint::Completions, &prompt(" two, longer"), 16)
        );
        // A larger block covers more: the tails count.
        assert_ne!(
            key_of(Endpoint::Completions, &prompt(" one"), 32),
            key_of(Endpoint::Completions, &prompt(" two"), 32)
        );
        // A prompt shorter than a block is keyed whole, and not by what follows it.
        let short = |max: u32| format!(r#"{{"model":"m","prompt":"short","max_tokens":{max}}}"#);
        assert_eq!(
            key_of(Endpoint::Completions, &short(1), 16),
            key_of(Endpoint::Completions, &short(2), 16)
        );
        assert_ne!(
            key_of(Endpoint::Completions, &short(1), 16),
            key_of(
                Endpoint::Completions,
                r#"{"model":"m","prompt":"shorter"}"#,
                16
            )
        );
        assert_eq!(
            key_of(Endpoint::Completions, r#"{"model":"m","prompt":""}"#, 16),
            None
        );
    }

    #[test]
    fn token_ids_and_batches_are_keyed_by_their_first_block() {
        let ids = |n: usize, tail: u32| {
            let mut ids: Vec<u32> = (0..n as u32).collect();
            ids.push(tail);
            serde_json::json!({"model": "m", "prompt": ids}).to_string()
        };
        assert_eq!(
            key_of(Endpoint::Completions, &ids(16, 1), 16),
            key_of(Endpoint::Completions, &ids(16, 2), 16)
        );
        assert_ne!(
            key_of(Endpoint::Completions, &ids(15, 1), 16),
            key_of(Endpoint::Completions, &ids(15, 2), 16)
        );
        let batch = |second: &str| {
            serde_json::json!({"model": "m", "prompt": ["first prompt", second]}).to_string()
        };
        assert_eq!(
            key_of(Endpoint::Completions, &batch("x"), 16),
            key_of(Endpoint::Completions, &batch("y"), 16)
        );
        let id_batch = serde_json::json!({"model": "m", "prompt": [[1, 2, 3], [4]]}).to_string();
        assert!(key_of(Endpoint::Completions, &id_batch, 16).is_some());
    }

    #[test]
    fn a_session_id_stands_for_the_prompt() {
        let body = Bytes::from_static(br#"{"model":"m","prompt":"anything"}"#);
        let other = Bytes::from_static(br#"{"model":"m","prompt":"else"}"#);
        let session: Arc<str> = Arc::from("user-42");
        let key = |body: &Bytes, session: Option<&Arc<str>>| {
            Prefix { body, session }.key(Endpoint::Completions, 16)
        };
        assert_eq!(key(&body, Some(&session)), key(&other, Some(&session)));
        assert_ne!(key(&body, Some(&session)), key(&body, None));
        let owned = Prefix {
            body: &body,
            session: Some(&session),
        }
        .owned();
        assert_eq!(
            owned.view().key(Endpoint::Completions, 16),
            key(&body, Some(&session))
        );
    }

    #[test]
    fn hostile_bodies_cost_a_bounded_key() {
        // A long system prompt: the key stops at the bound, so a different tail is the same key.
        let long = |tail: &str| {
            let system = format!("{}{tail}", "x".repeat(MAX_OPENING_BYTES * 2));
            chat(&serde_json::json!([{"role": "system", "content": system}]))
        };
        assert_eq!(
            key_of(Endpoint::ChatCompletions, &long("a"), 16),
            key_of(Endpoint::ChatCompletions, &long("b"), 16)
        );
        // Many leading system messages: the walk stops at the bound.
        let many: Vec<_> = (0..20_000)
            .map(|i| serde_json::json!({"role": "system", "content": i}))
            .collect();
        assert!(
            key_of(
                Endpoint::ChatCompletions,
                &chat(&serde_json::json!(many)),
                16
            )
            .is_some()
        );
        // An unterminated escape at the cut, odd members, a block size from a hostile worker.
        let escapes = format!(r#"{{"model":"m","prompt":"{}"}}"#, r"\\".repeat(10_000));
        assert!(key_of(Endpoint::Completions, &escapes, 16).is_some());
        assert!(key_of(Endpoint::Completions, &escapes, u32::MAX).is_some());
        assert!(key_of(Endpoint::Completions, r#"{"model":"m","prompt":5}"#, 16).is_none());
        assert!(
            key_of(
                Endpoint::ChatCompletions,
                r#"{"model":"m","messages":{}}"#,
                16
            )
            .is_none()
        );
        assert!(key_of(Endpoint::ChatCompletions, r#"{"model":"m"}"#, 16).is_none());
        let roles = r#"{"model":"m","messages":[{"content":"c","role":{"x":1}},{"role":"user"}]}"#;
        assert!(key_of(Endpoint::ChatCompletions, roles, 16).is_some());
    }
}
