//! # smc-steer
//!
//! Steering language models with Sequential Monte Carlo.
//!
//! Generation is a Feynman-Kac model: a prompt `s0`, a Markov kernel `M_t` (the next-token
//! distributions of a language model, or any [`Kernel`]) and potentials `G_t`
//! ([`Potential`]) written in Rust. A particle filter ([`Smc`]) runs `N` partial sequences
//! through the kernel together, weights them by the potentials, resamples when the effective
//! sample size drops, and returns a weighted posterior ([`SmcResult`]) with an estimate of
//! the log marginal likelihood `log Z`.
//!
//! Models are written either as a [`FeynmanKac`] triple (prompt, kernel with a proposal,
//! potential) or as a LLaMPPL-style [`Program`] that acts on a [`Particle`] with `sample`,
//! `observe`, `score`, `condition`, `twist` and `finish`; the first is built on the second.
//!
//! The SMC core (this crate without default features) does not depend on candle; the
//! transformer kernel lives behind the default `lm` feature.
//!
//! ```
//! use smc_steer::{potential::Hard, toy::ToyKernel, FeynmanKac, Smc, SmcConfig};
//! let kernel = ToyKernel::random_bigram(3, 0.3, 11).unwrap();
//! let no_c = Hard::on_text("no-c", |text: &str| !text.contains('c'));
//! let config = SmcConfig { particles: 64, max_tokens: 5, ..SmcConfig::default() };
//! let result = Smc::new(kernel, FeynmanKac::new(no_c), &[], config).unwrap().run().unwrap();
//! for c in result.posterior().iter().take(3) {
//!     assert!(!c.text.contains('c'));
//! }
//! ```

#![warn(missing_docs)]

pub mod awrs;
pub mod constraints;
pub mod error;
pub mod exact;
pub mod feynman_kac;
pub mod grammar;
pub mod kernel;
pub mod logspace;
pub mod particle;
pub mod potential;
pub mod program;
pub mod proposal;
pub mod record;
pub mod replicate;
pub mod report;
pub mod resampling;
pub mod result;
pub mod sampling;
pub mod smc;
pub mod testing;
pub mod toy;
pub mod vocab;
pub mod weights;

#[cfg(feature = "lm")]
pub mod lm;

pub use error::{Result, SmcError};
pub use feynman_kac::FeynmanKac;
pub use kernel::{Extend, Extension, Kernel, SeqId};
pub use particle::{Particle, ParticleState};
pub use potential::{Potential, SeqPotential, SeqView};
pub use program::{Flow, Program, Truncation};
pub use proposal::{Proposal, ProposalKind};
pub use resampling::Resampling;
pub use result::{Completion, Distinct, SmcResult};
pub use smc::{Algorithm, Smc, SmcConfig};
pub use vocab::{TokenId, Vocabulary};

/// The README's Rust examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// The examples of docs/constraints.md, compiled and run as doctests.
#[cfg(all(doctest, feature = "grammar"))]
#[doc = include_str!("../docs/constraints.md")]
pub struct ConstraintsDocDoctests;

/// The examples of docs/potentials.md, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../docs/potentials.md")]
pub struct PotentialsDocDoctests;
