//! The W3C `traceparent` of the last generation and embedding requests the simulator received,
//! for tests to see which trace reached the worker (vLLM itself exports its spans instead, with
//! `--otlp-traces-endpoint`). It records and shows them; it creates no span.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

use axum::http::HeaderMap;

/// How many of the latest are kept.
const KEPT: usize = 256;

/// A `traceparent` value: `version-traceid-parentid-flags`, 55 characters of lowercase hex.
const LENGTH: usize = 55;

#[derive(Debug, Default)]
pub(crate) struct Traceparents {
    latest: Mutex<VecDeque<String>>,
}

impl Traceparents {
    /// Keeps the request's `traceparent`, if it has a well-formed one.
    pub(crate) fn record(&self, headers: &HeaderMap) {
        let Some(value) = headers
            .get("traceparent")
            .and_then(|value| value.to_str().ok())
            .filter(|value| well_formed(value))
        else {
            return;
        };
        let mut latest = self.latest.lock().unwrap_or_else(PoisonError::into_inner);
        if latest.len() == KEPT {
            latest.pop_front();
        }
        latest.push_back(value.to_owned());
    }

    /// `{"traceparents":[...]}`, oldest first.
    pub(crate) fn body(&self) -> Vec<u8> {
        let latest = self.latest.lock().unwrap_or_else(PoisonError::into_inner);
        let list: Vec<&String> = latest.iter().collect();
        serde_json::to_vec(&serde_json::json!({ "traceparents": list })).unwrap_or_default()
    }
}

fn well_formed(value: &str) -> bool {
    value.len() == LENGTH
        && value.bytes().enumerate().all(|(i, b)| match i {
            2 | 35 | 52 => b == b'-',
            _ => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
        })
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on a bad fixture")]
mod tests {
    use super::*;

    #[test]
    fn keeps_well_formed_values_only_and_the_latest() {
        let traces = Traceparents::default();
        let mut headers = HeaderMap::new();
        for value in [
            "garbage",
            "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",
        ] {
            headers.insert("traceparent", value.parse().unwrap());
            traces.record(&headers);
        }
        assert_eq!(traces.body(), br#"{"traceparents":[]}"#);
        for i in 0..=KEPT {
            let value = format!("00-{i:032x}-b7ad6b7169203331-01");
            headers.insert("traceparent", value.parse().unwrap());
            traces.record(&headers);
        }
        let body: serde_json::Value = serde_json::from_slice(&traces.body()).unwrap();
        let list = body["traceparents"].as_array().unwrap();
        assert_eq!(list.len(), KEPT);
        assert_eq!(list[0], format!("00-{:032x}-b7ad6b7169203331-01", 1));
    }
}
