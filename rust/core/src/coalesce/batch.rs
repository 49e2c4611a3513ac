//! The JSON of coalescing: which completions may share a call, the one body they go up as, and
//! each client's own answer cut back out of the worker's.
//!
//! vLLM answers a completions request with a list of prompts with one choice per prompt and `n`,
//! in order (choice `index = prompt_index * n + i`), and one `usage` summed over them. The call
//! asks for `return_token_ids`, so each choice carries its prompt's token ids and its own
//! generated ids: that is what splits `usage` exactly. vLLM reports prompt caching
//! (`prompt_tokens_details.cached_tokens`) for one prompt of such a call only, its last; so the
//! client that sent the last prompt gets that figure, as it would alone, and every other client
//! `cached_tokens: 0` (see the README's "Coalescing").
//!
//! Field order is kept: bodies are read as ordered maps of raw JSON values, and only `index`, the
//! token ids and `usage` are rewritten.

use bytes::Bytes;
use indexmap::IndexMap;
use serde_json::value::RawValue;

/// A JSON object with its members in order and their values as sent.
type Object = IndexMap<String, Box<RawValue>>;

/// Members a coalesced call sets itself; a request that sets them is sent on its own.
const EXCLUDED: [&str; 3] = ["stream", "echo", "use_beam_search"];

/// Whether a completions prompt is text or token ids: one call cannot mix them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PromptKind {
    Text,
    Tokens,
}

/// One completions request, ready to share a call: its prompts, and the rest of its body, which
/// must be byte for byte the same as every other request of the call's.
#[derive(Debug)]
pub struct Part {
    pub kind: PromptKind,
    pub prompts: Vec<Box<RawValue>>,
    /// The body without `prompt`, members in the client's order.
    pub rest: Bytes,
    /// Whether the client asked for `return_token_ids` itself.
    pub wants_ids: bool,
    pub n: usize,
    /// How long its batch waits for company (its model's window).
    pub window: std::time::Duration,
}

impl Part {
    /// `body` as a part of a coalesced call, or `None` if it must go on its own: a body that
    /// streams, echoes its prompt (vLLM echoes nothing when asked for token ids), searches beams,
    /// or carries more than `max_prompts` prompts or a prompt of no recognisable shape.
    pub fn of(body: &[u8], n: u64, max_prompts: usize) -> Option<Self> {
        let mut object: Object = serde_json::from_slice(body).ok()?;
        for name in EXCLUDED {
            if object
                .get(name)
                .is_some_and(|v| v.get() != "false" && v.get() != "null")
            {
                return None;
            }
        }
        let prompt = object.shift_remove("prompt")?;
        let (kind, prompts) = prompts(&prompt)?;
        if prompts.is_empty() || prompts.len() > max_prompts {
            return None;
        }
        let wants_ids = object
            .get("return_token_ids")
            .is_some_and(|v| v.get() == "true");
        Some(Self {
            kind,
            prompts,
            rest: serde_json::to_vec(&object).ok()?.into(),
            wants_ids,
            n: usize::try_from(n).ok()?.max(1),
            window: std::time::Duration::ZERO,
        })
    }

    /// The part, in a batch that waits `window` for company.
    pub fn within(self, window: std::time::Duration) -> Self {
        Self { window, ..self }
    }
}

/// A prompt's shape and its prompts: a string, strings, token ids, or lists of token ids.
fn prompts(prompt: &RawValue) -> Option<(PromptKind, Vec<Box<RawValue>>)> {
    let text = prompt.get();
    if text.starts_with('"') {
        return Some((PromptKind::Text, vec![prompt.to_owned()]));
    }
    let items: Vec<Box<RawValue>> = serde_json::from_str(text).ok()?;
    let first = items.first()?.get();
    if first.starts_with('"') {
        return items
            .iter()
            .all(|item| item.get().starts_with('"'))
            .then_some((PromptKind::Text, items));
    }
    if first.starts_with('[') {
        return items
            .iter()
            .all(|item| item.get().starts_with('['))
            .then_some((PromptKind::Tokens, items));
    }
    // A list of token ids is one prompt.
    let all_ids = items
        .iter()
        .all(|item| item.get().bytes().all(|b| b.is_ascii_digit()));
    all_ids.then(|| (PromptKind::Tokens, vec![prompt.to_owned()]))
}

