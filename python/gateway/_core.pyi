"""Typed stub of the Rust extension `gateway._core` (rust/python).

Every method that blocks releases the GIL. Configuration crosses as one JSON document that the
Rust side validates strictly (unknown fields are errors); usage events come back in batches.
"""

from typing import final

__version__: str

USAGE_COLUMNS: tuple[str, ...]
"""The ledger columns of a drained usage tuple, in order (`gateway.ledger.usage.UsageEvent`)."""

UsageRow = tuple[
    str, str, str, str, str, str | None, str, bool, str, int, int, int, int, str, int, int
]

class GatewayError(Exception):
    """Base of every error raised by the extension."""

class ConfigError(GatewayError):
    """A configuration document the core rejected; the message names the field."""

class ServerError(GatewayError):
    """A server could not bind, start or stop."""

@final
class Gateway:
    """The data plane: an OpenAI-compatible HTTP server on the extension's tokio runtime.

    `config_json` is the `core` document built by `gateway.config.GatewayConfig.core_document()`.
    """

    def __init__(self, config_json: str) -> None: ...
    def start(self) -> tuple[str, int]:
        """Binds and serves; returns the bound (host, port), the real port if 0 was asked."""
    def set_keys(self, snapshot_json: str) -> int:
        """Replaces the API-key snapshot atomically.

        `snapshot_json` is `{"keys": [{"hash": <sha256 hex of the full key>, "key_id": str,
        "tenant_id": str}]}`; a key absent from the snapshot is rejected on the next request.
        Returns the number of keys now active.
        """
    def drain_usage(self, max_events: int = 4096) -> list[UsageRow]:
        """Takes up to `max_events` recorded usage events, oldest first, as `USAGE_COLUMNS`
        tuples."""
    def pending_usage(self) -> int:
        """How many usage events wait to be drained."""
    def workers(self) -> str:
        """JSON array describing each worker: url, healthy, models, outstanding requests."""
    def shutdown(self, grace_s: float) -> None:
        """Stops accepting, drains in-flight requests for up to `grace_s` seconds, then stops."""

@final
class Simulator:
    """`gateway sim`: a vLLM-protocol worker on the extension's tokio runtime.

    `config_json` holds the simulator fields of `gateway.sim.SimConfig` (not host/port);
    `listen` is the "host:port" to bind (port 0 picks a free port).
    """

    def __init__(self, config_json: str, listen: str) -> None: ...
    def start(self) -> tuple[str, int]: ...
    def shutdown(self, grace_s: float) -> None: ...
