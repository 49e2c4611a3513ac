"""The gateway's configuration: one TOML file, validated by pydantic, handed to the core as JSON.

This module owns every default and every option's documentation (`options_table()` renders them for
the README). It reads the file and builds the core's document; it does not start anything.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, PydanticUndefined

from gateway.ledger.db import parse_url

__all__ = [
    "AdminConfig",
    "BillingConfig",
    "ConfigFileError",
    "ControlConfig",
    "GatewayConfig",
    "IpHost",
    "JournalConfig",
    "ModelRoutingConfig",
    "Port",
    "QuotaConfig",
    "RoutingConfig",
    "ServerConfig",
    "StorageConfig",
    "TelemetryConfig",
    "TelemetrySettings",
    "WorkerConfig",
    "describe_error",
    "format_validation_error",
    "listen_address",
    "load_config",
    "options_table",
    "validate_ip_host",
]


class ConfigFileError(Exception):
    """A configuration file that cannot be read, parsed or validated.

    The message names the file and, for each problem, the dotted path of the offending option.
    """

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__("\n".join(f"{path}: {problem}" for problem in problems))


def validate_ip_host(host: str) -> str:
    """Accepts an IPv4 or IPv6 literal: the core binds a socket address, not a host name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"{host!r} is not an IP address (use e.g. 127.0.0.1, 0.0.0.0 or ::1)"
        ) from None
    return host


# Option types that `gateway serve` and `gateway sim` share; their bounds show in `options_table()`.
IpHost = Annotated[str, AfterValidator(validate_ip_host)]
Port = Annotated[int, Field(ge=0, le=65535)]


def listen_address(host: str, port: int) -> str:
    """`host:port` as a socket address, with IPv6 hosts bracketed (`[::1]:8000`)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _validate_worker_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// URL with a host")
    try:
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise ValueError(f"{url!r} has an invalid port") from None
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(
            f"{url!r} must be a worker base URL such as http://127.0.0.1:8001 "
            "(no path, query or credentials; the gateway adds /v1/...)"
        )
    return url.rstrip("/")


def _validate_otlp_endpoint(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(
            f"{url!r} is not an http:// URL of an OTLP/gRPC collector (e.g. http://127.0.0.1:4317)"
        )
    try:
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise ValueError(f"{url!r} has an invalid port") from None
    return url


def _validate_worker_dns(url: str) -> str:
    url = _validate_worker_url(url)
    host = urlsplit(url).hostname or ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return url
    raise ValueError(f"{url!r} names an address, not a DNS name: use `url` for it")


def _validate_dns_server(server: str) -> str:
    """`IP:PORT` (`[IPv6]:PORT`): where a name server listens."""
    host, sep, port = server.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        number = -1
    if not sep or not 1 <= number <= 65535:
        raise ValueError(f"{server!r} is not IP:PORT (e.g. 10.96.0.10:53 or [::1]:53)")
    return server


def _validate_storage_url(url: str) -> str:
    parse_url(url)
    return url


def _validate_redis_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme in ("redis", "rediss") and parts.hostname:
        return url
    if parts.scheme == "unix" and parts.path:
        return url
    raise ValueError(
        f"{url!r} is not a Redis URL (redis://host:port/db, rediss://... or unix:///path.sock)"
    )


class ServerConfig(BaseModel):
    """`[server]`: the OpenAI-compatible HTTP listener."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    host: IpHost = Field(
        default="127.0.0.1",
        description="IP address to listen on (`0.0.0.0` or `::` for every interface).",
    )
    port: Port = Field(default=8000, description="TCP port to listen on; 0 picks a free port.")
    max_body_bytes: int = Field(
        default=4_194_304,
        ge=1024,
        description="Largest request body accepted; larger bodies get 413.",
    )
    drain_seconds: float = Field(
        default=5.0,
        ge=0,
        le=3600,
        description=(
            "On SIGINT/SIGTERM, how long the listeners go on serving with `/ready` answering 503"
            " (and gRPC health NOT_SERVING) before they close, so that load balancers stop"
            " sending first; 0 closes them at once."
        ),
    )
    shutdown_grace_seconds: float = Field(
        default=30.0,
        ge=0,
        description=(
            "On SIGINT/SIGTERM, once the listeners have closed (after `drain_seconds`), how long"
            " in-flight requests may run before they are cut."
        ),
    )
    header_read_timeout_ms: int = Field(
        default=30_000,
        ge=100,
        le=3_600_000,
        description=(
            "How long a client may take to send a request's headers, on this listener and the"
            " admin listener (idle keep-alive connections included); the connection is then"
            " closed."
        ),
    )
    body_read_timeout_ms: int = Field(
        default=30_000,
        ge=100,
        le=3_600_000,
        description=(
            "How long a client may take to send a request's body once its headers are in, on"
            " this listener and the admin listener; then 408 `request_timeout` and the"
            " connection is closed."
        ),
    )


