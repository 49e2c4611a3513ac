//! Coalescing (`routing.coalesce_window_us`): compatible non-streaming `/v1/completions`
//! requests placed on one worker within a short window go to it as one call with a list of
//! prompts, and each client gets its own answer cut back out of the worker's (`batch`).
//!
//! Compatible means one API key, one model, and every member of the body but `prompt` the same,
//! byte for byte. Each request has been admitted, queued and placed on its own, and keeps its own
//! worker slot, meter and quota reservation: coalescing only changes how its prompt travels. The
//! first request of a batch starts its window; the batch goes when the window ends or when it
//! holds `routing.coalesce_max_prompts` prompts. A client that leaves before its batch goes is
//! left out of it. A call that fails before answering fails each of its requests (which the
//! pipeline retries on their own); a call the worker refuses, or whose answer cannot be split,
//! sends each request on its own, so that no client gets another client's error.

mod batch;

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use http::response::Parts;
use tokio::sync::oneshot;

use batch::Share;
pub use batch::{Part, PromptKind};

use crate::metering::Meter;
use crate::request::Endpoint;
use crate::router::Worker;
use crate::upstream::{self, Upstream, UpstreamError};

/// What became of a request that joined a batch.
#[derive(Debug)]
pub enum Joined {
    /// Its own answer, cut from the call's.
    Answer { parts: Parts, body: Bytes },
    /// It is to go on its own: it was alone in its batch, or the call's answer was not one its
    /// clients could be given.
    Alone,
    /// The call failed before the worker answered.
    Failed(UpstreamError),
}

/// Requests that may share a call: same worker, same key, same prompt kind, same rest of body.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    worker: Arc<str>,
    key_id: Arc<str>,
    kind: PromptKind,
    rest: Bytes,
}

#[derive(Debug)]
struct Member {
    part: Part,
    share: Share,
    /// The client's `X-Request-Id`, echoed in its answer's header if the worker echoes it.
    request_id: Option<String>,
    reply: oneshot::Sender<Joined>,
}

/// A batch whose window is open.
#[derive(Debug)]
struct Open {
    /// Tells this batch from a later one under the same key when its window closes.
    id: u64,
    prompts: usize,
    members: Vec<Member>,
}

/// What a batch's call needs besides its members.
#[derive(Clone)]
pub struct Route {
    pub upstream: Upstream,
    pub worker: Arc<Worker>,
    pub meter: Arc<Meter>,
}

/// The open batches of every worker.
#[derive(Debug)]
pub struct Coalescer {
    /// The window of every model without one of its own; zero is off.
    window: Duration,
    by_model: BTreeMap<String, Duration>,
    max_prompts: usize,
    open: Mutex<HashMap<Key, Open>>,
    next_id: AtomicU64,
}

impl Coalescer {
    /// `None` when no model has a window: coalescing is off.
    pub fn new(
        (window, by_model): (Duration, BTreeMap<String, Duration>),
        max_prompts: u32,
    ) -> Option<Arc<Self>> {
        if window.is_zero() && by_model.values().all(Duration::is_zero) {
            return None;
        }
        Some(Arc::new(Self {
            window,
            by_model,
            max_prompts: usize::try_from(max_prompts).unwrap_or(usize::MAX).max(2),
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        }))
    }

    /// `model`'s window, `None` if its requests are not coalesced.
    fn window(&self, model: &str) -> Option<Duration> {
        let window = self.by_model.get(model).copied().unwrap_or(self.window);
        (!window.is_zero()).then_some(window)
    }

    /// `body` (a non-streaming completions request's for `model`, with `n` choices a prompt) as
    /// a part of a batch, or `None` if it goes on its own.
    pub fn part(&self, model: &str, body: &[u8], n: u64) -> Option<Part> {
        let window = self.window(model)?;
        Part::of(body, n, self.max_prompts).map(|part| part.within(window))
    }

    /// Adds `part`, of a request on `key_id` placed on `route.worker`, to that worker's open batch
    /// for it (opening one if there is none) and waits for its share of the call.
    pub async fn join(
        self: &Arc<Self>,
        route: &Route,
        key_id: &str,
        request_id: Option<&str>,
        part: Part,
    ) -> Joined {
        let key = Key {
            worker: route.worker.url.clone(),
            key_id: key_id.into(),
            kind: part.kind,
            rest: part.rest.clone(),
        };
        let (reply, answer) = oneshot::channel();
        let window = part.window;
        let member = Member {
            share: Share {
                prompts: part.prompts.len(),
                id: response_id(request_id),
            },
            part,
            request_id: request_id.map(str::to_owned),
            reply,
        };
        let (full, opened) = self.add(&key, member);
        if let Some(members) = full {
            tokio::spawn(send(route.clone(), key.rest.clone(), members));
        }
        if let Some(id) = opened {
            let this = self.clone();
            let route = route.clone();
            tokio::spawn(async move {
                tokio::time::sleep(window).await;
                if let Some(members) = this.close(&key, id) {
                    send(route, key.rest, members).await;
                }
            });
        }
        answer.await.unwrap_or(Joined::Alone)
    }

