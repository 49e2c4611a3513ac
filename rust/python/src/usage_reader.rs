//! A Python callable as the core's `UsageReader`, for the gRPC usage service: called as
//! `reader(tenant_id, after, limit)` on a blocking thread with the GIL held, it returns the page's
//! JSON; a `ValueError` means a malformed cursor, any other exception an unreadable ledger.

use gateway_core::ledger::{UsageReadError, UsageReader};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

#[derive(Debug)]
pub struct PyUsageReader {
    callable: Py<PyAny>,
}

impl PyUsageReader {
    pub fn new(callable: Py<PyAny>) -> Self {
        Self { callable }
    }
}

impl UsageReader for PyUsageReader {
    fn events(
        &self,
        tenant_id: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<String, UsageReadError> {
        Python::attach(|py| {
            self.callable
                .call1(py, (tenant_id, after, limit))
                .and_then(|page| page.extract::<String>(py))
                .map_err(|error| {
                    let message = error.value(py).to_string();
                    if error.is_instance_of::<PyValueError>(py) {
                        UsageReadError::InvalidCursor(message)
                    } else {
                        UsageReadError::Unavailable(message)
                    }
                })
        })
    }
}
