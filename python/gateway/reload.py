"""Live reload of `gateway serve`'s configuration file, on SIGHUP or `POST /admin/v1/reload`.

The file is read and validated again as at start; an invalid file is refused as a whole, logged
with the option at fault (pydantic's location, `workers[1].url: ...`), and the running
configuration stays. A valid one goes to the core, which applies what can change while it serves:
the workers (kept ones keep their health, circuit breaker, learned capacity and requests in
flight; new ones enter rotation once their probe passes; removed ones take no new request while
theirs finish), the routing policies, queue limits, attempt timeouts and intervals, and the DNS
settings. Options that need a restart keep their running value; each is logged and named in the
answer (`restart_required`): the listeners, the journal, the quota's store, tracing, the connect
timeout, the coalescing windows and the circuit breaker's settings (the core's), and the ledger,
the control loops, the admin API, billing, the drain window and the shutdown grace (the control
plane's). No connection is dropped: nothing here touches a listener.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any, Protocol

from gateway.config import ConfigFileError, GatewayConfig, load_config

__all__ = ["ReloadRefusedError", "Reloader"]

logger = logging.getLogger(__name__)

# The control plane's options that a reload does not apply (read once, at start).
_RESTART_ONLY = ("storage", "control", "admin", "billing")


class ReloadRefusedError(Exception):
    """The file could not be read or validated; nothing was applied. The message names the file
    and each option at fault."""


class ReloadableGateway(Protocol):
    def reload(self, config_json: str) -> str: ...


def _control_plane_changes(started: GatewayConfig, new: GatewayConfig) -> list[str]:
    changed = [name for name in _RESTART_ONLY if getattr(started, name) != getattr(new, name)]
    for name in ("shutdown_grace_seconds", "drain_seconds"):
        if getattr(started.server, name) != getattr(new.server, name):
            changed.append(f"server.{name}")
    return changed


class Reloader:
    """Reloads `path` into `gateway`, one reload at a time; `started` is the configuration the
    process started with (what the control plane runs by)."""

    def __init__(self, path: Path, gateway: ReloadableGateway, started: GatewayConfig) -> None:
        self._path = path
        self._gateway = gateway
        self._started = started
        self._lock = asyncio.Lock()

    async def reload(self) -> dict[str, Any]:
        """Applies the file; returns what the core did (`workers`, `added`, `removed`,
        `restart_required`). Raises `ReloadRefusedError` when the file is invalid."""
        from gateway import _core

        async with self._lock:
            try:
                config = await asyncio.to_thread(load_config, self._path)
                document = config.core_document()
                report: dict[str, Any] = json.loads(
                    await asyncio.to_thread(self._gateway.reload, document)
                )
            except (ConfigFileError, ValueError, _core.ConfigError) as exc:
                message = str(exc)
                logger.error(
                    "configuration reload refused; the running configuration stays: %s", message
                )
                raise ReloadRefusedError(message) from exc
            pending = [*report["restart_required"], *_control_plane_changes(self._started, config)]
            for name in pending:
                logger.warning(
                    "%s changed in the configuration file; it keeps its value until a restart",
                    name,
                )
            report["restart_required"] = pending
            logger.info(
                "configuration reloaded from %s: %d workers (%d added, %d removed)",
                self._path,
                report["workers"],
                report["added"],
                report["removed"],
            )
            return report

    async def reload_logged(self) -> None:
        """`reload` for a signal: a refusal is logged (by `reload`), never raised."""
        try:
            await self.reload()
        except ReloadRefusedError:
            pass
        except Exception:
            logger.exception("configuration reload failed")
