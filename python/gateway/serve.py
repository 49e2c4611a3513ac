"""`gateway serve`: runs the Rust data plane and the control-plane loops that feed and drain it.

Two loops run beside the core: one pushes the ledger's active keys and quota policies whenever
they change, one drains usage events into the ledger; the admin and billing APIs, when the admin
or the billing token is set, serve beside them. None is on the request path. The snapshot loop
and the APIs use one ledger connection from the event loop's thread (their statements are short);
the usage loop writes through a connection of its own on the ledger writer's threads
(`gateway.ledger_writer`), which give the CPU up to the core's serving threads.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from opentelemetry.trace import NoOpTracer, Status, StatusCode

from gateway.admin import AdminServer, bind_admin
from gateway.config import ControlConfig, GatewayConfig, listen_address
from gateway.ledger.apikeys import active_key_snapshot
from gateway.ledger.db import Connection, DatabaseError, now_ms, open_ledger
from gateway.ledger.quotas import policy_snapshot
from gateway.ledger.refusals import Refused, add_refusals
from gateway.ledger.usage import UsageEvent, insert_usage_events, spent_in_current_periods
from gateway.ledger_writer import LedgerWriter
from gateway.reload import Reloader
from gateway.signals import ReloadSignal, StopSignals
from gateway.telemetry import Telemetry
from gateway.telemetry import start as start_telemetry
from gateway.usage_reader import LedgerUsageReader

if TYPE_CHECKING:
    from gateway import _core

__all__ = ["CoreGateway", "SnapshotPusher", "UsageCollector", "run", "seed_spent", "supervise"]

logger = logging.getLogger(__name__)

# How long the final drain keeps retrying a ledger that refuses writes before giving up.
FINAL_WRITE_RETRY_S = 30.0


class CoreGateway(Protocol):
    """The part of `gateway._core.Gateway` the control plane drives (a fake in tests)."""

    def set_keys(self, snapshot_json: str) -> int: ...
    def set_policies(self, snapshot_json: str) -> int: ...
    def seed_spent(self, entries_json: str) -> int: ...
    def drain_usage(self, max_events: int = 4096) -> tuple[list[UsageEvent], int | None]: ...
    def usage_committed(self, seq: int) -> None: ...
    def pending_usage(self) -> int: ...
    def drain_refusals(self) -> str: ...
    def drain(self) -> bool: ...
    def shutdown(self, grace_s: float) -> None: ...


def _json(document: Any) -> str:
    return json.dumps(document, separators=(",", ":"), sort_keys=True)


class SnapshotPusher:
    """Pushes the ledger's policy snapshot (quota policies and prices in effect) and active-key
    snapshot to the core, each only when it differs from its last push.

    Policies go first, so that a key and a policy set before it reach the core in that order too.
    """

    def __init__(self, conn: Connection, gateway: CoreGateway) -> None:
        self._conn = conn
        self._gateway = gateway
        self._last: dict[str, str] = {}

    def _push(self, name: str, document: Any, push: Callable[[str], int]) -> bool:
        snapshot = _json(document)
        if snapshot == self._last.get(name):
            return False
        count = push(snapshot)
        self._last[name] = snapshot
        logger.info("pushed %s to the core (%d)", name, count)
        return True

    def refresh(self) -> bool:
        """Reads both snapshots; pushes each one that changed. Returns whether it pushed."""
        policies = policy_snapshot(self._conn, now_ms())
        pushed = self._push("quota policies", policies, self._gateway.set_policies)
        keys = active_key_snapshot(self._conn)
        return self._push("active API keys", keys, self._gateway.set_keys) or pushed


def seed_spent(conn: Connection, gateway: CoreGateway) -> int:
    """Hands the core what the ledger says each tenant and key spent in the current UTC day and
    month, for in-process budget counters; call once, before the core starts. Returns the number
    of entries."""
    entries = spent_in_current_periods(conn, now_ms())
    count = gateway.seed_spent(_json(entries))
    logger.info("seeded the budget counters with %d entries from the ledger", count)
    return count


class UsageCollector:
    """Moves usage events from the core into the ledger, never dropping one it has drained.

    Drained events stay in memory until a ledger write succeeds, so a locked or failing database
    delays them instead of losing them. The counts of refused requests drained with them are
    kept the same way, each with the time it was drained (`ledger.refusals`).
    """

    def __init__(
        self,
        conn: Connection,
        gateway: CoreGateway,
        batch: int,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._conn = conn
        self._gateway = gateway
        self._batch = batch
        self._telemetry = telemetry or Telemetry(NoOpTracer())
        self._unsaved: list[UsageEvent] = []
        self._refused: list[tuple[int, list[Refused]]] = []
        # The journal's number of the last unsaved event: acknowledged once they are written.
        self._last_seq: int | None = None
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
        drained = self._drain()
        self.write_unsaved()
        return drained

    async def flush_on(self, writer: LedgerWriter) -> int:
        """`flush`, the ledger's write on `writer`'s threads: the core's calls (the drain, the
        acknowledgement) stay on this thread, so a writer thread, which the kernel may preempt
        at any moment, never holds a lock the core's serving threads take."""
        drained = self._drain()
        if await writer.run(self._store):
            self._acknowledge()
        return drained

    def _drain(self) -> int:
        refused: list[Refused] = json.loads(self._gateway.drain_refusals())
        if refused:
            self._refused.append((now_ms(), refused))
        drained, last_seq = self._gateway.drain_usage(self._batch)
        if drained:
            self._unsaved.extend(drained)
            self._last_seq = last_seq
        return len(drained)

    def write_unsaved(self) -> bool:
        """Writes the unsaved events in one transaction; returns whether none remain."""
        stored = self._store()
        if stored:
            self._acknowledge()
        return stored is not None

    def _acknowledge(self) -> None:
        # The core drains in `seq` order: every event up to the last one written is in the
        # ledger, and the journal may forget them.
        if self._last_seq is not None:
            self._gateway.usage_committed(self._last_seq)

    def _store(self) -> int | None:
        """Writes the unsaved events in one transaction; returns how many there were (0: none),
        or None if the ledger refused them (they stay unsaved). Refusal counts are written
        first, apart: a failure to write them keeps them for the next round."""
        self._store_refusals()
        if not self._unsaved:
            return 0
        with self._telemetry.span("ledger.ingest", events=len(self._unsaved)) as span:
            try:
                inserted = insert_usage_events(self._conn, self._unsaved)
            except DatabaseError:
                logger.exception("writing %d usage events failed; will retry", len(self._unsaved))
                span.set_status(Status(StatusCode.ERROR, "the ledger refused the batch"))
                return None
            span.set_attribute("inserted", inserted)
        if inserted != len(self._unsaved):
            # Expected after every restart: the journal records again the events of its live
            # segment, and the ledger keeps one of each (a different payload is logged as an
            # error by the ledger itself).
            logger.info(
                "%d of %d usage events were already in the ledger (recorded again by the journal)",
                len(self._unsaved) - inserted,
                len(self._unsaved),
            )
        self.recorded += inserted
        written = len(self._unsaved)
        self._unsaved.clear()
        return written

    def _store_refusals(self) -> None:
        while self._refused:
            at_ms, refused = self._refused[0]
            try:
                add_refusals(self._conn, at_ms, refused)
            except DatabaseError:
                logger.exception("writing refusal counts failed; will retry")
                return
            self._refused.pop(0)

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


