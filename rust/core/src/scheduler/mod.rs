//! Where an admitted request gets its worker. `admission` places each attempt at once when a
//! worker has room, else queues it per model until one does; `classes` orders a model's queue
//! between priority classes, and `fair` each class between tenants.

mod admission;
mod classes;
mod fair;

pub use admission::{Claim, Placement, QueueLimits, Scheduler};
pub use classes::{ClassQueue, ClassTicket};
pub use fair::{FairQueue, Ticket};
