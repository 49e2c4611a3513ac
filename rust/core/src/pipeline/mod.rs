//! The request pipeline every surface shares: admission against quotas, the worker attempts, and
//! the typed outcome that the HTTP and gRPC surfaces each render.

mod attempt;
mod dispatch;
mod exchange;
mod outcome;

pub use dispatch::dispatch;
pub use outcome::{Dispatched, Head, METADATA, Outcome};
