//! Where an admitted request gets its worker. `admission` places each attempt at once when a
//! worker has room, else queues it per model until one does; `fair` orders a queue between
//! tenants.

mod admission;
mod fair;

pub use admission::{Placement, QueueLimits, Scheduler};
pub use fair::{FairQueue, Ticket};
