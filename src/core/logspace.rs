//! Log-space arithmetic: every weight, potential and normaliser in this crate is a log-value.
//!
//! `-inf` means zero mass (a dead particle); NaN never appears in a valid result.

/// `log Σ exp(x_i)`, stable for large magnitudes; `-inf` for an empty slice or all `-inf`.
///
/// # Example
/// ```
/// use smc_steer::logspace::log_sum_exp;
/// let z = log_sum_exp(&[0.0_f64.ln(), 1.0_f64.ln()]);
/// assert!((z - 1.0_f64.ln()).abs() < 1e-12);
/// assert_eq!(log_sum_exp(&[]), f64::NEG_INFINITY);
/// ```
pub fn log_sum_exp(xs: &[f64]) -> f64 {
    let max = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    if max == f64::INFINITY {
        return f64::INFINITY;
    }
    max + crate::core::exp::sum_exp_shifted(xs, max).ln()
}

/// `log((1/n) Σ exp(x_i))`; `-inf` for an empty slice.
pub fn log_mean_exp(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NEG_INFINITY;
    }
    log_sum_exp(xs) - (xs.len() as f64).ln()
}

/// `log(exp(a) + exp(b))`.
pub fn log_add_exp(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a >= b { (a, b) } else { (b, a) };
    if hi == f64::NEG_INFINITY {
        return hi;
    }
    hi + (lo - hi).exp().ln_1p()
}

/// `a + b` for log-values, where `-inf` absorbs (`-inf + x = -inf` for any `x`, never NaN).
pub fn log_mul(a: f64, b: f64) -> f64 {
    if a == f64::NEG_INFINITY || b == f64::NEG_INFINITY {
        f64::NEG_INFINITY
    } else {
        a + b
    }
}

/// `a − b` for log-values, where a dead numerator or denominator gives `-inf` (a dead
/// prefix stays dead instead of producing NaN).
pub fn log_div(a: f64, b: f64) -> f64 {
    if a == f64::NEG_INFINITY || b == f64::NEG_INFINITY {
        f64::NEG_INFINITY
    } else {
        a - b
    }
}

/// Normalised weights `exp(x_i - log Σ exp x)`; all zeros when every entry is `-inf`.
pub fn normalise(xs: &[f64]) -> Vec<f64> {
    let total = log_sum_exp(xs);
    if total == f64::NEG_INFINITY {
        return vec![0.0; xs.len()];
    }
    let mut out = Vec::new();
    crate::core::exp::exp_shifted_into(xs, total, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_sum_exp_matches_direct_sum() {
        let xs = [-1.0, 0.5, 2.0, f64::NEG_INFINITY];
        let direct: f64 = xs.iter().map(|x: &f64| x.exp()).sum::<f64>().ln();
        assert!((log_sum_exp(&xs) - direct).abs() < 1e-12);
        assert!((log_add_exp(-1.0, 0.5) - ((-1.0f64).exp() + 0.5f64.exp()).ln()).abs() < 1e-12);
    }

    #[test]
    fn extreme_values_do_not_overflow() {
        assert!((log_sum_exp(&[1000.0, 1000.0]) - (1000.0 + 2f64.ln())).abs() < 1e-9);
        assert_eq!(
            log_add_exp(f64::NEG_INFINITY, f64::NEG_INFINITY),
            f64::NEG_INFINITY
        );
        let w = normalise(&[f64::NEG_INFINITY, f64::NEG_INFINITY]);
        assert_eq!(w, vec![0.0, 0.0]);
    }
}
