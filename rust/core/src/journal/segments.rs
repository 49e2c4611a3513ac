//! The journal's files: segments named by a growing index, prepared ahead of use, and read back
//! in order after a crash. Nothing here keeps state; the writer decides when each is called.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::record::{Ended, Progress, Record, Started};

/// A request started and not yet ended, with its last progress.
pub(super) type OpenRequest = (Started, Option<Progress>);

/// The size of the writes that zero-fill a segment.
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

/// The segment `index`, zero-filled to `bytes`, synced, then given its name (the directory
/// synced too). Records overwrite blocks the file already has, so a sync flushes data alone,
/// where a write that grew the file would make every sync commit the file system's own journal
/// as well. A segment of zeros holds no record: recovery reads it as empty.
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
    let mut left = bytes;
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
