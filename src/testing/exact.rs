//! Exact answers by enumeration, for toy kernels: the posterior and `Z` of a Feynman-Kac
//! model over every sequence up to the token limit.
//!
//! This is what the statistical tests compare SMC against, and it is useful to check a
//! potential on a small kernel before running it on a language model.

use std::collections::HashMap;

use crate::core::error::{Result, SmcError};
use crate::core::logspace::{log_div, log_mul, log_sum_exp};
use crate::core::vocab::TokenId;
use crate::model::program::Truncation;
use crate::potential::{Potential, SeqView};
use crate::testing::toy::ToyKernel;

/// One outcome of the generation with its unnormalised log-mass `log p(x)·φ(x)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Generated tokens (EOS excluded).
    pub tokens: Vec<TokenId>,
    /// Whether it ended with EOS (otherwise truncated at the limit).
    pub eos: bool,
    /// Unnormalised log-mass.
    pub log_mass: f64,
}

/// The exact target: every outcome with positive mass and the normaliser.
#[derive(Debug, Clone)]
pub struct Exact {
    /// Outcomes with positive mass.
    pub outcomes: Vec<Outcome>,
    /// `log Z = log Σ mass`.
    pub log_z: f64,
}

impl Exact {
    /// The normalised posterior probability of each outcome, keyed by (tokens, eos).
    pub fn posterior(&self) -> HashMap<(Vec<TokenId>, bool), f64> {
        self.outcomes
            .iter()
            .map(|o| ((o.tokens.clone(), o.eos), (o.log_mass - self.log_z).exp()))
            .collect()
    }

    /// The exact expectation of `f(tokens, eos)` under the posterior.
    pub fn expectation(&self, f: impl Fn(&[TokenId], bool) -> f64) -> f64 {
        self.outcomes
            .iter()
            .map(|o| (o.log_mass - self.log_z).exp() * f(&o.tokens, o.eos))
            .sum()
    }
}

/// Enumerate the target of [`crate::FeynmanKac`] with `potential` on `kernel` after
/// `prompt`, with the engine's token limit `max_tokens` and `truncation` policy.
///
/// # Maths
/// The engine's target: a sequence `x` ending with EOS at `|x| < T` (or `|x| = T` under
/// [`Truncation::ForceEos`]) has mass `p(x)·p(EOS|x)·φ_end(x)`; under
/// [`Truncation::Truncate`] an unfinished length-`T` sequence has mass `p(x)·φ(x)`.
/// Prefixes with `φ = 0` are pruned (a particle dies there).
///
/// # Example
/// ```
/// use smc_steer::{testing::enumerate, potential::Trivial, testing::ToyKernel, Truncation};
/// let k = ToyKernel::random_bigram(2, 0.5, 1).unwrap();
/// // Without a potential, truncation keeps all the mass: Z = 1.
/// let e = enumerate(&k, &Trivial, &[], 3, Truncation::Truncate).unwrap();
/// assert!(e.log_z.abs() < 1e-12);
/// ```
///
/// # Errors
/// [`SmcError::InvalidConfig`] when more than 2,000,000 prefixes would be visited,
/// [`SmcError::NanPotential`], or the potential's own errors ([`Potential::advance`]).
pub fn enumerate<P: Potential + ?Sized>(
    kernel: &ToyKernel,
    potential: &P,
    prompt: &[TokenId],
    max_tokens: usize,
    truncation: Truncation,
) -> Result<Exact> {
    let vocab = kernel.vocab_ref();
    let n_prefixes: f64 = (0..=max_tokens)
        .map(|t| (vocab.len() as f64).powi(t as i32))
        .sum();
    if n_prefixes > 2e6 {
        return Err(SmcError::InvalidConfig(format!(
            "enumeration would visit {n_prefixes:.0} prefixes"
        )));
    }
    let nan = |x: f64| crate::potential::checked(potential.name(), x);
    let mut outcomes = Vec::new();
    // Depth-first over (generated tokens, log p(x), log φ(x)).
    // Each prefix carries the potential's state after its tokens.
    let mut stack: Vec<(Vec<TokenId>, f64, f64, P::State)> = Vec::new();
    let root_state = potential.start(vocab);
    let root_phi = nan(potential.prefix(
        &root_state,
        &SeqView {
            tokens: &[],
            bytes: &[],
            vocab,
        },
    ))?;
    if root_phi > f64::NEG_INFINITY {
        stack.push((Vec::new(), 0.0, root_phi, root_state));
    }
    while let Some((tokens, log_p, log_phi, state)) = stack.pop() {
        let bytes = vocab.decode_bytes(&tokens);
        let view = SeqView {
            tokens: &tokens,
            bytes: &bytes,
            vocab,
        };
        let mut history = prompt.to_vec();
        history.extend_from_slice(&tokens);
        let dist = kernel.log_probs(&history);
        let at_limit = tokens.len() >= max_tokens;
        if at_limit && truncation == Truncation::Truncate {
            outcomes.push(Outcome {
                tokens,
                eos: false,
                log_mass: log_mul(log_p, log_phi),
            });
            continue;
        }
        let end = nan(potential.complete(&state, &view))?;
        let eos_mass = log_mul(log_mul(log_p, dist[vocab.len()]), end);
        if eos_mass > f64::NEG_INFINITY {
            outcomes.push(Outcome {
                tokens: tokens.clone(),
                eos: true,
                log_mass: eos_mass,
            });
        }
        if at_limit {
            continue;
        }
        for v in 0..vocab.len() as TokenId {
            let lp = log_mul(log_p, dist[v as usize]);
            if lp == f64::NEG_INFINITY {
                continue;
            }
            let mut next_state = state.clone();
            potential.advance(&mut next_state, &view, v)?;
            let mut next = tokens.clone();
            next.push(v);
            let next_bytes = vocab.decode_bytes(&next);
            let phi = nan(potential.prefix(
                &next_state,
                &SeqView {
                    tokens: &next,
                    bytes: &next_bytes,
                    vocab,
                },
            ))?;
            if log_div(phi, 0.0) > f64::NEG_INFINITY {
                stack.push((next, lp, phi, next_state));
            }
        }
    }
    outcomes.retain(|o| o.log_mass > f64::NEG_INFINITY);
    let log_z = log_sum_exp(&outcomes.iter().map(|o| o.log_mass).collect::<Vec<_>>());
    Ok(Exact { outcomes, log_z })
}
