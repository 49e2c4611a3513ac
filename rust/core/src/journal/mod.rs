//! The durable usage journal: every usage event written before its response ends, synced at
//! once or within a tick, and what a crashed process left turned back into events at the next
//! start.

mod frame;
mod record;
mod segments;
mod state;
mod syncer;
#[cfg(test)]
mod tests;
mod writer;

pub use crate::config::Durability;
pub use frame::Names;
pub use record::{Ended, Line, Progress, Record, Started};
pub use segments::read_dir;
pub use state::Slot;
pub use writer::{Journal, Options, Recovered};
