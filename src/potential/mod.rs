//! Potentials `G_t`: user-written scores of partial and complete sequences, in log space.
//!
//! A [`Potential`] gives a *prefix* score `log φ(x_{1:t})` for an unfinished sequence and a
//! *complete* score `log φ_end(x)` for a sequence that ended with EOS. The Feynman-Kac
//! potential of step `t` is the ratio `G_t = φ(x_{1:t}) / φ(x_{1:t-1})` (or
//! `φ_end(x) / φ(x)` on EOS), so the weights telescope to `φ_end(x)` and the target is
//! `π(x) ∝ p(x) · φ_end(x)`.
//!
//! Hard constraints are potentials with values `0` or `-inf`; soft scores are any finite
//! log-weights. `NaN` is never a valid value: the engine turns it into
//! [`crate::SmcError::NanPotential`].
//!
//! Potentials see the *generated* tokens (the prompt is not included) and their bytes.

use std::any::Any;
use std::borrow::Cow;
use std::cell::RefCell;
use std::sync::Arc;

use crate::core::logspace::log_mul;

use crate::core::vocab::{complete_text, prefix_text, TokenId, Vocabulary};

/// A read-only view of a particle's generated sequence.
#[derive(Debug, Clone, Copy)]
pub struct SeqView<'a> {
    /// Generated token ids (prompt excluded, EOS excluded).
    pub tokens: &'a [TokenId],
    /// Concatenated bytes of `tokens`.
    pub bytes: &'a [u8],
    /// The kernel's vocabulary.
    pub vocab: &'a Vocabulary,
}

impl<'a> SeqView<'a> {
    /// The text of this sequence as a *prefix*: invalid bytes read as U+FFFD, and only an
    /// incomplete character at the very end is held back (see [`crate::core::vocab::prefix_text`]).
    pub fn text(&self) -> Cow<'a, str> {
        prefix_text(self.bytes)
    }

    /// The text of this sequence as a *complete* sequence: every invalid byte, a trailing
    /// incomplete character included, reads as U+FFFD (see [`crate::core::vocab::complete_text`]).
    pub fn complete_text(&self) -> Cow<'a, str> {
        complete_text(self.bytes)
    }
}

/// A potential with a per-particle state, in log space.
///
/// Each particle holds a [`Potential::State`]: it starts at [`Potential::start`] (the empty
/// generated sequence), [`Potential::advance`]s by one token at a time, and the scores read
/// it — so a stateful constraint (a grammar matcher, a byte recognizer, a running count)
/// does O(1) work per token instead of re-reading the whole prefix, and cloning a particle
/// clones its state. Scores also receive the [`SeqView`] of the sequence, so a potential
/// that is a plain function of the text needs no state at all: implement [`SeqPotential`]
/// instead, which gives `Potential` with `State = ()`.
///
/// # Contract
/// * `prefix(state, x)` is `log φ(x)` for an unfinished `x`, `complete(state, x)` is
///   `log φ_end(x)` for an `x` that ended with EOS; `-inf` rejects, NaN is never valid.
/// * `state` is always the state after exactly the tokens of `x`.
/// * `log_weight_next(state, x)[v] = prefix(x·v) − prefix(x)` for ordinary `v`, and
///   `complete(x) − prefix(x)` for EOS; all `-inf` when `prefix(x)` is `-inf`.
///   [`crate::testing::assert_potential_consistent`] checks all of this.
///
/// # Example
/// A stateful count of `a` bytes (O(1) per token):
/// ```
/// use smc_steer::potential::{Potential, SeqView};
/// use smc_steer::{TokenId, Vocabulary};
/// struct LikesA;
/// impl Potential for LikesA {
///     type State = usize; // number of `a` bytes so far
///     fn name(&self) -> &str { "likes-a" }
///     fn start(&self, _: &Vocabulary) -> usize { 0 }
///     fn advance(&self, n: &mut usize, seq: &SeqView<'_>, t: TokenId) -> smc_steer::Result<()> {
///         *n += seq.vocab.bytes(t).iter().filter(|b| **b == b'a').count();
///         Ok(())
///     }
///     fn prefix(&self, n: &usize, _: &SeqView<'_>) -> f64 { 0.5 * *n as f64 }
///     fn complete(&self, n: &usize, s: &SeqView<'_>) -> f64 { self.prefix(n, s) }
/// }
/// let v = Vocabulary::from_strs(&["a", "b"]).unwrap();
/// smc_steer::testing::assert_potential_consistent(&LikesA, &v, 3);
/// ```
pub trait Potential: Send + Sync {
    /// The per-particle state (`()` for potentials that read only the [`SeqView`]).
    type State: Clone + Send + Sync + 'static;

