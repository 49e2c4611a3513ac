"""`procs.logged_error`, which tests use to assert a gateway logged no error: it reads the level
field of a log line, so a client's input echoed in a message (an access log's URL) is no error."""

from __future__ import annotations

import re

from tests.support.procs import logged_error

ACCESS = (
    "2026-12-06 01:31:20,759 INFO uvicorn.access: 127.0.0.1:44552 - "
    '"GET /v1/billing/quota?tenant=%7B%27WWW-Authenticate%27%3A+%27ERROR%27%7D HTTP/1.1" 404\n'
    "2026-12-06 01:31:20,760 INFO uvicorn.access: 127.0.0.1:44552 - "
    '"GET /v1/billing/keys?tenant=Traceback+Exception HTTP/1.1" 400\n'
)


def test_a_clients_input_in_a_message_is_no_error() -> None:
    assert logged_error(ACCESS) is None
    assert logged_error("2026-12-06 01:31:21,000 WARNING gateway.serve: ERROR in a name\n") is None


def test_errors_by_level_and_tracebacks_are_found() -> None:
    for line in (
        "2026-12-06 01:31:21,000 ERROR gateway.serve: collecting usage failed; will retry\n",
        "2026-12-06 01:31:21,000 CRITICAL gateway: down\n",
        "2026-12-06T01:31:21.000123Z ERROR gateway_core::journal: usage journal sync failed\n",
        # As the core's tracing writes it: in colours.
        "\x1b[2m2026-12-06T01:31:21.000123Z\x1b[0m \x1b[31mERROR\x1b[0m "
        "\x1b[2mgateway_core::journal\x1b[0m\x1b[2m:\x1b[0m usage journal sync failed\n",
        "Traceback (most recent call last):\n",
        "Exception ignored in: <function X.__del__>\n",
    ):
        found = logged_error(ACCESS + line)
        assert found is not None, line
        assert found.endswith(re.sub(r"\x1b\[[0-9;]*m", "", line)), found
