//! What the usage journal costs a request on the thread that serves it, with
//! `journal.sync = "interval"`: its start (kept in memory), its end (encoded and copied into the
//! segment's mapping); and the encoding of an end record alone. The syncer's ticks run on their
//! own thread meanwhile, as in the gateway, and the ledger acknowledges what it holds every 4,096
//! requests, so sealed segments are retired. No HTTP.
//!
//!     cargo bench -p gateway-core --bench journal
//!
//! Prints one JSON object: nanoseconds per request that the thread ran on a CPU (kernel time
//! included, other processes' time left out), and that all the process's threads ran (the
//! syncer's ticks included). Run by `cargo test` (no `--bench` argument), it only checks itself
//! on a few thousand requests.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use gateway_core::journal::{Durability, Ended, Journal, Line, Names, Options};
use gateway_core::request::Endpoint;
use gateway_core::thread_class;
use gateway_core::usage::{Status, UsageEvent, UsageSource};
use serde_json::json;

fn event(n: u64) -> UsageEvent {
    // A request without the client's `X-Request-Id`: its request id is its event id.
    let id: Arc<str> = format!("0193a4b2-7c1d-7e3f-8a9b-{n:012x}").into();
    UsageEvent {
        event_id: id.clone(),
        request_id: id,
        tenant_id: "acme-corporation".into(),
        key_id: "key_01JDQ3Z8W5X7Y9".into(),
        model: "meta-llama/Llama-3.1-8B-Instruct".into(),
        worker: Some("http://10.0.3.17:8000".into()),
        endpoint: Endpoint::ChatCompletions,
        stream: true,
        status: Status::Completed,
        http_status: 200,
        prompt_tokens: 1_234,
        cached_tokens: 512,
        completion_tokens: 256,
        usage_source: UsageSource::Worker,
        started_at_ms: 1_764_900_000_000 + n,
        finished_at_ms: 1_764_900_000_350 + n,
    }
}

/// Nanoseconds this thread has run on a CPU (`/proc/thread-self/schedstat`): unlike a clock, it
/// does not count the time other processes of a busy machine take the core.
fn on_cpu_ns() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Nanoseconds the whole process has run on CPUs: the syncer's and the segment preparers' time
/// as well as this thread's.
fn process_on_cpu_ns() -> f64 {
    thread_class::process_cpu_time().as_nanos() as f64
}

/// Nanoseconds on a CPU per request, kernel time included: this thread's, and the process's.
fn per_request_ns(n: u64, mut request: impl FnMut(u64)) -> (f64, f64) {
    let (thread, process) = (on_cpu_ns(), process_on_cpu_ns());
    for i in 0..n {
        request(i);
    }
    (
        (on_cpu_ns() - thread) / n as f64,
        (process_on_cpu_ns() - process) / n as f64,
    )
}

/// Requests between two acknowledgements of the ledger's.
const COMMIT_EVERY: u64 = 4096;

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let n: u64 = if bench { 1_000_000 } else { 5_000 };
    let dir = std::env::temp_dir().join(format!("tokengate-bench-journal-{}", std::process::id()));
    let options = Options {
        segment_bytes: 16 << 20,
        durability: Durability::Interval,
        interval: Duration::from_millis(10),
    };
    let (journal, _) = Journal::open(&dir, options).unwrap_or_else(|e| panic!("open: {e}"));
    let mut line = Vec::with_capacity(1024);
    // A segment's names, defined by the first record: the rest refer to them.
    let mut names = Names::default();
    let mut bytes = 0;
    let (encode_ns, _) = per_request_ns(n, |i| {
        line.clear();
        Line::End(&Ended {
            seq: i,
            event: black_box(event(i)),
        })
        .encode(&mut line, &mut names);
        bytes = line.len();
    });
    let (make_ns, _) = per_request_ns(n, |i| {
        black_box(Ended {
            seq: i,
            event: black_box(event(i)),
        });
    });
    let (request_ns, process_ns) = per_request_ns(n, |i| {
        let ended = Ended {
            seq: i,
            event: event(i),
        };
        let slot = journal.start(&ended.event);
        assert!(journal.end(&ended, slot, true).is_none());
        // The ledger catching up, as the gateway's does every `control.usage_flush_ms`: sealed
        // segments are retired.
        if i % COMMIT_EVERY == COMMIT_EVERY - 1 {
            journal.committed(i);
        }
    });
    journal.close();
    drop(journal);
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{}",
        json!({
            "requests": n,
            "record_bytes": bytes,
            "ns_per_request_making_the_event": make_ns,
            "ns_per_end_record_encoded": encode_ns - make_ns,
            "ns_per_request_start_and_end_journaled": request_ns - make_ns,
            "ns_per_request_all_threads": process_ns - make_ns,
        })
    );
}
