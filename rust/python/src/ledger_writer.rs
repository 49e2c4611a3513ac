//! `SqliteUsageWriter`: the core's SQLite usage writer (`gateway_core::ledger::sqlite`) for
//! `gateway.ledger.usage.insert_usage_events`, which hands it `UsageEvent`s. The events' strings
//! are borrowed from the Python objects, which the call keeps alive (Python never changes a
//! `str`), and the write runs without the GIL.

use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use gateway_core::ledger::sqlite::{Event, UsageWriter, Value, WriteError};
use pyo3::Borrowed;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};

use crate::errors::{LedgerIntegrityError, LedgerWriteError};
use crate::usage::{self, Field};

#[pyclass(module = "gateway._core", frozen)]
pub struct SqliteUsageWriter {
    writer: Mutex<Option<UsageWriter>>,
    fields: Vec<Field>,
}

#[pymethods]
impl SqliteUsageWriter {
    /// Opens the migrated ledger at `path`; a write waits up to `busy_timeout_ms` for the lock.
    #[new]
    fn new(py: Python<'_>, path: PathBuf, busy_timeout_ms: u64) -> PyResult<Self> {
        let fields = usage::fields(py)?.to_vec();
        let writer = py
            .detach(|| UsageWriter::open(&path, Duration::from_millis(busy_timeout_ms)))
            .map_err(to_python_error)?;
        Ok(Self {
            writer: Mutex::new(Some(writer)),
            fields,
        })
    }

    /// Stores `events` in one transaction, recorded at `recorded_at_ms`; returns how many were
    /// new, and the conflicts as `(kept, new, kept_is_stored)`, each event as its stored columns.
    fn insert<'py>(
        &self,
        py: Python<'py>,
        events: &Bound<'py, PyList>,
        recorded_at_ms: i64,
    ) -> PyResult<(usize, Bound<'py, PyList>)> {
        // An event the schema cannot take fails the batch before it starts, as the database
        // would have failed it.
        let refused = |index: usize, error: PyErr| {
            LedgerIntegrityError::new_err(format!("usage event {index} of the batch: {error}"))
        };
        let tuples = events
            .iter()
            .enumerate()
            .map(|(index, event)| {
                event
                    .cast_into::<PyTuple>()
                    .map_err(|error| refused(index, error.into()))
            })
            .collect::<PyResult<Vec<_>>>()?;
        let events = tuples
            .iter()
            .enumerate()
            .map(|(index, tuple)| event(&self.fields, tuple).map_err(|error| refused(index, error)))
            .collect::<PyResult<Vec<_>>>()?;
        let written = py
            .detach(|| {
                let mut writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
                writer
                    .as_mut()
                    .map(|writer| writer.write(&events, recorded_at_ms))
            })
            .ok_or_else(|| LedgerWriteError::new_err("the usage writer is closed"))?
            .map_err(to_python_error)?;
        let conflicts = written
            .conflicts
            .into_iter()
            .map(|conflict| {
                (
                    row(py, conflict.kept)?,
                    row(py, conflict.new)?,
                    conflict.stored,
                )
                    .into_pyobject(py)
            })
            .collect::<PyResult<Vec<_>>>()?;
        Ok((written.inserted, PyList::new(py, conflicts)?))
    }

    /// Closes the connection; later writes fail.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| {
            let writer = self
                .writer
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            writer.map_or(Ok(()), UsageWriter::close)
        })
        .map_err(to_python_error)
    }
}

fn to_python_error(error: WriteError) -> PyErr {
    if error.is_integrity() {
        LedgerIntegrityError::new_err(error.to_string())
    } else {
        LedgerWriteError::new_err(error.to_string())
    }
}

/// One `UsageEvent` (a tuple of `fields`), its strings borrowed from it.
fn event<'a>(fields: &[Field], tuple: &'a Bound<'_, PyTuple>) -> PyResult<Event<'a>> {
    if tuple.len() != fields.len() {
        return Err(PyValueError::new_err(format!(
            "a usage event has {} fields, not {}",
            fields.len(),
            tuple.len()
        )));
    }
    let mut event = Event::default();
    for (index, field) in fields.iter().enumerate() {
        let value: Borrowed<'a, '_, PyAny> = tuple.get_borrowed_item(index)?;
        match field {
            Field::EventId => event.event_id = value.extract()?,
            Field::RequestId => event.request_id = value.extract()?,
            Field::TenantId => event.tenant_id = value.extract()?,
            Field::KeyId => event.key_id = value.extract()?,
            Field::Model => event.model = value.extract()?,
            Field::Worker => event.worker = value.extract()?,
            Field::Endpoint => event.endpoint = value.extract()?,
            Field::Stream => event.stream = value.extract()?,
            Field::Status => event.status = value.extract()?,
            Field::HttpStatus => event.http_status = value.extract()?,
            Field::PromptTokens => event.prompt_tokens = value.extract()?,
            Field::CachedTokens => event.cached_tokens = value.extract()?,
            Field::CompletionTokens => event.completion_tokens = value.extract()?,
            Field::UsageSource => event.usage_source = value.extract()?,
            Field::StartedAtMs => event.started_at_ms = value.extract()?,
            Field::FinishedAtMs => event.finished_at_ms = value.extract()?,
        }
    }
    Ok(event)
}

/// A stored column's value as Python's `sqlite3` gives it.
fn python(py: Python<'_>, value: Value) -> PyResult<Bound<'_, PyAny>> {
    Ok(match value {
        Value::Null => py.None().into_bound(py),
        Value::Integer(n) => n.into_pyobject(py)?.into_any(),
        Value::Real(x) => x.into_pyobject(py)?.into_any(),
        Value::Text(s) => s.into_pyobject(py)?.into_any(),
        Value::Blob(b) => b.into_pyobject(py)?.into_any(),
    })
}

/// An event's stored columns as a tuple.
fn row<'py>(py: Python<'py>, values: Vec<Value>) -> PyResult<Bound<'py, PyTuple>> {
    PyTuple::new(
        py,
        values
            .into_iter()
            .map(|value| python(py, value))
            .collect::<PyResult<Vec<_>>>()?,
    )
}