    /// A name used in error messages.
    fn name(&self) -> &str;

    /// The state of the empty generated sequence.
    fn start(&self, vocab: &Vocabulary) -> Self::State;

    /// Advance `state` past the ordinary token `token` appended to `seq` (`seq` is the
    /// sequence *before* `token`; EOS is never advanced over).
    ///
    /// # Errors
    /// A failure of the machinery behind the state (for a grammar, llguidance exceeding a
    /// parser limit) — an error of the run, never a way to reject a token: a token outside
    /// the constraint is a state whose [`Potential::prefix`] is `-inf`.
    fn advance(
        &self,
        state: &mut Self::State,
        seq: &SeqView<'_>,
        token: TokenId,
    ) -> crate::Result<()>;

    /// `log φ(x)` for the unfinished sequence `seq` in `state`.
    fn prefix(&self, state: &Self::State, seq: &SeqView<'_>) -> f64;

    /// `log φ_end(x)` for the sequence `seq`, in `state`, that ended with EOS.
    fn complete(&self, state: &Self::State, seq: &SeqView<'_>) -> f64;

    /// The log-weight of every next symbol (see the contract); `out` has
    /// `vocab.dist_len()` entries. The default advances a copy of the state once per
    /// token; override it when all next-token weights can be computed at once.
    ///
    /// # Errors
    /// As [`Potential::advance`] (NaN scores are the caller's to check).
    fn log_weight_next(
        &self,
        state: &Self::State,
        seq: &SeqView<'_>,
        out: &mut [f64],
    ) -> crate::Result<()> {
        let base = self.prefix(state, seq);
        if base == f64::NEG_INFINITY {
            out.fill(f64::NEG_INFINITY);
            return Ok(());
        }
        let mut next = Extended::new(seq);
        for (v, o) in out.iter_mut().enumerate().take(seq.vocab.len()) {
            let mut s = state.clone();
            self.advance(&mut s, seq, v as TokenId)?;
            *o = self.prefix(&s, &next.with(v as TokenId)) - base;
        }
        if let Some(o) = out.get_mut(seq.vocab.len()) {
            *o = self.complete(state, seq) - base;
        }
        Ok(())
    }

    /// The log-weight of one next symbol, `log_weight_next(state, seq)[token]`, computed
    /// alone (what lazy samplers such as AWRS ask for).
    ///
    /// The default advances a copy of the state and scores `x·token`, whose view it builds
    /// in a per-thread buffer (one copy of the prefix's bytes per call, no allocation once
    /// warm). A potential whose [`Potential::prefix`] reads only its state should override
    /// it and skip the view, as the built-in stateful potentials do.
    ///
    /// # Errors
    /// As [`Potential::advance`].
    fn log_weight_of(
        &self,
        state: &Self::State,
        seq: &SeqView<'_>,
        token: TokenId,
    ) -> crate::Result<f64> {
        let base = self.prefix(state, seq);
        if base == f64::NEG_INFINITY {
            return Ok(f64::NEG_INFINITY);
        }
        if token == seq.vocab.eos() {
            return Ok(self.complete(state, seq) - base);
        }
        let mut s = state.clone();
        self.advance(&mut s, seq, token)?;
        Ok(with_extended(seq, token, |next| self.prefix(&s, next)) - base)
    }

    /// The vocabulary size this potential was built for, if it depends on one.
    fn vocab_size(&self) -> Option<usize> {
        None
    }
}

/// `score`, or [`crate::SmcError::NanPotential`] naming the potential when it is NaN (the one
/// check every caller of a potential applies).
///
/// # Errors
/// [`crate::SmcError::NanPotential`].
pub(crate) fn checked(name: &str, score: f64) -> crate::Result<f64> {
    if score.is_nan() {
        Err(crate::SmcError::NanPotential {
            name: name.to_string(),
        })
    } else {
        Ok(score)
    }
}

/// The state of `potential` after `tokens` (from [`Potential::start`], advancing token by
/// token), and the view of the sequence — for tests and for scoring a sequence at once.
///
/// # Errors
/// As [`Potential::advance`].
///
/// # Example
/// ```
/// use smc_steer::potential::{replay, Potential, TokenWeights};
/// use smc_steer::Vocabulary;
/// let v = Vocabulary::from_strs(&["a", "b"]).unwrap();
/// let w = TokenWeights::new("w", vec![1.0, 2.0, 0.0]).unwrap();
/// let bytes = v.decode_bytes(&[0, 1]);
/// let (state, view) = replay(&w, &v, &[0, 1], &bytes).unwrap();
/// assert_eq!(w.prefix(&state, &view), 3.0);
/// ```
pub fn replay<'a, P: Potential + ?Sized>(
    potential: &P,
    vocab: &'a Vocabulary,
    tokens: &'a [TokenId],
    bytes: &'a [u8],
) -> crate::Result<(P::State, SeqView<'a>)> {
    let mut state = potential.start(vocab);
    let mut n_bytes = 0;
    for (i, &t) in tokens.iter().enumerate() {
        let before = SeqView {
            tokens: &tokens[..i],
            bytes: &bytes[..n_bytes.min(bytes.len())],
            vocab,
        };
        potential.advance(&mut state, &before, t)?;
        n_bytes += vocab.bytes(t).len();
    }
    let view = SeqView {
        tokens,
        bytes,
        vocab,
    };
    Ok((state, view))
}

thread_local! {
    /// The buffers of [`with_extended`], kept per thread so that lazy samplers, which
    /// score many single tokens per step, do not allocate for each.
    static NEXT_VIEW: RefCell<(Vec<TokenId>, Vec<u8>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// `f` of the view of `seq` followed by the ordinary token `token`.
fn with_extended<R>(seq: &SeqView<'_>, token: TokenId, f: impl FnOnce(&SeqView<'_>) -> R) -> R {
    NEXT_VIEW.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buffers) => {
            let (tokens, bytes) = &mut *buffers;
            tokens.clear();
            tokens.extend_from_slice(seq.tokens);
            tokens.push(token);
            bytes.clear();
            bytes.extend_from_slice(seq.bytes);
            bytes.extend_from_slice(seq.vocab.bytes(token));
            f(&SeqView {
                tokens,
                bytes,
                vocab: seq.vocab,
            })
        }
        // A potential whose prefix itself scores one token (nested defaults) finds the
        // buffers in use: it gets fresh ones.
        Err(_) => f(&Extended::new(seq).with(token)),
    })
}

