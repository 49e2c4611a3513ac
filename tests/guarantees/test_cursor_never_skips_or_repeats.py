"""Guarantee 5: the billing cursor never skips or repeats an event, with concurrent writers.
Billing consumers follow the usage-event cursor while three `gateway serve` replicas meter two
tenants' traffic into one PostgreSQL ledger: each sees every event exactly once, and in commit
order; a tenant following its own cursor (with its API key) sees its own events so."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.support import procs

pytestmark = pytest.mark.e2e

BILLING_TOKEN = "e2e-billing-token"
MODEL = "sim-model"
REPLICAS = 3
CLIENTS_PER_REPLICA = 4
REQUESTS_PER_CLIENT = 60


def start_replicas(tmp: Path, pg_url: str, sims: list[procs.Process]) -> list[procs.Process]:
    # Small, frequent usage batches: the replicas' write transactions interleave as often as
    # they can.
    extra = "[admin]\nport = 0\n\n[control]\nusage_flush_ms = 10\nusage_batch = 7\n"
    replicas = []
    for i in range(REPLICAS):
        config = procs.write_config(tmp / f"gateway-{i}.toml", [s.url for s in sims], pg_url, extra)
        replicas.append(
            procs.start(
                ["serve", "--config", str(config)],
                env={"TOKENGATE_BILLING_TOKEN": BILLING_TOKEN},
            )
        )
    return replicas


class Consumer(threading.Thread):
    """Follows `next_cursor` on one replica's billing API, `limit` events a page, with `token`
    (the billing token: every tenant; an API key: its tenant's), until told to stop and a page
    comes back empty."""

    def __init__(self, admin_url: str, limit: int, token: str = BILLING_TOKEN) -> None:
        super().__init__(daemon=True)
        self.admin_url = admin_url
        self.limit = limit
        self.token = token
        self.ids: list[str] = []
        self.pages = 0
        self.finish = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._follow()
        except BaseException as exc:  # reported by the test
            self.error = exc

    def _follow(self) -> None:
        cursor: str | None = None
        headers = {"authorization": f"Bearer {self.token}"}
        with httpx.Client(base_url=self.admin_url, headers=headers, timeout=10) as client:
            while True:
                params: dict[str, str | int] = {"limit": self.limit}
                if cursor is not None:
                    params["after"] = cursor
                page = client.get("/v1/billing/usage-events", params=params)
                page.raise_for_status()
                body = page.json()
                self.pages += 1
                self.ids += [event["id"] for event in body["data"]]
                cursor = body["next_cursor"]
                if not body["data"] and self.finish.is_set():
                    return


def test_consumers_see_every_event_once_while_three_replicas_write(
    tmp_path: Path, pg_url: str
) -> None:
    sims = [procs.start_sim(itl_ms=0) for _ in range(2)]
    keys = [procs.create_key(pg_url, tenant) for tenant in ("acme", "beta")]
    replicas = start_replicas(tmp_path, pg_url, sims)
    try:
        admin_urls = [
            procs.wait_line(r, r"admin API listening on (http://\S+)")[1] for r in replicas
        ]
        consumers = [
            Consumer(admin_urls[0], 5),
            Consumer(admin_urls[1], 64),
            Consumer(admin_urls[2], 5, token=keys[0][0]),
        ]
        for consumer in consumers:
            consumer.start()

        def client(n: int) -> int:
            replica = replicas[n % REPLICAS]
            key = keys[n // REPLICAS % len(keys)][0]
            with httpx.Client(
                base_url=replica.url, headers={"authorization": f"Bearer {key}"}, timeout=30
            ) as http:
                for _ in range(REQUESTS_PER_CLIENT):
                    answer = http.post(
                        "/v1/completions",
                        json={"model": MODEL, "prompt": "bill me once", "max_tokens": 2},
                    )
                    assert answer.status_code == 200, answer.text
            return REQUESTS_PER_CLIENT

        with ThreadPoolExecutor(REPLICAS * CLIENTS_PER_REPLICA) as pool:
            sent = sum(pool.map(client, range(REPLICAS * CLIENTS_PER_REPLICA)))
        assert procs.wait_for(lambda: len(procs.usage_rows(pg_url)) == sent, timeout=30)
        for consumer in consumers:
            consumer.finish.set()
        for consumer in consumers:
            consumer.join(60)
            assert not consumer.is_alive()
            assert consumer.error is None, repr(consumer.error)
    finally:
        for replica in replicas:
            replica.stop()
        for sim in sims:
            sim.stop()

    rows = procs.usage_rows(pg_url)
    in_commit_order = [row["event_id"] for row in sorted(rows, key=lambda row: row["seq"])]
    assert len(in_commit_order) == sent
    assert [row["seq"] for row in sorted(rows, key=lambda row: row["seq"])] == list(
        range(1, sent + 1)
    )
    assert len({row["worker"] for row in rows}) == len(sims)
    acme_key_id = keys[0][1]
    acme_in_commit_order = [
        row["event_id"]
        for row in sorted(rows, key=lambda row: row["seq"])
        if row["key_id"] == acme_key_id
    ]
    assert 0 < len(acme_in_commit_order) < sent
    for consumer, expected in zip(
        consumers, (in_commit_order, in_commit_order, acme_in_commit_order), strict=True
    ):
        # While writers committed: the consumer saw events arrive over many pages.
        assert consumer.pages > len(expected) // max(consumer.limit, 1) // 2
        assert len(consumer.ids) == len(set(consumer.ids)), "an event was seen twice"
        assert consumer.ids == expected, "an event was missed or seen out of order"
