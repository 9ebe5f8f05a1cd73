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

use std::sync::Arc;

use crate::logspace::log_mul;
use std::borrow::Cow;

use crate::vocab::{complete_text, prefix_text, TokenId, Vocabulary};

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
    /// incomplete character at the very end is held back (see [`crate::vocab::prefix_text`]).
    pub fn text(&self) -> Cow<'a, str> {
        prefix_text(self.bytes)
    }

    /// The text of this sequence as a *complete* sequence: every invalid byte, a trailing
    /// incomplete character included, reads as U+FFFD (see [`crate::vocab::complete_text`]).
    pub fn complete_text(&self) -> Cow<'a, str> {
        complete_text(self.bytes)
    }
}

/// A potential on token sequences, in log space.
///
/// Implement [`Potential::prefix`] and [`Potential::complete`]; override
/// [`Potential::log_weight_next`] when all next-token weights can be computed faster than
/// one prefix evaluation per token.
///
/// # Example
/// ```
/// use smc_steer::potential::{Potential, SeqView};
/// /// Rewards sequences with many `a` bytes.
/// struct LikesA;
/// impl Potential for LikesA {
///     fn name(&self) -> &str { "likes-a" }
///     fn prefix(&self, s: &SeqView) -> f64 { s.bytes.iter().filter(|b| **b == b'a').count() as f64 * 0.5 }
///     fn complete(&self, s: &SeqView) -> f64 { self.prefix(s) }
/// }
/// ```
pub trait Potential: Send + Sync {
    /// A name used in error messages.
    fn name(&self) -> &str;

    /// `log φ(x)` for an unfinished sequence `x`.
    fn prefix(&self, seq: &SeqView<'_>) -> f64;

    /// `log φ_end(x)` for a sequence `x` that ended with EOS.
    fn complete(&self, seq: &SeqView<'_>) -> f64;

    /// The log-weight of every next symbol: `out[v] = prefix(x·v) − prefix(x)` for ordinary
    /// tokens and `out[eos] = complete(x) − prefix(x)`. `out` has `vocab.dist_len()` entries.
    ///
    /// The default evaluates [`Potential::prefix`] once per token; when `prefix(x)` is
    /// `-inf` every entry is `-inf`.
    fn log_weight_next(&self, seq: &SeqView<'_>, out: &mut [f64]) {
        let base = self.prefix(seq);
        if base == f64::NEG_INFINITY {
            out.fill(f64::NEG_INFINITY);
            return;
        }
        let mut tokens = seq.tokens.to_vec();
        let mut bytes = seq.bytes.to_vec();
        let n_bytes = bytes.len();
        for (v, o) in out.iter_mut().enumerate().take(seq.vocab.len()) {
            tokens.push(v as TokenId);
            bytes.extend_from_slice(seq.vocab.bytes(v as TokenId));
            let view = SeqView {
                tokens: &tokens,
                bytes: &bytes,
                vocab: seq.vocab,
            };
            *o = self.prefix(&view) - base;
            tokens.pop();
            bytes.truncate(n_bytes);
        }
        out[seq.vocab.len()] = self.complete(seq) - base;
    }

    /// The vocabulary size this potential was built for, if it depends on one.
    fn vocab_size(&self) -> Option<usize> {
        None
    }
}

impl<P: Potential + ?Sized> Potential for Arc<P> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn prefix(&self, seq: &SeqView<'_>) -> f64 {
        (**self).prefix(seq)
    }
    fn complete(&self, seq: &SeqView<'_>) -> f64 {
        (**self).complete(seq)
    }
    fn log_weight_next(&self, seq: &SeqView<'_>, out: &mut [f64]) {
        (**self).log_weight_next(seq, out)
    }
    fn vocab_size(&self) -> Option<usize> {
        (**self).vocab_size()
    }
}

/// The potential that is 1 everywhere (log 0): plain sampling from the kernel.
#[derive(Debug, Clone, Copy, Default)]
pub struct Trivial;

impl Potential for Trivial {
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

impl Potential for Hard {
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

impl Potential for Soft {
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
    fn name(&self) -> &str {
        &self.name
    }
    fn prefix(&self, seq: &SeqView<'_>) -> f64 {
        seq.tokens.iter().map(|&t| self.weight(t)).sum()
    }
    fn complete(&self, seq: &SeqView<'_>) -> f64 {
        self.prefix(seq) + self.log_w[self.log_w.len() - 1]
    }
    fn log_weight_next(&self, seq: &SeqView<'_>, out: &mut [f64]) {
        if self.prefix(seq) == f64::NEG_INFINITY {
            out.fill(f64::NEG_INFINITY);
        } else {
            out.copy_from_slice(&self.log_w);
        }
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
    parts: Vec<Arc<dyn Potential>>,
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
        self.parts.push(Arc::new(p));
        self
    }

    /// Add a shared factor.
    pub fn with_arc(mut self, p: Arc<dyn Potential>) -> Self {
        self.parts.push(p);
        self
    }

