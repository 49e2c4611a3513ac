//! The simulator's fake tokenizer: deterministic prompt token counts, generated token texts, and
//! stop-string cutting.
//!
//! It models no real vocabulary: counts follow fixed rules (words + BOS, chat overhead per
//! message), and generated text is drawn from a small ASCII word list by a hash of
//! (request seed, choice stream, position), so equal inputs always give equal outputs.

/// Generated token texts. ASCII letters only (never needs JSON escaping), each with its leading
/// space as a real BPE token would have.
const VOCAB: [&str; 64] = [
    " the", " of", " and", " to", " in", " a", " is", " that", " for", " it", " as", " was",
    " with", " be", " by", " on", " not", " he", " this", " are", " or", " his", " from", " at",
    " which", " but", " have", " an", " had", " they", " you", " were", " their", " one", " all",
    " we", " can", " her", " has", " there", " been", " if", " more", " when", " will", " would",
    " who", " so", " no", " time", " model", " token", " gate", " river", " stone", " light",
    " north", " paper", " green", " quiet", " seven", " market", " window", " garden",
];

/// Ids 0..=2 are reserved (pad, BOS, EOS) and the chat template uses `TEMPLATE_ID`; word ids are
/// hashed into the range above them.
const BOS_ID: u32 = 1;
const TEMPLATE_ID: u32 = 3;
const VOCAB_SIZE: u32 = 32_000;

/// Tokens the chat template adds per message, and once per conversation.
const CHAT_TOKENS_PER_MESSAGE: u32 = 4;
const CHAT_TOKENS_PER_CONVERSATION: u32 = 3;

/// SplitMix64's output function: a fast, well-mixed 64-bit hash of `x`.
pub(crate) fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Number of whitespace-separated words in `text`, saturated to `u32`.
pub(crate) fn words(text: &str) -> u32 {
    u32::try_from(text.split_whitespace().count()).unwrap_or(u32::MAX)
}

/// Prompt tokens of a completions text prompt: its words plus a BOS token.
pub(crate) fn text_prompt_tokens(text: &str) -> u32 {
    words(text).saturating_add(1)
}

/// Prompt tokens of one chat message whose content has `content_words` words.
pub(crate) fn chat_message_tokens(content_words: u32) -> u32 {
    content_words.saturating_add(CHAT_TOKENS_PER_MESSAGE)
}

/// Prompt tokens of a whole conversation, given the per-message counts already summed.
pub(crate) fn chat_prompt_tokens(message_tokens: u32) -> u32 {
    message_tokens.saturating_add(CHAT_TOKENS_PER_CONVERSATION)
}

/// The generation stream of choice `choice` of a prompt (its index among the prompt's `n`):
/// `seed` is the request's (0 without one); with `temperature: 0` every choice is the same greedy
/// stream, otherwise each of a prompt's choices differs. As in vLLM, where each prompt of a
/// request is sampled on its own, a prompt's choices do not depend on the prompts before it.
pub(crate) fn choice_stream(seed: u64, choice: u32, greedy: bool) -> u64 {
    let choice_mix = if greedy { 0 } else { u64::from(choice) + 1 };
    splitmix64(seed ^ splitmix64(choice_mix))
}

/// Text of generated token `pos` of a choice stream.
pub(crate) fn token_text(stream: u64, pos: u32) -> &'static str {
    let h = splitmix64(stream ^ u64::from(pos).wrapping_mul(0xD6E8_FEB8_6659_FD93));
    VOCAB[(h % VOCAB.len() as u64) as usize]
}

/// The fake id of generated token `pos` of a choice stream (`return_token_ids`).
pub(crate) fn token_id(stream: u64, pos: u32) -> u32 {
    let h = splitmix64(stream ^ u64::from(pos).wrapping_mul(0xD6E8_FEB8_6659_FD93));
    TEMPLATE_ID + 1 + (h % u64::from(VOCAB_SIZE - TEMPLATE_ID - 1)) as u32
}

/// Fake token ids of a completions text prompt (BOS, then one id per word).
pub(crate) fn text_prompt_ids(text: &str, out: &mut Vec<u32>) {
    out.push(BOS_ID);
    out.extend(text.split_whitespace().map(word_id));
}

/// Fake token ids of one chat message (template tokens, then one id per word).
pub(crate) fn chat_message_ids<'a>(parts: impl Iterator<Item = &'a str>, out: &mut Vec<u32>) {
    out.extend([TEMPLATE_ID; CHAT_TOKENS_PER_MESSAGE as usize]);
    for part in parts {
        out.extend(part.split_whitespace().map(word_id));
    }
}

/// The template tokens closing a conversation (the generation prompt).
pub(crate) fn chat_closing_ids(out: &mut Vec<u32>) {
    out.extend([TEMPLATE_ID; CHAT_TOKENS_PER_CONVERSATION as usize]);
}

/// FNV-1a of a word, folded into the id range above the reserved ids.
fn word_id(word: &str) -> u32 {
    let mut h: u32 = 0x811C_9DC5;
    for b in word.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    TEMPLATE_ID + 1 + h % (VOCAB_SIZE - TEMPLATE_ID - 1)
}

/// A choice's generation with stop strings applied, as vLLM's detokenizer does it: text that
/// could be the start of a stop string is held back from the stream until it is known not to
/// be, and a matched stop string (and everything after it) never appears.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StopCut {
    /// Tokens generated, the one completing the stop string included.
    pub tokens: u32,
    /// Index into the request's stop list of the string that ended generation, if one did.
    pub matched: Option<usize>,
    /// The visible text of the whole choice.
    pub text: String,
    /// `ends[t]`: bytes of `text` streamed once token `t` is out; the last is `text.len()`.
    pub ends: Vec<u32>,
}

