//! The Python exception hierarchy and the one mapping from core errors into it.

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

create_exception!(
    _core,
    GatewayError,
    PyException,
    "Base of every error raised by the extension."
);
create_exception!(
    _core,
    ConfigError,
    GatewayError,
    "A configuration document the core rejected."
);
create_exception!(
    _core,
    ServerError,
    GatewayError,
    "A server could not bind, start or stop."
);
create_exception!(
    _core,
    LedgerWriteError,
    GatewayError,
    "A batch of usage events the ledger did not store (rolled back: none of it is stored)."
);
create_exception!(
    _core,
    LedgerIntegrityError,
    LedgerWriteError,
    "A batch with an event the ledger's schema refuses (a missing value, one out of range, a \
     broken uniqueness rule): rolled back, none of it is stored."
);

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("GatewayError", py.get_type::<GatewayError>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("ServerError", py.get_type::<ServerError>())?;
    m.add("LedgerWriteError", py.get_type::<LedgerWriteError>())?;
    m.add(
        "LedgerIntegrityError",
        py.get_type::<LedgerIntegrityError>(),
    )?;
    Ok(())
}

/// Every core error that can cross the boundary.
pub enum CoreError {
    Config(String),
    Server(std::io::Error),
}

impl From<gateway_core::config::ConfigError> for CoreError {
    fn from(error: gateway_core::config::ConfigError) -> Self {
        Self::Config(error.to_string())
    }
}

impl From<gateway_core::auth::SnapshotError> for CoreError {
    fn from(error: gateway_core::auth::SnapshotError) -> Self {
        Self::Config(error.to_string())
    }
}

impl From<serde_json::Error> for CoreError {
    fn from(error: serde_json::Error) -> Self {
        Self::Config(error.to_string())
    }
}

impl From<std::io::Error> for CoreError {
    fn from(error: std::io::Error) -> Self {
        Self::Server(error)
    }
}

impl From<CoreError> for PyErr {
    fn from(error: CoreError) -> Self {
        match error {
            CoreError::Config(message) => ConfigError::new_err(message),
            CoreError::Server(error) => ServerError::new_err(error.to_string()),
        }
    }
}
