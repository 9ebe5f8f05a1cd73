//! The dense tiles on 512-bit registers (AVX-512 F and DQ), computing exactly the sums of
//! the 256-bit tiles.
//!
//! Each register holds two activation rows, eight lanes each: lanes `0..8` are row `2p`'s
//! `x[i..i + 8]` and lanes `8..16` row `2p + 1`'s, and the weights' `w[i..i + 8]` are
//! broadcast to both halves. Lane `l` of each half then accumulates the same products in the
//! same order as lane `l` of the 256-bit tile's accumulator for that row, and each half is
//! summed across its lanes as there: the outputs are bit-equal to the AVX2 tiles', so the
//! choice between them changes speed only (and results do not depend on the machine's
//! vector width). A tile is four weight rows × four pairs of activation rows: sixteen
//! accumulators, four broadcasts and four loads per sixteen multiply-adds (the 256-bit
//! tile needs seven loads per twelve multiply-adds of half the width). The activation
//! rows are interleaved into pairs once per product ([`pair_rows`]), so the inner loop
//! loads each pair with one instruction.

use std::arch::x86_64::*;

use super::x86::{hsum, Ahead, Operands, Tiles, LINE};
use super::Weight;
use crate::lm::columns::Columns;

/// Weight rows per tile.
const W_ROWS: usize = 4;
/// Pairs of activation rows per tile.
const PAIRS: usize = 4;
/// f32 lanes per half register.
const HALF: usize = 8;

/// Four weight rows × eight activation rows (four pairs) on 512-bit registers.
pub(super) struct Avx512;

impl<W: Weight> Tiles<W> for Avx512 {
    const W_ROWS: usize = W_ROWS;
    const X_ROWS: usize = 2 * PAIRS;

    unsafe fn tile(op: Operands<'_, W>, rw: usize, rx: usize, j: usize, r: usize, ahead: Ahead) {
        let (p, pairs) = (r / 2, rx.div_ceil(2));
        // SAFETY (caller): AVX-512 present; the rows exist; `op.pairs` holds `pair_rows`.
        unsafe {
            match (rw, pairs) {
                (4, 4) => tile::<W, 4, 4>(op, j, p, ahead),
                (4, 3) => tile::<W, 4, 3>(op, j, p, ahead),
                (4, 2) => tile::<W, 4, 2>(op, j, p, ahead),
                (4, _) => tile::<W, 4, 1>(op, j, p, ahead),
                (3, 4) => tile::<W, 3, 4>(op, j, p, ahead),
                (3, 3) => tile::<W, 3, 3>(op, j, p, ahead),
                (3, 2) => tile::<W, 3, 2>(op, j, p, ahead),
                (3, _) => tile::<W, 3, 1>(op, j, p, ahead),
                (2, 4) => tile::<W, 2, 4>(op, j, p, ahead),
                (2, 3) => tile::<W, 2, 3>(op, j, p, ahead),
                (2, 2) => tile::<W, 2, 2>(op, j, p, ahead),
                (2, _) => tile::<W, 2, 1>(op, j, p, ahead),
                (_, 4) => tile::<W, 1, 4>(op, j, p, ahead),
                (_, 3) => tile::<W, 1, 3>(op, j, p, ahead),
                (_, 2) => tile::<W, 1, 2>(op, j, p, ahead),
                _ => tile::<W, 1, 1>(op, j, p, ahead),
            }
        }
    }
}

/// `x: [n, k]` as pairs of rows for the tiles: pair `p`'s chunk `c` (of `k / 8`) is the
/// sixteen values `x[2p][8c..8c + 8]`, `x[2p + 1][8c..8c + 8]` at `(p · k/8 + c) · 16`.
/// With `n` odd the last pair repeats its row (the tiles do not write the copy's outputs).
/// The last `k mod 8` columns are not copied: the tiles add them from `x` itself.
pub(super) fn pair_rows(x: &[f32], n: usize, k: usize) -> Vec<f32> {
    let chunks = k / HALF;
    let mut out = Vec::with_capacity(n.div_ceil(2) * chunks * 2 * HALF);
    for p in 0..n.div_ceil(2) {
        let (a, b) = (2 * p, (2 * p + 1).min(n - 1));
        for c in 0..chunks {
            out.extend_from_slice(&x[a * k + c * HALF..a * k + (c + 1) * HALF]);
            out.extend_from_slice(&x[b * k + c * HALF..b * k + (c + 1) * HALF]);
        }
    }
    out
}

