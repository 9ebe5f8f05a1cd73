//! Adaptive weighted rejection sampling (AWRS; Lipkin et al. 2025, "Fast controlled
//! generation from language models with adaptive weighted rejection sampling") for Boolean
//! token constraints that are expensive to evaluate.
//!
//! Instead of evaluating the constraint on every token to build a mask, AWRS visits tokens
//! in an order sampled from the kernel (sampling *without replacement*) and evaluates the
//! constraint lazily:
//!
//! 1. **Sample.** Walk until the first accepted token `x`. It is an exact draw from
//!    `p(· | c)`, since rejected tokens carry no constrained mass.
//! 2. **Weigh.** Keep walking while the mass not yet visited, `r`, is large compared with
//!    the accepted mass found, `a` (the walk stops once `r ≤ ρ·a`, or after
//!    [`AwrsOptions::max_walk`] more evaluations); then draw *one* more token `y` from the
//!    unvisited rest and return
//!    `w = (a + r·c(y)) · Σ_v p(v)`, with `a` and `r` as fractions of the total mass.
//!    When the walk visits every token, `w` is the exact `Z = Σ_v p(v)·c(v)`.
//!
//! # Why the weight is proper
//! Write `Z_S` for the constrained mass of an unvisited set `S`, as a fraction of `p(S)`.
//! Visiting `v ~ p(· | S)` gives `Z_S = q_v·c(v) + (1 − q_v)·Z_{S∖v}` with `q_v = p(v)/p(S)`.
//! At every step the walk either recurses on this identity (continue) or replaces `Z_{S∖v}`
//! by the unbiased one-draw estimate `c(y)` (stop), and the decision depends only on tokens
//! already visited; by induction over the walk, `E[w·f(x)] = Σ_v p(v)·c(v)·f(v)` for every
//! `f` (the same argument as the paper's recursive estimator, which is the case `ρ = ∞`:
//! stop right after the first acceptance; see [`AwrsOptions::recursive`]). The weight is
//! positive whenever a token is accepted, so a particle dies only when no token satisfies
//! the constraint.
//!
//! # Cost and variance
//! With the default `ρ = 1/2`, the relative variance of `w` is at most `ρ² = 1/4` and is
//! usually far smaller; a peaked distribution whose top tokens are allowed stops after two
//! evaluations, while a sparse constraint under a flat distribution walks most of the
//! vocabulary (the cost of a full mask, never more).
//!
//! Evaluations are cached within a call.

use std::collections::HashMap;

use rand::Rng;

use crate::core::error::{Result, SmcError};
use crate::core::vocab::TokenId;
use crate::potential::{Potential, SeqView};

/// Options of [`awrs`]: when the weight walk stops.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AwrsOptions {
    /// `ρ`: after the first acceptance, stop walking once the unvisited mass is at most `ρ`
    /// times the accepted mass found (default `0.5`). `0` walks the whole support (exact
    /// weights); `f64::INFINITY` stops right after the first acceptance (the recursive
    /// estimator of Lipkin et al.). Smaller is lower variance and more evaluations.
    pub remainder_ratio: f64,
    /// At most this many evaluations after the first acceptance before the walk stops
    /// regardless of `ρ` (default unlimited). The weight stays unbiased; only its variance
    /// grows.
    pub max_walk: usize,
}

impl Default for AwrsOptions {
    fn default() -> Self {
        Self {
            remainder_ratio: 0.5,
            max_walk: usize::MAX,
        }
    }
}

impl AwrsOptions {
    /// The recursive estimator of the AWRS paper: one draw past the first acceptance.
    pub fn recursive() -> Self {
        Self {
            remainder_ratio: f64::INFINITY,
            max_walk: usize::MAX,
        }
    }
}

