//! The journal against its files: what is written when, what recovery makes of it, rotation and
//! deletion, in both durabilities.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Duration;

use prometheus_client::metrics::histogram::Histogram;

use super::frame::{HEAD, MAGIC_V2, Names, Read, head, salt, seal};
use super::record::Record;
use super::segments::{
    SPARES, prepare, records as read_segment, replay, retire, segment_path, segments,
};
use super::*;
use crate::usage::UsageEvent;

/// A fresh directory under the system's temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        Self::under(&std::env::temp_dir(), name)
    }

    /// Beside the test binary, so on a disk (the system's temp dir may be in memory).
    fn on_disk(name: &str) -> Self {
        let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
        Self::under(exe.parent().unwrap_or(&exe), name)
    }

    fn under(parent: &std::path::Path, name: &str) -> Self {
        let dir = parent.join(format!(
            "tokengate-journal-{name}-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn started(id: &str) -> Started {
    Started {
        event_id: id.into(),
        request_id: id.into(),
        tenant_id: "t".into(),
        key_id: "k".into(),
        model: "m".into(),
        endpoint: crate::request::Endpoint::Completions,
        stream: true,
        started_at_ms: 1,
    }
}

/// The event of a request `id`, as it starts (`Journal::start`).
fn event(id: &str) -> UsageEvent {
    started(id).interrupted(None, 0).event
}

fn ended(id: &str, seq: u64) -> Ended {
    let mut ended = started(id).interrupted(None, seq);
    ended.event.status = crate::usage::Status::Completed;
    ended.event.completion_tokens = 5;
    ended
}

fn progress(completion: u64) -> Progress {
    Progress {
        prompt_tokens: 3,
        completion_tokens: completion,
        cached_tokens: 0,
        at_ms: 2,
    }
}

/// Waits until `done` holds, checking every millisecond; fails with `what` after 30 s.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A tick far away: nothing is written or synced by the syncer's clock during a test.
const NEVER: Duration = Duration::from_secs(3600);

fn open(dir: &TempDir, segment_bytes: u64, durability: Durability) -> (Journal, Recovered) {
    let options = Options {
        segment_bytes,
        durability,
        interval: NEVER,
    };
    Journal::open(&dir.0, options).unwrap_or_else(|e| panic!("open: {e}"))
}

/// A journal of 1 MiB segments whose syncer ticks every `interval`.
fn open_ticking(dir: &TempDir, durability: Durability, interval: Duration) -> Journal {
    let options = Options {
        segment_bytes: 1 << 20,
        durability,
        interval,
    };
    Journal::open(&dir.0, options)
        .unwrap_or_else(|e| panic!("open: {e}"))
        .0
}

/// Every record in the journal's segments, oldest first.
fn records(dir: &TempDir) -> Vec<Record> {
    let mut found = Vec::new();
    for (_, path) in segments(&dir.0).unwrap_or_default() {
        let read = read_segment(&fs::read(path).unwrap_or_default());
        assert!(!read.torn && read.unreadable == 0, "{read:?}");
        found.extend(read.records);
    }
    found
}

/// Where the whole frames of a segment's bytes end.
fn frames_end(bytes: &[u8]) -> usize {
    let mut at = HEAD;
    loop {
        let len = bytes
            .get(at..at + 4)
            .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        if len == 0 {
            return at;
        }
        at += 8 + len as usize;
    }
}

fn kinds(records: &[Record]) -> Vec<(&'static str, String)> {
    records
        .iter()
        .map(|record| match record {
            Record::Start(s) => ("start", s.event_id.to_string()),
            Record::Progress { event_id, .. } => ("progress", event_id.to_string()),
            Record::End(e) => ("end", e.event.event_id.to_string()),
            Record::Discard { event_id } => ("discard", event_id.to_string()),
        })
        .collect()
}

#[test]
fn an_end_is_in_the_segment_when_end_returns_and_nobody_waits_on_an_interval() {
    let dir = TempDir::new("interval");
    let (journal, recovered) = open(&dir, 1 << 20, Durability::Interval);
    assert!(recovered.events.is_empty());
    let a = journal.start(&event("a"));
    assert!(a.is_some());
    assert!(
        journal.end(&ended("a", 0), a, true).is_none(),
        "nothing to wait for"
    );
    // Written by `end` itself, before any tick: what a killed process leaves behind.
    assert_eq!(kinds(&records(&dir)), [("end", "a".to_owned())]);
}

#[test]
fn always_hands_out_a_receiver_that_resolves_once_synced() {
    let dir = TempDir::new("always");
    let (journal, _) = open(&dir, 1 << 20, Durability::Always);
    let synced = journal.end(&ended("a", 0), None, true);
    let synced = synced.unwrap_or_else(|| panic!("a receiver to wait on"));
    assert!(synced.blocking_recv().is_ok());
    assert!(
        journal.end(&ended("b", 1), None, false).is_none(),
        "asked not to wait"
    );
    assert_eq!(
        kinds(&records(&dir)),
        [("end", "a".to_owned()), ("end", "b".to_owned())]
    );
}

#[test]
fn a_request_that_ends_within_a_tick_costs_one_record_and_an_open_one_its_start() {
    let dir = TempDir::new("one-record");
    {
        let (journal, _) = open(&dir, 1 << 20, Durability::Interval);
        let quick = journal.start(&event("quick"));
        let long = journal.start(&event("long"));
        let long = long.unwrap_or_else(|| panic!("a slot"));
        journal.progress(&long, progress(4));
        journal.progress(&long, progress(7));
        journal.end(&ended("quick", 0), quick, false);
        // Closing writes what a tick would: the open request's start and its last progress.
    }
    let records = records(&dir);
    assert_eq!(
        kinds(&records),
        [
            ("end", "quick".to_owned()),
            ("start", "long".to_owned()),
            ("progress", "long".to_owned())
        ]
    );
    assert!(
        matches!(records[2], Record::Progress { progress, .. } if progress.completion_tokens == 7)
    );
}

#[test]
fn a_tick_writes_the_starts_of_requests_still_open() {
    let dir = TempDir::new("tick");
    let journal = open_ticking(&dir, Durability::Interval, Duration::from_millis(1));
    let _open = journal.start(&event("open"));
    wait_until("no tick wrote the start", || {
        !kinds(&records(&dir)).is_empty()
    });
    assert_eq!(kinds(&records(&dir)), [("start", "open".to_owned())]);
    drop(journal);
}

#[test]
fn reopening_records_ended_events_again_and_interrupts_open_requests() {
    for durability in [Durability::Interval, Durability::Always] {
        let dir = TempDir::new("recover");
        {
            let (journal, _) = open(&dir, 1 << 20, durability);
            let done = journal.start(&event("done"));
            let cut = journal.start(&event("cut"));
            let cut = cut.unwrap_or_else(|| panic!("a slot"));
            journal.progress(&cut, progress(4));
            journal.progress(&cut, progress(7));
            journal.end(&ended("done", 0), done, false);
        }
        // A crash can cut the last record short: half a frame where the zeros began.
        let found = segments(&dir.0).unwrap_or_default();
        let before = found.last().map_or(0, |(index, _)| *index);
        let live = found
            .iter()
            .map(|(_, path)| path)
            .find(|path| fs::read(path).is_ok_and(|b| !read_segment(&b).records.is_empty()))
            .unwrap_or_else(|| panic!("no segment holds records"));
        let end = frames_end(&fs::read(live).unwrap_or_default());
        let file = OpenOptions::new()
            .write(true)
            .open(live)
            .unwrap_or_else(|e| panic!("{e}"));
        // The end's frame alone, after the frames of the names it refers to.
        let (mut frame, mut names) = (Vec::new(), Names::default());
        Line::End(&ended("half", 9)).encode(&mut frame, &mut names);
        frame.clear();
        Line::End(&ended("half", 9)).encode(&mut frame, &mut names);
        file.write_all_at(&frame[..frame.len() / 2], end as u64)
            .unwrap_or_else(|e| panic!("{e}"));
        drop(file);

        let (journal, recovered) = open(&dir, 1 << 20, durability);
        let ids: Vec<(&str, &str, u64)> = recovered
            .events
            .iter()
            .map(|e| {
                (
                    &*e.event.event_id,
                    e.event.status.as_str(),
                    e.event.completion_tokens,
                )
            })
            .collect();
        assert_eq!(ids, [("done", "completed", 5), ("cut", "interrupted", 7)]);
        assert_eq!(recovered.next_seq, 2);
        assert!(
            segments(&dir.0)
                .unwrap_or_default()
                .iter()
                .all(|(index, _)| *index > before),
            "old segments deleted"
        );
        drop(journal);

        // Recovering again finds the same events, once each.
        let (_, again) = open(&dir, 1 << 20, durability);
        assert_eq!(again.events, recovered.events);
    }
}

#[test]
fn one_process_at_a_time() {
    let dir = TempDir::new("lock");
    let (_journal, _) = open(&dir, 1 << 20, Durability::Interval);
    let second = Journal::open(
        &dir.0,
        Options {
            segment_bytes: 1 << 20,
            durability: Durability::Interval,
            interval: NEVER,
        },
    );
    assert!(second.is_err_and(|e| e.to_string().contains("in use")));
}

#[test]
fn sealed_segments_go_once_committed_and_open_requests_are_carried_forward() {
    let dir = TempDir::new("rotate");
    {
        let (journal, _) = open(&dir, 4096, Durability::Always);
        let long = journal.start(&event("long"));
        let long = long.unwrap_or_else(|| panic!("a slot"));
        journal.progress(&long, progress(1));
        // A tick's work, forced: the long request's start is written before the others.
        journal.tick_now();
        for seq in 0..300 {
            let id = format!("event-{seq:04}-{}", "x".repeat(40));
            let slot = journal.start(&event(&id));
            let synced = journal.end(&ended(&id, seq), slot, true);
            assert!(synced.is_some_and(|s| s.blocking_recv().is_ok()));
        }
        // Sealed, whatever the preparation of the next has come to: 300 ends of about 80 bytes
        // fill five segments of 4 KiB.
        assert!(
            segments(&dir.0).unwrap_or_default().len() > 3,
            "segments rotated"
        );
        journal.committed(299);
        journal.progress(&long, progress(2));
        let synced = journal.end(&ended("marker", 300), None, true);
        assert!(synced.is_some_and(|s| s.blocking_recv().is_ok()));
        // The live segment and the next, prepared: every sealed one is in the ledger.
        wait_until("sealed segments kept", || {
            segments(&dir.0).unwrap_or_default().len() <= 2
        });
    }
    // The live segment's ended events come back (the ledger ignores ids it has), the sealed
    // ones do not, and the request open since the first segment is closed as interrupted.
    let (_, recovered) = open(&dir, 4096, Durability::Always);
    let (last, replayed) = recovered
        .events
        .split_last()
        .unwrap_or_else(|| panic!("empty"));
    assert_eq!(
        (
            &*last.event.event_id,
            last.event.status.as_str(),
            last.event.completion_tokens
        ),
        ("long", "interrupted", 2)
    );
    assert!(replayed.len() < 100, "{} replayed", replayed.len());
    assert!(
        replayed
            .iter()
            .all(|e| e.event.status == crate::usage::Status::Completed)
    );
    assert_eq!(recovered.next_seq, 302);
}

#[test]
fn replay_reads_segments_in_order_and_keeps_each_end_once_from_an_earlier_builds_json_lines_on() {
    let temp = TempDir::new("replay");
    let dir = &temp.0;
    fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{e}"));
    let mut first = Vec::new();
    Record::Start(started("a")).encode_json(&mut first);
    Record::Start(started("b")).encode_json(&mut first);
    Record::Start(started("c")).encode_json(&mut first);
    Record::End(started("a").interrupted(None, 0)).encode_json(&mut first);
    // The next in an earlier build's frames (CRCs of the payload alone, zeros after them):
    // those of `v3_fixture`, whose segment's salt is 0, the CRC of a payload alone.
    let fixture = include_bytes!("testdata/v3-segment.bin");
    let second = [&MAGIC_V2[..], &fixture[HEAD..], &[0; 64]].concat();
    // Then this build's: its head, its frames salted by its index, its end mark and, past it,
    // what the file held before (the frames of a segment it was before, unreadable as this one's).
    let (mut frames, mut names) = (Vec::new(), Names::default());
    Line::Start(&started("c")).encode(&mut frames, &mut names);
    Line::End(&started("b").interrupted(None, 1)).encode(&mut frames, &mut names);
    let mut stale = frames.clone();
    seal(&mut frames, salt(3));
    seal(&mut stale, salt(2));
    let third = [&head(3)[..], &frames, &[0; 8], &stale].concat();
    // Named as the builds named their segments.
    fs::write(dir.join("journal-0000000001.jsonl"), first).unwrap_or_else(|e| panic!("{e}"));
    fs::write(segment_path(dir, 2), second).unwrap_or_else(|e| panic!("{e}"));
    fs::write(segment_path(dir, 3), &third).unwrap_or_else(|e| panic!("{e}"));
    let read = read_segment(&third);
    assert_eq!((read.records.len(), read.torn), (2, false));
    let found = segments(dir).unwrap_or_default();
    let (ended, open) = replay(&found).unwrap_or_default();
    let ended: Vec<&str> = ended.iter().map(|e| &*e.event.event_id).collect();
    let (_, _, first, second) = v3_fixture();
    assert_eq!(
        ended,
        ["a", &first.event.event_id, &second.event.event_id, "b"]
    );
    let open: Vec<&str> = open.iter().map(|(s, _)| &*s.event_id).collect();
    assert_eq!(open, ["c"]);
}

/// Records of `sizes` bytes each (a line of one repeated letter, a newline at its end).
fn lines(sizes: &[usize]) -> Vec<Vec<u8>> {
    sizes
        .iter()
        .zip((b'a'..=b'z').cycle())
        .map(|(&size, letter)| {
            let mut line = vec![letter; size - 1];
            line.push(b'\n');
            line
        })
        .collect()
}

#[test]
fn appends_fill_a_segment_in_order_with_its_zeros_after_them_and_grow_it_only_past_its_mapping() {
    let dir = TempDir::new("appends");
    fs::create_dir_all(&dir.0).unwrap_or_else(|e| panic!("mkdir: {e}"));
    // Not a whole number of pages: the segment is rounded up to one.
    let mut segment = prepare(&dir.0, 0, 3 * 4096 + 100).unwrap_or_else(|e| panic!("prepare: {e}"));
    let read = || fs::read(segment_path(&dir.0, 0)).unwrap_or_else(|e| panic!("read: {e}"));
    // A segment begins with its format's mark.
    assert_eq!(read()[..HEAD], head(0));
    let mut expected = head(0).to_vec();
    let mut append = |segment: &mut super::segments::Segment, line: &[u8]| {
        segment
            .append(line)
            .unwrap_or_else(|e| panic!("append: {e}"));
        expected.extend_from_slice(line);
        assert_eq!(segment.written(), expected.len() as u64);
        expected.clone()
    };
    // Within a page, up to one's end exactly, across one, across two, then an empty append.
    let mut so_far = Vec::new();
    for line in lines(&[10, 4078, 300, 5000, 1, 4200])
        .iter()
        .chain([&Vec::new()])
    {
        so_far = append(&mut segment, line);
    }
    let bytes = read();
    assert_eq!(bytes.len(), 4 * 4096, "rounded up to pages, and not grown");
    assert_eq!(&bytes[..so_far.len()], &so_far[..]);
    assert!(bytes[so_far.len()..].iter().all(|&b| b == 0));
    // Past the mapping's end: written to the file, which grows by what did not fit.
    for line in &lines(&[4000, 20]) {
        so_far = append(&mut segment, line);
    }
    assert_eq!(read(), so_far, "grown to hold them, and only them");
}

/// Bytes this thread has caused to be read from storage (`/proc/thread-self/io`).
fn read_bytes() -> u64 {
    let io = fs::read_to_string("/proc/thread-self/io").unwrap_or_else(|e| panic!("io: {e}"));
    io.lines()
        .find_map(|line| line.strip_prefix("read_bytes: "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no read_bytes in {io}"))
}

#[test]
fn an_append_reads_nothing_from_disk_after_the_page_cache_was_told_to_drop_the_segment() {
    use rustix::fs::{Advice, fadvise};

    let dir = TempDir::on_disk("dropped");
    fs::create_dir_all(&dir.0).unwrap_or_else(|e| panic!("mkdir: {e}"));
    let drop_cache = |file: &fs::File| {
        file.sync_data().unwrap_or_else(|e| panic!("sync: {e}"));
        fadvise(file, 0, None, Advice::DontNeed).unwrap_or_else(|e| panic!("fadvise: {e}"));
    };
    let records = lines(&[200, 200, 200]);
    // The control: a plain file, written into part of a page the page cache dropped, is read
    // from disk first. Were it not so here, this test would prove nothing.
    let plain = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(dir.0.join("plain"))
        .unwrap_or_else(|e| panic!("open: {e}"));
    plain
        .write_all_at(&[0u8; 8 * 4096], 0)
        .unwrap_or_else(|e| panic!("write: {e}"));
    drop_cache(&plain);
    let before = read_bytes();
    plain
        .write_all_at(&records[0], 4 * 4096 + 10)
        .unwrap_or_else(|e| panic!("write: {e}"));
    assert!(
        read_bytes() > before,
        "a partial write into a dropped page reads it from disk"
    );
    let mut segment = prepare(&dir.0, 0, 8 * 4096).unwrap_or_else(|e| panic!("prepare: {e}"));
    segment
        .append(&records[1])
        .unwrap_or_else(|e| panic!("append: {e}"));
    drop_cache(segment.file());
    let before = read_bytes();
    for record in &records[1..] {
        segment
            .append(record)
            .unwrap_or_else(|e| panic!("append: {e}"));
    }
    assert_eq!(read_bytes(), before, "an append read from disk");
    let bytes = fs::read(segment_path(&dir.0, 0)).unwrap_or_else(|e| panic!("read: {e}"));
    let bytes = &bytes[HEAD..];
    assert_eq!(&bytes[..200], &records[1][..]);
    assert_eq!(
        &bytes[200..600],
        [&records[1][..], &records[2][..]].concat()
    );
}

/// The kB of the mapping that begins at `at` that the process has in its page tables
/// (`Rss` in `/proc/self/smaps`).
fn mapped_kb(at: usize) -> u64 {
    let smaps = fs::read_to_string("/proc/self/smaps").unwrap_or_else(|e| panic!("smaps: {e}"));
    let mut in_it = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or_default();
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(_)) = (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            )
        {
            in_it = start == at;
        } else if in_it && let Some(kb) = line.strip_prefix("Rss:") {
            let kb = kb.trim().trim_end_matches("kB").trim();
            return kb.parse().unwrap_or_else(|e| panic!("Rss {kb:?}: {e}"));
        }
    }
    panic!("no mapping at {at:#x}")
}

#[test]
fn the_pages_behind_the_appends_are_unmapped_and_a_sync_still_writes_them() {
    use rustix::fs::{Advice, fadvise};

    let dir = TempDir::on_disk("released");
    fs::create_dir_all(&dir.0).unwrap_or_else(|e| panic!("mkdir: {e}"));
    let mut segment = prepare(&dir.0, 0, 8 * 4096).unwrap_or_else(|e| panic!("prepare: {e}"));
    let at = segment.mapped_at();
    assert_eq!(mapped_kb(at), 32, "a prepared segment is mapped whole");
    let release = |segment: &mut super::segments::Segment| {
        segment
            .release_written()
            .unwrap_or_else(|e| panic!("release: {e}"));
    };
    let mut expected = head(0).to_vec();
    let records = lines(&[3000, 3000, 3000, 3300]);
    for record in &records[..3] {
        segment
            .append(record)
            .unwrap_or_else(|e| panic!("append: {e}"));
        expected.extend_from_slice(record);
    }
    release(&mut segment);
    assert_eq!(
        mapped_kb(at),
        32 - 8,
        "the two whole pages before 9,008 bytes are unmapped, the page they end in is not"
    );
    release(&mut segment);
    assert_eq!(mapped_kb(at), 24, "nothing more to release");
    segment
        .append(&records[3])
        .unwrap_or_else(|e| panic!("append: {e}"));
    expected.extend_from_slice(&records[3]);
    release(&mut segment);
    assert_eq!(mapped_kb(at), 20, "the third page, whole now, goes too");
    // Unmapped before any sync, the pages are still dirty: the sync writes them to the disk, so
    // once the page cache has dropped them, the disk gives the records back (had unmapping
    // lost them, it would give the zeros the segment was prepared with).
    segment
        .file()
        .sync_data()
        .unwrap_or_else(|e| panic!("sync: {e}"));
    fadvise(segment.file(), 0, None, Advice::DontNeed).unwrap_or_else(|e| panic!("fadvise: {e}"));
    let before = read_bytes();
    let bytes = fs::read(segment_path(&dir.0, 0)).unwrap_or_else(|e| panic!("read: {e}"));
    assert!(
        read_bytes() > before,
        "the released pages were read from disk"
    );
    assert_eq!(&bytes[..expected.len()], &expected[..]);
    assert!(bytes[expected.len()..].iter().all(|&b| b == 0));
}

/// The page faults this thread has taken that needed no disk (`getrusage`, `RUSAGE_THREAD`).
#[expect(unsafe_code, reason = "getrusage writes the struct it is handed")]
fn minor_faults() -> i64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `usage` is valid for a `rusage` to be written to; it was zeroed, so it is a
    // `rusage` whether or not the call wrote it, and the call's result is checked.
    let usage = unsafe {
        assert_eq!(libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr()), 0);
        usage.assume_init()
    };
    usage.ru_minflt
}

