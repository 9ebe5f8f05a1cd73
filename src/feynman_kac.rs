//! The Feynman-Kac model `(s0, M_t, G_t)` as a particle program.
//!
//! `s0` is the prompt given to the engine, `M_t` the kernel (optionally replaced by a
//! proposal with importance weights), and `G_t` the increments of a [`Potential`]. This
//! program is written on top of the [`Program`] interface, so both forms run on the same
//! engine.

use std::sync::Arc;

use crate::error::{Result, SmcError};
use crate::logspace::{log_div, log_mul, log_sum_exp};
use crate::particle::Particle;
use crate::potential::{Potential, SeqView};
use crate::program::{Flow, Program, Truncation};
use crate::proposal::ProposalKind;
use crate::vocab::Vocabulary;

/// A Feynman-Kac model: kernel steps weighted by a potential.
///
/// # Maths
/// The target is `π(x) ∝ p(x)·φ_end(x)` (see [`crate::potential`]); each step multiplies the
/// weight by `p(v)/q(v) · φ(x·v)/φ(x)` for the drawn token `v` (the built-in proposals
/// simplify it, see [`ProposalKind`]).
///
/// # Example
/// ```
/// use smc_steer::{potential::Hard, toy::ToyKernel, FeynmanKac, Smc, SmcConfig};
/// let kernel = ToyKernel::random_bigram(3, 0.3, 1).unwrap();
/// let model = FeynmanKac::new(Hard::on_text("no-c", |t: &str| !t.contains('c')));
/// let config = SmcConfig { particles: 16, max_tokens: 4, ..SmcConfig::default() };
/// let result = Smc::new(kernel, model, &[], config).unwrap().run().unwrap();
/// assert!(result.log_z.is_finite());
/// ```
#[derive(Clone)]
pub struct FeynmanKac {
    potential: Arc<dyn Potential>,
    proposal: ProposalKind,
    /// `log φ` of the current prefix (so each step evaluates one new prefix only).
    prefix_score: f64,
}

impl std::fmt::Debug for FeynmanKac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeynmanKac")
            .field("potential", &self.potential.name())
            .field("proposal", &self.proposal)
            .finish()
    }
}

impl FeynmanKac {
    /// A bootstrap model: sample from the kernel, weight by the potential.
    pub fn new(potential: impl Potential + 'static) -> Self {
        Self::from_arc(Arc::new(potential))
    }

    /// As [`FeynmanKac::new`] with a shared potential.
    pub fn from_arc(potential: Arc<dyn Potential>) -> Self {
        Self {
            potential,
            proposal: ProposalKind::Bootstrap,
            prefix_score: 0.0,
        }
    }

    /// Use another proposal.
    pub fn with_proposal(mut self, proposal: ProposalKind) -> Self {
        self.proposal = proposal;
        self
    }

    /// The potential.
    pub fn potential(&self) -> &Arc<dyn Potential> {
        &self.potential
    }

    fn checked(&self, x: f64) -> Result<f64> {
        if x.is_nan() {
            Err(SmcError::NanPotential {
                name: self.potential.name().to_string(),
            })
        } else {
            Ok(x)
        }
    }

    /// `log φ(x·t) − log φ(x)` (or the complete score on EOS), updating the cached prefix.
    fn increment(&mut self, view: &SeqView<'_>, t: u32) -> Result<f64> {
        if t == view.vocab.eos() {
            let c = self.checked(self.potential.complete(view))?;
            return Ok(log_div(c, self.prefix_score));
        }
        let mut tokens = view.tokens.to_vec();
        tokens.push(t);
        let mut bytes = view.bytes.to_vec();
        bytes.extend_from_slice(view.vocab.bytes(t));
        let next = SeqView {
            tokens: &tokens,
            bytes: &bytes,
            vocab: view.vocab,
        };
        let s = self.checked(self.potential.prefix(&next))?;
        let inc = log_div(s, self.prefix_score);
        self.prefix_score = s;
        Ok(inc)
    }

    fn next_weights(&self, view: &SeqView<'_>, potential: &dyn Potential) -> Result<Vec<f64>> {
        let mut w = vec![0.0; view.vocab.dist_len()];
        potential.log_weight_next(view, &mut w);
        if w.iter().any(|x| x.is_nan()) {
            return Err(SmcError::NanPotential {
                name: potential.name().to_string(),
            });
        }
        Ok(w)
    }
}

