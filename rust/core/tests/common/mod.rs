//! What the core's integration tests share: the control plane's resolved configuration document
//! (`config.json`, kept equal to `core_document()`'s by a Python test), with overrides.

#![expect(dead_code, reason = "each test binary uses its own part")]
#![expect(clippy::expect_used, reason = "tests fail loudly on a bad fixture")]

use gateway_core::config::{GatewayConfig, QuotaConfig};
use serde_json::Value;

/// The document for one worker at `http://127.0.0.1:9`, no journal, no gRPC.
pub fn document() -> Value {
    serde_json::from_str(include_str!("config.json")).expect("the fixture is JSON")
}

/// `base` with `overrides` laid over it, objects merged member by member.
pub fn merged(mut base: Value, overrides: Value) -> Value {
    match (&mut base, overrides) {
        (Value::Object(base), Value::Object(overrides)) => {
            for (name, value) in overrides {
                let slot = base.entry(name).or_insert(Value::Null);
                *slot = merged(slot.take(), value);
            }
        }
        (slot, value) => *slot = value,
    }
    base
}

/// The gateway's configuration: the resolved document with `overrides`.
pub fn gateway_config(overrides: Value) -> GatewayConfig {
    GatewayConfig::from_json(&merged(document(), overrides).to_string()).expect("a valid config")
}

/// The quota section of the resolved document with `overrides`.
pub fn quota_config(overrides: Value) -> QuotaConfig {
    serde_json::from_value(merged(document()["quota"].take(), overrides))
        .expect("a valid quota config")
}
