"""What the core's gRPC usage service reads a tenant's events with: a callable the core calls on
its own blocking threads, over a ledger connection of its own (the serve loop's belongs to the
event loop's thread), one call at a time. The page is the billing API's (`billing.event_page`) as
a tenant's own API key reads it there: a cursor of the tenant's own events, no `worker`.
"""

from __future__ import annotations

import json
import threading

from gateway.billing import event_page
from gateway.ledger.db import Connection, DatabaseError, connect

__all__ = ["LedgerUsageReader"]


class LedgerUsageReader:
    """`reader(tenant_id, after, limit)` is the JSON page of `tenant_id`'s events after the tenant
    cursor `after`; `ValueError` for a cursor that is not one of this tenant's pages gave,
    `DatabaseError` while the ledger cannot be read. The connection opens at the first call and
    reopens after a failure."""

    def __init__(self, url: str, currency: str) -> None:
        self._url = url
        self._currency = currency
        self._lock = threading.Lock()
        self._conn: Connection | None = None

    def __call__(self, tenant_id: str, after: str | None, limit: int) -> str:
        with self._lock:
            if self._conn is None:
                self._conn = connect(self._url, any_thread=True)
            try:
                page = event_page(
                    self._conn, after, limit, tenant_id, self._currency, tenant_view=True
                )
            except DatabaseError:
                self._conn.close()
                self._conn = None
                raise
            return json.dumps(page)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
