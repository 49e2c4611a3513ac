"""uvicorn's HTTP/1.1 protocol (h11) with the bounds every listener of the gateway puts on a slow
client (`server.header_read_timeout_ms`, `server.body_read_timeout_ms`), and OpenAI-shaped
answers where uvicorn's own are plain text. The admin listener serves with it."""

from __future__ import annotations

import asyncio
import http
import json
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from gateway.http_common import error_body

__all__ = ["BoundedH11Protocol", "bounded_h11"]


class BoundedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol (h11) with the listener's bounds on a slow client.

    From a connection's start, and again from the end of each response (an idle keep-alive
    connection), the client has `header_timeout_s` to complete a request's headers, else the
    connection is closed. From then it has `body_timeout_s` to complete the body, else it is
    answered 408 `request_timeout` (when no response has started) and closed. Neither bound is
    reset by bytes that arrive: a client trickling them gets no more time. While the request is
    being answered, no bound runs."""

    header_timeout_s: ClassVar[float] = 30.0
    body_timeout_s: ClassVar[float] = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._follow()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel(header=True, body=True)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()

    def _follow(self) -> None:
        """Runs the bound of the part of a request the client is sending now, if any."""
        state = self.conn.their_state
        if self.transport.is_closing():
            self._cancel(header=True, body=True)
        elif state is h11.IDLE:
            self._cancel(header=False, body=True)
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(
                    self.header_timeout_s, self._headers_too_slow
                )
        elif state is h11.SEND_BODY:
            self._cancel(header=True, body=False)
            if self._body_timer is None:
                self._body_timer = self.loop.call_later(self.body_timeout_s, self._body_too_slow)
        else:
            self._cancel(header=True, body=True)

    def _cancel(self, *, header: bool, body: bool) -> None:
        if header and self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if body and self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()

    def _body_too_slow(self) -> None:
        self._body_timer = None
        if self.conn.their_state is not h11.SEND_BODY or self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None:
            # The application, waiting for the rest of the body, reads a disconnect and answers
            # nobody.
            cycle.disconnected = True
            cycle.message_event.set()
        if cycle is None or not cycle.response_started:
            milliseconds = round(self.body_timeout_s * 1000)
            message = f"the request body did not arrive within {milliseconds} ms"
            self._answer(408, message, "request_timeout")
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot parse: uvicorn's 400, with the OpenAI error body."""
        self._answer(400, f"not a valid HTTP/1.1 request: {msg}", None)

    def _answer(self, status: int, message: str, code: str | None) -> None:
        """Answers `status` with the OpenAI error body and closes the connection."""
        body = json.dumps(error_body(status, message, code)).encode()
        headers = [
            *self.server_state.default_headers,
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        reason = http.HTTPStatus(status).phrase.encode()
        try:
            for event in (
                h11.Response(status_code=status, headers=headers, reason=reason),
                h11.Data(data=body),
                h11.EndOfMessage(),
            ):
                self.transport.write(self.conn.send(event) or b"")
        except h11.LocalProtocolError:
            pass  # an answer had begun after all: closing is all that is left
        self.transport.close()


def bounded_h11(header_timeout_s: float, body_timeout_s: float) -> type[H11Protocol]:
    """`BoundedH11Protocol` with these bounds, for `uvicorn.Config(http=...)`."""

    class Protocol(BoundedH11Protocol):
        pass

    Protocol.header_timeout_s = header_timeout_s
    Protocol.body_timeout_s = body_timeout_s
    return Protocol
