//! `gateway.v1.UsageService`: a tenant's own usage events over gRPC. The ledger belongs to the
//! control plane, so the core reads it through a `UsageReader` the control plane installs (the
//! billing API's own page of events, as JSON); without one, the service is UNAVAILABLE.

use std::sync::Arc;

use serde::Deserialize;
use tonic::{Request, Response, Status};

use super::pb;
use super::pb::usage_service_server::UsageService;
use crate::error::ApiError;
use crate::ledger::UsageReadError;
use crate::state::AppState;

/// Events per page when a call asks for 0, and the most it may ask for.
const DEFAULT_LIMIT: u32 = 100;
/// An event is under 1 KB in protobuf, the strings a client sets included (request id at most
/// 256 bytes, model 512): a page of this many stays under gRPC's default 4 MiB message.
const MAX_LIMIT: u32 = 4_000;

#[derive(Deserialize)]
struct Page {
    data: Vec<Event>,
    has_more: bool,
    next_cursor: String,
}

#[derive(Deserialize)]
struct Event {
    id: String,
    request_id: String,
    api_key_id: String,
    model: String,
    endpoint: String,
    stream: bool,
    status: String,
    http_status: u32,
    usage: Tokens,
    usage_source: String,
    started_at_ms: i64,
    finished_at_ms: i64,
    recorded_at_ms: i64,
    price_effective_at: Option<i64>,
    priced: bool,
    cost_micros: Option<i64>,
    currency: String,
}

#[derive(Deserialize)]
struct Tokens {
    prompt_tokens: u64,
    cached_tokens: u64,
    completion_tokens: u64,
}

impl From<Event> for pb::UsageEvent {
    fn from(e: Event) -> Self {
        Self {
            id: e.id,
            request_id: e.request_id,
            api_key_id: e.api_key_id,
            model: e.model,
            endpoint: e.endpoint,
            stream: e.stream,
            status: e.status,
            tokens: Some(pb::BilledTokens {
                prompt_tokens: e.usage.prompt_tokens,
                cached_tokens: e.usage.cached_tokens,
                completion_tokens: e.usage.completion_tokens,
            }),
            usage_source: e.usage_source,
            started_at_ms: e.started_at_ms,
            finished_at_ms: e.finished_at_ms,
            priced: e.priced,
            cost_micros: e.cost_micros,
            currency: e.currency,
            http_status: e.http_status,
            recorded_at_ms: e.recorded_at_ms,
            price_effective_at: e.price_effective_at,
        }
    }
}

#[derive(Debug, Clone)]
pub struct UsageApi {
    state: Arc<AppState>,
}

impl UsageApi {
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl UsageService for UsageApi {
    async fn list_usage_events(
        &self,
        request: Request<pb::ListUsageEventsRequest>,
    ) -> Result<Response<pb::ListUsageEventsResponse>, Status> {
        let headers = request.metadata().clone().into_headers();
        let principal = match self.state.keys.authenticate(&headers) {
            Ok(principal) => principal,
            Err(error) => {
                self.state.meter.metrics().reject(&error);
                return Err(unauthenticated(&error));
            }
        };
        let message = request.into_inner();
        let limit = match message.limit {
            0 => DEFAULT_LIMIT,
            n if n <= MAX_LIMIT => n,
            n => {
                return Err(Status::invalid_argument(format!(
                    "`limit` must be 1 to {MAX_LIMIT}, not {n}"
                )));
            }
        };
        let reader = self
            .state
            .usage_reader
            .get()
            .cloned()
            .ok_or_else(|| Status::unavailable("usage is not served by this gateway"))?;
        let tenant = principal.tenant_id.clone();
        let after = (!message.after.is_empty()).then_some(message.after);
        let page =
            tokio::task::spawn_blocking(move || reader.events(&tenant, after.as_deref(), limit))
                .await
                .map_err(|_| Status::internal("reading usage failed"))?
                .map_err(|error| match error {
                    UsageReadError::InvalidCursor(message) => Status::invalid_argument(message),
                    UsageReadError::Unavailable(_) => Status::unavailable(error.to_string()),
                })?;
        let page: Page = serde_json::from_str(&page)
            .map_err(|error| Status::internal(format!("unreadable usage page: {error}")))?;
        Ok(Response::new(pb::ListUsageEventsResponse {
            events: page.data.into_iter().map(pb::UsageEvent::from).collect(),
            has_more: page.has_more,
            next_cursor: page.next_cursor,
        }))
    }
}

fn unauthenticated(error: &ApiError) -> Status {
    Status::unauthenticated(error.to_string())
}
