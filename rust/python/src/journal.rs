//! `journal_records`: what a usage journal directory holds, for `gateway journal dump` and tests.

use std::path::PathBuf;

use gateway_core::journal;
use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;

/// Every record in the journal `dir`, oldest first, each a JSON object (`r`: `start`, `progress`
/// or `end`; an end's members are its usage event's and its `seq`), then how many segments end
/// in a record cut short and how many records this build cannot read.
#[pyfunction]
pub fn journal_records(py: Python<'_>, dir: PathBuf) -> PyResult<(Vec<String>, usize, usize)> {
    let (records, torn, unreadable) = py
        .detach(|| journal::read_dir(&dir))
        .map_err(|e| PyOSError::new_err(format!("{}: {e}", dir.display())))?;
    let lines = records
        .iter()
        .map(|record| serde_json::to_string(record).unwrap_or_default())
        .collect();
    Ok((lines, torn, unreadable))
}
