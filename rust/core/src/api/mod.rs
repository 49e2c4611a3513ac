//! The OpenAI-compatible HTTP surface.

mod dispatch;
mod handlers;
#[cfg(test)]
mod props;
pub mod request;

pub(crate) use dispatch::dispatch;
pub use handlers::app;
