//! The journal's files: segments named by a growing index, prepared ahead of use, and read back
//! in order after a crash. Nothing here keeps state; the writer decides when each is called.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::record::{Ended, Progress, Record, Started};

/// A request started and not yet ended, with its last progress.
pub(super) type OpenRequest = (Started, Option<Progress>);

/// The unit of a segment's writes: the page cache's page, a whole number of file system blocks.
const PAGE: usize = 4096;

pub(super) fn segment_path(dir: &Path, index: u64) -> PathBuf {
    dir.join(format!("journal-{index:010}.jsonl"))
}

fn prepared_path(dir: &Path, index: u64) -> PathBuf {
    dir.join(format!("journal-{index:010}.prep"))
}

/// The segments in `dir`, oldest first.
pub(super) fn segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let index = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("journal-"))
            .and_then(|n| n.strip_suffix(".jsonl"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(index) = index {
            found.push((index, path));
        }
    }
    found.sort();
    Ok(found)
}

/// Removes segments a previous process began preparing and never adopted.
pub(super) fn remove_unadopted(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "prep") {
            fs::remove_file(path)?;
        }
    }
    Ok(())
}

/// Reads the segments in order: every ended event, once, and the requests still open at the end
/// (a start with no end after it in any segment), in the order they started.
pub(super) fn replay(paths: &[(u64, PathBuf)]) -> io::Result<(Vec<Ended>, Vec<OpenRequest>)> {
    let mut ended: Vec<Ended> = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut open: HashMap<String, OpenRequest> = HashMap::new();
    let mut order: Vec<String> = Vec::new();
    for (_, path) in paths {
        let bytes = fs::read(path)?;
        // A segment is zero-filled ahead of its records: its data ends at the first zero byte.
        let bytes = &bytes[..memchr::memchr(0, &bytes).unwrap_or(bytes.len())];
        for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            match Record::decode(line) {
                Some(Record::Start(started)) => {
                    if !seen.contains_key(&started.event_id)
                        && !open.contains_key(&started.event_id)
                    {
                        order.push(started.event_id.clone());
                        open.insert(started.event_id.clone(), (started, None));
                    }
                }
                Some(Record::Progress { event_id, progress }) => {
                    if let Some(entry) = open.get_mut(&event_id) {
                        entry.1 = Some(progress);
                    }
                }
                Some(Record::Discard { event_id }) => {
                    open.remove(&event_id);
                }
                Some(Record::End(end)) => {
                    open.remove(&end.event.event_id);
                    if !seen.contains_key(&end.event.event_id) {
                        seen.insert(end.event.event_id.clone(), ended.len());
                        ended.push(end);
                    }
                }
                None => {
                    tracing::warn!(path = %path.display(), "skipped an incomplete journal line")
                }
            }
        }
    }
    let still_open = order
        .into_iter()
        .filter_map(|id| open.remove(&id))
        .collect();
    Ok((ended, still_open))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The segment `index`, zero-filled to `bytes` rounded up to a page, synced, then given its name
/// (the directory synced too). Records overwrite blocks the file already has, so a sync flushes
/// data alone, where a write that grew the file would make every sync commit the file system's
/// own journal as well. A segment of zeros holds no record: recovery reads it as empty.
pub(super) fn prepare(dir: &Path, index: u64, bytes: u64) -> io::Result<File> {
    let temp = prepared_path(dir, index);
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&temp)?;
    // A page at a time: the page cache keeps the segment in pages of that size, where a write
    // of a megabyte would leave it in large folios, and a small record written into a large
    // folio costs a walk over all its blocks (ext4 on Linux 6.x: 2 µs more a record).
    let zeros = [0u8; PAGE];
    let mut left = bytes.next_multiple_of(PAGE as u64);
    while left > 0 {
        let n = usize::try_from(left.min(PAGE as u64)).unwrap_or(PAGE);
        file.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    file.sync_all()?;
    fs::rename(&temp, segment_path(dir, index))?;
    sync_dir(dir)?;
    Ok(file)
}

/// Appends records to a prepared segment a whole page at a time: each write starts at the page
/// where the last record ended and runs to the end of the page where the new one ends, its own
/// bytes preceded by the ones already there and followed by zeros, the segment's contents in both.
/// A write that covers part of a page makes the kernel read the page from disk first when the page
/// cache has dropped it (a segment is zero-filled long before its pages are written, and a page
/// cache under pressure drops clean pages), and that read would be done by the thread appending,
/// a request's: with whole pages it never reads.
#[derive(Debug)]
pub(super) struct Appender {
    /// Bytes in the segment.
    written: u64,
    /// The segment's bytes from the start of the page holding `written` up to it.
    tail: Vec<u8>,
    /// What one write sends, kept for its capacity.
    scratch: Vec<u8>,
}

impl Appender {
    /// An appender for a segment that holds nothing yet.
    pub(super) fn new() -> Self {
        Self {
            written: 0,
            tail: Vec::with_capacity(PAGE),
            scratch: Vec::with_capacity(2 * PAGE),
        }
    }

    /// Bytes in the segment.
    pub(super) fn written(&self) -> u64 {
        self.written
    }

    /// Writes `bytes` after what the segment holds. On an error the segment's length is unchanged
    /// (the bytes may be partly written past it: zeros read as the end, or a torn last line,
    /// which replay skips).
    pub(super) fn append(&mut self, file: &File, bytes: &[u8]) -> io::Result<()> {
        let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        let tail = u64::try_from(self.tail.len()).unwrap_or(u64::MAX);
        let start = self.written - tail;
        self.scratch.clear();
        self.scratch.extend_from_slice(&self.tail);
        self.scratch.extend_from_slice(bytes);
        let end = self.scratch.len();
        self.scratch.resize(end.next_multiple_of(PAGE), 0);
        file.write_all_at(&self.scratch, start)?;
        self.tail.clear();
        self.tail
            .extend_from_slice(&self.scratch[end - end % PAGE..end]);
        self.written = self.written.saturating_add(len);
        Ok(())
    }
}
