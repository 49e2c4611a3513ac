//! The HTTP/1.1 client the gateway talks to workers with, over each worker's own pool of
//! connections (`pool`).
//!
//! It sends and classifies failures; choosing a worker and retrying belong to the dispatcher.

mod pool;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;

pub use pool::{Body, Connections};

use crate::config::RoutingConfig;
use crate::telemetry::TraceHeaders;

/// How a call to a worker failed before a response arrived.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// The worker could not be reached at all: it is down, not merely slow.
    #[error("cannot connect to {worker}: {detail}")]
    Connect { worker: String, detail: String },
    /// The connection broke or the response was malformed.
    #[error("transport error from {worker}: {detail}")]
    Transport { worker: String, detail: String },
    #[error("{worker} did not answer in time")]
    Timeout { worker: String },
}

/// The client's settings; the connections are each worker's (`To::connections`). Cheap to
/// clone: a clone is a reference count (a request's gateway-side counter holds one).
#[derive(Debug, Clone)]
pub struct Upstream {
    /// `routing.request_timeout_ms` and `routing.connect_timeout_ms`, which a reload may change:
    /// shared by every clone. Relaxed: independent settings.
    request_timeout_ms: Arc<AtomicU64>,
    connect_timeout_ms: Arc<AtomicU64>,
}

const JSON: HeaderValue = HeaderValue::from_static("application/json");

/// What an upstream request carries from its client besides the body.
#[derive(Debug, Clone, Copy, Default)]
pub struct Carried<'a> {
    /// The client's `X-Request-Id`, passed on as is.
    pub request_id: Option<&'a str>,
    /// The trace context, with the attempt's span as the parent (`traceparent`, `tracestate`).
    pub trace: Option<&'a TraceHeaders>,
}

/// Where a request goes: the worker, by its URL (which names it in errors), and the headers every
/// request to it carries, each made once.
#[derive(Debug, Clone, Copy)]
pub struct To<'a> {
    pub worker: &'a str,
    /// `Host` (`host`): the client would otherwise format it from the URI on every call.
    pub host: Option<&'a HeaderValue>,
    pub authorization: Option<&'a HeaderValue>,
    pub connections: &'a Arc<Connections>,
}

impl To<'_> {
    /// A request to the worker at `uri` (one of its own) with the headers every request to it
    /// carries: `uri` in origin form, `Host`, and its `Authorization` if it has a key.
    fn request(&self, method: Method, uri: &Uri, body: Bytes) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = method;
        *request.uri_mut() = origin_form(uri);
        let headers = request.headers_mut();
        if let Some(host) = self.host {
            headers.insert(HOST, host.clone());
        }
        if let Some(value) = self.authorization {
            headers.insert(AUTHORIZATION, value.clone());
        }
        request
    }
}

/// The `Host` header of requests to `uri`, as the HTTP client would make it: host, and port
/// unless the scheme's default; none without a host (a URI the client refuses).
pub fn host(uri: &Uri) -> Option<HeaderValue> {
    let host = uri.host()?;
    let default = match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    };
    match uri.port_u16().filter(|&port| port != default) {
        Some(port) => HeaderValue::from_str(&format!("{host}:{port}")).ok(),
        None => HeaderValue::from_str(host).ok(),
    }
}

impl Upstream {
    pub fn new(routing: &RoutingConfig) -> Self {
        let upstream = Self {
            request_timeout_ms: Arc::new(AtomicU64::new(0)),
            connect_timeout_ms: Arc::new(AtomicU64::new(0)),
        };
        upstream.reconfigure(routing);
        upstream
    }

    /// Attempts started from now on wait as `routing` says, and connections opened from now on.
    pub fn reconfigure(&self, routing: &RoutingConfig) {
        self.request_timeout_ms
            .store(routing.request_timeout_ms, Ordering::Relaxed);
        let connect_ms = u64::try_from(routing.connect_timeout().as_millis()).unwrap_or(u64::MAX);
        self.connect_timeout_ms.store(connect_ms, Ordering::Relaxed);
    }

    fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms.load(Ordering::Relaxed).max(1))
    }

    /// When an attempt starting now must have its answer: the response headers, then the first
    /// event of a stream or the whole body otherwise. A stream that has started is not cut.
    pub fn deadline(&self) -> Instant {
        let ms = self.request_timeout_ms.load(Ordering::Relaxed).max(1);
        Instant::now() + Duration::from_millis(ms)
    }

    /// POSTs a JSON body `to` a worker at `uri` (one of its own), with what it `carried`;
    /// resolves when the response headers arrive, by `deadline`.
    pub async fn post_json(
        &self,
        to: To<'_>,
        uri: Uri,
        body: Bytes,
        carried: Carried<'_>,
        deadline: Instant,
    ) -> Result<Response<Body>, UpstreamError> {
        let mut request = to.request(Method::POST, &uri, body);
        let headers = request.headers_mut();
        headers.insert(CONTENT_TYPE, JSON);
        if let Some(id) = carried
            .request_id
            .and_then(|id| HeaderValue::from_str(id).ok())
        {
            headers.insert("x-request-id", id);
        }
        if let Some(trace) = carried.trace {
            trace.write(headers);
        }
        let sent = to
            .connections
            .send(request, to.worker, self.connect_timeout());
        match tokio::time::timeout_at(deadline, sent).await {
            Ok(result) => result,
            Err(_) => Err(UpstreamError::Timeout {
                worker: to.worker.to_owned(),
            }),
        }
    }

    /// GETs a small document (health, model list, metrics) from a worker within `timeout`.
    pub async fn get(
        &self,
        to: To<'_>,
        uri: Uri,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), UpstreamError> {
        let exchange =
            async {
                let request = to.request(Method::GET, &uri, Bytes::new());
                let response = to
                    .connections
                    .send(request, to.worker, self.connect_timeout())
                    .await?;
                let status = response.status();
                let body = response.into_body().collect().await.map_err(|error| {
                    UpstreamError::Transport {
                        worker: to.worker.to_owned(),
                        detail: error.to_string(),
                    }
                })?;
                Ok((status, body.to_bytes()))
            };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(UpstreamError::Timeout {
                    worker: to.worker.to_owned(),
                })
            })
    }
}

/// `uri` as a request to its server names it: path and query only.
fn origin_form(uri: &Uri) -> Uri {
    uri.path_and_query()
        .cloned()
        .map_or_else(|| Uri::from_static("/"), Uri::from)
}

/// A response body in full, by `deadline`.
pub async fn collect(body: Body, worker: &str, deadline: Instant) -> Result<Bytes, UpstreamError> {
    match tokio::time::timeout_at(deadline, body.collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(error)) => Err(UpstreamError::Transport {
            worker: worker.to_owned(),
            detail: error.to_string(),
        }),
        Err(_) => Err(UpstreamError::Timeout {
            worker: worker.to_owned(),
        }),
    }
}
