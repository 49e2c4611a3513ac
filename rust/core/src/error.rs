//! Errors the gateway itself answers with, rendered as OpenAI-shaped JSON bodies.
//!
//! A worker's own error responses are not represented here: they are relayed byte for byte.

use std::time::Duration;

use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Every error the gateway produces on its own, one variant per distinct client-visible answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// Malformed JSON, a wrong field type, a missing required field.
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<&'static str>,
    },
    #[error("missing API key: send it as `Authorization: Bearer <key>`")]
    MissingKey,
    #[error("invalid API key")]
    InvalidKey,
    /// Also the answer for a model the caller's allow-list excludes, so a tenant cannot learn
    /// which models exist beyond its own.
    #[error("the model `{0}` does not exist or you do not have access to it")]
    ModelNotFound(String),
    /// Over a concurrency limit of `whose` ("this API key", "this tenant").
    #[error(
        "Rate limit reached for {whose}: {limit} concurrent requests. Retry when one of them has \
         finished."
    )]
    ConcurrencyLimited {
        whose: &'static str,
        limit: u64,
        retry_after: Duration,
    },
    /// Over a requests-per-minute or tokens-per-minute limit; `unit` is "requests" or "tokens".
    #[error(
        "Rate limit reached for {whose}: {limit} {unit} per minute. Please try again in {}.",
        format_reset(*retry_after)
    )]
    RateLimited {
        whose: &'static str,
        limit: u64,
        unit: &'static str,
        retry_after: Duration,
    },
    /// The request's worst case (`worst` tokens) does not fit in what is `left` of a token
    /// budget; `fits` is the largest `max_tokens` that would.
    #[error(
        "This request may use up to {worst} tokens (its prompt and n × prompts × max_tokens), \
         more than the {left} left of the token budget of {whose} for the current {period} \
         ({limit} tokens).{} The budget renews in {}.",
        fits.map(|k| format!(" It would fit with `max_tokens` of at most {k}.")).unwrap_or_default(),
        format_reset(*retry_after)
    )]
    TokenBudgetExceeded {
        worst: u64,
        left: u64,
        fits: Option<u64>,
        whose: &'static str,
        period: &'static str,
        limit: u64,
        retry_after: Duration,
    },
    /// The request's worst-case cost does not fit in what is `left` of a money budget.
    #[error(
        "This request may cost more than the {left} micro-units left of the money budget of \
         {whose} for the current {period} ({limit} micro-units); lower `max_tokens` or `n`. The \
         budget renews in {}.",
        format_reset(*retry_after)
    )]
    MoneyBudgetExceeded {
        left: u64,
        whose: &'static str,
        period: &'static str,
        limit: u64,
        retry_after: Duration,
    },
    #[error(
        "the model `{0}` has no price, so the money budget that applies to this key cannot be \
         enforced; ask the operator to set one"
    )]
    ModelNotPriced(String),
    /// More sequences (`n` × prompts) in one request than a policy allows.
    #[error(
        "this request generates {sequences} sequences (n × prompts), more than the {limit} that \
         {whose} may ask for in one request"
    )]
    TooManySequences {
        sequences: u64,
        limit: u64,
        whose: &'static str,
    },
    #[error("quota counters are unreachable; try again shortly")]
    QuotaUnavailable,
    /// Every worker serving the model is busy and its queue holds all it may.
    #[error("every worker serving this model is busy and its queue is full; try again shortly")]
    QueueFull { retry_after: Duration },
    /// Every worker serving the model stayed busy for as long as a request may wait.
    #[error(
        "every worker serving this model stayed busy for {}, as long as a request may wait; \
         try again shortly",
        format_reset(*waited)
    )]
    QueueTimeout {
        waited: Duration,
        retry_after: Duration,
    },
    #[error("unknown route")]
    UnknownRoute,
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    #[error("request body exceeds the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// The client took longer than the body read timeout to send its body.
    #[error("the request body did not arrive within {0:?}")]
    RequestTimeout(Duration),
    #[error("no healthy worker serves the model `{0}`")]
    NoHealthyWorker(String),
    /// What went wrong, in words for the client: never a worker's address or the transport's
    /// own message (those are logged), which are the fleet's insides.
    #[error("upstream worker failed: {0}")]
    Upstream(&'static str),
    #[error("upstream worker timed out")]
    UpstreamTimeout,
    #[error("the gateway is shutting down")]
    ShuttingDown,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self::BadRequest {
            message: message.into(),
            param,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } | Self::TooManySequences { .. } => StatusCode::BAD_REQUEST,
            Self::MissingKey | Self::InvalidKey => StatusCode::UNAUTHORIZED,
            Self::ModelNotFound(_) | Self::UnknownRoute => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::ConcurrencyLimited { .. }
            | Self::RateLimited { .. }
            | Self::TokenBudgetExceeded { .. }
            | Self::MoneyBudgetExceeded { .. }
            | Self::QueueFull { .. }
            | Self::QueueTimeout { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::ModelNotPriced(_) => StatusCode::FORBIDDEN,
            Self::QuotaUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::NoHealthyWorker(_) | Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Self::Upstream(_) => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// OpenAI's `error.type`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::BadRequest { .. }
            | Self::TooManySequences { .. }
            | Self::MissingKey
            | Self::InvalidKey
            | Self::ModelNotFound(_)
            | Self::UnknownRoute
            | Self::MethodNotAllowed
            | Self::PayloadTooLarge { .. }
            | Self::RequestTimeout(_) => "invalid_request_error",
            Self::ConcurrencyLimited { .. }
            | Self::RateLimited { .. }
            | Self::QueueFull { .. }
            | Self::QueueTimeout { .. } => "rate_limit_exceeded",
            Self::TokenBudgetExceeded { .. } | Self::MoneyBudgetExceeded { .. } => {
                "insufficient_quota"
            }
            Self::ModelNotPriced(_) => "permission_error",
            Self::NoHealthyWorker(_) | Self::ShuttingDown | Self::QuotaUnavailable => {
                "service_unavailable"
            }
            Self::Upstream(_) | Self::UpstreamTimeout => "upstream_error",
        }
    }

    /// OpenAI's `error.code`: a stable machine-readable string.
    pub fn code(&self) -> Option<&'static str> {
        match self {
            Self::BadRequest { .. } => None,
            Self::TooManySequences { .. } => Some("too_many_sequences"),
            Self::MissingKey => Some("missing_api_key"),
            Self::InvalidKey => Some("invalid_api_key"),
            Self::ModelNotFound(_) => Some("model_not_found"),
            Self::UnknownRoute => Some("unknown_route"),
            Self::MethodNotAllowed => Some("method_not_allowed"),
            Self::PayloadTooLarge { .. } => Some("request_too_large"),
            Self::RequestTimeout(_) => Some("request_timeout"),
            Self::ConcurrencyLimited { .. } | Self::RateLimited { .. } => {
                Some("rate_limit_exceeded")
            }
            Self::TokenBudgetExceeded { .. } | Self::MoneyBudgetExceeded { .. } => {
                Some("insufficient_quota")
            }
            Self::ModelNotPriced(_) => Some("model_not_priced"),
            Self::QuotaUnavailable => Some("quota_unavailable"),
            Self::QueueFull { .. } => Some("queue_full"),
            Self::QueueTimeout { .. } => Some("queue_timeout"),
            Self::NoHealthyWorker(_) => Some("no_healthy_worker"),
            Self::ShuttingDown => Some("shutting_down"),
            Self::Upstream(_) => Some("upstream_failed"),
            Self::UpstreamTimeout => Some("upstream_timeout"),
        }
    }

    /// Why a request was refused, for metrics: the `code`, or `bad_request` when it has none.
    pub fn reason(&self) -> &'static str {
        self.code().unwrap_or("bad_request")
    }

    fn param(&self) -> Option<&'static str> {
        match self {
            Self::BadRequest { param, .. } => *param,
            Self::TooManySequences { .. } => Some("n"),
            Self::ModelNotFound(_) | Self::ModelNotPriced(_) => Some("model"),
            _ => None,
        }
    }

    /// The body as JSON bytes: `{"error":{"message","type","param","code"}}`.
    pub fn body(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Envelope<'a> {
            error: Body<'a>,
        }
        #[derive(Serialize)]
        struct Body<'a> {
            message: String,
            r#type: &'a str,
            param: Option<&'a str>,
            code: Option<&'a str>,
        }
        let envelope = Envelope {
            error: Body {
                message: self.to_string(),
                r#type: self.kind(),
                param: self.param(),
                code: self.code(),
            },
        };
        // Serialising a struct of strings cannot fail.
        serde_json::to_vec(&envelope).unwrap_or_default()
    }

    /// The same error as one SSE event, for failures after a stream's 200 was sent.
    pub fn sse_frame(&self) -> Vec<u8> {
        let mut frame = b"data: ".to_vec();
        frame.extend_from_slice(&self.body());
        frame.extend_from_slice(b"\n\ndata: [DONE]\n\n");
        frame
    }
}

