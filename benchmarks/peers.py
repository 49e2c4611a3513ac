"""The peers `overhead.py` measures the gateway against: other proxies in front of the same
simulator, pinned like the gateway (one core, one worker), started, found and installed here.

- nginx, a plain reverse proxy: the ceiling a proxy reaches on this machine with this pinning.
  Never installed by the harness (Debian: `apt-get install -y nginx-light`); used when `nginx` is
  on PATH.
- vllm-router, vLLM's Rust router (PyPI `vllm-router`, pinned with its dependencies in
  `benchmarks/peers-requirements.txt`), in a virtual environment of its own that the harness
  creates on first use in `benchmarks/.peers/vllm-router/` (git-ignored) and recreates when the
  requirements change: its unpinned FastAPI and uvicorn must not move the gateway's own pins.

Neither does auth, metering or usage parsing; their requests carry the gateway's
`Authorization` header all the same, so that every target reads the same bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from harness import ROOT, HarnessError, Pinned
from tests.support import procs

__all__ = [
    "PEERS_HOME",
    "REQUIREMENTS",
    "Nginx",
    "VllmRouter",
    "descendants",
    "nginx_config",
    "nginx_version",
    "vllm_router_argv",
    "vllm_router_env",
]

PEERS_HOME = ROOT / "benchmarks" / ".peers"
REQUIREMENTS = ROOT / "benchmarks" / "peers-requirements.txt"
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


# --- vllm-router ----------------------------------------------------------------------------------


class VllmRouter(Peer):
    """vllm-router in front of `upstream` (one worker), on one core with one tokio worker
    thread (`TOKIO_WORKER_THREADS=1`, which its runtime reads, as the gateway's
    `TOKENGATE_WORKER_THREADS=1`); its log in `workdir/vllm-router.log`."""

    def __init__(self, binary: Path, core: int, upstream: str, workdir: Path) -> None:
        self.port = procs.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = vllm_router_argv(binary, upstream, self.port, procs.free_port())
        self.label = vllm_router_version(binary)
        env = {**os.environ, "TOKIO_WORKER_THREADS": "1"}
        super().__init__("vllm-router", core, argv, workdir, env=env)


def vllm_router_argv(binary: Path, upstream: str, port: int, metrics_port: int) -> list[str]:
    """The router's command line: `round_robin`, the cheapest policy (the default,
    `cache_aware`, keeps a prefix tree per request, for nothing with one worker); its
    Prometheus exporter on a free loopback port (the default, 29000, may be taken); its other
    settings (retries, circuit breaker, health checks on `/health` every 60 s) its defaults."""
    return [
        str(binary),
        *("--worker-urls", upstream),
        *("--policy", "round_robin"),
        *("--host", "127.0.0.1", "--port", str(port)),
        *("--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port)),
        *("--log-level", "warning"),
    ]


def vllm_router_version(binary: Path) -> str:
    """`vllm-router 0.1.17`, from the package in the router's own environment."""
    python = binary.parent / "python"
    done = subprocess.run(
        [str(python), "-c", "from vllm_router import __version__; print(__version__)"],
        capture_output=True,
        text=True,
        check=False,
    )
    return f"vllm-router {done.stdout.strip() or '(unknown version)'}"


def vllm_router_env(home: Path = PEERS_HOME / "vllm-router") -> Path:
    """The `vllm-router` executable, installed first if needed: a virtual environment in `home`
    with `peers-requirements.txt` installed by pip (about 130 MB), recreated when that file
    changes (a stamp holds its digest)."""
    binary = home / "venv" / "bin" / "vllm-router"
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    stamp = home / "stamp"
    if binary.is_file() and stamp.is_file() and stamp.read_text().strip() == digest:
        return binary
    print(f"installing vllm-router into {home} (pip, once)", flush=True)
    home.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    venv = home / "venv"
    run = [sys.executable, "-m", "venv", "--clear", str(venv)]
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps"]
    for argv in (run, [*pip, "-r", str(REQUIREMENTS)]):
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise HarnessError(f"{' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    if not binary.is_file():
        raise HarnessError(f"{REQUIREMENTS.name} installed no {binary}")
    stamp.write_text(digest + "\n")
    return binary
