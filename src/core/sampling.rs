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
        let u = rng.random::<f64>() * total;
        scan(ps, u).map(|i| (i, log_mass))
    })
}

/// Entries per block of [`scan`].
const SCAN_BLOCK: usize = 64;

/// The index `i` with `Σ_{j<i} p_j ≤ u < Σ_{j≤i} p_j` among entries `p > 0` (inverse CDF);
/// the last positive entry when rounding leaves `u` at or above the total. `None` when no
/// entry is positive.
///
/// Whole blocks of [`SCAN_BLOCK`] entries are passed over by their sum (four independent
/// partial sums, which the compiler vectorises) and only the block holding `u` is walked
/// entry by entry: the walk's chain of dependent subtractions over a 49,152-entry row was a
/// third of a draw's time. Draws differ from a walk over every entry only where `u` lies
/// within rounding (~1e-16 relative) of a boundary.
fn scan(ps: &[f64], mut u: f64) -> Option<usize> {
    for (b, block) in ps.chunks(SCAN_BLOCK).enumerate() {
        let mass = block_sum(block);
        if u >= mass {
            u -= mass;
            continue;
        }
        let mut last = None;
        for (j, &p) in block.iter().enumerate() {
            if p > 0.0 {
                last = Some(j);
                if u < p {
                    return Some(b * SCAN_BLOCK + j);
                }
                u -= p;
            }
        }
        // `u` was below the block's sum but not below its running sum (another order of
        // rounding): the block's last positive entry takes it.
        if let Some(j) = last {
            return Some(b * SCAN_BLOCK + j);
        }
    }
    // Rounding left `u` at or above the total: the last positive entry takes it.
    ps.iter().rposition(|&p| p > 0.0)
}

/// `Σ block` in four interleaved partial sums.
fn block_sum(block: &[f64]) -> f64 {
    let mut acc = [0.0f64; 4];
    let mut chunks = block.chunks_exact(4);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    for (a, &x) in acc.iter_mut().zip(chunks.remainder()) {
        *a += x;
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3])
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

    /// The walk over every entry that [`scan`] shortens.
    fn walk(ps: &[f64], mut u: f64) -> Option<usize> {
        let mut last = None;
        for (i, &p) in ps.iter().enumerate() {
            if p > 0.0 {
                last = Some(i);
                if u < p {
                    return Some(i);
                }
                u -= p;
            }
        }
        last
    }

    /// The block scan finds the walk's index for random `u`, for rows around block
    /// boundaries with zero entries and whole zero blocks; at `u` = total and beyond, the
    /// last positive entry; nothing in a row of zeros. Where the two differ (never seen),
    /// `u` must lie within rounding of the boundary between their indices.
    #[test]
    fn block_scan_is_the_inverse_cdf() {
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(SEED);
        for len in [1, 3, 63, 64, 65, 128, 200, 1000] {
            for zeros in [0.0, 0.3, 0.9] {
                let ps: Vec<f64> = (0..len)
                    .map(|i| {
                        // A whole zero block from 64 to 127.
                        if (64..128).contains(&i) || rng.random::<f64>() < zeros {
                            0.0
                        } else {
                            rng.random::<f64>()
                        }
                    })
                    .collect();
                let total: f64 = ps.iter().sum();
                let last = ps.iter().rposition(|&p| p > 0.0);
                if last.is_none() {
                    assert_eq!(scan(&ps, 0.0), None);
                    continue;
                }
                for _ in 0..2000 {
                    let u = rng.random::<f64>() * total;
                    let (got, want) = (scan(&ps, u), walk(&ps, u));
                    if got != want {
                        let (a, b) = (got.unwrap(), want.unwrap());
                        let edge: f64 = ps[..a.max(b)].iter().sum();
                        assert!((edge - u).abs() <= 1e-12 * total, "len {len}: {a} vs {b}");
                    }
                    assert!(ps[got.unwrap()] > 0.0);
                }
                assert_eq!(scan(&ps, total), last);
                assert_eq!(scan(&ps, total * 2.0), last);
            }
        }
        assert_eq!(scan(&[0.0; 100], 0.5), None);
    }

    /// Frequencies over a row spread across many blocks (some empty) match the
    /// probabilities: each group of 50 entries within 5 standard errors.
    #[test]
    fn frequencies_match_across_blocks() {
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(SEED);
        let lw: Vec<f64> = (0..500)
            .map(|i| {
                if (128..256).contains(&i) {
                    f64::NEG_INFINITY
                } else {
                    -f64::from(i % 37) * 0.1
                }
            })
            .collect();
        let z = crate::core::logspace::log_sum_exp(&lw);
        let n = 200_000;
        let mut counts = [0usize; 10];
        for _ in 0..n {
            counts[sample_log_categorical(&lw, &mut rng).unwrap() / 50] += 1;
        }
        for (g, &c) in counts.iter().enumerate() {
            let p: f64 = lw[g * 50..(g + 1) * 50].iter().map(|l| (l - z).exp()).sum();
            let se = (p * (1.0 - p) / n as f64).sqrt();
            assert!(
                (c as f64 / n as f64 - p).abs() <= 5.0 * se + 1e-12,
                "group {g}: {c} of {n}, p = {p}"
            );
        }
    }
}
