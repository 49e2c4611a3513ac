//! `gateway._core`: the PyO3 boundary of the data plane. This file only registers.

mod errors;
mod gateway;
mod runtime;
mod sim;
mod usage;

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    runtime::init_logging();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::register(m)?;
    usage::register(m)?;
    m.add_class::<gateway::Gateway>()?;
    m.add_class::<sim::Simulator>()?;
    Ok(())
}
