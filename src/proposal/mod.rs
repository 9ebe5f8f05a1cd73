//! Proposals: how a particle chooses its next token.
//!
//! Sampling token `v` from a proposal `q` instead of the kernel `p` multiplies the weight by
//! the importance correction `p(v) / q(v)`, so the target is unchanged. Every proposal is a
//! [`TokenSampler`]: given the particle's next-token distribution, its sequence and its
//! potential state, it returns a token and a log-weight; the engine
//! ([`crate::FeynmanKac`]) owns the population, appends the token, applies the potential and
//! keeps `log Z`. The built-in samplers are listed in [`ProposalKind`].

pub mod awrs;

use std::sync::Arc;

use rand_pcg::Pcg64Mcg;

use crate::core::error::{Result, SmcError};
use crate::core::logspace::{log_div, log_mul, log_sum_exp};
use crate::core::sampling::{sample_log_categorical, sample_with_log_mass, with_row_buffer};
use crate::core::vocab::{TokenId, Vocabulary};
use crate::potential::{AnyState, DynPotential, Potential, SeqView, SharedPotential};

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
) -> Result<Vec<f64>> {
    let mut lq = vec![f64::NEG_INFINITY; kernel_log_probs.len()];
    q.log_probs(seq, kernel_log_probs, &mut lq);
    let total = log_sum_exp(&lq);
    if lq.iter().any(|x| x.is_nan()) || total.abs() > 1e-6 {
        return Err(SmcError::InvalidProposal {
            name: q.name().into(),
            reason: format!(
                "log q must be a normalised distribution without NaN (log Σ q = {total})"
            ),
        });
    }
    Ok(lq)
}

/// What a [`TokenSampler`] sees when it draws one token for one particle.
pub struct SamplerInput<'a> {
    /// The kernel's next-token log-probabilities (vocabulary + EOS), possibly conditioned
    /// (word steps condition on a word-boundary event).
    pub log_p: &'a [f64],
    /// The particle's generated sequence.
    pub seq: SeqView<'a>,
    /// The model's potential `G` and the particle's state of it.
    pub potential: &'a SharedPotential,
    /// The particle's state of `potential`.
    pub potential_state: &'a AnyState,
    /// The sampler's own per-particle state ([`TokenSampler::start`]), if it has one.
    pub state: Option<&'a AnyState>,
    /// The particle's random number generator.
    pub rng: &'a mut Pcg64Mcg,
}

impl SamplerInput<'_> {
    /// Draw an index from log-weights with the particle's RNG.
    ///
    /// # Errors
    /// [`SmcError::Program`] when every entry is `-inf`.
    pub fn draw(&mut self, log_q: &[f64]) -> Result<TokenId> {
        sample_log_categorical(log_q, self.rng)
            .map(|i| i as TokenId)
            .ok_or_else(|| SmcError::Program("cannot draw from a distribution with no mass".into()))
    }

    /// The potential's next-token weights in the particle's state (NaN is an error).
    ///
    /// # Errors
    /// [`SmcError::NanPotential`].
    pub fn potential_weights(&self) -> Result<Vec<f64>> {
        weights_of(self.potential, self.potential_state, &self.seq)
    }
}

/// The next-token weights of `potential` in `state` after `seq`; NaN is an error naming it.
///
/// # Errors
/// [`SmcError::NanPotential`]; the potential's own errors (a grammar matcher failing).
pub fn weights_of<P: Potential + ?Sized>(
    potential: &P,
    state: &P::State,
    seq: &SeqView<'_>,
) -> Result<Vec<f64>> {
    let mut w = Vec::new();
    weights_into(potential, state, seq, &mut w)?;
    Ok(w)
}

/// [`weights_of`] into `w` (cleared and resized to the vocabulary plus EOS, every entry
/// starting at 0, as `log_weight_next` expects).
fn weights_into<P: Potential + ?Sized>(
    potential: &P,
    state: &P::State,
    seq: &SeqView<'_>,
    w: &mut Vec<f64>,
) -> Result<()> {
    w.clear();
    w.resize(seq.vocab.dist_len(), 0.0);
    potential.log_weight_next(state, seq, w)?;
    if w.iter().any(|x| x.is_nan()) {
        return Err(SmcError::NanPotential {
            name: potential.name().to_string(),
        });
    }
    Ok(())
}

/// A sampler's draw: the token and its log-weight.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Draw {
    /// The drawn symbol (EOS included).
    pub token: TokenId,
    /// The log-weight the sampler contributes: its importance correction (e.g.
    /// `log p(v) − log q(v)`, or `log P(mask)`), to which the engine adds the potential's
    /// increment `log G(v)` — unless [`Draw::potential`] says it is already included.
    pub log_weight: f64,
    /// How the potential's increment is accounted for.
    pub potential: PotentialIncrement,
}

/// Whether a [`Draw`]'s weight already contains the potential's increment.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum PotentialIncrement {
    /// The engine computes `log G(v)` and adds it (most samplers).
    Pending,
    /// The sampler folded `log G(v)` (the given value) into its weight, as the locally
    /// optimal proposal does; the engine only records it in the prefix score.
    Included(f64),
}

