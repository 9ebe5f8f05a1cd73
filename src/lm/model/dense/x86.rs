//! The dense products on 256-bit registers (AVX2 and FMA), the loop orders every tile kind
//! shares (`task`), and the kernels' bodies written once for any register width ([`Lanes`]:
//! 256 bits here, 512 in `avx512`).

use std::arch::x86_64::*;

use super::{Weight, TILE_W, TILE_X};
use crate::lm::columns::Columns;

/// The operands of one product as the tiles see them: `x: [n, k]`, `w: [m, k]` and the
/// output `y: [n, m]`; for the 512-bit tiles also `x` in pairs of rows
/// ([`super::avx512::pair_rows`]; empty otherwise).
#[derive(Clone, Copy)]
pub(super) struct Operands<'a, W> {
    pub(super) x: &'a [f32],
    pub(super) pairs: &'a [f32],
    pub(super) n: usize,
    pub(super) w: &'a [W],
    pub(super) k: usize,
    pub(super) out: Columns,
}

/// A kind of register tile: how many weight rows and activation rows one call covers.
pub(super) trait Tiles<W: Weight> {
    /// Weight rows per tile (divides [`super::ROWS_PER_TASK`]).
    const W_ROWS: usize;
    /// Activation rows per tile.
    const X_ROWS: usize;
    /// Rows `[j, j + rw)` of `w` against rows `[r, r + rx)` of `x` (`rw ≤ W_ROWS`,
    /// `rx ≤ X_ROWS`, `r` a multiple of `X_ROWS`), into `y`; meanwhile `ahead.lines`
    /// cache lines from `ahead.from` are prefetched.
    ///
    /// # Safety
    /// The CPU has the tile's instructions; the rows exist, and the outputs are the
    /// caller's to write.
    unsafe fn tile(op: Operands<'_, W>, rw: usize, rx: usize, j: usize, r: usize, ahead: Ahead);
}

/// Three weight rows × four activation rows on 256-bit registers (AVX2 and FMA).
pub(super) struct Avx2;

impl<W: Weight> Tiles<W> for Avx2 {
    const W_ROWS: usize = TILE_W;
    const X_ROWS: usize = TILE_X;

