//! Adaptive weighted rejection sampling (AWRS; after Lipkin et al. 2025) for Boolean
//! token constraints that are expensive to evaluate.
//!
//! Instead of evaluating the constraint on every token to build a mask, AWRS visits tokens
//! in an order sampled from the kernel and evaluates the constraint lazily:
//!
//! 1. **Sample.** Draw tokens from `p` *without replacement* until one is accepted. The
//!    accepted token `x` is an exact draw from `p(· | c)`; the rejected set `R` is known to
//!    carry no constrained mass.
//! 2. **Weigh.** `Z = Σ_v p(v)·c(v)` also equals `Σ_{v ∉ R} p(v)·c(v)` exactly, so
//!    `Z = (1 − p(R))·a` with `a` the acceptance probability under `p` restricted to
//!    `V ∖ R`. A fresh *sum-and-sample* estimate of `a` from `k` draws without replacement
//!    from `V ∖ R` (`Σ_{i<k} q_i c_i + (1 − Σ_{i<k} q_i) c_k`, with `q` the renormalised
//!    masses) is unbiased and independent of `x` given `R`, so the weight
//!    `w = (1 − p(R))·â` satisfies `E[w | x] = Z`: the pair `(x, w)` is properly weighted,
//!    `E[w·f(x)] = Σ_v p(v)·c(v)·f(v)`.
//!
//! Evaluations are cached within a call: the estimate's draws often hit `x` or tokens
//! already rejected, which cost nothing.

use std::collections::HashMap;

use rand::Rng;

use crate::error::{Result, SmcError};
use crate::potential::SeqView;
use crate::vocab::TokenId;

/// A Boolean constraint on the next token, evaluated one token at a time.
pub trait TokenConstraint: Send + Sync {
    /// A name for error messages.
    fn name(&self) -> &str;
    /// Whether `token` (possibly EOS) may follow `seq`.
    fn allows(&self, seq: &SeqView<'_>, token: TokenId) -> bool;
}

/// Any potential is a token constraint: a token is allowed when its next-token weight is
/// not `-inf` (evaluated through [`crate::Potential::prefix`]/[`crate::Potential::complete`]
/// for that token only).
#[derive(Clone)]
pub struct PotentialConstraint<P>(pub P);

impl<P: crate::Potential> TokenConstraint for PotentialConstraint<P> {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn allows(&self, seq: &SeqView<'_>, token: TokenId) -> bool {
        if token == seq.vocab.eos() {
            return self.0.complete(seq) > f64::NEG_INFINITY;
        }
        let mut tokens = seq.tokens.to_vec();
        tokens.push(token);
        let mut bytes = seq.bytes.to_vec();
        bytes.extend_from_slice(seq.vocab.bytes(token));
        self.0.prefix(&SeqView {
            tokens: &tokens,
            bytes: &bytes,
            vocab: seq.vocab,
        }) > f64::NEG_INFINITY
    }
}

/// Options of [`awrs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AwrsOptions {
    /// Draws of the sum-and-sample estimate of the acceptance probability (default 2;
    /// more draws, lower variance, more evaluations).
    pub estimate_draws: usize,
}

impl Default for AwrsOptions {
    fn default() -> Self {
        Self { estimate_draws: 2 }
    }
}

/// The outcome of one AWRS draw.
#[derive(Debug, Clone, PartialEq)]
pub struct AwrsDraw {
    /// The accepted token; `None` when no token satisfies the constraint.
    pub token: Option<TokenId>,
    /// `log w`, an unbiased estimate of `log`-free `Z = Σ p·c` in the sense `E[w | token] = Z`
    /// (`-inf` when nothing is accepted).
    pub log_weight: f64,
    /// Distinct tokens on which the constraint was evaluated.
    pub evaluations: usize,
}

/// Draws from a categorical distribution without replacement, by inverse CDF with
/// rejection of removed entries (rebuilt when most of the mass is removed).
struct WithoutReplacement<'a> {
    probs: &'a [f64],
    removed: Vec<bool>,
    cdf: Vec<f64>,
    /// Mass covered by `cdf` (entries removed after its build still count in it).
    cdf_mass: f64,
    /// Mass not removed.
    remaining: f64,
}

impl<'a> WithoutReplacement<'a> {
    fn new(probs: &'a [f64]) -> Self {
        let removed = vec![false; probs.len()];
        let mut s = Self {
            probs,
            removed,
            cdf: Vec::new(),
            cdf_mass: 0.0,
            remaining: 0.0,
        };
        s.rebuild();
        s
    }

    fn rebuild(&mut self) {
        self.cdf.clear();
        let mut acc = 0.0;
        for (p, r) in self.probs.iter().zip(&self.removed) {
            if !*r {
                acc += p;
            }
            self.cdf.push(acc);
        }
        self.cdf_mass = acc;
        self.remaining = acc;
    }

