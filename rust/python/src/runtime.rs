//! The extension's one tokio runtime and its logging, created on first use.

use std::sync::OnceLock;

use tokio::runtime::Runtime;

use crate::errors::CoreError;

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

/// The shared multi-threaded runtime. `TOKENGATE_WORKER_THREADS` sets its size (default: one
/// thread per core).
pub fn runtime() -> Result<&'static Runtime, CoreError> {
    if let Some(runtime) = RUNTIME.get() {
        return Ok(runtime);
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().thread_name("tokengate");
    if let Some(threads) = std::env::var("TOKENGATE_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
    {
        builder.worker_threads(threads);
    }
    let built = builder.build()?;
    // Another thread may have won the race; its runtime is the one kept.
    Ok(RUNTIME.get_or_init(|| built))
}

/// Logs to stderr, filtered by `TOKENGATE_LOG` (e.g. `info`, `gateway_core=debug`); default `warn`.
/// Beside the log, the OpenTelemetry layer, which exports request spans once a gateway
/// configured with an OTLP endpoint starts (`gateway_core::telemetry`); the spans are not
/// logged.
pub fn init_logging() {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let filter = tracing_subscriber::EnvFilter::try_from_env("TOKENGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let log = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(filter)
        .with_filter(tracing_subscriber::filter::filter_fn(|metadata| {
            metadata.target() != gateway_core::telemetry::TARGET
        }));
    let _ = tracing_subscriber::registry()
        .with(log)
        .with(gateway_core::telemetry::layer())
        .try_init();
}
