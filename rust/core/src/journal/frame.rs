//! The journal's records on disk: each a frame, `len` (u32, little-endian: the payload's bytes, at
//! least one) then `crc` (u32, little-endian) then the payload, a kind byte and the record's
//! fields. Integers are LEB128 varints, strings a varint length and UTF-8 bytes, enums one byte
//! each. An end record is about 200 bytes, where its JSON line was 500: the page cache, the disk
//! and the segments carry a request's record in fewer pages.
//!
//! A segment begins with its head: `MAGIC` and its index (u64, little-endian). A frame's `crc` is
//! the CRC-32 of its payload begun from the segment's salt (`salt`, from the index), so a frame
//! reads as whole only in the segment it was written for: a segment file used again for a later
//! index (`segments::prepare`) still holds the frames of its earlier use after the new ones, and
//! none of them reads as a record of the new segment. An append ends with eight zeros, where the
//! next frame's header goes: the end of what was written. The frame at the end of what a crashed
//! process wrote may be cut short, or, where the process died in the middle of the copy, hold
//! some of its bytes and not others: its length or its CRC tells, and reading stops there.
//! Segments of earlier builds are read too: frames after `MAGIC_V2`, with the CRC of the payload
//! alone and zeros to their end, and JSON lines (`Record::decode`).

use std::sync::Arc;

use super::record::{Ended, Line, Progress, Record, Started};
use crate::request::Endpoint;
use crate::usage::{Status, UsageEvent, UsageSource};

/// The first bytes of a segment of this build's frames, followed by its index.
pub(super) const MAGIC: &[u8; 8] = b"TGJRNL3\n";
/// The first bytes of a segment of an earlier build's frames (CRCs of the payload alone).
pub(super) const MAGIC_V2: &[u8; 8] = b"TGJRNL2\n";
/// A segment's head: `MAGIC` and the segment's index.
pub(super) const HEAD: usize = 16;

/// Bytes before a frame's payload: its length and its CRC. An append's bytes end with this many
/// zeros (`END_MARK`).
pub(super) const HEADER: usize = 8;
/// What follows the last frame written: a frame header of zeros.
pub(super) const END_MARK: [u8; HEADER] = [0; HEADER];

/// The head of segment `index`.
pub(super) fn head(index: u64) -> [u8; HEAD] {
    let mut head = [0; HEAD];
    head[..MAGIC.len()].copy_from_slice(MAGIC);
    head[MAGIC.len()..].copy_from_slice(&index.to_le_bytes());
    head
}

/// The value the CRCs of segment `index`'s frames begin from: distinct for every index below
/// 2^32, so for every segment a journal directory holds at once and every one it used before.
pub(super) fn salt(index: u64) -> u32 {
    // The index's two halves folded: the low one alone for any index below 2^32.
    (index ^ (index >> 32)) as u32
}

/// Fills in the CRC of each frame in `frames` (as `Line::encode` left them), for a segment whose
/// frames begin from `salt`.
pub(super) fn seal(frames: &mut [u8], salt: u32) {
    let mut at = 0;
    while let Some(header) = frames.get(at..at + HEADER) {
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let Some(end) = usize::try_from(len)
            .ok()
            .and_then(|len| (at + HEADER).checked_add(len))
            .filter(|&end| end <= frames.len())
        else {
            return;
        };
        let crc = crc(&frames[at + HEADER..end], salt);
        frames[at + 4..at + HEADER].copy_from_slice(&crc.to_le_bytes());
        at = end;
    }
}

fn crc(payload: &[u8], salt: u32) -> u32 {
    let mut hasher = crc32fast::Hasher::new_with_initial(salt);
    hasher.update(payload);
    hasher.finalize()
}

const START: u8 = 1;
const PROGRESS: u8 = 2;
const END: u8 = 3;

/// Flags of a start or end record.
const SAME_REQUEST_ID: u8 = 1;
const STREAM: u8 = 2;
const WORKER: u8 = 4;

