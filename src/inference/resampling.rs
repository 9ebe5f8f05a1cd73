//! Resampling schemes: one signature `(normalised weights, m, rng) -> ancestor indices`.
//!
//! Every scheme is unbiased: the expected number of copies of particle `i` is `m · W_i`.
//! They differ in variance: multinomial draws `m` independent indices; stratified and
//! systematic invert the CDF at stratified / evenly spaced points; residual keeps
//! `⌊m W_i⌋` copies and draws the rest multinomially; SSP (the Srinivasan sampling
//! process, Gerber, Chopin & Whiteley 2019) pairs fractional parts so that each count is
//! `⌊m W_i⌋` or `⌈m W_i⌉`. Ancestor vectors are returned sorted.
//!
//! [`fearnhead_clifford`] is the without-replacement scheme used by SMC-steer; it returns
//! new weights with the indices.

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::core::error::{Result, SmcError};
use crate::core::logspace::log_sum_exp;

/// The resampling schemes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Resampling {
    /// `m` independent draws.
    Multinomial,
    /// One uniform draw in each of `m` equal strata (the default).
    #[default]
    Stratified,
    /// One uniform draw shifted over `m` evenly spaced points.
    Systematic,
    /// Deterministic `⌊m W_i⌋` copies plus a multinomial draw of the remainder.
    Residual,
    /// Srinivasan sampling process: counts are `⌊m W_i⌋` or `⌈m W_i⌉`.
    Ssp,
}

impl Resampling {
    /// All schemes, for tests and command-line help.
    pub const ALL: [Resampling; 5] = [
        Resampling::Multinomial,
        Resampling::Stratified,
        Resampling::Systematic,
        Resampling::Residual,
        Resampling::Ssp,
    ];

    /// Draw `m` ancestor indices from normalised `weights`.
    ///
    /// # Example
    /// ```
    /// use rand::SeedableRng;
    /// use smc_steer::Resampling;
    /// let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(7);
    /// let a = Resampling::Systematic.resample(&[0.5, 0.25, 0.25], 4, &mut rng).unwrap();
    /// assert_eq!(a.len(), 4);
    /// assert_eq!(a.iter().filter(|&&i| i == 0).count(), 2); // ⌊4·0.5⌋ = ⌈4·0.5⌉ = 2
    /// ```
    ///
    /// # Errors
    /// [`SmcError::InvalidWeights`] if the weights are empty, negative, NaN or do not sum to 1
    /// (within `1e-6`).
    pub fn resample<R: Rng + ?Sized>(
        self,
        weights: &[f64],
        m: usize,
        rng: &mut R,
    ) -> Result<Vec<usize>> {
        match self {
            Resampling::Multinomial => multinomial(weights, m, rng),
            Resampling::Stratified => stratified(weights, m, rng),
            Resampling::Systematic => systematic(weights, m, rng),
            Resampling::Residual => residual(weights, m, rng),
            Resampling::Ssp => ssp(weights, m, rng),
        }
    }

    /// The scheme's lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Resampling::Multinomial => "multinomial",
            Resampling::Stratified => "stratified",
            Resampling::Systematic => "systematic",
            Resampling::Residual => "residual",
            Resampling::Ssp => "ssp",
        }
    }
}

impl std::str::FromStr for Resampling {
    type Err = SmcError;
    fn from_str(s: &str) -> Result<Self> {
        Resampling::ALL
            .into_iter()
            .find(|r| r.name() == s.to_ascii_lowercase())
            .ok_or_else(|| {
                SmcError::InvalidConfig(format!(
                    "unknown resampling scheme `{s}` (expected multinomial, stratified, systematic, residual or ssp)"
                ))
            })
    }
}

fn check(weights: &[f64]) -> Result<()> {
    if weights.is_empty() {
        return Err(SmcError::InvalidWeights("no weights to resample".into()));
    }
    if weights
        .iter()
        .any(|w| w.is_nan() || *w < 0.0 || !w.is_finite())
    {
        return Err(SmcError::InvalidWeights(
            "weights must be finite and non-negative".into(),
        ));
    }
    let total: f64 = weights.iter().sum();
    if (total - 1.0).abs() > 1e-6 {
        return Err(SmcError::InvalidWeights(format!(
            "weights must sum to 1 (sum = {total})"
        )));
    }
    Ok(())
}

/// Invert the CDF of `weights` at the sorted points `us` (each in [0, 1)).
fn inverse_cdf(weights: &[f64], us: impl Iterator<Item = f64>) -> Vec<usize> {
    let mut out = Vec::new();
    let mut cum = weights[0];
    let mut j = 0;
    let last = weights.iter().rposition(|w| *w > 0.0).unwrap_or(0);
    for u in us {
        while u >= cum && j < last {
            j += 1;
            cum += weights[j];
        }
        out.push(j);
    }
    out
}

