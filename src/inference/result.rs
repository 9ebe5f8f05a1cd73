//! The result of a run: weighted completions, the posterior, `log Z`, ESS.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::core::logspace::{log_sum_exp, normalise};
use crate::core::vocab::TokenId;
use crate::inference::record::StepRecord;

/// One final particle.
#[derive(Debug, Clone, Serialize)]
pub struct Completion<P> {
    /// Generated tokens of the first context (prompt and EOS excluded).
    pub tokens: Vec<TokenId>,
    /// Their bytes (what completions are compared by).
    #[serde(skip)]
    pub bytes: Vec<u8>,
    /// Their text for display (invalid UTF-8 replaced by U+FFFD).
    pub text: String,
    /// Whether the sequence ended with EOS (otherwise it was truncated, finished by the
    /// program, or died).
    pub eos: bool,
    /// Final unnormalised log-weight (`-inf` for a dead particle).
    #[serde(with = "crate::inference::record::log_value")]
    pub log_weight: f64,
    /// The program's final state.
    #[serde(skip)]
    pub program: P,
}

/// A distinct completion with its merged probability: the same tokens and ending
/// ([`SmcResult::posterior`]) or the same bytes and ending ([`SmcResult::posterior_by_bytes`],
/// [`pool_runs`]).
///
/// The one posterior type of the crate: a run's posterior, pooled replicates
/// ([`crate::inference::replicate::Replicates::pooled_posterior`]), the record and HTML report
/// ([`crate::report::RunRecord`]) and the command line's output all list `Distinct`s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Distinct {
    /// Generated tokens (of the most probable tokenisation when merged by bytes).
    pub tokens: Vec<TokenId>,
    /// Their bytes (not serialised: `text` shows them, `tokens` determine them).
    #[serde(skip)]
    pub bytes: Vec<u8>,
    /// Their text for display (invalid UTF-8 replaced by U+FFFD; two completions that
    /// differ only in invalid bytes display alike but are kept apart).
    pub text: String,
    /// Whether it ended with EOS.
    pub eos: bool,
    /// Posterior probability (normalised weights summed over the copies).
    pub probability: f64,
    /// `log Σ` of the copies' unnormalised weights.
    #[serde(with = "crate::inference::record::log_value")]
    pub log_weight: f64,
    /// How many particles held it.
    pub count: usize,
}

/// The outcome of an SMC run.
#[derive(Debug, Clone, Serialize)]
pub struct SmcResult<P> {
    /// Final particles with their weights (the weighted posterior sample).
    pub particles: Vec<Completion<P>>,
    /// Estimate of `log Z` (`-inf` when every particle died).
    #[serde(with = "crate::inference::record::log_value")]
    pub log_z: f64,
    /// Effective sample size of the final weights (0 when all died).
    pub ess: f64,
    /// True when every particle has weight zero: the posterior is empty.
    pub all_dead: bool,
    /// Number of SMC steps taken.
    pub steps: usize,
    /// Tokens generated over all particles (sampled and observed tokens sent to the kernel;
    /// EOS is not counted).
    pub tokens_generated: usize,
    /// Wall time of the run in seconds.
    pub elapsed_s: f64,
    /// Per-step records (empty unless [`crate::SmcConfig::record`] is set).
    pub records: Vec<StepRecord>,
}

impl<P> SmcResult<P> {
    /// Normalised weights of the particles (all zero when every particle died).
    pub fn normalised_weights(&self) -> Vec<f64> {
        normalise(
            &self
                .particles
                .iter()
                .map(|p| p.log_weight)
                .collect::<Vec<_>>(),
        )
    }

    /// The posterior expectation `Σ_i W_i f(x_i)`; `None` when every particle died.
    ///
    /// # Example
    /// ```
    /// use smc_steer::{potential::Trivial, testing::ToyKernel, FeynmanKac, Smc, SmcConfig};
    /// let k = ToyKernel::random_bigram(2, 0.5, 3).unwrap();
    /// let r = Smc::new(k, FeynmanKac::new(Trivial), &[], SmcConfig::default()).unwrap().run().unwrap();
    /// let mean_len = r.expectation(|c| c.tokens.len() as f64).unwrap();
    /// assert!(mean_len >= 0.0);
    /// ```
    pub fn expectation(&self, f: impl Fn(&Completion<P>) -> f64) -> Option<f64> {
        if self.all_dead {
            return None;
        }
        Some(
            self.normalised_weights()
                .iter()
                .zip(&self.particles)
                .map(|(w, p)| if *w > 0.0 { w * f(p) } else { 0.0 })
                .sum(),
        )
    }

