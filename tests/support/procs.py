"""Real processes for end-to-end tests: `gateway sim` workers, `gateway serve` gateways and real
vLLM workers; the `gateway` CLI run as a process, free ports and API keys, which the benchmarks
take from here too.

The gateway's own processes are started as `python -m gateway ...` and waited for on the line they
print once they listen; vLLM workers are waited for on `/health`. Each is stopped (SIGTERM, then
SIGKILL) by its owner. Nothing here fakes a part of the product.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import psycopg
from psycopg.rows import dict_row

LISTENING = re.compile(r"listening on (http://\S+)")
# How tests run the `gateway` CLI: this interpreter's package (the wheel test runs another's).
GATEWAY = (sys.executable, "-m", "gateway")
STARTUP_TIMEOUT_S = 30.0
VLLM_STARTUP_TIMEOUT_S = 300.0
# How long a SIGKILLed process may take to be gone: the kernel tears down its threads and memory
# (a vLLM worker's gigabytes) first, which a loaded machine once stretched past 10 s. A hang guard,
# not a timing.
KILLED_EXIT_S = 60.0


@dataclass
class Process:
    """A child process that printed `... listening on URL`."""

    proc: subprocess.Popen[str]
    url: str
    output: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=KILLED_EXIT_S)
        self._join_reader()

    def _join_reader(self) -> None:
        if self.reader is not None:
            self.reader.join(timeout=10)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not exit in time. Returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=KILLED_EXIT_S)
        self._join_reader()
        return self.proc.returncode


def _pump(stream: IO[str], sink: list[str], found: threading.Event, url: list[str]) -> None:
    with stream:
        for line in stream:
            sink.append(line)
            match = LISTENING.search(line)
            if match and not found.is_set():
                url.append(match.group(1))
                found.set()
    found.set()


def _spawn(argv: list[str], env: dict[str, str]) -> tuple[Process, threading.Event, list[str]]:
    """Starts `argv` with its output pumped into `Process.output`; the event is set once it
    prints `listening on URL` (or exits), and the list then holds the URL."""
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    assert proc.stdout is not None
    output: list[str] = []
    found = threading.Event()
    url: list[str] = []
    reader = threading.Thread(target=_pump, args=(proc.stdout, output, found, url), daemon=True)
    reader.start()
    return Process(proc=proc, url="", output=output, reader=reader), found, url


def start(
    args: list[str], env: dict[str, str] | None = None, *, gateway: Sequence[str] = GATEWAY
) -> Process:
    """Runs `python -m gateway ARGS` (or `gateway` ARGS) and waits until it listens."""
    process, found, url = _spawn([*gateway, *args], {**os.environ, **(env or {})})
    if not found.wait(STARTUP_TIMEOUT_S) or not url:
        process.kill()
        raise RuntimeError(f"`gateway {' '.join(args)}` did not start:\n{''.join(process.output)}")
    process.url = url[0]
    return process


def wait_line(process: Process, pattern: str, timeout: float = STARTUP_TIMEOUT_S) -> re.Match[str]:
    """Waits until `process` has printed a line matching `pattern`; raises with its output if it
    has not within `timeout`."""
    regex = re.compile(pattern)

    def found() -> re.Match[str] | None:
        return next(filter(None, map(regex.search, list(process.output))), None)

    wait_for(lambda: found() is not None, timeout=timeout)
    match = found()
    if match is None:
        raise RuntimeError(f"no line matched {pattern!r}:\n{''.join(process.output)}")
    return match


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn_vllm(argv: list[str], env: dict[str, str], port: int) -> Process:
    """Starts a real vLLM worker on `port`; `wait_healthy` waits for it to serve."""
    process, _, _ = _spawn(argv, env)
    process.url = f"http://127.0.0.1:{port}"
    return process


def wait_healthy(worker: Process, timeout: float = VLLM_STARTUP_TIMEOUT_S) -> None:
    """Waits until a vLLM worker answers `/health` 200; raises with its output if it dies or
    takes longer than `timeout` (vLLM needs about 30 s on 2 cores)."""

    def healthy() -> bool:
        if worker.proc.poll() is not None:
            return True
        try:
            return httpx.get(f"{worker.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    if not wait_for(healthy, timeout=timeout, interval=0.5) or worker.proc.poll() is not None:
        worker.kill()
        raise RuntimeError(f"vLLM at {worker.url} did not start:\n{''.join(worker.output[-60:])}")


def start_sim(**options: object) -> Process:
    """`gateway sim --port 0` with `--option value` for each keyword (underscores become dashes)."""
    args = ["sim", "--port", "0"]
    for name, value in options.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    return start(args)


def hold_sim(sim: Process, held: bool) -> None:
    """Holds a simulator's requests before their prefill, or releases every one held
    (`POST /sim/hold`): it stays busy for as long as a test looks at the state that makes, not for
    a TTFT that a busy machine may outrun."""
    response = httpx.post(f"{sim.url}/sim/hold", json={"held": held}, timeout=5)
    assert response.status_code == 200, response.text


def journaled(tmp_path: Path, sim: Process, journal: str) -> tuple[Path, str, Path]:
    """A gateway in front of `sim` with its SQLite ledger and its journal in `tmp_path`: the
    ledger's path, a key of tenant `acme` in it, and the config file, whose `[journal]` table
    holds the directory and the TOML lines `journal`."""
    db = tmp_path / "ledger.db"
    key, _ = create_key(db, "acme")
    table = f'[journal]\ndir = "{tmp_path / "journal"}"\n{journal}'
    return db, key, write_config(tmp_path / "gateway.toml", [sim.url], db, table)


def ledger_url(db: Path | str) -> str:
    """The ledger URL of `db`: a SQLite file (a `Path`), or already a URL (a `str`)."""
    return db if isinstance(db, str) else f"sqlite:///{db}"


def write_config(
    path: Path,
    workers: list[str],
    db: Path | str,
    extra: str = "",
    grace_s: float = 5.0,
    *,
    server: str = "",
    routing: str = "",
    worker: str = "",
) -> Path:
    """A `gateway serve` config for these workers, with its ledger at `db` (see `ledger_url`) and
    its usage journal beside `path`; `server` and `routing` are more lines of those two tables,
    `worker` of every worker's, `extra` more tables. Without a `drain_seconds` in `server`, the
    gateway has no drain window: a SIGTERM closes its listeners at once."""
    worker_tables = "".join(f'\n[[workers]]\nurl = "{url}"\n{worker}\n' for url in workers)
    # A journal of its own per config, unless `extra` configures one: replicas may share a ledger.
    # Segments of 1 MiB: each is zero-filled when begun, and a session starts hundreds of gateways.
    journal = (
        ""
        if "[journal]" in extra
        else f'[journal]\ndir = "{path.with_suffix(".journal")}"\nsegment_bytes = 1048576\n'
    )
    # Probes often, so that tests see a worker's health change soon, unless `routing` says.
    health = "" if "health_interval_ms" in routing else "health_interval_ms = 100\n"
    # Stops at once, unless `server` asks for a drain window.
    drain = "" if "drain_seconds" in server else "drain_seconds = 0\n"

    path.write_text(
        f"""
