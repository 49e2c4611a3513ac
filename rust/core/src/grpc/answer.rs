//! A worker's answer, or one event of its stream, as the gRPC surface reads it: the id, model and
//! creation time, and each choice's index, text and finish reason. It is read in one pass
//! (`json::Reader`): the members named here are read, strings borrowed where they have no escape,
//! and every other member is stepped over unread.
//!
//! A member named here with a value of another type (`"created":"soon"`), or a payload that is not
//! one whole object, reads as `None`, as serde would refuse it. Members may come in any order.

use std::borrow::Cow;

use super::pb;
use crate::json;

/// See the module's doc.
#[derive(Debug, Default, PartialEq)]
pub struct Answer<'a> {
    pub id: Cow<'a, str>,
    pub model: Cow<'a, str>,
    pub created: i64,
    pub choices: Vec<Choice<'a>>,
}

#[derive(Debug, Default, PartialEq)]
pub struct Choice<'a> {
    pub index: u32,
    /// A completion's `text`, or a chat message's or delta's `content`.
    pub text: Option<Cow<'a, str>>,
    pub finish_reason: Option<Cow<'a, str>>,
}

impl Choice<'_> {
    pub fn into_choice(self) -> pb::Choice {
        pb::Choice {
            index: self.index,
            text: self.text.map(Cow::into_owned).unwrap_or_default(),
            finish_reason: self.finish_reason.map(Cow::into_owned).unwrap_or_default(),
        }
    }
}

/// Reads `payload`, a worker's JSON answer or stream event.
pub fn read(payload: &[u8]) -> Option<Answer<'_>> {
    let mut answer = Answer::default();
    let mut reader = json::Reader::new(payload);
    reader.object(|name, value| {
        match &*name {
            b"id" => answer.id = value.string()?,
            b"model" => answer.model = value.string()?,
            b"created" => answer.created = integer(value)?,
            b"choices" => value.array(|element| {
                answer.choices.push(choice(element)?);
                Some(())
            })?,
            _ => value.skip()?,
        }
        Some(())
    })?;
    reader.at_end().then_some(answer)
}

fn choice<'a>(reader: &mut json::Reader<'a>) -> Option<Choice<'a>> {
    let mut choice = Choice::default();
    // A completion's text; else a whole chat message's content; else a streamed delta's.
    let (mut text, mut message, mut delta) = (None, None, None);
    reader.object(|name, value| {
        match &*name {
            b"index" => choice.index = integer(value)?,
            b"text" => text = string_or_null(value)?,
            b"message" => message = content(value)?,
            b"delta" => delta = content(value)?,
            b"finish_reason" => choice.finish_reason = string_or_null(value)?,
            _ => value.skip()?,
        }
        Some(())
    })?;
    choice.text = text.or(message).or(delta);
    Some(choice)
}

/// A chat message's or delta's `content` (`null` is a message without one).
fn content<'a>(reader: &mut json::Reader<'a>) -> Option<Option<Cow<'a, str>>> {
    let mut content = None;
    if reader.null() {
        return Some(None);
    }
    reader.object(|name, value| {
        if *name == *b"content" {
            content = string_or_null(value)?;
        } else {
            value.skip()?;
        }
        Some(())
    })?;
    Some(content)
}

/// A string or `null` (`Some(None)`); `None` for anything else.
fn string_or_null<'a>(reader: &mut json::Reader<'a>) -> Option<Option<Cow<'a, str>>> {
    if reader.null() {
        return Some(None);
    }
    reader.string().map(Some)
}

