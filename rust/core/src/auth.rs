//! API-key authentication against a snapshot the control plane pushes.
//!
//! Keys are never held in memory, only their SHA-256 digests: a request's key is hashed and the
//! digest looked up in a hash map, O(1). Because the map is keyed by a digest of a high-entropy
//! secret, the comparison's timing reveals nothing usable about any key (finding a key whose
//! digest shares a prefix with a stored one is a preimage search). Revocation is the next
//! snapshot swap; the request after it no longer authenticates. This module does not issue keys.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::HeaderMap;
use http::header::AUTHORIZATION;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// Who a request is billed to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Principal {
    pub tenant_id: Arc<str>,
    pub key_id: Arc<str>,
}

type Digest32 = [u8; 32];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySnapshot {
    pub keys: Vec<KeyEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    /// Lower-case hex SHA-256 of the full key.
    pub hash: String,
    pub key_id: String,
    pub tenant_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("invalid key snapshot: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("invalid key snapshot: key {key_id}: `hash` must be 64 hex digits")]
    BadHash { key_id: String },
}

#[derive(Debug, Default)]
pub struct KeyStore {
    keys: ArcSwap<HashMap<Digest32, Arc<Principal>>>,
}

impl KeyStore {
    /// Replaces every key at once; requests in flight keep the principal they started with.
    pub fn replace(&self, snapshot: KeySnapshot) -> Result<usize, SnapshotError> {
        let mut keys = HashMap::with_capacity(snapshot.keys.len());
        for entry in snapshot.keys {
            let digest = decode_hex(&entry.hash).ok_or_else(|| SnapshotError::BadHash {
                key_id: entry.key_id.clone(),
            })?;
            let principal = Principal {
                tenant_id: entry.tenant_id.into(),
                key_id: entry.key_id.into(),
            };
            keys.insert(digest, Arc::new(principal));
        }
        let count = keys.len();
        self.keys.store(Arc::new(keys));
        Ok(count)
    }

    pub fn replace_json(&self, text: &str) -> Result<usize, SnapshotError> {
        self.replace(serde_json::from_str(text)?)
    }

    /// The principal of the request's `Authorization: Bearer` key.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Arc<Principal>, ApiError> {
        self.authenticate_bearer(headers.get(AUTHORIZATION).map(|v| v.as_bytes()))
    }

    /// The principal of an `authorization` value (`Bearer <key>`), as bytes.
    pub fn authenticate_bearer(&self, value: Option<&[u8]>) -> Result<Arc<Principal>, ApiError> {
        let value = value.ok_or(ApiError::MissingKey)?;
        // The scheme is case-insensitive (RFC 9110 §11.1): `Bearer`, `bearer`, `BEARER`.
        let key = std::str::from_utf8(value)
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, key)| key.trim())
            .filter(|k| !k.is_empty())
            .ok_or(ApiError::MissingKey)?;
        self.lookup(key).ok_or(ApiError::InvalidKey)
    }

    pub fn lookup(&self, key: &str) -> Option<Arc<Principal>> {
        let digest: Digest32 = Sha256::digest(key.as_bytes()).into();
        self.keys.load().get(&digest).cloned()
    }
}

fn decode_hex(text: &str) -> Option<Digest32> {
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn hex(key: &str) -> String {
        Sha256::digest(key.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn store_with(keys: &[(&str, &str)]) -> KeyStore {
        let store = KeyStore::default();
        let snapshot = KeySnapshot {
            keys: keys
                .iter()
                .map(|(key, id)| KeyEntry {
                    hash: hex(key),
                    key_id: (*id).into(),
                    tenant_id: "ten_1".into(),
                })
                .collect(),
        };
        assert!(store.replace(snapshot).is_ok());
        store
    }

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(AUTHORIZATION, v);
        }
        headers
    }

    #[test]
    fn bearer_key_authenticates() {
        let store = store_with(&[("tg-secret", "key_1")]);
        let principal = store.authenticate(&headers("Bearer tg-secret"));
        assert_eq!(
            principal.map(|p| p.key_id.to_string()),
            Ok("key_1".to_owned())
        );
    }

    #[test]
    fn the_scheme_is_case_insensitive() {
        let store = store_with(&[("tg-secret", "key_1")]);
        for scheme in ["Bearer", "bearer", "BEARER", "BeArEr"] {
            let principal = store.authenticate(&headers(&format!("{scheme} tg-secret")));
            assert!(principal.is_ok(), "{scheme}");
        }
        assert_eq!(
            store.authenticate(&headers("Bearertg-secret")),
            Err(ApiError::MissingKey)
        );
    }

    #[test]
    fn missing_malformed_and_unknown_keys_are_rejected() {
        let store = store_with(&[("tg-secret", "key_1")]);
        assert_eq!(
            store.authenticate(&HeaderMap::new()),
            Err(ApiError::MissingKey)
        );
        assert_eq!(
            store.authenticate(&headers("Basic abc")),
            Err(ApiError::MissingKey)
        );
        assert_eq!(
            store.authenticate(&headers("Bearer ")),
            Err(ApiError::MissingKey)
        );
        assert_eq!(
            store.authenticate(&headers("Bearer tg-other")),
            Err(ApiError::InvalidKey)
        );
    }

    #[test]
    fn a_new_snapshot_revokes_absent_keys() {
        let store = store_with(&[("tg-a", "key_a"), ("tg-b", "key_b")]);
        assert!(store.lookup("tg-a").is_some());
        let next = KeySnapshot {
            keys: vec![KeyEntry {
                hash: hex("tg-b"),
                key_id: "key_b".into(),
                tenant_id: "ten_1".into(),
            }],
        };
        assert_eq!(store.replace(next).ok(), Some(1));
        assert!(store.lookup("tg-a").is_none());
        assert!(store.lookup("tg-b").is_some());
    }

    #[test]
    fn bad_hash_is_an_error() {
        let store = KeyStore::default();
        let result = store.replace_json(r#"{"keys":[{"hash":"zz","key_id":"k","tenant_id":"t"}]}"#);
        assert!(matches!(result, Err(SnapshotError::BadHash { .. })));
    }
}
