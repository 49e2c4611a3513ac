//! A worker's HTTP/1.1 connections: the idle ones, most recently used first, and the connecting
//! of new ones.
//!
//! Each worker owns its pool, so taking a connection is a pop from its own list under its own
//! lock: no shared map keyed by host, no lazy connect raced against the wait for an idle
//! connection. A connection goes back to its pool when the response it carried has been read to
//! its end (`Body`); a response dropped before its end, or a request cancelled, closes it.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::UpstreamError;

/// How long a connection may sit idle before it is closed rather than used.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

type Sender = SendRequest<Full<Bytes>>;

/// One worker's connections.
#[derive(Debug)]
pub struct Connections {
    /// `host:port`, what a connection is opened to; `Err` says why none can be (a URL that is
    /// not plain `http://`).
    address: Result<Box<str>, String>,
    /// Idle connections, the most recently used last, each with when it went idle.
    idle: Mutex<VecDeque<(Sender, Instant)>>,
}

impl Connections {
    /// The connections to the worker at `base` (its URL).
    pub fn new(base: &Uri) -> Self {
        let address = match (base.scheme_str(), base.host()) {
            (Some("http"), Some(host)) => {
                Ok(format!("{host}:{}", base.port_u16().unwrap_or(80)).into())
            }
            _ => Err(format!("{base} is not an http:// URL")),
        };
        Self {
            address,
            idle: Mutex::new(VecDeque::new()),
        }
    }

    /// How many idle connections the pool holds (closed ones among them until they are found).
    #[cfg(test)]
    fn idle(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(Sender, Instant)>> {
        // Pushes and pops only: a panic cannot leave the list half-changed.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends `request` on an idle connection, or on a new one; a request an idle connection
    /// could not take (it closed meanwhile: the worker ends idle connections when it likes)
    /// goes on the next. The response's body gives the connection back once read to its end.
    pub(super) async fn send(
        self: &Arc<Self>,
        mut request: Request<Full<Bytes>>,
        worker: &str,
        connect_timeout: Duration,
    ) -> Result<Response<Body>, UpstreamError> {
        loop {
            let (mut sender, reused) = match self.take_idle().await {
                Some(sender) => (sender, true),
                None => (self.connect(worker, connect_timeout).await?, false),
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let (parts, incoming) = response.into_parts();
                    let body = Body {
                        incoming,
                        home: Some((sender, Arc::clone(self))),
                    };
                    return Ok(Response::from_parts(parts, body));
                }
                Err(mut error) => match error.take_message() {
                    Some(unsent) if reused => request = unsent,
                    _ => {
                        return Err(UpstreamError::Transport {
                            worker: worker.to_owned(),
                            detail: detail(&error.into_error()),
                        });
                    }
                },
            }
        }
    }

    /// The most recently used idle connection that is still open and ready for a request;
    /// those idle too long are closed on the way.
    async fn take_idle(&self) -> Option<Sender> {
        loop {
            let (mut sender, since) = self.lock().pop_back()?;
            if sender.is_closed() || since.elapsed() > IDLE_TIMEOUT {
                continue;
            }
            // Ready at once unless its connection is still winding up the last response.
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    fn give_back(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.lock();
        // The oldest are first: close those idle too long, or already closed.
        while idle.front().is_some_and(|(sender, since)| {
            sender.is_closed() || now.duration_since(*since) > IDLE_TIMEOUT
        }) {
            idle.pop_front();
        }
        idle.push_back((sender, now));
    }

    async fn connect(&self, worker: &str, timeout: Duration) -> Result<Sender, UpstreamError> {
        let failed = |detail: String| UpstreamError::Connect {
            worker: worker.to_owned(),
            detail,
        };
        let address = self
            .address
            .as_deref()
            .map_err(|error| failed(error.clone()))?;
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(address)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => return Err(failed(error.to_string())),
            Err(_) => return Err(failed(format!("no connection within {timeout:?}"))),
        };
        stream
            .set_nodelay(true)
            .map_err(|error| failed(error.to_string()))?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|error| failed(detail(&error)))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "worker connection ended");
            }
        });
        Ok(sender)
    }
}

/// A worker's response body; read to its end, it gives its connection back to the pool.
#[derive(Debug)]
pub struct Body {
    incoming: Incoming,
    /// The connection and its pool, until the body has ended.
    home: Option<(Sender, Arc<Connections>)>,
}

impl Body {
    fn ended(&mut self) {
        if let Some((sender, connections)) = self.home.take() {
            connections.give_back(sender);
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.incoming).poll_frame(cx));
        match &frame {
            None => self.ended(),
            // A connection that failed mid-body is not reused.
            Some(Err(_)) => drop(self.home.take()),
            Some(Ok(_)) if self.incoming.is_end_stream() => self.ended(),
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        // A body nobody read to its end leaves its connection mid-response: it closes with the
        // sender, unless the body had in fact ended (nothing left to read).
        if self.incoming.is_end_stream() {
            self.ended();
        }
    }
}

