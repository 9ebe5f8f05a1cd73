//! A particle's state and the handle through which a particle program acts on it.
//!
//! The handle [`Particle`] offers LLaMPPL's vocabulary: [`Particle::sample`],
//! [`Particle::observe`], [`Particle::score`], [`Particle::condition`],
//! [`Particle::twist`], [`Particle::finish`]. Tokens appended in a sub-step are sent to
//! the kernel in the engine's next batched call; until then the context's distribution is
//! *stale* and cannot be sampled from (return [`crate::Flow::Continue`] to get a fresh one
//! within the same SMC step).

use std::sync::Arc;

use rand::Rng;
use rand_pcg::Pcg64Mcg;

use crate::core::error::{Result, SmcError};
use crate::core::kernel::SeqId;
use crate::core::sampling::sample_log_categorical;
use crate::core::vocab::{TokenId, Vocabulary};
use crate::potential::SeqView;
use crate::proposal::Proposal;

/// One language-model context of a particle (most particles have exactly one).
#[derive(Debug, Clone)]
pub struct Context {
    /// The kernel's handle; `None` once the particle finished and released it.
    pub(crate) seq: Option<SeqId>,
    /// Generated tokens (prompt excluded, EOS excluded).
    pub(crate) tokens: Vec<TokenId>,
    /// Bytes of `tokens`.
    pub(crate) bytes: Vec<u8>,
    /// Next-token log-probabilities after the tokens already sent to the kernel.
    pub(crate) log_probs: Arc<Vec<f64>>,
    /// Tokens appended but not yet sent to the kernel.
    pub(crate) pending: Vec<TokenId>,
    /// For each pending token: whether its kernel log-probability is added to the weight
    /// when the kernel returns it (an `observe` made while the distribution was stale).
    pub(crate) pending_scored: Vec<bool>,
    /// Whether EOS was appended to this context.
    pub(crate) ended: bool,
}

impl Context {
    pub(crate) fn new(seq: SeqId, log_probs: Vec<f64>) -> Self {
        Self {
            seq: Some(seq),
            tokens: Vec::new(),
            bytes: Vec::new(),
            log_probs: Arc::new(log_probs),
            pending: Vec::new(),
            pending_scored: Vec::new(),
            ended: false,
        }
    }

    /// Generated tokens so far.
    pub fn tokens(&self) -> &[TokenId] {
        &self.tokens
    }

    /// Whether EOS was appended.
    pub fn ended(&self) -> bool {
        self.ended
    }
}

/// The state of one particle: the user's program, its contexts and its weight.
#[derive(Debug, Clone)]
pub struct ParticleState<P> {
    /// The user's program state.
    pub program: P,
    pub(crate) contexts: Vec<Context>,
    /// Unnormalised log-weight (twist included).
    pub log_weight: f64,
    /// The twist currently included in `log_weight`, removed at the start of the next step.
    pub twist: f64,
    /// Whether the particle stopped stepping (EOS, `finish`, token limit, or death).
    pub finished: bool,
}

impl<P> ParticleState<P> {
    /// The contexts of this particle.
    pub fn contexts(&self) -> &[Context] {
        &self.contexts
    }

    /// Generated tokens of the first context.
    pub fn tokens(&self) -> &[TokenId] {
        &self.contexts[0].tokens
    }

    /// Whether the first context ended with EOS.
    pub fn ended_with_eos(&self) -> bool {
        self.contexts[0].ended
    }

    /// Whether the weight is zero.
    pub fn is_dead(&self) -> bool {
        self.log_weight == f64::NEG_INFINITY
    }
}

/// The handle a [`crate::Program`] uses to act on its particle during one sub-step.
pub struct Particle<'a> {
    pub(crate) contexts: &'a mut Vec<Context>,
    pub(crate) log_weight: &'a mut f64,
    pub(crate) twist: &'a mut f64,
    pub(crate) finished: &'a mut bool,
    pub(crate) vocab: &'a Vocabulary,
    pub(crate) rng: Pcg64Mcg,
    pub(crate) tokens_left: usize,
}

impl<'a> Particle<'a> {
    /// The particle's random number generator (seeded from the engine's master RNG).
    pub fn rng(&mut self) -> &mut impl Rng {
        &mut self.rng
    }

    /// Lend out the particle's RNG (for a sampler that needs it beside a view of the
    /// particle); give it back with [`Particle::put_rng`] so the stream continues.
    pub(crate) fn take_rng(&mut self) -> Pcg64Mcg {
        std::mem::replace(&mut self.rng, Pcg64Mcg::new(0))
    }

    /// Give back the RNG lent by [`Particle::take_rng`].
    pub(crate) fn put_rng(&mut self, rng: Pcg64Mcg) {
        self.rng = rng;
    }

