//! One worker task per connection: picks when to send (closed loop or the open-loop timetable),
//! sends the request, reads the body to its end and classifies the outcome. It keeps its own tally
//! and hands latency samples to the shared histograms in batches; it does not print anything.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper::{Method, Request};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep, sleep_until, timeout};

use crate::Result;
use crate::plan::Plan;
use crate::report::{Histograms, Tally};

/// One connection: HTTP/1.1, or HTTP/2 for gRPC.
pub enum Sender {
    Http1(http1::SendRequest<Full<Bytes>>),
    Http2(http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    async fn ready(&mut self) -> hyper::Result<()> {
        match self {
            Self::Http1(sender) => sender.ready().await,
            Self::Http2(sender) => sender.ready().await,
        }
    }

    async fn send_request(
        &mut self,
        request: Request<Full<Bytes>>,
    ) -> hyper::Result<hyper::Response<hyper::body::Incoming>> {
        match self {
            Self::Http1(sender) => sender.send_request(request).await,
            Self::Http2(sender) => sender.send_request(request).await,
        }
    }
}

/// Samples a worker keeps before taking the histogram lock.
const BATCH: usize = 512;

/// Everything the workers share: the plan, the clock marks and the open-loop slot counter.
pub struct Run {
    pub plan: Plan,
    /// Start of the load (and slot 0 of the timetable).
    pub t0: Instant,
    /// Requests due before this are warm-up: sent but not recorded.
    pub warm_end: Instant,
    /// No request starts at or after this.
    pub end: Instant,
    /// Next open-loop slot. Relaxed ordering: only the uniqueness of each index matters.
    pub next_slot: AtomicU64,
    pub hists: Mutex<Histograms>,
}

impl Run {
    /// Time at which open-loop slot `i` is due.
    pub fn due(&self, rate: f64, i: u64) -> Instant {
        self.t0 + Duration::from_nanos((i as f64 * 1e9 / rate) as u64)
    }
}

/// Opens one connection (HTTP/2 with `--grpc`, else HTTP/1.1); its driver runs as its own task
/// until the sender is dropped.
pub async fn connect(plan: &Plan) -> Result<Sender> {
    let tcp = TcpStream::connect(plan.addr).await?;
    tcp.set_nodelay(true)?;
    // The connection's own error also surfaces on the sender, where it is counted.
    if plan.grpc {
        let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
        tokio::spawn(async move {
            let _closed = conn.await;
        });
        return Ok(Sender::Http2(sender));
    }
    let (sender, conn) = http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        let _closed = conn.await;
    });
    Ok(Sender::Http1(sender))
}

/// How one request ended.
enum Outcome {
    Ok { ttfb: Duration, total: Duration },
    Status(u16),
    BadStream,
    Transport,
    Timeout,
}

pub async fn worker(run: Arc<Run>, conn: Sender) -> Tally {
    let mut conn = Some(conn);
    let mut tally = Tally::default();
    let mut batch: Vec<(u64, u64)> = Vec::with_capacity(BATCH);
    while let Some((start, record)) = next_start(&run, &mut tally).await {
        let outcome = match ready(&mut conn, &run.plan).await {
            Ok(sender) => timeout(run.plan.timeout, exchange(sender, &run.plan, start))
                .await
                .unwrap_or(Outcome::Timeout),
            Err(_) => {
                // Nothing listens (any more): do not spin on refused connections.
                sleep(Duration::from_millis(10)).await;
                Outcome::Transport
            }
        };
        if matches!(outcome, Outcome::Transport | Outcome::Timeout) {
            conn = None;
        }
        if !record {
            continue;
        }
        tally.last_done = tally.last_done.max(Some(Instant::now()));
        match outcome {
            Outcome::Ok { ttfb, total } => {
                tally.ok += 1;
                batch.push((nanos(ttfb), nanos(total)));
                if batch.len() == BATCH {
                    flush(&run, &mut batch);
                }
            }
            Outcome::Status(code) => *tally.status.entry(code).or_default() += 1,
            Outcome::BadStream => tally.bad_stream += 1,
            Outcome::Transport => tally.transport += 1,
            Outcome::Timeout => tally.timeout += 1,
        }
    }
    flush(&run, &mut batch);
    tally
}

/// When the next request starts (its latency counts from there) and whether it is recorded;
/// `None` once the run is over.
async fn next_start(run: &Run, tally: &mut Tally) -> Option<(Instant, bool)> {
    let Some(rate) = run.plan.rate else {
        let now = Instant::now();
        return (now < run.end).then_some((now, now >= run.warm_end));
    };
    let slot = run.next_slot.fetch_add(1, Ordering::Relaxed);
    let due = run.due(rate, slot);
    let now = Instant::now();
    if due >= run.end || now >= run.end {
        // Slots due before the end but never started are reported as `unsent`.
        return None;
    }
    tally.started += 1;
    let start = if due > now {
        // Ahead of the timetable: the connection was free, so whatever the timer adds to `due`
        // is the load generator's own delay, not the server's.
        sleep_until(due).await;
        Instant::now()
    } else {
        // Behind it: every connection was busy, so the wait counts (no coordinated omission).
        due
    };
    Some((start, due >= run.warm_end))
}