    unsafe fn tile(op: Operands<'_, W>, rw: usize, rx: usize, j: usize, r: usize, ahead: Ahead) {
        // SAFETY (caller).
        unsafe { tile_of(op, (rw, rx), (j, r), ahead) }
    }
}

/// Columns `[j0, j1)` of `y` for fewer than [`super::ROW_BELOW`] rows: one weight row
/// at a time ([`row`], or its 512-bit form with the same sums when `wide`).
///
/// # Safety
/// AVX2 and FMA present, and AVX-512 when `wide`; `out` points to `y: [n, m]` whose
/// columns `[j0, j1)` nobody else accesses meanwhile.
pub(super) unsafe fn rows<W: Weight>(op: Operands<'_, W>, j0: usize, j1: usize, wide: bool) {
    use super::avx512::row as row512;
    for j in j0..j1 {
        // SAFETY (caller): row j of `w` and every row of `x` exist; column j is this
        // task's; AVX-512 present when `wide`.
        unsafe {
            match (op.n, wide) {
                (1, false) => row::<W, 1>(op, j),
                (2, false) => row::<W, 2>(op, j),
                (_, false) => row::<W, 3>(op, j),
                (1, true) => row512::<W, 1>(op, j),
                (2, true) => row512::<W, 2>(op, j),
                (_, true) => row512::<W, 3>(op, j),
            }
        }
    }
}

/// Columns `[j0, j1)` of `y` for every row, by tiles `T`. Up to [`ACTIVATIONS_IN_L2`]
/// of activations, each tile of weight rows (in L1) meets every group of activation
/// rows before the next tile, and the next tile's weights are prefetched while it does
/// (see [`Ahead`]); above, each group of activation rows meets the task's weight rows
/// in turn.
///
/// # Safety
/// The CPU has `T`'s instructions; `out` points to `y: [n, m]` whose columns `[j0, j1)`
/// nobody else accesses meanwhile (and `pairs` is filled where `T` reads it).
pub(super) unsafe fn task<W: Weight, T: Tiles<W>>(op: Operands<'_, W>, j0: usize, j1: usize) {
    let (n, k) = (op.n, op.k);
    if n * k * std::mem::size_of::<f32>() > ACTIVATIONS_IN_L2 {
        // Many activation rows: the task's weight rows stay in L2 while the groups of
        // activation rows pass (each group in L1); only the first group waits on
        // memory for the weights, a small share of the work at this size.
        let mut r = 0;
        while r < n {
            let rx = (n - r).min(T::X_ROWS);
            let mut j = j0;
            while j < j1 {
                let rw = (j1 - j).min(T::W_ROWS);
                // SAFETY (caller): rows `[j, j + rw)` of `w` and `[r, r + rx)` of `x`
                // exist, and the outputs written are columns of this task.
                unsafe { T::tile(op, rw, rx, j, r, Ahead::NONE) };
                j += rw;
            }
            r += rx;
        }
        return;
    }
    // Few activation rows (all in L2): each tile of weight rows meets every group
    // before the next tile, whose weights are prefetched meanwhile.
    let groups = n.div_ceil(T::X_ROWS);
    let mut j = j0;
    while j < j1 {
        let rw = (j1 - j).min(T::W_ROWS);
        // The next tile of this task: its rows follow this tile's in memory.
        let next = j + rw;
        let next_rows = (j1 - next).min(T::W_ROWS);
        let lines = (next_rows * k * std::mem::size_of::<W>()).div_ceil(LINE);
        let per_group = lines.div_ceil(groups);
        let base = op.w.as_ptr().wrapping_add(next * k).cast::<i8>();
        let mut r = 0;
        let mut g = 0;
        while r < n {
            let rx = (n - r).min(T::X_ROWS);
            let first = (g * per_group).min(lines);
            let ahead = Ahead {
                // Only an address for `_mm_prefetch`, which never faults; it lies
                // within `w` whenever `lines > 0`.
                from: base.wrapping_add(first * LINE),
                lines: ((g + 1) * per_group).min(lines) - first,
            };
            // SAFETY (caller): as above.
            unsafe { T::tile(op, rw, rx, j, r, ahead) };
            r += rx;
            g += 1;
        }
        j += rw;
    }
}

/// [`tile`] for `rw ≤ 3` weight rows and `rx ≤ 4` activation rows.
///
/// # Safety
/// As [`tile`].
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_of<W: Weight>(
    op: Operands<'_, W>,
    (rw, rx): (usize, usize),
    (j, r): (usize, usize),
    ahead: Ahead,
) {
    // SAFETY (caller).
    unsafe {
        match (rw, rx) {
            (3, 4) => tile::<W, 3, 4>(op, j, r, ahead),
            (3, 3) => tile::<W, 3, 3>(op, j, r, ahead),
            (3, 2) => tile::<W, 3, 2>(op, j, r, ahead),
            (3, _) => tile::<W, 3, 1>(op, j, r, ahead),
            (2, 4) => tile::<W, 2, 4>(op, j, r, ahead),
            (2, 3) => tile::<W, 2, 3>(op, j, r, ahead),
            (2, 2) => tile::<W, 2, 2>(op, j, r, ahead),
            (2, _) => tile::<W, 2, 1>(op, j, r, ahead),
            (_, 4) => tile::<W, 1, 4>(op, j, r, ahead),
            (_, 3) => tile::<W, 1, 3>(op, j, r, ahead),
            (_, 2) => tile::<W, 1, 2>(op, j, r, ahead),
            _ => tile::<W, 1, 1>(op, j, r, ahead),
        }
    }
}

/// Bytes per cache line (x86-64).
pub(super) const LINE: usize = 64;
/// Most bytes of activations for which each weight tile meets all activation rows
/// before the next (they must stay in L2, 256 KiB or more on x86-64 CPUs with AVX2):
/// SmolLM2's products up to 64 rows at k = 576 and 40 at k = 1536. Above it the
/// group-by-group order keeps each group in L1, and only its first pass waits on the
/// weights; the tile order in 64-row blocks measured no better at 256 particles
/// (docs/benchmarks.md, issue 13's sixth round).
const ACTIVATIONS_IN_L2: usize = 256 * 1024;

/// Cache lines of the next weight tile to prefetch during one tile call. Without it each
/// tile's first group waited on memory for its weights (a model's weights are far larger
/// than the caches and every step reads them all); spread over the groups' loops, the
/// loads of the next tile overlap the arithmetic of this one. Measured in
/// docs/benchmarks.md (issue 13, sixth round).
#[derive(Clone, Copy)]
pub(super) struct Ahead {
    pub(super) from: *const i8,
    pub(super) lines: usize,
}

impl Ahead {
    /// Nothing to prefetch.
    const NONE: Ahead = Ahead {
        from: std::ptr::null(),
        lines: 0,
    };
}

/// A register of f32 lanes the kernels' bodies ([`row_with`], [`tile_with`]) run on: 256
/// bits (eight lanes) here, 512 bits (sixteen) in `avx512`. Every lane accumulates the same
/// products in the same order in both widths, so both give the same sums.
pub(super) trait Lanes: Copy {
    /// Activation rows one register holds in the tiles (1, or 2 as two halves).
    const ROWS: usize;
    /// Registers per 32 values of `k` in the row kernel.
    const PER_32: usize;
    /// # Safety (all methods)
    /// The CPU has the width's instructions; pointers have as many readable values as
    /// the method reads.
    unsafe fn zero() -> Self;
    /// Eight weights from `p`, as f32, in every half.
    unsafe fn weights8<W: Weight>(p: *const W) -> Self;
    /// As many consecutive weights from `p` as lanes.
    unsafe fn weights<W: Weight>(p: *const W) -> Self;
    /// As many consecutive f32 from `p` as lanes.
    unsafe fn load(p: *const f32) -> Self;
    /// `a · b + c`, lane by lane.
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self;
    /// The lane sum of each half (one per activation row held; `[s, 0]` for one row).
    unsafe fn half_sums(self) -> [f32; 2];
    /// The row kernel's `PER_32` accumulators summed as the 256-bit kernel sums its four:
    /// `(a0 + a1) + (a2 + a3)`, then across lanes.
    unsafe fn row_sum(acc: &[Self]) -> f32;
}

impl Lanes for __m256 {
    const ROWS: usize = 1;
    const PER_32: usize = 4;

    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY (caller): AVX.
        unsafe { _mm256_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn weights8<W: Weight>(p: *const W) -> Self {
        // SAFETY (caller).
        unsafe { W::load8(p) }
    }
    #[inline(always)]
    unsafe fn weights<W: Weight>(p: *const W) -> Self {
        // SAFETY (caller).
        unsafe { W::load8(p) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY (caller).
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
        // SAFETY (caller): FMA.
        unsafe { _mm256_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn half_sums(self) -> [f32; 2] {
        // SAFETY (caller).
        [unsafe { hsum(self) }, 0.0]
    }
    #[inline(always)]
    unsafe fn row_sum(acc: &[Self]) -> f32 {
        // SAFETY (caller).
        unsafe {
            hsum(_mm256_add_ps(
                _mm256_add_ps(acc[0], acc[1]),
                _mm256_add_ps(acc[2], acc[3]),
            ))
        }
    }
}

/// `y[r][j] = s + Σ_{whole ≤ i < k} w[j][i] · x[r][i]`: the last terms in order, then the
/// output written.
///
/// # Safety
/// Row `j` of `w` and row `r` of `x` exist, and `y[r][j]` is the caller's to write.
#[inline(always)]
unsafe fn finish<W: Weight>(op: Operands<'_, W>, s: f32, r: usize, j: usize, whole: usize) {
    let Operands { x, w, k, out, .. } = op;
    let mut s = s;
    for i in whole..k {
        s = w[j * k + i].widen().mul_add(x[r * k + i], s);
    }
    // SAFETY (caller).
    unsafe { out.write(r, j, s) };
}

/// One weight row against `RX` activation rows, 32 values of `k` in flight per activation
/// row: the weights stream in memory order, one row after the next, which the hardware
/// prefetcher follows best (the tiles' three rows at a time are slower by 10–20% at one
/// or two activation rows, where the product is bound by memory). `Q` is `L::PER_32`.
///
/// # Safety
/// As [`task`], with `L`'s instructions: row `j` of `w: [m, k]` and rows `[0, RX)` of
/// `x: [RX, k]` exist, and column `j` of `y` is the caller's to write.
#[inline(always)]
pub(super) unsafe fn row_with<W: Weight, L: Lanes, const Q: usize, const RX: usize>(
    op: Operands<'_, W>,
    j: usize,
) {
    debug_assert_eq!(Q, L::PER_32);
    let (wp, xp, k) = (op.w.as_ptr().wrapping_add(j * op.k), op.x.as_ptr(), op.k);
    let lanes = 32 / Q;
    // SAFETY (caller): the width's instructions.
    let mut acc = [[unsafe { L::zero() }; Q]; RX];
    let whole = k / 32 * 32;
    let mut i = 0;
    while i < whole {
        for q in 0..Q {
            // SAFETY (caller): i + 32 ≤ k within row j of `w` and every row of `x`.
            let wv = unsafe { L::weights(wp.add(i + lanes * q)) };
            for (b, a) in acc.iter_mut().enumerate() {
                // SAFETY: as above.
                unsafe { a[q] = L::fma(wv, L::load(xp.add(b * k + i + lanes * q)), a[q]) };
            }
        }
        i += 32;
    }
    for (b, a) in acc.iter().enumerate() {
        // SAFETY (caller): row b < RX, column j of `y`.
        unsafe { finish(op, L::row_sum(a), b, j, whole) };
    }
}

/// [`row_with`] on 256-bit registers.
///
/// # Safety
/// As [`row_with`], with AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn row<W: Weight, const RX: usize>(op: Operands<'_, W>, j: usize) {
    // SAFETY (caller).
    unsafe { row_with::<W, __m256, 4, RX>(op, j) }
}

/// Horizontal sum of eight f32 lanes.
#[target_feature(enable = "avx2,fma")]
pub(super) fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Where a tile's activations lie: register `b` of step `c` (eight values of `k`) at
/// `base + b · stride + c · 8 · L::ROWS`; its first row is `first`.
#[derive(Clone, Copy)]
pub(super) struct Rows {
    pub(super) base: *const f32,
    pub(super) stride: usize,
    pub(super) first: usize,
}

/// `y[first + b · L::ROWS + h][j + a] = Σ_i w[j + a][i] · x[..][i]` for `a < RW`, `b < RX`
/// registers and their `h < L::ROWS` rows (those below `n`): eight lanes of partial sums
/// per row over `i < k − k mod 8`, summed across lanes, then the last `k mod 8` terms in
/// order. Meanwhile `ahead.lines` cache lines from `ahead.from` are prefetched, spread
/// evenly over the steps (a Bresenham count: no division in the loop).
///
/// # Safety
/// As [`task`], with `L`'s instructions: rows `[j, j + RW)` of `w: [m, k]` and the `RX`
/// registers of `rows` exist, and the outputs are the caller's to write.
#[inline(always)]
pub(super) unsafe fn tile_with<W: Weight, L: Lanes, const RW: usize, const RX: usize>(
    op: Operands<'_, W>,
    j: usize,
    rows: Rows,
    ahead: Ahead,
) {
    let (k, n, wp) = (op.k, op.n, op.w.as_ptr());
    debug_assert!((j + RW) * k <= op.w.len());
    // SAFETY (caller): the width's instructions.
    let mut acc = [[unsafe { L::zero() }; RX]; RW];
    let steps = k / 8;
    let (mut next, mut credit) = (ahead.from, 0usize);
    for c in 0..steps {
        credit += ahead.lines;
        while credit >= steps {
            // Only a hint: prefetching never faults, whatever the address.
            // SAFETY: SSE, which every x86-64 CPU has.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(next) };
            next = next.wrapping_add(LINE);
            credit -= steps;
        }
        // SAFETY (caller): the width's instructions.
        let mut wv = [unsafe { L::zero() }; RW];
        for (a, v) in wv.iter_mut().enumerate() {
            // SAFETY (caller): 8c + 8 ≤ k within row j + a of `w`.
            *v = unsafe { L::weights8(wp.add((j + a) * k + 8 * c)) };
        }
        // Fixed trip counts over indices, which the compiler unrolls with every
        // accumulator in a register.
        #[allow(clippy::needless_range_loop)]
        for b in 0..RX {
            // SAFETY (caller): register b of step c lies within the activations.
            let xv = unsafe { L::load(rows.base.add(b * rows.stride + 8 * L::ROWS * c)) };
            for a in 0..RW {
                // SAFETY (caller): the width's instructions.
                acc[a][b] = unsafe { L::fma(wv[a], xv, acc[a][b]) };
            }
        }
    }
    for (a, regs) in acc.iter().enumerate() {
        for (b, &v) in regs.iter().enumerate() {
            // SAFETY (caller): the width's instructions.
            let sums = unsafe { v.half_sums() };
            for (h, &s) in sums.iter().enumerate().take(L::ROWS) {
                let r = rows.first + b * L::ROWS + h;
                if r < n {
                    // SAFETY (caller): row r < n, column j + a < m of `y`, the caller's.
                    unsafe { finish(op, s, r, j + a, steps * 8) };
                }
            }
        }
    }
}

/// [`tile_with`] on 256-bit registers, one activation row per register: rows
/// `[r, r + RX)` of `x`.
///
/// # Safety
/// As [`tile_with`], with AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn tile<W: Weight, const RW: usize, const RX: usize>(
    op: Operands<'_, W>,
    j: usize,
    r: usize,
    ahead: Ahead,
) {
    debug_assert!((r + RX) * op.k <= op.x.len());
    let rows = Rows {
        base: op.x.as_ptr().wrapping_add(r * op.k),
        stride: op.k,
        first: r,
    };
    // SAFETY (caller).
    unsafe { tile_with::<W, __m256, RW, RX>(op, j, rows, ahead) }
}