impl Line<'_> {
    /// Appends the record's frame to `out`, its CRC left for the segment it goes to (`seal`).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let at = out.len();
        out.extend_from_slice(&[0; HEADER]);
        match self {
            Line::Start(started) => start(out, started),
            Line::Progress { event_id, progress } => progress_payload(out, event_id, progress),
            Line::End(ended) => end(out, ended),
        }
        // A record's strings are bounded by the request limits, far below 4 GiB.
        let len = u32::try_from(out.len() - at - HEADER).unwrap_or(u32::MAX);
        out[at..at + 4].copy_from_slice(&len.to_le_bytes());
    }
}

fn start(out: &mut Vec<u8>, s: &Started) {
    let same = s.request_id == s.event_id;
    out.push(START);
    out.push(flag(same, SAME_REQUEST_ID) | flag(s.stream, STREAM));
    string(out, &s.event_id);
    if !same {
        string(out, &s.request_id);
    }
    string(out, &s.tenant_id);
    string(out, &s.key_id);
    string(out, &s.model);
    out.push(endpoint_code(s.endpoint));
    varint(out, s.started_at_ms);
}

fn progress_payload(out: &mut Vec<u8>, event_id: &str, p: &Progress) {
    out.push(PROGRESS);
    string(out, event_id);
    varint(out, p.prompt_tokens);
    varint(out, p.completion_tokens);
    varint(out, p.cached_tokens);
    varint(out, p.at_ms);
}

fn end(out: &mut Vec<u8>, ended: &Ended) {
    let e = &ended.event;
    let same = e.request_id == e.event_id;
    out.push(END);
    out.push(
        flag(same, SAME_REQUEST_ID) | flag(e.stream, STREAM) | flag(e.worker.is_some(), WORKER),
    );
    varint(out, ended.seq);
    string(out, &e.event_id);
    if !same {
        string(out, &e.request_id);
    }
    string(out, &e.tenant_id);
    string(out, &e.key_id);
    string(out, &e.model);
    if let Some(worker) = &e.worker {
        string(out, worker);
    }
    out.push(endpoint_code(e.endpoint));
    out.push(status_code(e.status));
    out.push(source_code(e.usage_source));
    varint(out, u64::from(e.http_status));
    varint(out, e.prompt_tokens);
    varint(out, e.cached_tokens);
    varint(out, e.completion_tokens);
    varint(out, e.started_at_ms);
    varint(out, e.finished_at_ms);
}

fn flag(set: bool, bit: u8) -> u8 {
    if set { bit } else { 0 }
}

