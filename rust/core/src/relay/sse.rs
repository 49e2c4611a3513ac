//! Splits a byte stream into Server-Sent Events at blank lines (`\n\n`), as vLLM frames them.
//!
//! Chunk boundaries of the upstream body are arbitrary; a partial event waits for its rest.

use bytes::{Bytes, BytesMut};

#[derive(Debug, Default)]
pub struct SseSplitter {
    partial: BytesMut,
}

impl SseSplitter {
    /// Appends `chunk` and returns every event it completes, each with its trailing `\n\n`.
    pub fn push(&mut self, chunk: Bytes) -> Vec<Bytes> {
        let mut events = Vec::new();
        let mut data = if self.partial.is_empty() {
            // Common case: nothing pending; events are zero-copy slices of the chunk.
            chunk
        } else {
            self.partial.extend_from_slice(&chunk);
            self.partial.split().freeze()
        };
        while let Some(end) = event_end(&data) {
            events.push(data.split_to(end));
        }
        if !data.is_empty() {
            self.partial.extend_from_slice(&data);
        }
        events
    }

    /// Bytes of an event not yet terminated.
    #[cfg(test)]
    pub fn pending(&self) -> &[u8] {
        &self.partial
    }
}

/// The index just past the first `\n\n`.
fn event_end(data: &[u8]) -> Option<usize> {
    memchr::memchr_iter(b'\n', data)
        .find(|&at| data.get(at + 1) == Some(&b'\n'))
        .map(|at| at + 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(splitter: &mut SseSplitter, chunk: &str) -> Vec<String> {
        splitter
            .push(Bytes::copy_from_slice(chunk.as_bytes()))
            .iter()
            .map(|e| String::from_utf8_lossy(e).into_owned())
            .collect()
    }

    #[test]
    fn splits_whole_and_partial_events() {
        let mut s = SseSplitter::default();
        assert_eq!(
            push(&mut s, "data: a\n\ndata: b\n\ndata: c"),
            ["data: a\n\n", "data: b\n\n"]
        );
        assert_eq!(s.pending(), b"data: c");
        assert_eq!(push(&mut s, "\n"), Vec::<String>::new());
        assert_eq!(
            push(&mut s, "\ndata: [DONE]\n\n"),
            ["data: c\n\n", "data: [DONE]\n\n"]
        );
        assert!(s.pending().is_empty());
    }

    #[test]
    fn byte_by_byte_gives_the_same_events() {
        let text = "data: {\"a\":\"x\\n\"}\n\ndata: [DONE]\n\n";
        let mut s = SseSplitter::default();
        let events: Vec<String> = text
            .as_bytes()
            .chunks(1)
            .flat_map(|c| push(&mut s, std::str::from_utf8(c).unwrap_or_default()))
            .collect();
        assert_eq!(events, ["data: {\"a\":\"x\\n\"}\n\n", "data: [DONE]\n\n"]);
    }
}
