//! The inference layer: the SMC engine (population, ESS, resampling, `log Z`), the
//! resampling schemes, weights, per-step records, results and replicate runs.

pub mod record;
pub mod replicate;
pub mod resampling;
pub mod result;
pub mod smc;
pub mod weights;