/// A proposal: draws the next token of one particle and returns it with a log-weight such
/// that the engine's weights stay properly weighted for the target `p·G`.
///
/// A sampler with a constraint of its own (the mask and AWRS proposals) names it in
/// [`TokenSampler::constraint`] and keeps a per-particle state of it:
/// [`TokenSampler::start`] makes it, [`TokenSampler::advance`] moves it past each appended
/// token, and the constraint is part of the target (under [`crate::Truncation::ForceEos`]
/// the engine asks [`TokenSampler::allows_end`]). The provided methods do all of this from
/// the constraint; a sampler with another kind of state overrides them.
pub trait TokenSampler: Send + Sync {
    /// A name used in messages.
    fn name(&self) -> &str;

    /// The sampler's own Boolean constraint (allowed: a next-token weight above `-inf`),
    /// part of the target; `None` (the default) for a sampler without one.
    fn constraint(&self) -> Option<&SharedPotential> {
        None
    }

    /// The sampler's state for a new particle (`None`: it keeps none). The default is the
    /// constraint's start state.
    fn start(&self, vocab: &Vocabulary) -> Option<AnyState> {
        self.constraint().map(|c| c.start(vocab))
    }

    /// Move the sampler's state past the ordinary token `token` appended to `seq` (the
    /// default advances the constraint's state).
    ///
    /// # Errors
    /// The constraint's (see [`Potential::advance`]).
    fn advance(&self, state: &mut AnyState, seq: &SeqView<'_>, token: TokenId) -> Result<()> {
        match self.constraint() {
            Some(c) => c.advance(state, seq, token),
            None => Ok(()),
        }
    }

    /// Draw the next symbol. `Ok(None)` when no symbol can be drawn (the particle dies).
    ///
    /// # Errors
    /// A broken potential or proposal (NaN, not normalised).
    fn sample(&self, input: &mut SamplerInput<'_>) -> Result<Option<Draw>>;

    /// Whether the sequence may end here (EOS forced at the token limit): `false` when the
    /// sampler's own constraint refuses EOS.
    ///
    /// # Errors
    /// A broken constraint (NaN, or its own errors); a sampler with a constraint that was
    /// not started.
    fn allows_end(&self, state: Option<&AnyState>, seq: &SeqView<'_>) -> Result<bool> {
        let Some(c) = self.constraint() else {
            return Ok(true);
        };
        let w = c.log_weight_of(constraint_state(self.name(), state)?, seq, seq.vocab.eos())?;
        Ok(crate::potential::checked(c.name(), w)? > f64::NEG_INFINITY)
    }

    /// The vocabulary size the sampler was built for, if it depends on one (the default:
    /// its constraint's).
    fn vocab_size(&self) -> Option<usize> {
        self.constraint().and_then(|c| c.vocab_size())
    }
}

/// Sample from the kernel; the weight is the potential's increment only.
#[derive(Debug, Clone, Copy, Default)]
pub struct Bootstrap;

impl TokenSampler for Bootstrap {
    fn name(&self) -> &str {
        "bootstrap"
    }
    fn sample(&self, input: &mut SamplerInput<'_>) -> Result<Option<Draw>> {
        let token = input.draw(input.log_p)?;
        Ok(Some(Draw {
            token,
            log_weight: 0.0,
            potential: PotentialIncrement::Pending,
        }))
    }
}

/// The locally optimal proposal `q(v) ∝ p(v)·G(v)`: weight `log Σ_v p(v)·G(v)`, the same
/// for every draw.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocallyOptimal;

impl TokenSampler for LocallyOptimal {
    fn name(&self) -> &str {
        "locally-optimal"
    }
    fn sample(&self, input: &mut SamplerInput<'_>) -> Result<Option<Draw>> {
        let w = input.potential_weights()?;
        let joint: Vec<f64> = input
            .log_p
            .iter()
            .zip(&w)
            .map(|(a, b)| log_mul(*a, *b))
            .collect();
        let local_z = log_sum_exp(&joint);
        if local_z == f64::NEG_INFINITY {
            return Ok(None);
        }
        let token = input.draw(&joint)?;
        Ok(Some(Draw {
            token,
            log_weight: local_z,
            potential: PotentialIncrement::Included(w[token as usize]),
        }))
    }
}

/// Draw from the kernel restricted to the tokens a Boolean potential allows (its mask), as
/// a Bernoulli event observed with its exact probability: the weight gains
/// `log P(next ∈ mask)`. The mask is part of the target.
#[derive(Clone)]
pub struct MaskSampler {
    constraint: SharedPotential,
}

impl MaskSampler {
    /// Mask with `constraint`'s next-token weights (allowed: not `-inf`).
    pub fn new(constraint: Arc<dyn DynPotential>) -> Self {
        Self {
            constraint: SharedPotential::from_arc(constraint),
        }
    }
}

/// The constraint's state from a sampler input (started by the engine).
fn constraint_state<'a>(name: &str, state: Option<&'a AnyState>) -> Result<&'a AnyState> {
    state.ok_or_else(|| SmcError::Program(format!("sampler `{name}` was not started")))
}

