"""`gateway demo` (`make run`): a gateway in front of two simulated workers, with a fresh key.

It starts the simulators as subprocesses, writes a config file the user can reuse with
`gateway serve`, issues a key for the tenant `demo`, prints ready-to-paste client examples, and
serves until Ctrl-C. The simulators are stopped on every exit path.
"""

from __future__ import annotations

import json
import logging
import select
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

from gateway import serve
from gateway.config import listen_address, load_config
from gateway.ledger.apikeys import create_key
from gateway.ledger.db import NotFoundError, open_ledger
from gateway.ledger.tenants import create_tenant, get_tenant_by_name_or_id

__all__ = [
    "DEMO_MODEL",
    "DEMO_TENANT",
    "client_examples",
    "ensure_demo_key",
    "run",
    "start_simulator",
    "write_config",
]

logger = logging.getLogger(__name__)

DEMO_TENANT = "demo"
DEMO_MODEL = "sim-model"
SIM_ARGS = ("--ttft-ms", "50", "--itl-ms", "10", "--model", DEMO_MODEL)
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class DemoError(Exception):
    """The demo could not be set up (a simulator did not start)."""


def read_listening_line(process: subprocess.Popen[str], prefix: str, timeout_s: float) -> str:
    """Waits for the process to print `<prefix>http://HOST:PORT` and returns the URL."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout_s
    while (remaining := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([process.stdout], [], [], remaining)
        if not ready:
            break
        line = process.stdout.readline()
        if not line:
            raise DemoError(f"process {process.pid} exited before listening ({process.wait()})")
        if line.startswith(prefix):
            return line.removeprefix(prefix).strip()
    raise DemoError(f"process {process.pid} did not report listening within {timeout_s:.0f}s")


def stop_process(process: subprocess.Popen[str]) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `STOP_TIMEOUT_S`."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()


@contextmanager
def start_simulator(args: Sequence[str] = ()) -> Iterator[str]:
    """Runs `gateway sim --port 0 ARGS` as a subprocess; yields its base URL; stops it on exit."""
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "sim", "--port", "0", *args],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield read_listening_line(process, "sim listening on ", STARTUP_TIMEOUT_S)
    finally:
        stop_process(process)


def _toml_string(value: str) -> str:
    # A JSON string without \u escapes of astral characters is a TOML basic string.
    return json.dumps(value, ensure_ascii=False)


def write_config(data_dir: Path, port: int, worker_urls: Sequence[str]) -> Path:
    """Writes `data_dir/gateway.toml` for these workers, with the ledger in `data_dir`."""
    database = (data_dir / "gateway.db").resolve()
    # One process on a laptop, behind no load balancer: Ctrl-C has nobody to drain for.
    lines = ["[server]", 'host = "127.0.0.1"', f"port = {port}", "drain_seconds = 0", ""]
    for url in worker_urls:
        lines += ["[[workers]]", f"url = {_toml_string(url)}", ""]
    lines += ["[storage]", f"url = {_toml_string(f'sqlite:///{database}')}", ""]
    path = data_dir / "gateway.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def ensure_demo_key(database_url: str) -> str:
    """Creates the tenant `demo` if missing and issues it a new key; returns the key."""
    with open_ledger(database_url) as conn:
        try:
            tenant = get_tenant_by_name_or_id(conn, DEMO_TENANT)
        except NotFoundError:
            tenant = create_tenant(conn, DEMO_TENANT)
        return create_key(conn, tenant.id, name="demo").key


def client_examples(base_url: str, key: str) -> str:
    """Ready-to-paste curl and openai-SDK examples for the gateway at `base_url` (ends in /v1)."""
    body = json.dumps(
        {
            "model": DEMO_MODEL,
            "stream": True,
            "messages": [{"role": "user", "content": "Say hello"}],
        }
    )
    return f"""
API key for tenant {DEMO_TENANT!r} (shown once): {key}
Base URL: {base_url}

curl, streaming chat:

curl -N {base_url}/chat/completions \\
  -H "Authorization: Bearer {key}" \\
  -H "Content-Type: application/json" \\
  -d '{body}'

Python, official SDK (pip install openai):

from openai import OpenAI

client = OpenAI(base_url="{base_url}", api_key="{key}")
stream = client.chat.completions.create(
    model="{DEMO_MODEL}",
    messages=[{{"role": "user", "content": "Say hello"}}],
    stream=True,
)
for chunk in stream:
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
"""


def run(data_dir: Path, port: int) -> int:
    """Runs the demo until Ctrl-C; returns the process exit status."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as simulators:
        try:
            urls = [
                simulators.enter_context(start_simulator((*SIM_ARGS, "--seed", str(seed))))
                for seed in (1, 2)
            ]
        except DemoError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
        config_path = write_config(data_dir, port, urls)
        config = load_config(config_path)
        key = ensure_demo_key(config.storage.url)

        def announce(host: str, bound_port: int) -> None:
            print(client_examples(f"http://{listen_address(host, bound_port)}/v1", key))
            print(f"Usage so far: gateway usage --config {config_path}")
            print("Press Ctrl-C to stop.", flush=True)

        logger.info("workers %s; config written to %s", ", ".join(urls), config_path)
        return serve.run(config, on_ready=announce)