fn varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        // The low seven bits, with the high bit saying more follow.
        out.push((n & 0x7f) as u8 | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn string(out: &mut Vec<u8>, s: &str) {
    varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn endpoint_code(endpoint: Endpoint) -> u8 {
    match endpoint {
        Endpoint::ChatCompletions => 0,
        Endpoint::Completions => 1,
        Endpoint::Embeddings => 2,
    }
}

fn status_code(status: Status) -> u8 {
    match status {
        Status::Completed => 0,
        Status::Cancelled => 1,
        Status::Failed => 2,
        Status::Interrupted => 3,
    }
}

fn source_code(source: UsageSource) -> u8 {
    match source {
        UsageSource::Worker => 0,
        UsageSource::Gateway => 1,
        UsageSource::None => 2,
    }
}

/// What reading a segment's frames found.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Read {
    pub(super) records: Vec<Record>,
    /// Whole frames whose payload is no record this build knows.
    pub(super) unreadable: usize,
    /// Reading stopped at a frame cut short or not as written (a crash mid-write).
    pub(super) torn: bool,
}

/// The records of `data`, the bytes of a segment after its head, whose frames' CRCs begin from
/// `salt`.
pub(super) fn read(mut data: &[u8], salt: u32) -> Read {
    let mut read = Read::default();
    while data.len() >= HEADER {
        let len = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let crc = u32::from_le_bytes([data[4], data[5], data[6], data[7]]);
        if len == 0 && crc == 0 {
            // The end mark after the last frame.
            return read;
        }
        let payload = usize::try_from(len)
            .ok()
            .and_then(|len| data.get(HEADER..HEADER.checked_add(len)?));
        match payload {
            Some(payload) if len > 0 && self::crc(payload, salt) == crc => {
                match decode(payload) {
                    Some(record) => read.records.push(record),
                    None => read.unreadable += 1,
                }
                data = &data[HEADER + payload.len()..];
            }
            _ => {
                read.torn = true;
                return read;
            }
        }
    }
    read.torn = data.iter().any(|&b| b != 0);
    read
}

/// A payload's fields, read in order; `None` past the end or on a value out of range.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn varint(&mut self) -> Option<u64> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            let bits = u64::from(b & 0x7f);
            // The tenth byte may carry only the top bit of a u64.
            if shift == 63 && bits > 1 {
                return None;
            }
            n |= bits << shift;
            if b & 0x80 == 0 {
                return Some(n);
            }
        }
        None
    }

    fn str(&mut self) -> Option<&'a str> {
        let len = usize::try_from(self.varint()?).ok()?;
        if len > self.0.len() {
            return None;
        }
        let (s, rest) = self.0.split_at(len);
        self.0 = rest;
        std::str::from_utf8(s).ok()
    }

    fn endpoint(&mut self) -> Option<Endpoint> {
        match self.byte()? {
            0 => Some(Endpoint::ChatCompletions),
            1 => Some(Endpoint::Completions),
            2 => Some(Endpoint::Embeddings),
            _ => None,
        }
    }

    fn status(&mut self) -> Option<Status> {
        match self.byte()? {
            0 => Some(Status::Completed),
            1 => Some(Status::Cancelled),
            2 => Some(Status::Failed),
            3 => Some(Status::Interrupted),
            _ => None,
        }
    }

    fn source(&mut self) -> Option<UsageSource> {
        match self.byte()? {
            0 => Some(UsageSource::Worker),
            1 => Some(UsageSource::Gateway),
            2 => Some(UsageSource::None),
            _ => None,
        }
    }

    /// The request id: the event id's own, or a string of its own.
    fn request_id(&mut self, flags: u8, event_id: &str) -> Option<String> {
        if flags & SAME_REQUEST_ID != 0 {
            Some(event_id.to_owned())
        } else {
            self.str().map(str::to_owned)
        }
    }
}

