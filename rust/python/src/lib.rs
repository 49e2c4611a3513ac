//! `gateway._core`: the PyO3 boundary of the data plane. This file only registers.

mod errors;
mod gateway;
mod journal;
mod ledger_writer;
mod runtime;
mod sim;
mod usage;
mod usage_reader;

use pyo3::prelude::*;

/// The data plane allocates per request (bodies, headers, events); mimalloc's thread-local free
/// lists make that cheaper than glibc's malloc. Python's own objects keep Python's allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    runtime::init_logging();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::register(m)?;
    usage::register(m)?;
    m.add_class::<gateway::Gateway>()?;
    m.add_class::<sim::Simulator>()?;
    m.add_class::<ledger_writer::SqliteUsageWriter>()?;
    m.add_function(wrap_pyfunction!(journal::journal_records, m)?)?;
    Ok(())
}