impl Program for FeynmanKac {
    fn check(&self, vocab: &Vocabulary) -> Result<()> {
        let check = |what: &str, n: Option<usize>| match n {
            Some(found) if found != vocab.len() => Err(SmcError::VocabularyMismatch {
                what: what.to_string(),
                expected: vocab.len(),
                found,
            }),
            _ => Ok(()),
        };
        check(
            &format!("potential `{}`", self.potential.name()),
            self.potential.vocab_size(),
        )?;
        if let ProposalKind::Mask(m) = &self.proposal {
            check(&format!("mask `{}`", m.name()), m.vocab_size())?;
        }
        Ok(())
    }

    fn start(&mut self, p: &mut Particle<'_>) -> Result<()> {
        self.prefix_score = self.checked(self.potential.prefix(&p.view()))?;
        p.score(self.prefix_score)
    }

    fn step(&mut self, p: &mut Particle<'_>) -> Result<Flow> {
        let log_p = p.log_probs()?;
        match self.proposal.clone() {
            ProposalKind::Bootstrap => {
                let t = p.draw(&log_p)?;
                let inc = self.increment(&p.view(), t)?;
                p.append_to(0, t)?;
                p.score(inc)?;
            }
            ProposalKind::LocallyOptimal => {
                let w = self.next_weights(&p.view(), self.potential.as_ref())?;
                let joint: Vec<f64> = log_p.iter().zip(&w).map(|(a, b)| log_mul(*a, *b)).collect();
                let local_z = log_sum_exp(&joint);
                if local_z == f64::NEG_INFINITY {
                    p.condition(false);
                    return Ok(Flow::Yield);
                }
                let t = p.draw(&joint)?;
                if t != p.vocab().eos() {
                    self.prefix_score = log_mul(self.prefix_score, w[t as usize]);
                }
                p.append_to(0, t)?;
                p.score(local_z)?;
            }
            ProposalKind::Mask(mask) => {
                let w = self.next_weights(&p.view(), mask.as_ref())?;
                let masked: Vec<f64> = log_p
                    .iter()
                    .zip(&w)
                    .map(|(a, b)| {
                        if *b > f64::NEG_INFINITY {
                            *a
                        } else {
                            f64::NEG_INFINITY
                        }
                    })
                    .collect();
                let log_mass = log_sum_exp(&masked);
                if log_mass == f64::NEG_INFINITY {
                    p.condition(false);
                    return Ok(Flow::Yield);
                }
                let t = p.draw(&masked)?;
                let inc = self.increment(&p.view(), t)?;
                p.append_to(0, t)?;
                p.score(log_mass)?;
                p.score(inc)?;
            }
            ProposalKind::Awrs(constraint) => {
                let options = crate::awrs::AwrsOptions::default();
                let mut rng = rand_pcg::Pcg64Mcg::new(rand::Rng::random(p.rng()));
                let draw = crate::awrs::awrs(&log_p, &p.view(), constraint.as_ref(), options, &mut rng)?;
                let Some(t) = draw.token else {
                    p.condition(false);
                    return Ok(Flow::Yield);
                };
                let inc = self.increment(&p.view(), t)?;
                p.append_to(0, t)?;
                p.score(draw.log_weight)?;
                p.score(inc)?;
            }
            ProposalKind::Custom(q) => {
                let t = p.sample_with(0, q.as_ref())?;
                // `sample_with` appended t; score its potential increment on the prefix before it.
                let view = p.view();
                let before = SeqView {
                    tokens: &view.tokens[..view.tokens.len() - usize::from(t != view.vocab.eos())],
                    bytes: &view.bytes[..view.bytes.len() - view.vocab.bytes(t).len()],
                    vocab: view.vocab,
                };
                let inc = self.increment(&before, t)?;
                p.score(inc)?;
            }
        }
        Ok(Flow::Yield)
    }

    fn at_token_limit(&mut self, p: &mut Particle<'_>, policy: Truncation) -> Result<()> {
        match policy {
            Truncation::Truncate => p.finish(),
            Truncation::ForceEos => {
                let eos = p.vocab().eos();
                let inc = self.increment(&p.view(), eos)?;
                p.observe(eos)?;
                p.score(inc)?;
            }
        }
        Ok(())
    }
}
