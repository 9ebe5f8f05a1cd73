//! # smc-steer
//!
//! Steering language models with Sequential Monte Carlo.
//!
//! Generation is a Feynman-Kac model: a prompt `s0`, a Markov kernel `M_t` (the next-token
//! distributions of a language model, or any [`Kernel`]) and potentials `G_t`
//! ([`Potential`]) written in Rust. A particle filter ([`Smc`]) runs `N` partial sequences
//! through the kernel together, weights them by the potentials, resamples when the effective
//! sample size drops, and returns a weighted [`Posterior`] with an estimate of the log
//! marginal likelihood `log Z`.
//!
//! The SMC core (this crate without default features) does not depend on candle; the
//! transformer kernel lives behind the default `lm` feature.

#![warn(missing_docs)]

pub mod error;
pub mod kernel;
pub mod logspace;
pub mod toy;
pub mod vocab;

#[cfg(feature = "lm")]
pub mod lm;

pub use error::{Result, SmcError};
pub use kernel::{Extend, Extension, Kernel, SeqId};
pub use vocab::{TokenId, Vocabulary};