/// `y[2(p + q) + h][j + a] = Σ_i w[j + a][i] · x[2(p + q) + h][i]` for `a < RW`, `q < RP`,
/// `h < 2` (rows below `n` only): eight lanes of partial sums per row over
/// `i < k − k mod 8`, summed across lanes, then the last `k mod 8` terms in order — the
/// 256-bit tile's sum. Meanwhile `ahead.lines` cache lines from `ahead.from` are prefetched.
///
/// # Safety
/// AVX-512 F and DQ present; rows `[j, j + RW)` of `w: [m, k]` and pairs `[p, p + RP)` of
/// `op.pairs` exist, and the outputs are the caller's to write.
#[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
unsafe fn tile<W: Weight, const RW: usize, const RP: usize>(
    op: Operands<'_, W>,
    j: usize,
    p: usize,
    ahead: Ahead,
) {
    let Operands {
        x,
        pairs,
        n,
        w,
        k,
        out,
    } = op;
    let whole = k / HALF * HALF;
    let steps = whole / HALF;
    debug_assert!((j + RW) * k <= w.len() && (p + RP) * steps * 2 * HALF <= pairs.len());
    let (wp, xp) = (w.as_ptr(), pairs.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); RP]; RW];
    // `ahead.lines` prefetches spread evenly over the steps (a Bresenham count).
    let (mut next, mut credit) = (ahead.from, 0usize);
    for c in 0..steps {
        credit += ahead.lines;
        while credit >= steps {
            // Only a hint: prefetching never faults, whatever the address.
            _mm_prefetch::<_MM_HINT_T0>(next);
            next = next.wrapping_add(LINE);
            credit -= steps;
        }
        let mut wv = [_mm512_setzero_ps(); RW];
        for (a, v) in wv.iter_mut().enumerate() {
            // SAFETY (caller): 8c + 8 ≤ k within row j + a of `w`.
            *v = unsafe { W::broadcast8(wp.add((j + a) * k + c * HALF)) };
        }
        // Fixed trip counts over indices, which the compiler unrolls with every
        // accumulator in a register.
        #[allow(clippy::needless_range_loop)]
        for q in 0..RP {
            // SAFETY (caller): chunk c of pair p + q lies within `pairs`.
            let xv = unsafe { _mm512_loadu_ps(xp.add(((p + q) * steps + c) * 2 * HALF)) };
            for a in 0..RW {
                acc[a][q] = _mm512_fmadd_ps(wv[a], xv, acc[a][q]);
            }
        }
    }
    for (a, row) in acc.iter().enumerate() {
        for (q, &v) in row.iter().enumerate() {
            let halves = [_mm512_castps512_ps256(v), _mm512_extractf32x8_ps::<1>(v)];
            for (h, half) in halves.into_iter().enumerate() {
                let r = 2 * (p + q) + h;
                if r >= n {
                    continue;
                }
                let mut s = hsum(half);
                for i in whole..k {
                    s = w[(j + a) * k + i].widen().mul_add(x[r * k + i], s);
                }
                // SAFETY (caller): row r < n, column j + a < m of `y`, the caller's.
                unsafe { out.write(r, j + a, s) };
            }
        }
    }
}

/// One weight row against `RX` activation rows, as the 256-bit row kernel (`x86::row`)
/// computes it: its four accumulators of eight lanes (`k` offsets `i + 8q + l`) are here
/// two registers of sixteen (offsets `i + 16h + l`, the first two and the last two), and
/// they are added in that kernel's order, `(a0 + a1) + (a2 + a3)`, before the lane sum.
///
/// # Safety
/// AVX-512 F and DQ present; row `j` of `w: [m, k]` and rows `[0, RX)` of `x: [RX, k]`
/// exist, and column `j` of `y` is the caller's to write.
#[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
pub(super) unsafe fn row<W: Weight, const RX: usize>(
    x: &[f32],
    w: &[W],
    k: usize,
    j: usize,
    out: Columns,
) {
    let (wp, xp) = (w.as_ptr().wrapping_add(j * k), x.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); 2]; RX];
    let whole = k / 32 * 32;
    let mut i = 0;
    while i < whole {
        for h in 0..2 {
            // SAFETY (caller): i + 32 ≤ k within row j of `w` and every row of `x`.
            let wv = unsafe { W::load16(wp.add(i + 16 * h)) };
            for (b, a) in acc.iter_mut().enumerate() {
                // SAFETY: as above.
                let xv = unsafe { _mm512_loadu_ps(xp.add(b * k + i + 16 * h)) };
                a[h] = _mm512_fmadd_ps(wv, xv, a[h]);
            }
        }
        i += 32;
    }
    for (b, a) in acc.iter().enumerate() {
        let pair =
            |v: __m512| _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps::<1>(v));
        let mut s = hsum(_mm256_add_ps(pair(a[0]), pair(a[1])));
        for i in whole..k {
            s = w[j * k + i].widen().mul_add(x[b * k + i], s);
        }
        // SAFETY (caller): row b < RX, column j of `y`.
        unsafe { out.write(b, j, s) };
    }
}
