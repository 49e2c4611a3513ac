//! The journal's files: segments named by a growing index, prepared ahead of use, and read back
//! in order after a crash; and spares, segments the ledger has caught up with, kept to be used
//! again for a later index. Nothing here keeps state; the writer decides when each is called.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::{Advice, MmapMut, MmapOptions, UncheckedAdvice};

use super::frame::{self, END_MARK, Format, HEAD, MAGIC, MAGIC_V2, MAGIC_V3, Read};
use super::record::{Ended, Progress, Record, Started};

/// A request started and not yet ended, with its last progress.
pub(super) type OpenRequest = (Started, Option<Progress>);

/// The page cache's page: a segment is a whole number of them.
const PAGE: usize = 4096;
/// The most a sync maps ahead for writing (`Segment::map_ahead`): 64 pages, what a tick at
/// 10 ms holds of records at about 500,000 requests a second.
const AHEAD: u64 = 64 * PAGE as u64;

pub(super) fn segment_path(dir: &Path, index: u64) -> PathBuf {
    dir.join(format!("journal-{index:010}.seg"))
}

fn prepared_path(dir: &Path, index: u64) -> PathBuf {
    dir.join(format!("journal-{index:010}.prep"))
}

fn spare_path(dir: &Path, index: u64) -> PathBuf {
    dir.join(format!("journal-{index:010}.spare"))
}

/// How many spares a journal keeps: the next segment's preparation takes one while the ledger
/// catches up with the segment sealed last, which becomes the next.
pub(super) const SPARES: usize = 2;

/// The spares in `dir`, oldest first.
fn spares(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|entry| Some(entry.ok()?.path()))
        .filter(|path| path.extension().is_some_and(|e| e == "spare"))
        .collect();
    found.sort();
    Ok(found)
}

/// Retires segment `index`, whose events the ledger holds: kept as a spare while fewer than
/// `SPARES` are and it has the size a segment of `bytes` is prepared with (it grows past it only
/// to hold a record larger than the rest of it), deleted otherwise. One already gone is retired.
pub(super) fn retire(dir: &Path, index: u64, bytes: u64) -> io::Result<()> {
    let path = segment_path(dir, index);
    let len = match fs::metadata(&path) {
        Ok(metadata) => metadata.len(),
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
    };
    let whole = len == bytes.next_multiple_of(PAGE as u64);
    if whole && spares(dir)?.len() < SPARES {
        // Not synced: a crash that undoes the rename leaves a segment the ledger holds, whose
        // events recovery records again and the ledger ignores.
        fs::rename(&path, spare_path(dir, index))
    } else {
        fs::remove_file(&path)
    }
}

/// The segments in `dir`, oldest first: this build's, and the JSON-lines segments (`.jsonl`) of
/// earlier builds, which it reads and which a new segment's index follows.
pub(super) fn segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let index = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("journal-"))
            .and_then(|n| n.strip_suffix(".seg").or_else(|| n.strip_suffix(".jsonl")))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(index) = index {
            found.push((index, path));
        }
    }
    found.sort();
    Ok(found)
}

/// Removes segments a previous process began preparing and never adopted, and its spares: a
/// spare's earlier frames read as nothing only in a segment of another index than theirs, and a
/// new process's indexes follow those of the segments it finds, not of the spares.
pub(super) fn remove_unadopted(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path
            .extension()
            .is_some_and(|e| e == "prep" || e == "spare")
        {
            fs::remove_file(path)?;
        }
    }
    Ok(())
}

