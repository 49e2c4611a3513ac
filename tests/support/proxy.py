"""A TCP relay that counts the connections it accepts: put between the gateway and a worker, it
tells whether the gateway reuses its connections to the worker."""

from __future__ import annotations

import socket
import threading
import time
from urllib.parse import urlsplit

__all__ = ["CountingProxy"]


class CountingProxy:
    """Relays every connection made to `url` to `target` (an `http://host:port` URL), byte for
    byte in both directions, and counts them (`accepted`). With `hold`, the bytes that follow
    `hold[0]` in what `target` sends wait `hold[1]` seconds: the end of a worker's body after its
    `[DONE]`, say, so that a client that does not read a body to its end is seen to leave it."""

    def __init__(self, target: str, hold: tuple[bytes, float] | None = None) -> None:
        self._hold = hold
        parts = urlsplit(target)
        self._target = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._server = socket.create_server(("127.0.0.1", 0))
        self._lock = threading.Lock()
        self._accepted = 0
        self._sockets: list[socket.socket] = []
        port = self._server.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def accepted(self) -> int:
        with self._lock:
            return self._accepted

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(self._target)
            with self._lock:
                self._accepted += 1
                self._sockets += [client, upstream]
            for source, sink, hold in ((client, upstream, None), (upstream, client, self._hold)):
                threading.Thread(target=_pump, args=(source, sink, hold), daemon=True).start()

    def close(self) -> None:
        self._server.close()
        with self._lock:
            for sock in self._sockets:
                sock.close()

    def __enter__(self) -> CountingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pump(source: socket.socket, sink: socket.socket, hold: tuple[bytes, float] | None) -> None:
    """Copies `source` to `sink` until `source` ends, then ends `sink`'s sending side; with
    `hold`, see `CountingProxy`."""
    try:
        while data := source.recv(65536):
            at = data.find(hold[0]) if hold else -1
            if hold and at >= 0:
                cut = at + len(hold[0])
                sink.sendall(data[:cut])
                time.sleep(hold[1])
                data = data[cut:]
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:  # either side closed
        pass