/// `m` independent draws (sorted uniforms by normalised exponential spacings).
///
/// # Errors
/// As [`Resampling::resample`].
pub fn multinomial<R: Rng + ?Sized>(weights: &[f64], m: usize, rng: &mut R) -> Result<Vec<usize>> {
    check(weights)?;
    // Sorted uniforms: cumulative sums of m+1 exponentials, normalised.
    let mut e: Vec<f64> = (0..=m).map(|_| -(1.0 - rng.random::<f64>()).ln()).collect();
    let total: f64 = e.iter().sum();
    let mut acc = 0.0;
    for x in e.iter_mut() {
        acc += *x;
        *x = acc / total;
    }
    Ok(inverse_cdf(weights, e.into_iter().take(m)))
}

/// Stratified resampling: `u_i = (i + U_i) / m`.
///
/// # Errors
/// As [`Resampling::resample`].
pub fn stratified<R: Rng + ?Sized>(weights: &[f64], m: usize, rng: &mut R) -> Result<Vec<usize>> {
    check(weights)?;
    let us: Vec<f64> = (0..m)
        .map(|i| (i as f64 + rng.random::<f64>()) / m as f64)
        .collect();
    Ok(inverse_cdf(weights, us.into_iter()))
}

/// Systematic resampling: `u_i = (i + U) / m` with one uniform `U`.
///
/// # Errors
/// As [`Resampling::resample`].
pub fn systematic<R: Rng + ?Sized>(weights: &[f64], m: usize, rng: &mut R) -> Result<Vec<usize>> {
    check(weights)?;
    let u: f64 = rng.random();
    Ok(inverse_cdf(
        weights,
        (0..m).map(|i| (i as f64 + u) / m as f64),
    ))
}

/// Residual resampling: `⌊m W_i⌋` copies, the remaining `m − Σ⌊m W_i⌋` drawn multinomially
/// from the residual weights.
///
/// # Errors
/// As [`Resampling::resample`].
pub fn residual<R: Rng + ?Sized>(weights: &[f64], m: usize, rng: &mut R) -> Result<Vec<usize>> {
    check(weights)?;
    let scaled: Vec<f64> = weights.iter().map(|w| w * m as f64).collect();
    let mut out = Vec::with_capacity(m);
    for (i, s) in scaled.iter().enumerate() {
        out.extend(std::iter::repeat_n(i, s.floor() as usize));
    }
    let rest = m.saturating_sub(out.len());
    if rest > 0 {
        let residuals: Vec<f64> = scaled.iter().map(|s| s - s.floor()).collect();
        let total: f64 = residuals.iter().sum();
        let residuals: Vec<f64> = residuals.iter().map(|r| r / total).collect();
        out.extend(multinomial(&residuals, rest, rng)?);
    }
    out.truncate(m);
    out.sort_unstable();
    Ok(out)
}

/// Srinivasan sampling process: pairs of fractional parts are resolved so that one of them
/// becomes an integer while both keep their expectations; each count ends `⌊m W_i⌋` or
/// `⌈m W_i⌉`.
///
/// # Errors
/// As [`Resampling::resample`].
pub fn ssp<R: Rng + ?Sized>(weights: &[f64], m: usize, rng: &mut R) -> Result<Vec<usize>> {
    check(weights)?;
    let scaled: Vec<f64> = weights.iter().map(|w| w * m as f64).collect();
    let mut counts: Vec<usize> = scaled.iter().map(|s| s.floor() as usize).collect();
    let frac: Vec<f64> = scaled
        .iter()
        .zip(&counts)
        .map(|(s, c)| s - *c as f64)
        .collect();
    // `held` is the one index whose fractional part is still unresolved.
    let mut held: Option<(usize, f64)> = None;
    for (j, &b) in frac.iter().enumerate() {
        if b <= 0.0 {
            continue;
        }
        let Some((i, a)) = held else {
            held = Some((j, b));
            continue;
        };
        let u: f64 = rng.random();
        if a + b < 1.0 {
            // One of the two absorbs the other's fraction; the other rounds down.
            held = if u < a / (a + b) {
                Some((i, a + b))
            } else {
                Some((j, a + b))
            };
        } else {
            // One of the two rounds up; the other keeps the excess a + b − 1.
            if u < (1.0 - b) / (2.0 - a - b) {
                counts[i] += 1;
                held = Some((j, a + b - 1.0));
            } else {
                counts[j] += 1;
                held = Some((i, a + b - 1.0));
            }
        }
    }
    // The leftover fraction is 0 or 1 up to rounding; the total fixes it exactly.
    let total: usize = counts.iter().sum();
    if total < m {
        let i = held.map(|(i, _)| i).unwrap_or_else(|| argmax(weights));
        counts[i] += m - total;
    }
    let mut out = Vec::with_capacity(m);
    for (i, c) in counts.iter().enumerate() {
        out.extend(std::iter::repeat_n(i, *c));
    }
    out.truncate(m);
    Ok(out)
}

