"""The ledger writer's threads, as the kernel schedules them: writes at idle priority while the
process leaves CPU to spare, at normal priority while it keeps its cores busy, or once a write was
starved by a core another process keeps busy."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.ledger_writer import LedgerWriter, available_cores


def where_and_how() -> tuple[int, int]:
    """The kernel's id of the thread this runs on, and its scheduling class."""
    return threading.get_native_id(), os.sched_getscheduler(0)


def test_writes_run_on_a_thread_of_the_idle_class_and_leave_the_loops_thread_alone() -> None:
    writer = LedgerWriter()

    async def scenario() -> tuple[int, int]:
        # As the usage loop does, a flush period after the last look at the process's CPU use.
        await asyncio.sleep(0.1)
        return await writer.run(where_and_how)

    try:
        thread, policy = asyncio.run(scenario())
    finally:
        writer.close()
    assert policy == os.SCHED_IDLE
    assert thread == writer.idle_thread_id
    assert thread != threading.get_native_id()
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    assert writer.starved == 0
    assert not writer.held_at_normal_priority


def test_an_exception_of_a_write_reaches_its_caller() -> None:
    def fails() -> None:
        raise RuntimeError("the ledger refused")

    writer = LedgerWriter()
    try:
        with pytest.raises(RuntimeError, match="the ledger refused"):
            asyncio.run(writer.run(fails))
    finally:
        writer.close()


@pytest.fixture
def busy_core() -> Iterator[None]:
    """This thread (so the writer's threads it starts) and a process spinning at normal priority
    on one core: the writer's idle thread gets almost none of it."""
    core = min(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    spin = (
        f"import os, sys; os.sched_setaffinity(0, {{{core}}}); print('spinning', flush=True)\n"
        "while True: pass"
    )
    hog = subprocess.Popen([sys.executable, "-c", spin], stdout=subprocess.PIPE, text=True)
    try:
        assert hog.stdout is not None
        assert hog.stdout.readline().strip() == "spinning"
        os.sched_setaffinity(0, {core})
        yield
    finally:
        os.sched_setaffinity(0, before)
        hog.kill()
        hog.wait()
        if hog.stdout is not None:
            hog.stdout.close()


def test_a_starved_write_moves_the_writes_to_normal_priority(busy_core: None) -> None:
    # About 10 ms of CPU: at idle priority beside the spinning process, seconds of waiting.
    def work() -> tuple[int, int]:
        sum(range(300_000))
        return where_and_how()

    writer = LedgerWriter(starved_s=0.05, hold_s=3600, busy=float("inf"))

    async def scenario() -> list[tuple[int, int]]:
        return [await writer.run(work) for _ in range(2)]

    try:
        (first, first_policy), (second, second_policy) = asyncio.run(scenario())
    finally:
        writer.close()
    assert first_policy == os.SCHED_IDLE
    assert writer.starved == 1
    assert writer.held_at_normal_priority
    assert second_policy == os.SCHED_OTHER
    assert second != first


def test_writes_run_at_normal_priority_while_the_process_keeps_its_cores_busy() -> None:
    # Two threads hashing (which lets go of the GIL) keep this process past a third of one core,
    # however busy the machine; the writer is told the process has one.
    stop = threading.Event()

    def spin() -> None:
        data = bytes(1 << 20)
        while not stop.is_set():
            hashlib.sha256(data).digest()

    spinners = [threading.Thread(target=spin) for _ in range(2)]
    writer = LedgerWriter(busy=0.3, cores=1)

    async def scenario() -> tuple[int, int]:
        await asyncio.sleep(0.2)
        return await writer.run(where_and_how)

    writer.busy_share()
    for spinner in spinners:
        spinner.start()
    try:
        _, policy = asyncio.run(scenario())
    finally:
        stop.set()
        for spinner in spinners:
            spinner.join()
        writer.close()
    assert policy == os.SCHED_OTHER
    assert writer.starved == 0
    assert not writer.held_at_normal_priority


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [("150000 100000\n", 1.5), ("max 100000\n", None), (None, None), ("garbled\n", None)],
)
def test_the_cores_a_process_may_use_are_fewer_under_its_cgroups_cpu_limit(
    tmp_path: Path, cpu_max: str | None, expected: float | None
) -> None:
    membership = tmp_path / "cgroup"
    membership.write_text("0::/kubepods/pod1/gateway\n")
    group = tmp_path / "kubepods" / "pod1" / "gateway"
    group.mkdir(parents=True)
    if cpu_max is not None:
        (group / "cpu.max").write_text(cpu_max)
    cores = len(os.sched_getaffinity(0))
    found = available_cores(cgroup_root=tmp_path, membership=membership)
    assert found == (cores if expected is None else min(cores, expected))