    /// Distinct completions (by tokens and ending) with merged probabilities, most probable
    /// first; empty when every particle died. Dead particles are left out.
    pub fn posterior(&self) -> Vec<Distinct> {
        let weights = self.normalised_weights();
        let mut index: HashMap<(&[TokenId], bool), usize> = HashMap::new();
        let mut out: Vec<Distinct> = Vec::new();
        let mut logs: Vec<Vec<f64>> = Vec::new();
        for (p, w) in self.particles.iter().zip(weights) {
            if p.log_weight == f64::NEG_INFINITY {
                continue;
            }
            let key = (p.tokens.as_slice(), p.eos);
            let i = *index.entry(key).or_insert_with(|| {
                out.push(Distinct {
                    tokens: p.tokens.clone(),
                    bytes: p.bytes.clone(),
                    text: p.text.clone(),
                    eos: p.eos,
                    probability: 0.0,
                    log_weight: f64::NEG_INFINITY,
                    count: 0,
                });
                logs.push(Vec::new());
                out.len() - 1
            });
            out[i].probability += w;
            out[i].count += 1;
            logs[i].push(p.log_weight);
        }
        for (d, l) in out.iter_mut().zip(&logs) {
            d.log_weight = log_sum_exp(l);
        }
        out.sort_by(|a, b| {
            b.probability
                .total_cmp(&a.probability)
                .then_with(|| a.tokens.cmp(&b.tokens))
        });
        out
    }

    /// Distinct completions merged by their bytes (different tokenisations of the same
    /// string count together; strings are compared as bytes, never as lossy text), most
    /// probable first.
    pub fn posterior_by_bytes(&self) -> Vec<Distinct> {
        merge_by_bytes(self.posterior())
    }

    /// Generated tokens per second over the run.
    pub fn tokens_per_second(&self) -> f64 {
        if self.elapsed_s > 0.0 {
            self.tokens_generated as f64 / self.elapsed_s
        } else {
            0.0
        }
    }
}

/// Merge distinct completions with the same bytes and ending (probabilities, counts and
/// weights add up), most probable first; ties keep a stable order by bytes.
fn merge_by_bytes(items: Vec<Distinct>) -> Vec<Distinct> {
    let mut index: HashMap<(Vec<u8>, bool), usize> = HashMap::new();
    let mut out: Vec<Distinct> = Vec::new();
    for d in items {
        match index.get(&(d.bytes.clone(), d.eos)) {
            Some(&i) => {
                let x = &mut out[i];
                x.probability += d.probability;
                x.count += d.count;
                x.log_weight = crate::core::logspace::log_add_exp(x.log_weight, d.log_weight);
            }
            None => {
                index.insert((d.bytes.clone(), d.eos), out.len());
                out.push(d);
            }
        }
    }
    out.sort_by(|a, b| {
        b.probability
            .total_cmp(&a.probability)
            .then_with(|| a.bytes.cmp(&b.bytes))
    });
    out
}

/// Independent runs of the same model pooled into one posterior: each run's completions
/// weighted by its `Ẑ` (the standard way to combine SMC runs), merged by bytes.
///
/// Returns `log` of the mean `Ẑ` and the completions; each [`Distinct::log_weight`] is its
/// share of the pooled `Ẑ`, `log(probability · mean Ẑ)`. Empty when every run died.
///
/// # Maths
/// With run estimates `Ẑ_r` and normalised weights `W_{r,i}`, completion `x` gets
/// `P(x) = Σ_r Ẑ_r Σ_i W_{r,i}·1[x_{r,i} = x] / Σ_r Ẑ_r`.
///
/// # Example
/// ```
/// use smc_steer::{potential::Trivial, result::pool_runs, testing::ToyKernel, FeynmanKac, Smc, SmcConfig};
/// let runs: Vec<_> = (0..3).map(|seed| {
///     let k = ToyKernel::random_bigram(2, 0.4, 1).unwrap();
///     let config = SmcConfig { seed, ..SmcConfig::default() };
///     Smc::new(k, FeynmanKac::new(Trivial), &[], config).unwrap().run().unwrap()
/// }).collect();
/// let (log_z, posterior) = pool_runs(&runs);
/// assert!(log_z.abs() < 1e-12);
/// assert!((posterior.iter().map(|d| d.probability).sum::<f64>() - 1.0).abs() < 1e-9);
/// ```
pub fn pool_runs<'a, P: 'a>(
    runs: impl IntoIterator<Item = &'a SmcResult<P>>,
) -> (f64, Vec<Distinct>) {
    let runs: Vec<&SmcResult<P>> = runs.into_iter().collect();
    let log_zs: Vec<f64> = runs.iter().map(|r| r.log_z).collect();
    let log_mean_z = crate::core::logspace::log_mean_exp(&log_zs);
    if runs.is_empty() || log_mean_z == f64::NEG_INFINITY || log_mean_z.is_nan() {
        return (log_mean_z, Vec::new());
    }
    let mut all = Vec::new();
    for r in &runs {
        let share = (r.log_z - log_mean_z).exp() / runs.len() as f64;
        for mut d in r.posterior() {
            d.probability *= share;
            all.push(d);
        }
    }
    let mut merged = merge_by_bytes(all);
    for d in &mut merged {
        d.log_weight = d.probability.ln() + log_mean_z;
    }
    (log_mean_z, merged)
}