class WorkerConfig(BaseModel):
    """One `[[workers]]` entry: a `vllm serve` (or `gateway sim`) instance."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    url: Annotated[str, AfterValidator(_validate_worker_url)] | None = Field(
        default=None,
        description=(
            "Base URL of one worker, e.g. `http://127.0.0.1:8001` (no `/v1`); one `[[workers]]` "
            "table per worker, at least one. Each entry has exactly one of `url` and `dns`."
        ),
    )
    dns: Annotated[str, AfterValidator(_validate_worker_dns)] | None = Field(
        default=None,
        max_length=300,
        description=(
            "Instead of `url`: `http://NAME:PORT`, a DNS name (a Kubernetes headless Service)"
            " whose every A and AAAA address is one worker `http://ADDR:PORT`, resolved again every"
            " `routing.discovery_interval_ms`; `api_key` and `max_concurrency` apply to each."
        ),
    )
    api_key: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "The worker's own key (`vllm serve --api-key`), sent to it as `Authorization: Bearer`"
            " on requests and health probes; tenants' keys never reach workers."
        ),
    )
    max_concurrency: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description=(
            "The gateway's requests this worker takes at once. When every worker serving a"
            " model is at its limit, requests wait in the gateway's queue (tenant-fair, bounded"
            " by `routing.max_queued` and `routing.queue_timeout_ms`) rather than in vLLM's;"
            " unset, its capacity is learned from its own queue (`routing.learn_capacity`)."
        ),
    )

    @model_validator(mode="after")
    def _url_or_dns(self) -> WorkerConfig:
        if (self.url is None) == (self.dns is None):
            raise ValueError("give exactly one of `url` and `dns`")
        return self


RoutingPolicy = Literal["least_load", "prefix_affinity", "round_robin"]

# A model's name as requests give it (the core refuses longer ones).
ModelName = Annotated[str, Field(min_length=1, max_length=512)]


class ModelRoutingConfig(BaseModel):
    """`[routing.models."NAME"]`: how requests for one model are routed, over `[routing]`."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    policy: RoutingPolicy | None = Field(
        default=None,
        description=(
            "The routing policy of requests for the model NAME (as requests name it), in place of"
            ' `routing.policy`; one `[routing.models."NAME"]` table per model.'
        ),
    )
    coalesce_window_us: int | None = Field(
        default=None,
        ge=0,
        le=1_000_000,
        description=(
            "The model's coalescing window, in place of `routing.coalesce_window_us` (0 turns"
            " coalescing off for it)."
        ),
    )


