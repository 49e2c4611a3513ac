//! Byte-level access to the top-level members of a JSON object.
//!
//! The gateway must relay a worker's JSON byte for byte, yet read (and sometimes drop) one member
//! such as `usage`. This scanner finds a member's span without building a document, so every other
//! byte stays exactly as the worker wrote it. It trusts its input to be JSON (worker output or a
//! body serde already validated); on anything else it answers `None`, never panics. Member names
//! are compared as JSON reads them, after unescaping: `"stream_opti\u006fns"` is
//! `stream_options`, as it is to serde and to the worker.

use std::borrow::Cow;
use std::ops::Range;

/// Where one top-level member sits in the object text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberSpan {
    /// The member's value, e.g. `{"prompt_tokens":3,...}` or `null`.
    pub value: Range<usize>,
    /// What to cut to remove the member together with one adjacent comma.
    pub removal: Range<usize>,
}

/// Finds the top-level member `key` of the object in `text`.
///
/// Workers put `usage` last, so the object's tail is tried first: `"key":` can only be a key
/// there (a quote inside a string is escaped), and a value followed by nothing but the object's
/// closing brace is a top-level member. Anything else takes the full scan.
pub fn find_member(text: &[u8], key: &str) -> Option<MemberSpan> {
    find_last_member(text, key).or_else(|| scan_member(text, key))
}

fn find_last_member(text: &[u8], key: &str) -> Option<MemberSpan> {
    let name_start = memchr::memmem::rfind(text, key.as_bytes())?;
    let key_start = name_start.checked_sub(1)?;
    let name_end = name_start + key.len();
    if text[key_start] != b'"' || text.get(name_end) != Some(&b'"') {
        return None;
    }
    let colon = skip_ws(text, name_end + 1);
    if text.get(colon) != Some(&b':') {
        return None;
    }
    let value_start = skip_ws(text, colon + 1);
    let value_end = skip_value(text, value_start)?;
    let close = skip_ws(text, value_end);
    if text.get(close) != Some(&b'}') || skip_ws(text, close + 1) != text.len() {
        return None;
    }
    let before = text[..key_start]
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())?;
    let removal = match text[before] {
        // From the end of the previous value, as the full scan cuts it.
        b',' => {
            let previous_end = text[..before]
                .iter()
                .rposition(|b| !b.is_ascii_whitespace())?
                + 1;
            previous_end..value_end
        }
        b'{' => key_start..value_end,
        _ => return None,
    };
    Some(MemberSpan {
        value: value_start..value_end,
        removal,
    })
}

fn scan_member(text: &[u8], key: &str) -> Option<MemberSpan> {
    let mut pos = skip_ws(text, 0);
    if text.get(pos) != Some(&b'{') {
        return None;
    }
    pos += 1;
    // End of the previous member's value, if any: the removal of a non-first member starts there,
    // so the comma before it goes too.
    let mut previous_end: Option<usize> = None;
    loop {
        pos = skip_ws(text, pos);
        match text.get(pos)? {
            b'}' => return None,
            b'"' => {}
            _ => return None,
        }
        let key_start = pos;
        let key_end = skip_string(text, pos)?;
        let name = &text[key_start..key_end];
        pos = skip_ws(text, key_end);
        if text.get(pos) != Some(&b':') {
            return None;
        }
        let value_start = skip_ws(text, pos + 1);
        let value_end = skip_value(text, value_start)?;
        let after = skip_ws(text, value_end);
        if is_named(name, key) {
            let removal = match (previous_end, text.get(after)) {
                (Some(prev), _) => prev..value_end,
                (None, Some(b',')) => key_start..skip_ws(text, after + 1),
                (None, _) => key_start..value_end,
            };
            return Some(MemberSpan {
                value: value_start..value_end,
                removal,
            });
        }
        match text.get(after)? {
            b',' => {
                previous_end = Some(value_end);
                pos = after + 1;
            }
            _ => return None,
        }
    }
}

/// Where the value of the top-level member `key` starts, without reading past it: for peeking at
/// the beginning of a large value (such as `choices`) that need not be skipped whole.
pub fn value_start(text: &[u8], key: &str) -> Option<usize> {
    let mut pos = skip_ws(text, 0);
    if text.get(pos) != Some(&b'{') {
        return None;
    }
    pos += 1;
    loop {
        pos = skip_ws(text, pos);
        if text.get(pos) != Some(&b'"') {
            return None;
        }
        let key_end = skip_string(text, pos)?;
        let name = &text[pos..key_end];
        pos = skip_ws(text, key_end);
        if text.get(pos) != Some(&b':') {
            return None;
        }
        let start = skip_ws(text, pos + 1);
        if is_named(name, key) {
            return Some(start);
        }
        pos = skip_ws(text, skip_value(text, start)?);
        if text.get(pos) != Some(&b',') {
            return None;
        }
        pos += 1;
    }
}

