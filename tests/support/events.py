"""Usage events as the core hands them to the control plane, and the times and prices they are
stored and priced with, for tests that fill a ledger."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from gateway.ledger.usage import UsageEvent
from gateway.quotas import Price

__all__ = ["ms", "price", "usage_event"]


def ms(text: str) -> int:
    """Milliseconds since the epoch of an ISO 8601 time, read as UTC."""
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


def price(prompt: int, cached: int, completion: int) -> Price:
    """A price in micro-units per million tokens of each class."""
    return Price(prompt_per_mtok=prompt, cached_per_mtok=cached, completion_per_mtok=completion)


def usage_event(**overrides: Any) -> UsageEvent:
    """A completed streaming chat request's usage, with a fresh `event_id`; `overrides` replace
    any field."""
    fields: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "request_id": "req-1",
        "tenant_id": "ten_000000000001",
        "key_id": "key_000000000001",
        "model": "sim-model",
        "worker": "http://127.0.0.1:8001",
        "endpoint": "chat.completions",
        "stream": True,
        "status": "completed",
        "http_status": 200,
        "prompt_tokens": 10,
        "cached_tokens": 2,
        "completion_tokens": 5,
        "usage_source": "worker",
        "started_at_ms": 1_700_000_000_000,
        "finished_at_ms": 1_700_000_000_250,
    }
    fields.update(overrides)
    return UsageEvent(**fields)
