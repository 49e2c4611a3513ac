//! The OpenAI-compatible HTTP surface.

mod dispatch;
mod handlers;
pub mod request;

pub use handlers::app;
