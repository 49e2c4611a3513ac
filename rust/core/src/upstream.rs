//! The pooled HTTP/1.1 client the gateway talks to workers with.
//!
//! It sends and classifies failures; choosing a worker and retrying belong to the dispatcher.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;

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

/// Cheap to clone: every clone shares one client and its connection pool, and a clone is a
/// reference count (a request's gateway-side counter holds one).
#[derive(Debug, Clone)]
pub struct Upstream {
    client: Arc<Client<HttpConnector, Full<Bytes>>>,
    /// `routing.request_timeout_ms`, which a reload may change: shared by every clone. Relaxed:
    /// an independent setting.
    request_timeout_ms: Arc<AtomicU64>,
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
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(routing.connect_timeout()));
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Self {
            client: Arc::new(client),
            request_timeout_ms: Arc::new(AtomicU64::new(routing.request_timeout_ms)),
        }
    }

    /// Attempts started from now on wait as `routing` says (its connect timeout is the
    /// connection pool's, fixed at start).
    pub fn reconfigure(&self, routing: &RoutingConfig) {
        self.request_timeout_ms
            .store(routing.request_timeout_ms, Ordering::Relaxed);
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
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = uri;
        let headers = request.headers_mut();
        if let Some(host) = to.host {
            headers.insert(HOST, host.clone());
        }
        headers.insert(CONTENT_TYPE, JSON);
        if let Some(value) = to.authorization {
            headers.insert(AUTHORIZATION, value.clone());
        }
        if let Some(id) = carried
            .request_id
            .and_then(|id| HeaderValue::from_str(id).ok())
        {
            headers.insert("x-request-id", id);
        }
        if let Some(trace) = carried.trace {
            trace.write(headers);
        }
        match tokio::time::timeout_at(deadline, self.client.request(request)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(error)) => Err(classify(to.worker, &error)),
            Err(_) => Err(UpstreamError::Timeout {
                worker: to.worker.to_owned(),
            }),
        }
    }

    /// GETs a small document (health, model list, metrics) within `timeout`.
    pub async fn get(
        &self,
        worker: &str,
        uri: Uri,
        authorization: Option<&HeaderValue>,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), UpstreamError> {
        let exchange = async {
            let mut request = Request::get(uri)
                .body(Full::new(Bytes::new()))
                .map_err(|e| UpstreamError::Transport {
                    worker: worker.to_owned(),
                    detail: e.to_string(),
                })?;
            if let Some(value) = authorization {
                request.headers_mut().insert(AUTHORIZATION, value.clone());
            }
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| classify(worker, &e))?;
            let status = response.status();
            let body =
                response
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| UpstreamError::Transport {
                        worker: worker.to_owned(),
                        detail: e.to_string(),
                    })?;
            Ok((status, body.to_bytes()))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(UpstreamError::Timeout {
                    worker: worker.to_owned(),
                })
            })
    }
}

/// A response body in full, by `deadline`.
pub async fn collect(
    body: Incoming,
    worker: &str,
    deadline: Instant,
) -> Result<Bytes, UpstreamError> {
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

fn classify(worker: &str, error: &hyper_util::client::legacy::Error) -> UpstreamError {
    let detail = std::error::Error::source(error)
        .map_or_else(|| error.to_string(), |source| source.to_string());
    if error.is_connect() {
        UpstreamError::Connect {
            worker: worker.to_owned(),
            detail,
        }
    } else {
        UpstreamError::Transport {
            worker: worker.to_owned(),
            detail,
        }
    }
}