[server]
host = "127.0.0.1"
port = 0
max_body_bytes = 65536
shutdown_grace_seconds = {grace_s}
{drain}{server}
[routing]
{health}connect_timeout_ms = 500
{routing}
[storage]
url = "{ledger_url(db)}"
{worker_tables}
{extra}
{journal}"""
    )
    return path


class CommandError(RuntimeError):
    """A `gateway` CLI command that failed; the message holds its output."""


def cli(*args: str, timeout: float = 60.0, gateway: Sequence[str] = GATEWAY) -> str:
    """Runs a `gateway` CLI command (with `gateway`) to completion and returns its stdout; raises
    `CommandError` if it fails."""
    done = subprocess.run(
        [*gateway, *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise CommandError(f"gateway {' '.join(args)} failed: {done.stdout}{done.stderr}")
    return done.stdout


def create_key(db: Path | str, tenant: str, *, gateway: Sequence[str] = GATEWAY) -> tuple[str, str]:
    """Creates `tenant` if needed and a key for it, in the ledger at `db` (see `ledger_url`), with
    the CLI (`gateway`); returns (key, key_id)."""
    url = ledger_url(db)
    tenants = cli("tenants", "list", "--db", url, gateway=gateway)
    if tenant not in tenants.split():
        cli("tenants", "create", tenant, "--db", url, gateway=gateway)
    out = cli("keys", "create", "--tenant", tenant, "--db", url, gateway=gateway)
    key = next(word for word in out.split() if word.startswith("tg-"))
    key_id = next(word for word in out.split() if word.startswith("key_"))
    return key, key_id


def usage_rows(db: Path | str) -> list[dict[str, Any]]:
    """Every usage event in the ledger at `db` (see `ledger_url`), by start time, as column: value;
    read with the database's own driver, not through the gateway's ledger code."""
    url = ledger_url(db)
    sql = "SELECT * FROM usage_events ORDER BY started_at_ms"
    if url.startswith("sqlite:///"):
        with closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as conn:
            conn.row_factory = sqlite3.Row
            return [dict(row) for row in conn.execute(sql)]
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as pg:
        return pg.execute(sql).fetchall()


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Polls `condition` until it holds or `timeout` passes; returns whether it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


# A line the process logged at ERROR or worse, by its level field (never by the text of a
# message, which may echo a client's input: an access log line holds the whole URL), or the
# start of a traceback, once ANSI colours are taken out. Python's logging:
# `2026-12-06 01:31:20,759 ERROR name: ...`; the core's tracing:
# `2026-12-06T01:31:20.759123Z ERROR target: ...`.
_LOGGED_ERROR = re.compile(
    r"^(?:\S+ \S+ (?:ERROR|CRITICAL) |\S+Z\s+ERROR\b|Traceback |Exception )", re.MULTILINE
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def logged_error(logged: str) -> str | None:
    """What a process printed (`logged`) around its first error (see `_LOGGED_ERROR`), None if
    it logged none."""
    plain = _ANSI.sub("", logged)
    found = _LOGGED_ERROR.search(plain)
    if found is None:
        return None
    return plain[max(found.start() - 500, 0) : found.end() + 3000]


def scrape(url: str) -> dict[str, float]:
    """A worker's `/metrics`, summed over label sets: {metric name: value}."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        values[name] = values.get(name, 0.0) + float(value)
    return values


def sse_events(lines: Iterator[str]) -> Iterator[str]:
    """The `data:` payloads of an SSE line stream."""
    for line in lines:
        if line.startswith("data: "):
            yield line[len("data: ") :]
