//! An embeddings request's prompts: its `input` (or vLLM's chat form, `messages`) read for its
//! shape and how many prompts it holds, without copying a string or an id.
//!
//! The shapes are vLLM's (and OpenAI's): a string, an array of strings, an array of token ids,
//! an array of token-id arrays; vLLM adds one conversation (an array of chat messages, in
//! `input` or `messages`) and a batch of them (an array of such arrays). An empty array, an empty
//! prompt of token ids or an array mixing shapes is a 400 here, before a worker sees it. What
//! only the worker can judge passes: whether a token id is in its vocabulary, whether a message
//! has a role its chat template knows, whether a string tokenizes to nothing.

use serde_json::value::RawValue;

use crate::error::ApiError;
use crate::json::Reader;

/// What one element of an array `input` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Item {
    /// A number: the array is one prompt of token ids.
    TokenId,
    /// A string: one prompt of a batch.
    Text,
    /// A non-empty array of numbers: one prompt of a batch.
    TokenIds,
    /// An object: the array is one conversation.
    Message,
    /// A non-empty array of objects: one conversation of a batch.
    Conversation,
}

const INPUT_SHAPES: &str = "a string, an array of strings, an array of token ids, an array of \
                            token-id arrays, or chat messages";

/// How many prompts the request holds: from `input`, else from `messages`; one of them is
/// required.
pub(super) fn prompts(
    input: Option<&RawValue>,
    messages: Option<&RawValue>,
) -> Result<u64, ApiError> {
    if let Some(input) = input.filter(|raw| raw.get() != "null") {
        return input_prompts(input.get().as_bytes());
    }
    if let Some(messages) = messages.filter(|raw| raw.get() != "null") {
        return messages_prompts(messages.get().as_bytes());
    }
    Err(ApiError::bad_request("`input` is required", Some("input")))
}

fn bad_input(message: impl Into<String>) -> ApiError {
    ApiError::bad_request(message, Some("input"))
}

/// The prompts of an `input`: one for a string, one for a conversation or an array of token ids,
/// else one per element.
fn input_prompts(text: &[u8]) -> Result<u64, ApiError> {
    if text.first() == Some(&b'"') {
        return Ok(1);
    }
    if text.first() != Some(&b'[') {
        return Err(bad_input(format!("`input` must be {INPUT_SHAPES}")));
    }
    let (kind, count) = array_items(text, false)
        .ok_or_else(|| bad_input(format!("`input` must be {INPUT_SHAPES}, of one kind")))?;
    match kind {
        None => Err(bad_input("`input` must not be empty")),
        Some(Item::TokenId | Item::Message) => Ok(1),
        Some(Item::Text | Item::TokenIds | Item::Conversation) => Ok(count),
    }
}

/// The prompts of vLLM's `messages`: one conversation, or a batch of them.
fn messages_prompts(text: &[u8]) -> Result<u64, ApiError> {
    let bad = || {
        ApiError::bad_request(
            "`messages` must be a non-empty array of chat messages, or of conversations",
            Some("messages"),
        )
    };
    match array_items(text, false).ok_or_else(bad)? {
        (Some(Item::Message), _) => Ok(1),
        (Some(Item::Conversation), count) => Ok(count),
        _ => Err(bad()),
    }
}

/// The kind every element of the array `text` shares (`None` for an empty array) and how many
/// there are; `None` if the elements are not all of one kind, or one is of no kind (a `null`, a
/// boolean, an empty inner array, any array inside an inner one). `inner`: `text` is an element
/// of the outer array.
fn array_items(text: &[u8], inner: bool) -> Option<(Option<Item>, u64)> {
    let mut kind = None;
    let mut count = 0u64;
    let mut reader = Reader::new(text);
    reader.array(|element| {
        let span = element.skip_span()?;
        let item = item(text.get(span)?, inner)?;
        if kind.replace(item).is_some_and(|seen| seen != item) {
            return None;
        }
        count = count.saturating_add(1);
        Some(())
    })?;
    reader.at_end().then_some((kind, count))
}

/// The kind of one element (its JSON text) of an outer array, or of an `inner` one.
fn item(text: &[u8], inner: bool) -> Option<Item> {
    match text.first()? {
        b'"' => Some(Item::Text),
        b'{' => Some(Item::Message),
        b'-' | b'0'..=b'9' => Some(Item::TokenId),
        b'[' if !inner => match array_items(text, true)? {
            (Some(Item::TokenId), _) => Some(Item::TokenIds),
            (Some(Item::Message), _) => Some(Item::Conversation),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(text: &str) -> Result<u64, Option<&'static str>> {
        let raw = serde_json::from_str::<&RawValue>(text).map_err(|_| Some("<not json>"))?;
        prompts(Some(raw), None).map_err(|error| match error {
            ApiError::BadRequest { param, .. } => param,
            _ => Some("<not a bad request>"),
        })
    }

    #[test]
    fn every_shape_counts_its_prompts() {
        assert_eq!(input(r#""one text""#), Ok(1));
        assert_eq!(
            input(r#""""#),
            Ok(1),
            "an empty string is the worker's to judge"
        );
        assert_eq!(input(r#"["a", "b\"c", "d"]"#), Ok(3));
        assert_eq!(input("[1, 2, 3]"), Ok(1), "token ids are one prompt");
        assert_eq!(input("[[1, 2], [3], [4, 5, 6]]"), Ok(3));
        assert_eq!(input(r#"[{"role":"user","content":"hi"}]"#), Ok(1));
        assert_eq!(
            input(r#"[[{"role":"user","content":"a"}], [{"role":"user","content":"b"}]]"#),
            Ok(2)
        );
    }

    #[test]
    fn other_shapes_are_a_400_naming_input() {
        for text in [
            "5",
            "true",
            r#"{"a":1}"#,
            "[]",
            "[[]]",
            "[[1], []]",
            r#"[1, "a"]"#,
            r#"["a", [1]]"#,
            "[[1], [[2]]]",
            r#"[[1, "a"]]"#,
            "[null]",
            "[true]",
            r#"[[{"role":"user"}], [1]]"#,
        ] {
            assert_eq!(input(text), Err(Some("input")), "{text}");
        }
    }

    #[test]
    fn messages_stand_in_for_input() {
        let raw = |text: &'static str| serde_json::from_str::<&RawValue>(text).ok();
        let chat = raw(r#"[{"role":"user","content":"hi"}]"#);
        assert!(matches!(prompts(None, chat), Ok(1)));
        assert!(matches!(prompts(raw("null"), chat), Ok(1)));
        let batch = raw(r#"[[{"role":"user","content":"a"}], [{"role":"user","content":"b"}]]"#);
        assert!(matches!(prompts(None, batch), Ok(2)));
        for (input, messages, param) in [
            (None, None, "input"),
            (raw("null"), raw("null"), "input"),
            (None, raw("[]"), "messages"),
            (None, raw(r#""hi""#), "messages"),
            (None, raw(r#"["hi"]"#), "messages"),
        ] {
            assert!(
                matches!(
                    prompts(input, messages),
                    Err(ApiError::BadRequest { param: Some(p), .. }) if p == param
                ),
                "{input:?} {messages:?}"
            );
        }
    }

    #[test]
    fn a_million_token_ids_are_one_prompt_and_a_million_texts_a_million() {
        let ids = format!("[{}1]", "1,".repeat(999_999));
        assert_eq!(input(&ids), Ok(1));
        let texts = format!(r#"[{}"x"]"#, r#""x","#.repeat(999_999));
        assert_eq!(input(&texts), Ok(1_000_000));
    }
}
