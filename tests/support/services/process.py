"""What the test servers share: one child process, stopped with a signal (then killed), and the
`with` form that stops it."""

from __future__ import annotations

import signal
import subprocess
from abc import ABC, abstractmethod
from types import TracebackType
from typing import Self

__all__ = ["ServerProcess"]


class ServerProcess(ABC):
    """A server the tests start; subclasses set `_process` in `start()`."""

    # The signal that makes the server shut down cleanly, and how long it may take.
    stop_signal = signal.SIGTERM
    stop_timeout_s = 10.0

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None

    @abstractmethod
    def start(self) -> Self:
        """Starts the server and waits until it answers."""

    def stop(self) -> None:
        """`stop_signal`, then SIGKILL after `stop_timeout_s`; safe to call twice."""
        if self._process is not None:
            self._process.send_signal(self.stop_signal)
            try:
                self._process.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