/// Reads the segments in order: every ended event, once, and the requests still open at the end
/// (a start with no end after it in any segment), in the order they started.
pub(super) fn replay(paths: &[(u64, PathBuf)]) -> io::Result<(Vec<Ended>, Vec<OpenRequest>)> {
    let mut ended: Vec<Ended> = Vec::new();
    let mut seen: HashMap<Arc<str>, usize> = HashMap::new();
    let mut open: HashMap<Arc<str>, OpenRequest> = HashMap::new();
    let mut order: Vec<Arc<str>> = Vec::new();
    for (_, path) in paths {
        let read = records(&fs::read(path)?);
        if read.torn {
            tracing::warn!(path = %path.display(), "a journal record was cut short (a crash mid-write); read up to it");
        }
        if read.unreadable > 0 {
            tracing::warn!(path = %path.display(), skipped = read.unreadable, "skipped journal records this build cannot read");
        }
        for record in read.records {
            match record {
                Record::Start(started) => {
                    if !seen.contains_key(&started.event_id)
                        && !open.contains_key(&started.event_id)
                    {
                        order.push(started.event_id.clone());
                        open.insert(started.event_id.clone(), (started, None));
                    }
                }
                Record::Progress { event_id, progress } => {
                    if let Some(entry) = open.get_mut(&event_id) {
                        entry.1 = Some(progress);
                    }
                }
                Record::Discard { event_id } => {
                    open.remove(&event_id);
                }
                Record::End(end) => {
                    open.remove(&end.event.event_id);
                    if !seen.contains_key(&end.event.event_id) {
                        seen.insert(end.event.event_id.clone(), ended.len());
                        ended.push(end);
                    }
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

/// Every record in the journal `dir`, its segments in order, as `Journal::open` would read them
/// (without taking the directory's lock: the gateway may be running); how many segments ended in
/// a record cut short, and how many records this build cannot read.
pub fn read_dir(dir: &Path) -> io::Result<(Vec<Record>, usize, usize)> {
    let mut records = Vec::new();
    let (mut torn, mut unreadable) = (0, 0);
    for (_, path) in segments(dir)? {
        let read = self::records(&fs::read(path)?);
        records.extend(read.records);
        torn += usize::from(read.torn);
        unreadable += read.unreadable;
    }
    Ok((records, torn, unreadable))
}

/// The records of a segment's bytes: frames after its head (this build's, or an earlier build's
/// after `MAGIC_V3`, every string written out), or those of an earlier build's segment (after
/// `MAGIC_V2`, CRCs of their payload alone), or the JSON lines of a segment an earlier build
/// wrote, up to its first zero byte (a line that is no whole record is skipped: only the last can
/// be one).
pub(super) fn records(bytes: &[u8]) -> Read {
    let salted = [(MAGIC, Format::Named), (MAGIC_V3, Format::Spelled)];
    for (magic, format) in salted {
        if let Some(rest) = bytes.strip_prefix(magic.as_slice()) {
            let Some((index, frames)) = rest.split_first_chunk::<8>() else {
                return Read {
                    torn: true,
                    ..Read::default()
                };
            };
            return frame::read(frames, frame::salt(u64::from_le_bytes(*index)), format);
        }
    }
    if let Some(frames) = bytes.strip_prefix(MAGIC_V2.as_slice()) {
        return frame::read(frames, 0, Format::Spelled);
    }
    let bytes = &bytes[..memchr::memchr(0, bytes).unwrap_or(bytes.len())];
    let mut read = Read::default();
    for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        match Record::decode(line) {
            Some(record) => read.records.push(record),
            None => read.unreadable += 1,
        }
    }
    read
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The segment `index`, `bytes` rounded up to a page: its head (`frame::head`) and an end mark
/// written, synced, given its name (the directory synced too), then mapped. It is a spare used
/// again when there is one: its earlier frames stay after the end mark, and the salt of the new
/// index (`frame::salt`) keeps any of them from reading as a record of this one. Otherwise a new
/// file of zeros. Either way records overwrite blocks the file already has, so a sync flushes
/// data alone, where a write that grew the file would make every sync commit the file system's
/// own journal as well; a spare spares the zeros' writing, their writeback and the file's deletion.
/// A segment with nothing after its head holds no record: recovery reads it as empty.
pub(super) fn prepare(dir: &Path, index: u64, bytes: u64) -> io::Result<Segment> {
    let temp = prepared_path(dir, index);
    let bytes = bytes.next_multiple_of(PAGE as u64);
    let mut head = [0u8; HEAD + END_MARK.len()];
    head[..HEAD].copy_from_slice(&frame::head(index));
    let file = match take_spare(dir, &temp, bytes)? {
        Some(file) => {
            file.write_all_at(&head, 0)?;
            file.sync_data()?;
            file
        }
        None => zeros(&temp, &head, bytes)?,
    };
    fs::rename(&temp, segment_path(dir, index))?;
    sync_dir(dir)?;
    let map = map(&file)?;
    Ok(Segment {
        file: Arc::new(file),
        map,
        salt: frame::salt(index),
        written: HEAD as u64,
        released: 0,
        taken: HEAD as u64,
    })
}

/// The oldest spare of `bytes`, renamed `temp`; spares of another size (`segment_bytes` changed)
/// are deleted.
fn take_spare(dir: &Path, temp: &Path, bytes: u64) -> io::Result<Option<File>> {
    for spare in spares(dir)? {
        if fs::rename(&spare, temp).is_err() {
            continue;
        }
        let file = OpenOptions::new().read(true).write(true).open(temp)?;
        if file.metadata()?.len() == bytes {
            return Ok(Some(file));
        }
        fs::remove_file(temp)?;
    }
    Ok(None)
}

/// A new file `temp` of `bytes` zeros but for `head`, synced.
fn zeros(temp: &Path, head: &[u8], bytes: u64) -> io::Result<File> {
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(temp)?;
    // A page at a time: the page cache keeps the segment in pages of that size, where a write
    // of a megabyte would leave it in large folios, and a record written into a large folio
    // dirties all of it, for the next sync to write whole.
    let mut page = [0u8; PAGE];
    page[..head.len()].copy_from_slice(head);
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left.min(PAGE as u64)).unwrap_or(PAGE);
        file.write_all(&page[..n])?;
        page[..head.len()].fill(0);
        left -= n as u64;
    }
    file.sync_all()?;
    Ok(file)
}

/// `file` mapped shared, its pages faulted in: they are the page cache's own, so a byte copied
/// into the mapping is in the file for every reader and survives the process, as a written one
/// does, and the page cache does not drop a page a process maps when asked to (`fadvise`), as it
/// drops one it merely caches. A page the page cache no longer held (a spare's, under memory
/// pressure) is read back alone, not by readahead, which would read it into a large folio: a
/// record written into one dirties all of it, for the next sync to write whole.
#[expect(
    unsafe_code,
    reason = "a mapping is memory another process could change or cut short under us"
)]
fn map(file: &File) -> io::Result<MmapMut> {
    // SAFETY: the mapping is sound while no one else writes the file or shortens it. The file
    // is a segment of a journal directory that `Journal::open`'s lock keeps to one process;
    // in it, a segment is written only through this mapping and `Segment::append`, and never
    // truncated (deleted at most, which leaves a mapping whole).
    let map = unsafe { MmapOptions::new().map_mut(file) }?;
    map.advise(Advice::Random)?;
    if map.advise(Advice::PopulateRead).is_err() {
        // Before Linux 5.14: a read of each page faults it in.
        for page in map.chunks(PAGE) {
            std::hint::black_box(page[0]);
        }
    }
    Ok(map)
}

/// Drops `len` bytes of `map` from `offset` (pages, whole) from the process's page tables.
#[expect(
    unsafe_code,
    reason = "`MADV_DONTNEED` would zero the pages of a private or anonymous mapping"
)]
fn unmap_pages(map: &MmapMut, offset: usize, len: usize) -> io::Result<()> {
    // SAFETY: `map` is a shared mapping of a file (`map` above), for which `MADV_DONTNEED`
    // drops page table entries alone: the pages stay in the page cache with their bytes (a page
    // written through the mapping is marked dirty as its entry goes, so a sync still writes it),
    // and an access to the range would map them again as they are. `Segment::release_written`
    // passes whole pages behind every append to come, and no reference into them is held.
    unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, offset, len) }
}

