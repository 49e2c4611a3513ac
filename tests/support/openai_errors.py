"""The OpenAI error body every HTTP API of the gateway answers with."""

from __future__ import annotations

from typing import Any

import httpx


def error(response: httpx.Response, status: int) -> dict[str, Any]:
    """The `error` object of a response that must have `status` and exactly OpenAI's error body:
    `{"error": {"message", "type", "param", "code"}}`, with a message."""
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert list(body) == ["error"]
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    details: dict[str, Any] = body["error"]
    return details
