"""SIGINT and SIGTERM stop `gateway serve` gracefully at any instant of its life: before it
listens, while it serves, while it drains, and after its event loop has closed (guarantee 1 rests
on it: a stop that is not graceful loses the events in memory)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support import procs
from tests.support.stack import StackFactory

pytestmark = pytest.mark.e2e

OUTER_S = 60.0


def signal_until_exit(proc: subprocess.Popen[str], signum: int, every_s: float) -> int:
    """Sends `signum` every `every_s` until the process exits; its exit status."""
    deadline = time.monotonic() + OUTER_S
    while proc.poll() is None:
        assert time.monotonic() < deadline, "still running"
        try:
            os.kill(proc.pid, signum)
        except ProcessLookupError:
            break
        # Paced by the process itself: the next signal goes once it has not exited for `every_s`.
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=every_s)
    return proc.wait(timeout=10)


def test_a_storm_of_sigints_stops_the_gateway_once_and_cleanly(make_stack: StackFactory) -> None:
    stack = make_stack(n_sims=1, itl_ms=1)
    response = httpx.post(
        f"{stack.base_url}/completions",
        json={"model": "sim-model", "prompt": "x", "max_tokens": 2},
        headers={"authorization": f"Bearer {stack.key}"},
    )
    assert response.status_code == 200
    # Some land while it serves, some while it drains, some after its event loop has closed.
    status = signal_until_exit(stack.gateway.proc, signal.SIGINT, 0.002)
    stack.gateway.stop()  # joins the output reader
    output = "".join(stack.gateway.output)
    assert status == 0, output
    assert "stopped; 1 usage events recorded" in output, output
    assert "Traceback" not in output, output
    assert len(procs.usage_rows(stack.db)) == 1


def test_a_sigterm_before_the_gateway_listens_stops_it_cleanly(tmp_path: Path) -> None:
    sim = procs.start_sim()
    try:
        db = tmp_path / "ledger.db"
        procs.create_key(db, "acme")
        config = procs.write_config(tmp_path / "gateway.toml", [sim.url], db)
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        lines: list[str] = []
        bound = threading.Event()

        def read() -> None:
            assert proc.stdout is not None
            with proc.stdout:
                for line in proc.stdout:
                    lines.append(line)
                    if "gateway bound to" in line:
                        bound.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        # Logged once the core listens, before the control plane's loops run and the gateway
        # says it is listening: signals from here on must stop it gracefully.
        assert bound.wait(OUTER_S), "".join(lines)
        status = signal_until_exit(proc, signal.SIGTERM, 0.005)
        reader.join(timeout=10)
        output = "".join(lines)
        assert status == 0, output
        assert "stopped; 0 usage events recorded" in output, output
    finally:
        sim.stop()
