//! A worker's answer, or one event of its stream, read for its content: the id, model and
//! creation time, and each choice's index, text and finish reason; and, for the relay's metering,
//! where its `usage` is and whether it carries an `error`. It is read in one pass
//! (`json::Reader`): the members named here are read, strings borrowed where they have no escape,
//! and every other member is stepped over unread.
//!
//! What serde would refuse reads as `None`: a member named here with a value of another type
//! (`"created":"soon"`), a member named here twice, a payload that is not one whole object.
//! Members may come in any order.

use std::borrow::Cow;
use std::ops::Range;

use crate::json;

/// See the module's doc.
#[derive(Debug, Default, PartialEq)]
pub struct Answer<'a> {
    pub id: Cow<'a, str>,
    pub model: Cow<'a, str>,
    pub created: i64,
    pub choices: Vec<Choice<'a>>,
    /// Where the `usage` value is (a range of the payload), if there is one.
    pub usage: Option<Range<usize>>,
    /// Whether there is an `error` member.
    pub error: bool,
}

#[derive(Debug, Default, PartialEq)]
pub struct Choice<'a> {
    /// As the worker wrote it; a choice without one is a client's choice 0.
    pub index: Option<u32>,
    /// A completion's `text`, or a chat message's or delta's `content`.
    pub text: Option<Cow<'a, str>>,
    pub finish_reason: Option<Cow<'a, str>>,
}

/// Reads `payload`, a worker's JSON answer or stream event.
pub fn read(payload: &[u8]) -> Option<Answer<'_>> {
    read_with(payload, true)
}

/// Reads `payload` as `read` does, less its id, model and creation time, which are stepped over
/// unread whatever their type: for a stream's later events, whose first gave them.
pub fn read_choices(payload: &[u8]) -> Option<Answer<'_>> {
    read_with(payload, false)
}

fn read_with(payload: &[u8], head: bool) -> Option<Answer<'_>> {
    const ID: u8 = 1;
    const MODEL: u8 = 2;
    const CREATED: u8 = 4;
    const CHOICES: u8 = 8;
    const USAGE: u8 = 16;
    let mut answer = Answer::default();
    let mut seen = 0;
    let mut reader = json::Reader::new(payload);
    reader.object(|name, value| {
        match &*name {
            b"id" => {
                once(&mut seen, ID)?;
                if let Some(read) = head_member(head, value, json::Reader::string)? {
                    answer.id = read;
                }
            }
            b"model" => {
                once(&mut seen, MODEL)?;
                if let Some(read) = head_member(head, value, json::Reader::string)? {
                    answer.model = read;
                }
            }
            b"created" => {
                once(&mut seen, CREATED)?;
                if let Some(read) = head_member(head, value, integer)? {
                    answer.created = read;
                }
            }
            b"choices" => {
                once(&mut seen, CHOICES)?;
                value.array(|element| {
                    answer.choices.push(choice(element)?);
                    Some(())
                })?;
            }
            b"usage" => {
                once(&mut seen, USAGE)?;
                answer.usage = Some(value.skip_span()?);
            }
            b"error" => {
                answer.error = true;
                value.skip()?;
            }
            _ => value.skip()?,
        }
        Some(())
    })?;
    reader.at_end().then_some(answer)
}

/// A head member (id, model, creation time): read with `read` when `head`, else stepped over
/// unread whatever its type (`Some(None)`); `None` where the reading fails.
fn head_member<'a, T>(
    head: bool,
    value: &mut json::Reader<'a>,
    read: impl FnOnce(&mut json::Reader<'a>) -> Option<T>,
) -> Option<Option<T>> {
    if head {
        read(value).map(Some)
    } else {
        value.skip().map(|()| None)
    }
}

/// Marks the member `bit` as read; `None` the second time, as serde refuses a repeated field.
fn once(seen: &mut u8, bit: u8) -> Option<()> {
    if *seen & bit != 0 {
        return None;
    }
    *seen |= bit;
    Some(())
}

