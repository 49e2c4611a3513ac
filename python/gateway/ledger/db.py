"""Ledger connections: URLs, the SQLite and PostgreSQL dialects, transactions and migrations.

Every statement reaches the driver through `execute`, `executemany` and `query` here, written with
`?` placeholders in SQL that both dialects accept (the migrations in `schema` too); this is the one
module that knows a dialect. The drivers' exceptions leave it as `DatabaseError` (`IntegrityError`
for a broken uniqueness or foreign-key rule), so callers never name a driver. It holds no state:
callers own their connections (one per thread) and close them.
"""

from __future__ import annotations

import ctypes
import importlib
import re
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

from gateway.ledger.schema import MIGRATIONS, SCHEMA_VERSION, Statement

if TYPE_CHECKING:
    import psycopg

    from gateway._core import SqliteUsageWriter

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "ConflictError",
    "Connection",
    "DatabaseError",
    "Dialect",
    "IntegrityError",
    "LedgerError",
    "NotFoundError",
    "Row",
    "add_to_sums",
    "apply_statement",
    "connect",
    "execute",
    "executemany",
    "insert_rows",
    "migrate",
    "native_usage_writer",
    "now_ms",
    "open_ledger",
    "parse_url",
    "query",
    "query_as",
    "schema_version",
    "transaction",
]

Row = tuple[Any, ...]
Dialect = Literal["sqlite", "postgresql"]

_T = TypeVar("_T")

SQLITE_PREFIX = "sqlite:///"
POSTGRES_PREFIXES = ("postgresql://", "postgres://")
# How long a statement waits for another connection's lock before it fails: SQLite's
# `busy_timeout`, PostgreSQL's `lock_timeout`.
LOCK_TIMEOUT_MS = 10_000
POSTGRES_CONNECT_TIMEOUT_S = 10
# The PostgreSQL advisory lock that every write transaction takes first ("tokengat" in ASCII).
WRITE_LOCK_KEY = 0x746F6B656E676174


class LedgerError(Exception):
    """Base of the ledger's errors that a user can act on."""


class NotFoundError(LedgerError):
    """A tenant or key that does not exist."""


class ConflictError(LedgerError):
    """A write that would break a uniqueness rule (e.g. a tenant name already taken)."""


class DatabaseError(Exception):
    """The database failed: unreachable, locked for longer than the timeout, or a statement it
    refused. The driver's exception is the `__cause__`. Not a `LedgerError`: the user's input is
    not at fault, and a retry may succeed."""


class IntegrityError(DatabaseError):
    """A write that broke a uniqueness or foreign-key rule of the schema."""


def now_ms() -> int:
    """Wall-clock time as integer unix milliseconds, the ledger's only time format."""
    return time.time_ns() // 1_000_000


def _redacted(url: str) -> str:
    """`url` without its password, for messages and logs."""
    url = re.sub(r"(://[^/?#@:]*:)[^/?#@]*@", r"\1***@", url)
    return re.sub(r"([?&]password=)[^&#]*", r"\1***", url)


def parse_url(url: str) -> Path | str:
    """What a ledger URL names: a SQLite file as a `Path`, or a PostgreSQL database as the URL
    itself, for libpq.

    `sqlite:///relative/path.db` (relative to the current directory when the database is opened)
    or `sqlite:////absolute/path.db`; `postgresql://user:password@host:port/dbname` (or
    `postgres://`), with libpq's parameters if wanted (`?sslmode=require`, `?host=/run/postgresql`
    for a unix socket). Anything else is a `ValueError`.
    """
    if url.startswith(SQLITE_PREFIX):
        path = url.removeprefix(SQLITE_PREFIX)
        if not path or path.endswith("/") or "?" in path or "#" in path:
            raise ValueError(
                f"database URL {url!r} must name a file, e.g. sqlite:///data/gateway.db"
            )
        return Path(path)
    if url.startswith(POSTGRES_PREFIXES):
        _check_postgres_url(url)
        return url
    raise ValueError(
        f"unsupported database URL {_redacted(url)!r}: use sqlite:///path/to/file.db or "
        "postgresql://user:password@host:port/dbname"
    )


