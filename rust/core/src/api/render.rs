//! The HTTP rendering of the pipeline's outcome: a worker's answer byte for byte, its stream as
//! SSE, or the gateway's OpenAI-shaped error; every answer to an admitted request carries its
//! `x-request-id` (the worker's, else the one its usage event is recorded under) and the
//! `x-ratelimit-*` headers of the limits that apply. Of the worker's headers, its content type,
//! `x-request-id` and vLLM's `metadata` (of binary embeddings) reach the client.

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::header::CONTENT_TYPE;
use http::{HeaderName, HeaderValue};

use crate::pipeline::{Dispatched, Head, Outcome};

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const METADATA: HeaderName = HeaderName::from_static(crate::pipeline::METADATA);

pub(super) fn render(dispatched: Dispatched) -> Response {
    let Dispatched {
        request_id,
        rate,
        outcome,
    } = dispatched;
    let mut response = match outcome {
        Outcome::Refused(error) | Outcome::Failed(error) => error.into_response(),
        Outcome::Answer(answer) => with_head(Response::new(Body::from(answer.body)), &answer.head),
        Outcome::Stream { head, events } => with_head(Response::new(events.into_body()), &head),
    };
    let headers = response.headers_mut();
    if let Some(rate) = rate {
        rate.write(headers);
    }
    if let Some(id) = request_id.and_then(|id| HeaderValue::from_str(&id).ok()) {
        headers.entry(REQUEST_ID).or_insert(id);
    }
    response
}

fn with_head(mut response: Response, head: &Head) -> Response {
    *response.status_mut() = head.status;
    let headers = response.headers_mut();
    if let Some(value) = &head.content_type {
        headers.insert(CONTENT_TYPE, value.clone());
    }
    if let Some(value) = &head.request_id {
        headers.insert(REQUEST_ID, value.clone());
    }
    if let Some(value) = &head.metadata {
        headers.insert(METADATA, value.clone());
    }
    response
}