class RoutingConfig(BaseModel):
    """`[routing]`: health checks, load signals, timeouts and retries towards the workers, and
    the policy that picks a worker."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    health_interval_ms: int = Field(
        default=500, ge=50, description="Period of each worker's health and model probe."
    )
    load_interval_ms: int = Field(
        default=100,
        ge=0,
        description=(
            "Period of the scrape of each worker's `/metrics` (vLLM's running and waiting requests"
            " and KV-cache use), which routing weighs with the gateway's own in-flight counts;"
            " 0 routes on the in-flight counts alone."
        ),
    )
    connect_timeout_ms: int = Field(
        default=1000,
        ge=1,
        description="TCP connect timeout to a worker; on expiry the request is tried elsewhere.",
    )
    request_timeout_ms: int = Field(
        default=600_000,
        ge=1,
        description=(
            "How long one attempt may wait for a worker: for its headers and then the first"
            " event of a stream, or the whole body otherwise; on expiry the request is tried"
            " elsewhere (504 after the last attempt). A stream that has started is cut only by"
            " `routing.stream_idle_timeout_ms`."
        ),
    )
    stream_idle_timeout_ms: int = Field(
        default=60_000,
        ge=100,
        description=(
            "How long a started stream may go without an event from its worker; then the stream"
            " ends with an error event, is billed for what was relayed, and the worker leaves"
            " rotation until its next good health probe."
        ),
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        le=10,
        description="Workers one request may be tried on before its first byte reaches the client.",
    )
    queue_timeout_ms: int = Field(
        default=30_000,
        ge=1,
        le=3_600_000,
        description=(
            "How long a request may wait in the gateway's queue for a worker with room (see"
            " `workers[].max_concurrency`); then 429 with code `queue_timeout` and `Retry-After`."
        ),
    )
    max_queued: int = Field(
        default=1024,
        ge=0,
        le=1_000_000,
        description=(
            "Requests one model's queue holds at most; past it, 429 with code `queue_full` at once."
        ),
    )
    max_queued_per_tenant: int = Field(
        default=256,
        ge=0,
        le=1_000_000,
        description="Requests of one tenant one model's queue holds at most (429 `queue_full`).",
    )
    batch_every: int = Field(
        default=10,
        ge=2,
        le=1000,
        description=(
            "While requests of both priority classes wait for a model's workers, `interactive`"
            " ones are served first, except that every `batch_every`-th grant in a row goes to"
            " `batch`, so `batch` is never starved."
        ),
    )
    learn_capacity: bool = Field(
        default=True,
        description=(
            "Whether a worker without `max_concurrency` is taken as full while it reports"
            " requests waiting in its own queue (`vllm:num_requests_waiting`), so that further"
            " requests wait in the gateway's tenant-fair queue instead; needs"
            " `routing.load_interval_ms` above 0. Off, such a worker gets every request at once."
        ),
    )
    breaker_consecutive_failures: int = Field(
        default=5,
        ge=0,
        le=1000,
        description=(
            "Circuit breaker: a worker whose requests fail this many times in a row (a 5xx, a"
            " broken connection, no answer in time, a stream broken off; never a 4xx) is ejected"
            " from rotation; 0 turns this trigger off."
        ),
    )
    breaker_window: int = Field(
        default=20,
        ge=0,
        le=64,
        description=(
            "Circuit breaker: the last requests of a worker its failure rate is taken over; 0"
            " turns the rate trigger off (with `routing.breaker_consecutive_failures` also 0, the"
            " breaker is off)."
        ),
    )
    breaker_min_requests: int = Field(
        default=10,
        ge=1,
        le=64,
        description=(
            "Circuit breaker: requests in the window before its failure rate can eject a worker;"
            " at most `routing.breaker_window`."
        ),
    )
    breaker_failure_percent: int = Field(
        default=40,
        ge=1,
        le=100,
        description=(
            "Circuit breaker: a worker with at least this percentage of failures in its window is"
            " ejected."
        ),
    )
    breaker_backoff_ms: int = Field(
        default=1000,
        ge=1,
        le=3_600_000,
        description=(
            "Circuit breaker: how long an ejection lasts; then the worker's next request is a"
            " trial, which returns it if answered. Each ejection that follows a return before the"
            " worker has served a window of requests doubles it."
        ),
    )
    breaker_max_backoff_ms: int = Field(
        default=60_000,
        ge=1,
        le=3_600_000,
        description=(
            "Circuit breaker: the longest an ejection lasts; at least `routing.breaker_backoff_ms`."
        ),
    )
    policy: RoutingPolicy = Field(
        default="least_load",
        description=(
            "Which eligible worker serves a request: `least_load` (the fewest requests, weighing"
            " vLLM's own running and waiting), `prefix_affinity` (the worker a consistent hash of"
            " the prompt's leading part, or of `X-Session-Id`, names, within a load bound, so"
            " vLLM's prefix cache hits from every replica; see Routing) or `round_robin`. Every"
            " policy passes over a saturated worker (vLLM queueing, or its KV cache 95% full)."
        ),
    )
    affinity_load_factor: float = Field(
        default=1.25,
        ge=1.0,
        le=100.0,
        description=(
            "`prefix_affinity`'s bound: a worker takes a request while its load is under"
            " `max(ceil(factor * (total load + 1) / workers), routing.affinity_load_floor)`; past"
            " it, or saturated, the request spills to the next worker on the ring. Higher keeps"
            " more requests on their prefix's worker, lower spreads load more evenly."
        ),
    )
    coalesce_window_us: int = Field(
        default=0,
        ge=0,
        le=1_000_000,
        description=(
            "Coalescing: compatible non-streaming `/v1/completions` requests (one API key, one"
            " model, every field but `prompt` equal) that reach one worker within this many"
            " microseconds go to it as one call with a list of prompts, and each client gets its"
            " own answer and usage back. 0 (the default) sends every request on its own."
        ),
    )
    coalesce_max_prompts: int = Field(
        default=16,
        ge=2,
        le=1024,
        description="Most prompts one coalesced call carries; a full batch goes at once.",
    )
    affinity_load_floor: int = Field(
        default=8,
        ge=0,
        le=1_000_000,
        description=(
            "A worker with fewer requests than this is never past `prefix_affinity`'s bound (only"
            " saturation spills): with few requests in flight the bound is tight, and a spilled"
            " request computes its prefix again elsewhere while its worker has room to spare."
        ),
    )
    models: dict[ModelName, ModelRoutingConfig] = Field(
        default_factory=dict,
        description="Per-model routing, by model name.",
    )
    discovery_interval_ms: int = Field(
        default=5000,
        ge=100,
        le=3_600_000,
        description=(
            "Period of the resolution of `workers[].dns` names: workers whose address appeared"
            " enter rotation once their health probe passes, those whose address went leave it"
            " (their requests in flight finish). A failed or empty resolution keeps the name's"
            " last workers."
        ),
    )
    dns_servers: list[Annotated[str, AfterValidator(_validate_dns_server)]] = Field(
        default_factory=list,
        max_length=8,
        description=(
            "Name servers (`IP:PORT`) that resolve `workers[].dns` names; empty: the system's"
            " (`/etc/resolv.conf`)."
        ),
    )

    @model_validator(mode="after")
    def _breaker_bounds_agree(self) -> RoutingConfig:
        if self.breaker_window and self.breaker_min_requests > self.breaker_window:
            raise ValueError("breaker_min_requests must be at most breaker_window")
        if self.breaker_max_backoff_ms < self.breaker_backoff_ms:
            raise ValueError("breaker_max_backoff_ms must be at least breaker_backoff_ms")
        return self


class StorageConfig(BaseModel):
    """`[storage]`: the ledger database (tenants, keys, usage)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    url: Annotated[str, AfterValidator(_validate_storage_url)] = Field(
        default="sqlite:///data/gateway.db",
        description=(
            "Ledger database: a SQLite file, `sqlite:///relative/path.db` (relative to the"
            " current directory) or `sqlite:////absolute/path.db`, for one replica; or PostgreSQL,"
            " `postgresql://user:password@host:port/dbname` (also `postgres://`, with libpq's"
            " parameters such as `?sslmode=require`), which several replicas can share."
        ),
    )


