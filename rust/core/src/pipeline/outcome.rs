//! What the pipeline answers a request with, before any surface renders it.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, StatusCode};

use crate::error::ApiError;
use crate::quota::RateHeaders;
use crate::relay::EventStream;
use crate::usage::Usage;

/// A dispatched request's outcome, with what every answer to it carries.
pub struct Dispatched {
    /// The id its usage event is recorded under (the client's request id, else the event's id);
    /// `None` for a request refused before it had one.
    pub request_id: Option<Arc<str>>,
    /// The rate limits that apply, as they stood at admission (or at the refusal).
    pub rate: Option<RateHeaders>,
    pub outcome: Outcome,
}

pub enum Outcome {
    /// Refused before any worker was involved (unknown model, a quota): no usage event.
    Refused(ApiError),
    /// No worker produced an answer; the request's event is recorded as failed.
    Failed(ApiError),
    /// A worker's complete answer (a success, or its own error), metered and on its way to the
    /// ledger.
    Answer(Answer),
    /// A worker's stream, relayed and metered as the surface reads it.
    Stream {
        head: Head,
        events: Box<EventStream>,
    },
}

/// The worker's status line and the headers of its answer that reach the client.
#[derive(Debug, Clone)]
pub struct Head {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    /// The worker's `x-request-id`, when it sent one.
    pub request_id: Option<HeaderValue>,
    /// vLLM's `metadata`, when it sent one: the shapes and usage of binary embeddings
    /// (`encoding_format: "bytes"`), whose body is only the vectors.
    pub metadata: Option<HeaderValue>,
}

pub struct Answer {
    pub head: Head,
    /// The worker's body, byte for byte.
    pub body: Bytes,
    /// The usage the worker reported in it.
    pub usage: Option<Usage>,
}

/// vLLM's header of binary embeddings.
pub const METADATA: &str = "metadata";

impl Head {
    pub fn of(status: StatusCode, headers: &http::HeaderMap) -> Self {
        Self {
            status,
            content_type: headers.get(http::header::CONTENT_TYPE).cloned(),
            request_id: headers.get("x-request-id").cloned(),
            metadata: headers.get(METADATA).cloned(),
        }
    }
}