/// The innermost cause of a client error, which names what went wrong.
pub(super) fn detail(error: &hyper::Error) -> String {
    std::error::Error::source(error).map_or_else(|| error.to_string(), ToString::to_string)
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http::header::{CONNECTION, HOST};
    use http_body_util::BodyExt;
    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use tokio::net::TcpListener;
    use tokio::sync::Notify;

    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// How a test worker answers: each path its behaviour.
    ///
    /// - `/close`: answers and closes the connection (`Connection: close`);
    /// - `/slow`: sends its head and a first chunk, the rest once `release` is notified;
    /// - anything else: `ok`, keeping the connection.
    struct TestWorker {
        url: Uri,
        accepted: Arc<AtomicUsize>,
        release: Arc<Notify>,
    }

    async fn test_worker() -> Result<TestWorker, Box<dyn std::error::Error>> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url: Uri = format!("http://{}", listener.local_addr()?).parse()?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(Notify::new());
        let (counted, release_) = (Arc::clone(&accepted), Arc::clone(&release));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let release = Arc::clone(&release_);
                let service = service_fn(move |request: Request<Incoming>| {
                    let release = Arc::clone(&release);
                    async move {
                        let mut close = false;
                        let body = match request.uri().path() {
                            "/close" => {
                                close = true;
                                http_body_util::Either::Left(Full::new(Bytes::from("bye")))
                            }
                            "/slow" => {
                                let stream = futures_util::stream::unfold(0, move |step| {
                                    let release = Arc::clone(&release);
                                    async move {
                                        let data = match step {
                                            0 => "first",
                                            1 => {
                                                release.notified().await;
                                                "rest"
                                            }
                                            _ => return None,
                                        };
                                        let frame = Frame::data(Bytes::from(data));
                                        Some((Ok::<_, Infallible>(frame), step + 1))
                                    }
                                });
                                http_body_util::Either::Right(http_body_util::StreamBody::new(
                                    stream,
                                ))
                            }
                            _ => http_body_util::Either::Left(Full::new(Bytes::from("ok"))),
                        };
                        let mut response = Response::new(body);
                        if close {
                            let value = http::HeaderValue::from_static("close");
                            response.headers_mut().insert(CONNECTION, value);
                        }
                        Ok::<_, Infallible>(response)
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        Ok(TestWorker {
            url,
            accepted,
            release,
        })
    }

    fn request(url: &Uri, path: &str) -> Result<Request<Full<Bytes>>, Box<dyn std::error::Error>> {
        let mut request = Request::new(Full::new(Bytes::new()));
        *request.uri_mut() = path.parse()?;
        let host = url.authority().ok_or("no authority")?.as_str().parse()?;
        request.headers_mut().insert(HOST, host);
        Ok(request)
    }

    async fn read(
        connections: &Arc<Connections>,
        url: &Uri,
        path: &str,
    ) -> Result<Bytes, Box<dyn std::error::Error>> {
        let response = connections
            .send(request(url, path)?, "w", Duration::from_secs(5))
            .await?;
        Ok(response.into_body().collect().await?.to_bytes())
    }

    /// Waits until the pool's idle connections are `count` open ones (the connection's task
    /// runs apart from the body's reader); an error after 10 s.
    async fn until_idle_open(connections: &Connections, count: usize) -> TestResult {
        let open = || {
            connections
                .lock()
                .iter()
                .filter(|(sender, _)| !sender.is_closed())
                .count()
        };
        let wait = async {
            while open() != count {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .map_err(|_| format!("{} idle connections open, not {count}", open()).into())
    }

    #[tokio::test]
    async fn a_connection_read_to_its_end_carries_the_next_request() -> TestResult {
        let worker = test_worker().await?;
        let connections = Arc::new(Connections::new(&worker.url));
        for _ in 0..5 {
            assert_eq!(read(&connections, &worker.url, "/").await?, "ok");
        }
        assert_eq!(worker.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(connections.idle(), 1);
        Ok(())
    }

    #[tokio::test]
    async fn a_connection_the_worker_closed_is_passed_over() -> TestResult {
        let worker = test_worker().await?;
        let connections = Arc::new(Connections::new(&worker.url));
        for round in 1..=3 {
            assert_eq!(read(&connections, &worker.url, "/close").await?, "bye");
            until_idle_open(&connections, 0).await?;
            assert_eq!(worker.accepted.load(Ordering::SeqCst), round);
        }
        assert_eq!(read(&connections, &worker.url, "/").await?, "ok");
        assert_eq!(worker.accepted.load(Ordering::SeqCst), 4);
        Ok(())
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_does_not_give_its_connection_back() -> TestResult {
        let worker = test_worker().await?;
        let connections = Arc::new(Connections::new(&worker.url));
        let mut body = connections
            .send(request(&worker.url, "/slow")?, "w", Duration::from_secs(5))
            .await?
            .into_body();
        let first = body.frame().await.ok_or("no frame")??;
        assert_eq!(first.into_data().ok(), Some(Bytes::from("first")));
        drop(body);
        assert_eq!(connections.idle(), 0);
        worker.release.notify_one();
        assert_eq!(read(&connections, &worker.url, "/").await?, "ok");
        assert_eq!(worker.accepted.load(Ordering::SeqCst), 2);
        assert_eq!(connections.idle(), 1);
        Ok(())
    }

    #[tokio::test]
    async fn a_worker_that_is_not_listening_is_a_connect_error() -> TestResult {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let url: Uri = format!("http://{}", listener.local_addr()?).parse()?;
        drop(listener);
        let connections = Arc::new(Connections::new(&url));
        let error = connections
            .send(request(&url, "/")?, "w", Duration::from_secs(5))
            .await
            .err();
        assert!(
            matches!(error, Some(UpstreamError::Connect { .. })),
            "{error:?}"
        );
        let https = Arc::new(Connections::new(&"https://w.example".parse()?));
        let error = https
            .send(request(&url, "/")?, "w", Duration::from_secs(5))
            .await
            .err();
        assert!(
            matches!(&error, Some(UpstreamError::Connect { detail, .. }) if detail.contains("http://")),
            "{error:?}"
        );
        Ok(())
    }
}