/// A reader of one JSON value in a single pass: the caller walks objects and arrays, reads the
/// strings and numbers it wants and skips the rest; no byte is looked at twice. Every method
/// answers `None` where the text is not what it expects, and never panics.
#[derive(Debug)]
pub struct Reader<'a> {
    text: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(text: &'a [u8]) -> Self {
        Self { text, pos: 0 }
    }

    /// Walks the object here: `member` gets each member's name (its bytes, unescaped) with the
    /// reader at its value, which it must read or `skip`.
    pub fn object(
        &mut self,
        mut member: impl FnMut(Cow<'a, [u8]>, &mut Self) -> Option<()>,
    ) -> Option<()> {
        self.open(b'{', b'}', |reader| {
            let text = reader.text;
            let start = reader.pos;
            if text.get(start) != Some(&b'"') {
                return None;
            }
            let (end, escaped) = scan_string(text, start)?;
            let name = if escaped {
                let name = serde_json::from_slice::<String>(&text[start..end]).ok()?;
                Cow::Owned(name.into_bytes())
            } else {
                Cow::Borrowed(&text[start + 1..end - 1])
            };
            reader.pos = skip_ws(text, end);
            if text.get(reader.pos) != Some(&b':') {
                return None;
            }
            reader.pos = skip_ws(text, reader.pos + 1);
            member(name, reader)
        })
    }

    /// Walks the array here: `element` gets the reader at each element, which it must read or
    /// `skip`.
    pub fn array(&mut self, element: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.open(b'[', b']', element)
    }

    fn open(
        &mut self,
        open: u8,
        close: u8,
        mut item: impl FnMut(&mut Self) -> Option<()>,
    ) -> Option<()> {
        self.pos = skip_ws(self.text, self.pos);
        if self.text.get(self.pos) != Some(&open) {
            return None;
        }
        self.pos = skip_ws(self.text, self.pos + 1);
        if self.text.get(self.pos) == Some(&close) {
            self.pos += 1;
            return Some(());
        }
        loop {
            item(self)?;
            self.pos = skip_ws(self.text, self.pos);
            match self.text.get(self.pos)? {
                b',' => self.pos = skip_ws(self.text, self.pos + 1),
                &b if b == close => {
                    self.pos += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// Steps over the value here.
    pub fn skip(&mut self) -> Option<()> {
        self.skip_span().map(drop)
    }

    /// Steps over the value here, answering where it is in the text.
    pub fn skip_span(&mut self) -> Option<Range<usize>> {
        let start = skip_ws(self.text, self.pos);
        self.pos = skip_value(self.text, start)?;
        Some(start..self.pos)
    }

    /// The string here: borrowed when it has no escape; `None` if it is not UTF-8.
    pub fn string(&mut self) -> Option<Cow<'a, str>> {
        let start = skip_ws(self.text, self.pos);
        if self.text.get(start) != Some(&b'"') {
            return None;
        }
        let (end, escaped) = scan_string(self.text, start)?;
        self.pos = end;
        let quoted = &self.text[start..end];
        if escaped {
            serde_json::from_slice::<String>(quoted)
                .ok()
                .map(Cow::Owned)
        } else {
            std::str::from_utf8(&quoted[1..quoted.len() - 1])
                .ok()
                .map(Cow::Borrowed)
        }
    }

    /// Steps over a `null` here, if there is one.
    pub fn null(&mut self) -> bool {
        let start = skip_ws(self.text, self.pos);
        let null = self.text[start.min(self.text.len())..].starts_with(b"null");
        if null {
            self.pos = start + 4;
        }
        null
    }

    /// The text of the scalar here (a number, `true`, `false` or `null`).
    pub fn scalar(&mut self) -> Option<&'a [u8]> {
        let start = skip_ws(self.text, self.pos);
        if matches!(self.text.get(start), Some(b'"' | b'{' | b'[')) {
            return None;
        }
        self.pos = skip_value(self.text, start)?;
        Some(&self.text[start..self.pos])
    }

    /// Whether nothing but whitespace is left.
    pub fn at_end(&self) -> bool {
        skip_ws(self.text, self.pos) == self.text.len()
    }
}

/// Whether the JSON string `quoted` (quotes included) reads as `key`: byte for byte when it
/// has no escape, else once unescaped.
fn is_named(quoted: &[u8], key: &str) -> bool {
    let Some(raw) = quoted
        .strip_prefix(b"\"")
        .and_then(|q| q.strip_suffix(b"\""))
    else {
        return false;
    };
    if !raw.contains(&b'\\') {
        return raw == key.as_bytes();
    }
    // An escaped name is at least as long as what it stands for.
    raw.len() >= key.len() && serde_json::from_slice::<String>(quoted).is_ok_and(|name| name == key)
}

/// `text` with `span` removed.
pub fn without(text: &[u8], span: &MemberSpan) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() - span.removal.len());
    out.extend_from_slice(&text[..span.removal.start]);
    out.extend_from_slice(&text[span.removal.end..]);
    out
}

