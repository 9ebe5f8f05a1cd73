//! Particle programs: a model written as a step function over a particle (LLaMPPL style).

use serde::{Deserialize, Serialize};

use crate::core::error::Result;
use crate::core::vocab::Vocabulary;
use crate::model::particle::Particle;

/// What a program's step asks the engine to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// The SMC step is over for this particle: the engine sends its pending tokens to the
    /// kernel, then reweights and possibly resamples the population.
    Yield,
    /// The particle needs a fresh distribution within the same SMC step (for example to
    /// sample a second token of a multi-token step): the engine makes its batched kernel
    /// call and calls [`Program::step`] again, without resampling in between.
    Continue,
}

/// What happens when a particle reaches the token limit.
///
/// # Targets
/// * [`Truncation::Truncate`]: the particle stops without EOS. The target is the law of the
///   generation *truncated at `T` tokens*: sequences that ended earlier have mass
///   `p(x, EOS)·φ_end(x)`, and unfinished length-`T` prefixes have mass `p(x)·φ(x)` (their
///   prefix score).
/// * [`Truncation::ForceEos`]: EOS is observed at the limit, adding `log p(EOS | x)` (and,
///   for [`crate::FeynmanKac`], the complete score). The target is the model *conditioned
///   on ending within `T` tokens*: `π(x) ∝ p(x, EOS)·φ_end(x)·1[|x| ≤ T]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Truncation {
    /// Stop without EOS (the default).
    #[default]
    Truncate,
    /// Observe EOS at the limit.
    ForceEos,
}

/// A particle program: the model, written as a step function.
///
/// The engine clones the initial program into every particle, calls [`Program::start`]
/// once per particle, then calls [`Program::step`] on every live particle at each SMC step
/// (in parallel, each with its own seeded RNG).
///
/// # Example
/// ```
/// use smc_steer::{Flow, Particle, Program, Result};
/// /// Sample tokens; reject any sequence containing token 1.
/// #[derive(Clone)]
/// struct NoOnes;
/// impl Program for NoOnes {
///     fn step(&mut self, p: &mut Particle<'_>) -> Result<Flow> {
///         let t = p.sample()?;
///         p.condition(t != 1);
///         Ok(Flow::Yield)
///     }
/// }
/// ```
pub trait Program: Clone + Send + Sync {
    /// Check the program against the kernel's vocabulary before anything runs.
    ///
    /// # Errors
    /// [`crate::SmcError::VocabularyMismatch`] or any configuration error.
    fn check(&self, _vocab: &Vocabulary) -> Result<()> {
        Ok(())
    }

    /// Called once per particle before the first step (for an initial score, say).
    ///
    /// # Errors
    /// Any error aborts the run.
    fn start(&mut self, _p: &mut Particle<'_>) -> Result<()> {
        Ok(())
    }

    /// One step (or sub-step, see [`Flow::Continue`]) of the particle.
    ///
    /// # Errors
    /// Any error aborts the run with that error.
    fn step(&mut self, p: &mut Particle<'_>) -> Result<Flow>;

    /// Called when the first context reached the token limit (its distribution is fresh).
    /// The default observes EOS in *every* context that has not ended (all of them share
    /// the generated text, so all of them end it) for [`Truncation::ForceEos`], and simply
    /// finishes for [`Truncation::Truncate`]. A program whose own constraint must allow
    /// EOS (as [`crate::FeynmanKac`]'s mask and AWRS proposals do) overrides it.
    ///
    /// # Errors
    /// Any error aborts the run.
    fn at_token_limit(&mut self, p: &mut Particle<'_>, policy: Truncation) -> Result<()> {
        match policy {
            Truncation::ForceEos => {
                let eos = p.vocab().eos();
                for i in 0..p.n_contexts() {
                    if p.log_weight() == f64::NEG_INFINITY {
                        break;
                    }
                    if !p.context_ended(i)? {
                        p.observe_tokens_in(i, &[eos])?;
                    }
                }
                Ok(())
            }
            Truncation::Truncate => {
                p.finish();
                Ok(())
            }
        }
    }
}
