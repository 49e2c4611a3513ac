//! Usage events cross into Python as plain tuples in `USAGE_COLUMNS` order: the ledger inserts
//! them as they come, with no JSON or per-field validation in between.

use gateway_core::metering::UsageEvent;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

/// The ledger's `usage_events` columns, in the order of each drained tuple.
pub const USAGE_COLUMNS: [&str; 16] = [
    "event_id",
    "request_id",
    "tenant_id",
    "key_id",
    "model",
    "worker",
    "endpoint",
    "stream",
    "status",
    "http_status",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "usage_source",
    "started_at_ms",
    "finished_at_ms",
];

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("USAGE_COLUMNS", PyTuple::new(m.py(), USAGE_COLUMNS)?)
}

/// One event as a tuple in `USAGE_COLUMNS` order.
pub fn to_tuple<'py>(py: Python<'py>, e: &UsageEvent) -> PyResult<Bound<'py, PyTuple>> {
    let items: [Bound<'py, PyAny>; 16] = [
        e.event_id.as_str().into_pyobject(py)?.into_any(),
        e.request_id.as_str().into_pyobject(py)?.into_any(),
        (*e.tenant_id).into_pyobject(py)?.into_any(),
        (*e.key_id).into_pyobject(py)?.into_any(),
        e.model.as_str().into_pyobject(py)?.into_any(),
        e.worker.as_deref().into_pyobject(py)?.into_any(),
        e.endpoint.into_pyobject(py)?.into_any(),
        e.stream.into_pyobject(py)?.to_owned().into_any(),
        e.status.as_str().into_pyobject(py)?.into_any(),
        e.http_status.into_pyobject(py)?.into_any(),
        e.prompt_tokens.into_pyobject(py)?.into_any(),
        e.cached_tokens.into_pyobject(py)?.into_any(),
        e.completion_tokens.into_pyobject(py)?.into_any(),
        e.usage_source.as_str().into_pyobject(py)?.into_any(),
        e.started_at_ms.into_pyobject(py)?.into_any(),
        e.finished_at_ms.into_pyobject(py)?.into_any(),
    ];
    PyTuple::new(py, items)
}
