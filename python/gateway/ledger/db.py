"""Ledger connections: URL parsing, connection settings, transactions and schema migrations.

Every statement reaches the driver through `execute`, `executemany` and `query` here, written with
`?` placeholders; a PostgreSQL backend translates them in this one module. It holds no state:
callers own their connections (one per thread) and close them.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "SCHEMA_VERSION",
    "ConflictError",
    "Connection",
    "DatabaseError",
    "IntegrityError",
    "LedgerError",
    "NotFoundError",
    "Row",
    "connect",
    "execute",
    "executemany",
    "migrate",
    "now_ms",
    "open_ledger",
    "parse_url",
    "query",
    "query_as",
    "schema_version",
    "transaction",
]

Connection = sqlite3.Connection
Row = tuple[Any, ...]
# The driver's exceptions, so that repositories and callers never name the driver.
DatabaseError = sqlite3.Error
IntegrityError = sqlite3.IntegrityError

_T = TypeVar("_T")

SQLITE_PREFIX = "sqlite:///"
BUSY_TIMEOUT_MS = 10_000


class LedgerError(Exception):
    """Base of the ledger's errors that a user can act on."""


class NotFoundError(LedgerError):
    """A tenant or key that does not exist."""


class ConflictError(LedgerError):
    """A write that would break a uniqueness rule (e.g. a tenant name already taken)."""


def now_ms() -> int:
    """Wall-clock time as integer unix milliseconds, the ledger's only time format."""
    return time.time_ns() // 1_000_000


def parse_url(url: str) -> Path:
    """The SQLite file of a `sqlite:///relative.db` or `sqlite:////absolute.db` URL.

    Relative paths resolve against the current directory when the database is opened.
    """
    if not url.startswith(SQLITE_PREFIX):
        raise ValueError(
            f"unsupported database URL {url!r}: only sqlite:///path/to/file.db is supported"
        )
    path = url.removeprefix(SQLITE_PREFIX)
    if not path or path.endswith("/") or "?" in path or "#" in path:
        raise ValueError(f"database URL {url!r} must name a file, e.g. sqlite:///data/gateway.db")
    return Path(path)


