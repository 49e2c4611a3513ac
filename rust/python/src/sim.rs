//! `Simulator`: `gateway sim`'s handle in Python.

use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use gateway_core::serve::ServerHandle;
use gateway_sim::{SimConfig, app};
use pyo3::prelude::*;

use crate::errors::CoreError;
use crate::runtime::runtime;

#[pyclass(frozen, module = "gateway._core")]
pub struct Simulator {
    config: SimConfig,
    listen: SocketAddr,
    server: Mutex<Option<ServerHandle>>,
}

#[pymethods]
impl Simulator {
    #[new]
    fn new(config_json: &str, listen: &str) -> PyResult<Self> {
        let config: SimConfig = serde_json::from_str(config_json).map_err(CoreError::from)?;
        let listen = listen
            .parse()
            .map_err(|e| CoreError::Config(format!("listen: {listen:?}: {e}")))?;
        Ok(Self {
            config,
            listen,
            server: Mutex::new(None),
        })
    }

    fn start(&self, py: Python<'_>) -> PyResult<(String, u16)> {
        let runtime = runtime()?;
        let addr = py.detach(|| {
            let mut server = self.server.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(server) = server.as_ref() {
                return Ok(server.local_addr());
            }
            let handle = runtime.block_on(ServerHandle::bind(
                self.listen,
                app(self.config.clone()),
                gateway_core::serve::HEADER_READ_TIMEOUT,
            ))?;
            let addr = handle.local_addr();
            *server = Some(handle);
            Ok::<_, std::io::Error>(addr)
        });
        let addr = addr.map_err(CoreError::from)?;
        Ok((addr.ip().to_string(), addr.port()))
    }

    fn shutdown(&self, py: Python<'_>, grace_s: f64) -> PyResult<()> {
        let runtime = runtime()?;
        let grace = Duration::try_from_secs_f64(grace_s.max(0.0)).unwrap_or(Duration::ZERO);
        py.detach(|| {
            let server = self
                .server
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            match server {
                Some(server) => runtime.block_on(server.shutdown(grace)),
                None => Ok(()),
            }
        })
        .map_err(CoreError::from)?;
        Ok(())
    }
}
