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
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TOKENGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