    /// The factors.
    pub fn parts(&self) -> &[Arc<dyn Potential>] {
        &self.parts
    }
}

impl Potential for Product {
    fn name(&self) -> &str {
        &self.name
    }
    fn prefix(&self, seq: &SeqView<'_>) -> f64 {
        let mut total = 0.0;
        for p in &self.parts {
            total = log_mul(total, p.prefix(seq));
            if total == f64::NEG_INFINITY {
                break;
            }
        }
        total
    }
    fn complete(&self, seq: &SeqView<'_>) -> f64 {
        let mut total = 0.0;
        for p in &self.parts {
            total = log_mul(total, p.complete(seq));
            if total == f64::NEG_INFINITY {
                break;
            }
        }
        total
    }
    fn log_weight_next(&self, seq: &SeqView<'_>, out: &mut [f64]) {
        out.fill(0.0);
        let mut part = vec![0.0; out.len()];
        for p in &self.parts {
            p.log_weight_next(seq, &mut part);
            for (o, x) in out.iter_mut().zip(&part) {
                *o = log_mul(*o, *x);
            }
        }
    }
    fn vocab_size(&self) -> Option<usize> {
        self.parts.iter().find_map(|p| p.vocab_size())
    }
}

/// A potential applied step by step: it remembers `log φ` of the current prefix, so each
/// step evaluates one new prefix, and turns scores into Feynman-Kac increments
/// `log φ(x·v) − log φ(x)` (or `log φ_end(x) − log φ(x)` on EOS). A dead prefix stays dead;
/// NaN is reported as [`crate::SmcError::NanPotential`] naming the potential.
#[derive(Clone)]
pub struct Increments {
    potential: Arc<dyn Potential>,
    prefix_score: f64,
}

impl std::fmt::Debug for Increments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Increments")
            .field("potential", &self.potential.name())
            .field("prefix_score", &self.prefix_score)
            .finish()
    }
}

impl Increments {
    /// Track `potential` from the empty prefix.
    pub fn new(potential: Arc<dyn Potential>) -> Self {
        Self {
            potential,
            prefix_score: 0.0,
        }
    }

    /// The potential.
    pub fn potential(&self) -> &Arc<dyn Potential> {
        &self.potential
    }

    /// `log φ` of the current prefix.
    pub fn prefix_score(&self) -> f64 {
        self.prefix_score
    }

    fn checked(&self, x: f64) -> crate::Result<f64> {
        if x.is_nan() {
            Err(crate::SmcError::NanPotential {
                name: self.potential.name().to_string(),
            })
        } else {
            Ok(x)
        }
    }

    /// Score the starting sequence: returns `log φ(seq)` (the initial weight factor).
    ///
    /// # Errors
    /// [`crate::SmcError::NanPotential`].
    pub fn start(&mut self, seq: &SeqView<'_>) -> crate::Result<f64> {
        self.prefix_score = self.checked(self.potential.prefix(seq))?;
        Ok(self.prefix_score)
    }

    /// The increment for appending `token` to `seq` (EOS: for ending it), remembering the
    /// new prefix score.
    ///
    /// # Errors
    /// [`crate::SmcError::NanPotential`].
    pub fn increment(&mut self, seq: &SeqView<'_>, token: TokenId) -> crate::Result<f64> {
        if token == seq.vocab.eos() {
            let end = self.checked(self.potential.complete(seq))?;
            return Ok(crate::logspace::log_div(end, self.prefix_score));
        }
        let mut tokens = seq.tokens.to_vec();
        tokens.push(token);
        let mut bytes = seq.bytes.to_vec();
        bytes.extend_from_slice(seq.vocab.bytes(token));
        let next = SeqView {
            tokens: &tokens,
            bytes: &bytes,
            vocab: seq.vocab,
        };
        let score = self.checked(self.potential.prefix(&next))?;
        let inc = crate::logspace::log_div(score, self.prefix_score);
        self.prefix_score = score;
        Ok(inc)
    }

    /// Advance by an increment already known from [`Potential::log_weight_next`].
    pub fn advance_by(&mut self, increment: f64) {
        self.prefix_score = log_mul(self.prefix_score, increment);
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
        p.log_weight_next(&view, &mut out);
        assert_eq!(out, vec![1.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn product_of_hard_and_soft() {
        let v = vocab();
        let p = Product::new("p")
            .with(Hard::on_text("no-b", |t: &str| !t.contains('b')))
            .with(Soft::on_tokens("len", |t: &[TokenId]| t.len() as f64));
        let ok = SeqView {
            tokens: &[0, 0],
            bytes: b"aa",
            vocab: &v,
        };
        let bad = SeqView {
            tokens: &[0, 1],
            bytes: b"ab",
            vocab: &v,
        };
        assert_eq!(p.prefix(&ok), 2.0);
        assert_eq!(p.prefix(&bad), f64::NEG_INFINITY);
        let mut out = vec![0.0; 4];
        p.log_weight_next(&ok, &mut out);
        assert_eq!(out, vec![1.0, f64::NEG_INFINITY, 1.0, 0.0]);
        p.log_weight_next(&bad, &mut out);
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
        assert_eq!(h.prefix(&s), 0.0);
        assert_eq!(h.complete(&s), f64::NEG_INFINITY);
    }
}