/// The body of one call for `parts` (which share `rest`): the first part's body with every
/// prompt, in order, and `return_token_ids`.
pub fn body(rest: &[u8], parts: &[&Part]) -> Option<Bytes> {
    let mut object: Object = serde_json::from_slice(rest).ok()?;
    let prompts: Vec<&RawValue> = parts
        .iter()
        .flat_map(|part| part.prompts.iter().map(AsRef::as_ref))
        .collect();
    let prompts = serde_json::value::to_raw_value(&prompts).ok()?;
    object.insert("prompt".to_owned(), prompts);
    object.insert("return_token_ids".to_owned(), raw("true"));
    serde_json::to_vec(&object).ok().map(Bytes::from)
}

/// What one client of a call is owed: how many prompts it sent, and the id its answer carries.
#[derive(Debug, Clone)]
pub struct Share {
    pub prompts: usize,
    pub id: String,
}

/// Each client's answer out of the worker's `body` for a call of `shares` (in the order their
/// prompts went up), `n` choices a prompt; the token ids stay only if the clients asked for
/// them. `None` if the body is not what such a call returns: then no client can be answered
/// from it.
pub fn split(body: &[u8], n: usize, shares: &[Share], keep_ids: bool) -> Option<Vec<Bytes>> {
    let object: Object = serde_json::from_slice(body).ok()?;
    let choices: Vec<Object> = serde_json::from_str(object.get("choices")?.get()).ok()?;
    let usage: Object = serde_json::from_str(object.get("usage")?.get()).ok()?;
    let total_prompts: usize = shares.iter().map(|s| s.prompts).sum();
    if choices.len() != total_prompts.checked_mul(n)? {
        return None;
    }
    let mut counted = Vec::with_capacity(choices.len());
    for (position, choice) in choices.iter().enumerate() {
        let index: usize = serde_json::from_str(choice.get("index")?.get()).ok()?;
        let prompt = id_count(choice.get("prompt_token_ids")?)?;
        let generated = id_count(choice.get("token_ids")?)?;
        if index != position {
            return None;
        }
        counted.push((prompt, generated));
    }
    let summed = |f: fn(&(u64, u64)) -> u64| counted.iter().map(f).sum::<u64>();
    // Each prompt's tokens once (on its first choice), every choice's generated tokens.
    let prompt_total: u64 = counted.iter().step_by(n).map(|c| c.0).sum();
    if Some(prompt_total) != number(usage.get("prompt_tokens")?)
        || Some(summed(|c| c.1)) != number(usage.get("completion_tokens")?)
    {
        return None;
    }
    // vLLM's details carry more than `cached_tokens`; the rest is kept as it came.
    let details = usage
        .get("prompt_tokens_details")
        .and_then(|d| serde_json::from_str::<Object>(d.get()).ok());
    let cached = details
        .as_ref()
        .and_then(|d| d.get("cached_tokens").and_then(|c| number(c)));

    let mut answers = Vec::with_capacity(shares.len());
    let mut choices = choices.into_iter();
    let mut counted = counted.into_iter();
    for (k, share) in shares.iter().enumerate() {
        let mine = share.prompts * n;
        let mut own: Vec<Object> = choices.by_ref().take(mine).collect();
        let counts: Vec<(u64, u64)> = counted.by_ref().take(mine).collect();
        let prompt_tokens: u64 = counts.iter().step_by(n).map(|c| c.0).sum();
        let completion_tokens: u64 = counts.iter().map(|c| c.1).sum();
        for (i, choice) in own.iter_mut().enumerate() {
            choice.insert("index".to_owned(), raw(&i.to_string()));
            if !keep_ids {
                choice.insert("token_ids".to_owned(), raw("null"));
                choice.insert("prompt_token_ids".to_owned(), raw("null"));
            }
        }
        let last = k + 1 == shares.len();
        let mut usage = usage.clone();
        usage.insert("prompt_tokens".to_owned(), raw(&prompt_tokens.to_string()));
        usage.insert(
            "total_tokens".to_owned(),
            raw(&(prompt_tokens + completion_tokens).to_string()),
        );
        usage.insert(
            "completion_tokens".to_owned(),
            raw(&completion_tokens.to_string()),
        );
        if let (Some(details), Some(cached)) = (&details, cached) {
            let mine = if last { cached.min(prompt_tokens) } else { 0 };
            let mut details = details.clone();
            details.insert("cached_tokens".to_owned(), raw(&mine.to_string()));
            let details = serde_json::value::to_raw_value(&details).ok()?;
            usage.insert("prompt_tokens_details".to_owned(), details);
        }
        let mut answer = object.clone();
        answer.insert(
            "id".to_owned(),
            raw(&serde_json::to_string(&share.id).ok()?),
        );
        answer.insert(
            "choices".to_owned(),
            serde_json::value::to_raw_value(&own).ok()?,
        );
        answer.insert(
            "usage".to_owned(),
            serde_json::value::to_raw_value(&usage).ok()?,
        );
        answers.push(serde_json::to_vec(&answer).ok()?.into());
    }
    Some(answers)
}

