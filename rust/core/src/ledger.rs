//! The ledger as the data plane sees it: the control plane owns it, and installs a reader of a
//! tenant's priced events for the surfaces that serve them (gRPC's `UsageService`); a SQLite
//! ledger's usage events are written here (`sqlite`), for the control plane.

pub mod sqlite;

/// Why a page could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsageReadError {
    /// The cursor is not one the ledger gave.
    #[error("{0}")]
    InvalidCursor(String),
    #[error("the ledger cannot be read: {0}")]
    Unavailable(String),
}

/// Reads a page of a tenant's usage events: `after` a cursor (None: the beginning), at most
/// `limit`, as the billing API's page document (`{"data", "has_more", "next_cursor"}`). It may
/// block: the service calls it off the async runtime.
pub trait UsageReader: Send + Sync + std::fmt::Debug {
    fn events(
        &self,
        tenant_id: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<String, UsageReadError>;
}
