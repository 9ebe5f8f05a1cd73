//! Dense f32 products of a few activation rows (`n ≤` [`MAX_ROWS`]): decoding one or a few
//! dozen sequences is bound by the speed at which the weights stream from memory, and a
//! general GEMM, which packs its operands for reuse, streams them slowly at these shapes.
//! Measured on SmolLM2-135M (2-core AVX2 VM, `SMC_BENCH_ONLY=formats --formats f32`,
//! decode step in ms, this loop / candle's GEMM): n = 1: 24.8 / 47.4; n = 8: 51.7 / 108.6;
//! n = 16: 88.5 / 126.7; n = 32: 169.1 / 192.5; n = 48: 278.1 / 241.4 (the GEMM wins from
//! there). The register-tiled kernel of `tiled.rs` beats both from about 24 rows (n = 20:
//! this loop 116 ms, the tiles 126–149; n = 32: 184–203 against 159–171; n = 48: the tiles
//! 211 against the GEMM's 241; n = 64: 257 against 329). So the choice is made per call
//! from the number of rows: up to [`MAX_ROWS`] here, more in the tiles, or in candle's GEMM
//! on a CPU without AVX2 and FMA.
//!
//! With `Wᵀ: [in, out]` row-major, `y = x Wᵀ` is a sum over `i` of `x[·, i] · Wᵀ[i, ·]`:
//! the rows of `Wᵀ` are cut into a fixed number of contiguous pieces; every task streams
//! one piece once, in memory order, into a partial `y`, and the partials are added in
//! piece order. Each output element is therefore summed in the same order whatever the
//! thread count (deterministic).
//!
//! The loop is compiled twice: for AVX2 with FMA (chosen at run time when the CPU has
//! them) and for the baseline target.

use rayon::prelude::*;

/// A stored weight, widened to f32 in the loop.
pub(super) trait Weight: Copy + Send + Sync {
    fn widen(self) -> f32;
}

impl Weight for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Weight for half::bf16 {
    /// bf16 is the upper half of an f32: a shift, which vectorises.
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
}

/// Largest number of activation rows handled here; larger batches use the tiled kernel
/// (or the GEMM), which reuse each weight for many rows better (the crossover above).
pub(super) const MAX_ROWS: usize = 24;
/// Pieces the rows of `Wᵀ` are split into (fixed, so that the sums do not depend on the
/// thread count); each piece is a contiguous run of memory.
const PIECES: usize = 16;
/// Fewest rows of `Wᵀ` per piece (smaller pieces cost more in partial sums than they give
/// in balance).
const MIN_PIECE_ROWS: usize = 64;
/// Columns per block of the inner loop (four rows of it: 8 KiB, in L1 while every
/// activation row uses it).
const COLUMN_BLOCK: usize = 512;

/// The operands of one product: `x: [n, k]` and `Wᵀ: [k, m]`, both row-major.
struct Operands<'a, W> {
    x: &'a [f32],
    n: usize,
    wt: &'a [W],
    k: usize,
    m: usize,
}

// Copy without requiring `W: Copy` of the derive's bounds.
impl<W> Clone for Operands<'_, W> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<W> Copy for Operands<'_, W> {}

/// `y = x Wᵀ` for `x: [n, k]` (row-major) and `Wᵀ: [k, m]` (row-major), `n ≤ MAX_ROWS`.
/// Returns `y: [n, m]`.
pub(super) fn matmul<W: Weight>(x: &[f32], n: usize, wt: &[W], k: usize, m: usize) -> Vec<f32> {
    debug_assert!(n <= MAX_ROWS && x.len() == n * k && wt.len() == k * m);
    if k == 0 {
        return vec![0.0; n * m];
    }
    let piece = k.div_ceil(PIECES).next_multiple_of(4).max(MIN_PIECE_ROWS);
    // Each piece of rows streams its part of `Wᵀ` once, in order, into a partial `[n, m]`.
    let partials: Vec<Vec<f32>> = (0..k.div_ceil(piece))
        .into_par_iter()
        .map(|p| {
            let i0 = p * piece;
            rows(Operands { x, n, wt, k, m }, i0, (i0 + piece).min(k))
        })
        .collect();
    // Partial sums added in piece order (deterministic), columns in parallel.
    let mut partials = partials.into_iter();
    let mut y = partials.next().unwrap_or_else(|| vec![0.0; n * m]);
    let rest: Vec<Vec<f32>> = partials.collect();
    y.par_chunks_mut(1024).enumerate().for_each(|(c, out)| {
        let (c0, len) = (c * 1024, out.len());
        for p in &rest {
            for (o, &v) in out.iter_mut().zip(&p[c0..c0 + len]) {
                *o += v;
            }
        }
    });
    y
}

/// The partial product of rows `[i0, i1)` of `Wᵀ`: `[n, m]`.
fn rows<W: Weight>(op: Operands<'_, W>, i0: usize, i1: usize) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { rows_avx2(op, i0, i1) };
    }
    rows_body::<W, false>(op, i0, i1)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_avx2<W: Weight>(op: Operands<'_, W>, i0: usize, i1: usize) -> Vec<f32> {
    rows_body::<W, true>(op, i0, i1)
}

