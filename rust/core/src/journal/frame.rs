//! The journal's records on disk: each a frame, `len` (u32, little-endian: the payload's bytes, at
//! least one) then `crc` (u32, little-endian) then the payload, a kind byte and the record's
//! fields. Integers are LEB128 varints, strings a varint length and UTF-8 bytes, enums one byte
//! each. A segment's names (its records' tenants, keys, models and workers) are written once
//! each, in a `NAME` frame of their own, and referred to by their place among the segment's
//! names after that (`Names`); an event id the gateway minted (a UUID, lowercase and hyphenated)
//! is written as its 16 bytes; an end's finish as the milliseconds after its start. An end
//! record is about 50 bytes, where its JSON line was 500: the page cache, the disk and the
//! segments carry a request's record in fewer pages, and a request's thread waits on fewer new
//! cache lines as it copies it.
//!
//! A segment begins with its head: `MAGIC` and its index (u64, little-endian). A frame's `crc` is
//! the CRC-32 of its payload begun from the segment's salt (`salt`, from the index), so a frame
//! reads as whole only in the segment it was written for: a segment file used again for a later
//! index (`segments::prepare`) still holds the frames of its earlier use after the new ones, and
//! none of them reads as a record of the new segment. An append ends with eight zeros, where the
//! next frame's header goes: the end of what was written. The frame at the end of what a crashed
//! process wrote may be cut short, or, where the process died in the middle of the copy, hold
//! some of its bytes and not others: its length or its CRC tells, and reading stops there. So a
//! whole frame comes after every `NAME` it refers to.
//! Segments of earlier builds are read too: frames after `MAGIC_V3` (every string written out),
//! frames after `MAGIC_V2` (the same, with the CRC of the payload alone and zeros to their end),
//! and JSON lines (`Record::decode`).

use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::Arc;

use indexmap::IndexSet;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::record::{Ended, Line, Progress, Record, Started};
use crate::request::Endpoint;
use crate::usage::{Status, UsageEvent, UsageSource};

/// The first bytes of a segment of this build's frames, followed by its index.
pub(super) const MAGIC: &[u8; 8] = b"TGJRNL4\n";
/// The first bytes of a segment of an earlier build's salted frames, every string written out.
pub(super) const MAGIC_V3: &[u8; 8] = b"TGJRNL3\n";
/// The first bytes of a segment of an earlier build's frames (CRCs of the payload alone).
pub(super) const MAGIC_V2: &[u8; 8] = b"TGJRNL2\n";
/// A segment's head: `MAGIC` and the segment's index.
pub(super) const HEAD: usize = 16;

/// Bytes before a frame's payload: its length and its CRC. An append's bytes end with this many
/// zeros (`END_MARK`).
pub(super) const HEADER: usize = 8;
/// What follows the last frame written: a frame header of zeros.
pub(super) const END_MARK: [u8; HEADER] = [0; HEADER];

/// How a segment's payloads are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Format {
    /// This build's (`MAGIC`): names, event ids and finishes as the module's documentation says.
    Named,
    /// Earlier builds' (`MAGIC_V3`, `MAGIC_V2`): every string written out, times whole.
    Spelled,
}

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
/// One of the segment's names: the rest of the payload.
const NAME: u8 = 4;

/// Flags of a start, progress or end record.
const SAME_REQUEST_ID: u8 = 1;
const STREAM: u8 = 2;
const WORKER: u8 = 4;
/// The event id is a UUID written as its 16 bytes.
const EVENT_UUID: u8 = 8;

/// The names a segment has defined so far, each with its place among them. A name field is a
/// varint: 0 and the string written out, or 1 + the name's place. The table holds at most
/// `Names::MAX` names of at most `Names::MAX_LEN` bytes (a model is the client's to name); others
/// are written out.
#[derive(Debug, Default)]
pub struct Names {
    /// The names in the order the segment defined them: a name's index is its place.
    places: IndexSet<Box<str>, NameHash>,
    /// The name each field (`Field`) last referred to, and its place: a request's names are most
    /// often the previous request's, and most often the very same strings (a principal's tenant
    /// and key, a worker's URL), found by their address with no hash and no string read. The
    /// memo holds the name, so its address cannot be another's while it is here.
    last: [Option<(Arc<str>, usize)>; 4],
}

