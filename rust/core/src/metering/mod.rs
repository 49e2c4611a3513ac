//! Recording usage events: one per dispatched request, made by an RAII guard on every path.
//!
//! Counts come from the worker's own `usage` (for streams, the cumulative usage on the last chunk
//! relayed to the client); for a request the worker took but reported no usage for, the gateway
//! counts them itself (`counting`). Events wait in the meter's queue (and, with a journal, on
//! disk) until the control plane drains them into the ledger; this module neither prices nor
//! stores them. The event itself is `crate::usage`'s. Requests refused to a known principal are
//! counted apart (`refusals`): they bill nothing.

// Every number here may have come from a client or a worker: no arithmetic on one may wrap.
#![deny(clippy::arithmetic_side_effects)]

mod counting;
mod guard;
mod meter;
mod overhead;
mod queue;
mod refusals;

pub use counting::{Counter, Relayed, TOKENIZE_TIMEOUT};
pub use guard::{MeterGuard, SettleHook};
pub use meter::{Meter, Synced};
pub use overhead::{Arrival, Overhead};
pub use refusals::{Refusals, Refused};
