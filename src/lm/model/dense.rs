//! Dense products `y = x Wᵀ` on the CPU, with `W: [m, k]` row-major as model files store it
//! (each output's weights contiguous) and f32 or bf16 weights: register tiles of
//! [`TILE_W`] weight rows × [`TILE_X`] activation rows, each of the twelve accumulators eight
//! lanes of partial sums along `k`, summed across lanes at the end (the dot-product form of
//! llamafile's sgemm in llama.cpp). Each weight vector loaded serves four activation rows
//! and each activation vector three weight rows, and both operands are read in memory
//! order, so nothing is packed or transposed per call. While the activation rows fit in
//! L2, a tile's weights meet every group of activation rows before the next tile's, whose
//! weights are prefetched meanwhile: a model's weights do not fit in the caches, so every
//! step reads them from memory, and this way the reading overlaps the arithmetic.
//!
//! Tasks own runs of [`ROWS_PER_TASK`] output columns (weight rows), so every output is one
//! sum in a fixed order whatever the thread count (deterministic). One activation row
//! (decoding one sequence) streams the weights once, in order: bound by memory, as any
//! kernel is there. Measured against the previous kernels (`Wᵀ` stored, a streaming loop
//! up to 24 rows and 6 × 16 broadcast tiles over copied strips above): docs/benchmarks.md.
//!
//! The instructions are chosen at run time, per shape ([`crate::lm::cpu`]): x86-64 with AVX2
//! and FMA runs the tiles in 256-bit intrinsics (`x86`); with AVX-512 too, products of four
//! or more rows run 512-bit tiles (`avx512`) that hold two activation rows per register and
//! give the 256-bit tiles' sums bit for bit, and fewer rows stream one weight row at a time
//! on 512-bit registers with the 256-bit row kernel's sums. Every other CPU (ARM, older
//! x86) has the same tiles
//! written on arrays of eight lanes, which the compiler vectorises for the target
//! (`portable`); the caller uses them for bf16 weights (candle's GEMM has no bf16 × f32
//! product, and widening a whole matrix per product is slow) and candle's GEMM for f32,
//! which on this project's machine ran the portable tiles' shapes 1.3–2× faster.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use crate::lm::columns::ColumnWriter;
use crate::lm::cpu::CpuFeatures;

/// Weight rows per register tile.
const TILE_W: usize = 3;
/// Activation rows per register tile.
const TILE_X: usize = 4;
/// Fewer activation rows than this are multiplied one weight row at a time (`x86::row`),
/// more by the tiles.
const ROW_BELOW: usize = 4;
/// Weight rows (output columns) per parallel task: a multiple of [`TILE_W`]; 48 rows of
/// 576 f32 weights (110 KiB) stay in L2 while every group of activation rows passes.
const ROWS_PER_TASK: usize = 48;