impl TokenSampler for MaskSampler {
    fn name(&self) -> &str {
        self.constraint.name()
    }
    fn constraint(&self) -> Option<&SharedPotential> {
        Some(&self.constraint)
    }
    fn sample(&self, input: &mut SamplerInput<'_>) -> Result<Option<Draw>> {
        let state = constraint_state(self.name(), input.state)?;
        // The constraint's weights become the masked kernel distribution in place, in a
        // per-thread buffer (no vocabulary-sized allocation per draw once warm); the draw
        // and the mask's mass come from one pass of exponentials.
        thread_local! {
            static MASKED: std::cell::RefCell<Vec<f64>> =
                const { std::cell::RefCell::new(Vec::new()) };
        }
        with_row_buffer(&MASKED, |masked| {
            weights_into(&self.constraint, state, &input.seq, masked)?;
            for (m, lp) in masked.iter_mut().zip(input.log_p) {
                *m = if *m > f64::NEG_INFINITY {
                    *lp
                } else {
                    f64::NEG_INFINITY
                };
            }
            let Some((token, log_mass)) = sample_with_log_mass(masked, input.rng) else {
                return Ok(None);
            };
            Ok(Some(Draw {
                token: token as TokenId,
                log_weight: log_mass,
                potential: PotentialIncrement::Pending,
            }))
        })
    }
}

/// Adaptive weighted rejection sampling ([`crate::proposal::awrs`]) under a Boolean potential,
/// evaluated one token at a time. The constraint is part of the target.
#[derive(Clone)]
pub struct AwrsSampler {
    constraint: SharedPotential,
    options: crate::proposal::awrs::AwrsOptions,
}

impl AwrsSampler {
    /// AWRS under `constraint` with `options`.
    pub fn new(
        constraint: Arc<dyn DynPotential>,
        options: crate::proposal::awrs::AwrsOptions,
    ) -> Self {
        Self {
            constraint: SharedPotential::from_arc(constraint),
            options,
        }
    }
}

impl TokenSampler for AwrsSampler {
    fn name(&self) -> &str {
        self.constraint.name()
    }
    fn constraint(&self) -> Option<&SharedPotential> {
        Some(&self.constraint)
    }
    fn sample(&self, input: &mut SamplerInput<'_>) -> Result<Option<Draw>> {
        let state = constraint_state(self.name(), input.state)?;
        // A child RNG, so that the number of draws the walk makes does not shift the
        // particle's own stream.
        let mut rng = Pcg64Mcg::new(rand::Rng::random(input.rng));
        let draw = crate::proposal::awrs::awrs(
            input.log_p,
            &input.seq,
            &self.constraint,
            state,
            self.options,
            &mut rng,
        )?;
        Ok(draw.token.map(|token| Draw {
            token,
            log_weight: draw.log_weight,
            potential: PotentialIncrement::Pending,
        }))
    }
}

/// A user [`Proposal`] `q`, with the correction `log p(v) − log q(v)`.
#[derive(Clone)]
pub struct CustomSampler(pub Arc<dyn Proposal>);

impl TokenSampler for CustomSampler {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn sample(&self, input: &mut SamplerInput<'_>) -> Result<Option<Draw>> {
        let lq = checked_log_probs(self.0.as_ref(), &input.seq, input.log_p)?;
        let token = input.draw(&lq)?;
        Ok(Some(Draw {
            token,
            log_weight: log_div(input.log_p[token as usize], lq[token as usize]),
            potential: PotentialIncrement::Pending,
        }))
    }
}

/// The built-in proposals of [`crate::FeynmanKac`] (each becomes a [`TokenSampler`]; see
/// [`crate::FeynmanKac::with_sampler`] for your own).
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
    /// Adaptive weighted rejection sampling ([`crate::proposal::awrs`]) under a Boolean potential
    /// evaluated lazily, one token at a time: the token is an exact draw from `p` restricted
    /// to the constraint, the weight gains a properly weighted estimate of
    /// `P(next satisfies it)`, then `G_t`. As with [`ProposalKind::Mask`], the constraint
    /// becomes part of the target.
    Awrs(Arc<dyn DynPotential>),
}

impl ProposalKind {
    /// The sampler of this proposal (`awrs` configures [`ProposalKind::Awrs`]).
    pub fn sampler(&self, awrs: crate::proposal::awrs::AwrsOptions) -> Arc<dyn TokenSampler> {
        match self {
            ProposalKind::Bootstrap => Arc::new(Bootstrap),
            ProposalKind::LocallyOptimal => Arc::new(LocallyOptimal),
            ProposalKind::Mask(c) => Arc::new(MaskSampler::new(Arc::clone(c))),
            ProposalKind::Custom(q) => Arc::new(CustomSampler(Arc::clone(q))),
            ProposalKind::Awrs(c) => Arc::new(AwrsSampler::new(Arc::clone(c), awrs)),
        }
    }
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
