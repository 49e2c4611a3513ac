"""The core's usage event and the ledger's `UsageEvent` agree field for field."""

from __future__ import annotations

from gateway import _core
from gateway.ledger.usage import UsageEvent


def test_the_ledgers_event_has_the_cores_fields() -> None:
    assert sorted(UsageEvent._fields) == list(_core.USAGE_FIELDS)