/// The fields that refer to names.
#[derive(Debug, Clone, Copy)]
enum Field {
    Tenant,
    Key,
    Model,
    Worker,
}

impl Names {
    const MAX: usize = 4096;
    const MAX_LEN: usize = 256;

    /// How many names the segment has defined.
    pub(super) fn len(&self) -> usize {
        self.places.len()
    }

    /// Forgets the names defined from place `len` on: those of frames that were never written.
    pub(super) fn truncate(&mut self, len: usize) {
        self.places.truncate(len);
        for last in &mut self.last {
            if last.as_ref().is_some_and(|&(_, place)| place >= len) {
                *last = None;
            }
        }
    }

    /// The field that refers to `name`, its `NAME` frame appended to `out` first if it is new.
    fn refer(&mut self, field: Field, name: &Arc<str>, out: &mut Vec<u8>) -> u64 {
        let last = &mut self.last[field as usize];
        if let Some((known, place)) = last
            && (Arc::ptr_eq(known, name) || **known == **name)
        {
            return *place as u64 + 1;
        }
        let place = match self.places.get_index_of(&**name) {
            Some(place) => place,
            None if name.len() > Self::MAX_LEN || self.places.len() >= Self::MAX => return 0,
            None => {
                frame(out, |out| {
                    out.push(NAME);
                    out.extend_from_slice(name.as_bytes());
                });
                self.places.insert_full((**name).into()).0
            }
        };
        *last = Some((Arc::clone(name), place));
        place as u64 + 1
    }
}

/// Hashes a name in one pass of `xxh3_64`, from a seed drawn for each table (a model's name is
/// the client's to choose).
#[derive(Debug, Clone, Copy)]
struct NameHash(u64);

impl Default for NameHash {
    fn default() -> Self {
        Self(RandomState::new().hash_one(0u8))
    }
}

impl BuildHasher for NameHash {
    type Hasher = NameHasher;

    fn build_hasher(&self) -> NameHasher {
        NameHasher(self.0)
    }
}

struct NameHasher(u64);

impl Hasher for NameHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0 = xxh3_64_with_seed(bytes, self.0);
    }

    /// The end mark `str`'s `Hash` writes after the bytes: mixed in without another pass.
    fn write_u8(&mut self, byte: u8) {
        self.0 = self.0.rotate_left(8) ^ u64::from(byte);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

impl Line<'_> {
    /// Appends the record's frame to `out`, after a `NAME` frame for each of its names that
    /// `names` (the segment's) does not hold yet; its CRCs are left for the segment the frames go
    /// to (`seal`).
    pub fn encode(&self, out: &mut Vec<u8>, names: &mut Names) {
        match self {
            Line::Start(started) => {
                let refs = [
                    names.refer(Field::Tenant, &started.tenant_id, out),
                    names.refer(Field::Key, &started.key_id, out),
                    names.refer(Field::Model, &started.model, out),
                ];
                frame(out, |out| start(out, started, refs));
            }
            Line::Progress { event_id, progress } => {
                frame(out, |out| progress_payload(out, event_id, progress));
            }
            Line::End(ended) => {
                let e = &ended.event;
                let refs = [
                    names.refer(Field::Tenant, &e.tenant_id, out),
                    names.refer(Field::Key, &e.key_id, out),
                    names.refer(Field::Model, &e.model, out),
                    e.worker
                        .as_ref()
                        .map_or(0, |w| names.refer(Field::Worker, w, out)),
                ];
                frame(out, |out| end(out, ended, refs));
            }
        }
    }
}

/// Appends a frame of the payload `payload` writes, its CRC left zero.
fn frame(out: &mut Vec<u8>, payload: impl FnOnce(&mut Vec<u8>)) {
    let at = out.len();
    out.extend_from_slice(&[0; HEADER]);
    payload(out);
    // A record's strings are bounded by the request limits, far below 4 GiB.
    let len = u32::try_from(out.len() - at - HEADER).unwrap_or(u32::MAX);
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
}

