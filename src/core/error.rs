//! Typed errors of the SMC core.
//!
//! Every fallible public function returns [`SmcError`]. The enum is `#[non_exhaustive]`
//! so that new failure modes can be added without breaking callers.

use thiserror::Error;

/// Errors raised by the SMC core, its kernels and potentials.
#[derive(Debug, Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum SmcError {
    /// The number of particles was zero.
    #[error("the number of particles must be at least 1 (got 0)")]
    ZeroParticles,
    /// The ESS threshold was outside `[0, 1]` (or NaN).
    #[error("the ESS threshold must be a ratio in [0, 1] (got {0})")]
    InvalidEssThreshold(f64),
    /// SMC-steer's beam factor `K` was zero.
    #[error("the SMC-steer extension factor K must be at least 1 (got 0)")]
    ZeroBeam,
    /// A potential returned NaN; `-inf` is the only way to reject a sequence.
    #[error("potential `{name}` returned NaN (use -inf to reject a sequence)")]
    NanPotential {
        /// The potential's name.
        name: String,
    },
    /// A proposal returned NaN or a distribution that does not sum to one.
    #[error("proposal `{name}` is invalid: {reason}")]
    InvalidProposal {
        /// The proposal's name.
        name: String,
        /// What was wrong.
        reason: String,
    },
    /// Two components disagree on the vocabulary size.
    #[error("vocabulary mismatch: {what} has {found} tokens but the kernel has {expected}")]
    VocabularyMismatch {
        /// Which component disagreed.
        what: String,
        /// The kernel's vocabulary size (ordinary tokens, without EOS).
        expected: usize,
        /// The component's vocabulary size.
        found: usize,
    },
    /// A token id outside the vocabulary (plus EOS).
    #[error("token id {token} is out of range (vocabulary has {vocab_size} tokens plus EOS)")]
    TokenOutOfRange {
        /// The offending token.
        token: u32,
        /// The vocabulary size (without EOS).
        vocab_size: usize,
    },
    /// A kernel distribution was invalid (wrong length, NaN, or not normalised).
    #[error("kernel returned an invalid distribution: {0}")]
    InvalidDistribution(String),

    /// A kernel's next-token distribution does not sum to 1 (its log-sum-exp is not 0 within
    /// [`crate::inference::smc::NORMALISATION_TOLERANCE`]): proposals would disagree on its mass.
    #[error("kernel `{kernel}` returned a distribution that is not normalised: log Σ p = {log_mass:e} (expected 0; normalise the log-probabilities, e.g. with a log-softmax)")]
    UnnormalisedDistribution {
        /// The kernel's type name.
        kernel: String,
        /// `log Σ_v p(v)` of the offending distribution.
        log_mass: f64,
    },
    /// A weight vector passed to a resampler was invalid.
    #[error("invalid weights: {0}")]
    InvalidWeights(String),
    /// A particle program misused the particle API (for example sampling from a stale
    /// distribution after appending tokens in the same sub-step).
    #[error("particle program error: {0}")]
    Program(String),
    /// A kernel ran out of room (for example the KV cache's block pool); the message names
    /// the limit and how to raise it. The kernel stays usable.
    #[error("capacity exceeded: {0}")]
    CapacityExceeded(String),
    /// A kernel (for example the transformer) failed.
    #[error("kernel error: {0}")]
    Kernel(String),
    /// A configuration value was invalid.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// A layer above the core failed at run time (the language model, a grammar matcher);
    /// the original error is kept as the [`std::error::Error::source`].
    #[error("{context}: {source}")]
    Backend {
        /// What failed, e.g. `kernel error` or `grammar matcher error`.
        context: &'static str,
        /// The original error.
        #[source]
        source: SourceError,
    },
    /// A grammar, schema or other constraint given by the user was invalid; the original
    /// error is kept as the [`std::error::Error::source`].
    #[error("invalid constraint: {source}")]
    InvalidConstraint {
        /// The original error.
        #[source]
        source: SourceError,
    },
}

/// An error from another layer kept inside [`SmcError`] (shared, so `SmcError` stays
/// `Clone`); it displays as the original, and [`SourceError::inner`] gives the original
/// back (downcast it to the layer's own error type).
#[derive(Debug, Clone)]
pub struct SourceError(std::sync::Arc<dyn std::error::Error + Send + Sync + 'static>);

impl SourceError {
    /// Keep `error`.
    pub fn new(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self(std::sync::Arc::new(error))
    }

    /// The original error.
    pub fn inner(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self.0.as_ref()
    }
}

impl std::fmt::Display for SourceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SourceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// Two kept errors are equal when they are the same error or read the same.
impl PartialEq for SourceError {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0) || self.0.to_string() == other.0.to_string()
    }
}

/// Shorthand for results of the SMC core.
pub type Result<T, E = SmcError> = std::result::Result<T, E>;
