"""The ledger: tenants, API keys, quota policies, prices and usage events in one SQL database,
SQLite or PostgreSQL.

Repository modules (`tenants`, `apikeys`, `quotas`, `prices`, `usage`) are plain functions taking
a connection from `db.connect`; all SQL reaches the driver through `db`, the one place that knows
the dialect.
"""

from gateway.ledger.db import (
    ConflictError,
    LedgerError,
    NotFoundError,
    connect,
    open_ledger,
    parse_url,
)

__all__ = ["ConflictError", "LedgerError", "NotFoundError", "connect", "open_ledger", "parse_url"]