    fn remove(&mut self, i: usize) {
        if !self.removed[i] {
            self.removed[i] = true;
            self.remaining -= self.probs[i];
            if self.remaining < 0.5 * self.cdf_mass {
                self.rebuild();
            }
        }
    }

    fn draw<R: Rng + ?Sized>(&self, rng: &mut R) -> Option<usize> {
        if self.remaining <= 0.0 || self.cdf_mass <= 0.0 {
            return None;
        }
        loop {
            let u = rng.random::<f64>() * self.cdf_mass;
            let i = self
                .cdf
                .partition_point(|c| *c <= u)
                .min(self.probs.len() - 1);
            if !self.removed[i] && self.probs[i] > 0.0 {
                return Some(i);
            }
        }
    }
}

/// One AWRS draw from kernel log-probabilities `log_p` under `constraint`.
///
/// # Errors
/// [`SmcError::InvalidConfig`] when `options.estimate_draws` is 0.
///
/// # Example
/// ```
/// use rand::SeedableRng;
/// use smc_steer::awrs::{awrs, AwrsOptions, TokenConstraint};
/// use smc_steer::{SeqView, Vocabulary};
/// struct NotB;
/// impl TokenConstraint for NotB {
///     fn name(&self) -> &str { "not-b" }
///     fn allows(&self, _: &SeqView<'_>, t: u32) -> bool { t != 1 }
/// }
/// let v = Vocabulary::from_strs(&["a", "b"]).unwrap();
/// let view = SeqView { tokens: &[], bytes: &[], vocab: &v };
/// let log_p = [0.5f64.ln(), 0.3f64.ln(), 0.2f64.ln()];
/// let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(1);
/// let d = awrs(&log_p, &view, &NotB, AwrsOptions::default(), &mut rng).unwrap();
/// assert_ne!(d.token, Some(1));
/// ```
pub fn awrs<R: Rng + ?Sized>(
    log_p: &[f64],
    seq: &SeqView<'_>,
    constraint: &dyn TokenConstraint,
    options: AwrsOptions,
    rng: &mut R,
) -> Result<AwrsDraw> {
    if options.estimate_draws == 0 {
        return Err(SmcError::InvalidConfig(
            "AWRS needs at least one estimate draw".into(),
        ));
    }
    let max = log_p.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return Ok(AwrsDraw {
            token: None,
            log_weight: f64::NEG_INFINITY,
            evaluations: 0,
        });
    }
    // Probabilities relative to the largest; `scale` turns them back into kernel mass.
    let probs: Vec<f64> = log_p.iter().map(|x| (x - max).exp()).collect();
    let total: f64 = probs.iter().sum();
    let mut cache: HashMap<usize, bool> = HashMap::new();
    let mut eval = |i: usize| {
        *cache
            .entry(i)
            .or_insert_with(|| constraint.allows(seq, i as TokenId))
    };

    // 1. Sample without replacement until the first acceptance.
    let mut pool = WithoutReplacement::new(&probs);
    let accepted = loop {
        match pool.draw(rng) {
            None => break None,
            Some(i) if eval(i) => break Some(i),
            Some(i) => pool.remove(i),
        }
    };
    let Some(x) = accepted else {
        return Ok(AwrsDraw {
            token: None,
            log_weight: f64::NEG_INFINITY,
            evaluations: cache.len(),
        });
    };
    // Mass outside the rejected set, summed directly to avoid cancellation.
    let outside: f64 = probs
        .iter()
        .zip(&pool.removed)
        .filter(|(_, r)| !**r)
        .map(|(p, _)| p)
        .sum();

    // 2. Sum-and-sample estimate of the acceptance probability on V ∖ R, fresh draws.
    let mut fresh = WithoutReplacement::new(&probs);
    for (i, r) in pool.removed.iter().enumerate() {
        if *r {
            fresh.removed[i] = true;
        }
    }
    fresh.rebuild();
    let mut estimate = 0.0;
    let mut left = 1.0; // mass fraction of V ∖ R not yet drawn
    for k in 0..options.estimate_draws {
        let Some(i) = fresh.draw(rng) else { break };
        let q = probs[i] / outside;
        let c = if eval(i) { 1.0 } else { 0.0 };
        if k + 1 == options.estimate_draws {
            estimate += left * c;
        } else {
            estimate += q * c;
            left -= q;
            fresh.remove(i);
        }
    }
    let log_weight = (outside / total).ln() + estimate.ln() + crate::logspace::log_sum_exp(log_p);
    let log_weight = if estimate > 0.0 {
        log_weight
    } else {
        f64::NEG_INFINITY
    };
    Ok(AwrsDraw {
        token: Some(x as TokenId),
        log_weight,
        evaluations: cache.len(),
    })
}