fn argmax(xs: &[f64]) -> usize {
    let mut best = 0;
    for (i, x) in xs.iter().enumerate() {
        if *x > xs[best] {
            best = i;
        }
    }
    best
}

/// The outcome of [`fearnhead_clifford`]: the selected indices and their new log-weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    /// Indices of the kept candidates (distinct, sorted).
    pub indices: Vec<usize>,
    /// New unnormalised log-weights of the kept candidates, in the same order.
    pub log_weights: Vec<f64>,
}

/// Fearnhead–Clifford resampling without replacement from unnormalised `log_weights` down
/// to at most `n` distinct candidates, with proper weights.
///
/// # Maths
/// Find `c` with `Σ_i min(1, c·w_i) = n`. Candidates with `c·w_i ≥ 1` are kept with their
/// weight; the others are kept with probability `c·w_i` (systematic sampling, so exactly
/// `n − #kept` of them) and given weight `1/c`. Every candidate's expected new weight is
/// its old weight, so `Σ` of the weights (and the estimate of `Z`) stays unbiased. When at
/// most `n` candidates have positive weight they are all kept unchanged.
///
/// # Example
/// ```
/// use rand::SeedableRng;
/// use smc_steer::resampling::fearnhead_clifford;
/// let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(3);
/// let lw = [0.9f64.ln(), 0.05f64.ln(), 0.03f64.ln(), 0.02f64.ln()];
/// let s = fearnhead_clifford(&lw, 2, &mut rng).unwrap();
/// assert_eq!(s.indices.len(), 2);
/// assert!(s.indices.contains(&0)); // heavy enough to be kept for sure, with its own weight
/// ```
///
/// # Errors
/// [`SmcError::InvalidWeights`] for NaN or `+inf` weights.
pub fn fearnhead_clifford<R: Rng + ?Sized>(
    log_weights: &[f64],
    n: usize,
    rng: &mut R,
) -> Result<Selection> {
    if log_weights
        .iter()
        .any(|w| w.is_nan() || *w == f64::INFINITY)
    {
        return Err(SmcError::InvalidWeights(
            "log-weights must not be NaN or +inf".into(),
        ));
    }
    let positive: Vec<usize> = (0..log_weights.len())
        .filter(|&i| log_weights[i] > f64::NEG_INFINITY)
        .collect();
    if positive.len() <= n {
        return Ok(Selection {
            log_weights: positive.iter().map(|&i| log_weights[i]).collect(),
            indices: positive,
        });
    }
    let log_total = log_sum_exp(log_weights);
    let w: Vec<f64> = log_weights
        .iter()
        .map(|lw| (lw - log_total).exp())
        .collect();
    let mut order = positive.clone();
    order.sort_by(|&a, &b| w[b].total_cmp(&w[a]));
    // Smallest k such that the k largest are certain and the rest are not: (n − k)·w_(k) < R_k.
    let mut rest: f64 = order.iter().map(|&i| w[i]).sum();
    let mut k = 0;
    while k < n && (n - k) as f64 * w[order[k]] >= rest {
        rest -= w[order[k]];
        k += 1;
    }
    let c = (n - k) as f64 / rest;
    let mut indices: Vec<usize> = order[..k].to_vec();
    let mut new_lw: Vec<f64> = indices.iter().map(|&i| log_weights[i]).collect();
    if k < n {
        let stochastic = &order[k..];
        let u: f64 = rng.random();
        let mut cum = 0.0;
        let mut next = u;
        let mut taken = vec![false; stochastic.len()];
        for (s, &i) in stochastic.iter().enumerate() {
            cum += c * w[i];
            if next < cum && indices.len() < n {
                indices.push(i);
                taken[s] = true;
                next += 1.0;
            }
        }
        // Rounding can leave the last point unreached; the heaviest untaken one takes it.
        for (s, &i) in stochastic.iter().enumerate() {
            if indices.len() >= n {
                break;
            }
            if !taken[s] {
                indices.push(i);
            }
        }
        new_lw.resize(indices.len(), log_total - c.ln());
    }
    let mut pairs: Vec<(usize, f64)> = indices.into_iter().zip(new_lw).collect();
    pairs.sort_by_key(|p| p.0);
    Ok(Selection {
        indices: pairs.iter().map(|p| p.0).collect(),
        log_weights: pairs.iter().map(|p| p.1).collect(),
    })
}
