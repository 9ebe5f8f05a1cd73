//! Drawing from categorical distributions given in log space.

use rand::Rng;

/// Draw an index with probability proportional to `exp(log_w[i])`.
///
/// Returns `None` when every entry is `-inf` (nothing can be drawn).
///
/// # Example
/// ```
/// use rand::SeedableRng;
/// use smc_steer::sampling::sample_log_categorical;
/// let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(1);
/// let i = sample_log_categorical(&[f64::NEG_INFINITY, 0.0], &mut rng);
/// assert_eq!(i, Some(1));
/// ```
pub fn sample_log_categorical<R: Rng + ?Sized>(log_w: &[f64], rng: &mut R) -> Option<usize> {
    sample_with_log_mass(log_w, rng).map(|(i, _)| i)
}

/// [`sample_log_categorical`]'s draw (the same index for the same RNG state) and the
/// total `log Σ exp(log_w[i])` from the same exponentials, equal to
/// [`log_sum_exp`](crate::core::logspace::log_sum_exp)`(log_w)`. `None` when every entry
/// is `-inf`.
pub(crate) fn sample_with_log_mass<R: Rng + ?Sized>(
    log_w: &[f64],
    rng: &mut R,
) -> Option<(usize, f64)> {
    let max = log_w.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return None;
    }
    // Each exponential once, kept for the scan (a second pass of `exp` over a 49,152-token
    // vocabulary cost more than the buffer), in a per-thread buffer so that drawing does
    // not allocate once warm; the same values, so the same draws.
    thread_local! {
        static EXPS: std::cell::RefCell<Vec<f64>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    with_row_buffer(&EXPS, |ps| {
        let total = crate::core::exp::exp_shifted_into(log_w, max, ps);
        let log_mass = max + total.ln();
        let mut u = rng.random::<f64>() * total;
        let mut last = None;
        for (i, &p) in ps.iter().enumerate() {
            if p > 0.0 {
                last = Some(i);
                if u < p {
                    return Some((i, log_mass));
                }
                u -= p;
            }
        }
        // Rounding left `u` just above the total: the last positive entry takes it.
        last.map(|i| (i, log_mass))
    })
}

/// A per-thread buffer of vocabulary-sized rows, kept between calls so that per-particle
/// work does not allocate once warm.
pub(crate) type RowBuffer = std::thread::LocalKey<std::cell::RefCell<Vec<f64>>>;

/// `f` with this thread's buffer of `key`, or with a fresh one when the thread's is in use
/// (a call nested in another, e.g. a potential drawing inside a draw: never in the engine).
pub(crate) fn with_row_buffer<T>(key: &'static RowBuffer, f: impl FnOnce(&mut Vec<f64>) -> T) -> T {
    key.with(|buf| match buf.try_borrow_mut() {
        Ok(mut held) => f(&mut held),
        Err(_) => f(&mut Vec::new()),
    })
}

/// `log_p` restricted to the symbols for which `allowed(i)` holds (`-inf` elsewhere), and
/// the log of the mass kept, `log Σ_{i allowed} p(i)` (`-inf` when nothing is allowed).
///
/// Word steps condition on a word-boundary event with it. (The mask proposal does the same
/// in place on its constraint's weight buffer, to keep one vocabulary-sized buffer per draw;
/// the grammar program's `Mask::restrict` visits only the allowed entries of a sparse mask.)
///
/// # Example
/// ```
/// use smc_steer::sampling::restrict;
/// let log_p = [0.5f64.ln(), 0.3f64.ln(), 0.2f64.ln()];
/// let (masked, log_mass) = restrict(&log_p, |i| i != 1);
/// assert_eq!(masked[1], f64::NEG_INFINITY);
/// assert!((log_mass - 0.7f64.ln()).abs() < 1e-12);
/// ```
pub fn restrict(log_p: &[f64], allowed: impl Fn(usize) -> bool) -> (Vec<f64>, f64) {
    let masked: Vec<f64> = log_p
        .iter()
        .enumerate()
        .map(|(i, l)| if allowed(i) { *l } else { f64::NEG_INFINITY })
        .collect();
    let log_mass = crate::core::logspace::log_sum_exp(&masked);
    (masked, log_mass)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    const SEED: u64 = 0x5eed;

    #[test]
    fn frequencies_match_probabilities() {
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(SEED);
        let probs = [0.2, 0.5, 0.0, 0.3];
        let lw: Vec<f64> = probs.iter().map(|p: &f64| p.ln()).collect();
        let n = 100_000;
        let mut counts = [0usize; 4];
        for _ in 0..n {
            counts[sample_log_categorical(&lw, &mut rng).unwrap()] += 1;
        }
        for (c, p) in counts.iter().zip(probs) {
            let se = (p * (1.0 - p) / n as f64).sqrt();
            assert!((*c as f64 / n as f64 - p).abs() <= 5.0 * se + 1e-12);
        }
        assert_eq!(
            sample_log_categorical(&[f64::NEG_INFINITY; 3], &mut rng),
            None
        );
    }

    /// The draw with its mass is the plain draw (same RNG state, same index) and the mass
    /// is `log_sum_exp` bit for bit, with and without dead entries.
    #[test]
    fn draw_with_mass_is_the_draw_and_the_log_sum_exp() {
        let rows: Vec<Vec<f64>> = (0..20u32)
            .map(|r| {
                (0..(37 + r))
                    .map(|i| {
                        if (i + r) % 5 == 0 {
                            f64::NEG_INFINITY
                        } else {
                            -f64::from((i * 7 + r) % 23) * 0.37
                        }
                    })
                    .collect()
            })
            .collect();
        let mut a = rand_pcg::Pcg64Mcg::seed_from_u64(SEED);
        let mut b = rand_pcg::Pcg64Mcg::seed_from_u64(SEED);
        for row in &rows {
            let (i, mass) = sample_with_log_mass(row, &mut a).unwrap();
            assert_eq!(Some(i), sample_log_categorical(row, &mut b));
            let want = crate::core::logspace::log_sum_exp(row);
            assert_eq!(mass.to_bits(), want.to_bits());
        }
        assert_eq!(sample_with_log_mass(&[f64::NEG_INFINITY; 4], &mut a), None);
    }
}