# Each migration is applied once, in order, in one transaction, and never edited once released.
# Times are integer unix milliseconds; booleans are BOOLEAN written from Python bools.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE tenants (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            created_at BIGINT NOT NULL,
            disabled BOOLEAN NOT NULL
        )""",
        """CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            tenant_id TEXT NOT NULL REFERENCES tenants (id),
            hash TEXT NOT NULL UNIQUE,
            prefix TEXT NOT NULL,
            name TEXT,
            created_at BIGINT NOT NULL,
            revoked_at BIGINT
        )""",
        "CREATE INDEX api_keys_tenant ON api_keys (tenant_id)",
        """CREATE TABLE usage_events (
            event_id TEXT PRIMARY KEY,
            request_id TEXT NOT NULL,
            tenant_id TEXT NOT NULL,
            key_id TEXT NOT NULL,
            model TEXT NOT NULL,
            worker TEXT,
            endpoint TEXT NOT NULL,
            stream BOOLEAN NOT NULL,
            status TEXT NOT NULL,
            http_status INTEGER NOT NULL,
            prompt_tokens BIGINT NOT NULL,
            cached_tokens BIGINT NOT NULL,
            completion_tokens BIGINT NOT NULL,
            usage_source TEXT NOT NULL,
            started_at_ms BIGINT NOT NULL,
            finished_at_ms BIGINT NOT NULL,
            recorded_at_ms BIGINT NOT NULL
        )""",
        "CREATE INDEX usage_events_tenant_model ON usage_events (tenant_id, model)",
    ),
    (
        # One policy per tenant or key (`subject_id` is a tenant id or a key id, `scope` says
        # which); limits are NULL when unlimited; `models` is a JSON array, NULL for every model.
        """CREATE TABLE quota_policies (
            subject_id TEXT PRIMARY KEY,
            scope TEXT NOT NULL,
            requests_per_minute BIGINT,
            tokens_per_minute BIGINT,
            max_concurrent BIGINT,
            token_budget BIGINT,
            money_budget_micros BIGINT,
            budget_period TEXT NOT NULL,
            models TEXT,
            updated_at BIGINT NOT NULL
        )""",
        # The price book: every version of a model's prices, in effect from `effective_at` until
        # the next version's; micro-units of currency per million tokens.
        """CREATE TABLE prices (
            model TEXT NOT NULL,
            effective_at BIGINT NOT NULL,
            prompt_per_mtok BIGINT NOT NULL,
            cached_per_mtok BIGINT NOT NULL,
            completion_per_mtok BIGINT NOT NULL,
            created_at BIGINT NOT NULL,
            PRIMARY KEY (model, effective_at)
        )""",
        # Budgets are seeded from the current day's and month's events at start-up.
        "CREATE INDEX usage_events_started ON usage_events (started_at_ms)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


def execute(conn: Connection, sql: str, params: Sequence[Any] = ()) -> int:
    """Runs one statement; returns the number of rows it changed."""
    return conn.execute(sql, params).rowcount


def executemany(conn: Connection, sql: str, rows: Sequence[Sequence[Any]]) -> int:
    """Runs one statement per row; returns the number of rows changed in total."""
    if not rows:
        return 0
    return conn.executemany(sql, rows).rowcount


def query(conn: Connection, sql: str, params: Sequence[Any] = ()) -> list[Row]:
    """Runs one SELECT and returns every row."""
    with closing(conn.execute(sql, params)) as cursor:
        return cursor.fetchall()


def query_as(
    conn: Connection, record: Callable[..., _T], sql: str, params: Sequence[Any] = ()
) -> list[_T]:
    """Runs one SELECT and returns `record(*row)` for every row: the SELECT lists its columns in
    the order of `record`'s parameters (a dataclass's fields)."""
    return [record(*row) for row in query(conn, sql, params)]


@contextmanager
def transaction(conn: Connection) -> Iterator[Connection]:
    """One write transaction: commits on success, rolls back on any exception.

    SQLite's `BEGIN IMMEDIATE` takes the write lock up front, so concurrent writers queue on
    `busy_timeout` instead of failing halfway with a lock upgrade error.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.rollback()
        raise
    conn.commit()


def schema_version(conn: Connection) -> int:
    """The version recorded in `schema_version`, 0 for a database never migrated."""
    exists = query(
        conn, "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    )
    if not exists:
        return 0
    rows = query(conn, "SELECT MAX(version) FROM schema_version")
    return int(rows[0][0] or 0)


def migrate(conn: Connection) -> int:
    """Applies every pending migration; returns the schema version reached.

    Safe against concurrent processes: the version is read inside the write transaction.
    """
    with transaction(conn):
        execute(
            conn,
            "CREATE TABLE IF NOT EXISTS schema_version "
            "(version INTEGER PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        current = schema_version(conn)
        if current > SCHEMA_VERSION:
            raise LedgerError(
                f"the database is at schema version {current}, newer than this gateway's "
                f"{SCHEMA_VERSION}; upgrade the gateway"
            )
        for version in range(current + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[version - 1]:
                execute(conn, statement)
            execute(
                conn,
                "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                (version, now_ms()),
            )
    return SCHEMA_VERSION


def connect(url: str) -> Connection:
    """Opens (creating if needed) and migrates the ledger at `url`. The caller closes it.

    WAL lets readers (the CLI, billing) run beside the writer; `synchronous=FULL` makes every
    committed usage batch survive a power cut, at one fsync per batch.
    """
    path = parse_url(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


@contextmanager
def open_ledger(url: str) -> Iterator[Connection]:
    """`connect(url)` as a context manager that always closes the connection."""
    conn = connect(url)
    try:
        yield conn
    finally:
        conn.close()
