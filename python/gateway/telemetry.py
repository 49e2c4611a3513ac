"""OpenTelemetry traces of the control plane's own work: each batch of usage events written to the
ledger, and each request to the admin and billing APIs, exported over OTLP/gRPC to the collector
the core's request spans go to (`[telemetry]`, resolved by `gateway.config`).

The request path is the core's (rust/core/src/telemetry.rs); nothing here is on it. `start` gives
a `Telemetry` whose tracer the parts are handed (no global provider is set); while tracing is off
that tracer is OpenTelemetry's no-op one, and `instrument` adds nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import FastAPI
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import NoOpTracer, Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.config import TelemetrySettings

__all__ = ["FLUSH_TIMEOUT_MS", "SCOPE", "Telemetry", "TracingMiddleware", "instrument", "start"]

logger = logging.getLogger(__name__)

# The instrumentation scope of the control plane's spans (the core's is `tokengate`).
SCOPE = "gateway.control"

_PROPAGATOR = TraceContextTextMapPropagator()

# How long the last spans may take to reach the collector when the gateway stops.
FLUSH_TIMEOUT_MS = 5000


class Telemetry:
    """The control plane's tracer, and the provider behind it while tracing is on."""

    def __init__(self, tracer: Tracer, provider: TracerProvider | None = None) -> None:
        self.tracer = tracer
        self._provider = provider

    @property
    def on(self) -> bool:
        return self._provider is not None

    @contextmanager
    def span(self, name: str, **attributes: str | int) -> Iterator[Span]:
        """A span of the control plane's own work, ended (with an error status if the work
        raised) when the block is left."""
        with self.tracer.start_as_current_span(name, attributes=attributes) as span:
            yield span

    def shutdown(self) -> None:
        """Exports the spans not yet sent (giving up after `FLUSH_TIMEOUT_MS` if the collector
        does not take them), then stops the exporter."""
        if self._provider is not None:
            self._provider.force_flush(FLUSH_TIMEOUT_MS)
            self._provider.shutdown()


def start(settings: TelemetrySettings) -> Telemetry:
    """The control plane's telemetry for `settings`: off without an endpoint; else spans sampled
    by `sample_ratio` (parent-based) and exported by a batch processor, whose delay and sizes the
    standard `OTEL_BSP_*` environment variables set."""
    if settings.otlp_endpoint is None:
        return Telemetry(NoOpTracer())
    provider = TracerProvider(
        resource=Resource.create({"service.name": settings.service_name}),
        sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
    )
    exporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint, insecure=True)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    logger.info("exporting the control plane's traces to %s", settings.otlp_endpoint)
    return Telemetry(provider.get_tracer(SCOPE), provider)


def instrument(app: FastAPI, telemetry: Telemetry) -> None:
    """Traces each request to `app` while tracing is on."""
    if telemetry.on:
        app.add_middleware(TracingMiddleware, tracer=telemetry.tracer)


class TracingMiddleware:
    """One server span per HTTP request, `METHOD /route/{template}`, the child of the caller's
    `traceparent` if it sent one; attributes: method, route and response status (never a token or
    a path's ids)."""

    def __init__(self, app: ASGIApp, tracer: Tracer) -> None:
        self.app = app
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in scope["headers"]
            if name in (b"traceparent", b"tracestate")
        }
        method = str(scope["method"])
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        with self.tracer.start_as_current_span(
            f"{method} request",
            context=_PROPAGATOR.extract(carrier),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method},
        ) as span:
            try:
                await self.app(scope, receive, send_status)
            finally:
                route = getattr(scope.get("route"), "path", None)
                if isinstance(route, str):
                    span.update_name(f"{method} {route}")
                    span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
