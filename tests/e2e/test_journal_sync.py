"""`journal.sync`: with `always`, each response waits for its own sync (requests sent one after
another share none); with `interval`, syncs follow the clock, not the requests. Counted by
`tokengate_journal_sync_seconds`, against a real gateway and simulator."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.support import procs

pytestmark = pytest.mark.e2e

REQUESTS = 20


def syncs_after_sequential_requests(
    tmp_path: Path, journal: str
) -> tuple[float, float, dict[str, float]]:
    """Sends `REQUESTS` completions one after another through a gateway with `journal`; returns
    the syncs its journal made meanwhile, the seconds they took, and the metrics once a sync
    has made their records durable."""
    sim = procs.start_sim()
    _, key, config = procs.journaled(tmp_path, sim, journal)
    gateway = procs.start(["serve", "--config", str(config)])
    try:
        metric = "tokengate_journal_sync_seconds_count"
        before = procs.scrape(gateway.url).get(metric, 0.0)
        began = time.monotonic()
        with httpx.Client(headers={"authorization": f"Bearer {key}"}, timeout=30) as client:
            for _ in range(REQUESTS):
                body = {"model": "sim-model", "prompt": "hi", "max_tokens": 4}
                response = client.post(gateway.url + "/v1/completions", json=body)
                assert response.status_code == 200, response.text
        elapsed = time.monotonic() - began
        syncs = procs.scrape(gateway.url).get(metric, 0.0) - before
        aged = "tokengate_journal_unsynced_age_seconds_count"
        assert procs.wait_for(lambda: procs.scrape(gateway.url).get(aged, 0.0) >= 1, 30)
        return syncs, elapsed, procs.scrape(gateway.url)
    finally:
        gateway.stop()
        sim.stop()


def test_always_syncs_before_each_response_ends(tmp_path: Path) -> None:
    syncs, _, _ = syncs_after_sequential_requests(tmp_path, 'sync = "always"\n')
    # Each response waited for a sync of its own event before the next request was sent.
    assert syncs >= REQUESTS, syncs


def test_interval_syncs_on_the_clock_not_per_response(tmp_path: Path) -> None:
    syncs, elapsed, metrics = syncs_after_sequential_requests(
        tmp_path, 'sync = "interval"\nsync_interval_ms = 1000\n'
    )
    # At most one sync a tick (a second), plus the one a tick may have begun before the first
    # request: a sync per response would be 20 in well under a second.
    assert syncs <= elapsed / 1.0 + 2, (syncs, elapsed)
    # Each sync that made records durable tells how long the oldest had waited for it: here a
    # tick, give or take the request that made it due.
    aged = metrics["tokengate_journal_unsynced_age_seconds_count"]
    assert aged <= metrics["tokengate_journal_sync_seconds_count"], metrics
    assert metrics["tokengate_journal_unsynced_age_seconds_sum"] > 0, metrics
