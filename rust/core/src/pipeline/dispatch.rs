//! Admits a parsed request against its principal's quotas, starts metering it, and hands it to
//! the worker attempts.

use crate::auth::Principal;
use crate::error::ApiError;
use crate::metering::{Arrival, MeterGuard};
use crate::quota::{Estimate, Exceeded, QuotaError, RateHeaders};
use crate::request::InferenceRequest;
use crate::router::Availability;
use crate::scheduler::Claim;
use crate::state::AppState;
use crate::usage::EventIds;

use super::attempt;
use super::outcome::{Dispatched, Outcome};

/// Runs `request` for `principal` through the pipeline. The event id is minted before admission
/// (a quota's reservation is taken under it); the meter starts only once the request is admitted,
/// so a refused request leaves nothing in the journal (it is counted in `/metrics`).
/// `arrival` brings the gateway's time on the request so far and its root span, which learns
/// the tenant (never the key) and the model here.
pub async fn dispatch(
    state: &AppState,
    request: InferenceRequest,
    principal: &Principal,
    arrival: Arrival,
) -> Dispatched {
    let trace = &arrival.trace;
    if !trace.is_none() {
        trace.record("tenant.id", &*principal.tenant_id);
        trace.record("model", request.model.as_str());
        trace.record("endpoint", request.endpoint.as_str());
        trace.record("stream", request.stream);
    }
    if matches!(
        state.registry.availability(&request.model),
        Availability::Unknown
    ) {
        return refused(
            state,
            principal,
            trace,
            ApiError::ModelNotFound(request.model),
            None,
        );
    }
    let ids = EventIds::mint(request.client_request_id.as_deref());
    let estimate = Estimate::of(
        &request,
        state.registry.context_len(&request.model),
        state.quota.config().default_max_tokens,
    );
    let admission = crate::child_span!(trace, "gateway.admission");
    let admitted = state
        .quota
        .admit(principal, &request.model, &estimate, &ids.event_id)
        .await;
    drop(admission);
    let (reservation, rate) = match admitted {
        Ok(Some(reservation)) => {
            let headers = *reservation.headers();
            (Some(reservation), headers)
        }
        Ok(None) => (None, RateHeaders::default()),
        Err(error) => {
            let (error, headers) = refusal(error, &request.model, &estimate);
            return refused(state, principal, trace, error, headers);
        }
    };
    let request_id = ids.request_id.clone();
    let mut meter = MeterGuard::begin(state.meter.clone(), ids, principal, &request);
    meter.arrived(arrival);
    if let Some(reservation) = reservation {
        meter.attach(reservation);
    }
    let share = state.quota.queue_share(principal);
    let claim = Claim {
        tenant: principal.tenant_id.clone(),
        weight: share.weight,
        class: share.class(request.priority),
        cost: estimate.worst_tokens(),
    };
    Dispatched {
        request_id: Some(request_id),
        rate: Some(rate),
        outcome: attempt::run(state, &request, &claim, meter).await,
    }
}

/// Answers a refusal of `principal`'s request, counting it in `/metrics` and for the tenant.
fn refused(
    state: &AppState,
    principal: &Principal,
    trace: &tracing::Span,
    error: ApiError,
    rate: Option<RateHeaders>,
) -> Dispatched {
    state.meter.metrics().reject(&error);
    state.meter.refusals().add(principal, error.reason());
    crate::telemetry::record_refusal(trace, &error);
    Dispatched {
        request_id: None,
        rate,
        outcome: Outcome::Refused(error),
    }
}

/// The client's error for a quota's refusal, and the `x-ratelimit-*` headers as they stand.
fn refusal(error: QuotaError, model: &str, estimate: &Estimate) -> (ApiError, Option<RateHeaders>) {
    let whose = |on_key: bool| {
        if on_key {
            "this API key"
        } else {
            "this tenant"
        }
    };
    match error {
        QuotaError::ModelNotAllowed => (ApiError::ModelNotFound(model.to_owned()), None),
        QuotaError::NotPriced => (ApiError::ModelNotPriced(model.to_owned()), None),
        QuotaError::Unavailable => (ApiError::QuotaUnavailable, None),
        QuotaError::TooManySequences { limit, on_key } => (
            ApiError::TooManySequences {
                sequences: estimate.sequences,
                limit,
                whose: whose(on_key),
            },
            None,
        ),
        QuotaError::Exceeded {
            refusal,
            on_key,
            limit,
            period,
        } => {
            let whose = whose(on_key);
            let retry_after = refusal.retry_after;
            let error = match refusal.exceeded {
                Exceeded::Concurrency => ApiError::ConcurrencyLimited {
                    whose,
                    limit,
                    retry_after,
                },
                Exceeded::Requests | Exceeded::Tokens => ApiError::RateLimited {
                    whose,
                    limit,
                    unit: if refusal.exceeded == Exceeded::Requests {
                        "requests"
                    } else {
                        "tokens"
                    },
                    retry_after,
                },
                Exceeded::TokenBudget => ApiError::TokenBudgetExceeded {
                    worst: estimate.worst_tokens(),
                    left: refusal.left,
                    fits: estimate.max_tokens_within(refusal.left),
                    whose,
                    period: period.as_str(),
                    limit,
                    retry_after,
                },
                Exceeded::MoneyBudget => ApiError::MoneyBudgetExceeded {
                    left: refusal.left,
                    whose,
                    period: period.as_str(),
                    limit,
                    retry_after,
                },
            };
            (error, Some(refusal.headers))
        }
    }
}
