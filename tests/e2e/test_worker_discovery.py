"""Workers found by DNS: a `[[workers]] dns` entry resolved by a real DNS server (`dnsmasq` on
loopback) whose answers the test changes while the gateway is under load. Three simulators share
one port on 127.0.0.2, .3 and .4 (all of 127/8 is loopback on Linux). A worker whose address
appears takes requests once healthy, one whose address goes takes none (its requests in flight
finish), no request fails, and a DNS server that stops answering leaves the last workers in
rotation. Which worker served what is read from the simulators' own counters."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support import procs
from tests.support.load import Load, running, served, worker_urls
from tests.support.services.dnsmasq import DnsServer

pytestmark = pytest.mark.e2e

NAME = "workers.tokengate.test"
ADDRESSES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
# How many requests the newcomer must serve before the removed worker's count is checked.
AFTER = 30


@dataclass
class Discovery:
    gateway: procs.Process
    sims: dict[str, procs.Process]
    dns: DnsServer
    db: Path
    key: str

    def in_rotation(self) -> set[str]:
        return {url for url, up in worker_urls(self.gateway.url).items() if up == 1}

    def discovery_failures(self) -> float:
        return procs.scrape(self.gateway.url).get("tokengate_discovery_failures_total", 0.0)

    def rounds(self) -> float:
        return procs.scrape(self.gateway.url).get("tokengate_discovery_rounds_total", 0.0)


@pytest.fixture
def discovery(tmp_path: Path) -> Iterator[Discovery]:
    port = procs.free_port()
    sims: dict[str, procs.Process] = {}
    gateway = None
    dns = DnsServer(tmp_path).start()
    try:
        for address in ADDRESSES:
            argv = ["sim", "--host", address, "--port", str(port), "--ttft-ms", "2"]
            argv += ["--itl-ms", "1"]
            sims[f"http://{address}:{port}"] = procs.start(argv)
        dns.set_hosts(NAME, list(ADDRESSES[:2]))
        db = tmp_path / "ledger.db"
        key, _ = procs.create_key(db, "acme")
        config = procs.write_config(
            tmp_path / "gateway.toml",
            [],
            db,
            extra=f'[[workers]]\ndns = "http://{NAME}:{port}"\n',
            routing=f'discovery_interval_ms = 200\ndns_servers = ["{dns.address}"]\n',
        )
        gateway = procs.start(["serve", "--config", str(config)])
        yield Discovery(gateway=gateway, sims=sims, dns=dns, db=db, key=key)
    finally:
        for process in [gateway, *sims.values()]:
            if process is not None:
                process.stop()
        dns.stop()


def test_workers_that_appear_and_vanish_in_dns_change_the_rotation_under_load(
    discovery: Discovery,
) -> None:
    first, second, third = discovery.sims
    assert procs.wait_for(lambda: discovery.in_rotation() == {first, second}, timeout=30)
    with Load(discovery.gateway.url, discovery.key) as load:
        assert procs.wait_for(lambda: served(first) > 5 and served(second) > 5, timeout=30)
        # The first address goes, the third comes: two rounds of resolution later (the first may
        # have asked before the change), the rotation is the new one. Counted, not timed.
        discovery.dns.set_hosts(NAME, [ADDRESSES[1], ADDRESSES[2]])
        changed_at = discovery.rounds()
        assert procs.wait_for(lambda: discovery.rounds() >= changed_at + 2, timeout=30)
        assert discovery.in_rotation() == {second, third}
        assert procs.wait_for(lambda: served(third) > 0, timeout=30), "the newcomer got nothing"
        assert procs.wait_for(lambda: first not in worker_urls(discovery.gateway.url), timeout=30)
        # Its requests in flight finish; from then on it gets none.
        assert procs.wait_for(lambda: running(first) == 0, timeout=30)
        before = served(first)
        floor = served(third) + AFTER
        assert procs.wait_for(lambda: served(third) >= floor, timeout=60)
        assert served(first) == before, "a worker gone from DNS still got requests"
        assert discovery.in_rotation() == {second, third}
    assert load.failures == [], load.failures[:5]
    assert load.ok > AFTER
    # Each request that was answered is in the ledger once, whichever worker served it.
    assert procs.wait_for(lambda: len(procs.usage_rows(discovery.db)) >= load.ok, timeout=30)
    rows = procs.usage_rows(discovery.db)
    assert len(rows) == load.ok
    assert {row["worker"] for row in rows} == {first, second, third}


def test_an_empty_or_failed_resolution_leaves_the_last_workers(discovery: Discovery) -> None:
    first, second, _ = discovery.sims
    assert procs.wait_for(lambda: discovery.in_rotation() == {first, second}, timeout=30)
    # The name has no address any more (a Service whose pods all went unready at once).
    discovery.dns.set_hosts(NAME, [])
    assert procs.wait_for(lambda: discovery.discovery_failures() >= 2, timeout=30)
    assert discovery.in_rotation() == {first, second}
    # No DNS server at all.
    failed = discovery.discovery_failures()
    discovery.dns.stop()
    assert procs.wait_for(lambda: discovery.discovery_failures() >= failed + 2, timeout=30)
    assert discovery.in_rotation() == {first, second}
    body = {"model": "sim-model", "prompt": "still here", "max_tokens": 2}
    headers = {"authorization": f"Bearer {discovery.key}"}
    for _ in range(4):
        response = httpx.post(
            f"{discovery.gateway.url}/v1/completions", json=body, headers=headers, timeout=30
        )
        assert response.status_code == 200, response.text
    assert "its last known workers stay" in "".join(discovery.gateway.output)
