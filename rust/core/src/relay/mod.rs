//! Relaying a worker's response to the client while metering it.
//!
//! `sse` splits a byte stream into events, `frame` decides what each event becomes for this
//! client, and `stream` drives the two over a live upstream body.

mod frame;
#[cfg(test)]
mod props;
mod sse;
mod stream;

pub(crate) use sse::SseSplitter;
pub use stream::{buffered_response, streaming_response};
