//! Runs an axum `Router` on a bound TCP listener until asked to stop, then drains.
//!
//! Shared by the gateway and the simulator; it knows nothing about either.

use std::future::IntoFuture;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A running HTTP server. Dropping the handle without `shutdown` aborts the server.
#[derive(Debug)]
pub struct ServerHandle {
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<io::Result<()>>>,
}

impl ServerHandle {
    /// Binds `addr` (port 0 picks a free port) and starts serving `app` on the current runtime.
    pub async fn bind(addr: SocketAddr, app: Router) -> io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        Ok(Self::serve(listener, app))
    }

    /// Serves `app` on an already bound listener. Every accepted socket gets `TCP_NODELAY`:
    /// SSE frames are small and must not wait for Nagle.
    pub fn serve(listener: TcpListener, app: Router) -> Self {
        let local_addr = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let (stop, mut stopped) = watch::channel(false);
        let listener = listener.tap_io(|socket| {
            // Best effort: a socket that refuses NODELAY still serves correctly.
            let _ = socket.set_nodelay(true);
        });
        let server = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        });
        let task = tokio::spawn(server.into_future());
        Self {
            local_addr,
            stop,
            task: Some(task),
        }
    }

    /// The address actually bound (the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, lets in-flight requests finish for up to `grace`, then drops whatever is
    /// still open (dropped responses settle their own metering as cancelled).
    pub async fn shutdown(mut self, grace: Duration) -> io::Result<()> {
        let _ = self.stop.send(true);
        let Some(mut task) = self.task.take() else {
            return Ok(());
        };
        match tokio::time::timeout(grace, &mut task).await {
            Ok(joined) => joined.unwrap_or_else(|e| Err(io::Error::other(e))),
            Err(_elapsed) => {
                task.abort();
                let _ = task.await;
                Ok(())
            }
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
