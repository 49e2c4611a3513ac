//! The gRPC listener's bounds on slow clients, as the HTTP listener's: a connection with no call
//! in progress is closed after the header read timeout (a client that connects and trickles
//! its first request's headers, or leaves a connection idle, holds nothing), and a call's request
//! message must arrive within the body read timeout (else DEADLINE_EXCEEDED).
//!
//! HTTP/2 multiplexes calls over one connection, below tonic, so the two halves meet through the
//! connection's `Calls`: the IO wrapper owns it and closes the connection once it has been idle
//! too long; tonic hands it to every request of the connection (`Connected`), and the layer
//! counts each call in it from its request to the end of its response.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tonic::Status;
use tonic::transport::server::Connected;

/// One connection's calls in progress, and since when it has had none.
#[derive(Debug)]
pub struct Calls {
    /// Calls whose request arrived and whose response has not ended. Relaxed is enough: the
    /// idle check only needs to see a count that was true a moment ago.
    running: AtomicUsize,
    /// When the last call ended (ms since `epoch`); the connection's start before any.
    idle_since_ms: AtomicU64,
    epoch: Instant,
}

impl Calls {
    fn new() -> Self {
        Self {
            running: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// When the connection must have started a call by, if it has none running.
    fn idle_deadline(&self, limit: Duration) -> Option<Instant> {
        if self.running.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Relaxed));
        Some(self.epoch + since + limit)
    }

    fn begin(self: &Arc<Self>) -> CallGuard {
        self.running.fetch_add(1, Ordering::Relaxed);
        CallGuard(self.clone())
    }
}

/// A call in progress; it ends when dropped.
#[derive(Debug)]
struct CallGuard(Arc<Calls>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        let calls = &self.0;
        let elapsed = u64::try_from(calls.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        calls.idle_since_ms.store(elapsed, Ordering::Relaxed);
        calls.running.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An accepted connection, closed once it has had no call for `limit`.
#[derive(Debug)]
pub struct GuardedIo {
    io: TcpStream,
    calls: Arc<Calls>,
    limit: Duration,
    timer: Pin<Box<Sleep>>,
}

impl GuardedIo {
    fn new(io: TcpStream, limit: Duration) -> Self {
        let calls = Arc::new(Calls::new());
        let timer = Box::pin(tokio::time::sleep(limit));
        Self {
            io,
            calls,
            limit,
            timer,
        }
    }

    /// Whether the connection has been idle past its limit; otherwise the timer is set to
    /// wake the reader when it might be.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        while self.timer.as_mut().poll(cx).is_ready() {
            match self.calls.idle_deadline(self.limit) {
                Some(deadline) if deadline <= Instant::now() => return true,
                Some(deadline) => self.timer.as_mut().reset(deadline),
                // A call runs: look again a limit from now.
                None => self.timer.as_mut().reset(Instant::now() + self.limit),
            }
        }
        false
    }
}

impl Connected for GuardedIo {
    type ConnectInfo = Arc<Calls>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.calls.clone()
    }
}

impl AsyncRead for GuardedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.expired(cx) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no call on this connection within the header read timeout",
            )));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for GuardedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The listener's connections, each with NODELAY (a call's messages must not wait out the
/// peer's delayed ACK) and guarded by `header_read_timeout`.
pub fn incoming(
    listener: TcpListener,
    header_read_timeout: Duration,
) -> impl futures_util::Stream<Item = io::Result<GuardedIo>> {
    futures_util::stream::unfold(listener, move |listener| async move {
        let accepted = match listener.accept().await {
            Ok((socket, _)) => {
                // Best effort: a socket that refuses NODELAY still serves correctly.
                let _ = socket.set_nodelay(true);
                Ok(GuardedIo::new(socket, header_read_timeout))
            }
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(50)).await;
                Err(error)
            }
        };
        Some((accepted, listener))
    })
}

/// Counts each call on its connection's `Calls` and gives its request message
/// `body_read_timeout` to arrive.
#[derive(Debug, Clone, Copy)]
pub struct SlowClientLayer {
    pub body_read_timeout: Duration,
}

impl<S> tower_layer::Layer<S> for SlowClientLayer {
    type Service = SlowClient<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SlowClient {
            inner,
            body_read_timeout: self.body_read_timeout,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SlowClient<S> {
    inner: S,
    body_read_timeout: Duration,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower_service::Service<http::Request<tonic::body::Body>> for SlowClient<S>
where
    S: tower_service::Service<http::Request<tonic::body::Body>, Response = http::Response<B>>,
    S::Future: Send + 'static,
    B: Body + Unpin + Send + 'static,
{
    type Response = http::Response<CallBody<B>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let call = request.extensions().get::<Arc<Calls>>().map(Calls::begin);
        let (parts, body) = request.into_parts();
        let body = tonic::body::Body::new(DeadlineBody {
            inner: body,
            deadline: Box::pin(tokio::time::sleep(self.body_read_timeout)),
            timeout: self.body_read_timeout,
            over: false,
        });
        let response = self.inner.call(http::Request::from_parts(parts, body));
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|inner| CallBody { inner, _call: call }))
        })
    }
}

/// A request body that fails with DEADLINE_EXCEEDED if it has not ended by its deadline.
struct DeadlineBody {
    inner: tonic::body::Body,
    deadline: Pin<Box<Sleep>>,
    timeout: Duration,
    /// The body ended (or failed): the deadline no longer applies.
    over: bool,
}

impl Body for DeadlineBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.over |= !matches!(frame, Some(Ok(_)));
            return Poll::Ready(frame);
        }
        if this.over || this.deadline.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        this.over = true;
        Poll::Ready(Some(Err(Status::deadline_exceeded(format!(
            "the request message did not arrive within {:?}",
            this.timeout
        )))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that ends its call when dropped.
#[derive(Debug)]
pub struct CallBody<B> {
    inner: B,
    _call: Option<CallGuard>,
}

impl<B: Body + Unpin> Body for CallBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