/// The loop itself, inlined into each compiled variant so that it is vectorised for that
/// variant's instruction set.
#[inline(always)]
fn rows_body<W: Weight, const FMA: bool>(op: Operands<'_, W>, i0: usize, i1: usize) -> Vec<f32> {
    let Operands { x, n, wt, k, m } = op;
    let mut acc = vec![0.0f32; n * m];
    // Four weight rows at a time (a quarter of the accumulator traffic), in column blocks
    // that stay in L1 while every activation row uses them.
    let mut i = i0;
    while i < i1 {
        let g = (i1 - i).min(4);
        for c0 in (0..m).step_by(COLUMN_BLOCK) {
            let c1 = (c0 + COLUMN_BLOCK).min(m);
            let w = |j: usize| &wt[(i + j) * m + c0..(i + j) * m + c1];
            for r in 0..n {
                let xr = &x[r * k + i..r * k + i + g];
                let out = &mut acc[r * m + c0..r * m + c1];
                if g == 4 {
                    let (a, b, c, d) = (xr[0], xr[1], xr[2], xr[3]);
                    for ((((o, p), q), s), t) in
                        out.iter_mut().zip(w(0)).zip(w(1)).zip(w(2)).zip(w(3))
                    {
                        let (p, q, s, t) = (p.widen(), q.widen(), s.widen(), t.widen());
                        *o = if FMA {
                            t.mul_add(d, s.mul_add(c, q.mul_add(b, p.mul_add(a, *o))))
                        } else {
                            *o + a * p + b * q + c * s + d * t
                        };
                    }
                } else {
                    for (j, &a) in xr.iter().enumerate() {
                        for (o, p) in out.iter_mut().zip(w(j)) {
                            let p = p.widen();
                            *o = if FMA { p.mul_add(a, *o) } else { *o + a * p };
                        }
                    }
                }
            }
        }
        i += g;
    }
    acc
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Test operands of a product `[n, k] × [k, m]`: small exact values (multiples of
    /// 1/16), not all equal.
    pub(in crate::lm::model) fn operands(n: usize, k: usize, m: usize) -> (Vec<f32>, Vec<f32>) {
        let x = (0..n * k)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0)
            .collect();
        let wt = (0..k * m)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) / 16.0)
            .collect();
        (x, wt)
    }

    /// `y` equals `x Wᵀ` computed in f64 (relative 1e-5: f32 sums of up to ~300 terms).
    pub(in crate::lm::model) fn assert_product(
        x: &[f32],
        wt: &[f32],
        y: &[f32],
        n: usize,
        k: usize,
        m: usize,
    ) {
        for r in 0..n {
            for c in 0..m {
                let want: f64 = (0..k)
                    .map(|i| f64::from(x[r * k + i]) * f64::from(wt[i * m + c]))
                    .sum();
                let got = f64::from(y[r * m + c]);
                assert!(
                    (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "{n}x{k}x{m} at {r},{c}: {got} vs {want}"
                );
            }
        }
    }

    /// Agrees with the definition (in f64) on shapes with and without whole pieces and
    /// groups of four weight rows, for every row count handled.
    #[test]
    fn matches_the_definition() {
        for (k, m) in [(1, 1), (7, 300), (64, 256), (130, 513), (300, 1100)] {
            for n in 1..=MAX_ROWS {
                let (x, wt) = operands(n, k, m);
                assert_product(&x, &wt, &matmul(&x, n, &wt, k, m), n, k, m);
            }
        }
    }

    /// The baseline variant (what a CPU without AVX2 and FMA runs) and the fused variant
    /// agree with each other on one whole product.
    #[test]
    fn both_variants_agree() {
        let (n, k, m) = (3, 70, 600);
        let (x, wt) = operands(n, k, m);
        let op = Operands {
            x: &x,
            n,
            wt: &wt,
            k,
            m,
        };
        let plain = rows_body::<f32, false>(op, 0, k);
        let fused = rows_body::<f32, true>(op, 0, k);
        for (a, b) in plain.iter().zip(&fused) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "{a} vs {b}");
        }
    }

    /// bf16 weights: the product of the widened weights, exactly as f32 weights holding the
    /// same (bf16-representable) values give it.
    #[test]
    fn bf16_weights_multiply_as_their_f32_values() {
        let (n, k, m) = (5, 130, 300);
        let (x, wt) = operands(n, k, m);
        let wide: Vec<f32> = wt.iter().map(|w| w + 1e-3).collect();
        let narrow: Vec<half::bf16> = wide.iter().map(|&v| half::bf16::from_f32(v)).collect();
        let rounded: Vec<f32> = narrow.iter().map(|v| v.to_f32()).collect();
        assert_ne!(rounded, wide, "the test weights must round");
        assert_eq!(matmul(&x, n, &narrow, k, m), matmul(&x, n, &rounded, k, m));
    }
}
