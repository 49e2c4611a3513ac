//! Runs an axum `Router` on a bound TCP listener until asked to stop, then drains.
//!
//! Shared by the gateway and the simulator; it knows nothing about either. Each connection is
//! served by hyper's HTTP/1 server with a header-read timeout (a client that never finishes its
//! headers does not hold a connection forever) and runs as a task the server owns, so that a
//! shutdown whose grace runs out cuts every connection still open: their responses are dropped,
//! which settles their metering, before `shutdown` returns.

use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// How long a client may take to send a request's headers, unless the caller says otherwise.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A running HTTP server. Dropping the handle without `shutdown` aborts the server.
#[derive(Debug)]
pub struct ServerHandle {
    local_addr: SocketAddr,
    /// `Some(grace)` once a shutdown is asked for.
    stop: watch::Sender<Option<Duration>>,
    task: Option<JoinHandle<()>>,
}

impl ServerHandle {
    /// Binds `addr` (port 0 picks a free port) and starts serving `app` on the current runtime;
    /// a client that takes longer than `header_read_timeout` to send a request's headers (or
    /// leaves a keep-alive connection idle that long) is disconnected.
    pub async fn bind(
        addr: SocketAddr,
        app: Router,
        header_read_timeout: Duration,
    ) -> io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        Self::serve(listener, app, header_read_timeout)
    }

    /// Serves `app` on an already bound listener.
    pub fn serve(
        listener: TcpListener,
        app: Router,
        header_read_timeout: Duration,
    ) -> io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let (stop, stopped) = watch::channel(None);
        let task = tokio::spawn(accept_loop(listener, app, header_read_timeout, stopped));
        Ok(Self {
            local_addr,
            stop,
            task: Some(task),
        })
    }

    /// The address actually bound (the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, lets in-flight requests finish for up to `grace`, then cuts the rest.
    /// When this returns, no connection of this server is left running.
    pub async fn shutdown(mut self, grace: Duration) -> io::Result<()> {
        let _ = self.stop.send(Some(grace));
        if let Some(task) = self.task.take() {
            task.await.map_err(io::Error::other)?;
        }
        Ok(())
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    app: Router,
    header_read_timeout: Duration,
    mut stopped: watch::Receiver<Option<Duration>>,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let mut connections = JoinSet::new();
    let grace = loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => {
                    let connection = serve_connection(&builder, socket, app.clone(), stopped.clone());
                    connections.spawn(connection);
                }
                // Out of file descriptors and the like: back off instead of spinning.
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            // Reap finished connections so the set does not grow with the server's age.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            changed = stopped.changed() => match (changed, *stopped.borrow()) {
                (Ok(()), Some(grace)) => break grace,
                (Ok(()), None) => {}
                // The handle is gone: stop at once.
                (Err(_), _) => break Duration::ZERO,
            },
        }
    };
    drop(listener);
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, drained).await.is_err() {
        connections.abort_all();
        while connections.join_next().await.is_some() {}
    }
}

/// Serves one connection; on shutdown it finishes the request in flight and then closes.
fn serve_connection(
    builder: &http1::Builder,
    socket: TcpStream,
    app: Router,
    mut stopped: watch::Receiver<Option<Duration>>,
) -> impl Future<Output = ()> + use<> {
    // Best effort: a socket that refuses NODELAY still serves correctly.
    let _ = socket.set_nodelay(true);
    let connection = builder.serve_connection(TokioIo::new(socket), TowerToHyperService::new(app));
    async move {
        let mut connection = pin!(connection);
        tokio::select! {
            _ = connection.as_mut() => return,
            _ = stopped.wait_for(Option::is_some) => connection.as_mut().graceful_shutdown(),
        }
        let _ = connection.await;
    }
}
