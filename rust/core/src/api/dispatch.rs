//! Sends one request to a worker, retrying on another worker until the first byte is relayed.
//!
//! A request may move to another worker while nothing has reached the client: when a worker
//! cannot be reached, breaks the connection, answers 5xx, or (streaming) fails before its first
//! event. From the first relayed byte on, the response belongs to that worker.

use std::sync::Arc;

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;

use super::handlers::reject;
use super::request::InferenceRequest;
use crate::auth::Principal;
use crate::error::ApiError;
use crate::metering::{Counter, MeterGuard, Status};
use crate::quota::{Estimate, Exceeded, QuotaError, RateHeaders, format_reset};
use crate::relay::{buffered_response, streaming_response};
use crate::router::Availability;
use crate::state::AppState;
use crate::upstream::UpstreamError;

/// Why the last attempt did not produce a response for the client.
enum Failure {
    Gateway(ApiError),
    /// A worker's own 5xx, relayed as is when no attempt is left.
    Worker {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    },
}

/// Admits a parsed request against its principal's quotas and routes it. Every response of a
/// dispatched request carries its `x-request-id` (the client's own, or the id of its usage
/// event), so a client can name the event it paid for, and the `x-ratelimit-*` headers of the
/// limits that apply.
pub async fn dispatch(
    state: &AppState,
    request: InferenceRequest,
    principal: &Principal,
) -> Response {
    if matches!(
        state.registry.availability(&request.model),
        Availability::Unknown
    ) {
        return reject(state, ApiError::ModelNotFound(request.model));
    }
    let mut meter = MeterGuard::begin(
        state.meter.clone(),
        principal,
        &request.model,
        request.endpoint,
        request.stream,
        request.client_request_id.as_deref(),
    );
    let estimate = Estimate::of(
        &request,
        state.registry.context_len(&request.model),
        state.quota.config().default_max_tokens,
    );
    let admitted = state
        .quota
        .admit(principal, &request.model, &estimate, meter.event_id())
        .await;
    let rate_headers = match admitted {
        Ok(Some(reservation)) => {
            let headers = *reservation.headers();
            meter.attach(reservation);
            headers
        }
        Ok(None) => RateHeaders::default(),
        Err(error) => {
            meter.discard();
            return refuse(state, error, &request.model, &estimate);
        }
    };
    let request_id = HeaderValue::from_str(meter.request_id()).ok();
    let mut response = attempt(state, &request, meter).await;
    let headers = response.headers_mut();
    rate_headers.write(headers);
    if let Some(id) = request_id {
        headers
            .entry(HeaderName::from_static("x-request-id"))
            .or_insert(id);
    }
    response
}

/// The answer to a request its quotas refused, with the `x-ratelimit-*` headers as they stand.
fn refuse(state: &AppState, error: QuotaError, model: &str, estimate: &Estimate) -> Response {
    let whose = |on_key: bool| {
        if on_key {
            "this API key"
        } else {
            "this tenant"
        }
    };
    let (error, headers) = match error {
        QuotaError::ModelNotAllowed => (ApiError::ModelNotFound(model.to_owned()), None),
        QuotaError::NotPriced => (ApiError::ModelNotPriced(model.to_owned()), None),
        QuotaError::Unavailable => (ApiError::QuotaUnavailable, None),
        QuotaError::TooManySequences { limit, on_key } => (
            ApiError::TooManySequences {
                sequences: estimate.sequences,
                limit,
                whose: whose(on_key),
            },
            None,
        ),
        QuotaError::Exceeded {
            refusal,
            on_key,
            limit,
            period,
        } => {
            let whose = whose(on_key);
            let retry_after = refusal.retry_after;
            let renews = format_reset(retry_after);
            let error = match refusal.exceeded {
                Exceeded::Concurrency => ApiError::RateLimited {
                    message: format!(
                        "Rate limit reached for {whose}: {limit} concurrent requests. \
                         Retry when one of them has finished."
                    ),
                    retry_after,
                },
                Exceeded::Requests | Exceeded::Tokens => ApiError::RateLimited {
                    message: format!(
                        "Rate limit reached for {whose}: {limit} {} per minute. Please try again \
                         in {}.",
                        if refusal.exceeded == Exceeded::Requests {
                            "requests"
                        } else {
                            "tokens"
                        },
                        format_reset(retry_after)
                    ),
                    retry_after,
                },
                Exceeded::TokenBudget => {
                    let hint = estimate
                        .max_tokens_within(refusal.left)
                        .map(|k| format!(" It would fit with `max_tokens` of at most {k}."))
                        .unwrap_or_default();
                    ApiError::QuotaExceeded {
                        message: format!(
                            "This request may use up to {} tokens (its prompt and n × prompts × \
                             max_tokens), more than the {} left of the token budget of {whose} \
                             for the current {} ({limit} tokens).{hint} The budget renews in \
                             {renews}.",
                            estimate.worst_tokens(),
                            refusal.left,
                            period.as_str(),
                        ),
                        retry_after,
                    }
                }
                Exceeded::MoneyBudget => ApiError::QuotaExceeded {
                    message: format!(
                        "This request may cost more than the {} micro-units left of the money \
                         budget of {whose} for the current {} ({limit} micro-units); lower \
                         `max_tokens` or `n`. The budget renews in {renews}.",
                        refusal.left,
                        period.as_str(),
                    ),
                    retry_after,
                },
            };
            (error, Some(refusal.headers))
        }
    };
    let mut response = reject(state, error);
    if let Some(headers) = headers {
        headers.write(response.headers_mut());
    }
    response
}

