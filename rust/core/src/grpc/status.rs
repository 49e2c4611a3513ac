//! The gRPC status of an answer the pipeline gave as an HTTP error: its code from the HTTP
//! status, its message from the OpenAI error body, and in its details the OpenAI error code
//! (`google.rpc.ErrorInfo`, domain `tokengate`) and, for a client that must wait, when to retry
//! (`google.rpc.RetryInfo`, from `retry-after-ms`).

use std::collections::HashMap;
use std::time::Duration;

use http::{HeaderMap, StatusCode};
use serde::Deserialize;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The details' `ErrorInfo` domain.
const DOMAIN: &str = "tokengate";

/// The code for an HTTP status: the mapping gRPC's own HTTP bridge documents, made finer where
/// the gateway's answers say more (403, 413 and 422, 504).
pub fn code(status: StatusCode) -> Code {
    match status.as_u16() {
        400 | 413 | 422 => Code::InvalidArgument,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::NotFound,
        408 | 504 => Code::DeadlineExceeded,
        429 => Code::ResourceExhausted,
        499 => Code::Cancelled,
        502 | 503 => Code::Unavailable,
        _ => Code::Internal,
    }
}

#[derive(Deserialize)]
struct Envelope {
    error: Body,
}

#[derive(Deserialize)]
struct Body {
    #[serde(default)]
    message: String,
    #[serde(default)]
    code: Option<String>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
}

/// The status of an HTTP error answer (`status`, `headers`, `body`).
pub fn from_http(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Status {
    let (message, reason) = match serde_json::from_slice::<Envelope>(body) {
        Ok(Envelope { error }) => (error.message, error.code.or(error.kind)),
        // Not OpenAI's shape (a worker's plain-text error): its text, as it came.
        Err(_) => (String::from_utf8_lossy(body).into_owned(), None),
    };
    with_details(code(status), message, reason, retry_after(headers))
}

/// The status of an error event in a stream that had already begun.
pub fn from_event(data: &[u8]) -> Option<Status> {
    let Envelope { error } = serde_json::from_slice(data).ok()?;
    let reason = error.code.or(error.kind);
    Some(with_details(Code::Unavailable, error.message, reason, None))
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis)
}

fn with_details(
    code: Code,
    message: String,
    reason: Option<String>,
    retry: Option<Duration>,
) -> Status {
    let mut details = ErrorDetails::new();
    if let Some(reason) = reason {
        details.set_error_info(reason, DOMAIN, HashMap::<String, String>::new());
    }
    if retry.is_some() {
        details.set_retry_info(retry);
    }
    Status::with_error_details(code, message, details)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_limit_is_resource_exhausted_with_when_to_retry() {
        let mut headers = HeaderMap::new();
        headers.insert("retry-after-ms", http::HeaderValue::from_static("1500"));
        let body = br#"{"error":{"message":"slow down","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#;
        let status = from_http(StatusCode::TOO_MANY_REQUESTS, &headers, body);
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(status.message(), "slow down");
        let details = status.get_error_details();
        assert_eq!(
            details.retry_info().and_then(|r| r.retry_delay),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            details.error_info().map(|i| i.reason.as_str()),
            Some("rate_limit_exceeded")
        );
    }

    #[test]
    fn codes_follow_the_http_status() {
        for (http, grpc) in [
            (400, Code::InvalidArgument),
            (401, Code::Unauthenticated),
            (403, Code::PermissionDenied),
            (404, Code::NotFound),
            (503, Code::Unavailable),
            (504, Code::DeadlineExceeded),
            (500, Code::Internal),
        ] {
            assert_eq!(code(StatusCode::from_u16(http).unwrap_or_default()), grpc);
        }
    }
}