/// A stored weight type: f32, or bf16 widened on load.
pub(super) trait Weight: Copy + Send + Sync {
    /// The weight as f32.
    fn widen(self) -> f32;
    /// Eight consecutive weights from `p` as f32 lanes.
    ///
    /// # Safety
    /// Eight values from `p` are readable, and the CPU has AVX2.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    /// Eight consecutive weights from `p` as f32, in both halves of a 512-bit register.
    ///
    /// # Safety
    /// Eight values from `p` are readable, and the CPU has AVX-512 F and DQ.
    #[cfg(target_arch = "x86_64")]
    unsafe fn broadcast8(p: *const Self) -> std::arch::x86_64::__m512;
    /// Sixteen consecutive weights from `p` as f32 lanes.
    ///
    /// # Safety
    /// Sixteen values from `p` are readable, and the CPU has AVX-512 F.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl Weight for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        // SAFETY (caller): eight f32 from `p` are readable.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn broadcast8(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY (caller): eight f32 from `p` are readable, AVX-512 F and DQ present.
        unsafe { _mm512_broadcast_f32x8(_mm256_loadu_ps(p)) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        // SAFETY (caller): sixteen f32 from `p` are readable, AVX-512 F present.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
}

impl Weight for half::bf16 {
    /// bf16 is the upper half of an f32: a shift.
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY (caller): eight bf16 (16 bytes) from `p` are readable, AVX2 present.
        unsafe {
            let h = _mm_loadu_si128(p.cast());
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn broadcast8(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY (caller): eight bf16 (16 bytes) from `p` are readable, AVX-512 F present.
        unsafe {
            let h = _mm256_broadcastsi128_si256(_mm_loadu_si128(p.cast()));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY (caller): sixteen bf16 (32 bytes) from `p` are readable, AVX-512 F present.
        unsafe {
            let h = _mm256_loadu_si256(p.cast());
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
    }
}

/// Whether this CPU runs the tiles in intrinsics (AVX2 and FMA, or AVX-512; see
/// [`crate::lm::cpu`]).
pub(super) fn available() -> bool {
    CpuFeatures::in_use().avx2
}

/// `y = x Wᵀ` for `x: [n, k]` and `W: [m, k]` (row-major); `y: [n, m]`. `None` when the
/// lengths do not match.
pub(super) fn matmul<W: Weight>(
    x: &[f32],
    n: usize,
    w: &[W],
    k: usize,
    m: usize,
) -> Option<Vec<f32>> {
    matmul_on(CpuFeatures::in_use(), x, n, w, k, m)
}

/// [`matmul`] with the instruction sets of `cpu` (which the CPU must have).
fn matmul_on<W: Weight>(
    cpu: CpuFeatures,
    x: &[f32],
    n: usize,
    w: &[W],
    k: usize,
    m: usize,
) -> Option<Vec<f32>> {
    if x.len() != n * k || w.len() != m * k {
        return None;
    }
    if n == 0 || m == 0 {
        return Some(vec![0.0f32; n * m]);
    }
    if !cpu.avx2 {
        return Some(portable::matmul(x, n, w, k, m));
    }
    #[cfg(target_arch = "x86_64")]
    {
        // Per shape: fewer than `ROW_BELOW` rows stream one weight row at a time, more run
        // tiles; both on 512-bit registers where the CPU has AVX-512 (the same sums as on
        // 256-bit ones; at least level with them at every shape measured, faster from 32
        // rows: docs/benchmarks.md, issue 13's seventh round).
        let wide = cpu.avx512 && n >= ROW_BELOW;
        let pairs = if wide {
            avx512::pair_rows(x, n, k)
        } else {
            Vec::new()
        };
        // Not zeroed first: every element is written once below (zeroing 12.5 MB of logits
        // per step at 64 rows was 1.5% of an SMC step's samples).
        let mut y = ColumnWriter::new(n, m);
        let op = x86::Operands {
            x,
            pairs: &pairs,
            n,
            w,
            k,
            out: y.columns(),
        };
        (0..m.div_ceil(ROWS_PER_TASK))
            .into_par_iter()
            .for_each(|t| {
                let j0 = t * ROWS_PER_TASK;
                let j1 = (j0 + ROWS_PER_TASK).min(m);
                // SAFETY: `cpu` (AVX2 and FMA, and AVX-512 for `wide`) is this CPU's; the
                // task writes only columns `[j0, j1)` of `y: [n, m]`, which no other task
                // writes; `pairs` holds `x` in pairs of rows when `wide`.
                unsafe {
                    if n < ROW_BELOW {
                        x86::rows(op, j0, j1, cpu.avx512);
                    } else if wide {
                        x86::task::<W, avx512::Avx512>(op, j0, j1);
                    } else {
                        x86::task::<W, x86::Avx2>(op, j0, j1);
                    }
                }
            });
        // SAFETY: each task wrote every row of its columns `[j0, j1)`, and the tasks'
        // columns cover `[0, m)`; the parallel loop has returned.
        Some(unsafe { y.finish() })
    }
    // (`cpu.avx2` is false off x86-64: the portable tiles above ran.)
    #[cfg(not(target_arch = "x86_64"))]
    Some(portable::matmul(x, n, w, k, m))
}

/// The tiles on arrays of eight lanes, for CPUs without AVX2 and FMA: the same loops as
/// `x86` (each output one ordered sum), without fused multiply-adds (a libm call per
/// element where the CPU lacks them).
mod portable {
    use rayon::prelude::*;

    use super::{Weight, ROWS_PER_TASK, TILE_W, TILE_X};

    /// Lanes of partial sums per accumulator.
    const LANES: usize = 8;

    pub(super) fn matmul<W: Weight>(x: &[f32], n: usize, w: &[W], k: usize, m: usize) -> Vec<f32> {
        // Each task computes its weight rows for every activation row, `[rows, n]`.
        let mut yt = vec![0.0f32; m * n];
        yt.par_chunks_mut(ROWS_PER_TASK * n)
            .enumerate()
            .for_each(|(t, out)| {
                let j0 = t * ROWS_PER_TASK;
                let rows = out.len() / n;
                for r in (0..n).step_by(TILE_X) {
                    let rx = (n - r).min(TILE_X);
                    for j in (j0..j0 + rows).step_by(TILE_W) {
                        let rw = (j0 + rows - j).min(TILE_W);
                        tile(x, w, k, n, j, rw, r, rx, &mut out[(j - j0) * n..]);
                    }
                }
            });
        if n == 1 {
            return yt;
        }
        let mut y = vec![0.0f32; n * m];
        y.par_chunks_mut(m).enumerate().for_each(|(r, row)| {
            for (j, v) in row.iter_mut().enumerate() {
                *v = yt[j * n + r];
            }
        });
        y
    }

    /// Rows `[j, j + rw)` of `w` against rows `[r, r + rx)` of `x`, into `out[a · n + r + b]`.
    #[allow(clippy::too_many_arguments)]
    fn tile<W: Weight>(
        x: &[f32],
        w: &[W],
        k: usize,
        n: usize,
        j: usize,
        rw: usize,
        r: usize,
        rx: usize,
        out: &mut [f32],
    ) {
        let mut acc = [[[0.0f32; LANES]; TILE_X]; TILE_W];
        let whole = k / LANES * LANES;
        for i in (0..whole).step_by(LANES) {
            for (a, acc_a) in acc.iter_mut().enumerate().take(rw) {
                let row = &w[(j + a) * k + i..(j + a) * k + i + LANES];
                let wv: [f32; LANES] = std::array::from_fn(|l| row[l].widen());
                for (b, acc_ab) in acc_a.iter_mut().enumerate().take(rx) {
                    let xs = &x[(r + b) * k + i..(r + b) * k + i + LANES];
                    for l in 0..LANES {
                        acc_ab[l] += wv[l] * xs[l];
                    }
                }
            }
        }
        for (a, acc_a) in acc.iter().enumerate().take(rw) {
            for (b, lanes) in acc_a.iter().enumerate().take(rx) {
                let mut s: f32 = lanes.iter().sum();
                for i in whole..k {
                    s += w[(j + a) * k + i].widen() * x[(r + b) * k + i];
                }
                out[a * n + r + b] = s;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512;

#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(test)]
mod tests {
    use super::*;

    /// Test operands of a product `[n, k] × [m, k]ᵀ`: small exact values (multiples of
    /// 1/16), not all equal.
    fn operands(n: usize, k: usize, m: usize) -> (Vec<f32>, Vec<f32>) {
        let x = (0..n * k)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0)
            .collect();
        let w = (0..m * k)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) / 16.0)
            .collect();
        (x, w)
    }

    /// `y` equals `x Wᵀ` computed in f64 (relative 1e-5: f32 sums of up to 1,100 terms).
    fn assert_product(x: &[f32], w: &[f32], y: &[f32], n: usize, k: usize, m: usize) {
        for r in 0..n {
            for c in 0..m {
                let want: f64 = (0..k)
                    .map(|i| f64::from(x[r * k + i]) * f64::from(w[c * k + i]))
                    .sum();
                let got = f64::from(y[r * m + c]);
                assert!(
                    (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "{n}x{k}x{m} at {r},{c}: {got} vs {want}"
                );
            }
        }
    }

    /// The instruction sets this CPU runs, each on its own: everything detected, then
    /// capped to AVX2, then none.
    fn feature_sets() -> Vec<CpuFeatures> {
        let mut v = vec![CpuFeatures::detected()];
        for cap in ["avx2", "portable"] {
            let c = CpuFeatures::detected().capped(cap).unwrap();
            if !v.contains(&c) {
                v.push(c);
            }
        }
        v
    }

    /// Agrees with the definition (in f64) for every tile shape and every instruction set
    /// of this CPU: row counts that leave odd rows, partial pairs and groups, and 1–3
    /// weight rows over, `k` with and without a tail of fewer than eight, several tasks.
    #[test]
    fn matches_the_definition() {
        for cpu in feature_sets() {
            for (k, m) in [(1, 1), (7, 5), (8, 49), (37, 100), (64, 97), (300, 50)] {
                for n in [1, 2, 3, 4, 5, 6, 7, 9, 13, 17] {
                    let (x, w) = operands(n, k, m);
                    let y = matmul_on(cpu, &x, n, &w, k, m).unwrap();
                    assert_product(&x, &w, &y, n, k, m);
                }
            }
            // Both loop orders with many groups: 130 rows at k = 300 (156 KiB of
            // activations: tile by tile, prefetching) and 70 rows at k = 1100 (301 KiB:
            // group by group); odd tiles at the ends of tasks and groups.
            for (n, k, m) in [(130, 300, 50), (71, 1100, 31)] {
                let (x, w) = operands(n, k, m);
                let y = matmul_on(cpu, &x, n, &w, k, m).unwrap();
                assert_product(&x, &w, &y, n, k, m);
            }
        }
        assert!(matmul(&[0.0; 3], 1, &[0.0f32; 4], 3, 1).is_none());
    }

    /// The 512-bit tiles and rows give exactly the 256-bit ones' outputs, for f32 and bf16
    /// weights whose sums round differently in every order (so a changed order shows): one
    /// to three rows (one weight row at a time), odd row counts, partial pairs and groups,
    /// `k` with and without a tail, both loop orders.
    /// Skipped (with a message) on a CPU without AVX-512.
    #[test]
    fn wide_tiles_give_the_avx2_sums() {
        let cpu = CpuFeatures::detected();
        if !cpu.avx512 {
            eprintln!("skipped: this CPU has no AVX-512 (only the AVX2 tiles run here)");
            return;
        }
        let avx2 = cpu.capped("avx2").unwrap();
        let shapes = [
            (1, 7, 5),
            (1, 1100, 31),
            (2, 37, 100),
            (3, 300, 50),
            (4, 7, 5),
            (5, 8, 49),
            (9, 37, 100),
            (13, 64, 97),
            (16, 300, 50),
            (23, 576, 60),
            (130, 300, 50),
            (71, 1100, 31),
        ];
        for (n, k, m) in shapes {
            let x: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.7371).sin()).collect();
            let w: Vec<f32> = (0..m * k)
                .map(|i| (i as f32 * 0.3119).cos() / 7.0)
                .collect();
            let wide = matmul_on(cpu, &x, n, &w, k, m).unwrap();
            assert_eq!(
                wide,
                matmul_on(avx2, &x, n, &w, k, m).unwrap(),
                "{n}x{k}x{m}"
            );
            assert_product(&x, &w, &wide, n, k, m);
            let narrow: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
            assert_eq!(
                matmul_on(cpu, &x, n, &narrow, k, m),
                matmul_on(avx2, &x, n, &narrow, k, m),
                "bf16 {n}x{k}x{m}"
            );
        }
    }

    /// The portable tiles (what CPUs without AVX2 and FMA run) agree with the definition on
    /// every tile shape, for f32 and bf16 weights.
    #[test]
    fn portable_tiles_match_the_definition() {
        for (k, m) in [(1, 1), (7, 5), (8, 49), (37, 100), (300, 50)] {
            for n in [1, 2, 3, 4, 5, 7, 9] {
                let (x, w) = operands(n, k, m);
                assert_product(&x, &w, &portable::matmul(&x, n, &w, k, m), n, k, m);
                let narrow: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
                // The test weights are multiples of 1/16: exact in bf16.
                assert_product(&x, &w, &portable::matmul(&x, n, &narrow, k, m), n, k, m);
            }
        }
    }

    /// bf16 weights: the product of the widened weights, exactly as f32 weights holding the
    /// same (bf16-representable) values give it, with every instruction set of this CPU,
    /// one row at a time and in tiles.
    #[test]
    fn bf16_weights_multiply_as_their_f32_values() {
        let (n, k, m) = (5, 131, 50);
        let (x, w) = operands(n, k, m);
        let wide: Vec<f32> = w.iter().map(|v| v + 1e-3).collect();
        let narrow: Vec<half::bf16> = wide.iter().map(|&v| half::bf16::from_f32(v)).collect();
        let rounded: Vec<f32> = narrow.iter().map(|v| v.to_f32()).collect();
        assert_ne!(rounded, wide, "the test weights must round");
        for cpu in feature_sets() {
            for n in [1, n] {
                assert_eq!(
                    matmul_on(cpu, &x[..n * k], n, &narrow, k, m),
                    matmul_on(cpu, &x[..n * k], n, &rounded, k, m)
                );
            }
        }
    }

    /// The same output whatever the thread count and whatever the other rows of the batch:
    /// each output is one ordered sum, the same in every tile shape of four or more rows,
    /// and the same in every one-row-at-a-time product of fewer.
    #[test]
    fn each_output_is_the_same_sum_in_any_batch() {
        let (n, k, m) = (11, 70, 130);
        let x: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.7371).sin()).collect();
        let w: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.3119).cos()).collect();
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        for cpu in feature_sets() {
            let all = matmul_on(cpu, &x, n, &w, k, m).unwrap();
            assert_eq!(
                one.install(|| matmul_on(cpu, &x, n, &w, k, m)).unwrap(),
                all
            );
            let rows = |from: usize, count: usize| {
                matmul_on(cpu, &x[from * k..(from + count) * k], count, &w, k, m).unwrap()
            };
            // Tiles: rows 3..11 alone as within all eleven (other groups, pairs and
            // partial tiles), and rows 4..8 alone.
            assert_eq!(rows(3, 8)[..], all[3 * m..]);
            assert_eq!(rows(4, 4)[..], all[4 * m..8 * m]);
            // One weight row at a time: row 2 alone, and as the last of three.
            assert_eq!(rows(2, 1)[..], rows(0, 3)[2 * m..]);
        }
    }
}
