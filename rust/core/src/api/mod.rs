//! The OpenAI-compatible HTTP surface.

mod handlers;
mod render;

pub use handlers::app;
