//! The two-by-four int8 kernels on 512-bit registers (AVX-512 BW, DQ, VL and VNNI), with
//! the AVX2 kernels' sums bit for bit.
//!
//! Each register holds one block of two activation rows (lanes 0–7 the first row's 32
//! bytes as eight groups of four, lanes 8–15 the second's), and each weight block is
//! broadcast to both halves: one `vpdpbusd` forms the two rows' eight i32 group sums that
//! the AVX2 kernel forms with two instructions per row. AVX-512 has no `vpsignb`, so the
//! weight's sign moves onto the activation by a masked negation (`w < 0`); where `w = 0` the
//! unsigned operand `|w|` is 0 and the product vanishes as with `vpsignb`'s zero. The block
//! scales `d_w · d_x` are the same f32 products, the same multiply-adds follow in the same
//! block order, and each half is summed across its lanes as the AVX2 kernel sums its
//! register.

use std::arch::x86_64::*;

use super::super::super::blocks::{BlockQ4, BlockQ8, BlockX};
use super::{hsum, prefetch};

/// The two activation rows `x[0]`, `x[1]` of block `b` in one register, and their scales
/// in the matching halves.
#[inline(always)]
unsafe fn pair(x0: &BlockX, x1: &BlockX) -> (__m512i, __m512) {
    // SAFETY (caller: AVX-512 F and DQ): `qs` are 32 bytes; unaligned loads.
    unsafe {
        let lo = _mm256_loadu_si256(x0.qs.as_ptr().cast());
        let hi = _mm256_loadu_si256(x1.qs.as_ptr().cast());
        let v = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
        let d = _mm512_insertf32x8::<1>(_mm512_set1_ps(x0.d), _mm256_set1_ps(x1.d));
        (v, d)
    }
}

/// The sums of each half of `acc[a][q]` (pair `q` is rows `2q`, `2q + 1`).
#[inline(always)]
unsafe fn sums(acc: &[[__m512; 2]; 2]) -> [[f32; 4]; 2] {
    let mut out = [[0f32; 4]; 2];
    for (o, row) in out.iter_mut().zip(acc) {
        for (q, &v) in row.iter().enumerate() {
            // SAFETY (caller: AVX-512 F and DQ).
            unsafe {
                o[2 * q] = hsum(_mm512_castps512_ps256(v));
                o[2 * q + 1] = hsum(_mm512_extractf32x8_ps::<1>(v));
            }
        }
    }
    out
}

/// `Q8` weights: two weight rows against four activation rows (as `DotQ8x2x4`).
///
/// # Safety
/// The CPU has AVX-512 F, BW, DQ, VL and VNNI (with AVX2 and FMA).
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
pub(super) unsafe fn q8x2x4(w: [&[BlockQ8]; 2], x: [&[BlockX]; 4], ahead: bool) -> [[f32; 4]; 2] {
    let mut acc = [[_mm512_setzero_ps(); 2]; 2];
    let zero = _mm512_setzero_si512();
    for (b, (a0, a1)) in w[0].iter().zip(w[1]).enumerate() {
        // (A branch the same way for the whole row: predicted.)
        if ahead {
            prefetch(a0);
            prefetch(a1);
        }
        // SAFETY: `qs` are 32 bytes; unaligned loads.
        let ws = unsafe {
            [
                _mm512_broadcast_i64x4(_mm256_loadu_si256(a0.qs.as_ptr().cast())),
                _mm512_broadcast_i64x4(_mm256_loadu_si256(a1.qs.as_ptr().cast())),
            ]
        };
        let (u, neg) = (
            ws.map(|v| _mm512_abs_epi8(v)),
            ws.map(|v| _mm512_movepi8_mask(v)),
        );
        let dw = [_mm512_set1_ps(a0.d), _mm512_set1_ps(a1.d)];
        for q in 0..2 {
            // SAFETY: AVX-512 F and DQ (this function's features).
            let (xv, dx) = unsafe { pair(&x[2 * q][b], &x[2 * q + 1][b]) };
            for a in 0..2 {
                let s = _mm512_mask_sub_epi8(xv, neg[a], zero, xv);
                let sum = _mm512_dpbusd_epi32(zero, u[a], s);
                let scale = _mm512_mul_ps(dw[a], dx);
                acc[a][q] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(sum), acc[a][q]);
            }
        }
    }
    // SAFETY: AVX-512 F and DQ.
    unsafe { sums(&acc) }
}

/// 4-bit weights: two weight rows against four activation rows (as `DotQ4x2x4`).
///
/// # Safety
/// As [`q8x2x4`].
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
pub(super) unsafe fn q4x2x4(w: [&[BlockQ4]; 2], x: [&[BlockX]; 4], ahead: bool) -> [[f32; 4]; 2] {
    let mut acc = [[_mm512_setzero_ps(); 2]; 2];
    let mut mins = [[0f32; 4]; 2];
    let zero = _mm512_setzero_si512();
    let low = _mm256_set1_epi8(0x0F);
    // Low nibbles are elements 0..16, high nibbles 16..32; both halves of the register.
    let nibbles = |packed: __m128i| {
        _mm512_broadcast_i64x4(_mm256_and_si256(
            _mm256_set_m128i(_mm_srli_epi16::<4>(packed), packed),
            low,
        ))
    };
    for (b, (a0, a1)) in w[0].iter().zip(w[1]).enumerate() {
        // (A branch the same way for the whole row: predicted.)
        if ahead {
            prefetch(a0);
            prefetch(a1);
        }
        // SAFETY: `qs` are 16 bytes; unaligned loads.
        let qs = unsafe {
            [
                nibbles(_mm_loadu_si128(a0.qs.as_ptr().cast())),
                nibbles(_mm_loadu_si128(a1.qs.as_ptr().cast())),
            ]
        };
        let dw = [_mm512_set1_ps(a0.d), _mm512_set1_ps(a1.d)];
        for q in 0..2 {
            // SAFETY: AVX-512 F and DQ (this function's features).
            let (xv, dx) = unsafe { pair(&x[2 * q][b], &x[2 * q + 1][b]) };
            for a in 0..2 {
                let sum = _mm512_dpbusd_epi32(zero, qs[a], xv);
                let scale = _mm512_mul_ps(dw[a], dx);
                acc[a][q] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(sum), acc[a][q]);
            }
        }
        // The AVX2 kernel's order: for each activation row, both weight rows.
        for r in 0..4 {
            mins[0][r] += a0.m * x[r][b].sum;
            mins[1][r] += a1.m * x[r][b].sum;
        }
    }
    // SAFETY: AVX-512 F and DQ.
    let mut out = unsafe { sums(&acc) };
    for (o, m) in out.iter_mut().zip(&mins) {
        for r in 0..4 {
            o[r] += m[r];
        }
    }
    out
}
