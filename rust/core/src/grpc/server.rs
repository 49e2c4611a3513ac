//! The gRPC listener: `gateway.v1.InferenceService` and `UsageService`, the standard health service
//! (`grpc.health.v1`: `""` SERVING while the gateway is ready, like `/ready`; the inference service
//! SERVING while it is ready and a worker is healthy) and server reflection (v1 and v1alpha, for grpcurl and
//! friends), on HTTP/2 over its own port. A handle like the HTTP server's: `bind` returns once
//! listening; `shutdown(grace)` stops accepting, lets calls finish for `grace`, then cuts the rest
//! (each cut call is metered as a cancelled one). Slow clients are bounded as on the HTTP
//! listener (`guard`), and a peer that stops answering HTTP/2 pings is dropped.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use super::codec::OversizeIsInvalidLayer;
use super::guard::{self, SlowClientLayer};
use super::pb;
use super::pb::inference_service_server::InferenceServiceServer;
use super::pb::usage_service_server::UsageServiceServer;
use super::service::InferenceApi;
use super::usage::UsageApi;
use crate::state::{AppState, Phase};

/// How often the server pings a connection, and how long it waits for the answer.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// The service name the health service reports on (and "" for the server as a whole).
const SERVICE: &str = "gateway.v1.InferenceService";

#[derive(Debug)]
pub struct GrpcServer {
    local_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    health: JoinHandle<()>,
}

impl GrpcServer {
    /// Binds `addr` (port 0 picks one) and serves on the current runtime.
    pub async fn bind(addr: SocketAddr, state: Arc<AppState>) -> io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let (reporter, health_service) = tonic_health::server::health_reporter();
        let health = tokio::spawn(report_health(reporter, state.clone()));
        let reflection = |builder: tonic_reflection::server::Builder<'static>| {
            builder
                .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let v1 = reflection(tonic_reflection::server::Builder::configure())
            .build_v1()
            .map_err(io::Error::other)?;
        let v1alpha = reflection(tonic_reflection::server::Builder::configure())
            .build_v1alpha()
            .map_err(io::Error::other)?;
        let (stop, stopped) = oneshot::channel::<()>();
        let config = state.config.load_full();
        let router = Server::builder()
            // A client that stops answering pings (frozen, or gone without a FIN) is dropped,
            // and its calls with it.
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .layer(OversizeIsInvalidLayer)
            .layer(SlowClientLayer {
                body_read_timeout: config.body_read_timeout(),
            })
            .add_service(health_service)
            .add_service(v1)
            .add_service(v1alpha)
            .add_service(UsageServiceServer::new(UsageApi::new(state.clone())))
            .add_service(
                // Room for a message whose OpenAI body is over the limit, so that the answer
                // is the HTTP API's (INVALID_ARGUMENT, naming the limit), not a transport error.
                InferenceServiceServer::new(InferenceApi::new(state.clone()))
                    .max_decoding_message_size(config.max_body_bytes.saturating_mul(2)),
            );
        let incoming = guard::incoming(listener, config.header_read_timeout());
        let task = tokio::spawn(async move {
            let stopped = async {
                let _ = stopped.await;
            };
            if let Err(error) = router.serve_with_incoming_shutdown(incoming, stopped).await {
                tracing::error!(%error, "the gRPC server failed");
            }
        });
        Ok(Self {
            local_addr,
            stop: Some(stop),
            task: Some(task),
            health,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, lets calls in flight finish for up to `grace`, then cuts the rest.
    pub async fn shutdown(mut self, grace: Duration) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(grace, &mut task).await.is_err()
        {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        self.health.abort();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Keeps the health service's answers current: the server (`""`) SERVING while the gateway is
/// ready, the inference service while it is ready and at least one worker is healthy. A change of
/// readiness is reported at once, a worker's health within a health interval.
async fn report_health(reporter: tonic_health::server::HealthReporter, state: Arc<AppState>) {
    let mut phase = state.readiness.subscribe();
    let status = |serving: bool| {
        if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        }
    };
    loop {
        let interval = state.config.load().routing.health_interval();
        let ready = *phase.borrow_and_update() == Phase::Serving;
        let healthy = state.registry.workers().iter().any(|w| w.is_healthy());
        reporter.set_service_status("", status(ready)).await;
        reporter
            .set_service_status(SERVICE, status(ready && healthy))
            .await;
        // The sender lives in `state`, so `changed` fails never; were it to, the sleep paces.
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            Ok(()) = phase.changed() => {}
        }
    }
}
