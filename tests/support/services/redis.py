"""A real `redis-server` on a free loopback port, without persistence, stopped on exit."""

from __future__ import annotations

import shutil
import subprocess
import time
from typing import Self

from tests.support import procs
from tests.support.services.process import ServerProcess

__all__ = ["RedisServer"]


class RedisServer(ServerProcess):
    """`with RedisServer() as redis:` starts one; `redis.url` for the gateway, `redis.cli(...)`
    to look inside."""

    def __init__(self) -> None:
        super().__init__()
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run `make services`")
        self.port = procs.free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._argv = [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
        ]  # fmt: skip

    def start(self) -> Self:
        self._process = subprocess.Popen(
            self._argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.cli("PING") == "PONG":
                    return self
            except subprocess.CalledProcessError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def cli(self, *args: str) -> str:
        """One command through `redis-cli`; its reply as text."""
        done = subprocess.run(
            ["redis-cli", "-p", str(self.port), *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
        return done.stdout.strip()