/// A connection ready for the next request, reconnecting if the server closed the last one.
async fn ready<'c>(conn: &'c mut Option<Sender>, plan: &Plan) -> Result<&'c mut Sender> {
    let alive = match conn.as_mut() {
        Some(sender) => sender.ready().await.is_ok(),
        None => false,
    };
    if !alive {
        let mut sender = connect(plan).await?;
        sender.ready().await?;
        *conn = Some(sender);
    }
    conn.as_mut().ok_or_else(|| "no connection".into())
}

async fn exchange(sender: &mut Sender, plan: &Plan, start: Instant) -> Outcome {
    let mut req = Request::new(Full::new(plan.body.clone()));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = plan.path.clone();
    *req.headers_mut() = plan.headers.clone();
    let Ok(resp) = sender.send_request(req).await else {
        return Outcome::Transport;
    };
    let status = resp.status();
    let mut body = resp.into_body();
    let mut first: Option<Instant> = None;
    let mut sse = Sse::default();
    let mut grpc_ok = false;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Outcome::Transport;
        };
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    grpc_ok = trailers.get("grpc-status").is_some_and(|s| s == "0");
                }
                continue;
            }
        };
        if data.is_empty() {
            continue;
        }
        let is_first = if plan.stream && !plan.grpc {
            sse.push(data)
        } else {
            first.is_none()
        };
        if is_first {
            first = Some(Instant::now());
        }
    }
    let done = Instant::now();
    if !status.is_success() {
        return Outcome::Status(status.as_u16());
    }
    if (plan.stream && !plan.grpc && !sse.complete()) || (plan.grpc && !grpc_ok) {
        return Outcome::BadStream;
    }
    Outcome::Ok {
        ttfb: first.unwrap_or(done) - start,
        total: done - start,
    }
}

/// Just enough SSE reading to time the first `data:` field and to check how the stream ended.
#[derive(Default)]
struct Sse {
    seen_data: bool,
    prev: Bytes,
    last: Bytes,
}

impl Sse {
    /// Takes the next body chunk; true when it holds the stream's first `data:` field.
    fn push(&mut self, chunk: Bytes) -> bool {
        let first = !self.seen_data && {
            let carry = &self.last[self.last.len().saturating_sub(4)..];
            let head = &chunk[..chunk.len().min(4)];
            contains(&chunk, b"data:") || contains(&[carry, head].concat(), b"data:")
        };
        self.seen_data |= first;
        self.prev = std::mem::replace(&mut self.last, chunk);
        first
    }

    /// True when the stream had data and ended with `data: [DONE]`, with no `{"error"` frame in
    /// the last two chunks (where vLLM puts an error that follows a 200).
    fn complete(&self) -> bool {
        let mut tail = self.prev[self.prev.len().saturating_sub(32)..].to_vec();
        tail.extend_from_slice(&self.last[self.last.len().saturating_sub(32)..]);
        let done = tail.trim_ascii_end().ends_with(b"data: [DONE]");
        let error = contains(&self.prev, b"{\"error\"") || contains(&self.last, b"{\"error\"");
        self.seen_data && done && !error
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn flush(run: &Run, batch: &mut Vec<(u64, u64)>) {
    let mut hists = run.hists.lock().unwrap_or_else(PoisonError::into_inner);
    for (ttfb, total) in batch.drain(..) {
        hists.record(ttfb, total);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(chunks: &[&'static str]) -> (Vec<bool>, bool) {
        let mut sse = Sse::default();
        let firsts = chunks
            .iter()
            .map(|c| sse.push(Bytes::from_static(c.as_bytes())))
            .collect();
        (firsts, sse.complete())
    }

    #[test]
    fn first_data_frame_is_found_even_split_across_chunks() {
        assert_eq!(
            feed(&["da", "ta: {}\n\n", "data: [DONE]\n\n"]).0,
            [false, true, false]
        );
        assert_eq!(feed(&["data: {}\n\ndata: [DONE]\n\n"]), (vec![true], true));
    }

    #[test]
    fn stream_without_done_or_with_error_frame_is_incomplete() {
        assert!(!feed(&["data: {}\n\n"]).1);
        assert!(
            !feed(&[
                "data: {}\n\n",
                "data: {\"error\": {}}\n\n",
                "data: [DONE]\n\n"
            ])
            .1
        );
        assert!(feed(&["data: {}\n\n", "data: [DO", "NE]\n\n"]).1);
        assert!(!feed(&[": comment\n\n"]).1);
    }
}
