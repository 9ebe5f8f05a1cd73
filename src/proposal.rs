//! Proposals: how a particle chooses its next token.
//!
//! Sampling token `v` from a proposal `q` instead of the kernel `p` multiplies the weight by
//! the importance correction `p(v) / q(v)`, so the target is unchanged. The built-in
//! choices of the Feynman-Kac program are listed in [`ProposalKind`].

use std::sync::Arc;

use crate::potential::{DynPotential, SeqView};

/// A user proposal: a next-token distribution that may depend on the sequence and on the
/// kernel's distribution.
///
/// The support of `q` must cover every token with `p(v)·G(v) > 0`; tokens outside it can
/// never be drawn, which biases the result.
pub trait Proposal: Send + Sync {
    /// A name used in error messages.
    fn name(&self) -> &str;

    /// Write `log q(v)` for every symbol (vocabulary + EOS) into `out`, normalised.
    fn log_probs(&self, seq: &SeqView<'_>, kernel_log_probs: &[f64], out: &mut [f64]);
}

/// Evaluate a user proposal and check that it is a normalised distribution.
///
/// # Errors
/// [`crate::SmcError::InvalidProposal`] naming the proposal when `log q` holds NaN or does
/// not sum to one (within `1e-6` in log space).
pub fn checked_log_probs(
    q: &dyn Proposal,
    seq: &SeqView<'_>,
    kernel_log_probs: &[f64],
) -> crate::Result<Vec<f64>> {
    let mut lq = vec![f64::NEG_INFINITY; kernel_log_probs.len()];
    q.log_probs(seq, kernel_log_probs, &mut lq);
    let total = crate::logspace::log_sum_exp(&lq);
    if lq.iter().any(|x| x.is_nan()) || total.abs() > 1e-6 {
        return Err(crate::SmcError::InvalidProposal {
            name: q.name().into(),
            reason: format!(
                "log q must be a normalised distribution without NaN (log Σ q = {total})"
            ),
        });
    }
    Ok(lq)
}

/// The proposals of [`crate::FeynmanKac`].
#[derive(Clone)]
#[non_exhaustive]
pub enum ProposalKind {
    /// Sample from the kernel; weight `G_t` of the drawn token.
    Bootstrap,
    /// The locally optimal proposal for the model's potential: `q(v) ∝ p(v)·G_t(v)`, with
    /// incremental weight `log Σ_v p(v)·G_t(v)` (independent of the draw). Evaluates the
    /// potential's next-token weights for the whole vocabulary.
    LocallyOptimal,
    /// A token mask from a (Boolean) potential: allowed tokens are those with a finite
    /// next-token weight. The mask is treated as a Bernoulli event: the weight gains
    /// `log P(next ∈ mask)`, the token is drawn from `p` restricted to the mask, then the
    /// model's potential `G_t` of that token is applied.
    Mask(Arc<dyn DynPotential>),
    /// Any user proposal, with the correction `log p(v) − log q(v)` and `G_t(v)`.
    Custom(Arc<dyn Proposal>),
    /// Adaptive weighted rejection sampling ([`crate::awrs`]) under a Boolean potential
    /// evaluated lazily, one token at a time: the token is an exact draw from `p` restricted
    /// to the constraint, the weight gains a properly weighted estimate of
    /// `P(next satisfies it)`, then `G_t`. As with [`ProposalKind::Mask`], the constraint
    /// becomes part of the target.
    Awrs(Arc<dyn DynPotential>),
}

impl std::fmt::Debug for ProposalKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProposalKind::Bootstrap => write!(f, "Bootstrap"),
            ProposalKind::LocallyOptimal => write!(f, "LocallyOptimal"),
            ProposalKind::Mask(p) => write!(f, "Mask({})", p.dyn_name()),
            ProposalKind::Custom(q) => write!(f, "Custom({})", q.name()),
            ProposalKind::Awrs(c) => write!(f, "Awrs({})", c.dyn_name()),
        }
    }
}