class ControlConfig(BaseModel):
    """`[control]`: how the control plane feeds keys to the core and collects usage from it."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    key_refresh_ms: int = Field(
        default=500,
        ge=10,
        le=1000,
        description=(
            "Period of re-reading active API keys, quota policies and prices from the ledger and "
            "pushing each to the core when changed; at most 1000 so a revocation or a policy "
            "change takes effect within a second."
        ),
    )
    usage_flush_ms: int = Field(
        default=100, ge=10, description="Period of draining usage events into the ledger."
    )
    usage_batch: int = Field(
        default=4096,
        ge=1,
        description="Most usage events written per ledger transaction.",
    )


class QuotaConfig(BaseModel):
    """`[quota]`: where the quota counters live and what happens when they cannot be reached."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    redis_url: Annotated[str, AfterValidator(_validate_redis_url)] | None = Field(
        default=None,
        description=(
            "Redis holding the counters shared by every replica (`redis://host:port/db`,"
            " `rediss://...` or `unix:///path.sock`); unset keeps them in this process, seeded"
            " at start-up from the ledger's usage of the current day and month."
        ),
    )
    redis_prefix: str = Field(
        default="tg:", description="Prefix of every Redis key the gateway writes."
    )
    redis_timeout_ms: int = Field(
        default=100,
        ge=1,
        description="How long one Redis call may take before Redis counts as unreachable.",
    )
    replicas: int = Field(
        default=1,
        ge=1,
        description=(
            "How many gateway replicas share the Redis counters; when Redis is unreachable each"
            " replica enforces 1/replicas of each rate limit."
        ),
    )
    budgets_when_redis_down: Literal["reject", "allow"] = Field(
        default="reject",
        description=(
            "Requests against a token or money budget while Redis is unreachable: `reject`"
            " answers 503 (fail closed), `allow` admits them without a budget check."
        ),
    )
    rate_limits_when_redis_down: Literal["local_share", "allow"] = Field(
        default="local_share",
        description=(
            "Rate and concurrency limits while Redis is unreachable: `local_share` enforces"
            " 1/replicas of each in this process, `allow` lifts them."
        ),
    )
    lease_ms: int = Field(
        default=900_000,
        ge=1000,
        description=(
            "How long a request's hold and concurrency slot live in Redis if its replica dies"
            " before releasing them."
        ),
    )
    default_max_tokens: int = Field(
        default=4096,
        ge=1,
        description=(
            "Completion tokens reserved for a request without `max_tokens` when the model's"
            " context length is unknown."
        ),
    )


