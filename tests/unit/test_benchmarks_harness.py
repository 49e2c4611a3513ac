"""`benchmarks/harness.py`'s lifetime: a benchmark ended by a signal still stops what it
started."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from harness import Pinned, terminate_raises

# A benchmark in miniature: a service started, then a wait for the signal.
SCRIPT = textwrap.dedent(
    f"""
    import signal, subprocess, sys
    sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "benchmarks")!r}]
    from harness import terminate_raises
    with terminate_raises():
        service = subprocess.Popen(
            [sys.executable, "-c", "import signal; signal.pause()"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            print(service.pid, flush=True)
            signal.pause()
        finally:
            service.kill()
            service.wait()
            print("stopped", flush=True)
    """
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_runs_the_cleanup_that_stops_the_services(signum: signal.Signals) -> None:
    bench = subprocess.Popen(
        [sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert bench.stdout is not None
    service = int(bench.stdout.readline())
    try:
        bench.send_signal(signum)
        out, err = bench.communicate(timeout=60)
        assert bench.returncode == 128 + signum, err
        assert out.strip() == "stopped"
        # Reaped by the cleanup: the pid names no process.
        with pytest.raises(ProcessLookupError):
            os.kill(service, 0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(service, signal.SIGKILL)


def test_the_handlers_before_it_are_put_back() -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    with terminate_raises():
        for sig in before:
            assert signal.getsignal(sig) not in (signal.SIG_DFL, signal.SIG_IGN, before[sig])
    assert {sig: signal.getsignal(sig) for sig in before} == before


# A process whose second thread, named `spinner`, runs while its first waits to be stopped.
SPINNER = textwrap.dedent(
    """
    import ctypes, signal, threading
    def spin():
        ctypes.CDLL(None).prctl(15, b"spinner", 0, 0, 0)  # PR_SET_NAME
        while True:
            pass
    threading.Thread(target=spin, daemon=True).start()
    signal.pause()
    """
)


def test_thread_seconds_counts_each_thread_by_its_name(tmp_path: Path) -> None:
    process = Pinned("spinner", 0, [sys.executable, "-c", SPINNER], tmp_path)
    try:
        # Waits on the count itself, until the spinner has run a tenth of a second; between
        # two looks, on the process, which fails the test at once if it ends.
        seconds = process.thread_seconds()
        for _ in range(6_000):
            if seconds.get("spinner", 0.0) > 0.1:
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.proc.wait(timeout=0.01)
            assert process.proc.returncode is None, process.log_tail()
            seconds = process.thread_seconds()
        assert seconds.get("spinner", 0.0) > 0.1, seconds
        others = sum(ran for name, ran in seconds.items() if name != "spinner")
        assert others < seconds["spinner"], seconds
        assert process.thread_seconds()["spinner"] >= seconds["spinner"]
    finally:
        process.stop()
