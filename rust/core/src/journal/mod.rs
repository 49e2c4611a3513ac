//! The durable usage journal: every usage event on disk before its response ends, and what a
//! crashed process left turned back into events at the next start.

mod record;
mod writer;

pub use record::{Ended, Progress, Record, Started};
pub use writer::{Journal, Recovered};