fn start(out: &mut Vec<u8>, s: &Started, [tenant, key, model]: [u64; 3]) {
    let same = s.request_id == s.event_id;
    let uuid = uuid_bytes(&s.event_id);
    out.push(START);
    out.push(
        flag(same, SAME_REQUEST_ID) | flag(s.stream, STREAM) | flag(uuid.is_some(), EVENT_UUID),
    );
    event_id(out, &s.event_id, uuid);
    if !same {
        string(out, &s.request_id);
    }
    name(out, tenant, &s.tenant_id);
    name(out, key, &s.key_id);
    name(out, model, &s.model);
    out.push(endpoint_code(s.endpoint));
    varint(out, s.started_at_ms);
}

fn progress_payload(out: &mut Vec<u8>, id: &str, p: &Progress) {
    let uuid = uuid_bytes(id);
    out.push(PROGRESS);
    out.push(flag(uuid.is_some(), EVENT_UUID));
    event_id(out, id, uuid);
    varint(out, p.prompt_tokens);
    varint(out, p.completion_tokens);
    varint(out, p.cached_tokens);
    varint(out, p.at_ms);
}

fn end(out: &mut Vec<u8>, ended: &Ended, [tenant, key, model, worker]: [u64; 4]) {
    let e = &ended.event;
    let same = e.request_id == e.event_id;
    let uuid = uuid_bytes(&e.event_id);
    out.push(END);
    out.push(
        flag(same, SAME_REQUEST_ID)
            | flag(e.stream, STREAM)
            | flag(e.worker.is_some(), WORKER)
            | flag(uuid.is_some(), EVENT_UUID),
    );
    varint(out, ended.seq);
    event_id(out, &e.event_id, uuid);
    if !same {
        string(out, &e.request_id);
    }
    name(out, tenant, &e.tenant_id);
    name(out, key, &e.key_id);
    name(out, model, &e.model);
    if let Some(w) = &e.worker {
        name(out, worker, w);
    }
    out.push(endpoint_code(e.endpoint));
    out.push(status_code(e.status));
    out.push(source_code(e.usage_source));
    varint(out, u64::from(e.http_status));
    varint(out, e.prompt_tokens);
    varint(out, e.cached_tokens);
    varint(out, e.completion_tokens);
    varint(out, e.started_at_ms);
    // Wrapping: a finish before the start (a clock stepped back) still reads back as written.
    varint(out, e.finished_at_ms.wrapping_sub(e.started_at_ms));
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

/// A name field: its reference (`Names::refer`), and the name written out after a 0.
fn name(out: &mut Vec<u8>, reference: u64, s: &str) {
    varint(out, reference);
    if reference == 0 {
        string(out, s);
    }
}

fn event_id(out: &mut Vec<u8>, id: &str, uuid: Option<[u8; 16]>) {
    match uuid {
        Some(bytes) => out.extend_from_slice(&bytes),
        None => string(out, id),
    }
}

/// The 16 bytes of `id` if it is a UUID as the gateway writes one (lowercase, hyphenated), so
/// that it reads back as the same string; `None` for any other id. Without a branch or a table
/// per digit (the invalid ones are caught together at the end): every end record's id goes
/// through it on the request's thread, whose caches the rest of the request has just filled.
fn uuid_bytes(id: &str) -> Option<[u8; 16]> {
    /// Where each byte's two digits begin, past the hyphens.
    const DIGITS: [usize; 16] = [0, 2, 4, 6, 9, 11, 14, 16, 19, 21, 24, 26, 28, 30, 32, 34];
    let id: &[u8; 36] = id.as_bytes().try_into().ok()?;
    if [id[8], id[13], id[18], id[23]] != [b'-'; 4] {
        return None;
    }
    let mut bytes = [0u8; 16];
    let mut valid = true;
    for (byte, at) in bytes.iter_mut().zip(DIGITS) {
        let (high, high_valid) = hex(id[at]);
        let (low, low_valid) = hex(id[at + 1]);
        valid &= high_valid & low_valid;
        *byte = high << 4 | low;
    }
    valid.then_some(bytes)
}

/// A lowercase hex digit's value, and whether `digit` is one.
fn hex(digit: u8) -> (u8, bool) {
    let decimal = digit.wrapping_sub(b'0');
    let letter = digit.wrapping_sub(b'a');
    let is_decimal = decimal < 10;
    let value = if is_decimal {
        decimal
    } else {
        letter.wrapping_add(10)
    };
    (value & 0xf, is_decimal | (letter < 6))
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

/// The records of `data`, the bytes of a segment after its head, written in `format`, whose
/// frames' CRCs begin from `salt`.
pub(super) fn read(mut data: &[u8], salt: u32, format: Format) -> Read {
    let mut read = Read::default();
    // The segment's names so far; `None` for a `NAME` frame that is no name, whose records are
    // unreadable.
    let mut names: Vec<Option<Arc<str>>> = Vec::new();
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
                match payload.split_first() {
                    Some((&NAME, name)) if format == Format::Named => {
                        names.push(std::str::from_utf8(name).ok().map(Arc::from));
                    }
                    _ => match decode(payload, format, &names) {
                        Some(record) => read.records.push(record),
                        None => read.unreadable += 1,
                    },
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
struct Fields<'a> {
    bytes: &'a [u8],
    format: Format,
    names: &'a [Option<Arc<str>>],
}

impl<'a> Fields<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.bytes.split_first()?;
        self.bytes = rest;
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
        if len > self.bytes.len() {
            return None;
        }
        let (s, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        std::str::from_utf8(s).ok()
    }

    /// A name field: written out, or one of the segment's names.
    fn name(&mut self) -> Option<Arc<str>> {
        if self.format == Format::Spelled {
            return self.str().map(Arc::from);
        }
        match self.varint()? {
            0 => self.str().map(Arc::from),
            reference => {
                let place = usize::try_from(reference - 1).ok()?;
                self.names.get(place)?.clone()
            }
        }
    }

    fn event_id(&mut self, flags: u8) -> Option<Arc<str>> {
        if self.format == Format::Named && flags & EVENT_UUID != 0 {
            let (bytes, rest) = self.bytes.split_first_chunk::<16>()?;
            self.bytes = rest;
            let mut text = uuid::Uuid::encode_buffer();
            return Some(
                uuid::Uuid::from_bytes(*bytes)
                    .hyphenated()
                    .encode_lower(&mut text)
                    .into(),
            );
        }
        self.str().map(Arc::from)
    }

    /// A progress record's flags: none before `Format::Named`.
    fn progress_flags(&mut self) -> Option<u8> {
        match self.format {
            Format::Named => self.byte(),
            Format::Spelled => Some(0),
        }
    }

    /// An end's finish, after its start.
    fn finished(&mut self, started_at_ms: u64) -> Option<u64> {
        let n = self.varint()?;
        Some(match self.format {
            Format::Named => started_at_ms.wrapping_add(n),
            Format::Spelled => n,
        })
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
    fn request_id(&mut self, flags: u8, event_id: &Arc<str>) -> Option<Arc<str>> {
        if flags & SAME_REQUEST_ID != 0 {
            Some(event_id.clone())
        } else {
            self.str().map(Arc::from)
        }
    }
}

fn decode(payload: &[u8], format: Format, names: &[Option<Arc<str>>]) -> Option<Record> {
    let mut f = Fields {
        bytes: payload,
        format,
        names,
    };
    let record = match f.byte()? {
        START => {
            let flags = f.byte()?;
            let event_id = f.event_id(flags)?;
            Record::Start(Started {
                request_id: f.request_id(flags, &event_id)?,
                event_id,
                tenant_id: f.name()?,
                key_id: f.name()?,
                model: f.name()?,
                endpoint: f.endpoint()?,
                stream: flags & STREAM != 0,
                started_at_ms: f.varint()?,
            })
        }
        PROGRESS => {
            let flags = f.progress_flags()?;
            Record::Progress {
                event_id: f.event_id(flags)?,
                progress: Progress {
                    prompt_tokens: f.varint()?,
                    completion_tokens: f.varint()?,
                    cached_tokens: f.varint()?,
                    at_ms: f.varint()?,
                },
            }
        }
        END => {
            let flags = f.byte()?;
            let seq = f.varint()?;
            let event_id = f.event_id(flags)?;
            let request_id = f.request_id(flags, &event_id)?;
            let tenant_id = f.name()?;
            let key_id = f.name()?;
            let model = f.name()?;
            let worker = if flags & WORKER != 0 {
                Some(f.name()?)
            } else {
                None
            };
            let (endpoint, status, usage_source) = (f.endpoint()?, f.status()?, f.source()?);
            let http_status = u16::try_from(f.varint()?).ok()?;
            let (prompt_tokens, cached_tokens, completion_tokens) =
                (f.varint()?, f.varint()?, f.varint()?);
            let started_at_ms = f.varint()?;
            let event = UsageEvent {
                event_id,
                request_id,
                tenant_id,
                key_id,
                model,
                worker,
                stream: flags & STREAM != 0,
                endpoint,
                status,
                usage_source,
                http_status,
                prompt_tokens,
                cached_tokens,
                completion_tokens,
                started_at_ms,
                finished_at_ms: f.finished(started_at_ms)?,
            };
            Record::End(Ended { seq, event })
        }
        _ => return None,
    };
    // Every byte of a payload is its record's.
    f.bytes.is_empty().then_some(record)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9-]{0,40}",
            // Event ids as the gateway mints them, and UUIDs as it does not write them.
            "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
            "[0-9a-fA-F]{8}[-_][0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
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
                )| {
                    let event_id = Arc::<str>::from(event_id);
                    UsageEvent {
                        // The client's id, or (most often) the event's own.
                        request_id: request_id.map_or_else(|| Arc::clone(&event_id), Arc::from),
                        event_id,
                        tenant_id: Arc::from(tenant_id),
                        key_id: Arc::from(key_id),
                        model: Arc::from(model),
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
                    }
                },
            )
    }

    /// The salt of the segment the tests' frames are written for.
    const SALT: u32 = 0x5eed_0007;

    /// A start, a progress and an end of `event`, as written (for a segment salted `SALT`,
    /// whose names are then `names`) and as they read back.
    fn records(
        event: UsageEvent,
        seq: u64,
        p: (u64, u64, u64, u64),
        names: &mut Names,
    ) -> (Vec<u8>, Vec<Record>) {
        let ended = Ended { seq, event };
        let started = Started::of(&ended.event);
        let progress = Progress {
            prompt_tokens: p.0,
            completion_tokens: p.1,
            cached_tokens: p.2,
            at_ms: p.3,
        };
        let event_id = &*started.event_id;
        let mut bytes = Vec::new();
        Line::Start(&started).encode(&mut bytes, names);
        Line::Progress {
            event_id,
            progress: &progress,
        }
        .encode(&mut bytes, names);
        Line::End(&ended).encode(&mut bytes, names);
        seal(&mut bytes, SALT);
        let records = vec![
            Record::Start(started.clone()),
            Record::Progress {
                event_id: event_id.into(),
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
            let (mut bytes, records) = records(event, seq, p, &mut Names::default());
            bytes.extend_from_slice(&[0; 64]);
            let read_back = read(&bytes, SALT, Format::Named);
            prop_assert_eq!(read_back.records, records);
            prop_assert!(!read_back.torn);
            prop_assert_eq!(read_back.unreadable, 0);
            // Read as another segment's, the first frame is not whole: no record is.
            let other = read(&bytes, SALT ^ 1, Format::Named);
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
            let mut names = Names::default();
            let (whole, records) = records(event, 7, (1, 2, 3, 4), &mut names);
            let mut last = Vec::new();
            if let Record::End(ended) = &records[2] {
                let ended = Ended { seq: 8, event: ended.event.clone() };
                Line::End(&ended).encode(&mut last, &mut names);
            }
            seal(&mut last, SALT);
            // Cut short.
            let n = cut.index(last.len());
            let mut bytes = [&whole[..], &last[..n]].concat();
            bytes.extend_from_slice(&[0; 16]);
            let read_cut = read(&bytes, SALT, Format::Named);
            prop_assert_eq!(&read_cut.records, &records);
            prop_assert_eq!(read_cut.torn, n > 0);
            // Holes: bytes of the frame left zero.
            let mut holed = last.clone();
            for hole in &holes {
                holed[hole.index(last.len())] = 0;
            }
            let bytes = [&whole[..], &holed[..], &[0; 16]].concat();
            let read_holed = read(&bytes, SALT, Format::Named);
            prop_assert_eq!(&read_holed.records[..3], &records[..]);
            if holed != last {
                prop_assert_eq!(read_holed.records.len(), 3);
            }
        }
    }

    /// A chat completion as the gateway records one: ids minted by it (UUIDv7), the worker's
    /// address, counts in the thousands.
    fn chat_completion(seq: u64) -> Ended {
        let event = UsageEvent {
            event_id: format!("019a7f3c-11d2-7e01-9c4b-5d2e8f7a{seq:04x}").into(),
            request_id: format!("019a7f3c-11d2-7e01-9c4b-5d2e8f7a{seq:04x}").into(),
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
        Ended {
            seq: (1 << 20) + seq,
            event,
        }
    }

    #[test]
    fn an_end_record_is_a_ninth_of_its_json_line_once_its_segment_has_its_names() {
        let mut names = Names::default();
        let (mut first, mut second) = (Vec::new(), Vec::new());
        Line::End(&chat_completion(1)).encode(&mut first, &mut names);
        Line::End(&chat_completion(2)).encode(&mut second, &mut names);
        let mut json = Vec::new();
        Record::End(chat_completion(2)).encode_json(&mut json);
        // The first defines the four names; the second refers to them.
        assert_eq!(names.len(), 4);
        assert!(2 * first.len() < json.len(), "{}", first.len());
        assert!(
            9 * second.len() < json.len(),
            "{} against {}",
            second.len(),
            json.len()
        );
        let bytes = [&first[..], &second[..]].concat();
        let mut sealed = bytes.clone();
        seal(&mut sealed, SALT);
        let read = read(&sealed, SALT, Format::Named);
        assert_eq!(
            read.records,
            [
                Record::End(chat_completion(1)),
                Record::End(chat_completion(2))
            ]
        );
        // The events read back share their names.
        let tenants: Vec<&Arc<str>> = read
            .records
            .iter()
            .filter_map(|r| match r {
                Record::End(e) => Some(&e.event.tenant_id),
                _ => None,
            })
            .collect();
        assert!(Arc::ptr_eq(tenants[0], tenants[1]));
    }

    #[test]
    fn a_name_too_long_or_past_the_tables_bound_is_written_out_and_reads_back() {
        let (mut bytes, mut names) = (Vec::new(), Names::default());
        for i in 0..Names::MAX - 1 {
            names.refer(Field::Model, &format!("name-{i}").into(), &mut bytes);
        }
        let mut long = chat_completion(1);
        long.event.model = "m".repeat(Names::MAX_LEN + 1).into();
        // The model is written out; the tenant takes the table's last place, and the key and
        // the worker find it full.
        let defined = bytes.len();
        Line::End(&long).encode(&mut bytes, &mut names);
        assert_eq!(names.len(), Names::MAX);
        let mut again = Vec::new();
        Line::End(&long).encode(&mut again, &mut names);
        assert_eq!(
            defined + HEADER + 1 + "ten_7f3c11d2".len() + again.len(),
            bytes.len()
        );
        assert!(again.len() > Names::MAX_LEN + "key_9c4b5d2e8f7a".len());
        seal(&mut bytes, SALT);
        let read = read(&bytes, SALT, Format::Named);
        assert_eq!(read.records, [Record::End(long)]);
    }

    #[test]
    fn truncate_forgets_the_names_of_frames_never_written() {
        let name = |n: &str| -> Arc<str> { n.into() };
        let (a, b, c) = (name("a"), name("b"), name("c"));
        let mut names = Names::default();
        let mut out = Vec::new();
        let a_field = names.refer(Field::Tenant, &a, &mut out);
        let kept = names.len();
        names.refer(Field::Tenant, &b, &mut out);
        names.truncate(kept);
        assert_eq!(names.len(), 1);
        let written = out.len();
        assert_eq!(names.refer(Field::Key, &name("a"), &mut out), a_field);
        assert_eq!(out.len(), written, "a is still defined");
        // The tenant's last name is gone: found again by hashing, or defined anew.
        assert_eq!(
            names.refer(Field::Tenant, &c, &mut out),
            a_field + 1,
            "c takes b's place"
        );
        assert_eq!(names.refer(Field::Tenant, &a, &mut out), a_field);
        assert_eq!(names.refer(Field::Worker, &c, &mut out), a_field + 1);
        assert_eq!(out.len(), written + HEADER + 2);
    }

    #[test]
    fn a_field_whose_last_name_was_truncated_does_not_find_it_at_its_old_place() {
        let (b, c): (Arc<str>, Arc<str>) = ("b".into(), "c".into());
        let mut names = Names::default();
        let mut out = Vec::new();
        names.refer(Field::Tenant, &"a".into(), &mut out);
        // b's frame was never written: its place goes to c, named by another field.
        let b_field = names.refer(Field::Key, &b, &mut out);
        names.truncate(1);
        assert_eq!(names.refer(Field::Model, &c, &mut out), b_field);
        // The key is b again, the very same string: defined anew, not read as c.
        let written = out.len();
        assert_eq!(names.refer(Field::Key, &b, &mut out), b_field + 1);
        assert_eq!(out.len(), written + HEADER + 2, "b is defined again");
        // Found by its address from then on, and by its bytes as another string.
        assert_eq!(names.refer(Field::Key, &b, &mut out), b_field + 1);
        assert_eq!(names.refer(Field::Key, &"b".into(), &mut out), b_field + 1);
        assert_eq!(out.len(), written + HEADER + 2);
    }

    #[test]
    fn a_name_frame_that_is_no_name_leaves_the_records_referring_to_it_unreadable() {
        let (mut bytes, mut names) = (Vec::new(), Names::default());
        Line::End(&chat_completion(1)).encode(&mut bytes, &mut names);
        // The first frame is the tenant's name: one of its bytes made no UTF-8.
        assert_eq!(bytes[HEADER], NAME);
        bytes[HEADER + 1] = 0xff;
        seal(&mut bytes, SALT);
        let read = read(&bytes, SALT, Format::Named);
        assert_eq!(
            (read.records.len(), read.unreadable, read.torn),
            (0, 1, false)
        );
    }

    #[test]
    fn only_a_lowercase_hyphenated_uuid_is_written_as_its_bytes() {
        let minted = crate::usage::new_event_id(1_764_900_000_000).to_string();
        let bytes = uuid_bytes(&minted).unwrap_or_else(|| panic!("{minted}"));
        assert_eq!(
            uuid::Uuid::from_bytes(bytes).hyphenated().to_string(),
            minted
        );
        for other in [
            minted.to_uppercase(),
            minted.replace('-', ""),
            format!("{{{minted}}}"),
            minted.replacen('-', "_", 1),
            format!("{}g", &minted[..35]),
            minted[..35].to_owned(),
        ] {
            assert_eq!(uuid_bytes(&other), None, "{other}");
        }
    }

    #[test]
    fn every_byte_in_every_digit_is_read_as_the_uuid_crate_reads_it() {
        let minted = crate::usage::new_event_id(1_764_900_000_000).to_string();
        for at in (0..36).filter(|at| ![8, 13, 18, 23].contains(at)) {
            for byte in 0..=u8::MAX {
                let mut id = minted.clone().into_bytes();
                id[at] = byte;
                let Ok(id) = String::from_utf8(id) else {
                    continue;
                };
                // Canonical: the uuid crate parses it and writes it back the same.
                let canonical = uuid::Uuid::try_parse(&id)
                    .ok()
                    .filter(|u| u.hyphenated().to_string() == id);
                assert_eq!(
                    uuid_bytes(&id),
                    canonical.map(uuid::Uuid::into_bytes),
                    "{id:?}"
                );
            }
        }
    }

    #[test]
    fn a_length_past_the_data_or_a_bad_crc_is_torn_and_zeros_are_the_end() {
        let read = |bytes: &[u8]| read(bytes, SALT, Format::Named);
        assert_eq!(read(&[0; 40]), Read::default());
        assert_eq!(read(&[]), Read::default());
        let torn = |bytes: &[u8]| read(bytes).torn;
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
        for payload in [&[9u8, 1, 2][..], &[PROGRESS, 0, 1, b'a', 1, 2, 3, 4]] {
            bytes.extend_from_slice(&u32::try_from(payload.len()).unwrap_or(0).to_le_bytes());
            bytes.extend_from_slice(&crc(payload, SALT).to_le_bytes());
            bytes.extend_from_slice(payload);
        }
        let read = read(&bytes);
        assert_eq!(
            (read.unreadable, read.records.len(), read.torn),
            (1, 1, false)
        );
    }
}
