"""The core's drained usage tuples and the ledger's `UsageEvent` agree field for field."""

from __future__ import annotations

from gateway import _core
from gateway.ledger.usage import UsageEvent


def test_drained_tuple_order_is_the_ledgers() -> None:
    assert UsageEvent._fields == _core.USAGE_COLUMNS