_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class AdminConfig(BaseModel):
    """`[admin]`: the admin HTTP API (tenants, keys, quotas, prices) and the billing API, on their
    own listener."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    host: IpHost = Field(
        default="127.0.0.1",
        description="IP address the admin API listens on; keep it off public interfaces.",
    )
    port: Port = Field(default=8090, description="TCP port of the admin API; 0 picks a free port.")
    token_env: str = Field(
        default="TOKENGATE_ADMIN_TOKEN",
        pattern=_ENV_NAME,
        description=(
            "Name of the environment variable holding the admin API's bearer token, which also"
            " reads the billing API for every tenant; while it is unset or empty the admin routes"
            " answer 401. The listener is off while neither token is set."
        ),
    )
    billing_token_env: str = Field(
        default="TOKENGATE_BILLING_TOKEN",
        pattern=_ENV_NAME,
        description=(
            "Name of the environment variable holding the billing API's bearer token (usage"
            " events, usage buckets and invoices of every tenant, on the admin listener; tenants"
            " read their own with their API keys); it opens no admin route."
        ),
    )
    console: bool = Field(
        default=False,
        description=(
            "Serve the usage and billing console, a browser page at /console/ on the admin"
            " listener: a tenant signs in with one of its API keys and sees its own usage,"
            " spend, refusals, keys, invoices and budgets; an operator signs in with the admin"
            " token and sees every tenant and the fleet. It reads the admin and billing APIs and"
            " loads nothing from the internet."
        ),
    )


class BillingConfig(BaseModel):
    """`[billing]`: what the billing API and invoices state besides the ledger's figures."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    currency: str = Field(
        default="USD",
        pattern=r"^[A-Z]{3}$",
        description=(
            "ISO 4217 code of the currency of prices, money budgets and costs (all in"
            " micro-units of it); usage events and invoices state it."
        ),
    )