async def _push_snapshots(pusher: SnapshotPusher, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            pusher.refresh()
        except Exception:
            logger.exception("pushing keys and quota policies failed; will retry")


async def _collect_usage(
    collector: UsageCollector, writer: LedgerWriter, interval_s: float
) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            while await collector.flush_on(writer) >= collector.batch:
                pass
        except Exception:
            logger.exception("collecting usage failed; will retry")


async def _serve_admin(admin: AdminServer) -> None:
    try:
        await admin.serve_until_stopped()
    except Exception:
        logger.exception("the admin API failed; the gateway goes on serving without it")


async def supervise(
    gateway: CoreGateway,
    conn: Connection,
    control: ControlConfig,
    grace_s: float,
    stop: asyncio.Event,
    pusher: SnapshotPusher | None = None,
    admin: AdminServer | None = None,
    telemetry: Telemetry | None = None,
    *,
    usage_conn: Connection,
    drain_s: float = 0.0,
) -> int:
    """Runs the snapshot and usage loops (and the admin API, if given) beside a started core until
    `stop` is set; then turns the core's readiness off and lets everything serve on for `drain_s`
    (load balancers stop sending meanwhile), stops the admin API, shuts the core down (the loops
    keep running while it drains) and records the last events. Another signal meanwhile changes
    nothing.

    `usage_conn`, a second connection to the ledger that any thread may use, is the usage
    loop's, whose writes run on a `LedgerWriter`'s threads.

    Returns 0, or 1 if some usage events could not be written to the ledger.
    """
    pusher = pusher or SnapshotPusher(conn, gateway)
    collector = UsageCollector(usage_conn, gateway, control.usage_batch, telemetry)
    writer = LedgerWriter()
    loops = [
        asyncio.create_task(_push_snapshots(pusher, control.key_refresh_ms / 1000)),
        asyncio.create_task(_collect_usage(collector, writer, control.usage_flush_ms / 1000)),
    ]
    admin_task = asyncio.create_task(_serve_admin(admin)) if admin is not None else None
    try:
        await stop.wait()
        gateway.drain()
        if drain_s > 0:
            logger.info("draining: /ready answers 503; serving on for %.1fs", drain_s)
            await asyncio.sleep(drain_s)
        if admin is not None:
            admin.should_exit = True
        logger.info("shutting down: draining in-flight requests for up to %.1fs", grace_s)
        await asyncio.to_thread(gateway.shutdown, grace_s)
    finally:
        if admin is not None and admin_task is not None:
            admin.should_exit = True
            await admin_task
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        # A write the cancelled loop left under way ends before the last ones begin.
        await asyncio.to_thread(writer.close)
        saved = collector.drain_all()
    logger.info("stopped; %d usage events recorded", collector.recorded)
    return 0 if saved else 1


async def _serve(
    gateway: CoreGateway,
    conn: Connection,
    usage_conn: Connection,
    config: GatewayConfig,
    pusher: SnapshotPusher,
    admin: AdminServer | None,
    announce: Callable[[], None],
    signals: StopSignals,
    telemetry: Telemetry,
    hangup: ReloadSignal,
    reloader: Reloader | None,
) -> int:
    stop = asyncio.Event()
    signals.attach(stop)
    reloads: set[asyncio.Task[None]] = set()

    def reload() -> None:
        if reloader is None:
            logger.info("SIGHUP: no configuration file to reload")
            return
        task = asyncio.ensure_future(reloader.reload_logged())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    hangup.attach(reload)
    announce()
    try:
        return await supervise(
            gateway,
            conn,
            config.control,
            config.server.shutdown_grace_seconds,
            stop,
            pusher,
            admin,
            telemetry,
            usage_conn=usage_conn,
            drain_s=config.server.drain_seconds,
        )
    finally:
        hangup.detach()
        signals.detach()


def _admin(
    conn: Connection,
    config: GatewayConfig,
    telemetry: Telemetry,
    reloader: Reloader | None,
    fleet: Callable[[], dict[str, Any]],
) -> AdminServer | None:
    """The admin listener's server, bound, if the admin or the billing token is set; None if
    neither is (it is disabled)."""
    names = config.admin.token_env, config.admin.billing_token_env
    token, billing_token = (os.environ.get(name, "") for name in names)
    if not token and not billing_token:
        logger.info(
            "admin API disabled: set the environment variable %s or %s to enable it", *names
        )
        return None
    if not token:
        logger.info("admin routes closed (%s is unset); the billing API serves", names[0])
    elif not billing_token:
        logger.info("no billing token (%s is unset): the billing API takes the admin's", names[1])
    reload = None if reloader is None else reloader.reload
    return bind_admin(
        conn,
        config.admin,
        token,
        billing_token,
        config.billing,
        config.server,
        telemetry,
        reload,
        fleet,
    )


def _fleet(gateway: _core.Gateway) -> dict[str, Any]:
    """The workers and queues as the admin API's `Fleet` takes them."""
    return {"workers": json.loads(gateway.workers()), "queues": json.loads(gateway.queues())}


def run(
    config: GatewayConfig,
    *,
    on_ready: Callable[[str, int], None] | None = None,
    config_path: Path | None = None,
) -> int:
    """Serves until SIGINT/SIGTERM; returns the process exit status.

    Prints `gateway listening on http://HOST:PORT` once serving (after `gRPC API listening on
    HOST:PORT` when `[grpc] port` is set), then calls `on_ready(host, port)` with the bound
    address; the admin API, if enabled, prints `admin API listening on http://HOST:PORT` once it
    serves. The key and policy snapshots are pushed, and in-process budget counters seeded from
    the ledger, before the first request can arrive. SIGINT and SIGTERM stop it gracefully from
    the moment it is called (`StopSignals`); call it from the main thread. SIGHUP and
    `POST /admin/v1/reload` read `config_path` again and apply it (`gateway.reload`); without
    one, SIGHUP is ignored.
    """
    hangup = ReloadSignal()
    signals = StopSignals()
    hangup.start()
    try:
        document = config.core_document()
    except ValueError as exc:
        logger.error("invalid configuration: %s", exc)
        return 2
    telemetry = start_telemetry(config.telemetry.resolve())
    try:
        return _run(config, document, telemetry, signals, hangup, on_ready, config_path)
    finally:
        # After the core's shutdown and the last ledger write: their spans go too.
        telemetry.shutdown()


def _run(
    config: GatewayConfig,
    document: str,
    telemetry: Telemetry,
    signals: StopSignals,
    hangup: ReloadSignal,
    on_ready: Callable[[str, int], None] | None,
    config_path: Path | None,
) -> int:
    from gateway import _core

    with (
        open_ledger(config.storage.url) as conn,
        open_ledger(config.storage.url, any_thread=True) as usage_conn,
    ):
        try:
            gateway = _core.Gateway(document)
        except _core.ConfigError as exc:
            logger.error("the core rejected the configuration: %s", exc)
            return 2
        usage_reader = LedgerUsageReader(config.storage.url, config.billing.currency)
        gateway.set_usage_reader(usage_reader)
        pusher = SnapshotPusher(conn, gateway)
        pusher.refresh()
        if config.quota.redis_url is None:
            seed_spent(conn, gateway)
        reloader = None if config_path is None else Reloader(config_path, gateway, config)
        try:
            admin = _admin(conn, config, telemetry, reloader, partial(_fleet, gateway))
        except OSError as exc:
            address = listen_address(config.admin.host, config.admin.port)
            logger.error("cannot bind the admin API to %s: %s", address, exc)
            return 1
        try:
            host, port = gateway.start()
        except _core.GatewayError as exc:
            logger.error("cannot start the gateway: %s", exc)
            return 1
        logger.info("gateway bound to %s", listen_address(host, port))

        grpc = gateway.grpc_address()

        def announce() -> None:
            if grpc is not None:
                print(f"gRPC API listening on {listen_address(*grpc)}", flush=True)
            print(f"gateway listening on http://{listen_address(host, port)}", flush=True)
            if on_ready is not None:
                on_ready(host, port)

        # What startup made (modules, the configuration, pydantic's schemas) lives as long as the
        # process: frozen out of the collector, full collections walk only what serving makes,
        # such as the usage events drained in batches.
        gc.freeze()
        try:
            return asyncio.run(
                _serve(
                    gateway,
                    conn,
                    usage_conn,
                    config,
                    pusher,
                    admin,
                    announce,
                    signals,
                    telemetry,
                    hangup,
                    reloader,
                )
            )
        finally:
            usage_reader.close()
