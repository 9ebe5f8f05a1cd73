//! Independent replicate runs: seeds from one master seed, means and standard errors.

use rand::{RngCore, SeedableRng};
use rand_pcg::Pcg64Mcg;
use serde::Serialize;

use crate::core::error::Result;
use crate::core::logspace::log_sum_exp;
use crate::inference::result::SmcResult;

/// A mean with its standard error over replicates.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Estimate {
    /// Sample mean.
    pub mean: f64,
    /// Standard error of the mean (`sd / √n`; 0 for a single value).
    pub se: f64,
    /// Number of values.
    pub n: usize,
}

impl Estimate {
    /// Mean and standard error of `xs` (NaN mean for an empty slice).
    pub fn from_values(xs: &[f64]) -> Self {
        let n = xs.len();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let se = if n > 1 {
            let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
            (var / n as f64).sqrt()
        } else {
            0.0
        };
        Self { mean, se, n }
    }
}

/// `r` seeds drawn from a master seed (the same master seed gives the same seeds).
pub fn seeds(master_seed: u64, r: usize) -> Vec<u64> {
    let mut rng = Pcg64Mcg::seed_from_u64(master_seed);
    (0..r).map(|_| rng.next_u64()).collect()
}

/// The results of independent replicate runs.
#[derive(Debug, Clone, Serialize)]
pub struct Replicates<P> {
    /// One result per replicate, in seed order.
    pub runs: Vec<SmcResult<P>>,
}

/// Run `run(seed)` for `r` seeds drawn from `master_seed`, one after the other.
///
/// # Errors
/// The first error of any run.
///
/// # Example
/// ```
/// use smc_steer::{potential::Trivial, replicate::run_replicates, testing::ToyKernel, FeynmanKac, Smc, SmcConfig};
/// let reps = run_replicates(42, 4, |seed| {
///     let k = ToyKernel::random_bigram(2, 0.4, 1)?;
///     Smc::new(k, FeynmanKac::new(Trivial), &[], SmcConfig { seed, ..Default::default() })?.run()
/// }).unwrap();
/// assert_eq!(reps.runs.len(), 4);
/// assert!(reps.log_z().mean.abs() < 1e-12); // a trivial potential has Z = 1
/// ```
pub fn run_replicates<P>(
    master_seed: u64,
    r: usize,
    mut run: impl FnMut(u64) -> Result<SmcResult<P>>,
) -> Result<Replicates<P>> {
    let runs = seeds(master_seed, r)
        .into_iter()
        .map(&mut run)
        .collect::<Result<Vec<_>>>()?;
    Ok(Replicates { runs })
}

impl<P> Replicates<P> {
    /// Mean and standard error of `log Ẑ` over the runs (`-inf` runs make the mean `-inf`).
    pub fn log_z(&self) -> Estimate {
        Estimate::from_values(&self.runs.iter().map(|r| r.log_z).collect::<Vec<_>>())
    }

    /// Mean and standard error of `Ẑ / exp(log_scale)`, computed stably; with the exact
    /// `log Z` as the scale this is the ratio whose expectation is 1 for an unbiased
    /// estimator.
    pub fn z_ratio(&self, log_scale: f64) -> Estimate {
        Estimate::from_values(
            &self
                .runs
                .iter()
                .map(|r| (r.log_z - log_scale).exp())
                .collect::<Vec<_>>(),
        )
    }

    /// `log` of the mean of `Ẑ` over the runs.
    pub fn log_mean_z(&self) -> f64 {
        let lz: Vec<f64> = self.runs.iter().map(|r| r.log_z).collect();
        log_sum_exp(&lz) - (lz.len() as f64).ln()
    }

    /// The posterior expectation of `f` pooled over the runs, each run weighted by its `Ẑ`
    /// (as [`Replicates::pooled_posterior`] does), with a delta-method standard error.
    ///
    /// # Maths
    /// With `a_r = Ẑ_r·Σ_i W_{r,i} f(x_{r,i})` and `b_r = Ẑ_r`, the estimate is
    /// `R = Σ a_r / Σ b_r` and its standard error
    /// `sqrt(Σ (a_r − R·b_r)² / (n(n−1))) / mean(b)`. Runs where every particle died count
    /// with `Ẑ_r = 0`. The mean is NaN when every run died.
    pub fn expectation(
        &self,
        f: impl Fn(&crate::inference::result::Completion<P>) -> f64,
    ) -> Estimate {
        let n = self.runs.len();
        let log_mean_z = self.log_mean_z();
        if n == 0 || log_mean_z == f64::NEG_INFINITY || log_mean_z.is_nan() {
            return Estimate {
                mean: f64::NAN,
                se: f64::NAN,
                n,
            };
        }
        // Ẑ_r relative to the mean Ẑ, so that b has mean 1 and nothing overflows.
        let b: Vec<f64> = self
            .runs
            .iter()
            .map(|r| (r.log_z - log_mean_z).exp())
            .collect();
        let a: Vec<f64> = self
            .runs
            .iter()
            .zip(&b)
            .map(|(r, b)| r.expectation(&f).map_or(0.0, |e| b * e))
            .collect();
        let mean = a.iter().sum::<f64>() / b.iter().sum::<f64>();
        let se = if n > 1 {
            let ss: f64 = a.iter().zip(&b).map(|(a, b)| (a - mean * b).powi(2)).sum();
            (ss / (n * (n - 1)) as f64).sqrt()
        } else {
            0.0
        };
        Estimate { mean, se, n }
    }

    /// The pooled posterior: every run's completions, each run weighted by its `Ẑ` (the
    /// standard way to combine independent SMC runs), merged by bytes
    /// ([`crate::inference::result::pool_runs`]).
    pub fn pooled_posterior(&self) -> Vec<crate::inference::result::Distinct> {
        crate::inference::result::pool_runs(&self.runs).1
    }
}
