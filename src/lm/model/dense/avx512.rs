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

use super::x86::{hsum, row_with, tile_with, Ahead, Lanes, Operands, Rows, Tiles};
use super::Weight;

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

impl Lanes for __m512 {
    const ROWS: usize = 2;
    const PER_32: usize = 2;

    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY (caller): AVX-512 F.
        unsafe { _mm512_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn weights8<W: Weight>(p: *const W) -> Self {
        // SAFETY (caller).
        unsafe { W::broadcast8(p) }
    }
    #[inline(always)]
    unsafe fn weights<W: Weight>(p: *const W) -> Self {
        // SAFETY (caller).
        unsafe { W::load16(p) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY (caller).
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
        // SAFETY (caller): AVX-512 F.
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn half_sums(self) -> [f32; 2] {
        // SAFETY (caller): AVX-512 F and DQ.
        unsafe {
            [
                hsum(_mm512_castps512_ps256(self)),
                hsum(_mm512_extractf32x8_ps::<1>(self)),
            ]
        }
    }
    /// The two registers are the 256-bit kernel's four accumulators `a0 | a1`, `a2 | a3`.
    #[inline(always)]
    unsafe fn row_sum(acc: &[Self]) -> f32 {
        // SAFETY (caller): AVX-512 F and DQ.
        unsafe {
            let pair = |v: __m512| {
                _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps::<1>(v))
            };
            hsum(_mm256_add_ps(pair(acc[0]), pair(acc[1])))
        }
    }
}

/// [`tile_with`] on 512-bit registers, two activation rows per register: pairs
/// `[p, p + RP)` of [`pair_rows`]. Each output is the 256-bit tile's sum.
///
/// # Safety
/// As [`tile_with`], with AVX-512 F and DQ; `op.pairs` holds [`pair_rows`] of `x`.
#[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
unsafe fn tile<W: Weight, const RW: usize, const RP: usize>(
    op: Operands<'_, W>,
    j: usize,
    p: usize,
    ahead: Ahead,
) {
    let pair = (op.k / HALF) * 2 * HALF;
    debug_assert!((p + RP) * pair <= op.pairs.len());
    let rows = Rows {
        base: op.pairs.as_ptr().wrapping_add(p * pair),
        stride: pair,
        first: 2 * p,
    };
    // SAFETY (caller).
    unsafe { tile_with::<W, __m512, RW, RP>(op, j, rows, ahead) }
}

/// [`row_with`] on 512-bit registers: two of them stand for the 256-bit row kernel's four
/// accumulators (the same sums).
///
/// # Safety
/// As [`row_with`], with AVX-512 F and DQ.
#[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
pub(super) unsafe fn row<W: Weight, const RX: usize>(op: Operands<'_, W>, j: usize) {
    // SAFETY (caller).
    unsafe { row_with::<W, __m512, 2, RX>(op, j) }
}
