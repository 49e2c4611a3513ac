"""The peers `overhead.py` measures the gateway against: other proxies in front of the same
simulator, pinned like the gateway (one core, one worker), started and found here.

- nginx, a plain reverse proxy: the ceiling a proxy reaches on this machine with this pinning.
  Never installed by the harness (Debian: `apt-get install -y nginx-light`); used when `nginx` is
  on PATH.

It does no auth, metering or usage parsing; its requests carry the gateway's `Authorization`
header all the same, so that every target reads the same bytes.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from pathlib import Path

from harness import HarnessError, Pinned
from tests.support import procs

__all__ = ["Nginx", "descendants", "nginx_config", "nginx_version"]

NGINX_TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children, ...), from /proc; none when `pid`
    has exited."""
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except (FileNotFoundError, ProcessLookupError):
        return found
    for task in tasks:
        try:
            children = [int(child) for child in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found


class Peer(Pinned):
    """A peer process: its CPU time counts its children's too (nginx's worker), and stopping it
    leaves none of them behind."""

    def pids(self) -> list[int]:
        return [self.proc.pid, *descendants(self.proc.pid)]

    def kill(self) -> None:
        """The children first (while the parent still holds their pids)."""
        for pid in descendants(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        super().kill()


# --- nginx ----------------------------------------------------------------------------------------


class Nginx(Peer):
    """nginx as a plain reverse proxy in front of `upstream` (a base URL), one worker process,
    in the foreground; its pid file, error log and temp directories live in `workdir/nginx`."""

    # Graceful: the master closes idle keep-alive connections and waits for its worker.
    stop_signal = signal.SIGQUIT

    def __init__(self, binary: Path, core: int, upstream: str, workdir: Path) -> None:
        prefix = workdir / "nginx"
        prefix.mkdir()
        self.port = procs.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = prefix / "nginx.conf"
        config.write_text(nginx_config(prefix, self.port, upstream, root=os.geteuid() == 0))
        argv = [str(binary), "-p", str(prefix), "-c", str(config), "-e", str(prefix / "error.log")]
        test = subprocess.run([*argv, "-t"], capture_output=True, text=True, check=False)
        if test.returncode != 0:
            raise HarnessError(f"nginx -t rejected {config}:\n{test.stderr}{test.stdout}")
        self.label = nginx_version(binary)
        super().__init__("nginx", core, argv, workdir)


def nginx_version(binary: Path) -> str:
    """`nginx/1.22.1`, from `nginx -v` (which prints to stderr)."""
    done = subprocess.run([str(binary), "-v"], capture_output=True, text=True, check=False)
    match = re.search(r"nginx/\S+", done.stderr + done.stdout)
    return match.group(0) if match else "nginx"


def nginx_config(prefix: Path, port: int, upstream: str, *, root: bool) -> str:
    """A plain reverse proxy: keep-alive upstream connections, no response buffering (so SSE
    streams flow), no access log; every path nginx writes lies under `prefix`."""
    server = upstream.removeprefix("http://")
    return "\n".join(
        [
            # Run as root, nginx would switch its worker to `nobody`, which cannot reach the
            # harness's private temp directory.
            *(["user root;"] if root else []),
            "worker_processes 1;",
            "daemon off;",
            f"pid {prefix / 'nginx.pid'};",
            f"error_log {prefix / 'error.log'} warn;",
            "events { worker_connections 4096; }",
            "http {",
            "  access_log off;",
            *(f"  {kind}_temp_path {prefix / kind};" for kind in NGINX_TEMP_PATHS),
            f"  upstream sim {{ server {server}; keepalive 128; }}",
            "  server {",
            f"    listen 127.0.0.1:{port} reuseport;",
            "    location / {",
            "      proxy_pass http://sim;",
            "      proxy_http_version 1.1;",
            '      proxy_set_header Connection "";',
            "      proxy_buffering off;",
            "    }",
            "  }",
            "}",
            "",
        ]
    )
