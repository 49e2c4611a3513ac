//! The simulator's failure injection as it stands now: its rates, which start from the config
//! and which `POST /sim/faults` changes while the server runs (so a test can make a worker fail,
//! then recover, without a restart), and the failures injected so far.
//!
//! `/sim/faults` is the simulator's own control route, not part of vLLM's protocol. The dice
//! that decide each failure live in `engine.rs`.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Deserialize;

use super::config::SimConfig;

/// Every atomic here is `Relaxed`: each rate is read whole by the request it decides, and each
/// count is an independent tally; no other memory is published through them.
#[derive(Debug)]
pub(crate) struct Faults {
    /// `f64` bits.
    error_rate: AtomicU64,
    /// `f64` bits.
    die_rate: AtomicU64,
    errors: AtomicU64,
    deaths: AtomicU64,
}

/// `POST /sim/faults`: the rates to set; a rate left out keeps its value.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FaultsUpdate {
    error_rate: Option<f64>,
    die_rate: Option<f64>,
}

impl Faults {
    /// Starts from the config's rates (already normalized into 0..=1).
    pub(crate) fn new(config: &SimConfig) -> Self {
        Self {
            error_rate: AtomicU64::new(config.error_rate.to_bits()),
            die_rate: AtomicU64::new(config.die_rate.to_bits()),
            errors: AtomicU64::new(0),
            deaths: AtomicU64::new(0),
        }
    }

    pub(crate) fn error_rate(&self) -> f64 {
        f64::from_bits(self.error_rate.load(Ordering::Relaxed))
    }

    pub(crate) fn die_rate(&self) -> f64 {
        f64::from_bits(self.die_rate.load(Ordering::Relaxed))
    }

    /// Counts an injected failure: a 500 (`error`) or a stream cut halfway.
    pub(crate) fn injected(&self, error: bool) {
        let count = if error { &self.errors } else { &self.deaths };
        count.fetch_add(1, Ordering::Relaxed);
    }

    /// Applies `update` whole, or nothing when a rate in it is not a fraction between 0 and 1
    /// (named in the error).
    pub(crate) fn apply(&self, update: &FaultsUpdate) -> Result<(), &'static str> {
        let rates = [
            ("error_rate", update.error_rate, &self.error_rate),
            ("die_rate", update.die_rate, &self.die_rate),
        ];
        if let Some((name, ..)) = rates
            .iter()
            .find(|(_, rate, _)| rate.is_some_and(|r| !(0.0..=1.0).contains(&r)))
        {
            return Err(name);
        }
        for (_, rate, slot) in rates {
            if let Some(rate) = rate {
                slot.store(rate.to_bits(), Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// `{"error_rate":…,"die_rate":…,"errors_injected":…,"deaths_injected":…}`.
    pub(crate) fn body(&self) -> Vec<u8> {
        serde_json::json!({
            "error_rate": self.error_rate(),
            "die_rate": self.die_rate(),
            "errors_injected": self.errors.load(Ordering::Relaxed),
            "deaths_injected": self.deaths.load(Ordering::Relaxed),
        })
        .to_string()
        .into_bytes()
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on a bad fixture")]
mod tests {
    use super::*;

    fn update(json: &str) -> FaultsUpdate {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn an_update_sets_what_it_names_and_keeps_the_rest() {
        let faults = Faults::new(&SimConfig {
            error_rate: 0.5,
            die_rate: 0.25,
            ..SimConfig::default()
        });
        assert_eq!(faults.apply(&update(r#"{"error_rate":0}"#)), Ok(()));
        assert_eq!((faults.error_rate(), faults.die_rate()), (0.0, 0.25));
        faults.injected(true);
        faults.injected(false);
        faults.injected(false);
        let body: serde_json::Value = serde_json::from_slice(&faults.body()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"error_rate": 0.0, "die_rate": 0.25,
                "errors_injected": 1, "deaths_injected": 2})
        );
    }

    #[test]
    fn a_rate_out_of_range_changes_nothing() {
        let faults = Faults::new(&SimConfig::default());
        let bad = update(r#"{"error_rate":1,"die_rate":1.5}"#);
        assert_eq!(faults.apply(&bad), Err("die_rate"));
        assert_eq!(faults.error_rate(), 0.0);
        assert!(serde_json::from_str::<FaultsUpdate>(r#"{"eror_rate":1}"#).is_err());
        assert!(serde_json::from_str::<FaultsUpdate>(r#"{"error_rate":"1"}"#).is_err());
    }
}