/// A sequence extended by one token, reusing its buffers across tokens.
struct Extended<'a> {
    vocab: &'a Vocabulary,
    tokens: Vec<TokenId>,
    bytes: Vec<u8>,
    n_bytes: usize,
}

impl<'a> Extended<'a> {
    fn new(seq: &SeqView<'a>) -> Self {
        let mut tokens = seq.tokens.to_vec();
        tokens.push(0);
        Self {
            vocab: seq.vocab,
            tokens,
            bytes: seq.bytes.to_vec(),
            n_bytes: seq.bytes.len(),
        }
    }

    /// The view of the sequence followed by `token`.
    fn with(&mut self, token: TokenId) -> SeqView<'_> {
        if let Some(last) = self.tokens.last_mut() {
            *last = token;
        }
        self.bytes.truncate(self.n_bytes);
        self.bytes.extend_from_slice(self.vocab.bytes(token));
        SeqView {
            tokens: &self.tokens,
            bytes: &self.bytes,
            vocab: self.vocab,
        }
    }
}

/// A potential that is a plain function of the sequence (no state): the easy way to write
/// one. Every `SeqPotential` is a [`Potential`] with `State = ()`.
///
/// # Example
/// ```
/// use smc_steer::potential::{SeqPotential, SeqView};
/// /// Rewards sequences with many `a` bytes.
/// struct LikesA;
/// impl SeqPotential for LikesA {
///     fn name(&self) -> &str { "likes-a" }
///     fn prefix(&self, s: &SeqView) -> f64 { s.bytes.iter().filter(|b| **b == b'a').count() as f64 * 0.5 }
///     fn complete(&self, s: &SeqView) -> f64 { self.prefix(s) }
/// }
/// ```
pub trait SeqPotential: Send + Sync {
    /// A name used in error messages.
    fn name(&self) -> &str;

