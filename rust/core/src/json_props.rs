//! Test support for property tests over JSON text: generators of the text a hostile client or a
//! broken worker may send (escaped member names, huge and odd numbers, deep nesting), and serde's
//! own reading of it, member by member and in order, to compare the gateway's byte-level
//! readers against.

use std::fmt;

use proptest::prelude::*;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;

/// A JSON string literal for `text`, with some of its ASCII characters written as `\uXXXX`
/// (by `mask`, one bit a character): the same string to any JSON reader.
pub fn quoted(text: &str, mask: u64) -> String {
    let mut out = String::from("\"");
    for (i, c) in text.chars().enumerate() {
        let escape = i < 64 && mask >> i & 1 == 1;
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 || (escape && c.is_ascii()) => {
                out.push_str(&format!("\\u{:04x}", u32::from(c)));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Text a member name or a string value may hold: plain words, quotes, backslashes, controls,
/// non-ASCII.
pub fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z_]{0,12}",
        Just("\"quoted\"".to_owned()),
        Just("back\\slash".to_owned()),
        Just("tab\tnew\nline".to_owned()),
        Just("é☃𝄞".to_owned()),
        ".{0,20}",
    ]
}

/// The text of a JSON number a client may send.
pub fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<u64>().prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        (0..100u64).prop_map(|n| n.to_string()),
        Just("4611686018427387904".to_owned()),
        Just("18446744073709551616".to_owned()),
        Just("99999999999999999999999".to_owned()),
        Just("1e400".to_owned()),
        Just("-0".to_owned()),
        Just("1.5".to_owned()),
        Just("1E2".to_owned()),
    ]
}

/// The text of any JSON value, nested up to `depth` (occasionally much deeper, past serde's
/// recursion limit).
pub fn value(depth: u32) -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_owned()),
        Just("true".to_owned()),
        Just("false".to_owned()),
        number(),
        (text(), any::<u64>()).prop_map(|(t, mask)| quoted(&t, mask)),
    ];
    let nested = leaf.prop_recursive(depth, 32, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4)
                .prop_map(|items| format!("[{}]", items.join(","))),
            prop::collection::vec((text(), any::<u64>(), inner), 0..4).prop_map(|members| {
                let members: Vec<String> = members
                    .iter()
                    .map(|(k, mask, v)| format!("{}:{v}", quoted(k, *mask)))
                    .collect();
                format!("{{{}}}", members.join(","))
            }),
        ]
    });
    prop_oneof![
        20 => nested,
        1 => (100..300usize).prop_map(|depth| format!("{}1{}", "[".repeat(depth), "]".repeat(depth))),
    ]
}

/// An object's members as serde reads them, in order, duplicates kept: each name unescaped and
/// its value's text as written; `None` if the text is not one JSON object.
pub fn members(text: &[u8]) -> Option<Vec<(String, String)>> {
    struct Members;
    impl<'de> Visitor<'de> for Members {
        type Value = Vec<(String, String)>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some((key, value)) = map.next_entry::<String, Box<RawValue>>()? {
                out.push((key, value.get().to_owned()));
            }
            Ok(out)
        }
    }
    let mut deserializer = serde_json::Deserializer::from_slice(text);
    let members = deserializer.deserialize_map(Members).ok()?;
    deserializer.end().ok()?;
    Some(members)
}

/// `raw` read as a JSON value, `Null` if it cannot be (a number out of range).
pub fn read(raw: &str) -> Value {
    serde_json::from_str(raw).unwrap_or(Value::Null)
}

/// Whether `text` is valid JSON at all (serde's recursion limit included).
pub fn is_json(text: &[u8]) -> bool {
    serde_json::from_slice::<IgnoredAny>(text).is_ok()
}
