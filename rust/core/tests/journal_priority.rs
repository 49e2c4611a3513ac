//! The journal's syncer yields the core to requests when none waits for it (`interval`), and
//! keeps its priority when every response does (`always`). One test in its own process, the
//! journals opened one after the other, so the one syncer thread alive is the journal's at hand.
#![expect(clippy::unwrap_used, reason = "tests fail loudly on a bad fixture")]

use std::time::Duration;

use gateway_core::journal::{Durability, Journal, Options};

/// The niceness of the thread named `usage-journal`, from `/proc/self/task/*/stat`; `None` while
/// it has no name yet (a thread names itself once it runs).
fn syncer_nice() -> Option<i64> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task").unwrap() {
        let task = entry.unwrap().path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if comm.trim() == "usage-journal" {
            let stat = std::fs::read_to_string(task.join("stat")).unwrap();
            // Field 19, niceness: the 17th after the command's closing parenthesis.
            let after = stat.rsplit_once(')').unwrap().1;
            found.push(after.split_whitespace().nth(16).unwrap().parse().unwrap());
        }
    }
    assert!(found.len() <= 1, "one syncer alive: {found:?}");
    found.first().copied()
}

fn own_nice() -> i64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
    let after = stat.rsplit_once(')').unwrap().1;
    after.split_whitespace().nth(16).unwrap().parse().unwrap()
}

#[test]
fn an_interval_syncer_is_ten_nicer_than_its_opener_and_an_always_one_is_not() {
    let dir = std::env::temp_dir().join(format!("tokengate-nice-{}", std::process::id()));
    let base = own_nice();
    for (durability, expected) in [
        (Durability::Interval, (base + 10).min(19)),
        (Durability::Always, base),
    ] {
        let options = Options {
            segment_bytes: 1 << 20,
            durability,
            interval: Duration::from_millis(10),
        };
        let (journal, _) = Journal::open(&dir, options).unwrap();
        // The syncer sets its own priority as it starts: wait for it to have run that far.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while syncer_nice() != Some(expected) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(syncer_nice(), Some(expected), "{durability:?}");
        journal.close();
        drop(journal);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