/// Syncs `segment` as the syncer does: what it took since the last sync, its written pages
/// unmapped, its file synced. Returns what it took.
fn sync_segment(segment: &mut super::segments::Segment) -> u64 {
    let grown = segment.written_since_taken();
    segment
        .release_written()
        .unwrap_or_else(|e| panic!("release: {e}"));
    segment
        .file()
        .sync_data()
        .unwrap_or_else(|e| panic!("sync: {e}"));
    grown
}

#[test]
fn the_pages_mapped_ahead_after_a_sync_take_the_next_appends_without_a_fault() {
    let dir = TempDir::on_disk("ahead");
    fs::create_dir_all(&dir.0).unwrap_or_else(|e| panic!("mkdir: {e}"));
    let mut segment = prepare(&dir.0, 0, 16 * 4096).unwrap_or_else(|e| panic!("prepare: {e}"));
    let append = |segment: &mut super::segments::Segment, line: &[u8]| {
        let before = minor_faults();
        segment
            .append(line)
            .unwrap_or_else(|e| panic!("append: {e}"));
        minor_faults() - before
    };
    let mut sizes = [1000; 12];
    sizes[11] = 2000;
    let records = lines(&sizes);
    append(&mut segment, &records[0]);
    assert_eq!(sync_segment(&mut segment), 1000);
    // The control: the sync write-protected the page it wrote back, and the next append into
    // it faults. Were it not so here, this test would prove nothing.
    assert!(append(&mut segment, &records[1]) > 0, "no fault to spare");
    assert_eq!(sync_segment(&mut segment), 1000);
    assert_eq!(segment.written_since_taken(), 0);
    // Mapped ahead by three pages' worth: the appends into the page the sync wrote back and
    // into the two after it take no fault.
    segment
        .map_ahead(3 * 4096)
        .unwrap_or_else(|e| panic!("map ahead: {e}"));
    for record in &records[2..10] {
        assert_eq!(append(&mut segment, record), 0, "at {}", segment.written());
    }
    assert_eq!(segment.written(), 16 + 10 * 1000);
    // Mapped ahead by nothing: the page the next append begins in, and no other.
    sync_segment(&mut segment);
    segment
        .map_ahead(0)
        .unwrap_or_else(|e| panic!("map ahead: {e}"));
    assert_eq!(append(&mut segment, &records[10]), 0, "within its page");
    assert_eq!(segment.written() / 4096, 2);
    assert!(
        append(&mut segment, &records[11]) > 0,
        "into the next page, not mapped for writing"
    );
    // Whatever was mapped ahead, what the appends wrote is what the file holds.
    sync_segment(&mut segment);
    let bytes = fs::read(segment_path(&dir.0, 0)).unwrap_or_else(|e| panic!("read: {e}"));
    let mut expected = head(0).to_vec();
    records.iter().for_each(|r| expected.extend_from_slice(r));
    assert_eq!(&bytes[..expected.len()], &expected[..]);
    assert!(bytes[expected.len()..].iter().all(|&b| b == 0));
}