def _check_postgres_url(url: str) -> None:
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(url)
    except ProgrammingError as exc:
        raise ValueError(f"invalid PostgreSQL URL {_redacted(url)!r}: {exc}") from None
    if not params.get("dbname"):
        raise ValueError(
            f"PostgreSQL URL {_redacted(url)!r} must name a database, "
            "e.g. postgresql://user:password@host:5432/tokengate"
        )
    if not all(port.isdigit() for port in str(params.get("port", "0")).split(",")):
        raise ValueError(f"PostgreSQL URL {_redacted(url)!r} has an invalid port")


class Connection(ABC):
    """An open ledger database: the driver's connection, which it owns, and its dialect.

    Hand it to this module's functions and to the repositories, from the thread that opened it,
    and `close()` it (`open_ledger` does). Outside `transaction()` each statement commits on its
    own, as in SQLite's autocommit mode. `dialect` says which database it is.
    """

    dialect: ClassVar[Dialect]
    # The driver's base exception and its integrity error, translated by `_errors`.
    _driver_errors: tuple[type[Exception], type[Exception]]

    @contextmanager
    def _errors(self) -> Iterator[None]:
        base, integrity = self._driver_errors
        try:
            yield
        except integrity as exc:
            raise IntegrityError(str(exc)) from exc
        except base as exc:
            raise DatabaseError(str(exc)) from exc

    @abstractmethod
    def close(self) -> None:
        """Closes the driver's connection; a transaction still open is rolled back."""

    @abstractmethod
    def _execute(self, sql: str, params: Sequence[Any]) -> int: ...

    @abstractmethod
    def _executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> int: ...

    @abstractmethod
    def _query(self, sql: str, params: Sequence[Any]) -> list[Row]: ...

    @abstractmethod
    def _insert_rows(self, table: str, columns: Sequence[str], rows: Sequence[Row]) -> None: ...

    @abstractmethod
    def _add_to_sums(
        self, table: str, key: Sequence[str], sums: Sequence[str], rows: Sequence[Row]
    ) -> None: ...

    @abstractmethod
    def _begin(self) -> None:
        """Starts a transaction that holds the database's write lock."""

    @abstractmethod
    def _end(self, commit: bool) -> None: ...

    @abstractmethod
    def _has_table(self, name: str) -> bool: ...

    def _usage_writer(self) -> SqliteUsageWriter | None:
        return None