/// An integer that fits `T`; `None` for anything else (a fraction, an exponent, a string, `null`,
/// and `-0`, which JSON readers take for the float -0.0).
fn integer<T: TryFrom<i128>>(reader: &mut json::Reader<'_>) -> Option<T> {
    let text = reader.scalar()?;
    let number: i128 = std::str::from_utf8(text).ok()?.parse().ok()?;
    if number == 0 && text.starts_with(b"-") {
        return None;
    }
    T::try_from(number).ok()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;
    use serde_json::json;
    use serde_json::value::RawValue;

    use super::*;
    use crate::json_props::{is_json, number, quoted, text, value};

    fn choice(index: u32, text: &'static str, finish: Option<&'static str>) -> Choice<'static> {
        Choice {
            index,
            text: Some(Cow::Borrowed(text)),
            finish_reason: finish.map(Cow::Borrowed),
        }
    }

    #[test]
    fn reads_completion_and_chat_events_and_skips_the_rest() {
        let completion = json!({
            "id": "cmpl-1", "object": "text_completion", "created": 1_700_000_000,
            "model": "m", "choices": [
                {"index": 1, "text": " the", "logprobs": {"tokens": ["}"]},
                 "finish_reason": null, "stop_reason": null},
                {"index": 0, "text": "a\n\"b\"", "finish_reason": "length"},
            ],
            "usage": {"prompt_tokens": 3},
        })
        .to_string();
        let read = read(completion.as_bytes());
        assert_eq!(
            read,
            Some(Answer {
                id: "cmpl-1".into(),
                model: "m".into(),
                created: 1_700_000_000,
                choices: vec![
                    choice(1, " the", None),
                    choice(0, "a\n\"b\"", Some("length"))
                ],
            })
        );
        let chat = json!({
            "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": "hi"}},
                {"index": 1, "message": {"content": null, "tool_calls": []}},
                {"index": 2, "delta": null},
            ],
            "id": "chatcmpl-2",
        })
        .to_string();
        let read = super::read(chat.as_bytes()).map(|answer| answer.choices);
        let empty = |index| Choice {
            index,
            ..Choice::default()
        };
        assert_eq!(read, Some(vec![choice(0, "hi", None), empty(1), empty(2)]));
    }

    #[test]
    fn what_serde_would_refuse_reads_as_none() {
        for payload in [
            "",
            "[]",
            "not json",
            r#"{"id":"x""#,
            r#"{"created":"soon"}"#,
            r#"{"created":1.5}"#,
            r#"{"id":7}"#,
            r#"{"choices":{"index":0}}"#,
            r#"{"choices":[{"index":-1}]}"#,
            r#"{"choices":[{"text":3}]}"#,
            r#"{"choices":[{"delta":"hi"}]}"#,
            r#"{"choices":[1]}"#,
            r#"{"choices":[{"index":0}"#,
        ] {
            assert_eq!(read(payload.as_bytes()), None, "{payload}");
        }
        assert_eq!(read(b" {} "), Some(Answer::default()));
    }

    /// serde's reading of an answer, field by field as the reader means it: the oracle.
    #[derive(serde::Deserialize)]
    struct Serde<'a> {
        #[serde(borrow, default)]
        id: Cow<'a, str>,
        #[serde(borrow, default)]
        model: Cow<'a, str>,
        #[serde(default)]
        created: i64,
        #[serde(borrow, default)]
        choices: Vec<SerdeChoice<'a>>,
    }

    #[derive(serde::Deserialize)]
    struct SerdeChoice<'a> {
        #[serde(default)]
        index: u32,
        #[serde(borrow, default)]
        text: Option<Cow<'a, str>>,
        // Maps, not a derived struct, which serde would also read from an array.
        #[serde(borrow, default)]
        message: Option<HashMap<Cow<'a, str>, &'a RawValue>>,
        #[serde(borrow, default)]
        delta: Option<HashMap<Cow<'a, str>, &'a RawValue>>,
        #[serde(borrow, default)]
        finish_reason: Option<Cow<'a, str>>,
    }

    /// A message's content: `Err` if it is there and neither a string nor `null`.
    type Message<'a> = Option<HashMap<Cow<'a, str>, &'a RawValue>>;

    fn content(message: Message<'_>) -> Result<Option<String>, serde_json::Error> {
        match message.as_ref().and_then(|m| m.get("content")) {
            Some(raw) => serde_json::from_str(raw.get()),
            None => Ok(None),
        }
    }

    fn by_serde(payload: &[u8]) -> Option<Answer<'_>> {
        let read: Serde<'_> = serde_json::from_slice(payload).ok()?;
        let mut choices = Vec::new();
        for c in read.choices {
            let (message, delta) = (content(c.message).ok()?, content(c.delta).ok()?);
            choices.push(Choice {
                index: c.index,
                text: c.text.or(message.map(Cow::Owned)).or(delta.map(Cow::Owned)),
                finish_reason: c.finish_reason,
            });
        }
        Some(Answer {
            id: read.id,
            model: read.model,
            created: read.created,
            choices,
        })
    }

    /// An object of these members, each present or not, in any order, names maybe escaped.
    fn object(
        members: Vec<(&'static str, BoxedStrategy<String>)>,
    ) -> impl Strategy<Value = String> {
        let members: Vec<_> = members
            .into_iter()
            .map(|(name, value)| {
                prop::option::of((value, any::<u64>()))
                    .prop_map(move |m| m.map(|(v, mask)| format!("{}:{v}", quoted(name, mask))))
            })
            .collect();
        (members, prop::sample::select(vec!["", " ", "\n"])).prop_flat_map(|(members, ws)| {
            Just(members.into_iter().flatten().collect::<Vec<_>>())
                .prop_shuffle()
                .prop_map(move |members| format!("{{{}}}", members.join(&format!(",{ws}"))))
        })
    }

    /// `right`, or now and then a value of any kind.
    fn or_any(right: impl Strategy<Value = String> + 'static) -> BoxedStrategy<String> {
        prop_oneof![8 => right, 1 => value(1)].boxed()
    }

    fn string_or_null() -> BoxedStrategy<String> {
        or_any(prop_oneof![
            Just("null".to_owned()),
            (text(), any::<u64>()).prop_map(|(t, mask)| quoted(&t, mask)),
        ])
    }

    fn event() -> impl Strategy<Value = String> {
        let content = or_any(prop_oneof![
            Just("null".to_owned()),
            object(vec![
                ("role", Just("\"assistant\"".to_owned()).boxed()),
                ("content", string_or_null()),
            ]),
        ]);
        let choice = object(vec![
            ("index", or_any(number())),
            ("text", string_or_null()),
            ("message", content.clone()),
            ("delta", content),
            ("finish_reason", string_or_null()),
            ("logprobs", value(2).boxed()),
        ]);
        let choices =
            or_any(prop::collection::vec(choice, 0..3).prop_map(|c| format!("[{}]", c.join(","))));
        object(vec![
            ("id", string_or_null()),
            ("object", Just("\"text_completion\"".to_owned()).boxed()),
            ("created", or_any(number())),
            ("model", string_or_null()),
            ("choices", choices),
            ("usage", value(2).boxed()),
        ])
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

        #[test]
        fn reads_what_serde_reads(payload in event()) {
            // Past serde's nesting limit, serde refuses what the walk reads: nothing to compare.
            prop_assume!(is_json(payload.as_bytes()));
            prop_assert_eq!(read(payload.as_bytes()), by_serde(payload.as_bytes()), "{}", payload);
        }
    }
}
