//! The result of a run: weighted completions, the posterior, `log Z`, ESS.

use std::collections::HashMap;

use serde::Serialize;

use crate::logspace::{log_sum_exp, normalise};
use crate::record::StepRecord;
use crate::vocab::TokenId;

/// One final particle.
#[derive(Debug, Clone, Serialize)]
pub struct Completion<P> {
    /// Generated tokens of the first context (prompt and EOS excluded).
    pub tokens: Vec<TokenId>,
    /// Their text (invalid UTF-8 replaced).
    pub text: String,
    /// Whether the sequence ended with EOS (otherwise it was truncated, finished by the
    /// program, or died).
    pub eos: bool,
    /// Final unnormalised log-weight (`-inf` for a dead particle).
    #[serde(with = "crate::record::log_value")]
    pub log_weight: f64,
    /// The program's final state.
    #[serde(skip)]
    pub program: P,
}

/// A distinct completion (same tokens and same ending) with its merged probability.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Distinct {
    /// Generated tokens.
    pub tokens: Vec<TokenId>,
    /// Their text.
    pub text: String,
    /// Whether it ended with EOS.
    pub eos: bool,
    /// Posterior probability (normalised weights summed over the copies).
    pub probability: f64,
    /// `log Σ` of the copies' unnormalised weights.
    #[serde(with = "crate::record::log_value")]
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
    #[serde(with = "crate::record::log_value")]
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
    /// use smc_steer::{potential::Trivial, toy::ToyKernel, FeynmanKac, Smc, SmcConfig};
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

    /// Distinct completions merged by text (different tokenisations of the same string
    /// count together), most probable first.
    pub fn posterior_by_text(&self) -> Vec<Distinct> {
        let mut by_text: Vec<Distinct> = Vec::new();
        for d in self.posterior() {
            match by_text
                .iter_mut()
                .find(|x| x.text == d.text && x.eos == d.eos)
            {
                Some(x) => {
                    x.probability += d.probability;
                    x.count += d.count;
                    x.log_weight = crate::logspace::log_add_exp(x.log_weight, d.log_weight);
                }
                None => by_text.push(d),
            }
        }
        by_text.sort_by(|a, b| b.probability.total_cmp(&a.probability));
        by_text
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