/// Tries workers in turn until one answers or the attempts run out.
async fn attempt(state: &AppState, request: &InferenceRequest, mut meter: MeterGuard) -> Response {
    let body = request.upstream_body();
    let max_attempts = state.config.routing.max_attempts as usize;
    let mut tried: Vec<usize> = Vec::with_capacity(max_attempts);
    let mut failure = Failure::Gateway(ApiError::NoHealthyWorker(request.model.clone()));
    while tried.len() < max_attempts {
        let Some((index, worker)) = state.registry.pick(&request.model, &tried) else {
            break;
        };
        state.meter.metrics().attempt(!tried.is_empty());
        tried.push(index);
        meter.set_worker(
            worker.url.clone(),
            Counter::new(
                state.upstream.clone(),
                worker.clone(),
                request.endpoint,
                request.body(),
            ),
        );
        let outstanding = worker.begin();
        let deadline = state.upstream.deadline();
        let sent = state
            .upstream
            .post_json(
                &worker.url,
                worker.uri(request.endpoint),
                worker.authorization.as_ref(),
                body.clone(),
                request.client_request_id.as_deref(),
                deadline,
            )
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(error) => {
                tracing::warn!(%error, "worker attempt failed");
                failure = Failure::Gateway(if matches!(error, UpstreamError::Connect { .. }) {
                    // Down, not misbehaving: out of rotation until a probe succeeds, and if no
                    // worker is left the answer is "no healthy worker", not a bad gateway.
                    worker.set_healthy(false);
                    ApiError::NoHealthyWorker(request.model.clone())
                } else {
                    gateway_error(error)
                });
                continue;
            }
        };
        if !request.stream {
            state.meter.metrics().first_byte(meter.elapsed());
        }
        let (parts, incoming) = response.into_parts();
        if request.stream && parts.status.is_success() {
            match first_chunk(incoming, &worker.url, deadline).await {
                Ok((first, rest)) => {
                    state.meter.metrics().first_byte(meter.elapsed());
                    return streaming_response(
                        (parts.status, &parts.headers),
                        first,
                        rest,
                        meter,
                        outstanding,
                        request,
                        state.config.routing.stream_idle_timeout(),
                    );
                }
                Err(error) => {
                    tracing::warn!(%error, "worker failed before its first event");
                    failure = Failure::Gateway(gateway_error(error));
                    continue;
                }
            }
        }
        let collected = collect(incoming, &worker.url, deadline).await;
        drop(outstanding);
        match collected {
            Ok(body) if parts.status.is_server_error() => {
                failure = Failure::Worker {
                    status: parts.status,
                    headers: parts.headers,
                    body,
                };
            }
            Ok(body) => {
                return buffered_response(parts.status, &parts.headers, body, meter).await;
            }
            Err(error) => failure = Failure::Gateway(gateway_error(error)),
        }
    }
    match failure {
        Failure::Worker {
            status,
            headers,
            body,
        } => buffered_response(status, &headers, body, meter).await,
        Failure::Gateway(error) => {
            meter.set_http_status(error.status().as_u16());
            meter.finish(Status::Failed);
            error.into_response()
        }
    }
}

/// The client's answer to a failed attempt; the error itself, which names the worker, is logged.
fn gateway_error(error: UpstreamError) -> ApiError {
    match error {
        UpstreamError::Timeout { .. } => ApiError::UpstreamTimeout,
        UpstreamError::Connect { .. } => ApiError::Upstream("the worker could not be reached"),
        UpstreamError::Transport { .. } => {
            ApiError::Upstream("the worker broke the connection before it answered")
        }
    }
}

/// Waits for the first non-empty body chunk of a stream.
async fn first_chunk(
    mut body: Incoming,
    worker: &str,
    deadline: Instant,
) -> Result<(Bytes, Incoming), UpstreamError> {
    let wait = async {
        loop {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data()
                        && !data.is_empty()
                    {
                        return Ok(data);
                    }
                }
                Some(Err(error)) => {
                    return Err(UpstreamError::Transport {
                        worker: worker.to_owned(),
                        detail: error.to_string(),
                    });
                }
                None => {
                    return Err(UpstreamError::Transport {
                        worker: worker.to_owned(),
                        detail: "empty stream".to_owned(),
                    });
                }
            }
        }
    };
    match tokio::time::timeout_at(deadline, wait).await {
        Ok(Ok(first)) => Ok((first, body)),
        Ok(Err(error)) => Err(error),
        Err(_) => Err(UpstreamError::Timeout {
            worker: worker.to_owned(),
        }),
    }
}

async fn collect(
    body: Incoming,
    worker: &Arc<str>,
    deadline: Instant,
) -> Result<Bytes, UpstreamError> {
    match tokio::time::timeout_at(deadline, body.collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(error)) => Err(UpstreamError::Transport {
            worker: worker.to_string(),
            detail: error.to_string(),
        }),
        Err(_) => Err(UpstreamError::Timeout {
            worker: worker.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_attempt_does_not_name_the_worker() {
        let worker = "http://10.0.0.11:8000".to_owned();
        for error in [
            UpstreamError::Connect {
                worker: worker.clone(),
                detail: "connection refused (os error 111) at 10.0.0.11".into(),
            },
            UpstreamError::Transport {
                worker: worker.clone(),
                detail: "connection reset".into(),
            },
            UpstreamError::Timeout { worker },
        ] {
            let body = String::from_utf8(gateway_error(error).body()).unwrap_or_default();
            assert!(!body.contains("10.0.0.11"), "{body}");
            assert!(body.contains("upstream"), "{body}");
        }
    }
}
