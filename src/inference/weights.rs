//! Immutable log-weight vectors and their summaries (ESS, normalised weights, log mean).

use crate::core::logspace::{log_sum_exp, normalise};

/// A vector of unnormalised log-weights with cached summaries.
///
/// # Maths
/// With `W_i = exp(lw_i) / Σ_j exp(lw_j)`, the effective sample size is `ESS = 1 / Σ W_i²`,
/// between 1 and `N` (0 when every weight is `-inf`).
///
/// # Example
/// ```
/// use smc_steer::weights::Weights;
/// let w = Weights::new(vec![0.0, 0.0, f64::NEG_INFINITY, 0.0]);
/// assert!((w.ess() - 3.0).abs() < 1e-12);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Weights {
    log_weights: Vec<f64>,
    log_total: f64,
    normalised: Vec<f64>,
    ess: f64,
}

impl Weights {
    /// Summarise `log_weights` (`-inf` entries are zero weights).
    pub fn new(log_weights: Vec<f64>) -> Self {
        let log_total = log_sum_exp(&log_weights);
        let normalised = normalise(&log_weights);
        let sq: f64 = normalised.iter().map(|w| w * w).sum();
        let ess = if sq > 0.0 { 1.0 / sq } else { 0.0 };
        Self {
            log_weights,
            log_total,
            normalised,
            ess,
        }
    }

    /// The unnormalised log-weights.
    pub fn log_weights(&self) -> &[f64] {
        &self.log_weights
    }

    /// Normalised weights (summing to 1, or all zero when every weight is `-inf`).
    pub fn normalised(&self) -> &[f64] {
        &self.normalised
    }

    /// `log Σ exp(lw_i)`.
    pub fn log_total(&self) -> f64 {
        self.log_total
    }

    /// `log((1/N) Σ exp(lw_i))`.
    pub fn log_mean(&self) -> f64 {
        if self.log_weights.is_empty() {
            f64::NEG_INFINITY
        } else {
            self.log_total - (self.log_weights.len() as f64).ln()
        }
    }

    /// Effective sample size `1 / Σ W_i²`.
    pub fn ess(&self) -> f64 {
        self.ess
    }

    /// True when every weight is zero (`-inf`).
    pub fn all_dead(&self) -> bool {
        self.log_total == f64::NEG_INFINITY
    }
}