/// How many ids a JSON array of token ids holds.
fn id_count(ids: &RawValue) -> Option<u64> {
    let ids: Vec<u32> = serde_json::from_str(ids.get()).ok()?;
    u64::try_from(ids.len()).ok()
}

fn number(value: &RawValue) -> Option<u64> {
    serde_json::from_str(value.get()).ok()
}

/// A JSON literal this module writes itself (always valid; `null` if it were not).
fn raw(json: &str) -> Box<RawValue> {
    RawValue::from_string(json.to_owned()).unwrap_or_default()
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on a bad fixture")]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn part(body: Value) -> Option<Part> {
        Part::of(body.to_string().as_bytes(), 1, 16)
    }

    #[test]
    fn only_plain_completions_with_recognisable_prompts_are_parts() {
        let body = br#"{"model":"m","prompt":"hi","max_tokens":4}"#;
        let text = Part::of(body, 1, 16).unwrap();
        assert_eq!((text.kind, text.prompts.len()), (PromptKind::Text, 1));
        assert_eq!(
            &text.rest[..],
            br#"{"model":"m","max_tokens":4}"#,
            "in the client's order"
        );
        let texts = part(json!({"model": "m", "prompt": ["a", "b"]})).unwrap();
        assert_eq!((texts.kind, texts.prompts.len()), (PromptKind::Text, 2));
        let ids = part(json!({"model": "m", "prompt": [1, 2, 3]})).unwrap();
        assert_eq!((ids.kind, ids.prompts.len()), (PromptKind::Tokens, 1));
        let lists = part(json!({"model": "m", "prompt": [[1], [2, 3]]})).unwrap();
        assert_eq!((lists.kind, lists.prompts.len()), (PromptKind::Tokens, 2));
        assert!(part(json!({"model": "m", "prompt": "x", "stream": false})).is_some());

        for alone in [
            json!({"model": "m", "prompt": "x", "stream": true}),
            json!({"model": "m", "prompt": "x", "echo": true}),
            json!({"model": "m", "prompt": "x", "use_beam_search": true}),
            json!({"model": "m", "prompt": []}),
            json!({"model": "m", "prompt": ["a", [1]]}),
            json!({"model": "m", "prompt": [1, "a"]}),
            json!({"model": "m", "prompt": {"a": 1}}),
            json!({"model": "m"}),
        ] {
            assert!(part(alone.clone()).is_none(), "{alone}");
        }
        let many = json!({"model": "m", "prompt": vec!["p"; 17]});
        assert!(part(many).is_none(), "more prompts than a call carries");
    }

    /// A worker's answer to `prompts` (token counts) with `n` choices each, as vLLM writes it
    /// with `return_token_ids`.
    fn answer(prompts: &[(usize, &[usize])], n: usize, cached: Option<u64>) -> Vec<u8> {
        let mut choices = Vec::new();
        let (mut p_total, mut c_total) = (0, 0);
        for &(prompt, generated) in prompts {
            p_total += prompt;
            for &count in &generated[..n] {
                c_total += count;
                choices.push(json!({
                    "index": choices.len(),
                    "text": format!("t{}", choices.len()),
                    "logprobs": null,
                    "finish_reason": "length",
                    "stop_reason": null,
                    "token_ids": vec![7; count],
                    "prompt_logprobs": null,
                    "prompt_token_ids": vec![1; prompt],
                }));
            }
        }
        let details = cached.map_or(Value::Null, |c| {
            json!({"cached_tokens": c, "created_cache_tokens": null, "multimodal_tokens": null})
        });
        json!({
            "id": "cmpl-batch",
            "object": "text_completion",
            "created": 1,
            "model": "m",
            "choices": choices,
            "usage": {
                "prompt_tokens": p_total,
                "total_tokens": p_total + c_total,
                "completion_tokens": c_total,
                "prompt_tokens_details": details,
            },
        })
        .to_string()
        .into_bytes()
    }

    fn share(prompts: usize, id: &str) -> Share {
        Share {
            prompts,
            id: id.to_owned(),
        }
    }

    #[test]
    fn each_client_gets_its_own_choices_and_usage_in_the_worker_s_order() {
        // Three clients: one prompt, two prompts, one prompt; n = 2.
        let body = answer(
            &[(5, &[3, 4]), (6, &[1, 2]), (7, &[5, 5]), (8, &[2, 9])],
            2,
            Some(4),
        );
        let shares = [share(1, "cmpl-a"), share(2, "cmpl-b"), share(1, "cmpl-c")];
        let answers = split(&body, 2, &shares, false).unwrap();
        let answers: Vec<Value> = answers
            .iter()
            .map(|a| serde_json::from_slice(a).unwrap())
            .collect();
        let usage = |a: &Value| {
            let u = &a["usage"];
            (
                u["prompt_tokens"].as_u64().unwrap(),
                u["completion_tokens"].as_u64().unwrap(),
                u["total_tokens"].as_u64().unwrap(),
                u["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap(),
            )
        };
        assert_eq!(usage(&answers[0]), (5, 7, 12, 0));
        assert_eq!(usage(&answers[1]), (13, 13, 26, 0));
        // The last prompt's client gets vLLM's figure, which is that prompt's.
        assert_eq!(usage(&answers[2]), (8, 11, 19, 4));
        // The details' other members are the worker's.
        let details = &answers[0]["usage"]["prompt_tokens_details"];
        assert_eq!(details["multimodal_tokens"], Value::Null);
        assert_eq!(details.as_object().unwrap().len(), 3);
        let texts = |a: &Value| -> Vec<(u64, String)> {
            a["choices"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| {
                    (
                        c["index"].as_u64().unwrap(),
                        c["text"].as_str().unwrap().into(),
                    )
                })
                .collect()
        };
        assert_eq!(texts(&answers[0]), [(0, "t0".into()), (1, "t1".into())]);
        assert_eq!(
            texts(&answers[1]),
            [
                (0, "t2".into()),
                (1, "t3".into()),
                (2, "t4".into()),
                (3, "t5".into())
            ]
        );
        assert_eq!(answers[2]["id"], "cmpl-c");
        for a in &answers {
            for choice in a["choices"].as_array().unwrap() {
                assert!(choice["token_ids"].is_null() && choice["prompt_token_ids"].is_null());
            }
        }
        // The rest of the body is the worker's, in its order.
        let keys = |body: &[u8]| -> Vec<String> {
            let object: Object = serde_json::from_slice(body).unwrap();
            object.keys().cloned().collect()
        };
        let first = split(&body, 2, &shares, true).unwrap().remove(0);
        assert_eq!(keys(&first), keys(&body));
        let first = String::from_utf8(first.to_vec()).unwrap();
        assert!(first.contains(r#""id":"cmpl-a""#), "{first}");
        assert!(first.contains(r#""token_ids":[7,7,7]"#), "{first}");
    }

    #[test]
    fn an_answer_that_does_not_add_up_answers_nobody() {
        let shares = [share(1, "a"), share(1, "b")];
        let good = answer(&[(5, &[3]), (6, &[1])], 1, None);
        assert!(split(&good, 1, &shares, false).is_some());
        assert!(
            split(&good, 1, &[share(1, "a")], false).is_none(),
            "too many choices"
        );
        assert!(split(&good, 2, &shares, false).is_none(), "n disagrees");
        let mut v: Value = serde_json::from_slice(&good).unwrap();
        v["usage"]["completion_tokens"] = json!(5);
        assert!(split(v.to_string().as_bytes(), 1, &shares, false).is_none());
        let mut v: Value = serde_json::from_slice(&good).unwrap();
        v["choices"][1]["token_ids"] = Value::Null;
        assert!(split(v.to_string().as_bytes(), 1, &shares, false).is_none());
        let mut v: Value = serde_json::from_slice(&good).unwrap();
        v["choices"][0]["index"] = json!(1);
        assert!(split(v.to_string().as_bytes(), 1, &shares, false).is_none());
        assert!(split(b"{\"error\":{}}", 1, &shares, false).is_none());
    }

    #[test]
    fn the_call_s_body_carries_every_prompt_in_order_and_asks_for_token_ids() {
        let a = part(json!({"model": "m", "prompt": "x", "n": 2})).unwrap();
        let b = part(json!({"model": "m", "prompt": ["y", "z"], "n": 2})).unwrap();
        assert_eq!(a.rest, b.rest);
        let body = body(&a.rest, &[&a, &b]).unwrap();
        assert_eq!(
            &body[..],
            br#"{"model":"m","n":2,"prompt":["x","y","z"],"return_token_ids":true}"#
        );
        let ids = part(json!({"prompt": [1, 2]})).unwrap();
        let lists = part(json!({"prompt": [[3], [4]]})).unwrap();
        let body = super::body(&ids.rest, &[&ids, &lists]).unwrap();
        assert_eq!(
            &body[..],
            br#"{"prompt":[[1,2],[3],[4]],"return_token_ids":true}"#
        );
    }
}
