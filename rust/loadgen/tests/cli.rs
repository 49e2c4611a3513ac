//! Runs the `loadgen` binary against an in-process hyper server and checks what it reports:
//! counts, error classes, the open-loop timetable and the exit status.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Command;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const FRAME: &str = "data: {\"choices\":[{\"index\":0,\"text\":\" x\"}]}\n\n";

/// `/ok` answers JSON, `/sse` a complete stream, `/cut` a stream without `[DONE]`, others 503.
async fn answer(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body) = match req.uri().path() {
        "/ok" => (200, "{\"choices\":[]}".to_owned()),
        "/sse" => (200, format!("{FRAME}{FRAME}data: [DONE]\n\n")),
        "/cut" => (200, FRAME.to_owned()),
        _ => (503, "{\"error\":{\"message\":\"down\"}}".to_owned()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
    Ok(resp)
}

async fn server() -> TestResult<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service_fn(answer)),
            );
        }
    });
    Ok(addr)
}

/// Runs loadgen with `args` for 0.5 s after no warm-up; returns (exit code, report).
async fn loadgen(addr: SocketAddr, path: &str, args: &[&str]) -> TestResult<(i32, Value)> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loadgen"));
    let url = format!("http://{addr}{path}");
    cmd.args(["--url", &url, "--body", "{\"prompt\":\"hi\"}"])
        .args("--duration-s 0.5 --warmup-s 0 --concurrency 4".split(' '))
        .args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output()).await??;
    let report = serde_json::from_slice(&out.stdout)?;
    Ok((out.status.code().ok_or("killed by a signal")?, report))
}

#[tokio::test]
async fn closed_loop_counts_successes_and_exits_zero() -> TestResult {
    let addr = server().await?;
    let (code, r) = loadgen(addr, "/ok", &[]).await?;
    assert_eq!(code, 0);
    assert_eq!(r["errors"], 0);
    assert!(r["requests"].as_u64() > Some(10));
    assert!(r["latency_us"]["p50"].as_f64() > Some(0.0));
    Ok(())
}

#[tokio::test]
async fn non_2xx_responses_are_errors_and_exit_one() -> TestResult {
    let addr = server().await?;
    let (code, r) = loadgen(addr, "/down", &[]).await?;
    assert_eq!(code, 1);
    assert_eq!(r["errors"], r["requests"]);
    assert_eq!(r["error_kinds"]["status"]["503"], r["requests"]);
    Ok(())
}

#[tokio::test]
async fn streams_must_end_with_done() -> TestResult {
    let addr = server().await?;
    let (code, r) = loadgen(addr, "/sse", &["--stream"]).await?;
    assert_eq!((code, r["errors"].as_u64()), (0, Some(0)));
    let (code, r) = loadgen(addr, "/cut", &["--stream"]).await?;
    assert_eq!(code, 1);
    assert_eq!(r["error_kinds"]["bad_stream"], r["requests"]);
    Ok(())
}

#[tokio::test]
async fn open_loop_sends_on_the_timetable() -> TestResult {
    let addr = server().await?;
    let (code, r) = loadgen(addr, "/ok", &["--rate", "200"]).await?;
    assert_eq!(r["mode"], "open");
    // 0.5 s at 200/s: slots 0..=99, each sent or, on a starved machine, reported unsent.
    let (sent, unsent) = (r["requests"].as_u64(), r["unsent"].as_u64());
    assert_eq!(sent.zip(unsent).map(|(s, u)| s + u), Some(100));
    assert!(sent > Some(50));
    assert_eq!(code, i32::from(unsent != Some(0)));
    Ok(())
}
