//! `Gateway`: the data plane's handle in Python.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use gateway_core::Control;
use gateway_core::config::GatewayConfig;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::errors::CoreError;
use crate::runtime::runtime;
use crate::usage;

#[pyclass(frozen, module = "gateway._core")]
pub struct Gateway {
    /// For calls that need no lock (keys, usage): they never wait on start or shutdown.
    control: Control,
    inner: Mutex<gateway_core::Gateway>,
}

#[pymethods]
impl Gateway {
    #[new]
    fn new(config_json: &str) -> PyResult<Self> {
        let config = GatewayConfig::from_json(config_json).map_err(CoreError::from)?;
        let inner = gateway_core::Gateway::new(config).map_err(CoreError::from)?;
        Ok(Self {
            control: inner.control(),
            inner: Mutex::new(inner),
        })
    }

    fn start(&self, py: Python<'_>) -> PyResult<(String, u16)> {
        let runtime = runtime()?;
        let addr = py.detach(|| {
            let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            runtime.block_on(inner.start())
        });
        let addr = addr.map_err(CoreError::from)?;
        Ok((addr.ip().to_string(), addr.port()))
    }

    /// The gRPC API's bound (host, port), once started with one.
    fn grpc_address(&self) -> Option<(String, u16)> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner
            .grpc_addr()
            .map(|addr| (addr.ip().to_string(), addr.port()))
    }

    /// Installs `reader(tenant_id, after, limit) -> str` for the gRPC usage service.
    fn set_usage_reader(&self, reader: Py<PyAny>) -> bool {
        self.control
            .set_usage_reader(Arc::new(crate::usage_reader::PyUsageReader::new(reader)))
    }

    fn set_keys(&self, snapshot_json: &str) -> PyResult<usize> {
        Ok(self
            .control
            .set_keys(snapshot_json)
            .map_err(CoreError::from)?)
    }

    fn set_policies(&self, snapshot_json: &str) -> PyResult<usize> {
        Ok(self
            .control
            .set_policies(snapshot_json)
            .map_err(CoreError::from)?)
    }

    fn seed_spent(&self, entries_json: &str) -> PyResult<usize> {
        Ok(self
            .control
            .seed_spent(entries_json)
            .map_err(CoreError::from)?)
    }

    #[pyo3(signature = (max_events = 4096))]
    fn drain_usage<'py>(
        &self,
        py: Python<'py>,
        max_events: usize,
    ) -> PyResult<Bound<'py, PyTuple>> {
        usage::to_python(py, &self.control.drain_usage(max_events))
    }

    fn usage_committed(&self, seq: u64) {
        self.control.usage_committed(seq);
    }

    fn pending_usage(&self) -> usize {
        self.control.pending_usage()
    }

    /// Applies what can change while serving of the configuration document `config_json`;
    /// returns what it did as JSON (`gateway_core::Reloaded`). Raises `ConfigError`, with
    /// nothing applied, when the document is invalid.
    fn reload(&self, py: Python<'_>, config_json: &str) -> PyResult<String> {
        let config = GatewayConfig::from_json(config_json).map_err(CoreError::from)?;
        let runtime = runtime()?;
        let control = self.control.clone();
        let reloaded = py
            .detach(|| runtime.block_on(control.reload(config)))
            .map_err(CoreError::from)?;
        Ok(serde_json::to_string(&reloaded).map_err(CoreError::from)?)
    }

    fn workers(&self) -> PyResult<String> {
        Ok(serde_json::to_string(&self.control.workers()).map_err(CoreError::from)?)
    }

    fn queues(&self) -> PyResult<String> {
        Ok(serde_json::to_string(&self.control.queues()).map_err(CoreError::from)?)
    }

    fn drain_refusals(&self) -> PyResult<String> {
        Ok(serde_json::to_string(&self.control.drain_refusals()).map_err(CoreError::from)?)
    }

    /// Turns readiness off while both listeners go on serving; true the first time only.
    fn drain(&self) -> bool {
        self.control.drain()
    }

    fn shutdown(&self, py: Python<'_>, grace_s: f64) -> PyResult<()> {
        let runtime = runtime()?;
        let grace = Duration::try_from_secs_f64(grace_s.max(0.0)).unwrap_or(Duration::ZERO);
        py.detach(|| {
            let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            runtime.block_on(inner.shutdown(grace))
        })
        .map_err(CoreError::from)?;
        Ok(())
    }
}
