//! Property tests of the request parser against serde's reading of the same bytes: member names
//! spelled with escapes, members given twice, huge and odd numbers, deep nesting. The parser never
//! panics, refuses with a 400 whatever serde cannot read as a request, agrees with serde on every
//! member it reads, and the body it sends a worker has each member once, the client's own
//! unchanged and `stream_options` the gateway's.

use bytes::Bytes;
use proptest::prelude::*;
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::json_props::{is_json, members, quoted, read, value};
use crate::request::{Endpoint, InferenceRequest, MEMBERS};

/// Member names a request may have: those the gateway reads (`MEMBERS`), and others it passes
/// through.
fn names() -> Vec<&'static str> {
    [MEMBERS.as_slice(), &["top_k", "user", "x\"y"]].concat()
}

/// A value for `name`, of the right kind more often than not.
fn member_value(name: &'static str) -> BoxedStrategy<String> {
    let right = match name {
        "model" => Just("\"m\"".to_owned()).boxed(),
        "stream" => prop_oneof![Just("true".to_owned()), Just("false".to_owned())].boxed(),
        "stream_options" => prop_oneof![
            Just("{}".to_owned()),
            Just(r#"{"include_usage":true}"#.to_owned()),
            Just(r#"{"include_usage":false,"continuous_usage_stats":true}"#.to_owned()),
        ]
        .boxed(),
        "max_tokens" | "max_completion_tokens" | "n" => {
            (0..5000u64).prop_map(|n| n.to_string()).boxed()
        }
        "messages" => Just(r#"[{"role":"user","content":"hi"}]"#.to_owned()).boxed(),
        "prompt" | "input" => prop_oneof![
            Just("\"hi\"".to_owned()),
            Just(r#"["a","b"]"#.to_owned()),
            Just("[1,2,3]".to_owned()),
            Just("[[1],[2]]".to_owned()),
        ]
        .boxed(),
        _ => value(3).boxed(),
    };
    prop_oneof![3 => right, 1 => value(3)].boxed()
}

/// A request body: members in any order, some given twice, names sometimes escaped, with
/// whitespace around the punctuation.
fn body() -> impl Strategy<Value = String> {
    let member = prop::sample::select(names())
        .prop_flat_map(|name| (Just(name), any::<u64>(), member_value(name)));
    (
        prop::collection::vec(member, 0..8),
        prop::sample::select(vec!["", " ", "\n\t"]),
    )
        .prop_map(|(members, ws)| {
            let members: Vec<String> = members
                .iter()
                .map(|(name, mask, value)| format!("{}{ws}:{ws}{value}", quoted(name, *mask)))
                .collect();
            format!("{{{ws}{}{ws}}}", members.join(&format!("{ws},{ws}")))
        })
}

/// The last value serde reads for `name` (its text), and how many times the name occurs.
fn lookup<'a>(members: &'a [(String, String)], name: &str) -> (Option<&'a str>, usize) {
    let all: Vec<&str> = members
        .iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .collect();
    (all.last().copied(), all.len())
}

/// The value of `name` as serde reads it.
fn value_of(members: &[(String, String)], name: &str) -> Option<Value> {
    lookup(members, name).0.map(read)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn the_parser_reads_what_serde_reads(text in body(), endpoint in prop::sample::select(Endpoint::ALL.to_vec())) {
        let chat = endpoint == Endpoint::ChatCompletions;
        let parsed = InferenceRequest::from_json(endpoint, Bytes::from(text.clone()), None);
        let request = match parsed {
            Err(ApiError::BadRequest { .. }) => return Ok(()),
            Err(other) => return Err(TestCaseError::fail(format!("not a 400: {other:?}"))),
            Ok(request) => request,
        };
        let given = members(text.as_bytes());
        prop_assert!(given.is_some(), "accepted what serde cannot read: {}", text);
        let given = given.unwrap_or_default();
        for name in MEMBERS {
            prop_assert!(lookup(&given, name).1 <= 1, "accepted `{}` twice: {}", name, text);
        }
        prop_assert_eq!(value_of(&given, "model"), Some(json!(request.model)));
        if endpoint == Endpoint::Embeddings {
            // Nothing generated, nothing streamed, whatever `stream`, `n` or `max_tokens` say.
            prop_assert_eq!((request.stream, request.n, request.max_tokens), (false, 1, None));
            prop_assert_eq!(&request.upstream_body()[..], text.as_bytes());
            return Ok(());
        }
        let stream = value_of(&given, "stream").and_then(|v| v.as_bool()).unwrap_or(false);
        prop_assert_eq!(request.stream, stream);
        let n = value_of(&given, "n").and_then(|v| v.as_u64()).unwrap_or(1);
        prop_assert_eq!(request.n, n);
        let max = |name| value_of(&given, name).and_then(|v| v.as_u64());
        let expected_max = if chat { max("max_completion_tokens").or(max("max_tokens")) } else { max("max_tokens") };
        prop_assert_eq!(request.max_tokens, expected_max);

        let upstream = request.upstream_body();
        let sent = members(&upstream);
        prop_assert!(sent.is_some(), "sent the worker what is not an object: {:?}", upstream);
        let sent = sent.unwrap_or_default();
        if !request.stream {
            prop_assert_eq!(&upstream[..], text.as_bytes(), "a non-streaming body is relayed as is");
            return Ok(());
        }
        // `stream_options` once, the gateway's; every other member as the client wrote it, in
        // its order (a member the gateway does not read may well be there twice).
        let options: Vec<&(String, String)> =
            sent.iter().filter(|(name, _)| name == "stream_options").collect();
        prop_assert_eq!(options.len(), 1, "{:?}", upstream);
        prop_assert_eq!(
            read(&options[0].1),
            json!({"include_usage": true, "continuous_usage_stats": true})
        );
        let others = |members: &[(String, String)]| -> Vec<(String, String)> {
            members.iter().filter(|(name, _)| name != "stream_options").cloned().collect()
        };
        prop_assert_eq!(others(&sent), others(&given), "a client's member changed");
    }

    /// Deeply nested or otherwise unreadable bodies are a 400, never a panic or an overflow.
    #[test]
    fn anything_else_is_a_400(text in value(6)) {
        let parsed = InferenceRequest::from_json(Endpoint::Completions, Bytes::from(text.clone()), None);
        if !is_json(text.as_bytes()) {
            prop_assert!(matches!(parsed, Err(ApiError::BadRequest { .. })), "{}", text);
        }
    }
}