/// A prepared segment, mapped. An append copies the record into the mapping: it reaches the
/// page cache with no system call and no more bytes than its own, and a request's thread never
/// waits on the disk to read a page back, because the segment's pages are mapped from the start.
#[derive(Debug)]
pub(super) struct Segment {
    file: Arc<File>,
    map: MmapMut,
    /// What its frames' CRCs begin from (`frame::salt`).
    salt: u32,
    /// Bytes in the segment.
    written: u64,
    /// Bytes from the start whose pages are no longer mapped (`release_written`).
    released: u64,
    /// Bytes in the segment when it was last taken to be synced (`release_written`).
    taken: u64,
}

impl Segment {
    /// The file, to sync.
    pub(super) fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// Where the mapping begins, to find it in `/proc/self/smaps`.
    #[cfg(test)]
    pub(super) fn mapped_at(&self) -> usize {
        self.map.as_ptr() as usize
    }

    /// Bytes in the segment, its head included.
    pub(super) fn written(&self) -> u64 {
        self.written
    }

    /// Whether it holds no record.
    pub(super) fn is_empty(&self) -> bool {
        self.written <= HEAD as u64
    }

    /// Unmaps the whole pages before the one the next append begins in: no append touches them
    /// again. A sync writes back a page the process maps by write-protecting it first, a TLB
    /// flush on every core that runs one of the process's threads (an interrupt to each, one a
    /// page); pages unmapped together take one flush. So the syncer releases what was written
    /// since its last round before syncing it. An error leaves them mapped: a cost, not a fault.
    pub(super) fn release_written(&mut self) -> io::Result<()> {
        self.taken = self.written;
        let end = self.written - self.written % PAGE as u64;
        if end <= self.released {
            return Ok(());
        }
        let (Ok(offset), Ok(end_in_map)) = (usize::try_from(self.released), usize::try_from(end))
        else {
            return Ok(());
        };
        let end_in_map = end_in_map.min(self.map.len());
        if end_in_map > offset {
            unmap_pages(&self.map, offset, end_in_map - offset)?;
        }
        self.released = end;
        Ok(())
    }

