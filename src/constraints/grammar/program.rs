//! The grammar-constrained particle program.

use std::sync::Arc;

use crate::core::error::{Result, SmcError};
use crate::core::vocab::Vocabulary;
use crate::model::particle::Particle;
use crate::model::program::{Flow, Program, Truncation};
use crate::potential::{AnyState, Potential, SharedPotential};

use super::llg::{GrammarConstraint, GrammarMatcher};

/// Generation constrained to a grammar, with one llguidance matcher per particle.
///
/// # Maths
/// The target is `π(x) ∝ p(x)·1[x ∈ L]·φ_end(x)` (with the optional extra potential `φ`,
/// see [`Constrained::with_potential`]). At each step the particle's matcher gives the mask
/// `A` of next symbols that keep the output in (a prefix of) `L` (EOS only where the output
/// is in `L`); the token is drawn from `p(· | A)` and the weight gains `log P(next ∈ A)` —
/// the mask is a Bernoulli event observed with its exact probability, as
/// [`crate::ProposalKind::Mask`] does — then the extra potential's increment. Nothing is
/// forced or skipped: llguidance runs with token forcing off and a non-canonical
/// tokenizer, so every tokenization of an allowed string keeps its model probability.
///
/// Resampling clones the program, and with it the matcher (see
/// [`GrammarConstraint::with_shared_lexer_cache`] for how deep the copy is).
///
/// # Example
/// ```
/// use smc_steer::grammar::{Constrained, Grammar, GrammarConstraint};
/// use smc_steer::{testing::ToyKernel, Smc, SmcConfig, Kernel};
/// let kernel = ToyKernel::random_bigram(3, 0.2, 5).unwrap();
/// let c = GrammarConstraint::new(kernel.vocab(), Grammar::regex("a(b|c)*a")).unwrap();
/// let config = SmcConfig { particles: 16, max_tokens: 6, ..SmcConfig::default() };
/// let result = Smc::new(kernel, Constrained::new(c), &[], config).unwrap().run().unwrap();
/// for p in result.particles.iter().filter(|p| p.log_weight.is_finite() && p.eos) {
///     assert!(p.text.starts_with('a') && p.text.ends_with('a'));
/// }
/// ```
#[derive(Clone)]
pub struct Constrained {
    constraint: Arc<GrammarConstraint>,
    matcher: GrammarMatcher,
    /// The extra potential, this particle's state of it and `log φ` of the current prefix.
    potential: Option<(SharedPotential, Option<AnyState>, f64)>,
    /// Masked steps taken (statistics).
    steps: usize,
}

impl std::fmt::Debug for Constrained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constrained")
            .field("constraint", &self.constraint)
            .field("matcher", &self.matcher)
            .finish()
    }
}

impl Constrained {
    /// A program that samples under `constraint`.
    pub fn new(constraint: GrammarConstraint) -> Self {
        Self::from_arc(Arc::new(constraint))
    }

    /// As [`Constrained::new`] with a shared constraint.
    pub fn from_arc(constraint: Arc<GrammarConstraint>) -> Self {
        let matcher = constraint.matcher();
        Self {
            constraint,
            matcher,
            potential: None,
            steps: 0,
        }
    }

    /// Multiply the target by another potential (soft or hard), applied as increments
    /// `φ(x·v)/φ(x)` after each draw, as in [`crate::FeynmanKac`].
    pub fn with_potential(mut self, potential: impl Potential + 'static) -> Self {
        self.potential = Some((SharedPotential::new(potential), None, 0.0));
        self
    }

    /// The grammar constraint.
    pub fn constraint(&self) -> &GrammarConstraint {
        &self.constraint
    }

    /// This particle's matcher.
    pub fn matcher(&self) -> &GrammarMatcher {
        &self.matcher
    }

    /// The extra potential's increment for appending `t` (or ending, for EOS), advancing
    /// its state; call before `t` is appended.
    fn increment(&mut self, p: &Particle<'_>, t: u32) -> Result<f64> {
        let Some((potential, state, prefix_score)) = &mut self.potential else {
            return Ok(0.0);
        };
        let view = p.view();
        let state = state.get_or_insert_with(|| potential.start(view.vocab));
        let nan = |x: f64| crate::potential::checked(potential.name(), x);
        if t == view.vocab.eos() {
            let end = nan(potential.complete(state, &view))?;
            return Ok(crate::core::logspace::log_div(end, *prefix_score));
        }
        potential.advance(state, &view, t);
        let mut tokens = view.tokens.to_vec();
        tokens.push(t);
        let mut bytes = view.bytes.to_vec();
        bytes.extend_from_slice(view.vocab.bytes(t));
        let next = crate::potential::SeqView {
            tokens: &tokens,
            bytes: &bytes,
            vocab: view.vocab,
        };
        let score = nan(potential.prefix(state, &next))?;
        let inc = crate::core::logspace::log_div(score, *prefix_score);
        *prefix_score = score;
        Ok(inc)
    }
}

impl Program for Constrained {
    fn check(&self, vocab: &Vocabulary) -> Result<()> {
        if self.constraint.vocab_len() != vocab.len() {
            return Err(SmcError::VocabularyMismatch {
                what: format!("grammar constraint `{}`", self.constraint.name()),
                expected: vocab.len(),
                found: self.constraint.vocab_len(),
            });
        }
        if let Some((pot, _, _)) = self.potential.as_ref() {
            if let Some(found) = pot.vocab_size().filter(|n| *n != vocab.len()) {
                return Err(SmcError::VocabularyMismatch {
                    what: format!("potential `{}`", pot.name()),
                    expected: vocab.len(),
                    found,
                });
            }
        }
        Ok(())
    }

    fn start(&mut self, p: &mut Particle<'_>) -> Result<()> {
        if let Some((potential, state, prefix_score)) = &mut self.potential {
            let view = p.view();
            let s = potential.start(view.vocab);
            let initial = potential.prefix(&s, &view);
            if initial.is_nan() {
                return Err(SmcError::NanPotential {
                    name: potential.name().to_string(),
                });
            }
            *state = Some(s);
            *prefix_score = initial;
            p.score(initial)?;
        }
        Ok(())
    }

    fn step(&mut self, p: &mut Particle<'_>) -> Result<Flow> {
        let log_p = p.log_probs()?;
        let mask = self.matcher.mask()?;
        let (masked, log_mass) = mask.restrict(&log_p);
        if log_mass == f64::NEG_INFINITY {
            p.condition(false);
            return Ok(Flow::Yield);
        }
        let t = p.draw(&masked)?;
        self.steps += 1;
        // A matcher failure (a parser limit) is an error of the run, not a dead particle.
        let ok = self.matcher.try_consume(t)?;
        let inc = self.increment(p, t)?;
        p.append_to(0, t)?;
        p.score(log_mass)?;
        p.condition(ok);
        if ok {
            p.score(inc)?;
        }
        Ok(Flow::Yield)
    }

    fn at_token_limit(&mut self, p: &mut Particle<'_>, policy: Truncation) -> Result<()> {
        match policy {
            Truncation::Truncate => p.finish(),
            Truncation::ForceEos => {
                let eos = p.vocab().eos();
                if self.matcher.try_consume(eos)? {
                    let inc = self.increment(p, eos)?;
                    p.observe(eos)?;
                    p.score(inc)?;
                } else {
                    p.condition(false);
                }
            }
        }
        Ok(())
    }
}
