"""Guarantee 6: bad input gets a 4xx with an OpenAI-shaped body, never a 5xx, and nothing breaks."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.support import procs
from tests.support.openai_errors import error
from tests.support.stack import Stack

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


def _post(stack: Stack, body: bytes, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{stack.base_url}/completions",
        content=body,
        headers={"authorization": f"Bearer {stack.key}"} | headers,
        timeout=30,
    )


def test_a_member_given_twice_under_any_spelling_is_named(stack: Stack) -> None:
    body = b'{"model": "sim-model", "prompt": "x", "max_tokens": 1, "max_tok\\u0065ns": 2}'
    details = error(_post(stack, body), 400)
    assert details["param"] == "max_tokens"
    assert "more than once" in details["message"]


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "BeArEr"])
def test_the_bearer_scheme_is_case_insensitive(stack: Stack, scheme: str) -> None:
    response = _post(
        stack,
        b'{"model": "sim-model", "prompt": "x", "max_tokens": 1}',
        authorization=f"{scheme} {stack.key}",
    )
    assert response.status_code == 200, response.text


def test_client_strings_the_gateway_stores_are_bounded(stack: Stack) -> None:
    """A request id or a model name of 100 KB was served, stored whole and echoed."""
    ok = b'{"model": "sim-model", "prompt": "x", "max_tokens": 1}'
    for request_id in ("r" * 257, "r" * 100_000, "tab\tinside"):
        details = error(_post(stack, ok, **{"x-request-id": request_id}), 400)
        assert details["param"] == "x-request-id"
    long_model = json.dumps({"model": "m" * 10_000, "prompt": "x"}).encode()
    assert error(_post(stack, long_model), 400)["param"] == "model"
    fits = _post(stack, ok, **{"x-request-id": "r" * 256})
    assert fits.status_code == 200
    assert fits.headers["x-request-id"] == "r" * 256
    assert procs.wait_for(
        lambda: any(row["request_id"] == "r" * 256 for row in procs.usage_rows(stack.db))
    )
    assert max(len(str(row["request_id"])) for row in procs.usage_rows(stack.db)) <= 256


def test_an_escaped_stream_options_is_replaced_not_doubled(stack: Stack) -> None:
    """The gateway asks the worker for usage by rewriting `stream_options`; a client that spells
    the key with escapes gets the same rewrite, not a second member (the simulator refuses a
    duplicate with 400; vLLM keeps the last one, the client's, and the worker's usage is lost)."""
    body = (
        b'{"model": "sim-model", "prompt": "count", "max_tokens": 4, "stream": true,'
        b' "stream_opti\\u006fns": {"include_usage": false}}'
    )
    headers = {"authorization": f"Bearer {stack.key}", "x-request-id": "escaped-options"}
    with httpx.stream(
        "POST", f"{stack.base_url}/completions", content=body, headers=headers, timeout=30
    ) as response:
        assert response.status_code == 200, response.read()
        events = list(procs.sse_events(response.iter_lines()))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all("usage" not in chunk for chunk in chunks), "the client did not ask for usage"
    assert procs.wait_for(
        lambda: any(row["request_id"] == "escaped-options" for row in procs.usage_rows(stack.db))
    )
    row = next(row for row in procs.usage_rows(stack.db) if row["request_id"] == "escaped-options")
    assert (row["usage_source"], row["completion_tokens"]) == ("worker", 4)
