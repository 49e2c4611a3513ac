//! One worker as the router sees it: address, health, models served and requests in flight.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use http::{HeaderValue, Uri};
use serde_json::value::RawValue;

use crate::api::request::Endpoint;

/// A model as a worker lists it in `/v1/models`: its id and the card exactly as sent.
#[derive(Debug)]
pub struct ModelCard {
    pub id: String,
    pub card: Box<RawValue>,
}

#[derive(Debug)]
pub struct Worker {
    pub url: Arc<str>,
    /// `Bearer <api_key>` when the worker has a key of its own.
    pub(crate) authorization: Option<HeaderValue>,
    chat_uri: Uri,
    completions_uri: Uri,
    pub(crate) health_uri: Uri,
    pub(crate) models_uri: Uri,
    // Relaxed everywhere below: each atomic is an independent hint read by the routing policy;
    // nothing else is published through it.
    healthy: AtomicBool,
    outstanding: AtomicUsize,
    /// The models of the last successful probe, kept while the worker is down so that a request
    /// for its model is answered 503 (temporarily unavailable), not 404 (no such model).
    models: ArcSwap<Vec<ModelCard>>,
    /// Whether a probe has ever read this worker's model list.
    listed: AtomicBool,
}

impl Worker {
    pub fn new(url: &str) -> Result<Self, http::uri::InvalidUri> {
        let base = url.trim_end_matches('/');
        let uri = |path: &str| format!("{base}{path}").parse::<Uri>();
        Ok(Self {
            url: base.into(),
            authorization: None,
            chat_uri: uri(Endpoint::ChatCompletions.path())?,
            completions_uri: uri(Endpoint::Completions.path())?,
            health_uri: uri("/health")?,
            models_uri: uri("/v1/models")?,
            healthy: AtomicBool::new(false),
            outstanding: AtomicUsize::new(0),
            models: ArcSwap::from_pointee(Vec::new()),
            listed: AtomicBool::new(false),
        })
    }

    /// Sends `Authorization: Bearer <api_key>` to this worker; a key that is not a valid header
    /// value is refused.
    pub fn with_api_key(mut self, api_key: &str) -> Result<Self, http::header::InvalidHeaderValue> {
        let mut value = HeaderValue::from_str(&format!("Bearer {api_key}"))?;
        value.set_sensitive(true);
        self.authorization = Some(value);
        Ok(self)
    }

    pub fn uri(&self, endpoint: Endpoint) -> Uri {
        match endpoint {
            Endpoint::ChatCompletions => self.chat_uri.clone(),
            Endpoint::Completions => self.completions_uri.clone(),
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn set_healthy(&self, healthy: bool) {
        let was = self.healthy.swap(healthy, Ordering::Relaxed);
        if was != healthy {
            tracing::info!(worker = %self.url, healthy, "worker health changed");
        }
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    pub fn serves(&self, model: &str) -> bool {
        self.models.load().iter().any(|m| m.id == model)
    }

    pub fn models(&self) -> arc_swap::Guard<Arc<Vec<ModelCard>>> {
        self.models.load()
    }

    pub fn set_models(&self, models: Vec<ModelCard>) {
        self.models.store(Arc::new(models));
        self.listed.store(true, Ordering::Relaxed);
    }

    /// Whether its model list is known: a worker still starting up (vLLM takes a while to load)
    /// may serve any model.
    pub fn has_listed(&self) -> bool {
        self.listed.load(Ordering::Relaxed)
    }

    /// Counts a request against this worker until the returned guard drops.
    pub fn begin(self: &Arc<Self>) -> Outstanding {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        Outstanding(self.clone())
    }
}

/// One request in flight on a worker.
#[derive(Debug)]
pub struct Outstanding(Arc<Worker>);

impl Outstanding {
    pub fn worker(&self) -> &Arc<Worker> {
        &self.0
    }
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}