impl ApiError {
    /// When a refused client may try again, for `Retry-After` and OpenAI's `retry-after-ms`.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::ConcurrencyLimited { retry_after, .. }
            | Self::RateLimited { retry_after, .. }
            | Self::TokenBudgetExceeded { retry_after, .. }
            | Self::MoneyBudgetExceeded { retry_after, .. }
            | Self::QueueFull { retry_after }
            | Self::QueueTimeout { retry_after, .. } => Some(*retry_after),
            Self::QuotaUnavailable => Some(Duration::from_secs(1)),
            _ => None,
        }
    }
}

/// A duration as OpenAI writes `x-ratelimit-reset-*`: `250ms`, `1.5s`, `6m0s`, `1h2m3s`.
pub fn format_reset(reset: Duration) -> String {
    let ms = reset.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = reset.as_secs();
    if secs < 60 {
        let text = format!("{:.3}", reset.as_secs_f64());
        return format!("{}s", text.trim_end_matches('0').trim_end_matches('.'));
    }
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else {
        format!("{m}m{s}s")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), self.body()).into_response();
        let headers = response.headers_mut();
        if matches!(self, Self::RequestTimeout(_)) {
            // The rest of the body may still be on its way: the connection cannot be reused.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(wait) = self.retry_after() {
            // `Retry-After` is whole seconds: round up so a client waiting it is never early.
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            headers.insert(
                HeaderName::from_static("retry-after-ms"),
                HeaderValue::from(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_openai_shaped() {
        let body: serde_json::Value =
            serde_json::from_slice(&ApiError::ModelNotFound("m".into()).body()).unwrap_or_default();
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["param"], "model");
        assert_eq!(body["error"]["code"], "model_not_found");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("`m`"))
        );
    }

    #[test]
    fn statuses() {
        assert_eq!(ApiError::InvalidKey.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            ApiError::PayloadTooLarge { limit: 1 }.status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert_eq!(
            ApiError::NoHealthyWorker("m".into()).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
