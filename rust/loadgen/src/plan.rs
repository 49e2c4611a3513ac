//! Command line and the validated run plan built from it; no I/O besides reading `--body @file`
//! and resolving the target's address.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use hyper::header::{CONTENT_TYPE, HOST, HeaderName, HeaderValue};
use hyper::{HeaderMap, Uri};

use crate::Result;

/// Load generator for OpenAI-style POST endpoints over HTTP/1.1 keep-alive connections.
///
/// Closed loop by default: `--concurrency` connections each send the next request as soon as the
/// previous one has been read to its end (saturation throughput). With `--rate R` the load is an
/// open loop: request i is due at start + i/R whatever the server does, and its latency counts
/// from the time it was due if no connection was free then (no coordinated omission).
/// Prints one JSON report on stdout.
#[derive(Parser, Debug)]
#[command(name = "loadgen", version)]
pub struct Args {
    /// Target URL, e.g. http://127.0.0.1:8000/v1/completions (plain http only).
    #[arg(long)]
    pub url: String,
    /// Request body: inline JSON, or @PATH to read it from a file.
    #[arg(long)]
    pub body: String,
    /// Extra request header, "name: value"; repeatable.
    #[arg(long = "header", short = 'H', value_name = "NAME: VALUE")]
    pub headers: Vec<String>,
    /// Read responses as SSE: ttfb is the first `data:` frame, and a 200 stream that does not end
    /// with `data: [DONE]` or carries an `{"error"` frame counts as an error.
    #[arg(long)]
    pub stream: bool,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    pub duration_s: f64,
    /// Seconds of load before measuring starts.
    #[arg(long, default_value_t = 1.0)]
    pub warmup_s: f64,
    /// Connections (closed loop: requests in flight; open loop: the most in flight).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Open loop at this many requests per second, on a fixed timetable.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Runtime threads: 1 (the default) runs everything on one current-thread runtime.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// A request not read to its end after this many seconds fails and its connection is dropped.
    #[arg(long, default_value_t = 30.0)]
    pub timeout_s: f64,
    /// Speak gRPC over HTTP/2 (prior knowledge), one connection per `--concurrency` slot:
    /// `--url` names the method (http://HOST:PORT/package.Service/Method) and `--body @PATH` holds
    /// the protobuf-encoded request message. A call succeeds when its trailers carry
    /// `grpc-status: 0` (anything else counts as a bad stream); ttfb is its first message.
    #[arg(long)]
    pub grpc: bool,
}

/// What to send, where, and for how long; built once and shared read-only by every worker.
pub struct Plan {
    pub addr: SocketAddr,
    pub path: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub stream: bool,
    pub grpc: bool,
    pub warmup: Duration,
    pub duration: Duration,
    pub concurrency: usize,
    pub rate: Option<f64>,
    pub timeout: Duration,
}

impl Plan {
    pub async fn from_args(args: &Args) -> Result<Self> {
        let uri: Uri = args
            .url
            .parse()
            .map_err(|e| format!("--url {:?}: {e}", args.url))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!("--url {:?}: only http:// is supported", args.url).into());
        }
        let authority = uri.authority().ok_or("--url has no host")?.clone();
        let port = authority.port_u16().unwrap_or(80);
        let addr = tokio::net::lookup_host((authority.host(), port))
            .await
            .map_err(|e| format!("resolving {}: {e}", authority.host()))?
            .next()
            .ok_or_else(|| format!("{} resolves to no address", authority.host()))?;
        // HTTP/2 takes `:scheme` and `:authority` from the request's URI: it must be absolute.
        let path: Uri = if args.grpc {
            uri.clone()
        } else {
            uri.path_and_query().map_or("/", |p| p.as_str()).parse()?
        };

        let body = match args.body.strip_prefix('@') {
            Some(file) => {
                Bytes::from(std::fs::read(file).map_err(|e| format!("--body @{file}: {e}"))?)
            }
            None => Bytes::from(args.body.clone()),
        };
        let mut headers = HeaderMap::new();
        let body = if args.grpc {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            headers.insert("te", HeaderValue::from_static("trailers"));
            grpc_frame(&body)?
        } else {
            serde_json::from_slice::<serde::de::IgnoredAny>(&body)
                .map_err(|e| format!("--body is not JSON: {e}"))?;
            headers.insert(HOST, HeaderValue::from_str(authority.as_str())?);
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            body
        };
        for raw in &args.headers {
            let (name, value) = raw
                .split_once(':')
                .ok_or_else(|| format!("--header {raw:?}: expected \"name: value\""))?;
            let name = HeaderName::from_bytes(name.trim().as_bytes())
                .map_err(|e| format!("--header {raw:?}: {e}"))?;
            let value = HeaderValue::from_str(value.trim())
                .map_err(|e| format!("--header {raw:?}: {e}"))?;
            headers.insert(name, value);
        }

        let seconds = |name: &str, v: f64| -> Result<Duration> {
            Duration::try_from_secs_f64(v).map_err(|e| format!("--{name} {v}: {e}").into())
        };
        if args.concurrency == 0 {
            return Err("--concurrency must be at least 1".into());
        }
        if let Some(rate) = args.rate
            && !(rate.is_finite() && rate > 0.0)
        {
            return Err(format!("--rate {rate}: must be a positive number").into());
        }
        let duration = seconds("duration-s", args.duration_s)?;
        if duration.is_zero() {
            return Err("--duration-s must be positive".into());
        }
        Ok(Self {
            addr,
            path,
            headers,
            body,
            stream: args.stream,
            grpc: args.grpc,
            warmup: seconds("warmup-s", args.warmup_s)?,
            duration,
            concurrency: args.concurrency,
            rate: args.rate,
            timeout: seconds("timeout-s", args.timeout_s)?,
        })
    }
}

/// `message` as one gRPC message on the wire: uncompressed, its length (big-endian), itself.
fn grpc_frame(message: &[u8]) -> Result<Bytes> {
    let len = u32::try_from(message.len()).map_err(|_| "--body: message over 4 GiB")?;
    let mut framed = Vec::with_capacity(message.len() + 5);
    framed.push(0);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(message);
    Ok(Bytes::from(framed))
}