fn skip_ws(text: &[u8], mut pos: usize) -> usize {
    while matches!(text.get(pos), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        pos += 1;
    }
    pos
}

/// `pos` is at an opening quote; returns the position just past the closing quote.
fn skip_string(text: &[u8], pos: usize) -> Option<usize> {
    scan_string(text, pos).map(|(end, _)| end)
}

/// `pos` is at an opening quote; returns the position just past the closing quote, and whether
/// the string has an escape. Searched with `memchr` from the first byte: on a worker's answers
/// that beats looking at a short string's bytes one by one (`cargo bench --bench json`).
fn scan_string(text: &[u8], pos: usize) -> Option<(usize, bool)> {
    let mut escaped = false;
    let mut i = pos + 1;
    loop {
        i += memchr::memchr2(b'"', b'\\', text.get(i..)?)?;
        if text[i] == b'"' {
            return Some((i + 1, escaped));
        }
        escaped = true;
        i += 2;
    }
}

/// Returns the position just past the value starting at `pos`.
fn skip_value(text: &[u8], pos: usize) -> Option<usize> {
    match text.get(pos)? {
        b'"' => skip_string(text, pos),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = pos;
            loop {
                match text.get(i)? {
                    b'"' => {
                        i = skip_string(text, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        _ => {
            let mut i = pos;
            while let Some(&b) = text.get(i) {
                if matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                    break;
                }
                i += 1;
            }
            (i > pos).then_some(i)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strip(text: &str, key: &str) -> Option<String> {
        let span = find_member(text.as_bytes(), key)?;
        String::from_utf8(without(text.as_bytes(), &span)).ok()
    }

    fn value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
        find_member(text.as_bytes(), key).map(|s| &text[s.value])
    }

    /// Every member of the object in `text`, values read back as their text; `None` where the
    /// reader stopped.
    fn walked(text: &str) -> Option<Vec<(String, String)>> {
        let mut reader = Reader::new(text.as_bytes());
        let mut out = Vec::new();
        reader.object(|name, value| {
            let start = skip_ws(value.text, value.pos);
            value.skip()?;
            let name = String::from_utf8_lossy(&name).into_owned();
            out.push((name, text[start..value.pos].to_owned()));
            Some(())
        })?;
        reader.at_end().then_some(out)
    }

    #[test]
    fn reads_objects_and_arrays_in_one_pass() {
        let text = r#" { "a" : [1, {"b":"]"} ,"c"] , "\u0064":null,"e":"x\"y"} "#;
        let pairs = [
            ("a", r#"[1, {"b":"]"} ,"c"]"#),
            ("d", "null"),
            ("e", r#""x\"y""#),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        assert_eq!(walked(text), Some(pairs.to_vec()));
        let mut reader = Reader::new(br#"[1, {"b":"]", "n": null} ,"c", 2.5e3]"#);
        let mut seen = Vec::new();
        let read = reader.array(|element| {
            if let Some(scalar) = element.scalar() {
                seen.push(String::from_utf8_lossy(scalar).into_owned());
            } else if let Some(string) = element.string() {
                seen.push(string.into_owned());
            } else {
                element.object(|_, value| {
                    seen.push(if value.null() {
                        "null".into()
                    } else {
                        value.string()?.into()
                    });
                    Some(())
                })?;
            }
            Some(())
        });
        assert_eq!(read, Some(()));
        assert!(reader.at_end());
        assert_eq!(seen, ["1", "]", "null", "c", "2.5e3"]);
        assert_eq!(walked("{}"), Some(vec![]));
        assert_eq!(Reader::new(b" [ ] ").array(|_| None), Some(()));
    }

    #[test]
    fn a_read_of_what_is_not_json_stops_without_panicking() {
        for text in [
            "",
            "{",
            "[",
            "{\"a\"",
            "{\"a\":",
            "{\"a\":1,",
            "{\"a\" 1}",
            "{1:2}",
            "{\"a\":1 \"b\":2}",
            "{\"a\":\"x}",
            "null",
            "\"s\"",
            "{\"a\":1}}",
            "{\"a\":nul",
        ] {
            assert_eq!(walked(text), None, "{text}");
            let mut reader = Reader::new(text.as_bytes());
            let _ = reader.array(|element| element.skip());
            let _ = (
                reader.null(),
                reader.scalar(),
                reader.string(),
                reader.at_end(),
            );
        }
    }

    #[test]
    fn strings_and_names_borrow_unless_escaped() {
        let text = [
            br#"{"id":"plain","\u0069d":"a\nb\u00e9","n\"m":"\"","x":""#.as_slice(),
            b"\xff\"}",
        ]
        .concat();
        let mut read = Vec::new();
        let done = Reader::new(&text).object(|name, value| {
            let borrowed = |name: &Cow<'_, [u8]>| matches!(name, Cow::Borrowed(_));
            let string = value.string();
            let string_borrowed = matches!(string, Some(Cow::Borrowed(_)));
            read.push((name.to_vec(), borrowed(&name), string, string_borrowed));
            Some(())
        });
        assert_eq!(done, Some(()));
        let expected: [(&[u8], bool, Option<&str>, bool); 4] = [
            (b"id", true, Some("plain"), true),
            (b"id", false, Some("a\nb\u{e9}"), false),
            (b"n\"m", false, Some("\""), false),
            (b"x", true, None, false),
        ];
        for (got, want) in read.iter().zip(expected) {
            assert_eq!(got.0, want.0);
            assert_eq!(got.1, want.1);
            assert_eq!(got.2.as_deref(), want.2);
            assert_eq!(got.3, want.3);
        }
        assert_eq!(Reader::new(b"null").string(), None);
        assert_eq!(Reader::new(b"\"").string(), None);
        let long = format!("\"{}\\n{}\"", "a".repeat(40), "b".repeat(40));
        let expected = format!("{}\n{}", "a".repeat(40), "b".repeat(40));
        assert_eq!(
            Reader::new(long.as_bytes()).string().as_deref(),
            Some(&*expected)
        );
    }

    #[test]
    fn finds_last_middle_and_first_members() {
        let text = r#"{"id":"x","choices":[{"delta":{"content":"\"usage\":1}"}}],"usage":{"a":1}}"#;
        assert_eq!(value(text, "usage"), Some(r#"{"a":1}"#));
        assert_eq!(
            strip(text, "usage").as_deref(),
            Some(r#"{"id":"x","choices":[{"delta":{"content":"\"usage\":1}"}}]}"#)
        );
        assert_eq!(
            strip(text, "id").as_deref(),
            Some(r#"{"choices":[{"delta":{"content":"\"usage\":1}"}}],"usage":{"a":1}}"#)
        );
        assert_eq!(strip(r#"{"usage":null}"#, "usage").as_deref(), Some("{}"));
    }

    #[test]
    fn nested_key_of_the_same_name_is_not_top_level() {
        let text = r#"{"choices":[{"usage":5}],"n":2}"#;
        assert_eq!(find_member(text.as_bytes(), "usage"), None);
        assert_eq!(value(text, "n"), Some("2"));
    }

    #[test]
    fn escaped_names_are_the_names_they_spell() {
        let text = r#"{"model":"m","stream_opti\u006fns":{"include_usage":false},"n":1}"#;
        assert_eq!(
            value(text, "stream_options"),
            Some(r#"{"include_usage":false}"#)
        );
        assert_eq!(
            strip(text, "stream_options").as_deref(),
            Some(r#"{"model":"m","n":1}"#)
        );
        let last = r#"{"a":1,"\u0075sage":{"p":1}}"#;
        assert_eq!(value(last, "usage"), Some(r#"{"p":1}"#));
        assert_eq!(value_start(last.as_bytes(), "usage"), Some(20));
        assert_eq!(
            value(r#"{"us\\age":1}"#, "usage"),
            None,
            "a backslash is not nothing"
        );
        assert_eq!(value(r#"{"\u0075":1}"#, "u"), Some("1"));
    }

    #[test]
    fn tolerates_whitespace_and_scalars() {
        let text = "{ \"a\" : true ,\n \"b\": -1.5e3 , \"c\" : \"}\" }";
        assert_eq!(value(text, "b"), Some("-1.5e3"));
        assert_eq!(value(text, "c"), Some("\"}\""));
        assert_eq!(
            strip(text, "a").as_deref(),
            Some("{ \"b\": -1.5e3 , \"c\" : \"}\" }")
        );
    }

    #[test]
    fn tail_fast_path_agrees_with_the_full_scan() {
        for (text, key) in [
            (r#"{"a":1,"usage":{"p":1}}"#, "usage"),
            (r#"{"usage":{"p":1}}"#, "usage"),
            (r#"{"a":1 , "usage" : null }"#, "usage"),
            (r#"{"a":{"usage":1}}"#, "usage"),
            (r#"{"a":""usage":1}","b":2}"#, "usage"),
            (r#"{"usage":1,"b":{"usage":2}}"#, "usage"),
        ] {
            assert_eq!(
                find_member(text.as_bytes(), key),
                scan_member(text.as_bytes(), key),
                "{text}"
            );
        }
    }

    /// Deterministic pseudo-random bytes for the property tests below.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    fn random_value(rng: &mut Rng, depth: usize) -> serde_json::Value {
        use serde_json::Value;
        const WORDS: [&str; 6] = ["usage", "choices", "x\"y", "}{", "\\", "é"];
        match rng.below(if depth > 3 { 4 } else { 6 }) {
            0 => Value::Null,
            1 => Value::from(rng.next() % 1000),
            2 => Value::from(WORDS[rng.below(WORDS.len())]),
            3 => Value::Bool(rng.next().is_multiple_of(2)),
            4 => (0..rng.below(4))
                .map(|_| random_value(rng, depth + 1))
                .collect(),
            _ => {
                let mut map = serde_json::Map::new();
                for _ in 0..rng.below(4) {
                    let key = WORDS[rng.below(WORDS.len())].to_owned();
                    map.insert(key, random_value(rng, depth + 1));
                }
                Value::Object(map)
            }
        }
    }

    #[test]
    fn agrees_with_serde_on_random_objects() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut found_any = 0;
        for _ in 0..5_000 {
            let mut object = serde_json::Map::new();
            for _ in 0..1 + rng.below(5) {
                let key = ["usage", "choices", "x\"y", "id"][rng.below(4)].to_owned();
                object.insert(key, random_value(&mut rng, 0));
            }
            let text = serde_json::to_string(&object).unwrap_or_default();
            for key in ["usage", "choices", "x\"y", "absent"] {
                let expected = object.get(key);
                let found = find_member(text.as_bytes(), key);
                let value = found.as_ref().and_then(|span| {
                    serde_json::from_slice(&text.as_bytes()[span.value.clone()]).ok()
                });
                assert_eq!(value.as_ref(), expected, "{key} in {text}");
                if let Some(span) = found {
                    found_any += 1;
                    let rest: serde_json::Value =
                        serde_json::from_slice(&without(text.as_bytes(), &span))
                            .unwrap_or_default();
                    let mut reference = object.clone();
                    reference.remove(key);
                    assert_eq!(rest, serde_json::Value::Object(reference), "{text}");
                }
            }
        }
        assert!(
            found_any > 1_000,
            "the generator must exercise present keys: {found_any}"
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = Rng(42);
        let alphabet = b"{}[]\":,\\ usagechoices0123456789nultrefas\n";
        for _ in 0..20_000 {
            let len = rng.below(40);
            let text: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.below(alphabet.len())])
                .collect();
            let _ = find_member(&text, "usage");
            let _ = value_start(&text, "choices");
        }
    }

    #[test]
    fn garbage_is_none_not_a_panic() {
        for text in [
            "",
            "[]",
            "{",
            "{\"a\"",
            "{\"a\":",
            "{\"a\":[1,2",
            "{\"a\":\"x",
            // A string cut after a backslash: the escape's second byte is past the end.
            "{\"a\":\"x\\",
            "{\"a\":\"x\\\"",
            "nope",
        ] {
            assert_eq!(find_member(text.as_bytes(), "a"), None, "{text}");
            if text.starts_with('{') {
                assert_eq!(Reader::new(text.as_bytes()).skip_span(), None, "{text}");
            }
        }
    }

    #[test]
    fn a_long_string_full_of_escapes_is_stepped_over() {
        // 300 KB of escaped quotes and backslashes before the member looked for.
        let long = "\\\"".repeat(100_000);
        let text = format!(r#"{{"prompt":"{long}","usage":{{"prompt_tokens":3}},"n":1}}"#);
        assert_eq!(value(&text, "usage"), Some(r#"{"prompt_tokens":3}"#));
        let mut reader = Reader::new(text.as_bytes());
        assert_eq!(reader.skip_span(), Some(0..text.len()));
    }
}
