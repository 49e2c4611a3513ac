"""Shared fixtures: real simulator workers and a real gateway process in front of them, and fresh
ledgers on both backends (a SQLite file, a database on a real PostgreSQL server)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest

from gateway.ledger.db import Connection, open_ledger
from tests import procs
from tests.billing_app import Billing, Seeded
from tests.fleet import Fleet
from tests.services.postgres import PostgresServer
from tests.services.redis import RedisServer


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

    def stop(self) -> None:
        for client in self.clients.values():
            client.close()
        self.gateway.stop()
        for sim in self.sims:
            sim.stop()


StackFactory = Callable[..., Stack]


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the session; tests take fresh databases from it."""
    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    """A real `redis-server` for a module's tests (each test's tenants have ids of their own)."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def fleets() -> Iterator[list[Fleet]]:
    """The fleets a test starts (`tests.fleet.start_fleet`), stopped when it ends."""
    started: list[Fleet] = []
    yield started
    for fleet in started:
        fleet.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a fresh, empty ledger: a SQLite file in the test's directory, or a new database
    on the session's PostgreSQL server (dropped after the test)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres")
    with server.database() as url:
        yield url


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Connection]:
    """An open connection to a fresh ledger, on each backend."""
    with open_ledger(ledger_url) as conn:
        yield conn


@pytest.fixture
def db(ledger_url: str) -> list[str]:
    """`--db` arguments for a fresh ledger, on each backend."""
    return ["--db", ledger_url]


@pytest.fixture
def make_stack(tmp_path: Path) -> Iterator[StackFactory]:
    """Starts `n_sims` simulators (each with `sim_options`) and a gateway in front of them."""
    stacks: list[Stack] = []

    def make(
        n_sims: int = 2,
        config_extra: str = "",
        grace_s: float = 5.0,
        ledger: str | None = None,
        server: str = "",
        routing: str = "",
        **sim_options: object,
    ) -> Stack:
        """`ledger` is a ledger URL; by default, a new SQLite file in the test's directory;
        `server` and `routing` are more lines of those tables of the gateway's config."""
        sims = [procs.start_sim(**sim_options) for _ in range(n_sims)]
        db = ledger or tmp_path / f"ledger-{len(stacks)}.db"
        key, key_id = procs.create_key(db, "acme")
        config = procs.write_config(
            tmp_path / f"gateway-{len(stacks)}.toml",
            [s.url for s in sims],
            db,
            config_extra,
            grace_s,
            server=server,
            routing=routing,
        )
        gateway = procs.start(["serve", "--config", str(config)])
        stack = Stack(gateway=gateway, sims=sims, db=db, key=key, key_id=key_id)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One gateway in front of two fast simulators, shared by a module's tests."""
    tmp = tmp_path_factory.mktemp("stack")
    sims = [procs.start_sim(itl_ms=1) for _ in range(2)]
    db = tmp / "ledger.db"
    key, key_id = procs.create_key(db, "acme")
    config = procs.write_config(tmp / "gateway.toml", [s.url for s in sims], db)
    gateway = procs.start(["serve", "--config", str(config)])
    shared = Stack(gateway=gateway, sims=sims, db=db, key=key, key_id=key_id)
    yield shared
    shared.stop()


@pytest.fixture
def seeded(ledger: Connection) -> Seeded:
    """Two tenants with a key each and a price, in a fresh ledger (`tests.billing_app`)."""
    return Seeded(ledger)


@pytest.fixture
def api(ledger: Connection) -> Billing:
    """The admin and billing app over a fresh ledger, in process (`tests.billing_app`)."""
    return Billing(ledger)