class _SqliteConnection(Connection):
    dialect = "sqlite"
    _driver_errors = (sqlite3.Error, sqlite3.IntegrityError)

    def __init__(self, raw: sqlite3.Connection, path: Path) -> None:
        self._raw = raw
        # Absolute, as `raw` opened it: the native writer opens it later, maybe from elsewhere.
        self._path = path
        self._native: SqliteUsageWriter | None = None

    def close(self) -> None:
        from gateway import _core

        try:
            if self._native is not None:
                self._native.close()
        except _core.LedgerWriteError as exc:
            raise DatabaseError(str(exc)) from exc
        finally:
            with self._errors():
                self._raw.close()

    def _usage_writer(self) -> SqliteUsageWriter | None:
        from gateway import _core

        if self._native is None and _one_sqlite_library() and self._path.name != ":memory:":
            try:
                self._native = _core.SqliteUsageWriter(self._path, LOCK_TIMEOUT_MS)
            except _core.LedgerWriteError as exc:
                raise DatabaseError(str(exc)) from exc
        return self._native

    def _execute(self, sql: str, params: Sequence[Any]) -> int:
        with self._errors(), closing(self._raw.execute(sql, params)) as cursor:
            return cursor.rowcount

    def _executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        with self._errors(), closing(self._raw.executemany(sql, rows)) as cursor:
            return cursor.rowcount

    def _query(self, sql: str, params: Sequence[Any]) -> list[Row]:
        with self._errors(), closing(self._raw.execute(sql, params)) as cursor:
            rows: list[Row] = cursor.fetchall()
            return rows

    def _insert_rows(self, table: str, columns: Sequence[str], rows: Sequence[Row]) -> None:
        # One prepared statement, bound row after row: cheaper here than multi-row VALUES, whose
        # parameters would be flattened into one list and the statement parsed per chunk.
        places = ", ".join("?" * len(columns))
        sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({places})"  # noqa: S608
        self._executemany(sql, rows)

    def _add_to_sums(
        self, table: str, key: Sequence[str], sums: Sequence[str], rows: Sequence[Row]
    ) -> None:
        places = ", ".join("?" * (len(key) + len(sums)))
        self._executemany(_upsert(table, key, sums, f"VALUES ({places})"), rows)

    def _begin(self) -> None:
        # Takes the write lock up front, so concurrent writers queue on `busy_timeout` instead of
        # failing halfway with a lock upgrade error.
        self._execute("BEGIN IMMEDIATE", ())

    def _end(self, commit: bool) -> None:
        with self._errors():
            if commit:
                self._raw.commit()
            else:
                self._raw.rollback()

    def _has_table(self, name: str) -> bool:
        return bool(
            self._query("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,))
        )


class _PostgresConnection(Connection):
    dialect = "postgresql"

    def __init__(self, url: str) -> None:
        import psycopg

        self._url = url
        self._driver_errors = (psycopg.Error, psycopg.IntegrityError)
        with self._errors():
            self._raw = self._connect()

    def _connect(self) -> psycopg.Connection[Row]:
        """Autocommit outside `transaction()`, as SQLite is opened. A commit returns once the
        server has flushed it (its `synchronous_commit`, on by default), so a committed usage
        batch survives a crash of the server as a SQLite one survives a power cut."""
        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        # The URL's own connect_timeout, else ours: libpq's default is to wait forever.
        timeout = conninfo_to_dict(self._url).get("connect_timeout") or POSTGRES_CONNECT_TIMEOUT_S
        raw = psycopg.connect(
            self._url,
            autocommit=True,
            connect_timeout=int(timeout),
            fallback_application_name="tokengate",
        )
        try:
            raw.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")
        except BaseException:
            raw.close()
            raise
        return raw

    def _cursor(self) -> psycopg.Cursor[Row]:
        """A cursor on a live connection. When the server dropped the last one (a restart, a
        network cut), the statement that met the break failed; the next one reconnects, so a
        caller that retries (the usage collector does) goes on as with SQLite."""
        if self._raw.broken:
            self._raw = self._connect()
        return self._raw.cursor()

    def close(self) -> None:
        with self._errors():
            self._raw.close()

    def _execute(self, sql: str, params: Sequence[Any]) -> int:
        with self._errors(), self._cursor() as cursor:
            cursor.execute(_postgres_sql(sql), params)
            return cursor.rowcount

    def _executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        # psycopg sends the rows in one pipeline; `rowcount` is then the total over them.
        with self._errors(), self._cursor() as cursor:
            cursor.executemany(_postgres_sql(sql), rows)
            return cursor.rowcount

    def _query(self, sql: str, params: Sequence[Any]) -> list[Row]:
        with self._errors(), self._cursor() as cursor:
            cursor.execute(_postgres_sql(sql), params)
            return [tuple(map(_integral, row)) for row in cursor.fetchall()]

    def _insert_rows(self, table: str, columns: Sequence[str], rows: Sequence[Row]) -> None:
        # COPY: the rows stream to the server in one command instead of one INSERT each. It
        # keeps the table's rules (a duplicate key fails the COPY, as an INSERT would).
        with (
            self._errors(),
            self._cursor() as cursor,
            cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy,
        ):
            for row in rows:
                copy.write_row(row)

    def _add_to_sums(
        self, table: str, key: Sequence[str], sums: Sequence[str], rows: Sequence[Row]
    ) -> None:
        # One statement whatever the number of rows: each column goes as one array, the server
        # unnests them into rows (where `executemany` has it run one statement per row).
        types = [_POSTGRES_ARRAYS[type(value)] for value in rows[0][: len(key)]]
        arrays = ", ".join(f"%s::{name}" for name in (*types, *["BIGINT[]"] * len(sums)))
        sql = _upsert(table, key, sums, f"SELECT * FROM unnest({arrays})")  # noqa: S608
        with self._errors(), self._cursor() as cursor:
            cursor.execute(sql, [list(column) for column in zip(*rows, strict=True)])

    def _begin(self) -> None:
        # READ COMMITTED, and first of all a transaction-level advisory lock: write transactions
        # run one at a time, as SQLite's do, and each statement's snapshot, taken after the lock,
        # sees every write committed before it. The lock goes with the transaction, even when its
        # connection dies.
        self._execute("BEGIN", ())
        try:
            self._execute(f"SELECT pg_advisory_xact_lock({WRITE_LOCK_KEY})", ())
        except BaseException:
            self._end(commit=False)
            raise

    def _end(self, commit: bool) -> None:
        if not commit and self._raw.broken:
            return  # the server rolled the transaction back when the connection dropped
        self._execute("COMMIT" if commit else "ROLLBACK", ())

    def _has_table(self, name: str) -> bool:
        return bool(self._query("SELECT 1 WHERE to_regclass(?) IS NOT NULL", (name,)))


# The arrays `_PostgresConnection._add_to_sums` sends a key column of these values as.
_POSTGRES_ARRAYS: dict[type, str] = {str: "TEXT[]", int: "BIGINT[]"}


def _upsert(table: str, key: Sequence[str], sums: Sequence[str], source: str) -> str:
    """The statement that inserts the rows of `source` (VALUES or a SELECT) into `table`, adding
    the `sums` of a row whose `key` is already stored to the stored ones."""
    return (
        f"INSERT INTO {table} ({', '.join((*key, *sums))}) {source} "
        f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET "
        + ", ".join(f"{column} = {table}.{column} + excluded.{column}" for column in sums)
    )


_QUOTED = re.compile(r"""('(?:[^']|'')*'|"(?:[^"]|"")*")""")


@lru_cache(maxsize=512)
def _postgres_sql(sql: str) -> str:
    """`sql` in psycopg's placeholder style: each `?` outside quotes becomes `%s`, and every `%`
    is doubled, since psycopg reads `%` as a placeholder's start (in quotes too)."""
    parts = _QUOTED.split(sql.replace("%", "%%"))
    return "".join(part if i % 2 else part.replace("?", "%s") for i, part in enumerate(parts))


def _integral(value: Any) -> Any:
    """PostgreSQL sums BIGINTs as NUMERIC; the ledger's numbers are integers (tokens, micro-units),
    so an integral NUMERIC comes back as an `int`, as from SQLite."""
    if type(value) is Decimal and value.is_finite() and value == value.to_integral_value():
        return int(value)
    return value


def execute(conn: Connection, sql: str, params: Sequence[Any] = ()) -> int:
    """Runs one statement; returns the number of rows it changed."""
    return conn._execute(sql, params)


def executemany(conn: Connection, sql: str, rows: Sequence[Sequence[Any]]) -> int:
    """Runs one statement per row; returns the number of rows changed in total."""
    if not rows:
        return 0
    return conn._executemany(sql, rows)


def insert_rows(conn: Connection, table: str, columns: Sequence[str], rows: Sequence[Row]) -> None:
    """Inserts `rows` (values of `columns`, in order) into `table`, in bulk: the fastest way each
    dialect has. `table` and `columns` are the caller's own names, never input."""
    if rows:
        conn._insert_rows(table, columns, rows)


def add_to_sums(
    conn: Connection, table: str, key: Sequence[str], sums: Sequence[str], rows: Sequence[Row]
) -> None:
    """Adds `rows` (values of `key`, then of `sums`) to `table`, a table of sums whose primary
    key is `key`: a row of a new key is inserted, one of a stored key adds its sums to the stored
    ones. No two of `rows` have the same key; key values are strings or integers, sums are
    integers. Names are the caller's own, never input."""
    if rows:
        conn._add_to_sums(table, key, sums, rows)


def native_usage_writer(conn: Connection) -> SqliteUsageWriter | None:
    """The extension's writer of usage events into `conn`'s ledger, opened on first use and closed
    with `conn`: for a SQLite file, when the process runs one SQLite library (see
    `_one_sqlite_library`). None: usage events go through SQL, as on PostgreSQL."""
    return conn._usage_writer()


@lru_cache(maxsize=1)
def _one_sqlite_library() -> bool:
    """Whether the extension runs the very SQLite library Python's `sqlite3` runs.

    Two copies of SQLite in one process must not open the same database: POSIX locks belong to
    the process, and each copy, closing a descriptor of the file, would drop the locks the other
    holds (https://www.sqlite.org/howtocorrupt.html, section 2.2.1). The extension links the
    system's shared library; Python's `_sqlite3` does too on Debian and most builds, but may
    embed its own. The same address for `sqlite3_libversion` through both modules (each lookup
    searches the module's dependencies) proves one copy.
    """
    from gateway import _core

    try:
        ours = ctypes.CDLL(_core.__file__).sqlite3_libversion
        theirs = ctypes.CDLL(importlib.import_module("_sqlite3").__file__).sqlite3_libversion
    except (OSError, AttributeError):
        return False
    address = ctypes.cast(ours, ctypes.c_void_p).value
    return address is not None and address == ctypes.cast(theirs, ctypes.c_void_p).value


def query(conn: Connection, sql: str, params: Sequence[Any] = ()) -> list[Row]:
    """Runs one SELECT and returns every row."""
    return conn._query(sql, params)


def query_as(
    conn: Connection, record: Callable[..., _T], sql: str, params: Sequence[Any] = ()
) -> list[_T]:
    """Runs one SELECT and returns `record(*row)` for every row: the SELECT lists its columns in
    the order of `record`'s parameters (a dataclass's fields)."""
    return [record(*row) for row in query(conn, sql, params)]


@contextmanager
def transaction(conn: Connection) -> Iterator[Connection]:
    """One write transaction: commits on success, rolls back on any exception.

    Write transactions hold the database's write lock from their start, so they run one at a time
    and what one reads is still true when it writes: SQLite's `BEGIN IMMEDIATE`, PostgreSQL's
    advisory lock `WRITE_LOCK_KEY`. A writer waits up to `LOCK_TIMEOUT_MS` for the lock, then
    fails with `DatabaseError`. Reads outside a transaction never wait for it.
    """
    conn._begin()
    try:
        yield conn
    except BaseException:
        conn._end(commit=False)
        raise
    conn._end(commit=True)


def schema_version(conn: Connection) -> int:
    """The version recorded in `schema_version`, 0 for a database never migrated."""
    if not conn._has_table("schema_version"):
        return 0
    rows = query(conn, "SELECT MAX(version) FROM schema_version")
    return int(rows[0][0] or 0)


def apply_statement(conn: Connection, statement: Statement) -> None:
    """Runs a migration's statement: one for both dialects, or one for `conn`'s alone."""
    if isinstance(statement, str):
        execute(conn, statement)
    elif statement.dialect == conn.dialect:
        execute(conn, statement.sql)


def migrate(conn: Connection) -> int:
    """Applies every pending migration; returns the schema version reached.

    Safe against concurrent processes: the version is read inside the write transaction, so the
    first one applies each migration and the others, waiting for the lock, then find it applied.
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
                apply_statement(conn, statement)
            execute(
                conn,
                "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                (version, now_ms()),
            )
    return SCHEMA_VERSION


def _open_sqlite(path: Path, any_thread: bool = False) -> Connection:
    """WAL lets readers (the CLI, billing) run beside the writer; `synchronous=FULL` makes every
    committed usage batch survive a power cut, at one fsync per batch."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        raw = sqlite3.connect(
            path,
            isolation_level=None,
            timeout=LOCK_TIMEOUT_MS / 1000,
            check_same_thread=not any_thread,
        )
    except sqlite3.Error as exc:
        raise DatabaseError(str(exc)) from exc
    conn = _SqliteConnection(raw, path.absolute())
    try:
        execute(conn, f"PRAGMA busy_timeout = {LOCK_TIMEOUT_MS}")
        _enable_wal(conn)
        for pragma in ("synchronous = FULL", "foreign_keys = ON"):
            execute(conn, f"PRAGMA {pragma}")
    except BaseException:
        conn.close()
        raise
    return conn


def _enable_wal(conn: Connection) -> None:
    """Puts the file in WAL mode (a property of the file, kept once set). Switching takes an
    exclusive lock that SQLite does not wait for with its busy handler: when processes open a new
    file at once, the switch is retried for up to `LOCK_TIMEOUT_MS`."""
    deadline = time.monotonic() + LOCK_TIMEOUT_MS / 1000
    while True:
        try:
            execute(conn, "PRAGMA journal_mode = WAL")
            return
        except DatabaseError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def connect(url: str, *, any_thread: bool = False) -> Connection:
    """Opens (creating a SQLite file if needed) and migrates the ledger at `url`. The caller
    closes it. With `any_thread`, any thread may use it, one at a time (the caller serialises)."""
    target = parse_url(url)
    conn = (
        _open_sqlite(target, any_thread)
        if isinstance(target, Path)
        else _PostgresConnection(target)
    )
    try:
        migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


@contextmanager
def open_ledger(url: str, *, any_thread: bool = False) -> Iterator[Connection]:
    """`connect(url, any_thread=...)` as a context manager that always closes the connection."""
    conn = connect(url, any_thread=any_thread)
    try:
        yield conn
    finally:
        conn.close()
