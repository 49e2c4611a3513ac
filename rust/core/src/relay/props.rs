//! Property tests of the relay against serde's reading of the same bytes: SSE events split at
//! arbitrary chunk boundaries, and worker chunks whose member names are escaped, spaced out or
//! repeated. The relay finds the `usage` serde finds, cuts exactly that member, and keeps every
//! other byte.

use bytes::Bytes;
use proptest::prelude::*;
use serde_json::Value;

use super::answer;
use super::frame::{self, ChoicesAt, FrameAction, inspect, inspect_answer, inspect_in};
use super::sse::SseSplitter;
use crate::json;
use crate::json_props::{members, quoted, read, value};
use crate::request::UsageOptions;

/// A chunk: vLLM's members, each at most once (a worker does not repeat one), in any order,
/// with names maybe escaped, values now and then of another kind.
fn chunk() -> impl Strategy<Value = String> {
    let usage = prop_oneof![
        Just(r#"{"prompt_tokens":3,"total_tokens":5,"completion_tokens":2}"#.to_owned()),
        Just(r#"{"prompt_tokens":3,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":1}}"#.to_owned()),
        Just("null".to_owned()),
        value(2),
    ];
    let choices = prop_oneof![
        Just("[]".to_owned()),
        (0..4u32, any::<u64>()).prop_map(|(index, mask)| format!(
            r#"[{{{}:{index},"text":" a","finish_reason":null}}]"#,
            quoted("index", mask)
        )),
        Just(
            r#"[{"index":0,"delta":{"content":"\"usage\":{}"},"finish_reason":"stop"}]"#.to_owned()
        ),
        Just(r#"[{"text":" a"},{"index":1,"text":"b"}]"#.to_owned()),
        value(2),
    ];
    // Each name at most once, in any order.
    let members = (
        prop::option::of(Just("\"cmpl-1\"".to_owned())),
        prop::option::of(choices),
        prop::option::of(usage),
        prop::option::of(Just("\"fp\"".to_owned())),
        prop::option::of(value(2)),
        prop::option::of(value(1)),
    )
        .prop_map(|(id, choices, usage, fingerprint, other, error)| {
            let named = [
                ("id", id),
                ("choices", choices),
                ("usage", usage),
                ("system_fingerprint", fingerprint),
                ("other", other),
                ("error", error),
            ];
            named
                .into_iter()
                .filter_map(|(name, value)| value.map(|v| (name, v)))
                .collect::<Vec<_>>()
        })
        .prop_shuffle();
    (
        members,
        prop::collection::vec(any::<u64>(), 6),
        prop::sample::select(vec!["", " ", "\n"]),
    )
        .prop_map(|(members, masks, ws)| {
            let members: Vec<String> = members
                .iter()
                .zip(masks)
                .map(|((name, value), mask)| format!("{}{ws}:{ws}{value}", quoted(name, mask)))
                .collect();
            format!("{{{}}}", members.join(&format!(",{ws}")))
        })
}

fn client() -> impl Strategy<Value = UsageOptions> {
    (any::<bool>(), any::<bool>()).prop_map(|(include_usage, continuous_usage_stats)| {
        UsageOptions {
            include_usage,
            continuous_usage_stats,
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn usage_is_what_serde_reads_and_nothing_else_is_cut(payload in chunk(), client in client()) {
        let event = format!("data: {payload}\n\n").into_bytes();
        let inspected = inspect(&event, client);
        let Some(given) = members(payload.as_bytes()) else {
            // Not JSON (a number past f64 is still JSON to the relay): nothing to compare.
            return Ok(());
        };
        let usage: Vec<&String> = given.iter().filter(|(k, _)| k == "usage").map(|(_, v)| v).collect();
        let Some(range) = inspected.usage.clone() else {
            prop_assert!(usage.is_empty(), "missed the usage of {}", payload);
            return Ok(());
        };
        prop_assert_eq!(usage.len(), 1, "{}", payload);
        prop_assert_eq!(read(&String::from_utf8_lossy(&event[range])), read(usage[0]));
        if let FrameAction::Strip(cut) = &inspected.action {
            let mut rest = event[..cut.start].to_vec();
            rest.extend_from_slice(&event[cut.end..]);
            let rest = rest.strip_prefix(b"data: ").map(<[u8]>::trim_ascii).unwrap_or_default();
            let kept = members(rest);
            let expected: Vec<(String, String)> =
                given.iter().filter(|(k, _)| k != "usage").cloned().collect();
            prop_assert_eq!(kept, Some(expected), "{}", payload);
        }
        if inspected.action == FrameAction::Drop {
            prop_assert!(!client.include_usage);
            let choices = given.iter().find(|(k, _)| k == "choices").map(|(_, v)| read(v));
            prop_assert_eq!(choices, Some(Value::Array(Vec::new())));
        }
    }

    #[test]
    fn a_choice_event_read_once_meters_as_inspected(payload in chunk(), client in client()) {
        let event = format!("data: {payload}\n\n").into_bytes();
        let Some(body) = frame::payload(&event) else {
            return Err(TestCaseError::fail("not an event"));
        };
        let Some(read) = answer::read(body) else {
            return Ok(());
        };
        let Some(once) = inspect_answer(&event, body, &read) else {
            // Not a plain choice event: the relay inspects it.
            prop_assert!(read.choices.is_empty() || read.error, "{}", payload);
            return Ok(());
        };
        let inspected = inspect(&event, client);
        prop_assert_eq!(&once.usage, &inspected.usage, "{}", payload);
        prop_assert_eq!((once.done, once.error), (false, inspected.error), "{}", payload);
        prop_assert_eq!(&once.fingerprint, &inspected.fingerprint, "{}", payload);
        if inspected.usage.is_some() {
            prop_assert_eq!(once.choice, inspected.choice, "{}", payload);
        }
    }

    #[test]
    fn events_survive_any_chunking(
        events in prop::collection::vec("data: [^\n]{0,40}", 1..12),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
    ) {
        let stream: Vec<u8> = events.iter().flat_map(|e| format!("{e}\n\n").into_bytes()).collect();
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        points.sort_unstable();
        let mut splitter = SseSplitter::default();
        let mut out: Vec<Bytes> = Vec::new();
        let mut start = 0;
        for point in points.into_iter().chain([stream.len()]) {
            out.extend(splitter.push(Bytes::copy_from_slice(&stream[start..point])));
            start = point;
        }
        let expected: Vec<Vec<u8>> = events.iter().map(|e| format!("{e}\n\n").into_bytes()).collect();
        let got: Vec<Vec<u8>> = out.iter().map(|b| b.to_vec()).collect();
        prop_assert_eq!(got, expected);
        prop_assert!(splitter.pending().is_empty());
    }

    #[test]
    fn a_stream_s_events_inspect_as_each_alone(
        pairs in prop::collection::vec((chunk(), chunk(), any::<bool>()), 1..6),
        client in client(),
    ) {
        // Each pair: an event, then one with its head (up to its `choices` value) and the
        // other's tail, or the other whole; the stream's `choices` place is remembered
        // across all of them.
        let mut payloads = Vec::new();
        for (first, second, spliced) in pairs {
            let joined = match (json::value_start(first.as_bytes(), "choices"), spliced) {
                (Some(at), true) if at < first.len() => {
                    let tail = json::value_start(second.as_bytes(), "choices")
                        .and_then(|from| second.get(from..))
                        .unwrap_or(&second);
                    format!("{}{tail}", &first[..at])
                }
                _ => second,
            };
            payloads.push(first);
            payloads.push(joined);
        }
        let mut choices_at = ChoicesAt::default();
        for payload in payloads {
            let event = format!("data: {payload}\n\n").into_bytes();
            prop_assert_eq!(
                inspect_in(&event, client, &mut choices_at),
                inspect(&event, client),
                "{}",
                payload
            );
        }
    }
}