    /// The kernel's vocabulary.
    pub fn vocab(&self) -> &'a Vocabulary {
        self.vocab
    }

    /// Number of contexts.
    pub fn n_contexts(&self) -> usize {
        self.contexts.len()
    }

    fn ctx(&self, i: usize) -> Result<&Context> {
        self.contexts.get(i).ok_or_else(|| {
            SmcError::Program(format!(
                "context {i} does not exist ({} contexts)",
                self.contexts.len()
            ))
        })
    }

    fn ctx_mut(&mut self, i: usize) -> Result<&mut Context> {
        let n = self.contexts.len();
        self.contexts
            .get_mut(i)
            .ok_or_else(|| SmcError::Program(format!("context {i} does not exist ({n} contexts)")))
    }

    /// Whether context `i` ended with EOS.
    ///
    /// # Errors
    /// [`SmcError::Program`] if context `i` does not exist.
    pub fn context_ended(&self, i: usize) -> Result<bool> {
        Ok(self.ctx(i)?.ended)
    }

    /// Generated tokens of the first context (pending ones included).
    pub fn tokens(&self) -> &[TokenId] {
        &self.contexts[0].tokens
    }

    /// The first context's generated sequence as a view for potentials.
    pub fn view(&self) -> SeqView<'_> {
        self.view_of(0).unwrap_or(SeqView {
            tokens: &[],
            bytes: &[],
            vocab: self.vocab,
        })
    }

    /// Context `i`'s generated sequence as a view for potentials.
    ///
    /// # Errors
    /// [`SmcError::Program`] if context `i` does not exist.
    pub fn view_of(&self, i: usize) -> Result<SeqView<'_>> {
        let c = self.ctx(i)?;
        Ok(SeqView {
            tokens: &c.tokens,
            bytes: &c.bytes,
            vocab: self.vocab,
        })
    }

    /// Generated text of the first context, read as a prefix (see
    /// [`crate::core::vocab::prefix_text`]).
    pub fn text(&self) -> std::borrow::Cow<'_, str> {
        crate::core::vocab::prefix_text(&self.contexts[0].bytes)
    }

    /// How many more tokens the first context may generate before the token limit.
    pub fn tokens_left(&self) -> usize {
        self.tokens_left
    }

    /// The current log-weight (twist included).
    pub fn log_weight(&self) -> f64 {
        *self.log_weight
    }

    /// Whether the particle has finished.
    pub fn is_finished(&self) -> bool {
        *self.finished
    }

    /// The next-token log-probabilities of context `i` (vocabulary + EOS).
    ///
    /// # Errors
    /// [`SmcError::Program`] if tokens were appended to the context in this sub-step (the
    /// distribution is stale until the kernel sees them).
    pub fn log_probs_of(&self, i: usize) -> Result<Arc<Vec<f64>>> {
        let c = self.ctx(i)?;
        if !c.pending.is_empty() {
            return Err(SmcError::Program(
                "the next-token distribution is stale: tokens were appended in this sub-step; return Flow::Continue to get a fresh one".into(),
            ));
        }
        if c.ended {
            return Err(SmcError::Program(
                "the context already ended with EOS".into(),
            ));
        }
        Ok(Arc::clone(&c.log_probs))
    }

    /// The next-token log-probabilities of the first context.
    ///
    /// # Errors
    /// As [`Particle::log_probs_of`].
    pub fn log_probs(&self) -> Result<Arc<Vec<f64>>> {
        self.log_probs_of(0)
    }

    /// Append `token` to context `i` without changing the weight. EOS ends the context and
    /// finishes the particle.
    ///
    /// # Errors
    /// Out-of-range token, or a context that already ended.
    pub fn append_to(&mut self, i: usize, token: TokenId) -> Result<()> {
        self.vocab.check(token)?;
        let eos = self.vocab.eos();
        let vocab = self.vocab;
        let c = self.ctx_mut(i)?;
        if c.ended {
            return Err(SmcError::Program(
                "cannot append to a context that ended with EOS".into(),
            ));
        }
        if token == eos {
            c.ended = true;
            *self.finished = true;
        } else {
            c.tokens.push(token);
            c.bytes.extend_from_slice(vocab.bytes(token));
            c.pending.push(token);
            c.pending_scored.push(false);
        }
        Ok(())
    }

    /// Draw an index from a log-distribution with the particle's RNG (no weight change).
    ///
    /// # Errors
    /// [`SmcError::Program`] if every entry is `-inf`.
    pub fn draw(&mut self, log_q: &[f64]) -> Result<TokenId> {
        sample_log_categorical(log_q, &mut self.rng)
            .map(|i| i as TokenId)
            .ok_or_else(|| SmcError::Program("cannot draw from a distribution with no mass".into()))
    }

    /// Sample the next token of the first context from the kernel (weight unchanged) and
    /// append it.
    ///
    /// # Errors
    /// As [`Particle::log_probs_of`].
    pub fn sample(&mut self) -> Result<TokenId> {
        self.sample_in(0)
    }

    /// Sample the next token of context `i` from the kernel and append it.
    ///
    /// # Errors
    /// As [`Particle::log_probs_of`].
    pub fn sample_in(&mut self, i: usize) -> Result<TokenId> {
        let lp = self.log_probs_of(i)?;
        let t = self.draw(&lp)?;
        self.append_to(i, t)?;
        Ok(t)
    }

    /// Sample the next token of context `i` from a proposal, multiply the weight by
    /// `p(v) / q(v)` and append it.
    ///
    /// # Errors
    /// [`SmcError::InvalidProposal`] if `q` is not a normalised distribution; otherwise as
    /// [`Particle::log_probs_of`].
    pub fn sample_with(&mut self, i: usize, q: &dyn Proposal) -> Result<TokenId> {
        let lp = self.log_probs_of(i)?;
        let lq = crate::proposal::checked_log_probs(q, &self.view_of(i)?, &lp)?;
        let t = self.draw(&lq)?;
        self.score(lp[t as usize] - lq[t as usize])?;
        self.append_to(i, t)?;
        Ok(t)
    }

    /// Observe `token` in the first context: weight += log p(token), then append it. A
    /// `-inf` score finishes the particle (dead); EOS finishes it.
    ///
    /// # Errors
    /// Out-of-range token or a context that already ended.
    pub fn observe(&mut self, token: TokenId) -> Result<()> {
        self.observe_tokens_in(0, &[token])
    }

    /// Observe several tokens in a row in context `i` (a fixed fragment). The first token's
    /// log-probability is added now when the distribution is fresh; the others' are added
    /// when the kernel returns them after the engine's next batched call (no extra pass).
    ///
    /// # Errors
    /// Out-of-range token, EOS before the last token, or a context that already ended.
    pub fn observe_tokens_in(&mut self, i: usize, tokens: &[TokenId]) -> Result<()> {
        let eos = self.vocab.eos();
        for (k, &t) in tokens.iter().enumerate() {
            self.vocab.check(t)?;
            if t == eos && k + 1 != tokens.len() {
                return Err(SmcError::Program(
                    "EOS can only be the last observed token".into(),
                ));
            }
        }
        for &t in tokens {
            let fresh = self.ctx(i)?.pending.is_empty();
            if fresh {
                let lp = self.log_probs_of(i)?;
                self.append_to(i, t)?;
                self.score(lp[t as usize])?;
            } else {
                self.append_to(i, t)?;
                if t == eos {
                    return Err(SmcError::Program(
                        "EOS cannot be observed after tokens appended in the same sub-step".into(),
                    ));
                }
                if let Some(flag) = self.contexts[i].pending_scored.last_mut() {
                    *flag = true;
                }
            }
            if *self.finished {
                break;
            }
        }
        Ok(())
    }

    /// Multiply the weight by `exp(log_w)`; `-inf` finishes the particle (dead).
    ///
    /// # Errors
    /// [`SmcError::Program`] if `log_w` is NaN or `+inf`.
    pub fn score(&mut self, log_w: f64) -> Result<()> {
        if log_w.is_nan() || log_w == f64::INFINITY {
            return Err(SmcError::Program(format!(
                "score must be a finite log-weight or -inf (got {log_w})"
            )));
        }
        *self.log_weight += log_w;
        if *self.log_weight == f64::NEG_INFINITY {
            *self.finished = true;
        }
        Ok(())
    }

    /// Keep the particle only if `ok` (a hard constraint): otherwise its weight becomes 0.
    pub fn condition(&mut self, ok: bool) {
        if !ok {
            *self.log_weight = f64::NEG_INFINITY;
            *self.finished = true;
        }
    }

    /// Add a twist: it counts for resampling in this step and is removed at the start of
    /// the next step, so it guides the particles without changing the target.
    ///
    /// # Errors
    /// [`SmcError::Program`] if `log_w` is NaN or `+inf`.
    pub fn twist(&mut self, log_w: f64) -> Result<()> {
        if log_w.is_nan() || log_w == f64::INFINITY {
            return Err(SmcError::Program(format!(
                "twist must be finite or -inf (got {log_w})"
            )));
        }
        if log_w == f64::NEG_INFINITY {
            // A -inf twist cannot be undone: it is a hard rejection.
            self.condition(false);
            return Ok(());
        }
        *self.twist += log_w;
        *self.log_weight += log_w;
        Ok(())
    }

    /// Remove the current twist now (it is also removed automatically before each step).
    pub fn untwist(&mut self) {
        *self.log_weight -= *self.twist;
        *self.twist = 0.0;
    }

    /// Stop stepping this particle; it stays in the population with its weight.
    pub fn finish(&mut self) {
        *self.finished = true;
    }
}
