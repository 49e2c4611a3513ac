"""Live reload of `gateway serve`'s configuration file, by SIGHUP and by `POST /admin/v1/reload`,
against real processes: under load, a changed worker list takes effect with no failed request
(the new worker gets traffic, the removed one none once its requests in flight are done, by the
simulators' own counters); an invalid file is refused, logged with the option at fault, and the
old configuration keeps serving; options that need a restart are named, not applied."""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support import procs
from tests.support.load import Load, running, served, worker_urls

pytestmark = pytest.mark.e2e

TOKEN = "reload-admin-token"
ADMIN_LISTENING = re.compile(r"admin API listening on (http://\S+)")
# How many requests the newcomer must serve before the removed worker's count is checked.
AFTER = 30


@dataclass
class Reloadable:
    gateway: procs.Process
    sims: list[str]
    processes: list[procs.Process]
    config: Path
    db: Path
    key: str
    admin: str

    def write(self, workers: list[str], extra: str = "", worker: str = "") -> None:
        procs.write_config(
            self.config, workers, self.db, extra=_ADMIN + extra, routing="", worker=worker
        )

    def in_rotation(self) -> set[str]:
        return {url for url, up in worker_urls(self.gateway.url).items() if up == 1}

    def output(self) -> str:
        return "".join(self.gateway.output)

    def reload(self, token: str = TOKEN) -> httpx.Response:
        headers = {"authorization": f"Bearer {token}"}
        return httpx.post(f"{self.admin}/admin/v1/reload", headers=headers, timeout=30)


_ADMIN = '[admin]\nhost = "127.0.0.1"\nport = 0\n'


@pytest.fixture
def reloadable(tmp_path: Path) -> Iterator[Reloadable]:
    processes = [procs.start_sim(ttft_ms=2, itl_ms=1) for _ in range(3)]
    gateway = None
    try:
        db = tmp_path / "ledger.db"
        key, _ = procs.create_key(db, "acme")
        config = tmp_path / "gateway.toml"
        sims = [sim.url for sim in processes]
        procs.write_config(config, sims[:2], db, extra=_ADMIN)
        gateway = procs.start(
            ["serve", "--config", str(config)], env={"TOKENGATE_ADMIN_TOKEN": TOKEN}
        )
        admin = procs.wait_line(gateway, ADMIN_LISTENING.pattern).group(1)
        yield Reloadable(gateway, sims, processes, config, db, key, admin)
    finally:
        for process in [gateway, *processes]:
            if process is not None:
                process.stop()


def test_sighup_with_a_changed_worker_list_under_load_fails_no_request(
    reloadable: Reloadable,
) -> None:
    first, second, third = reloadable.sims
    assert procs.wait_for(lambda: reloadable.in_rotation() == {first, second}, timeout=30)
    with Load(reloadable.gateway.url, reloadable.key) as load:
        assert procs.wait_for(lambda: served(first) > 5 and served(second) > 5, timeout=30)
        reloadable.write([second, third])
        reloadable.gateway.proc.send_signal(signal.SIGHUP)
        assert procs.wait_for(lambda: served(third) > 0, timeout=30), "the new worker got nothing"
        assert procs.wait_for(lambda: first not in worker_urls(reloadable.gateway.url), timeout=30)
        assert procs.wait_for(lambda: running(first) == 0, timeout=30)
        before = served(first)
        floor = served(third) + AFTER
        assert procs.wait_for(lambda: served(third) >= floor, timeout=60)
        assert served(first) == before, "a removed worker still got requests"
    assert load.failures == [], load.failures[:5]
    assert reloadable.in_rotation() == {second, third}
    assert "configuration reloaded from" in reloadable.output()
    # Every answered request is metered once, the ones that finished on the removed worker too.
    assert procs.wait_for(lambda: len(procs.usage_rows(reloadable.db)) >= load.ok, timeout=30)
    rows = procs.usage_rows(reloadable.db)
    assert len(rows) == load.ok
    assert {row["worker"] for row in rows} == {first, second, third}


def test_an_invalid_file_is_refused_and_the_old_configuration_serves(
    reloadable: Reloadable,
) -> None:
    first, second, third = reloadable.sims
    assert procs.wait_for(lambda: reloadable.in_rotation() == {first, second}, timeout=30)
    reloadable.write([third, "ftp://not-a-worker"])
    reloadable.gateway.proc.send_signal(signal.SIGHUP)
    procs.wait_line(reloadable.gateway, r"configuration reload refused.*workers\[1\]\.url")
    with Load(reloadable.gateway.url, reloadable.key, threads=2) as load:
        assert procs.wait_for(lambda: load.ok >= 20, timeout=30)
    assert load.failures == [], load.failures[:5]
    assert reloadable.in_rotation() == {first, second}
    assert served(third) == 0


def test_the_admin_route_reloads_and_answers_400_naming_the_field(
    reloadable: Reloadable,
) -> None:
    first, second, third = reloadable.sims
    assert procs.wait_for(lambda: reloadable.in_rotation() == {first, second}, timeout=30)
    assert reloadable.reload("wrong").status_code == 401
    # A worker of its own key and limit; a listener port that needs a restart.
    reloadable.write([first, third], extra="[grpc]\nport = 0\n", worker="max_concurrency = 2\n")
    response = reloadable.reload()
    assert response.status_code == 200, response.text
    assert response.json() == {
        "workers": 2,
        "added": 1,
        "removed": 1,
        "restart_required": ["grpc.host/grpc.port"],
    }
    # The new worker was probed before the answer.
    assert reloadable.in_rotation() == {first, third}
    assert "grpc.host/grpc.port changed in the configuration file" in reloadable.output()
    reloadable.write([first], worker="max_concurrency = 0\n")
    response = reloadable.reload()
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_config", error
    assert "workers[0].max_concurrency" in error["message"], error
    assert reloadable.in_rotation() == {first, third}
    body = {"model": "sim-model", "prompt": "after", "max_tokens": 2}
    headers = {"authorization": f"Bearer {reloadable.key}"}
    url = f"{reloadable.gateway.url}/v1/completions"
    assert httpx.post(url, json=body, headers=headers, timeout=30).status_code == 200