impl StopCut {
    /// Generates up to `limit` tokens of `stream`, stopping at the first stop string that shows
    /// up. `stops` must not contain empty strings.
    pub(crate) fn generate(stream: u64, limit: u32, stops: &[String]) -> Self {
        let mut text = String::new();
        let mut ends = Vec::new();
        for pos in 0..limit {
            let before = text.len();
            text.push_str(token_text(stream, pos));
            if let Some((at, matched)) = earliest_stop(&text, before, stops) {
                text.truncate(at);
                ends.push(len_u32(at));
                return Self {
                    tokens: pos + 1,
                    matched: Some(matched),
                    text,
                    ends,
                };
            }
            let held = stops.iter().map(|s| held_back(&text, s)).max().unwrap_or(0);
            ends.push(len_u32(text.len() - held));
        }
        if let Some(last) = ends.last_mut() {
            *last = len_u32(text.len());
        }
        Self {
            tokens: limit,
            matched: None,
            text,
            ends,
        }
    }

    /// The text streamed with token `pos`.
    pub(crate) fn delta(&self, pos: u32) -> &str {
        let pos = pos as usize;
        let end = self.ends.get(pos).map_or(self.text.len(), |&e| e as usize);
        let start = match pos.checked_sub(1) {
            Some(prev) => self.ends.get(prev).map_or(end, |&e| e as usize),
            None => 0,
        };
        self.text.get(start..end).unwrap_or("")
    }
}

/// The earliest stop string occurrence that ends in the text appended after `before`.
fn earliest_stop(text: &str, before: usize, stops: &[String]) -> Option<(usize, usize)> {
    let mut best: Option<(usize, usize)> = None;
    for (i, stop) in stops.iter().enumerate() {
        // Only occurrences ending past `before` are new; earlier ones were already checked.
        let from = before.saturating_sub(stop.len().saturating_sub(1));
        let Some(found) = text.get(from..).and_then(|tail| tail.find(stop.as_str())) else {
            continue;
        };
        let at = from + found;
        if best.is_none_or(|(b, _)| at < b) {
            best = Some((at, i));
        }
    }
    best
}

/// Length of the longest proper prefix of `stop` that `text` ends with.
fn held_back(text: &str, stop: &str) -> usize {
    let (text, stop) = (text.as_bytes(), stop.as_bytes());
    (1..stop.len())
        .rev()
        .find(|&k| text.ends_with(&stop[..k]))
        .unwrap_or(0)
}

fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_counts_follow_the_documented_rules() {
        assert_eq!(text_prompt_tokens("hello big  world\n"), 4);
        assert_eq!(text_prompt_tokens(""), 1);
        let conversation = chat_message_tokens(words("You are terse.")) + chat_message_tokens(2);
        assert_eq!(chat_prompt_tokens(conversation), (3 + 4) + (2 + 4) + 3);
    }

    #[test]
    fn token_ids_have_the_counted_length() {
        let mut ids = Vec::new();
        text_prompt_ids("one two three", &mut ids);
        assert_eq!(ids.len() as u32, text_prompt_tokens("one two three"));
        assert_eq!(ids[0], BOS_ID);
        assert!(
            ids[1..]
                .iter()
                .all(|&id| id > TEMPLATE_ID && id < VOCAB_SIZE)
        );
        ids.clear();
        chat_message_ids(["a b", "c"].into_iter(), &mut ids);
        chat_closing_ids(&mut ids);
        assert_eq!(ids.len() as u32, chat_prompt_tokens(chat_message_tokens(3)));
    }

    #[test]
    fn generation_is_deterministic_and_greedy_choices_agree() {
        let a: Vec<_> = (0..20)
            .map(|p| token_text(choice_stream(7, 0, false), p))
            .collect();
        let b: Vec<_> = (0..20)
            .map(|p| token_text(choice_stream(7, 0, false), p))
            .collect();
        assert_eq!(a, b);
        let other: Vec<_> = (0..20)
            .map(|p| token_text(choice_stream(7, 1, false), p))
            .collect();
        assert_ne!(a, other);
        assert_eq!(choice_stream(7, 0, true), choice_stream(7, 5, true));
        assert!(
            VOCAB
                .iter()
                .all(|w| w.starts_with(' ') && w[1..].bytes().all(|b| b.is_ascii_lowercase()))
        );
    }

    #[test]
    fn stop_string_truncates_and_is_never_streamed() {
        let stream = choice_stream(3, 0, true);
        let full: String = (0..40).map(|p| token_text(stream, p)).collect();
        // Stop on the 6th token's word together with the leading space of the 6th token.
        let sixth = token_text(stream, 5);
        let stop = format!("{}{}", token_text(stream, 4).trim_start(), sixth);
        let cut = StopCut::generate(stream, 40, std::slice::from_ref(&stop));
        let at = full.find(stop.as_str()).map(|i| i as u32);
        assert_eq!(Some(cut.text.len() as u32), at);
        assert_eq!(cut.matched, Some(0));
        assert!(cut.tokens <= 6);
        let streamed: String = (0..cut.tokens).map(|p| cut.delta(p)).collect();
        assert_eq!(streamed, cut.text);
        assert!(!streamed.contains(stop.as_str()));
    }

    #[test]
    fn unmatched_stop_streams_everything_by_the_end() {
        let stream = choice_stream(0, 0, true);
        let cut = StopCut::generate(stream, 12, &[" zzz".to_owned()]);
        assert_eq!((cut.tokens, cut.matched), (12, None));
        let plain: String = (0..12).map(|p| token_text(stream, p)).collect();
        let streamed: String = (0..12).map(|p| cut.delta(p)).collect();
        assert_eq!(
            (cut.text.as_str(), streamed.as_str()),
            (plain.as_str(), plain.as_str())
        );
    }
}