    /// `log φ(x)` for an unfinished sequence `x`.
    fn prefix(&self, seq: &SeqView<'_>) -> f64;

    /// `log φ_end(x)` for a sequence `x` that ended with EOS.
    fn complete(&self, seq: &SeqView<'_>) -> f64;

    /// The log-weight of every next symbol (as [`Potential::log_weight_next`]). The default
    /// evaluates [`SeqPotential::prefix`] once per token.
    fn log_weight_next(&self, seq: &SeqView<'_>, out: &mut [f64]) {
        // `Stateless` never fails to advance.
        let _ = Potential::log_weight_next(&Stateless(self), &(), seq, out);
    }

    /// The vocabulary size this potential was built for, if it depends on one.
    fn vocab_size(&self) -> Option<usize> {
        None
    }
}

/// The default per-token loop of [`Potential`], borrowed by [`SeqPotential`].
struct Stateless<'a, P: ?Sized>(&'a P);

impl<P: SeqPotential + ?Sized> Potential for Stateless<'_, P> {
    type State = ();
    fn name(&self) -> &str {
        self.0.name()
    }
    fn start(&self, _: &Vocabulary) {}
    fn advance(&self, _: &mut (), _: &SeqView<'_>, _: TokenId) -> crate::Result<()> {
        Ok(())
    }
    fn prefix(&self, _: &(), seq: &SeqView<'_>) -> f64 {
        self.0.prefix(seq)
    }
    fn complete(&self, _: &(), seq: &SeqView<'_>) -> f64 {
        self.0.complete(seq)
    }
}

impl<P: SeqPotential + ?Sized> Potential for P {
    type State = ();
    fn name(&self) -> &str {
        SeqPotential::name(self)
    }
    fn start(&self, _: &Vocabulary) {}
    fn advance(&self, _: &mut (), _: &SeqView<'_>, _: TokenId) -> crate::Result<()> {
        Ok(())
    }
    fn prefix(&self, _: &(), seq: &SeqView<'_>) -> f64 {
        SeqPotential::prefix(self, seq)
    }
    fn complete(&self, _: &(), seq: &SeqView<'_>) -> f64 {
        SeqPotential::complete(self, seq)
    }
    fn log_weight_next(&self, _: &(), seq: &SeqView<'_>, out: &mut [f64]) -> crate::Result<()> {
        SeqPotential::log_weight_next(self, seq, out);
        Ok(())
    }
    fn vocab_size(&self) -> Option<usize> {
        SeqPotential::vocab_size(self)
    }
}

/// A type-erased potential state (what [`SharedPotential`] and [`DynPotential`] use).
pub struct AnyState(Box<dyn StateBox>);

trait StateBox: Send + Sync {
    fn clone_box(&self) -> Box<dyn StateBox>;
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

impl<T: Clone + Send + Sync + 'static> StateBox for T {
    fn clone_box(&self) -> Box<dyn StateBox> {
        Box::new(self.clone())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

impl Clone for AnyState {
    fn clone(&self) -> Self {
        Self(self.0.clone_box())
    }
}

impl std::fmt::Debug for AnyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AnyState")
    }
}

impl AnyState {
    fn new<T: Clone + Send + Sync + 'static>(state: T) -> Self {
        Self(Box::new(state))
    }
    fn get<T: 'static>(&self) -> Option<&T> {
        self.0.as_any().downcast_ref()
    }
    fn get_mut<T: 'static>(&mut self) -> Option<&mut T> {
        self.0.as_any_mut().downcast_mut()
    }
}

