"""Typed stub of the Rust extension `gateway._core` (rust/python).

Every method that blocks releases the GIL. Configuration crosses as one JSON document that the
Rust side validates strictly (unknown fields are errors); usage events come back in batches.
"""

from collections.abc import Callable
from os import PathLike
from typing import final

from gateway.ledger.usage import UsageEvent

__all__ = [
    "USAGE_FIELDS",
    "ConfigError",
    "Gateway",
    "GatewayError",
    "LedgerIntegrityError",
    "LedgerWriteError",
    "ServerError",
    "Simulator",
    "SqliteUsageWriter",
    "__version__",
    "journal_records",
]

__version__: str

USAGE_FIELDS: tuple[str, ...]
"""The core's usage event fields, sorted: the names its serialised form (the journal's) uses.
`gateway.ledger.usage.UsageEvent` has exactly these; the first drain checks it."""

def journal_records(dir: PathLike[str] | str) -> tuple[list[str], int, int]:
    """Every record in a usage journal directory, oldest first, each a JSON object (`r`: `start`,
    `progress` or `end`; an end's members are its event's and its `seq`); then how many segments
    end in a record cut short (a crash mid-write) and how many records this build cannot read.
    Takes no lock: the gateway may be running. Raises `OSError` if the directory cannot be read."""

class GatewayError(Exception):
    """Base of every error raised by the extension."""

class ConfigError(GatewayError):
    """A configuration document the core rejected; the message names the field."""

class ServerError(GatewayError):
    """A server could not bind, start or stop."""

class LedgerWriteError(GatewayError):
    """A batch of usage events the ledger did not store (rolled back: none of it is stored)."""

class LedgerIntegrityError(LedgerWriteError):
    """A batch with an event the ledger's schema refuses (a missing value, one out of range, a
    broken uniqueness rule): rolled back, none of it is stored."""

@final
class SqliteUsageWriter:
    """The SQLite ledger's usage write path, native: `gateway.ledger.usage.insert_usage_events`'s
    contract (rust/core/src/ledger/sqlite.rs). `gateway.ledger.db.native_usage_writer` opens it
    for a ledger already migrated; one thread uses it at a time."""

    def __new__(cls, path: PathLike[str] | str, busy_timeout_ms: int) -> SqliteUsageWriter: ...
    def insert(
        self, events: list[UsageEvent], recorded_at_ms: int
    ) -> tuple[int, list[tuple[tuple[object, ...], tuple[object, ...], bool]]]:
        """Stores `events` in one transaction, recorded at `recorded_at_ms`; returns how many were
        new, and the conflicts as `(kept, new, kept_is_stored)`, each event as its stored
        columns. Raises `LedgerWriteError` with nothing stored (`LedgerIntegrityError` for an
        event the schema refuses)."""
    def close(self) -> None:
        """Closes the connection; later writes fail."""

@final
class Gateway:
    """The data plane: an OpenAI-compatible HTTP server on the extension's tokio runtime.

    `config_json` is the `core` document built by `gateway.config.GatewayConfig.core_document()`.
    """

    def __new__(cls, config_json: str) -> Gateway: ...
    def start(self) -> tuple[str, int]:
        """Binds and serves; returns the bound (host, port), the real port if 0 was asked."""
    def grpc_address(self) -> tuple[str, int] | None:
        """The gRPC API's bound (host, port) once started, None without one (`grpc_listen`)."""
    def set_usage_reader(self, reader: Callable[[str, str | None, int], str]) -> bool:
        """Installs how the gRPC usage service reads the ledger: `reader(tenant_id, after,
        limit)` returns a page of the tenant's events as the billing API's JSON document, and
        raises `ValueError` for a malformed cursor. Called on the core's blocking threads. Only
        the first call installs; returns whether this one did."""
    def set_keys(self, snapshot_json: str) -> int:
        """Replaces the API-key snapshot atomically.

        `snapshot_json` is `{"keys": [{"hash": <sha256 hex of the full key>, "key_id": str,
        "tenant_id": str}]}`; a key absent from the snapshot is rejected on the next request.
        Returns the number of keys now active.
        """
    def set_policies(self, snapshot_json: str) -> int:
        """Replaces the quota policies and prices atomically; the next admission uses them.

        `snapshot_json` is `{"tenants": {tenant_id: Limits}, "keys": {key_id: Limits},
        "prices": {model: {"prompt": int, "cached": int, "completion": int}}}` with prices in
        micro-units per million tokens and `Limits` = `{"requests_per_minute", "tokens_per_minute",
        "max_concurrent", "token_budget", "money_budget_micros": int | null, "budget_period":
        "day" | "month", "models": [str] | null}`. A tenant or key absent is unlimited. Returns the
        number of tenants and keys with a policy.
        """
    def seed_spent(self, entries_json: str) -> int:
        """Adds what the ledger says was already spent in the current budget periods to the
        in-process counters (no effect with Redis, whose counters outlive a restart).

        `entries_json` is a list of `{"scope": "tenant" | "key", "id": str, "tenant_id": str,
        "period": "day" | "month", "tokens": int, "money_micros": int}` (`tenant_id` is the key's
        tenant, required for a key; for a tenant it may be omitted); call it once, before
        `start()`. Returns the number of entries applied.
        """
    def drain_usage(self, max_events: int = 4096) -> tuple[list[UsageEvent], int | None]:
        """Takes up to `max_events` recorded usage events, oldest first, and the `seq` of the
        last one (the core numbers events in the order it recorded them), None if none was
        waiting. Acknowledge them with `usage_committed(seq)` once they are stored."""
    def usage_committed(self, seq: int) -> None:
        """Every drained event up to `seq` is in the ledger: the usage journal may delete the
        segments that hold nothing newer."""
    def pending_usage(self) -> int:
        """How many usage events wait to be drained."""
    def reload(self, config_json: str) -> str:
        """Applies what can change while serving of the `core` document `config_json` (workers,
        routing policies, queue limits, attempt timeouts, intervals); returns JSON `{"workers",
        "added", "removed", "restart_required"}`, the last naming changed options that keep their
        running value until a restart. Raises `ConfigError`, applying nothing, if it is invalid."""
    def workers(self) -> str:
        """JSON array of the workers: url, healthy, ejected (by its circuit breaker now),
        ejections (times so far), outstanding requests, capacity, models, and load (null before
        a scrape succeeded, else `{"running", "waiting", "kv_cache_usage"}` as it reported)."""
    def queues(self) -> str:
        """JSON array of the requests waiting in the gateway's queues now: `{"model",
        "tenant_id", "class", "count"}`, by model, tenant and priority class."""
    def drain_refusals(self) -> str:
        """JSON array of the requests refused to a known key since the last call (the counts
        are taken): `{"tenant_id", "key_id", "reason", "count"}`, reason the error's code."""
    def drain(self) -> bool:
        """Turns readiness off (`/ready` 503, gRPC health NOT_SERVING, `Connection: close` on every
        HTTP response) while both listeners go on serving; True the first time only."""
    def shutdown(self, grace_s: float) -> None:
        """Turns readiness off, stops accepting, drains in-flight requests for up to `grace_s`
        seconds, then stops."""

@final
class Simulator:
    """`gateway sim`: a vLLM-protocol worker on the extension's tokio runtime.

    `config_json` holds the simulator fields of `gateway.sim.SimConfig` (not host/port);
    `listen` is the "host:port" to bind (port 0 picks a free port).
    """

    def __new__(cls, config_json: str, listen: str) -> Simulator: ...
    def start(self) -> tuple[str, int]: ...
    def shutdown(self, grace_s: float) -> None: ...