class GrpcConfig(BaseModel):
    """`[grpc]`: the gRPC API (`gateway.v1`, see `protos/`), on its own listener."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    host: IpHost = Field(default="127.0.0.1", description="IP address the gRPC API listens on.")
    port: Port | None = Field(
        default=None,
        description="TCP port of the gRPC API (0 picks a free one); off unless set.",
    )


class JournalConfig(BaseModel):
    """`[journal]`: the durable usage journal."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    enabled: bool = Field(
        default=True,
        description=(
            "Write every usage event to the journal file before its response's last bytes"
            " leave; a gateway killed mid-flight then records, at its next start, what it had"
            " not yet written to the ledger, and requests it was serving become `interrupted`"
            " events billed for the usage they had relayed (at most"
            " `journal.progress_interval_ms` old). When it is also safe from a machine that"
            " stops: `journal.sync`."
            " Off, events wait in memory until the ledger has them, and a killed gateway loses"
            " those."
        ),
    )
    sync: Literal["interval", "always"] = Field(
        default="interval",
        description=(
            "`interval`: the journal is synced to disk (`fdatasync`) every"
            " `journal.sync_interval_ms` and no response waits for a disk; a killed gateway"
            " loses nothing, a machine that loses power at most that window of events."
            " `always`: each response's last bytes wait until its event is synced (a sync"
            " shared by the responses that end meanwhile); a machine that loses power loses"
            " nothing, at the cost of a sync's latency (about 0.5 ms on a typical SSD) on every"
            " response."
        ),
    )
    sync_interval_ms: int = Field(
        default=10,
        ge=1,
        le=1000,
        description=(
            'With `journal.sync = "interval"`, the longest an event written to the journal'
            " waits for a sync; with either, how long a request runs before its start (and"
            " each new progress) is written: a request that ends sooner costs one record."
        ),
    )
    dir: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "Directory of the journal (relative to the current directory), one gateway process"
            " at a time. Default with a SQLite ledger: beside its file, named"
            " `<file stem>.usage-journal`; with PostgreSQL it must be set, one per replica."
        ),
    )
    segment_bytes: int = Field(
        default=16_777_216,
        ge=4096,
        description="Size past which a journal segment is sealed and a new one begun.",
    )
    progress_interval_ms: int = Field(
        default=100,
        ge=10,
        le=60_000,
        description=(
            "How often a running request's usage goes to the journal: a request interrupted by"
            " the gateway's death is billed for what it had relayed at most this long before."
        ),
    )


OtlpEndpoint = Annotated[str, Field(max_length=2048), AfterValidator(_validate_otlp_endpoint)]


class TelemetryConfig(BaseModel):
    """`[telemetry]`: OpenTelemetry traces of requests and of the control plane's work, exported
    over OTLP/gRPC. Each option left unset falls back to its standard `OTEL_*` environment
    variable, then to its default."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    otlp_endpoint: OtlpEndpoint | None = Field(
        default=None,
        description=(
            "The OTLP/gRPC collector traces go to, e.g. `http://127.0.0.1:4317` (plain gRPC, no"
            " TLS); unset, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or else"
            " `OTEL_EXPORTER_OTLP_ENDPOINT` if set, else tracing is off and costs nothing."
        ),
    )
    sample_ratio: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description=(
            "The share of new traces recorded (a client's `traceparent` decides for its own:"
            " parent-based); unset, `OTEL_TRACES_SAMPLER_ARG` if set, else 1.0."
        ),
    )
    service_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description=(
            "The `service.name` of the spans; unset, `OTEL_SERVICE_NAME` if set, else `tokengate`."
        ),
    )

    def resolve(self, environ: Mapping[str, str] | None = None) -> TelemetrySettings:
        """The settings in force: this table's, then the environment's `OTEL_*`, then the
        defaults. An environment value that is not valid is refused as the file's would be."""
        env = os.environ if environ is None else environ
        # The traces' own variable wins over the one every signal shares, as in OpenTelemetry's
        # SDKs.
        endpoint = (
            self.otlp_endpoint
            or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
            or None
        )
        ratio: float | str | None = self.sample_ratio
        if ratio is None and env.get("OTEL_TRACES_SAMPLER_ARG"):
            ratio = env["OTEL_TRACES_SAMPLER_ARG"]
        service = self.service_name or env.get("OTEL_SERVICE_NAME") or "tokengate"
        # The environment's values pass the file's checks (a number in a string included).
        try:
            checked = TelemetryConfig.model_validate(
                {"otlp_endpoint": endpoint, "sample_ratio": ratio, "service_name": service},
                strict=False,
            )
        except ValidationError as exc:
            problems = "; ".join(format_validation_error(exc))
            raise ValueError(f"telemetry (with the OTEL_* environment): {problems}") from None
        return TelemetrySettings(
            otlp_endpoint=checked.otlp_endpoint,
            sample_ratio=1.0 if checked.sample_ratio is None else checked.sample_ratio,
            service_name=service,
        )