/// The object-safe form of [`Potential`], with [`AnyState`] states; implemented for every
/// `Potential`. Use it through [`SharedPotential`] (or `Arc<dyn DynPotential>`, as
/// [`crate::ProposalKind`] does) to hold potentials of different types together.
///
/// A state of the wrong type (one made by another potential) makes the scores NaN — which
/// the engine reports as [`crate::SmcError::NanPotential`] — never a panic.
pub trait DynPotential: Send + Sync {
    /// As [`Potential::name`].
    fn dyn_name(&self) -> &str;
    /// As [`Potential::start`].
    fn dyn_start(&self, vocab: &Vocabulary) -> AnyState;
    /// As [`Potential::advance`].
    fn dyn_advance(
        &self,
        state: &mut AnyState,
        seq: &SeqView<'_>,
        token: TokenId,
    ) -> crate::Result<()>;
    /// As [`Potential::prefix`].
    fn dyn_prefix(&self, state: &AnyState, seq: &SeqView<'_>) -> f64;
    /// As [`Potential::complete`].
    fn dyn_complete(&self, state: &AnyState, seq: &SeqView<'_>) -> f64;
    /// As [`Potential::log_weight_next`].
    fn dyn_log_weight_next(
        &self,
        state: &AnyState,
        seq: &SeqView<'_>,
        out: &mut [f64],
    ) -> crate::Result<()>;
    /// As [`Potential::log_weight_of`].
    fn dyn_log_weight_of(
        &self,
        state: &AnyState,
        seq: &SeqView<'_>,
        token: TokenId,
    ) -> crate::Result<f64>;
    /// As [`Potential::vocab_size`].
    fn dyn_vocab_size(&self) -> Option<usize>;
}

impl<P: Potential> DynPotential for P {
    fn dyn_name(&self) -> &str {
        self.name()
    }
    fn dyn_start(&self, vocab: &Vocabulary) -> AnyState {
        AnyState::new(self.start(vocab))
    }
    fn dyn_advance(
        &self,
        state: &mut AnyState,
        seq: &SeqView<'_>,
        token: TokenId,
    ) -> crate::Result<()> {
        match state.get_mut::<P::State>() {
            Some(s) => self.advance(s, seq, token),
            // The scores of a foreign state are NaN, which the caller reports.
            None => Ok(()),
        }
    }
    fn dyn_prefix(&self, state: &AnyState, seq: &SeqView<'_>) -> f64 {
        state
            .get::<P::State>()
            .map_or(f64::NAN, |s| self.prefix(s, seq))
    }
    fn dyn_complete(&self, state: &AnyState, seq: &SeqView<'_>) -> f64 {
        state
            .get::<P::State>()
            .map_or(f64::NAN, |s| self.complete(s, seq))
    }
    fn dyn_log_weight_next(
        &self,
        state: &AnyState,
        seq: &SeqView<'_>,
        out: &mut [f64],
    ) -> crate::Result<()> {
        match state.get::<P::State>() {
            Some(s) => self.log_weight_next(s, seq, out),
            None => {
                out.fill(f64::NAN);
                Ok(())
            }
        }
    }
    fn dyn_log_weight_of(
        &self,
        state: &AnyState,
        seq: &SeqView<'_>,
        token: TokenId,
    ) -> crate::Result<f64> {
        match state.get::<P::State>() {
            Some(s) => self.log_weight_of(s, seq, token),
            None => Ok(f64::NAN),
        }
    }
    fn dyn_vocab_size(&self) -> Option<usize> {
        self.vocab_size()
    }
}

/// A shared, type-erased potential: any [`Potential`] behind an `Arc`, itself a
/// `Potential` with [`AnyState`] states. Cloning it shares the potential.
#[derive(Clone)]
pub struct SharedPotential(Arc<dyn DynPotential>);

impl std::fmt::Debug for SharedPotential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedPotential({})", self.0.dyn_name())
    }
}

impl SharedPotential {
    /// Share `potential`.
    pub fn new(potential: impl Potential + 'static) -> Self {
        Self(Arc::new(potential))
    }

    /// Share an already shared potential.
    pub fn from_arc(potential: Arc<dyn DynPotential>) -> Self {
        Self(potential)
    }
}

impl Potential for SharedPotential {
    type State = AnyState;
    fn name(&self) -> &str {
        self.0.dyn_name()
    }
    fn start(&self, vocab: &Vocabulary) -> AnyState {
        self.0.dyn_start(vocab)
    }
    fn advance(
        &self,
        state: &mut AnyState,
        seq: &SeqView<'_>,
        token: TokenId,
    ) -> crate::Result<()> {
        self.0.dyn_advance(state, seq, token)
    }
    fn prefix(&self, state: &AnyState, seq: &SeqView<'_>) -> f64 {
        self.0.dyn_prefix(state, seq)
    }
    fn complete(&self, state: &AnyState, seq: &SeqView<'_>) -> f64 {
        self.0.dyn_complete(state, seq)
    }
    fn log_weight_next(
        &self,
        state: &AnyState,
        seq: &SeqView<'_>,
        out: &mut [f64],
    ) -> crate::Result<()> {
        self.0.dyn_log_weight_next(state, seq, out)
    }
    fn log_weight_of(
        &self,
        state: &AnyState,
        seq: &SeqView<'_>,
        token: TokenId,
    ) -> crate::Result<f64> {
        self.0.dyn_log_weight_of(state, seq, token)
    }
    fn vocab_size(&self) -> Option<usize> {
        self.0.dyn_vocab_size()
    }
}

/// The potential that is 1 everywhere (log 0): plain sampling from the kernel.
#[derive(Debug, Clone, Copy, Default)]
pub struct Trivial;

impl SeqPotential for Trivial {
    fn name(&self) -> &str {
        "trivial"
    }
    fn prefix(&self, _: &SeqView<'_>) -> f64 {
        0.0
    }
    fn complete(&self, _: &SeqView<'_>) -> f64 {
        0.0
    }
    fn log_weight_next(&self, _: &SeqView<'_>, out: &mut [f64]) {
        out.fill(0.0);
    }
}