fn decode(payload: &[u8]) -> Option<Record> {
    let mut f = Fields(payload);
    let record = match f.byte()? {
        START => {
            let flags = f.byte()?;
            let event_id = f.str()?;
            Record::Start(Started {
                request_id: f.request_id(flags, event_id)?,
                event_id: event_id.to_owned(),
                tenant_id: Arc::from(f.str()?),
                key_id: Arc::from(f.str()?),
                model: f.str()?.to_owned(),
                endpoint: f.endpoint()?,
                stream: flags & STREAM != 0,
                started_at_ms: f.varint()?,
            })
        }
        PROGRESS => Record::Progress {
            event_id: f.str()?.to_owned(),
            progress: Progress {
                prompt_tokens: f.varint()?,
                completion_tokens: f.varint()?,
                cached_tokens: f.varint()?,
                at_ms: f.varint()?,
            },
        },
        END => {
            let flags = f.byte()?;
            let seq = f.varint()?;
            let event_id = f.str()?;
            let event = UsageEvent {
                request_id: f.request_id(flags, event_id)?,
                event_id: event_id.to_owned(),
                tenant_id: Arc::from(f.str()?),
                key_id: Arc::from(f.str()?),
                model: f.str()?.to_owned(),
                worker: if flags & WORKER != 0 {
                    Some(Arc::from(f.str()?))
                } else {
                    None
                },
                stream: flags & STREAM != 0,
                endpoint: f.endpoint()?,
                status: f.status()?,
                usage_source: f.source()?,
                http_status: u16::try_from(f.varint()?).ok()?,
                prompt_tokens: f.varint()?,
                cached_tokens: f.varint()?,
                completion_tokens: f.varint()?,
                started_at_ms: f.varint()?,
                finished_at_ms: f.varint()?,
            };
            Record::End(Ended { seq, event })
        }
        _ => return None,
    };
    // Every byte of a payload is its record's.
    f.0.is_empty().then_some(record)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9-]{0,40}",
            "[\"\\\\\\x00-\\x1f\\x7f é漢😀a-z]{0,24}",
            any::<String>(),
        ]
    }

    fn event() -> impl Strategy<Value = UsageEvent> {
        let endpoint = prop_oneof![
            Just(Endpoint::ChatCompletions),
            Just(Endpoint::Completions),
            Just(Endpoint::Embeddings)
        ];
        let status = prop_oneof![
            Just(Status::Completed),
            Just(Status::Cancelled),
            Just(Status::Failed),
            Just(Status::Interrupted)
        ];
        let source = prop_oneof![
            Just(UsageSource::Worker),
            Just(UsageSource::Gateway),
            Just(UsageSource::None)
        ];
        (
            (text(), proptest::option::of(text()), text(), text(), text()),
            proptest::option::of(text()),
            (endpoint, any::<bool>(), status, any::<u16>(), source),
            (
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
            ),
        )
            .prop_map(
                |(
                    (event_id, request_id, tenant_id, key_id, model),
                    worker,
                    (endpoint, stream, status, http_status, usage_source),
                    (prompt_tokens, cached_tokens, completion_tokens, started, finished),
                )| UsageEvent {
                    // The client's id, or (most often) the event's own.
                    request_id: request_id.unwrap_or_else(|| event_id.clone()),
                    event_id,
                    tenant_id: Arc::from(tenant_id),
                    key_id: Arc::from(key_id),
                    model,
                    worker: worker.map(Arc::from),
                    endpoint,
                    stream,
                    status,
                    http_status,
                    prompt_tokens,
                    cached_tokens,
                    completion_tokens,
                    usage_source,
                    started_at_ms: started,
                    finished_at_ms: finished,
                },
            )
    }

    /// The salt of the segment the tests' frames are written for.
    const SALT: u32 = 0x5eed_0007;

    /// A start, a progress and an end of `event`, as written (for a segment salted `SALT`) and
    /// as they read back.
    fn records(event: UsageEvent, seq: u64, p: (u64, u64, u64, u64)) -> (Vec<u8>, Vec<Record>) {
        let ended = Ended { seq, event };
        let started = Started::of(&ended.event);
        let progress = Progress {
            prompt_tokens: p.0,
            completion_tokens: p.1,
            cached_tokens: p.2,
            at_ms: p.3,
        };
        let event_id = started.event_id.as_str();
        let mut bytes = Vec::new();
        Line::Start(&started).encode(&mut bytes);
        Line::Progress {
            event_id,
            progress: &progress,
        }
        .encode(&mut bytes);
        Line::End(&ended).encode(&mut bytes);
        seal(&mut bytes, SALT);
        let records = vec![
            Record::Start(started.clone()),
            Record::Progress {
                event_id: event_id.to_owned(),
                progress,
            },
            Record::End(ended.clone()),
        ];
        (bytes, records)
    }

    proptest! {
        #[test]
        fn every_record_reads_back_as_written(
            event in event(),
            seq in any::<u64>(),
            p in (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()),
        ) {
            let (mut bytes, records) = records(event, seq, p);
            bytes.extend_from_slice(&[0; 64]);
            let read_back = read(&bytes, SALT);
            prop_assert_eq!(read_back.records, records);
            prop_assert!(!read_back.torn);
            prop_assert_eq!(read_back.unreadable, 0);
            // Read as another segment's, the first frame is not whole: no record is.
            let other = read(&bytes, SALT ^ 1);
            prop_assert!(other.records.is_empty() && other.torn);
        }

        /// A process killed mid-copy leaves a prefix of a frame, or (a copy need not run in
        /// order) some of its bytes and zeros where the others go: either reads as torn, and
        /// the records before it are all there.
        #[test]
        fn a_frame_written_in_part_is_torn_and_the_frames_before_it_stand(
            event in event(),
            cut in any::<prop::sample::Index>(),
            holes in prop::collection::vec(any::<prop::sample::Index>(), 1..8),
        ) {
            let (whole, records) = records(event, 7, (1, 2, 3, 4));
            let mut last = Vec::new();
            if let Record::End(ended) = &records[2] {
                Line::End(&Ended { seq: 8, event: ended.event.clone() }).encode(&mut last);
            }
            seal(&mut last, SALT);
            // Cut short.
            let n = cut.index(last.len());
            let mut bytes = [&whole[..], &last[..n]].concat();
            bytes.extend_from_slice(&[0; 16]);
            let read_cut = read(&bytes, SALT);
            prop_assert_eq!(&read_cut.records, &records);
            prop_assert_eq!(read_cut.torn, n > 0);
            // Holes: bytes of the frame left zero.
            let mut holed = last.clone();
            for hole in &holes {
                holed[hole.index(last.len())] = 0;
            }
            let bytes = [&whole[..], &holed[..], &[0; 16]].concat();
            let read_holed = read(&bytes, SALT);
            prop_assert_eq!(&read_holed.records[..3], &records[..]);
            if holed != last {
                prop_assert_eq!(read_holed.records.len(), 3);
            }
        }
    }

    #[test]
    fn an_end_record_is_less_than_half_its_json_line() {
        let event = UsageEvent {
            // A chat completion as the gateway records one: ids minted by it (UUIDv7), the
            // worker's address, counts in the thousands.
            event_id: "019a7f3c-11d2-7e01-9c4b-5d2e8f7a1b60".into(),
            request_id: "019a7f3c-11d2-7e01-9c4b-5d2e8f7a1b60".into(),
            tenant_id: "ten_7f3c11d2".into(),
            key_id: "key_9c4b5d2e8f7a".into(),
            model: "Qwen/Qwen2.5-7B-Instruct".into(),
            worker: Some("http://10.0.7.42:8000".into()),
            endpoint: Endpoint::ChatCompletions,
            stream: false,
            status: Status::Completed,
            http_status: 200,
            prompt_tokens: 2_048,
            cached_tokens: 1_024,
            completion_tokens: 512,
            usage_source: UsageSource::Worker,
            started_at_ms: 1_764_900_000_000,
            finished_at_ms: 1_764_900_000_350,
        };
        let ended = Ended {
            seq: 1 << 20,
            event,
        };
        let mut frame = Vec::new();
        Line::End(&ended).encode(&mut frame);
        let mut json = Vec::new();
        Record::End(ended).encode_json(&mut json);
        assert!(
            2 * frame.len() < json.len(),
            "{} against {}",
            frame.len(),
            json.len()
        );
    }

    #[test]
    fn a_length_past_the_data_or_a_bad_crc_is_torn_and_zeros_are_the_end() {
        assert_eq!(read(&[0; 40], SALT), Read::default());
        assert_eq!(read(&[], SALT), Read::default());
        let torn = |bytes: &[u8]| read(bytes, SALT).torn;
        // A length of 1 GiB with nothing after it.
        assert!(torn(&[0, 0, 0, 64, 1, 2, 3, 4, 9]));
        // A payload whose CRC is not the one written.
        assert!(torn(&[1, 0, 0, 0, 0, 0, 0, 0, START, 0, 0]));
        // A length of zero with a CRC: no frame has an empty payload.
        assert!(torn(&[0, 0, 0, 0, 1, 0, 0, 0]));
        // Fewer bytes than a header, not all zeros.
        assert!(torn(&[3, 0, 0]));
        // A whole frame this build cannot read: skipped, and reading goes on.
        let mut bytes = Vec::new();
        for payload in [&[9u8, 1, 2][..], &[PROGRESS, 1, b'a', 1, 2, 3, 4]] {
            bytes.extend_from_slice(&u32::try_from(payload.len()).unwrap_or(0).to_le_bytes());
            bytes.extend_from_slice(&crc(payload, SALT).to_le_bytes());
            bytes.extend_from_slice(payload);
        }
        let read = read(&bytes, SALT);
        assert_eq!(
            (read.unreadable, read.records.len(), read.torn),
            (1, 1, false)
        );
    }
}
