"""Guarantee 6: bad input gets a 4xx with an OpenAI-shaped body, never a 5xx, and nothing breaks."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import Stack

pytestmark = pytest.mark.e2e

MODEL = "sim-model"

BAD_BODIES: list[bytes] = [
    b"",
    b"   ",
    b"null",
    b"42",
    b'"a string"',
    b"[]",
    b'[{"model": "sim-model"}]',
    b"{",
    b'{"model": "sim-model", "prompt": "x"',
    b'{"model": "sim-model", "prompt": "x"}}',
    b"\xff\xfe\x00garbage",
    b'{"model": "sim-\xff", "prompt": "x"}',
    b'{"model": "sim-model", "prompt": "x", "max_tokens": 1e400}',
    b'{"model": "sim-model", "prompt": "x", "max_tokens": 99999999999999999999999}',
    b'{"model": "sim-model", "prompt": "x", "max_tokens": 1.5}',
    b'{"model": "sim-model", "prompt": "x", "n": -1}',
    b'{"model": "sim-model", "prompt": "x", "n": 0}',
    b'{"model": "sim-model", "prompt": "x", "stream": "true"}',
    b'{"model": "sim-model", "prompt": "x", "stream": true, "stream_options": []}',
    b'{"model": {"name": "sim-model"}, "prompt": "x"}',
    b'{"model": null, "prompt": "x"}',
    b'{"model": "sim-model"}',
    b'{"model": "sim-model", "prompt": null}',
    b'{"model": "sim-model", "prompt": {"text": "x"}}',
    b'{"model": "sim-model", "prompt": [1, "two", [3]]}',
    b'{"model": "sim-model", "prompt": "x", "temperature": "hot"}',
    b'{"model": "sim-model", "prompt": "x", "max_tokens": 5000}',
    b'{"model": "sim-model", "prompt": "x", "stop": 7}',
    b'{"model": "sim-model", "prompt": "' + b"\\ud800" + b'"}',
    b'{"model": "sim-model", "prompt": "x", "stream": true,'
    b' "stream_options": {"include_usage": 3}}',
]

BAD_CHAT_BODIES: list[bytes] = [
    b'{"model": "sim-model"}',
    b'{"model": "sim-model", "messages": "hello"}',
    b'{"model": "sim-model", "messages": {"role": "user"}}',
    b'{"model": "sim-model", "messages": [1, 2]}',
    b'{"model": "sim-model", "messages": [{"content": "no role"}]}',
    b'{"model": "sim-model", "messages": [{"role": "user", "content": 5}]}',
    b'{"model": "sim-model", "messages": [], "max_completion_tokens": -3}',
]


def _assert_openai_error(response: httpx.Response) -> None:
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    body = response.json()
    assert isinstance(body, dict)
    error = body["error"]
    assert isinstance(error, dict)
    assert isinstance(error.get("message"), str)
    assert error["message"]


@pytest.mark.parametrize("body", BAD_BODIES, ids=range(len(BAD_BODIES)))
def test_bad_completion_bodies_are_4xx(stack: Stack, body: bytes) -> None:
    response = httpx.post(
        f"{stack.base_url}/completions",
        content=body,
        headers={"authorization": f"Bearer {stack.key}", "content-type": "application/json"},
    )
    _assert_openai_error(response)


@pytest.mark.parametrize("body", BAD_CHAT_BODIES, ids=range(len(BAD_CHAT_BODIES)))
def test_bad_chat_bodies_are_4xx(stack: Stack, body: bytes) -> None:
    response = httpx.post(
        f"{stack.base_url}/chat/completions",
        content=body,
        headers={"authorization": f"Bearer {stack.key}"},
    )
    _assert_openai_error(response)


@pytest.mark.parametrize(
    "authorization",
    ["", "Bearer", "bearer tg-x", "Basic dXNlcjpwYXNz", "Bearer " + "x" * 10_000],
)
def test_bad_authorization_is_401(stack: Stack, authorization: str) -> None:
    response = httpx.post(
        f"{stack.base_url}/completions",
        json={"model": MODEL, "prompt": "x"},
        headers={"authorization": authorization},
    )
    assert response.status_code == 401
    _assert_openai_error(response)


def test_non_ascii_authorization_is_401(stack: Stack) -> None:
    response = httpx.post(
        f"{stack.base_url}/completions",
        json={"model": MODEL, "prompt": "x"},
        headers=[(b"authorization", "Bearer tg-\u00e9\u00e8".encode("latin-1"))],
    )
    assert response.status_code == 401


def test_gateway_still_serves_after_bad_input(stack: Stack) -> None:
    response = httpx.post(
        f"{stack.base_url}/completions",
        content=json.dumps({"model": MODEL, "prompt": "still here", "max_tokens": 2}),
        headers={"authorization": f"Bearer {stack.key}"},
    )
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 2