fn choice<'a>(reader: &mut json::Reader<'a>) -> Option<Choice<'a>> {
    const INDEX: u8 = 1;
    const TEXT: u8 = 2;
    const MESSAGE: u8 = 4;
    const DELTA: u8 = 8;
    const FINISH: u8 = 16;
    let mut choice = Choice::default();
    let mut seen = 0;
    // A completion's text; else a whole chat message's content; else a streamed delta's.
    let (mut text, mut message, mut delta) = (None, None, None);
    reader.object(|name, value| {
        match &*name {
            b"index" => {
                once(&mut seen, INDEX)?;
                choice.index = Some(integer(value)?);
            }
            b"text" => {
                once(&mut seen, TEXT)?;
                text = string_or_null(value)?;
            }
            b"message" => {
                once(&mut seen, MESSAGE)?;
                message = content(value)?;
            }
            b"delta" => {
                once(&mut seen, DELTA)?;
                delta = content(value)?;
            }
            b"finish_reason" => {
                once(&mut seen, FINISH)?;
                choice.finish_reason = string_or_null(value)?;
            }
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
    // The common case, a few digits: no text to validate nor sign to read.
    if (1..=18).contains(&text.len()) && text.iter().all(u8::is_ascii_digit) {
        let number = text
            .iter()
            .fold(0i128, |n, digit| n * 10 + i128::from(digit - b'0'));
        return T::try_from(number).ok();
    }
    let number: i128 = std::str::from_utf8(text).ok()?.parse().ok()?;
    if number == 0 && text.starts_with(b"-") {
        return None;
    }
    T::try_from(number).ok()
}

/// What the choice events of one read of a stream added to the answer, owned: the id, model and
/// creation time of the first event that had them, and for each choice, in the order they came,
/// the text added and its finish reason.
#[derive(Debug, Default, PartialEq)]
pub struct Delta {
    pub id: String,
    pub model: String,
    pub created: i64,
    pub choices: Vec<ChoiceDelta>,
}

#[derive(Debug, Default, PartialEq)]
pub struct ChoiceDelta {
    pub index: u32,
    pub text: String,
    pub finish_reason: Option<String>,
}

impl Delta {
    /// Adds one event: its id, model and creation time if the delta has none yet; its choices'
    /// text appended to theirs, and their finish reasons.
    pub fn add(&mut self, event: Answer<'_>) {
        if self.id.is_empty() {
            self.id = event.id.into_owned();
            self.model = event.model.into_owned();
            self.created = event.created;
        }
        for choice in event.choices {
            let index = choice.index.unwrap_or_default();
            let text = choice.text.unwrap_or_default();
            let finish_reason = choice.finish_reason.map(Cow::into_owned);
            match self.choices.iter_mut().find(|c| c.index == index) {
                Some(known) => {
                    known.text.push_str(&text);
                    if finish_reason.is_some() {
                        known.finish_reason = finish_reason;
                    }
                }
                None => self.choices.push(ChoiceDelta {
                    index,
                    text: text.into_owned(),
                    finish_reason,
                }),
            }
        }
    }

    /// Whether no event with a choice was added.
    pub fn is_empty(&self) -> bool {
        self.choices.is_empty()
    }
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
            index: Some(index),
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
        let usage = r#"{"prompt_tokens":3}"#;
        let at = completion.find(usage).unwrap_or_default();
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
                usage: Some(at..at + usage.len()),
                error: false,
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
            index: Some(index),
            ..Choice::default()
        };
        assert_eq!(read, Some(vec![choice(0, "hi", None), empty(1), empty(2)]));
        let error = super::read(br#"{"error":{"message":"boom"},"choices":[{}]}"#);
        let unindexed = vec![Choice::default()];
        assert_eq!(error.map(|a| (a.error, a.choices)), Some((true, unindexed)));
    }

    #[test]
    fn a_delta_gathers_each_choice_s_text_in_the_order_they_came() {
        let mut delta = Delta::default();
        for event in [
            &br#"{"id":"x","choices":[{"index":1,"delta":{"content":"yo"},"finish_reason":null}]}"#
                [..],
            br#"{"id":"y","model":"m","choices":[{"index":0,"delta":{"content":"a"}}]}"#,
            br#"{"choices":[{"index":1,"delta":{"content":"!"},"finish_reason":"stop"}]}"#,
            br#"{"choices":[{"delta":{"content":"b"}}]}"#,
        ] {
            delta.add(read(event).unwrap_or_default());
        }
        let texts: Vec<_> = delta
            .choices
            .iter()
            .map(|c| (c.index, c.text.as_str(), c.finish_reason.as_deref()))
            .collect();
        assert_eq!(texts, [(1, "yo!", Some("stop")), (0, "ab", None)]);
        assert_eq!((delta.id.as_str(), delta.model.as_str()), ("x", ""));
        assert!(!delta.is_empty());
        assert!(Delta::default().is_empty());
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
            r#"{"id":"a","id":"b"}"#,
            r#"{"usage":{},"usage":null}"#,
            r#"{"choices":[{"index":0,"index":1}]}"#,
            r#"{"choices":[{"text":"a","text":null}]}"#,
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
        #[serde(borrow, default, deserialize_with = "present")]
        usage: Option<&'a RawValue>,
        #[serde(borrow, default, deserialize_with = "present")]
        error: Option<&'a RawValue>,
    }

    /// An index that is there (a number: `null` is refused as for a plain `u32`).
    fn given<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<u32>, D::Error> {
        serde::Deserialize::deserialize(deserializer).map(Some)
    }

    /// A member that is there, `null` included.
    fn present<'de, D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<&'de RawValue>, D::Error> {
        serde::Deserialize::deserialize(deserializer).map(Some)
    }

    /// Where `raw`, a value serde borrowed from `payload`, is in it.
    fn span(payload: &[u8], raw: &RawValue) -> Range<usize> {
        let start = raw.get().as_ptr() as usize - payload.as_ptr() as usize;
        start..start + raw.get().len()
    }

    #[derive(serde::Deserialize)]
    struct SerdeChoice<'a> {
        #[serde(default, deserialize_with = "given")]
        index: Option<u32>,
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
            usage: read.usage.map(|raw| span(payload, raw)),
            error: read.error.is_some(),
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
            ("error", value(1).boxed()),
        ])
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

        #[test]
        fn read_choices_reads_what_read_reads_but_the_head(payload in event()) {
            if let Some(whole) = read(payload.as_bytes()) {
                let headless = Answer { id: "".into(), model: "".into(), created: 0, ..whole };
                prop_assert_eq!(read_choices(payload.as_bytes()), Some(headless), "{}", payload);
            }
        }

        #[test]
        fn reads_what_serde_reads(payload in event()) {
            // Past serde's nesting limit, serde refuses what the walk reads: nothing to compare.
            prop_assume!(is_json(payload.as_bytes()));
            prop_assert_eq!(read(payload.as_bytes()), by_serde(payload.as_bytes()), "{}", payload);
        }
    }
}
