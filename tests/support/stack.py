"""One gateway process in front of simulators, its ledger and one tenant's key: what most
end-to-end tests start (through the `stack` and `make_stack` fixtures of `tests/conftest.py`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import openai

from tests.support import procs

__all__ = ["Stack", "StackFactory", "start_stack"]


@dataclass
class Stack:
    """A gateway process, the simulators behind it, its ledger and one tenant's key."""

    gateway: procs.Process
    sims: list[procs.Process]
    db: Path | str  # a SQLite file, or a ledger URL
    key: str
    key_id: str
    clients: dict[str, openai.OpenAI] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"{self.gateway.url}/v1"

    def client(self, key: str | None = None) -> openai.OpenAI:
        """An SDK client for `key` (default: the stack's key), closed when the stack stops."""
        key = key or self.key
        if key not in self.clients:
            self.clients[key] = openai.OpenAI(
                base_url=self.base_url, api_key=key, max_retries=0, timeout=30.0
            )
        return self.clients[key]

    def sim_totals(self) -> tuple[int, int]:
        """(prompt, generation) tokens the simulators counted, summed over all of them."""
        prompt = generation = 0
        for sim in self.sims:
            metrics = procs.scrape(sim.url)
            prompt += int(metrics.get("vllm:prompt_tokens_total", 0))
            generation += int(metrics.get("vllm:generation_tokens_total", 0))
        return prompt, generation

    def rows(self) -> list[object]:
        return list(procs.usage_rows(self.db))

    def outstanding(self) -> int:
        """Requests the gateway has in flight on its workers, from its own `/metrics`."""
        return int(procs.scrape(self.gateway.url).get("tokengate_worker_outstanding_requests", 0))

    def stop(self) -> None:
        for client in self.clients.values():
            client.close()
        self.gateway.stop()
        for sim in self.sims:
            sim.stop()


StackFactory = Callable[..., Stack]


def start_stack(
    config_path: Path,
    db: Path | str,
    n_sims: int = 2,
    config_extra: str = "",
    grace_s: float = 5.0,
    *,
    server: str = "",
    routing: str = "",
    worker: str = "",
    **sim_options: object,
) -> Stack:
    """Starts `n_sims` simulators (each with `sim_options`) and a gateway in front of them, its
    config at `config_path` and its ledger at `db` (see `procs.ledger_url`), where the tenant
    `acme` gets a key; `config_extra`, `server`, `routing` and `worker` go to the gateway's config
    as in `procs.write_config`."""
    sims = [procs.start_sim(**sim_options) for _ in range(n_sims)]
    key, key_id = procs.create_key(db, "acme")
    config = procs.write_config(
        config_path,
        [s.url for s in sims],
        db,
        config_extra,
        grace_s,
        server=server,
        routing=routing,
        worker=worker,
    )
    gateway = procs.start(["serve", "--config", str(config)])
    return Stack(gateway=gateway, sims=sims, db=db, key=key, key_id=key_id)
