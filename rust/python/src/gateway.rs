//! `Gateway`: the data plane's handle in Python.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use gateway_core::config::GatewayConfig;
use gateway_core::state::AppState;
use pyo3::prelude::*;
use pyo3::types::PyList;

use crate::errors::CoreError;
use crate::runtime::runtime;
use crate::usage;

#[pyclass(frozen, module = "gateway._core")]
pub struct Gateway {
    /// For calls that need no lock (keys, usage): they never wait on start or shutdown.
    state: Arc<AppState>,
    inner: Mutex<gateway_core::Gateway>,
}

#[pymethods]
impl Gateway {
    #[new]
    fn new(config_json: &str) -> PyResult<Self> {
        let config = GatewayConfig::from_json(config_json).map_err(CoreError::from)?;
        let inner = gateway_core::Gateway::new(config).map_err(CoreError::from)?;
        Ok(Self {
            state: inner.state().clone(),
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
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.set_usage_reader(Arc::new(crate::usage_reader::PyUsageReader::new(reader)))
    }

    fn set_keys(&self, snapshot_json: &str) -> PyResult<usize> {
        Ok(self
            .state
            .keys
            .replace_json(snapshot_json)
            .map_err(CoreError::from)?)
    }

    fn set_policies(&self, snapshot_json: &str) -> PyResult<usize> {
        Ok(self
            .state
            .quota
            .set_policies_json(snapshot_json)
            .map_err(CoreError::from)?)
    }

    fn seed_spent(&self, entries_json: &str) -> PyResult<usize> {
        Ok(self
            .state
            .quota
            .seed_json(entries_json)
            .map_err(CoreError::from)?)
    }

    #[pyo3(signature = (max_events = 4096))]
    fn drain_usage<'py>(&self, py: Python<'py>, max_events: usize) -> PyResult<Bound<'py, PyList>> {
        let events = self.state.meter.drain(max_events);
        let rows = events
            .iter()
            .map(|event| usage::to_tuple(py, event))
            .collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, rows)
    }

    fn usage_committed(&self, count: usize) {
        self.state.meter.committed(count);
    }

    fn pending_usage(&self) -> usize {
        self.state.meter.pending()
    }

    fn workers(&self) -> PyResult<String> {
        let workers: Vec<serde_json::Value> = self
            .state
            .registry
            .workers()
            .iter()
            .map(|w| {
                serde_json::json!({
                    "url": &*w.url,
                    "healthy": w.is_healthy(),
                    "outstanding": w.outstanding(),
                    "models": w.models().iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
                })
            })
            .collect();
        Ok(serde_json::to_string(&workers).map_err(CoreError::from)?)
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
