//! Relaying a worker's response to the client while metering it.
//!
//! `sse` splits a byte stream into events, `frame` decides what each event becomes for this
//! client, and `stream` drives the two over a live upstream body, read by read, as typed
//! `Relayed` reads that each surface renders (`body`: as an HTTP body). For a surface that renders its own messages,
//! `answer` reads each choice event once, for its content and its usage together.

pub mod answer;
mod body;
mod frame;
#[cfg(test)]
mod props;
mod sse;
mod stream;

pub use stream::{DONE, End, EventStream, Relayed, complete};