    /// Bytes appended since the segment was last taken to be synced (`release_written`).
    pub(super) fn written_since_taken(&self) -> u64 {
        self.written.saturating_sub(self.taken)
    }

    /// Maps for writing the pages from the one the next append begins in through `bytes` past
    /// it (at most `AHEAD`). A sync write-protects each page it writes back, and the first
    /// write into such a page faults, as does the first into a page mapped for reading: in the
    /// request's thread, each a page fault and the file's times updated (`page_mkwrite`), under
    /// the journal's lock. The syncer calls this after each sync, with what the last interval
    /// wrote, so that those faults are its own, taken in one call. A page mapped so is dirty:
    /// the next sync writes it back even if no append reached it, one page more at most when
    /// the rate holds. An error (before Linux 5.14: no `MADV_POPULATE_WRITE`) leaves the
    /// faults to the appends: a cost, not a fault.
    pub(super) fn map_ahead(&self, bytes: u64) -> io::Result<()> {
        let page = PAGE as u64;
        let from = self.written - self.written % page;
        let to = self
            .written
            .saturating_add(bytes.min(AHEAD))
            .saturating_add(1)
            .checked_next_multiple_of(page)
            .unwrap_or(u64::MAX);
        let (Ok(from), Ok(to)) = (usize::try_from(from), usize::try_from(to)) else {
            return Ok(());
        };
        let to = to.min(self.map.len());
        if to <= from {
            return Ok(());
        }
        self.map
            .advise_range(Advice::PopulateWrite, from, to - from)
    }

    /// Writes `frames` (`Line::encode`'s) after what the segment holds, their CRCs those of
    /// this segment (`frame::seal`).
    pub(super) fn append_frames(&mut self, frames: &mut [u8]) -> io::Result<()> {
        frame::seal(frames, self.salt);
        self.append(frames)
    }

    /// Writes `bytes` after what the segment holds, and the end mark after them first: a process
    /// that dies in the middle leaves the mark that was before them, or a frame cut short. What
    /// does not fit in the mapping (a record larger than a segment, or the requests carried into
    /// a new one) is written past its end, growing the file. On an error the segment's length is
    /// unchanged (the bytes may be partly written past it: a torn last frame, which replay stops
    /// at).
    pub(super) fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        let end = self.written.saturating_add(len);
        let (Ok(start), Ok(end_in_map)) = (usize::try_from(self.written), usize::try_from(end))
        else {
            return Err(io::Error::other("a journal segment past the address space"));
        };
        if end_in_map <= self.map.len() {
            // As much of the mark as the mapping holds: past it the file ends.
            let mark = end_in_map..(end_in_map + END_MARK.len()).min(self.map.len());
            self.map[mark.clone()].copy_from_slice(&END_MARK[..mark.len()]);
            self.map[start..end_in_map].copy_from_slice(bytes);
        } else {
            self.file.write_all_at(bytes, self.written)?;
        }
        self.written = end;
        Ok(())
    }
}
