//! Dense f32 products of many activation rows on AVX2 with FMA: a register tile of 6 rows
//! × 16 columns of `y = x Wᵀ` (12 accumulators) walks the shared dimension once, reading a
//! 16-column strip of `Wᵀ` (which stays in cache while every group of 6 rows uses it) and
//! broadcasting one activation per row. Tasks own strips of output columns, so each output
//! element is one ordered sum whatever the thread count (deterministic).
//!
//! Only compiled for x86-64 and only called when the CPU has AVX2 and FMA (checked at run
//! time by [`available`]); elsewhere the caller keeps candle's GEMM.

use rayon::prelude::*;

/// Rows of the register tile.
const TILE_ROWS: usize = 6;
/// Columns of the register tile (two 8-lane vectors).
const TILE_COLS: usize = 16;
/// Output columns per task (four tiles side by side).
const TASK_COLS: usize = 64;

/// Whether this CPU runs the tiled product.
pub(super) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `y = x Wᵀ` for `x: [n, k]` and `Wᵀ: [k, m]` (row-major); `y: [n, m]`. `None` when the
/// CPU lacks AVX2 or FMA.
pub(super) fn matmul(x: &[f32], n: usize, wt: &[f32], k: usize, m: usize) -> Option<Vec<f32>> {
    if !available() || x.len() != n * k || wt.len() != k * m {
        return None;
    }
    let mut y = vec![0.0f32; n * m];
    let out = Out(y.as_mut_ptr());
    // Each task writes its strip's columns of `y` itself (copying all strips in on one
    // thread afterwards was a serial pass over `y`: 100 MB for the output layer at 512
    // rows).
    (0..m.div_ceil(TASK_COLS)).into_par_iter().for_each(|t| {
        let c0 = t * TASK_COLS;
        let width = TASK_COLS.min(m - c0);
        let part = strip(x, n, wt, k, m, c0, width);
        for (r, row) in part.chunks_exact(width).enumerate() {
            // SAFETY: columns `[c0, c0 + width)` of row `r < n` lie within `y: [n, m]`,
            // and no other task writes them (tasks own disjoint column ranges); `y`
            // outlives the tasks.
            unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), out.at(r * m + c0), width) };
        }
    });
    Some(y)
}

/// `y`'s memory, shared by tasks that each write only their own columns.
#[derive(Clone, Copy)]
struct Out(*mut f32);

impl Out {
    /// The address of element `i` (a method, so that closures capture the whole `Out`,
    /// which is `Sync`, rather than its raw pointer field).
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

// SAFETY: the tasks of `matmul` write disjoint column ranges of `y` through it, and `y`
// outlives them.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// Columns `[c0, c0 + width)` of `y` for every row: `[n, width]`.
fn strip(x: &[f32], n: usize, wt: &[f32], k: usize, m: usize, c0: usize, width: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; n * width];
    let whole = width / TILE_COLS * TILE_COLS;
    // The strip's columns packed contiguously (`[k, whole]`): read in order by every tile,
    // instead of one cache line per page of a wide `Wᵀ` (TLB misses on the output layer).
    let mut panel = vec![0.0f32; k * whole];
    for (i, row) in panel.chunks_exact_mut(whole.max(1)).enumerate().take(k) {
        row.copy_from_slice(&wt[i * m + c0..i * m + c0 + whole]);
    }
    for cc in (0..whole).step_by(TILE_COLS) {
        let mut r0 = 0;
        while r0 < n {
            let rows = TILE_ROWS.min(n - r0);
            let mut acc = [[0.0f32; TILE_COLS]; TILE_ROWS];
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `matmul` runs only when `available()` (AVX2 and FMA); the indices stay
            // within `x` and `panel` (checked lengths; cc + 16 ≤ whole).
            unsafe {
                x86::tile(x, k, &panel, whole, cc, r0, rows, &mut acc)
            };
            for (r, a) in acc.iter().enumerate().take(rows) {
                out[(r0 + r) * width + cc..(r0 + r) * width + cc + TILE_COLS].copy_from_slice(a);
            }
            r0 += rows;
        }
    }
    // Columns past the last whole tile (when `m` is not a multiple of 16).
    for r in 0..n {
        for c in whole..width {
            let mut s = 0.0f32;
            for i in 0..k {
                s = x[r * k + i].mul_add(wt[i * m + c0 + c], s);
            }
            out[r * width + c] = s;
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{TILE_COLS, TILE_ROWS};

    /// `acc[r][·] = Σ_i x[r0 + r, i] · Wᵀ[i, c..c + 16]` for `r < rows ≤ 6`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn tile(
        x: &[f32],
        k: usize,
        wt: &[f32],
        m: usize,
        c: usize,
        r0: usize,
        rows: usize,
        acc: &mut [[f32; TILE_COLS]; TILE_ROWS],
    ) {
        let mut a = [[_mm256_setzero_ps(); 2]; TILE_ROWS];
        let xp = x.as_ptr();
        let wp = wt.as_ptr();
        for i in 0..k {
            // SAFETY (caller): i < k, c + 16 ≤ m, so the 16 floats at i·m + c are in `wt`.
            let (w0, w1) = unsafe {
                (
                    _mm256_loadu_ps(wp.add(i * m + c)),
                    _mm256_loadu_ps(wp.add(i * m + c + 8)),
                )
            };
            // A fixed trip count over indices (unrolled, accumulators in registers; the
            // iterator form measured ~25% slower at n = 64), rows past `rows` skipped.
            #[allow(clippy::needless_range_loop)]
            for r in 0..TILE_ROWS {
                if r < rows {
                    // SAFETY (caller): r0 + r < n and i < k.
                    let b = unsafe { _mm256_broadcast_ss(&*xp.add((r0 + r) * k + i)) };
                    a[r][0] = _mm256_fmadd_ps(b, w0, a[r][0]);
                    a[r][1] = _mm256_fmadd_ps(b, w1, a[r][1]);
                }
            }
        }
        for (out, ar) in acc.iter_mut().zip(&a).take(rows) {
            // SAFETY: each row of `acc` holds 16 floats.
            unsafe {
                _mm256_storeu_ps(out.as_mut_ptr(), ar[0]);
                _mm256_storeu_ps(out.as_mut_ptr().add(8), ar[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::small_batch::tests::{assert_product, operands};
    use super::*;

    /// Agrees with the definition (in f64) on shapes with and without whole tiles of rows
    /// and columns.
    #[test]
    fn matches_the_definition() {
        if !available() {
            eprintln!("SKIPPED: no AVX2+FMA on this CPU (the caller keeps candle's GEMM)");
            return;
        }
        for (n, k, m) in [(1, 3, 16), (7, 33, 70), (13, 64, 130), (40, 100, 200)] {
            let (x, wt) = operands(n, k, m);
            let y = matmul(&x, n, &wt, k, m).unwrap();
            assert_product(&x, &wt, &y, n, k, m);
        }
    }
}
