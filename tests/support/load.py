"""Steady load on a gateway while a test changes its fleet: a few threads send completions, half
of them streamed, one after another until stopped, and keep every failure."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import httpx

from tests.support import procs

__all__ = ["Load", "running", "served", "worker_urls"]


@dataclass
class Load:
    """`with Load(url, key):` runs `threads` senders against the gateway at `url`."""

    url: str
    key: str
    model: str = "sim-model"
    threads: int = 4
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _send(self, client: httpx.Client, stream: bool) -> None:
        body = {"model": self.model, "prompt": "load", "max_tokens": 4, "stream": stream}
        if not stream:
            response = client.post("/v1/completions", json=body)
            if response.status_code != 200:
                raise RuntimeError(f"{response.status_code} {response.text}")
            return
        with client.stream("POST", "/v1/completions", json=body) as response:
            lines = list(response.iter_lines())
            if response.status_code != 200 or "data: [DONE]" not in lines:
                raise RuntimeError(f"stream {response.status_code}: {lines[-3:]}")

    def _run(self, n: int) -> None:
        headers = {"authorization": f"Bearer {self.key}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=30) as client:
            turn = n
            while not self._stop.is_set():
                turn += 1
                try:
                    self._send(client, stream=turn % 2 == 0)
                except Exception as exc:
                    with self._lock:
                        self.failures.append(repr(exc))
                    continue
                with self._lock:
                    self.ok += 1

    def sent(self) -> int:
        with self._lock:
            return self.ok + len(self.failures)

    def __enter__(self) -> Load:
        for n in range(self.threads):
            thread = threading.Thread(target=self._run, args=(n,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


def worker_urls(gateway_url: str, metric: str = "tokengate_worker_healthy") -> dict[str, float]:
    """The workers of the gateway's `/metrics` (each `metric` sample), by URL."""
    text = httpx.get(f"{gateway_url}/metrics", timeout=5).text
    found: dict[str, float] = {}
    prefix = f'{metric}{{worker="'
    for line in text.splitlines():
        if line.startswith(prefix):
            labels, _, value = line.rpartition(" ")
            found[labels[len(prefix) : labels.index('"', len(prefix))]] = float(value)
    return found


def served(sim_url: str) -> int:
    """Requests the simulator at `sim_url` has completed, by its own counter."""
    return int(procs.scrape(sim_url).get("vllm:request_success_total", 0))


def running(sim_url: str) -> int:
    """Requests running on the simulator at `sim_url` now, by its own gauge."""
    return int(procs.scrape(sim_url).get("vllm:num_requests_running", 0))
