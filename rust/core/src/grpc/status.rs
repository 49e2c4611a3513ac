//! The gRPC status of an error: the gateway's own (`ApiError`), or a worker's error answer or
//! in-stream error event. Its code follows the HTTP status, its message is the error's, and its
//! details carry the OpenAI error code (`google.rpc.ErrorInfo`, domain `tokengate`) and, for a
//! client that must wait, when to retry (`google.rpc.RetryInfo`).

use std::collections::HashMap;
use std::time::Duration;

use http::StatusCode;
use serde::Deserialize;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::ApiError;

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
    /// OpenAI's codes are strings; vLLM's is the HTTP status, a number.
    #[serde(default)]
    code: Option<serde_json::Value>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
}

impl Body {
    fn reason(self) -> (String, Option<String>) {
        let code = match self.code {
            Some(serde_json::Value::String(code)) => Some(code),
            _ => None,
        };
        (self.message, code.or(self.kind))
    }
}

/// The status of the gateway's own error.
pub fn of_error(error: &ApiError) -> Status {
    let reason = error.code().unwrap_or(error.kind());
    // Whole milliseconds, as HTTP's `retry-after-ms` gives it.
    let retry = error
        .retry_after()
        .map(|d| Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)));
    with_details(
        code(error.status()),
        error.to_string(),
        Some(reason.to_owned()),
        retry,
    )
}

/// The status of the gateway's own error ending a stream that had already begun.
pub fn of_stream_error(error: &ApiError) -> Status {
    let reason = error.code().unwrap_or(error.kind());
    with_details(
        Code::Unavailable,
        error.to_string(),
        Some(reason.to_owned()),
        None,
    )
}

/// The status of a worker's error answer (`status`, `body`).
pub fn from_worker(status: StatusCode, body: &[u8]) -> Status {
    let (message, reason) = match serde_json::from_slice::<Envelope>(body) {
        Ok(Envelope { error }) => error.reason(),
        // Not OpenAI's shape (a worker's plain-text error): its text, as it came.
        Err(_) => (String::from_utf8_lossy(body).into_owned(), None),
    };
    with_details(code(status), message, reason, None)
}

/// The status of a worker's error event in a stream that had already begun.
pub fn from_worker_event(data: &[u8]) -> Status {
    match serde_json::from_slice::<Envelope>(data) {
        Ok(Envelope { error }) => {
            let (message, reason) = error.reason();
            with_details(Code::Unavailable, message, reason, None)
        }
        Err(_) => Status::unavailable(String::from_utf8_lossy(data).into_owned()),
    }
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
        let error = ApiError::RateLimited {
            whose: "this tenant",
            limit: 5,
            unit: "requests",
            retry_after: Duration::from_micros(1_500_400),
        };
        let status = of_error(&error);
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(status.message(), error.to_string());
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
    fn a_workers_error_keeps_its_message_and_code() {
        let body =
            br#"{"error":{"message":"too long","type":"BadRequestError","param":null,"code":400}}"#;
        let status = from_worker(StatusCode::BAD_REQUEST, body);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "too long");
        let plain = from_worker(StatusCode::INTERNAL_SERVER_ERROR, b"boom");
        assert_eq!((plain.code(), plain.message()), (Code::Internal, "boom"));
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
