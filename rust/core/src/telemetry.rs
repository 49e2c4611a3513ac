//! OpenTelemetry traces of requests: the `tracing` spans of target [`TARGET`] become OTLP spans,
//! exported over gRPC by a batch processor on its own thread (off the request path), sampled by
//! `telemetry.sample_ratio` unless the client's trace context decided (parent-based); the W3C
//! trace context (`traceparent`, `tracestate`) is read from a client's headers or gRPC metadata
//! and written on the upstream request. It creates the request's root span; the pipeline and the
//! surfaces open the other spans at their seams ([`child_span!`]). It does not read settings
//! (`config` does).
//!
//! The subscriber's OpenTelemetry layer ([`layer`]) is in place from the extension's start, before
//! any configuration is known; [`install`] gives it an exporter once. While nothing is installed
//! every span of [`TARGET`] is disabled at its callsite, and [`request_span`] answers
//! `Span::none()` after one relaxed load, so no span is built on the request path.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{LazyLock, OnceLock};
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{Link, SpanKind, TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchSpanProcessor, Sampler, SamplingResult, SdkTracerProvider, ShouldSample, SpanData,
    SpanProcessor,
};
use tracing::Span;
use tracing::level_filters::LevelFilter;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::registry::LookupSpan;

use crate::config::TelemetryConfig;
use crate::error::ApiError;
use crate::usage::UsageEvent;

/// The target of every span exported (and of no log line).
pub const TARGET: &str = "tokengate::trace";

/// Whether an exporter is installed. Relaxed: a flag read alone, publishing nothing; the
/// exporter it stands for is published by `EXPORT`'s `OnceLock`.
static ON: AtomicBool = AtomicBool::new(false);
/// `telemetry.sample_ratio`, as `f64` bits (relaxed: read alone).
static RATIO: AtomicU64 = AtomicU64::new(1.0_f64.to_bits());
/// The batch processor and its OTLP exporter, once installed.
static EXPORT: OnceLock<BatchSpanProcessor> = OnceLock::new();
/// The tracer provider behind [`layer`]: its processor and sampler defer to `EXPORT` and `RATIO`.
static PROVIDER: LazyLock<SdkTracerProvider> = LazyLock::new(|| {
    SdkTracerProvider::builder()
        .with_span_processor(Deferred)
        .with_sampler(Sampler::ParentBased(Box::new(Ratio)))
        .build()
});

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Why tracing could not be turned on.
#[derive(Debug, thiserror::Error)]
#[error("cannot export traces to {endpoint}: {detail}")]
pub struct TelemetryError {
    endpoint: String,
    detail: String,
}

/// Whether spans are exported; while not, none is built.
#[inline]
pub fn on() -> bool {
    ON.load(Ordering::Relaxed)
}

/// The subscriber's OpenTelemetry layer: the spans of [`TARGET`], once [`install`] has run.
pub fn layer<S>() -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    tracing_opentelemetry::layer()
        .with_tracer(PROVIDER.tracer("tokengate"))
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_level(false)
        .with_tracked_inactivity(false)
        .with_filter(
            // Cached per callsite (`install` rebuilds the cache): a disabled span costs nothing.
            filter_fn(|metadata| on() && metadata.target() == TARGET)
                .with_max_level_hint(LevelFilter::INFO),
        )
}

/// Exports spans to `config.otlp_endpoint` (OTLP/gRPC), if set, from now on; once per process
/// (a second gateway in the process shares the first one's exporter). Call inside a tokio
/// runtime: the exporter's channel lives on it. Returns whether this call turned tracing on.
pub fn install(config: &TelemetryConfig) -> Result<bool, TelemetryError> {
    let Some(endpoint) = config.otlp_endpoint.as_deref() else {
        return Ok(false);
    };
    if EXPORT.get().is_some() {
        return Ok(false);
    }
    let failed = |detail: String| TelemetryError {
        endpoint: endpoint.to_owned(),
        detail,
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| failed(e.to_string()))?;
    // The batch's size, delay and timeouts come from the standard `OTEL_BSP_*` variables.
    let mut processor = BatchSpanProcessor::builder(exporter).build();
    processor.set_resource(
        &Resource::builder()
            .with_service_name(config.service_name.clone())
            .build(),
    );
    if EXPORT.set(processor).is_err() {
        return Ok(false);
    }
    RATIO.store(
        config.sample_ratio.clamp(0.0, 1.0).to_bits(),
        Ordering::Relaxed,
    );
    ON.store(true, Ordering::Relaxed);
    tracing::callsite::rebuild_interest_cache();
    Ok(true)
}

/// Exports every ended span now; blocks until the collector has them or the export times out.
pub fn flush() {
    if let Some(processor) = EXPORT.get()
        && let Err(error) = processor.force_flush()
    {
        tracing::warn!(%error, "traces could not be flushed");
    }
}