/// The outcome of one AWRS draw.
#[derive(Debug, Clone, PartialEq)]
pub struct AwrsDraw {
    /// The accepted token; `None` when no token satisfies the constraint.
    pub token: Option<TokenId>,
    /// `log w`: `(token, w)` is properly weighted for `p·c`, `E[w·f(token)] = Σ_v p(v)·c(v)·f(v)`
    /// (`-inf` exactly when nothing is accepted).
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
    /// Entries with positive mass not removed (guards the draw loop against rounding).
    live: usize,
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
            live: 0,
        };
        s.rebuild();
        s
    }

    fn rebuild(&mut self) {
        self.cdf.clear();
        let mut acc = 0.0;
        self.live = 0;
        for (p, r) in self.probs.iter().zip(&self.removed) {
            if !*r {
                acc += p;
                self.live += usize::from(*p > 0.0);
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
            self.live -= usize::from(self.probs[i] > 0.0);
            if self.remaining < 0.5 * self.cdf_mass {
                self.rebuild();
            }
        }
    }

    fn draw<R: Rng + ?Sized>(&self, rng: &mut R) -> Option<usize> {
        if self.live == 0 || self.cdf_mass <= 0.0 {
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

/// One AWRS draw from kernel log-probabilities `log_p` under a Boolean potential
/// `constraint` in `state` (the state after `seq`): token `v` is allowed when its
/// next-token weight ([`Potential::log_weight_of`]) is not `-inf`, evaluated one token at a
/// time.
///
/// # Errors
/// [`SmcError::InvalidConfig`] when `options.remainder_ratio` is negative or NaN;
/// [`SmcError::NanPotential`] when the constraint gives NaN; the constraint's own errors
/// ([`Potential::log_weight_of`]).
///
/// # Example
/// ```
/// use rand::SeedableRng;
/// use smc_steer::awrs::{awrs, AwrsOptions};
/// use smc_steer::potential::Hard;
/// use smc_steer::{SeqView, Vocabulary};
/// let not_b = Hard::on_text("not-b", |t: &str| !t.contains('b'));
/// let v = Vocabulary::from_strs(&["a", "b"]).unwrap();
/// let view = SeqView { tokens: &[], bytes: &[], vocab: &v };
/// let log_p = [0.5f64.ln(), 0.3f64.ln(), 0.2f64.ln()];
/// let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(1);
/// let d = awrs(&log_p, &view, &not_b, &(), AwrsOptions::default(), &mut rng).unwrap();
/// assert_ne!(d.token, Some(1));
/// assert!(d.log_weight.is_finite());
/// ```
pub fn awrs<P: Potential + ?Sized, R: Rng + ?Sized>(
    log_p: &[f64],
    seq: &SeqView<'_>,
    constraint: &P,
    state: &P::State,
    options: AwrsOptions,
    rng: &mut R,
) -> Result<AwrsDraw> {
    if options.remainder_ratio.is_nan() || options.remainder_ratio < 0.0 {
        return Err(SmcError::InvalidConfig(format!(
            "AWRS remainder ratio must be >= 0 (got {})",
            options.remainder_ratio
        )));
    }
    let max = log_p.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return Ok(AwrsDraw {
            token: None,
            log_weight: f64::NEG_INFINITY,
            evaluations: 0,
        });
    }
    // Masses relative to the largest; `max` turns them back into kernel mass.
    let mut probs = Vec::new();
    crate::core::exp::exp_shifted_into(log_p, max, &mut probs);
    let mut cache: HashMap<usize, bool> = HashMap::new();
    let mut eval = |i: usize| -> Result<bool> {
        if let Some(&ok) = cache.get(&i) {
            return Ok(ok);
        }
        let w = constraint.log_weight_of(state, seq, i as TokenId)?;
        let ok = crate::potential::checked(constraint.name(), w)? > f64::NEG_INFINITY;
        cache.insert(i, ok);
        Ok(ok)
    };

    let mut pool = WithoutReplacement::new(&probs);
    let mut accepted: Option<usize> = None;
    // Accepted mass visited so far, and evaluations since the first acceptance.
    let mut found = 0.0;
    let mut walked = 0usize;
    // The estimate of the unvisited rest: `r·c(y)` for the final draw `y`, 0 when the walk
    // visited everything (then `found` is exact).
    let mut rest_estimate = 0.0;
    loop {
        // Decide, before looking, whether the next visit is the final one-draw estimate.
        let final_draw = accepted.is_some()
            && (pool.remaining.max(0.0) <= options.remainder_ratio * found
                || walked >= options.max_walk);
        let Some(i) = pool.draw(rng) else { break };
        let ok = eval(i)?;
        if final_draw {
            if ok {
                rest_estimate = pool.remaining.max(0.0);
            }
            break;
        }
        pool.remove(i);
        if accepted.is_some() {
            walked += 1;
        }
        if ok {
            found += probs[i];
            accepted.get_or_insert(i);
        }
    }
    let Some(x) = accepted else {
        return Ok(AwrsDraw {
            token: None,
            log_weight: f64::NEG_INFINITY,
            evaluations: cache.len(),
        });
    };
    Ok(AwrsDraw {
        token: Some(x as TokenId),
        log_weight: max + (found + rest_estimate).ln(),
        evaluations: cache.len(),
    })
}