/// Which sequences a [`Hard`] or [`Soft`] potential applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Scope {
    /// Prefixes and complete sequences (the constraint prunes as early as possible).
    Always,
    /// Only complete sequences (prefix score 0).
    Complete,
}

/// A predicate or score receives the view and whether the sequence is complete (text
/// predicates read [`SeqView::text`] or [`SeqView::complete_text`] accordingly).
type Pred = dyn Fn(&SeqView<'_>, bool) -> bool + Send + Sync;
type Score = dyn Fn(&SeqView<'_>, bool) -> f64 + Send + Sync;

/// The text a text predicate sees: the prefix rule for unfinished sequences, the complete
/// rule for finished ones (one rule for prefix, next-token and complete scores).
fn text_of<'a>(s: &SeqView<'a>, complete: bool) -> Cow<'a, str> {
    if complete {
        s.complete_text()
    } else {
        s.text()
    }
}

/// A hard constraint from a Boolean predicate: `log φ = 0` when it holds, `-inf` when not.
///
/// # Example
/// ```
/// use smc_steer::potential::Hard;
/// // Every word has at most 5 letters.
/// let short_words = Hard::on_text("short-words", |text: &str| {
///     text.split(|c: char| !c.is_alphabetic()).all(|w| w.chars().count() <= 5)
/// });
/// # let _ = short_words;
/// ```
#[derive(Clone)]
pub struct Hard {
    name: String,
    pred: Arc<Pred>,
    scope: Scope,
}

