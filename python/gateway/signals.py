"""SIGINT and SIGTERM for a long-running command, from its first instant to its last.

`StopSignals` blocks both signals in the calling (main) thread before any other thread exists,
so every thread started later, the core's tokio threads included, inherits the block, and one
thread of its own takes them with `sigwait`. A signal then always lands in the same place:
before the event loop runs it is remembered, while it runs it sets the loop's stop event (a
thread-safe call, so an event loop asleep in `epoll` wakes), and after the loop has gone it is
ignored: the process is already on its way out and exits with its own status. Nothing here
depends on asyncio's signal handlers, whose wakeup descriptor and restored default handler
(KeyboardInterrupt) are what a signal at the wrong instant used to fall through.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable

__all__ = ["ReloadSignal", "StopSignals"]

logger = logging.getLogger(__name__)

_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class StopSignals:
    """Call from the main thread before any other thread starts; `attach` a running loop's stop
    event while it serves, `detach` it before the loop closes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.received: list[int] = []
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        threading.Thread(target=self._wait, name="stop-signals", daemon=True).start()

    def _wait(self) -> None:
        while True:
            signum = signal.sigwait(_SIGNALS)
            with self._lock:
                self.received.append(signum)
                if self._loop is not None and self._stop is not None:
                    self._loop.call_soon_threadsafe(self._stop.set)
            name = signal.Signals(signum).name
            if len(self.received) > 1:
                logger.info("%s: already stopping", name)

    def attach(self, stop: asyncio.Event) -> None:
        """From now on a signal sets `stop` (at once, if one came already); call on the loop."""
        with self._lock:
            self._loop = asyncio.get_running_loop()
            self._stop = stop
            if self.received:
                stop.set()

    def detach(self) -> None:
        """Signals from now on are only counted."""
        with self._lock:
            self._loop = None
            self._stop = None


class ReloadSignal:
    """SIGHUP, from the first instant to the last, kept apart from the stop signals: blocked in
    the calling (main) thread before any other thread exists, like them, and taken by a thread
    of its own with `sigwait`. While a callback is attached, each SIGHUP schedules it on the
    attaching loop (`gateway serve` reloads its configuration file); before and after, it is
    logged and ignored: its default action, ending the process, never applies.

    Create it before `StopSignals` (whose thread must inherit the block) and `start` it after
    (so that its own thread inherits theirs).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._callback: Callable[[], object] | None = None
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})

    def start(self) -> None:
        """Starts taking SIGHUP (until then it stays pending)."""
        threading.Thread(target=self._wait, name="reload-signal", daemon=True).start()

    def _wait(self) -> None:
        while True:
            signal.sigwait({signal.SIGHUP})
            with self._lock:
                if self._loop is not None and self._callback is not None:
                    logger.info("SIGHUP: reloading the configuration")
                    self._loop.call_soon_threadsafe(self._callback)
                    continue
            logger.info("SIGHUP: not serving; ignored")

    def attach(self, callback: Callable[[], object]) -> None:
        """From now on a SIGHUP calls `callback` on the running loop; call on the loop."""
        with self._lock:
            self._loop = asyncio.get_running_loop()
            self._callback = callback

    def detach(self) -> None:
        """SIGHUP is ignored from now on."""
        with self._lock:
            self._loop = None
            self._callback = None