@dataclass(frozen=True)
class TelemetrySettings:
    """`[telemetry]` as resolved against the environment: what the core and the control plane
    trace with."""

    otlp_endpoint: str | None
    sample_ratio: float
    service_name: str

    def document(self) -> dict[str, Any]:
        return {
            "otlp_endpoint": self.otlp_endpoint,
            "sample_ratio": self.sample_ratio,
            "service_name": self.service_name,
        }


_JOURNAL_DIR_REQUIRED = (
    "journal.dir: required with a PostgreSQL ledger, one directory per replica"
    " (or set journal.enabled = false)"
)


class GatewayConfig(BaseModel):
    """The whole configuration file of `gateway serve`."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    server: ServerConfig = Field(default_factory=ServerConfig)
    workers: list[WorkerConfig] = Field(
        min_length=1, description="Workers to route to; at least one."
    )
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    control: ControlConfig = Field(default_factory=ControlConfig)
    quota: QuotaConfig = Field(default_factory=QuotaConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    billing: BillingConfig = Field(default_factory=BillingConfig)
    grpc: GrpcConfig = Field(default_factory=GrpcConfig)
    journal: JournalConfig = Field(default_factory=JournalConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)

    def core_document(self, environ: Mapping[str, str] | None = None) -> str:
        """The JSON document `gateway._core.Gateway` takes (rust/core/src/config.rs), every member
        set: the core declares no defaults of its own. `environ` (default: the process's) gives
        `[telemetry]`'s fallbacks."""
        journal = self.journal_dir()
        document = {
            "listen": listen_address(self.server.host, self.server.port),
            "max_body_bytes": self.server.max_body_bytes,
            "header_read_timeout_ms": self.server.header_read_timeout_ms,
            "body_read_timeout_ms": self.server.body_read_timeout_ms,
            "workers": [
                {
                    "url": worker.url,
                    "dns": worker.dns,
                    "api_key": worker.api_key or None,
                    "max_concurrency": worker.max_concurrency,
                }
                for worker in self.workers
            ],
            "routing": {
                "health_interval_ms": self.routing.health_interval_ms,
                "load_interval_ms": self.routing.load_interval_ms,
                "connect_timeout_ms": self.routing.connect_timeout_ms,
                "request_timeout_ms": self.routing.request_timeout_ms,
                "stream_idle_timeout_ms": self.routing.stream_idle_timeout_ms,
                "max_attempts": self.routing.max_attempts,
                "queue_timeout_ms": self.routing.queue_timeout_ms,
                "max_queued": self.routing.max_queued,
                "max_queued_per_tenant": self.routing.max_queued_per_tenant,
                "batch_every": self.routing.batch_every,
                "learn_capacity": self.routing.learn_capacity,
                "breaker_consecutive_failures": self.routing.breaker_consecutive_failures,
                "breaker_window": self.routing.breaker_window,
                "breaker_min_requests": self.routing.breaker_min_requests,
                "breaker_failure_percent": self.routing.breaker_failure_percent,
                "breaker_backoff_ms": self.routing.breaker_backoff_ms,
                "breaker_max_backoff_ms": self.routing.breaker_max_backoff_ms,
                "policy": self.routing.policy,
                "affinity_load_factor": self.routing.affinity_load_factor,
                "affinity_load_floor": self.routing.affinity_load_floor,
                "coalesce_window_us": self.routing.coalesce_window_us,
                "coalesce_max_prompts": self.routing.coalesce_max_prompts,
                "models": {
                    name: {"policy": model.policy, "coalesce_window_us": model.coalesce_window_us}
                    for name, model in self.routing.models.items()
                },
                "discovery_interval_ms": self.routing.discovery_interval_ms,
                "dns_servers": list(self.routing.dns_servers),
            },
            "quota": self.quota.model_dump(),
            "journal": None
            if journal is None
            else {
                "dir": journal,
                "segment_bytes": self.journal.segment_bytes,
                "progress_interval_ms": self.journal.progress_interval_ms,
                "sync": self.journal.sync,
                "sync_interval_ms": self.journal.sync_interval_ms,
            },
            "grpc_listen": None
            if self.grpc.port is None
            else listen_address(self.grpc.host, self.grpc.port),
            "telemetry": self.telemetry.resolve(environ).document(),
        }
        return json.dumps(document)

    def journal_dir(self) -> str | None:
        """The usage journal's directory, None when it is off."""
        if not self.journal.enabled:
            return None
        if self.journal.dir is not None:
            return self.journal.dir
        ledger = parse_url(self.storage.url)
        if not isinstance(ledger, Path):
            raise ValueError(_JOURNAL_DIR_REQUIRED)
        return str(ledger.with_name(f"{ledger.stem}.usage-journal"))

    @model_validator(mode="after")
    def _journal_has_a_dir(self) -> GatewayConfig:
        self.journal_dir()
        return self


def describe_error(item: ErrorDetails) -> tuple[str, str]:
    """One pydantic error as (dotted path, message): (`workers[0].url`, `'x' is not ...`); a
    `ValueError` raised by a validator gives its own text, without pydantic's prefix."""
    path = ""
    for part in item["loc"]:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    message = item["msg"]
    if item["type"] == "value_error":
        message = str(item.get("ctx", {}).get("error", message))
    return path, message


def format_validation_error(error: ValidationError) -> list[str]:
    """One `dotted.path: message` line per problem (`workers[0].url: ...`)."""
    problems = []
    for item in error.errors(include_url=False):
        path, message = describe_error(item)
        problems.append(f"{path or '(top level)'}: {message}")
    return problems


def load_config(path: Path | str) -> GatewayConfig:
    """Reads and validates one TOML file; every failure is a `ConfigFileError`."""
    path = Path(path)
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigFileError(path, [f"cannot read: {exc.strerror or exc}"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(path, [f"invalid TOML: {exc}"]) from exc
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigFileError(path, format_validation_error(exc)) from exc


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Annotated:
        return _type_name(get_args(annotation)[0])
    if origin is Literal:
        return " or ".join(json.dumps(value) for value in get_args(annotation))
    if origin in (Union, UnionType):
        return " or ".join(_type_name(arg) for arg in get_args(annotation))
    if origin is list:
        (item,) = get_args(annotation)
        return f"list of {_type_name(item)}"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type):
        return {"str": "string", "int": "integer", "float": "float", "bool": "boolean"}.get(
            annotation.__name__, annotation.__name__
        )
    return str(annotation)


def _bounds(info: FieldInfo) -> str:
    words = []
    for constraint in info.metadata:
        for attr, symbol in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            value = getattr(constraint, attr, None)
            if value is not None:
                words.append(f"{symbol} {value}")
    return f" ({', '.join(words)})" if words else ""


def _default(info: FieldInfo) -> str:
    if info.default_factory is list:
        return "`[]`"
    if info.default is PydanticUndefined:
        return "required"
    return f"`{json.dumps(info.default)}`"


def _rows(model: type[BaseModel], prefix: str) -> list[tuple[str, str, str, str]]:
    rows = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(_rows(annotation, f"{prefix}{name}."))
            continue
        if get_origin(annotation) is list:
            (item,) = get_args(annotation)
            if isinstance(item, type) and issubclass(item, BaseModel):
                rows.extend(_rows(item, f"{prefix}{name}[]."))
                continue
        if get_origin(annotation) is dict:
            _, item = get_args(annotation)
            if isinstance(item, type) and issubclass(item, BaseModel):
                rows.extend(_rows(item, f'{prefix}{name}."NAME".'))
                continue
        type_name = _type_name(info.rebuild_annotation())
        description = (info.description or "") + _bounds(info)
        rows.append((f"`{prefix}{name}`", type_name, _default(info), description))
    return rows


def options_table() -> str:
    """Every option of the configuration file as a markdown table: option, type, default, meaning.

    Options are named by their TOML path; `workers[].url` is the `url` of each `[[workers]]` entry,
    of which at least one is required.
    """
    lines = ["| option | type | default | description |", "|---|---|---|---|"]
    for option, type_name, default, description in _rows(GatewayConfig, ""):
        cells = (option, type_name, default, description)
        lines.append("| " + " | ".join(cell.replace("|", r"\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"
