"""Fixtures every test directory shares: real simulator workers and a real gateway process in
front of them, fresh ledgers on both backends (a SQLite file, a database on a real PostgreSQL
server), a real `redis-server`, and the billing app in process. What they start is in
`tests.support`."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.ledger.db import Connection, open_ledger
from tests.support.billing_app import Billing, Seeded
from tests.support.fleet import Fleet
from tests.support.services.postgres import PostgresServer
from tests.support.services.redis import RedisServer
from tests.support.stack import Stack, StackFactory, start_stack


def pytest_report_header() -> str:
    """Free space where tests write (ledgers, journals, the PostgreSQL cluster): a session needs
    about 1.5 GB, and a full disk fails every test at once, the report included."""
    free = shutil.disk_usage(tempfile.gettempdir()).free
    return f"free disk in {tempfile.gettempdir()}: {free / 2**30:.1f} GiB"


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
    """The fleets a test starts (`tests.support.fleet.start_fleet`), stopped when it ends."""
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
def pg_url(postgres: PostgresServer) -> Iterator[str]:
    """The URL of a fresh, empty database on the session's PostgreSQL server (dropped after the
    test), for processes that share a PostgreSQL ledger."""
    with postgres.database() as url:
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
        worker: str = "",
        **sim_options: object,
    ) -> Stack:
        """`ledger` is a ledger URL; by default, a new SQLite file in the test's directory;
        `server` and `routing` are more lines of those tables of the gateway's config, `worker`
        of every worker's."""
        stack = start_stack(
            tmp_path / f"gateway-{len(stacks)}.toml",
            ledger or tmp_path / f"ledger-{len(stacks)}.db",
            n_sims,
            config_extra,
            grace_s,
            server=server,
            routing=routing,
            worker=worker,
            **sim_options,
        )
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One gateway in front of two fast simulators, shared by a module's tests."""
    tmp = tmp_path_factory.mktemp("stack")
    shared = start_stack(tmp / "gateway.toml", tmp / "ledger.db", itl_ms=1)
    yield shared
    shared.stop()


@pytest.fixture
def seeded(ledger: Connection) -> Seeded:
    """Two tenants with a key each and a price, in a fresh ledger (`tests.support.billing_app`)."""
    return Seeded(ledger)


@pytest.fixture
def api(ledger: Connection) -> Billing:
    """The admin and billing app over a fresh ledger, in process (`tests.support.billing_app`)."""
    return Billing(ledger)
