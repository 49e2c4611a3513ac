//! The journal's records: a request's start, its progress, its end. `frame` says how they are
//! written; segments of earlier builds hold them as JSON lines, which `Record::decode` reads.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::request::Endpoint;
use crate::usage::{Status, Usage, UsageEvent, UsageSource};

/// A request as it started: what an interrupted request's event is made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    pub event_id: Arc<str>,
    pub request_id: Arc<str>,
    pub tenant_id: Arc<str>,
    pub key_id: Arc<str>,
    pub model: Arc<str>,
    pub endpoint: Endpoint,
    pub stream: bool,
    pub started_at_ms: u64,
}

/// The latest usage a request relayed, and from which worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    pub at_ms: u64,
}

/// An ended request's usage event, as the meter made it, and its place in the order the core
/// recorded events (`seq`): the control plane acknowledges events by it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ended {
    pub seq: u64,
    #[serde(flatten)]
    pub event: UsageEvent,
}

/// A record as read back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "r", rename_all = "lowercase")]
pub enum Record {
    Start(Started),
    Progress {
        event_id: Arc<str>,
        #[serde(flatten)]
        progress: Progress,
    },
    End(Ended),
    /// A request that ended without an event. Only earlier builds wrote it (for a request
    /// refused after its start was journalled); read so that their journals recover.
    Discard {
        event_id: Arc<str>,
    },
}

/// A record to write, borrowing what it records: read back, it is the equal `Record`
/// (`frame` encodes it).
#[derive(Debug, Clone, Copy)]
pub enum Line<'a> {
    Start(&'a Started),
    Progress {
        event_id: &'a str,
        progress: &'a Progress,
    },
    End(&'a Ended),
}

impl Record {
    /// The JSON line, newline included, that earlier builds wrote for this record.
    #[cfg(test)]
    pub fn encode_json(&self, out: &mut Vec<u8>) {
        if serde_json::to_writer(&mut *out, self).is_ok() {
            out.push(b'\n');
        }
    }

    /// A JSON line (an earlier build's) without its newline; `None` if it is not a whole record.
    pub fn decode(line: &[u8]) -> Option<Self> {
        serde_json::from_slice(line).ok()
    }
}

impl Started {
    pub fn of(event: &UsageEvent) -> Self {
        Self {
            event_id: event.event_id.clone(),
            request_id: event.request_id.clone(),
            tenant_id: event.tenant_id.clone(),
            key_id: event.key_id.clone(),
            model: event.model.clone(),
            endpoint: event.endpoint,
            stream: event.stream,
            started_at_ms: event.started_at_ms,
        }
    }

    /// The event of a request that had started and not ended when the process died: billed for
    /// the usage it had relayed by its last progress record.
    pub fn interrupted(&self, progress: Option<Progress>, seq: u64) -> Ended {
        let usage = progress.unwrap_or(Progress {
            prompt_tokens: 0,
            completion_tokens: 0,
            cached_tokens: 0,
            at_ms: self.started_at_ms,
        });
        let event = UsageEvent {
            event_id: self.event_id.clone(),
            request_id: self.request_id.clone(),
            tenant_id: self.tenant_id.clone(),
            key_id: self.key_id.clone(),
            model: self.model.clone(),
            worker: None,
            endpoint: self.endpoint,
            stream: self.stream,
            status: Status::Interrupted,
            http_status: 0,
            prompt_tokens: usage.prompt_tokens,
            cached_tokens: usage.cached_tokens,
            completion_tokens: usage.completion_tokens,
            usage_source: if progress.is_some() {
                UsageSource::Worker
            } else {
                UsageSource::None
            },
            started_at_ms: self.started_at_ms,
            finished_at_ms: usage.at_ms,
        };
        Ended { seq, event }
    }
}

impl Progress {
    pub fn of(usage: &Usage, at_ms: u64) -> Self {
        Self {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            cached_tokens: usage.cached_tokens,
            at_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn started() -> Started {
        Started {
            event_id: "e1".into(),
            request_id: "r1".into(),
            tenant_id: "t".into(),
            key_id: "k".into(),
            model: "m".into(),
            endpoint: Endpoint::Completions,
            stream: true,
            started_at_ms: 10,
        }
    }

    #[test]
    fn records_round_trip_one_per_line() {
        let records = [
            Record::Start(started()),
            Record::Progress {
                event_id: "e1".into(),
                progress: Progress {
                    prompt_tokens: 3,
                    completion_tokens: 2,
                    cached_tokens: 0,
                    at_ms: 12,
                },
            },
            Record::End(started().interrupted(None, 7)),
        ];
        let mut out = Vec::new();
        for record in &records {
            record.encode_json(&mut out);
        }
        let decoded: Vec<Record> = out
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .filter_map(Record::decode)
            .collect();
        assert_eq!(decoded, records);
        assert_eq!(
            Record::decode(&out[..out.len() / 2]),
            None,
            "a cut line is no record"
        );
    }

    #[test]
    fn an_end_record_is_the_event_flat_with_its_seq() {
        let mut line = Vec::new();
        Record::End(started().interrupted(None, 7)).encode_json(&mut line);
        let value: serde_json::Value = serde_json::from_slice(&line).unwrap_or_default();
        assert_eq!(value["r"], "end");
        assert_eq!(value["seq"], 7);
        assert_eq!(value["event_id"], "e1");
        assert_eq!(value["endpoint"], "completions");
        assert_eq!(value["status"], "interrupted");
    }

    #[test]
    fn an_interrupted_request_is_billed_for_its_last_progress() {
        let progress = Progress {
            prompt_tokens: 5,
            completion_tokens: 9,
            cached_tokens: 1,
            at_ms: 20,
        };
        let ended = started().interrupted(Some(progress), 3);
        let ended = ended.event;
        assert_eq!(ended.status, Status::Interrupted);
        assert_eq!((ended.prompt_tokens, ended.completion_tokens), (5, 9));
        assert_eq!(ended.usage_source, UsageSource::Worker);
        assert_eq!(ended.finished_at_ms, 20);
        let nothing = started().interrupted(None, 4).event;
        assert_eq!(nothing.usage_source, UsageSource::None);
        assert_eq!(nothing.completion_tokens, 0);
    }
}
