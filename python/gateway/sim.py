"""`gateway sim`: a vLLM-protocol worker with configurable latency, capacity and failures.

The simulator itself is Rust (`gateway._core.Simulator`); this module validates its settings and
runs it until SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from gateway.config import IpHost, Port, listen_address

__all__ = ["SHUTDOWN_GRACE_S", "SimConfig", "run"]

logger = logging.getLogger(__name__)

# In-flight simulated requests get this long to finish on SIGINT/SIGTERM.
SHUTDOWN_GRACE_S = 5.0
# The simulator's upper bound on `max_num_seqs` (rust/sim/src/config.rs).
MAX_NUM_SEQS = 1 << 24

# The simulator's types of these settings (rust/sim/src/config.rs) as bounds.
_U64 = Annotated[int, Field(ge=0, lt=2**64)]
_NonZeroU32 = Annotated[int, Field(ge=1, lt=2**32)]
_Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class SimConfig(BaseModel):
    """Settings of one simulated worker."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    host: IpHost = Field(default="127.0.0.1", description="IP address to listen on.")
    port: Port = Field(default=8001, description="TCP port; 0 picks a free port.")
    model: str = Field(
        default="sim-model",
        min_length=1,
        description="Served model name, the only one `/v1/models` lists and requests may name.",
    )
    max_model_len: _NonZeroU32 = Field(
        default=4096, description="Context length: prompt tokens plus max_tokens may not exceed it."
    )
    ttft_ms: _U64 = Field(
        default=0,
        description="Time to first token, counted from when a sequence slot is obtained.",
    )
    itl_ms: _U64 = Field(default=0, description="Inter-token latency; 0 emits every token at once.")
    max_num_seqs: int = Field(
        default=256,
        ge=1,
        le=MAX_NUM_SEQS,
        description="Concurrent sequences; further requests wait in the simulator's queue.",
    )
    max_output_tokens: _NonZeroU32 = Field(
        default=64, description="The simulated EOS: generation stops after this many tokens."
    )
    error_rate: _Fraction = Field(
        default=0.0,
        description="Fraction of generation requests answered with a 500 before generating.",
    )
    die_rate: _Fraction = Field(
        default=0.0,
        description="Fraction of streaming requests whose connection is cut halfway through.",
    )
    seed: _U64 = Field(
        default=0,
        description="Seed of the failure injection: the same seed fails the same requests.",
    )
    api_key: str | None = Field(
        default=None,
        min_length=1,
        description="Like `vllm serve --api-key`: `/v1/...` requests must carry this key.",
    )
    report_usage: bool = Field(
        default=True,
        description="Whether responses carry `usage`; off answers as a server that reports none "
        "(no `usage` in bodies, `stream_options` ignored).",
    )

    def core_document(self) -> str:
        """The JSON `gateway._core.Simulator` takes: every field but the listen address."""
        return self.model_dump_json(exclude={"host", "port"}, exclude_none=True)

    def listen(self) -> str:
        """The socket address to bind, `host:port`."""
        return listen_address(self.host, self.port)


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


def run(config: SimConfig) -> int:
    """Serves until SIGINT/SIGTERM; prints `sim listening on http://HOST:PORT` once serving."""
    from gateway import _core

    try:
        simulator = _core.Simulator(config.core_document(), config.listen())
    except _core.ConfigError as exc:
        logger.error("the simulator rejected its configuration: %s", exc)
        return 2
    try:
        host, port = simulator.start()
    except _core.GatewayError as exc:
        logger.error("cannot start the simulator: %s", exc)
        return 1
    print(f"sim listening on http://{listen_address(host, port)}", flush=True)
    asyncio.run(_wait_for_signal())
    simulator.shutdown(SHUTDOWN_GRACE_S)
    return 0
