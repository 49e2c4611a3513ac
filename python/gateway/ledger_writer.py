"""The threads the usage collector writes the ledger on, so that a write never holds up a request.

`gateway serve` runs its data plane (the core's tokio threads) and this control plane in one
process, and on a core they share a ledger write is a millisecond or more of CPU (SQLite's B-trees
and its commit, the rows built in Python). Linux runs it to the end of its time slice before a
woken request thread gets the CPU back (and a kernel without full preemption, the usual server
build, to the end of any system call it is in), so a request that arrives meanwhile waits for the
write: at a moderate 500 requests/s, a write every 100 ms put a millisecond onto the 99th
percentile (`benchmarks/RESULTS.md`).

The writes therefore run on a thread of Linux's `SCHED_IDLE` class, which any other thread
preempts at once, while the process leaves CPU to spare. Where it does not, such a thread would get
a sliver of it and the ledger would fall behind, so the writes run on a thread of normal priority:
while the process used `busy` or more of the cores it may use since the previous write (its own
cgroup's CPU limit counted), and for `hold_s` after a write at idle priority waited longer than
`starved_s` beyond its own CPU time (the CPU was short in a way the process's own use does not
show: other processes, or a limit set on a parent cgroup). Two threads rather than one that
changes class: an unprivileged thread cannot leave `SCHED_IDLE` (it needs `CAP_SYS_NICE`). Where
there is no `SCHED_IDLE` (not Linux), both are normal threads. At normal priority a write still
takes turns with the request threads rather than running to its slice's end: the extension's
writer, and its conversion of a drain into events, offer the core every 256 events
(`gateway_core::thread_class::offer_core`), about half a millisecond of work.

Writes are serialised: `run` is awaited before the next is started, and `close` waits for the one
under way.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

__all__ = ["LedgerWriter", "available_cores"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# The share of its cores a process uses from which its writes run at normal priority.
BUSY = 0.85
# A write that waited this much longer than its own CPU time was starved.
STARVED_S = 0.25
# How long writes stay at normal priority after a starved one.
HOLD_S = 10.0


class LedgerWriter:
    """Runs ledger writes off the event loop: at idle priority while the process leaves CPU to
    spare, at normal priority while it uses `busy` of its `cores` (default: `available_cores()`)
    and for `hold_s` after a write was starved."""

    def __init__(
        self,
        *,
        busy: float = BUSY,
        starved_s: float = STARVED_S,
        hold_s: float = HOLD_S,
        cores: float | None = None,
    ) -> None:
        self._busy = busy
        self._starved_s = starved_s
        self._hold_s = hold_s
        self._cores = cores or available_cores()
        # When the process's CPU use was last read, and what it was.
        self._clock = (time.monotonic(), time.process_time())
        # The idle thread's id in the kernel, once it has lowered itself (None where it could not).
        self.idle_thread_id: int | None = None
        self._idle = ThreadPoolExecutor(1, "ledger-idle", initializer=self._lower_to_idle)
        self._normal = ThreadPoolExecutor(1, "ledger-writer")
        self._normal_until = 0.0
        # Writes found starved so far.
        self.starved = 0

    def _lower_to_idle(self) -> None:
        policy = getattr(os, "SCHED_IDLE", None)
        if policy is None:
            return
        try:
            os.sched_setscheduler(0, policy, os.sched_param(0))
        except OSError as exc:
            logger.info("the ledger writer stays at normal priority (SCHED_IDLE refused: %s)", exc)
            return
        self.idle_thread_id = threading.get_native_id()

    @property
    def held_at_normal_priority(self) -> bool:
        """Whether writes run at normal priority for a while because one was starved."""
        return time.monotonic() < self._normal_until

    def busy_share(self) -> float:
        """The share of its cores the process used since the last call (or since it began)."""
        wall, cpu = time.monotonic(), time.process_time()
        last_wall, last_cpu = self._clock
        self._clock = (wall, cpu)
        return (cpu - last_cpu) / max(wall - last_wall, 1e-6) / self._cores

    async def run(self, write: Callable[[], T]) -> T:
        """`write()` on the thread of the moment; its result, or its exception."""
        idle = self.busy_share() < self._busy and not self.held_at_normal_priority
        began = time.monotonic()
        result, cpu_s = await asyncio.get_running_loop().run_in_executor(
            self._idle if idle else self._normal, _timed, write
        )
        waited = time.monotonic() - began - cpu_s
        if idle and waited > self._starved_s:
            self.starved += 1
            self._normal_until = time.monotonic() + self._hold_s
            logger.warning(
                "a ledger write at idle priority waited %.2fs for the CPU: writing at normal "
                "priority for %.0fs",
                waited,
                self._hold_s,
            )
        return result

    def close(self) -> None:
        """Waits for the write under way, if any, and ends both threads."""
        self._idle.shutdown(wait=True)
        self._normal.shutdown(wait=True)


def _timed(write: Callable[[], T]) -> tuple[T, float]:
    """`write()` and the CPU time this thread spent on it."""
    began = time.thread_time()
    result = write()
    return result, time.thread_time() - began


def available_cores(
    cgroup_root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")
) -> float:
    """The cores this process may use: the ones it may run on, or fewer under the CPU limit of its
    own cgroup v2 (`cpu.max`, a container's CPU limit on Kubernetes)."""
    cores = float(len(os.sched_getaffinity(0)))
    try:
        for line in membership.read_text().splitlines():
            if line.startswith("0::"):
                quota, period = (cgroup_root / line[3:].lstrip("/") / "cpu.max").read_text().split()
                if quota != "max":
                    return min(cores, int(quota) / int(period))
    except (OSError, ValueError):
        pass
    return cores
