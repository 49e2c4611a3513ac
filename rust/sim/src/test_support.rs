//! Fixtures the simulator's unit tests share; compiled for tests only, it is no part of the
//! simulator.

use super::config::SimConfig;
use super::response::ApiError;

/// A small model: a 100-token context and an EOS after 10 tokens.
pub(crate) fn config() -> SimConfig {
    SimConfig {
        max_model_len: 100,
        max_output_tokens: 10,
        ..SimConfig::default()
    }
}

/// The error of a request that must fail.
#[expect(clippy::unwrap_used, reason = "tests fail loudly on a bad fixture")]
pub(crate) fn err<T>(result: Result<T, ApiError>) -> ApiError {
    result.err().unwrap()
}
