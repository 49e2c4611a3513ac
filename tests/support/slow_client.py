"""A hostile client's slowness, for the tests of every listener's bounds: a raw connection, and a
wait for the server to close it while bytes trickle in."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager

import pytest

__all__ = ["OUTER_S", "TIMEOUTS", "connection", "until_closed"]

TIMEOUTS = "header_read_timeout_ms = 500\nbody_read_timeout_ms = 500\n"
"""`[server]` lines: half a second for headers, half a second for a body."""

OUTER_S = 20.0
"""How long a test waits at most for the gateway to act on a timeout of half a second."""


@contextmanager
def connection(url: str) -> Iterator[socket.socket]:
    host, _, port = url.removeprefix("http://").rpartition(":")
    with closing(socket.create_connection((host, int(port)), timeout=OUTER_S)) as sock:
        yield sock


def until_closed(sock: socket.socket, trickle: bytes = b"") -> tuple[bytes, float]:
    """Sends `trickle` a byte at a time, 0.1 s apart, then reads; returns what the server sent
    before closing the connection and when (seconds from now). Fails if it stays open for
    `OUTER_S`."""
    started = time.monotonic()
    received = b""
    sock.settimeout(0.1)
    pending = iter(trickle)
    while time.monotonic() - started < OUTER_S:
        byte = next(pending, None)
        if byte is not None:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            break
        if not chunk:
            break
        received += chunk
    else:
        pytest.fail(f"the connection was still open after {OUTER_S} s")
    return received, time.monotonic() - started
