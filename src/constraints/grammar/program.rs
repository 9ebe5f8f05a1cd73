//! A hidden stand-in for the removed `Constrained` program, kept only while the CLI (being
//! split in another branch) still names it: grammar constraints are potentials used with
//! the mask or AWRS samplers, so this is exactly [`FeynmanKac`] with the grammar as its
//! [`ProposalKind::Mask`]. Delete it once the CLI builds that model itself.

use std::sync::Arc;

use crate::core::error::Result;
use crate::core::vocab::Vocabulary;
use crate::model::feynman_kac::FeynmanKac;
use crate::model::particle::Particle;
use crate::model::program::{Flow, Program, Truncation};
use crate::potential::{Potential, Trivial};
use crate::proposal::ProposalKind;

use super::llg::GrammarConstraint;

/// Deprecated: use `FeynmanKac::new(potential).with_proposal(ProposalKind::Mask(grammar))`.
#[doc(hidden)]
#[derive(Clone, Debug)]
pub struct Constrained {
    grammar: Arc<GrammarConstraint>,
    model: FeynmanKac,
}

impl Constrained {
    /// Deprecated: `FeynmanKac::new(Trivial).with_proposal(ProposalKind::Mask(grammar))`.
    pub fn new(constraint: GrammarConstraint) -> Self {
        let grammar = Arc::new(constraint);
        Self {
            model: FeynmanKac::new(Trivial).with_proposal(ProposalKind::Mask(grammar.clone())),
            grammar,
        }
    }

    /// Deprecated: `FeynmanKac::new(potential).with_proposal(ProposalKind::Mask(grammar))`.
    pub fn with_potential(self, potential: impl Potential + 'static) -> Self {
        Self {
            model: FeynmanKac::new(potential)
                .with_proposal(ProposalKind::Mask(self.grammar.clone())),
            grammar: self.grammar,
        }
    }
}

impl Program for Constrained {
    fn check(&self, vocab: &Vocabulary) -> Result<()> {
        self.model.check(vocab)
    }
    fn start(&mut self, p: &mut Particle<'_>) -> Result<()> {
        self.model.start(p)
    }
    fn step(&mut self, p: &mut Particle<'_>) -> Result<Flow> {
        self.model.step(p)
    }
    fn at_token_limit(&mut self, p: &mut Particle<'_>, policy: Truncation) -> Result<()> {
        self.model.at_token_limit(p, policy)
    }
}