/// A request's root span, `gateway.request`, the child of the trace context its client sent
/// (`header` looks up `traceparent` and `tracestate`), if any; `Span::none()` while off. The
/// surface and the pipeline fill its empty fields as they learn them.
pub fn request_span<'h>(surface: &'static str, header: impl Fn(&str) -> Option<&'h str>) -> Span {
    if !on() {
        return Span::none();
    }
    let span = tracing::info_span!(
        target: TARGET,
        parent: None,
        "gateway.request",
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        surface,
        endpoint = tracing::field::Empty,
        tenant.id = tracing::field::Empty,
        model = tracing::field::Empty,
        stream = tracing::field::Empty,
        worker = tracing::field::Empty,
        status = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
        error.reason = tracing::field::Empty,
        usage.source = tracing::field::Empty,
        usage.prompt_tokens = tracing::field::Empty,
        usage.completion_tokens = tracing::field::Empty,
        usage.cached_tokens = tracing::field::Empty,
    );
    if let Some(traceparent) = header("traceparent") {
        let carrier = Carrier {
            traceparent,
            tracestate: header("tracestate"),
        };
        let parent = TraceContextPropagator::new().extract(&carrier);
        if parent.span().span_context().is_valid() {
            let _ = span.set_parent(parent);
        }
    }
    span
}

/// A child of `parent` in the request's trace, or `Span::none()` when `parent` is none (tracing
/// off, or the span disabled): no span is built then.
#[macro_export]
macro_rules! child_span {
    ($parent:expr, $name:literal $(, $($fields:tt)*)?) => {{
        let parent: &::tracing::Span = $parent;
        if parent.is_none() {
            ::tracing::Span::none()
        } else {
            ::tracing::info_span!(
                target: $crate::telemetry::TARGET,
                parent: parent,
                $name
                $(, $($fields)*)?
            )
        }
    }};
}

/// A request refused before any worker was involved: why, on its root span.
pub fn record_refusal(span: &Span, error: &ApiError) {
    if span.is_none() {
        return;
    }
    let status = error.status().as_u16();
    span.record("http.response.status_code", i64::from(status));
    span.record("error.reason", error.reason());
    span.record("status", "refused");
    if status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
}

/// A request's usage event, as recorded: its worker, outcome and token counts on the root span.
pub fn record_event(span: &Span, event: &UsageEvent) {
    if span.is_none() {
        return;
    }
    if let Some(worker) = &event.worker {
        span.record("worker", &**worker);
    }
    span.record("status", event.status.as_str());
    span.record("http.response.status_code", i64::from(event.http_status));
    span.record("usage.source", event.usage_source.as_str());
    span.record("usage.prompt_tokens", signed(event.prompt_tokens));
    span.record("usage.completion_tokens", signed(event.completion_tokens));
    span.record("usage.cached_tokens", signed(event.cached_tokens));
    if event.http_status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
}

/// A count as an OTLP integer attribute (signed: the layer writes unsigned ones as text).
fn signed(count: u64) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

/// The W3C trace context of `span` as headers for an upstream request, so that the worker's own
/// spans join the trace under it; `None` while off.
#[derive(Debug, Clone, Default)]
pub struct TraceHeaders {
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl TraceHeaders {
    pub fn of(span: &Span) -> Self {
        if span.is_none() {
            return Self::default();
        }
        let context = span.context();
        if !context.span().span_context().is_valid() {
            return Self::default();
        }
        let mut headers = Self::default();
        TraceContextPropagator::new().inject_context(&context, &mut headers);
        headers
    }

    /// Writes the headers into `map`.
    pub fn write(&self, map: &mut http::HeaderMap) {
        for (name, value) in &self.headers {
            map.insert(name.clone(), value.clone());
        }
    }
}

impl Injector for TraceHeaders {
    fn set(&mut self, key: &str, value: String) {
        let name = match key {
            "traceparent" => TRACEPARENT,
            "tracestate" => TRACESTATE,
            _ => return,
        };
        if let Ok(value) = HeaderValue::try_from(value) {
            self.headers.push((name, value));
        }
    }
}

/// What the propagator reads a client's trace context from: `traceparent` and `tracestate`.
struct Carrier<'h> {
    traceparent: &'h str,
    tracestate: Option<&'h str>,
}

impl Extractor for Carrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => Some(self.traceparent),
            "tracestate" => self.tracestate,
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

/// The provider's processor: hands ended spans to the installed batch processor, if any.
#[derive(Debug)]
struct Deferred;

impl SpanProcessor for Deferred {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if let Some(processor) = EXPORT.get() {
            processor.on_end(span);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        EXPORT.get().map_or(Ok(()), SpanProcessor::force_flush)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        EXPORT
            .get()
            .map_or(Ok(()), |processor| processor.shutdown_with_timeout(timeout))
    }
}

/// Samples a new trace (one whose client sent no context) at the installed ratio.
#[derive(Debug, Clone)]
struct Ratio;

impl ShouldSample for Ratio {
    fn should_sample(
        &self,
        parent_context: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        span_kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        let ratio = f64::from_bits(RATIO.load(Ordering::Relaxed));
        Sampler::TraceIdRatioBased(ratio).should_sample(
            parent_context,
            trace_id,
            name,
            span_kind,
            attributes,
            links,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_builds_no_span() {
        let span = request_span("http", |_| {
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        });
        assert!(span.is_none());
        let child = crate::child_span!(&span, "gateway.admission");
        assert!(child.is_none());
        assert!(TraceHeaders::of(&child).headers.is_empty());
    }

    #[test]
    fn only_the_two_trace_headers_are_injected() {
        let mut headers = TraceHeaders::default();
        headers.set(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
        );
        headers.set("tracestate", "vendor=1".into());
        headers.set("baggage", "secret=1".into());
        let mut map = http::HeaderMap::new();
        headers.write(&mut map);
        assert_eq!(map.len(), 2);
        assert!(map.contains_key("traceparent") && map.contains_key("tracestate"));
    }
}