/// The files of `dir` whose names end in `.{extension}`, sorted.
fn files_ending(dir: &TempDir, extension: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(&dir.0)
        .map(|entries| {
            entries
                .filter_map(|e| Some(e.ok()?.path()))
                .filter(|p| p.extension().is_some_and(|e| e == extension))
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

fn inode(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).map_or_else(|e| panic!("{}: {e}", path.display()), |m| m.ino())
}

#[test]
fn a_retired_segment_is_used_again_and_nothing_it_held_reads_as_the_new_one_s() {
    let dir = TempDir::new("spare");
    fs::create_dir_all(&dir.0).unwrap_or_else(|e| panic!("mkdir: {e}"));
    let bytes = 4 * 4096;
    let mut old = prepare(&dir.0, 0, bytes).unwrap_or_else(|e| panic!("prepare: {e}"));
    let frames = |ids: std::ops::Range<u64>| {
        let (mut frames, mut names) = (Vec::new(), Names::default());
        for seq in ids {
            Line::End(&ended(&format!("old{seq}"), seq)).encode(&mut frames, &mut names);
        }
        frames
    };
    let mut written = frames(0..60);
    old.append_frames(&mut written)
        .unwrap_or_else(|e| panic!("append: {e}"));
    drop(old);
    let path = segment_path(&dir.0, 0);
    let before = fs::read(&path).unwrap_or_else(|e| panic!("read: {e}"));
    let ino = inode(&path);
    retire(&dir.0, 0, bytes).unwrap_or_else(|e| panic!("retire: {e}"));
    assert!(!path.exists());
    assert_eq!(files_ending(&dir, "spare").len(), 1);

    // Segment 1 is the same file, its head and end mark rewritten and the rest as it was: not
    // written again with zeros.
    let mut new = prepare(&dir.0, 1, bytes).unwrap_or_else(|e| panic!("prepare: {e}"));
    let path = segment_path(&dir.0, 1);
    assert_eq!(inode(&path), ino);
    assert!(files_ending(&dir, "spare").is_empty());
    let after = fs::read(&path).unwrap_or_else(|e| panic!("read: {e}"));
    assert_eq!(after[..HEAD], head(1));
    assert_eq!(after[HEAD..HEAD + 8], [0; 8]);
    assert_eq!(after[HEAD + 8..], before[HEAD + 8..]);
    let read = read_segment(&after);
    assert_eq!((read.records.len(), read.torn), (0, false));
    // Had its end mark not reached the disk, the earlier frames would still read as nothing
    // of this segment's: their CRCs begin from segment 0's salt.
    let unmarked = [&after[..HEAD], &before[HEAD..]].concat();
    assert!(read_segment(&unmarked).records.is_empty());
    assert!(!read_segment(&before).records.is_empty());

    // What is appended reads back, and nothing after it.
    let mut one = Vec::new();
    Line::End(&ended("new", 60)).encode(&mut one, &mut Names::default());
    new.append_frames(&mut one)
        .unwrap_or_else(|e| panic!("append: {e}"));
    let read = read_segment(&fs::read(&path).unwrap_or_else(|e| panic!("read: {e}")));
    assert_eq!(kinds(&read.records), [("end", "new".to_owned())]);
    assert!(!read.torn);
    drop(new);

    // At most `SPARES` are kept; one of another size is not used, and goes.
    let more = 2..2 + SPARES as u64 + 1;
    for index in more.clone() {
        drop(prepare(&dir.0, index, bytes).unwrap_or_else(|e| panic!("prepare: {e}")));
    }
    for index in more {
        retire(&dir.0, index, bytes).unwrap_or_else(|e| panic!("retire: {e}"));
        assert!(!segment_path(&dir.0, index).exists());
    }
    assert_eq!(files_ending(&dir, "spare").len(), SPARES);
    drop(prepare(&dir.0, 10, 2 * bytes).unwrap_or_else(|e| panic!("prepare: {e}")));
    assert!(files_ending(&dir, "spare").is_empty());
    let size = fs::metadata(segment_path(&dir.0, 10)).map_or(0, |m| m.len());
    assert_eq!(size, 2 * bytes);
}

/// Of the `pages` pages mapped from `at`: how many are in the process's page tables, and how
/// many of those are part of a large folio (`/proc/self/pagemap`, `/proc/kpageflags`: bits 15
/// and 16, a compound page's head or tail). Page frame numbers read as zero without
/// `CAP_SYS_ADMIN`, which the test tooling has (it installs Debian's packages).
fn folios(at: usize, pages: usize) -> (usize, usize) {
    use std::io::{Read, Seek, SeekFrom};
    let open = |path: &str| fs::File::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let read_u64 = |file: &mut fs::File, index: u64| {
        let mut word = [0u8; 8];
        file.seek(SeekFrom::Start(index * 8))
            .and_then(|_| file.read_exact(&mut word))
            .unwrap_or_else(|e| panic!("{e}"));
        u64::from_le_bytes(word)
    };
    let (mut pagemap, mut flags) = (open("/proc/self/pagemap"), open("/proc/kpageflags"));
    let (mut present, mut large) = (0, 0);
    for page in 0..pages {
        let entry = read_u64(&mut pagemap, (at / 4096 + page) as u64);
        if entry >> 63 == 0 {
            continue;
        }
        present += 1;
        let frame = entry & ((1 << 55) - 1);
        assert_ne!(frame, 0, "page frame numbers need CAP_SYS_ADMIN");
        let page_flags = read_u64(&mut flags, frame);
        large += usize::from(page_flags & (0b11 << 15) != 0);
    }
    (present, large)
}

#[test]
fn a_spare_the_page_cache_dropped_is_mapped_again_in_single_pages() {
    use rustix::fs::{Advice, fadvise};

    let dir = TempDir::on_disk("evicted");
    fs::create_dir_all(&dir.0).unwrap_or_else(|e| panic!("mkdir: {e}"));
    // A segment's default size: readahead reads the first megabytes of a file in single pages.
    let bytes = 16 << 20;
    let pages = bytes / 4096;
    // The control: a file whose page cache was dropped, mapped and faulted in as a mapping
    // usually is, comes back in part in large folios (readahead's). Were it not so here, this
    // test would prove nothing.
    let plain = dir.0.join("plain");
    fs::write(&plain, vec![0u8; bytes]).unwrap_or_else(|e| panic!("write: {e}"));
    let plain = fs::File::open(&plain).unwrap_or_else(|e| panic!("open: {e}"));
    plain.sync_all().unwrap_or_else(|e| panic!("sync: {e}"));
    fadvise(&plain, 0, None, Advice::DontNeed).unwrap_or_else(|e| panic!("fadvise: {e}"));
    #[expect(unsafe_code, reason = "a test's own file, mapped read-only")]
    // SAFETY: nothing writes or shortens the file while it is mapped.
    let control = unsafe { memmap2::MmapOptions::new().populate().map(&plain) }
        .unwrap_or_else(|e| panic!("map: {e}"));
    let (present, large) = folios(control.as_ptr() as usize, pages);
    assert_eq!(present, pages);
    assert!(
        large > 0,
        "readahead read no large folio: this kernel has none to avoid"
    );
    drop(control);

    let segment = prepare(&dir.0, 0, bytes as u64).unwrap_or_else(|e| panic!("prepare: {e}"));
    drop(segment);
    retire(&dir.0, 0, bytes as u64).unwrap_or_else(|e| panic!("retire: {e}"));
    let spare = files_ending(&dir, "spare");
    let spare = fs::File::open(&spare[0]).unwrap_or_else(|e| panic!("open: {e}"));
    fadvise(&spare, 0, None, Advice::DontNeed).unwrap_or_else(|e| panic!("fadvise: {e}"));
    let segment = prepare(&dir.0, 1, bytes as u64).unwrap_or_else(|e| panic!("prepare: {e}"));
    assert!(files_ending(&dir, "spare").is_empty(), "the spare was used");
    assert_eq!(folios(segment.mapped_at(), pages), (pages, 0));
}

#[test]
fn segments_made_of_spares_recover_only_what_was_written_into_them() {
    let dir = TempDir::new("recycled");
    // Ends of about 80 bytes: 300 fill five segments of 4 KiB.
    let id = |prefix: &str, seq: u64| format!("{prefix}-{seq:04}-{}", "x".repeat(40));
    let record = |journal: &Journal, prefix: &str, seqs: std::ops::Range<u64>| {
        for seq in seqs {
            let id = id(prefix, seq);
            let slot = journal.start(&event(&id));
            let synced = journal.end(&ended(&id, seq), slot, true);
            assert!(synced.is_some_and(|s| s.blocking_recv().is_ok()));
        }
    };
    let spared;
    {
        let (journal, _) = open(&dir, 4096, Durability::Always);
        record(&journal, "old", 0..300);
        journal.committed(299);
        let marker = journal.end(&ended("marker", 300), None, true);
        assert!(marker.is_some_and(|s| s.blocking_recv().is_ok()));
        // Every sealed segment retired, and no preparation under way: only the next rotation's
        // takes a spare (one under way when the ledger caught up may have taken one).
        wait_until("sealed segments kept", || {
            segments(&dir.0).unwrap_or_default().len() <= 2 && files_ending(&dir, "prep").is_empty()
        });
        spared = files_ending(&dir, "spare")
            .iter()
            .map(|p| inode(p))
            .collect::<Vec<_>>();
        assert!(!spared.is_empty() && spared.len() <= SPARES, "{spared:?}");
        // Enough for the spares to become segments again, sealed with nothing retiring them:
        // each holds records of the first 300 after the new ones.
        record(&journal, "new", 301..600);
        wait_until("a preparation never ended", || {
            files_ending(&dir, "prep").is_empty()
        });
        let live: Vec<u64> = segments(&dir.0)
            .unwrap_or_default()
            .iter()
            .map(|(_, p)| inode(p))
            .collect();
        assert!(
            spared.iter().all(|ino| live.contains(ino)),
            "the spares were used again"
        );
    }
    // Every segment reads to its end mark (`records` asserts none is torn). Recovery gives back
    // the ends of the segment that was live when the ledger caught up (a run of the last of
    // the first 300, then the marker) and the 299 new ones, each once, in order: nothing of
    // what the spares held before.
    let _ = records(&dir);
    let (_, recovered) = open(&dir, 4096, Durability::Always);
    let ids: Vec<String> = recovered
        .events
        .iter()
        .map(|e| e.event.event_id.to_string())
        .collect();
    let marker = ids.iter().position(|id| id == "marker");
    let marker = marker.unwrap_or_else(|| panic!("no marker in {ids:?}"));
    let first = 300 - marker as u64;
    assert!(first > 0, "{ids:?}");
    let expected: Vec<String> = (first..300)
        .map(|seq| id("old", seq))
        .chain(std::iter::once("marker".to_owned()))
        .chain((301..600).map(|seq| id("new", seq)))
        .collect();
    assert_eq!(ids, expected);
    assert_eq!(recovered.next_seq, 600);
    assert!(
        files_ending(&dir, "spare").is_empty(),
        "a new process begins without spares"
    );
}

#[test]
fn a_slot_serves_the_next_request_once_its_own_has_ended_and_holds_its_start_whole() {
    use super::state::OpenRequests;

    let ids = |requests: &OpenRequests| -> Vec<String> {
        let mut ids: Vec<String> = requests
            .iter()
            .map(|o| o.started.event_id.to_string())
            .collect();
        ids.sort();
        ids
    };
    let mut requests = OpenRequests::default();
    let a = requests.insert(&event("a"));
    let b = requests.insert(&event("b"));
    assert_eq!(ids(&requests), ["a", "b"]);
    if let Some(a) = requests.get_mut(&a) {
        a.written = true;
        a.progress = Some(progress(4));
        a.progress_unwritten = true;
    }
    requests.remove(a);
    assert_eq!(ids(&requests), ["b"]);
    // Every field of c's start differs from a's, which c's slot held.
    let mut c = event("c");
    c.request_id = "client-c".into();
    c.tenant_id = "tenant-c".into();
    c.key_id = "key-c".into();
    c.model = "model-c".into();
    c.endpoint = crate::request::Endpoint::Embeddings;
    c.stream = false;
    c.started_at_ms = 99;
    let c_slot = requests.insert(&c);
    assert_eq!(ids(&requests), ["b", "c"]);
    assert_eq!(format!("{c_slot:?}"), "Slot(0)", "a's slot, reused");
    let held = requests
        .get_mut(&c_slot)
        .unwrap_or_else(|| panic!("c is open"));
    assert_eq!(held.started, Started::of(&c));
    // The start shares the event's strings rather than copying them.
    assert!(std::sync::Arc::ptr_eq(&held.started.event_id, &c.event_id));
    assert!(std::sync::Arc::ptr_eq(&held.started.model, &c.model));
    assert_eq!(
        (held.written, held.progress, held.progress_unwritten),
        (false, None, false)
    );
    if let Some(b) = requests.get_mut(&b) {
        b.written = true;
    }
    assert_eq!(requests.iter().filter(|o| o.written).count(), 1);
    requests.remove(b);
    requests.remove(c_slot);
    assert_eq!(requests.iter().count(), 0);
}

/// The `_count` and `_sum` of `histogram`, as Prometheus reads them.
fn count_and_sum(histogram: &Histogram) -> (u64, f64) {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register("h", "", histogram.clone());
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)
        .unwrap_or_else(|e| panic!("encode: {e}"));
    let value = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|value| value.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    let count = value("h_count ");
    (count as u64, value("h_sum "))
}

#[test]
fn a_sync_reports_the_age_of_the_oldest_record_it_made_durable() {
    let dir = TempDir::on_disk("age");
    let interval = Duration::from_millis(50);
    let journal = open_ticking(&dir, Durability::Interval, interval);
    let (seconds, age) = (
        Histogram::new([0.01, 0.1, 1.0]),
        Histogram::new([0.01, 0.1, 1.0]),
    );
    journal.observe_syncs(seconds.clone(), age.clone());
    // The end is written, then its tick is made due `interval` later: the sync that makes it
    // durable ends at least that long after it was written.
    assert!(journal.end(&ended("a", 0), None, false).is_none());
    wait_until("no sync reported", || count_and_sum(&age).0 > 0);
    let (count, sum) = count_and_sum(&age);
    assert_eq!(count, 1, "one record, one sync");
    assert!(sum >= interval.as_secs_f64(), "{sum} s");
    assert!(count_and_sum(&seconds).0 >= 1);
    drop(journal);
}

#[test]
fn an_end_written_after_a_sync_takes_no_page_fault() {
    let dir = TempDir::on_disk("ends-after-syncs");
    let journal = open_ticking(&dir, Durability::Interval, Duration::from_millis(1));
    let age = Histogram::new([1.0]);
    journal.observe_syncs(Histogram::new([1.0]), age.clone());
    // A sync is reported once the syncer has also mapped ahead what follows it.
    let synced = |count: u64| wait_until("no sync reported", || count_and_sum(&age).0 >= count);
    assert!(journal.end(&ended("r0", 0), None, false).is_none());
    synced(1);
    for seq in 1..=4 {
        // Each end writes into the page the sync before it wrote back and write-protected.
        let record = ended(&format!("r{seq}"), seq);
        let before = minor_faults();
        assert!(journal.end(&record, None, false).is_none());
        assert_eq!(minor_faults() - before, 0, "end {seq} faulted");
        synced(seq + 1);
    }
    drop(journal);
    assert_eq!(records(&dir).len(), 5);
}

#[cfg(target_os = "linux")]
#[test]
fn the_syncer_ticks_in_the_batch_class_on_an_interval_and_stays_in_its_creator_s_for_always() {
    let creator = crate::thread_class::class_of("thread-self")
        .unwrap_or_else(|e| panic!("this thread's class: {e}"));
    for (durability, class) in [
        (Durability::Interval, libc::SCHED_BATCH),
        (Durability::Always, creator),
    ] {
        let dir = TempDir::new("class");
        let journal = open_ticking(&dir, durability, Duration::from_millis(1));
        // Ticks, until the syncer is in the class: on an interval, it enters the batch class at
        // a tick once the process is not busy (other tests may keep it busy for a while).
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let mut seq = 0;
        let found = loop {
            let found = journal
                .syncer_tid()
                .and_then(|tid| crate::thread_class::class_of(&tid.to_string()).ok());
            if found == Some(class) && seq > 3 {
                break found;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{durability:?}: {found:?}"
            );
            seq += 1;
            let _ = journal.end(&ended(&format!("e{seq}"), seq), None, true);
            std::thread::sleep(Duration::from_millis(2));
        };
        assert_eq!(found, Some(class), "{durability:?}");
        drop(journal);
    }
}

/// The records of `testdata/v3-segment.bin`, a segment written by the build before names
/// tables (`TGJRNL3`).
fn v3_fixture() -> (Started, Progress, Ended, Ended) {
    let mut started = started("req-1");
    started.request_id = "client-id-1".into();
    started.tenant_id = "acme-corporation".into();
    started.key_id = "key_01JDQ3Z8W5X7Y9".into();
    started.model = "meta-llama/Llama-3.1-8B-Instruct".into();
    started.started_at_ms = 1_764_900_000_000;
    let progress = Progress {
        prompt_tokens: 1_234,
        completion_tokens: 17,
        cached_tokens: 512,
        at_ms: 1_764_900_000_120,
    };
    let mut first = started.interrupted(Some(progress), 41);
    first.event.status = crate::usage::Status::Completed;
    first.event.http_status = 200;
    first.event.worker = Some("http://10.0.3.17:8000".into());
    first.event.finished_at_ms = 1_764_900_000_350;
    let mut second = ended("0193a4b2-7c1d-7e3f-8a9b-0000000000ff", 42);
    second.event.tenant_id = "acme-corporation".into();
    second.event.started_at_ms = 1_764_900_000_400;
    second.event.finished_at_ms = 1_764_900_000_399;
    (started, progress, first, second)
}

#[test]
fn a_segment_of_the_build_before_names_reads_as_it_was_written() {
    // Written by 8204901's journal (`TGJRNL3`, every string written out): a start, its
    // progress at the next tick, its end, and an end with no start.
    let bytes = include_bytes!("testdata/v3-segment.bin");
    let (started, progress, first, second) = v3_fixture();
    let read = read_segment(bytes);
    assert_eq!(
        read,
        Read {
            records: vec![
                Record::Start(started),
                Record::Progress {
                    event_id: "req-1".into(),
                    progress,
                },
                Record::End(first),
                Record::End(second),
            ],
            unreadable: 0,
            torn: false,
        }
    );
}