    /// Adds `member` under `key`: a batch that is now full (or that it would overflow) comes
    /// back to be sent, and the id of a batch it opened, whose window the caller times.
    fn add(&self, key: &Key, member: Member) -> (Option<Vec<Member>>, Option<u64>) {
        let prompts = member.share.prompts;
        let mut open = self.lock();
        match open.entry(key.clone()) {
            Entry::Occupied(mut entry) if entry.get().prompts + prompts <= self.max_prompts => {
                let batch = entry.get_mut();
                batch.prompts += prompts;
                batch.members.push(member);
                let full = batch.prompts >= self.max_prompts;
                (full.then(|| entry.remove().members), None)
            }
            Entry::Occupied(mut entry) => {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let full = std::mem::replace(entry.get_mut(), Open::of(id, member));
                (Some(full.members), Some(id))
            }
            Entry::Vacant(entry) => {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                entry.insert(Open::of(id, member));
                (None, Some(id))
            }
        }
    }

    /// The members of batch `id` as its window closes, unless it has already gone (full).
    fn close(&self, key: &Key, id: u64) -> Option<Vec<Member>> {
        let mut open = self.lock();
        match open.entry(key.clone()) {
            Entry::Occupied(entry) if entry.get().id == id => Some(entry.remove().members),
            _ => None,
        }
    }

    /// The open batches; no code panics while holding them, so a poisoned lock is taken as is.
    fn lock(&self) -> MutexGuard<'_, HashMap<Key, Open>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Open {
    fn of(id: u64, member: Member) -> Self {
        Self {
            id,
            prompts: member.share.prompts,
            members: vec![member],
        }
    }
}

/// The id vLLM would give the request's answer: `cmpl-` and its `X-Request-Id`, else a fresh
/// one (vLLM's are random hex).
fn response_id(request_id: Option<&str>) -> String {
    match request_id {
        Some(id) => format!("cmpl-{id}"),
        None => format!("cmpl-{}", uuid::Uuid::now_v7().simple()),
    }
}

/// Sends one call for `members` (whose bodies share `rest`) and gives each its share.
async fn send(route: Route, rest: Bytes, members: Vec<Member>) {
    // A client that left is not sent; one left alone goes as it came.
    let mut members: Vec<Member> = members
        .into_iter()
        .filter(|m| !m.reply.is_closed())
        .collect();
    if members.len() < 2 {
        return answer_all(members, || Joined::Alone);
    }
    let parts: Vec<&Part> = members.iter().map(|m| &m.part).collect();
    let Some(body) = batch::body(&rest, &parts) else {
        return answer_all(members, || Joined::Alone);
    };
    let worker = &route.worker;
    let deadline = route.upstream.deadline();
    let sent = route
        .upstream
        .post_json(
            worker.to(),
            worker.uri(Endpoint::Completions),
            body,
            upstream::Carried::default(),
            deadline,
        )
        .await;
    let (head, body) = match sent {
        Ok(response) => {
            let (head, incoming) = response.into_parts();
            match upstream::collect(incoming, &worker.url, deadline).await {
                Ok(body) => (head, body),
                Err(error) => return answer_all(members, || Joined::Failed(error.clone())),
            }
        }
        Err(error) => return answer_all(members, || Joined::Failed(error.clone())),
    };
    if !head.status.is_success() {
        // One prompt the worker refuses (too long, say) refuses the call: each goes on its own.
        return answer_all(members, || Joined::Alone);
    }
    let first = &members[0].part;
    let (n, keep_ids) = (first.n, first.wants_ids);
    let shares: Vec<Share> = members.iter().map(|m| m.share.clone()).collect();
    let Some(answers) = batch::split(&body, n, &shares, keep_ids) else {
        tracing::warn!(worker = %worker.url, "a coalesced answer did not add up; sent apart");
        return answer_all(members, || Joined::Alone);
    };
    route.meter.metrics().coalesced(members.len());
    for (member, body) in members.drain(..).zip(answers) {
        let parts = member_head(&head, member.request_id.as_deref());
        let _ = member.reply.send(Joined::Answer { parts, body });
    }
}

fn answer_all(members: Vec<Member>, joined: impl Fn() -> Joined) {
    for member in members {
        let _ = member.reply.send(joined());
    }
}

/// The call's response head as one client's: its own length, and its own request id if the
/// worker echoes request ids.
fn member_head(head: &Parts, request_id: Option<&str>) -> Parts {
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = head.status;
    parts.version = head.version;
    parts.headers = head.headers.clone();
    parts.headers.remove(http::header::CONTENT_LENGTH);
    let echoed = parts.headers.remove("x-request-id").is_some();
    if echoed && let Some(id) = request_id.and_then(|id| HeaderValue::from_str(id).ok()) {
        parts.headers.insert("x-request-id", id);
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coalescer(default_ms: u64, by_model: &[(&str, u64)]) -> Option<Arc<Coalescer>> {
        let by_model = by_model
            .iter()
            .map(|&(model, ms)| (model.to_owned(), Duration::from_millis(ms)))
            .collect();
        Coalescer::new((Duration::from_millis(default_ms), by_model), 16)
    }

    #[test]
    fn a_model_s_window_is_its_own_else_the_default_and_zero_is_off() {
        assert!(coalescer(0, &[]).is_none());
        assert!(coalescer(0, &[("m", 0)]).is_none());
        let only_m = coalescer(0, &[("m", 2)]);
        let window = |c: &Option<Arc<Coalescer>>, model| c.as_ref().and_then(|c| c.window(model));
        assert_eq!(window(&only_m, "m"), Some(Duration::from_millis(2)));
        assert_eq!(window(&only_m, "other"), None);
        let all_but_off = coalescer(1, &[("off", 0)]);
        assert_eq!(window(&all_but_off, "off"), None);
        assert_eq!(
            window(&all_but_off, "other"),
            Some(Duration::from_millis(1))
        );
    }
}