impl Hard {
    /// A constraint on the generated token ids.
    pub fn on_tokens(
        name: &str,
        pred: impl Fn(&[TokenId]) -> bool + Send + Sync + 'static,
    ) -> Self {
        Self {
            name: name.into(),
            pred: Arc::new(move |s: &SeqView<'_>, _| pred(s.tokens)),
            scope: Scope::Always,
        }
    }

    /// A constraint on the generated text. Prefixes are read with
    /// [`SeqView::text`] (invalid bytes as U+FFFD; only an incomplete trailing character is
    /// held back) and complete sequences with [`SeqView::complete_text`], so no invalid
    /// byte hides text from the predicate.
    pub fn on_text(name: &str, pred: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        Self {
            name: name.into(),
            pred: Arc::new(move |s: &SeqView<'_>, complete| pred(&text_of(s, complete))),
            scope: Scope::Always,
        }
    }

    /// A constraint on the whole view (tokens, bytes and vocabulary).
    pub fn on_view(
        name: &str,
        pred: impl Fn(&SeqView<'_>) -> bool + Send + Sync + 'static,
    ) -> Self {
        Self {
            name: name.into(),
            pred: Arc::new(move |s: &SeqView<'_>, _| pred(s)),
            scope: Scope::Always,
        }
    }

    /// Apply the constraint to complete sequences only.
    pub fn complete_only(mut self) -> Self {
        self.scope = Scope::Complete;
        self
    }

    fn value(ok: bool) -> f64 {
        if ok {
            0.0
        } else {
            f64::NEG_INFINITY
        }
    }
}

impl SeqPotential for Hard {
    fn name(&self) -> &str {
        &self.name
    }
    fn prefix(&self, seq: &SeqView<'_>) -> f64 {
        match self.scope {
            Scope::Always => Self::value((self.pred)(seq, false)),
            Scope::Complete => 0.0,
        }
    }
    fn complete(&self, seq: &SeqView<'_>) -> f64 {
        Self::value((self.pred)(seq, true))
    }
}

/// A soft potential from a scoring function returning a log-weight.
///
/// With [`Scope::Always`] the score applies to prefixes too (its increments steer every
/// step); with [`Scope::Complete`] only the final score counts.
#[derive(Clone)]
pub struct Soft {
    name: String,
    score: Arc<Score>,
    scope: Scope,
}

impl Soft {
    /// A score of the generated token ids.
    pub fn on_tokens(
        name: &str,
        score: impl Fn(&[TokenId]) -> f64 + Send + Sync + 'static,
    ) -> Self {
        Self {
            name: name.into(),
            score: Arc::new(move |s: &SeqView<'_>, _| score(s.tokens)),
            scope: Scope::Always,
        }
    }

    /// A score of the generated text (read as in [`Hard::on_text`]).
    pub fn on_text(name: &str, score: impl Fn(&str) -> f64 + Send + Sync + 'static) -> Self {
        Self {
            name: name.into(),
            score: Arc::new(move |s: &SeqView<'_>, complete| score(&text_of(s, complete))),
            scope: Scope::Always,
        }
    }

    /// A score of the whole view.
    pub fn on_view(
        name: &str,
        score: impl Fn(&SeqView<'_>) -> f64 + Send + Sync + 'static,
    ) -> Self {
        Self {
            name: name.into(),
            score: Arc::new(move |s: &SeqView<'_>, _| score(s)),
            scope: Scope::Always,
        }
    }

    /// Score complete sequences only.
    pub fn complete_only(mut self) -> Self {
        self.scope = Scope::Complete;
        self
    }
}

impl SeqPotential for Soft {
    fn name(&self) -> &str {
        &self.name
    }
    fn prefix(&self, seq: &SeqView<'_>) -> f64 {
        match self.scope {
            Scope::Always => (self.score)(seq, false),
            Scope::Complete => 0.0,
        }
    }
    fn complete(&self, seq: &SeqView<'_>) -> f64 {
        (self.score)(seq, true)
    }
}

/// A potential that factorises over tokens: `log φ(x) = Σ_t log_w[x_t]`, and the complete
/// score adds `log_w[eos]`. Its next-token weights are the table itself (no re-evaluation).
#[derive(Debug, Clone)]
pub struct TokenWeights {
    name: String,
    log_w: Vec<f64>,
}

impl TokenWeights {
    /// `log_w` has one entry per token plus EOS (last).
    ///
    /// # Errors
    /// [`crate::SmcError::InvalidConfig`] if `log_w` has fewer than two entries or holds NaN.
    pub fn new(name: &str, log_w: Vec<f64>) -> crate::Result<Self> {
        if log_w.len() < 2 || log_w.iter().any(|x| x.is_nan()) {
            return Err(crate::SmcError::InvalidConfig(
                "token weights need one non-NaN entry per token plus EOS".into(),
            ));
        }
        Ok(Self {
            name: name.into(),
            log_w,
        })
    }

    fn weight(&self, t: TokenId) -> f64 {
        self.log_w
            .get(t as usize)
            .copied()
            .unwrap_or(f64::NEG_INFINITY)
    }
}

impl Potential for TokenWeights {
    /// `Σ_t log_w[x_t]` so far.
    type State = f64;
    fn name(&self) -> &str {
        &self.name
    }
    fn start(&self, _: &Vocabulary) -> f64 {
        0.0
    }
    fn advance(&self, sum: &mut f64, _: &SeqView<'_>, token: TokenId) -> crate::Result<()> {
        *sum = log_mul(*sum, self.weight(token));
        Ok(())
    }
    fn prefix(&self, sum: &f64, _: &SeqView<'_>) -> f64 {
        *sum
    }
    fn complete(&self, sum: &f64, _: &SeqView<'_>) -> f64 {
        log_mul(*sum, self.log_w[self.log_w.len() - 1])
    }
    fn log_weight_next(&self, sum: &f64, _: &SeqView<'_>, out: &mut [f64]) -> crate::Result<()> {
        if *sum == f64::NEG_INFINITY {
            out.fill(f64::NEG_INFINITY);
        } else {
            out.copy_from_slice(&self.log_w);
        }
        Ok(())
    }
    fn log_weight_of(&self, sum: &f64, _: &SeqView<'_>, token: TokenId) -> crate::Result<f64> {
        Ok(if *sum == f64::NEG_INFINITY {
            f64::NEG_INFINITY
        } else {
            self.weight(token)
        })
    }
    fn vocab_size(&self) -> Option<usize> {
        Some(self.log_w.len() - 1)
    }
}

/// The product of potentials (a sum in log space).
///
/// # Example
/// ```
/// use smc_steer::potential::{Hard, Product, Soft};
/// let p = Product::new("short-and-vowelly")
///     .with(Hard::on_text("no-z", |t: &str| !t.contains('z')))
///     .with(Soft::on_text("vowels", |t: &str| t.matches(['a', 'e']).count() as f64 * 0.1));
/// # let _ = p;
/// ```
#[derive(Clone)]
pub struct Product {
    name: String,
    parts: Vec<SharedPotential>,
}

impl Product {
    /// An empty product (the trivial potential) with a name.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            parts: Vec::new(),
        }
    }

    /// Add a factor.
    pub fn with(mut self, p: impl Potential + 'static) -> Self {
        self.parts.push(SharedPotential::new(p));
        self
    }

    /// Add a shared factor.
    pub fn with_arc(mut self, p: Arc<dyn DynPotential>) -> Self {
        self.parts.push(SharedPotential::from_arc(p));
        self
    }

    /// The factors.
    pub fn parts(&self) -> &[SharedPotential] {
        &self.parts
    }
}

impl Potential for Product {
    /// One state per factor.
    type State = Vec<AnyState>;
    fn name(&self) -> &str {
        &self.name
    }
    fn start(&self, vocab: &Vocabulary) -> Vec<AnyState> {
        self.parts.iter().map(|p| p.start(vocab)).collect()
    }
    fn advance(
        &self,
        states: &mut Vec<AnyState>,
        seq: &SeqView<'_>,
        token: TokenId,
    ) -> crate::Result<()> {
        for (p, s) in self.parts.iter().zip(states.iter_mut()) {
            p.advance(s, seq, token)?;
        }
        Ok(())
    }
    fn prefix(&self, states: &Vec<AnyState>, seq: &SeqView<'_>) -> f64 {
        let mut total = 0.0;
        for (p, s) in self.parts.iter().zip(states) {
            total = log_mul(total, p.prefix(s, seq));
            if total == f64::NEG_INFINITY {
                break;
            }
        }
        total
    }
    fn complete(&self, states: &Vec<AnyState>, seq: &SeqView<'_>) -> f64 {
        let mut total = 0.0;
        for (p, s) in self.parts.iter().zip(states) {
            total = log_mul(total, p.complete(s, seq));
            if total == f64::NEG_INFINITY {
                break;
            }
        }
        total
    }
    fn log_weight_next(
        &self,
        states: &Vec<AnyState>,
        seq: &SeqView<'_>,
        out: &mut [f64],
    ) -> crate::Result<()> {
        out.fill(0.0);
        let mut part = vec![0.0; out.len()];
        for (p, s) in self.parts.iter().zip(states) {
            p.log_weight_next(s, seq, &mut part)?;
            for (o, x) in out.iter_mut().zip(&part) {
                *o = log_mul(*o, *x);
            }
        }
        Ok(())
    }
    fn log_weight_of(
        &self,
        states: &Vec<AnyState>,
        seq: &SeqView<'_>,
        token: TokenId,
    ) -> crate::Result<f64> {
        let mut total = 0.0;
        for (p, s) in self.parts.iter().zip(states) {
            total = log_mul(total, p.log_weight_of(s, seq, token)?);
            if total == f64::NEG_INFINITY {
                break;
            }
        }
        Ok(total)
    }
    fn vocab_size(&self) -> Option<usize> {
        self.parts.iter().find_map(|p| p.vocab_size())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab() -> Vocabulary {
        Vocabulary::from_strs(&["a", "b", " "]).unwrap()
    }

    #[test]
    fn default_next_weights_are_prefix_differences() {
        let v = vocab();
        let p = Soft::on_text("count-a", |t: &str| t.matches('a').count() as f64);
        let view = SeqView {
            tokens: &[0],
            bytes: b"a",
            vocab: &v,
        };
        let mut out = vec![0.0; 4];
        SeqPotential::log_weight_next(&p, &view, &mut out);
        assert_eq!(out, vec![1.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn product_of_hard_and_soft() {
        let v = vocab();
        let p = Product::new("p")
            .with(Hard::on_text("no-b", |t: &str| !t.contains('b')))
            .with(Soft::on_tokens("len", |t: &[TokenId]| t.len() as f64));
        let (ok_state, ok) = replay(&p, &v, &[0, 0], b"aa").unwrap();
        let (bad_state, bad) = replay(&p, &v, &[0, 1], b"ab").unwrap();
        assert_eq!(p.prefix(&ok_state, &ok), 2.0);
        assert_eq!(p.prefix(&bad_state, &bad), f64::NEG_INFINITY);
        let mut out = vec![0.0; 4];
        p.log_weight_next(&ok_state, &ok, &mut out).unwrap();
        assert_eq!(out, vec![1.0, f64::NEG_INFINITY, 1.0, 0.0]);
        p.log_weight_next(&bad_state, &bad, &mut out).unwrap();
        assert!(out.iter().all(|x| *x == f64::NEG_INFINITY));
    }

    #[test]
    fn complete_only_scope() {
        let v = vocab();
        let h = Hard::on_text("ends-with-b", |t: &str| t.ends_with('b')).complete_only();
        let s = SeqView {
            tokens: &[0],
            bytes: b"a",
            vocab: &v,
        };
        assert_eq!(SeqPotential::prefix(&h, &s), 0.0);
        assert_eq!(SeqPotential::complete(&h, &s), f64::NEG_INFINITY);
    }
}
