"""`gateway serve`: runs the Rust data plane and the control-plane loops that feed and drain it.

Two loops run beside the core: one pushes the ledger's active keys whenever they change, one
drains usage events into the ledger. Neither is on the request path. Both use the one ledger
connection from the event loop's thread; their statements are short, and the loop has nothing
latency-sensitive to do besides them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from gateway.config import ControlConfig, GatewayConfig, listen_address
from gateway.ledger.apikeys import active_key_snapshot
from gateway.ledger.db import Connection, DatabaseError, open_ledger
from gateway.ledger.usage import insert_usage_events

if TYPE_CHECKING:
    from gateway._core import UsageRow

__all__ = ["CoreGateway", "KeyPusher", "UsageCollector", "run", "supervise"]

logger = logging.getLogger(__name__)

# How long the final drain keeps retrying a ledger that refuses writes before giving up.
FINAL_WRITE_RETRY_S = 30.0


class CoreGateway(Protocol):
    """The part of `gateway._core.Gateway` the control plane drives (a fake in tests)."""

    def set_keys(self, snapshot_json: str) -> int: ...
    def drain_usage(self, max_events: int = 4096) -> list[UsageRow]: ...
    def pending_usage(self) -> int: ...
    def shutdown(self, grace_s: float) -> None: ...


class KeyPusher:
    """Pushes the ledger's active-key snapshot to the core when it differs from the last push."""

    def __init__(self, conn: Connection, gateway: CoreGateway) -> None:
        self._conn = conn
        self._gateway = gateway
        self._last: str | None = None

    def refresh(self) -> bool:
        """Reads the snapshot; pushes it if changed. Returns whether it pushed."""
        snapshot = json.dumps(active_key_snapshot(self._conn), separators=(",", ":"))
        if snapshot == self._last:
            return False
        count = self._gateway.set_keys(snapshot)
        self._last = snapshot
        logger.info("pushed %d active API keys to the core", count)
        return True


class UsageCollector:
    """Moves usage events from the core into the ledger, never dropping one it has drained.

    Drained events stay in memory until a ledger write succeeds, so a locked or failing database
    delays them instead of losing them.
    """

    def __init__(self, conn: Connection, gateway: CoreGateway, batch: int) -> None:
        self._conn = conn
        self._gateway = gateway
        self._batch = batch
        self._unsaved: list[UsageRow] = []
        self.recorded = 0

    @property
    def batch(self) -> int:
        return self._batch

    @property
    def unsaved(self) -> int:
        """Events drained from the core and not yet in the ledger."""
        return len(self._unsaved)

    def flush(self) -> int:
        """Drains one batch and writes it with any earlier unsaved events; returns how many
        events the core handed over (equal to `batch` means more may be waiting)."""
        events = self._gateway.drain_usage(self._batch)
        self._unsaved.extend(events)
        self.write_unsaved()
        return len(events)

    def write_unsaved(self) -> bool:
        """Writes the unsaved events in one transaction; returns whether none remain."""
        if not self._unsaved:
            return True
        try:
            inserted = insert_usage_events(self._conn, self._unsaved)
        except DatabaseError:
            logger.exception("writing %d usage events failed; will retry", len(self._unsaved))
            return False
        if inserted != len(self._unsaved):
            logger.warning(
                "%d of %d usage events were already in the ledger",
                len(self._unsaved) - inserted,
                len(self._unsaved),
            )
        self.recorded += inserted
        self._unsaved.clear()
        return True

    def drain_all(self) -> bool:
        """After the core has stopped: drains until nothing is pending and writes everything.

        Returns False, after logging every unsaved event at ERROR, if the ledger kept refusing
        writes for `FINAL_WRITE_RETRY_S`.
        """
        stalled = 0
        while True:
            drained = self.flush()
            if drained >= self._batch:
                continue
            pending = self._gateway.pending_usage()
            if pending == 0:
                break
            stalled = stalled + 1 if drained == 0 else 0
            if stalled > 100:
                logger.error("the core reports %d pending usage events but yields none", pending)
                break
            time.sleep(0.01)
        deadline = time.monotonic() + FINAL_WRITE_RETRY_S
        while not self.write_unsaved():
            if time.monotonic() > deadline:
                for event in self._unsaved:
                    logger.error("usage event not recorded: %r", event)
                return False
            time.sleep(0.5)
        return True


# Both loops outlive any one failure: a loop that died quietly would stop revocations or metering.


async def _refresh_keys(pusher: KeyPusher, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            pusher.refresh()
        except Exception:
            logger.exception("refreshing API keys failed; will retry")


async def _collect_usage(collector: UsageCollector, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            while collector.flush() >= collector.batch:
                await asyncio.sleep(0)
        except Exception:
            logger.exception("collecting usage failed; will retry")


async def supervise(
    gateway: CoreGateway,
    conn: Connection,
    control: ControlConfig,
    grace_s: float,
    stop: asyncio.Event,
    pusher: KeyPusher | None = None,
) -> int:
    """Runs the key and usage loops beside a started core until `stop` is set, then shuts the
    core down (the loops keep running while it drains) and records the last events.

    Returns 0, or 1 if some usage events could not be written to the ledger.
    """
    pusher = pusher or KeyPusher(conn, gateway)
    collector = UsageCollector(conn, gateway, control.usage_batch)
    tasks = [
        asyncio.create_task(_refresh_keys(pusher, control.key_refresh_ms / 1000)),
        asyncio.create_task(_collect_usage(collector, control.usage_flush_ms / 1000)),
    ]
    try:
        await stop.wait()
        logger.info("shutting down: draining in-flight requests for up to %.1fs", grace_s)
        await asyncio.to_thread(gateway.shutdown, grace_s)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        saved = collector.drain_all()
    logger.info("stopped; %d usage events recorded", collector.recorded)
    return 0 if saved else 1


async def _serve(
    gateway: CoreGateway, conn: Connection, config: GatewayConfig, pusher: KeyPusher
) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    return await supervise(
        gateway, conn, config.control, config.server.shutdown_grace_seconds, stop, pusher
    )


def run(config: GatewayConfig, *, on_ready: Callable[[str, int], None] | None = None) -> int:
    """Serves until SIGINT/SIGTERM; returns the process exit status.

    Prints `gateway listening on http://HOST:PORT` once serving, then calls `on_ready(host,
    port)` with the bound address. The key snapshot is pushed before the first request can
    arrive.
    """
    from gateway import _core

    with open_ledger(config.storage.url) as conn:
        try:
            gateway = _core.Gateway(config.core_document())
        except _core.ConfigError as exc:
            logger.error("the core rejected the configuration: %s", exc)
            return 2
        pusher = KeyPusher(conn, gateway)
        pusher.refresh()
        try:
            host, port = gateway.start()
        except _core.GatewayError as exc:
            logger.error("cannot start the gateway: %s", exc)
            return 1
        logger.info("gateway bound to %s", listen_address(host, port))
        print(f"gateway listening on http://{listen_address(host, port)}", flush=True)
        if on_ready is not None:
            on_ready(host, port)
        return asyncio.run(_serve(gateway, conn, config, pusher))
