"""A real DNS server, `dnsmasq`, on a free loopback port: it answers only from a hosts file the
test writes (no upstream, no /etc/hosts), with a TTL of 0, and reads it again on `set_hosts`."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Self

from tests.support import procs
from tests.support.services.process import ServerProcess

__all__ = ["DnsServer"]


def _binary() -> str:
    found = shutil.which("dnsmasq") or shutil.which("dnsmasq", path="/usr/sbin:/sbin")
    if found is None:
        raise RuntimeError("dnsmasq is not installed: run `make services`")
    return found


class DnsServer(ServerProcess):
    """`with DnsServer(tmp_path) as dns:` starts one answering for the names of `set_hosts`;
    `dns.address` (`127.0.0.1:PORT`) for `routing.dns_servers`."""

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.port = procs.free_port()
        self.address = f"127.0.0.1:{self.port}"
        self._hosts = directory / "dns-hosts"
        self._hosts.write_text("")
        self._argv = [
            _binary(),
            "--keep-in-foreground",
            f"--port={self.port}",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            f"--addn-hosts={self._hosts}",
            "--local-ttl=0",
            "--cache-size=0",
            "--pid-file=",
            # As whoever runs the tests (as root, dnsmasq would otherwise become `nobody`, who
            # cannot read the test's directory).
            f"--user={pwd.getpwuid(os.getuid()).pw_name}",
        ]  # fmt: skip

    def set_hosts(self, name: str, addresses: list[str]) -> None:
        """From now on `name` resolves to `addresses` (none: the name is unknown)."""
        staged = self._hosts.with_suffix(".new")
        staged.write_text("".join(f"{address} {name}\n" for address in addresses))
        staged.replace(self._hosts)
        if self._process is not None:
            # SIGHUP: dnsmasq reads its hosts files again.
            self._process.send_signal(signal.SIGHUP)

    def start(self) -> Self:
        self._process = subprocess.Popen(
            self._argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"dnsmasq did not listen on port {self.port}")
