//! The per-step record of a run, serialisable to JSON.
//!
//! Log-values that are `-inf` (dead particles, an all-dead run) are written as JSON `null`,
//! since JSON has no infinities; [`log_value`] reads them back.

use serde::{Deserialize, Serialize};

/// What happened in one SMC step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Step index (0-based).
    pub step: usize,
    /// Particles still stepping after this step.
    pub live: usize,
    /// ESS of the weights before any resampling in this step.
    pub ess: f64,
    /// Whether the population was resampled.
    pub resampled: bool,
    /// For each particle of this step (the population whose `log_weights` and `texts` are
    /// recorded, before resampling), the index of its parent in the previous record's
    /// population (for the first step, the initial particle).
    pub parents: Vec<usize>,
    /// The resampling selection: particle `j` of the next step's starting population is a
    /// copy of particle `ancestors[j]` of this step (the identity when not resampled;
    /// SMC-steer's kept candidates).
    pub ancestors: Vec<usize>,
    /// Each particle's log-weight before resampling (`null` = `-inf`).
    #[serde(with = "log_values")]
    pub log_weights: Vec<f64>,
    /// Running estimate of `log Z` after this step (`null` = `-inf`).
    #[serde(with = "log_value")]
    pub log_z: f64,
    /// Change of the `log Z` estimate in this step (`null` = `-inf`).
    #[serde(with = "log_value")]
    pub log_z_increment: f64,
    /// Each particle's generated text after this step (before resampling), when requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub texts: Option<Vec<String>>,
}

/// Serde helpers writing `-inf` as `null` and reading `null` as `-inf`.
pub mod log_value {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serialise a log-value (`-inf` and other non-finite values become `null`).
    pub fn serialize<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
        if x.is_finite() {
            s.serialize_f64(*x)
        } else {
            s.serialize_none()
        }
    }

    /// Deserialise a log-value (`null` becomes `-inf`).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NEG_INFINITY))
    }
}

/// As [`log_value`] for vectors.
pub mod log_values {
    use serde::ser::SerializeSeq;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serialise log-values (`-inf` becomes `null`).
    pub fn serialize<S: Serializer>(xs: &[f64], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(xs.len()))?;
        for x in xs {
            seq.serialize_element(&x.is_finite().then_some(*x))?;
        }
        seq.end()
    }

    /// Deserialise log-values (`null` becomes `-inf`).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
        let v = Vec::<Option<f64>>::deserialize(d)?;
        Ok(v.into_iter()
            .map(|x| x.unwrap_or(f64::NEG_INFINITY))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infinities_round_trip_as_null() {
        let r = StepRecord {
            step: 0,
            live: 1,
            ess: 1.0,
            resampled: false,
            parents: vec![0, 0],
            ancestors: vec![0, 1],
            log_weights: vec![-0.5, f64::NEG_INFINITY],
            log_z: f64::NEG_INFINITY,
            log_z_increment: 0.25,
            texts: None,
        };
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"log_weights\":[-0.5,null]"));
        let back: StepRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
    }
}
