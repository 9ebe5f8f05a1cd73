//! Block dot products: a quantized weight row against an int8-quantized activation row, with
//! a portable scalar version and x86 versions chosen at run time (AVX2; AVX-VNNI or AVX-512
//! VNNI where present; with AVX-512 and VNNI, the two-by-four kernels on 512-bit registers,
//! `dot/x86/wide.rs`).
//!
//! Per block the integer products are summed exactly in i32 and scaled once:
//! `Q8`: `Σ_b d_w d_x Σ_i w_i x_i`; `Q4`: `Σ_b d_w d_x Σ_i q_i x_i + m_w · d_x Σ_i x_i`.
//! The AVX2 kernels use `maddubs` (u8 × i8 → pairs of i16) and `madd` (→ i32), llama.cpp's
//! approach: for `Q8`, the sign of each weight is moved onto the activation so that the
//! unsigned operand is `|w|`; 4-bit weights are unsigned already. No i16 pair can saturate:
//! `2 · 128 · 127 < 2^15`. With VNNI one `vpdpbusd` gives the same i32 sums (u8 × i8 in
//! groups of four, no intermediate i16), so the VNNI kernels are the AVX2 kernels with that
//! one instruction for two, and give the same bits.

use super::blocks::{BlockQ4, BlockQ8, BlockX};
use crate::lm::cpu::CpuFeatures;

/// A dot product of a weight row with an activation row (same number of blocks).
pub(crate) type DotQ8 = fn(&[BlockQ8], &[BlockX]) -> f32;
/// As [`DotQ8`] for 4-bit weights.
pub(crate) type DotQ4 = fn(&[BlockQ4], &[BlockX]) -> f32;
/// One weight row against four activation rows (each weight block loaded once).
pub(crate) type DotQ8x4 = fn(&[BlockQ8], [&[BlockX]; 4]) -> [f32; 4];
/// As [`DotQ8x4`] for 4-bit weights.
pub(crate) type DotQ4x4 = fn(&[BlockQ4], [&[BlockX]; 4]) -> [f32; 4];
/// Two weight rows against four activation rows: each weight block loaded once for four
/// activation rows and each activation block once for two weight rows (eight running sums
/// in registers). Each of the eight results is summed in the order of [`DotQ8x4`]. With
/// `ahead`, the weights that follow are prefetched (the caller asks for it on the first of
/// the groups of activation rows that meet these weight rows: the later groups find them
/// in cache, and a prefetch per block there only took load slots).
pub(crate) type DotQ8x2x4 = fn([&[BlockQ8]; 2], [&[BlockX]; 4], bool) -> [[f32; 4]; 2];
/// As [`DotQ8x2x4`] for 4-bit weights.
pub(crate) type DotQ4x2x4 = fn([&[BlockQ4]; 2], [&[BlockX]; 4], bool) -> [[f32; 4]; 2];

/// The kernels of one instruction set.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Kernels {
    /// Name for reports and tests (`scalar`, `avx2`, `avx-vnni`, `avx512-vnni`, `avx512`).
    pub(crate) name: &'static str,
    pub(crate) q8: DotQ8,
    pub(crate) q4: DotQ4,
    pub(crate) q8x4: DotQ8x4,
    pub(crate) q4x4: DotQ4x4,
    pub(crate) q8x2x4: DotQ8x2x4,
    pub(crate) q4x2x4: DotQ4x2x4,
}

pub(crate) const SCALAR: Kernels = Kernels {
    name: "scalar",
    q8: dot_q8_scalar,
    q4: dot_q4_scalar,
    q8x4: |w, x| x.map(|x| dot_q8_scalar(w, x)),
    q4x4: |w, x| x.map(|x| dot_q4_scalar(w, x)),
    q8x2x4: |w, x, _| w.map(|w| x.map(|x| dot_q8_scalar(w, x))),
    q4x2x4: |w, x, _| w.map(|w| x.map(|x| dot_q4_scalar(w, x))),
};

/// Every kernel set this CPU can run, the portable one first (whatever
/// [`crate::lm::cpu::KERNELS_ENV`] says: the tests run them all).
#[cfg(test)]
pub(crate) fn available() -> Vec<Kernels> {
    sets(CpuFeatures::detected())
}

/// The fastest kernel set in use on this CPU: the widest that [`CpuFeatures::in_use`]
/// allows (decided once, at the first call).
pub(crate) fn best() -> Kernels {
    static BEST: std::sync::OnceLock<Kernels> = std::sync::OnceLock::new();
    *BEST.get_or_init(|| in_use().pop().unwrap_or(SCALAR))
}

/// The kernel sets [`CpuFeatures::in_use`] allows, the portable one first.
pub(crate) fn in_use() -> Vec<Kernels> {
    sets(CpuFeatures::in_use())
}

/// The kernel sets of `cpu` (features this CPU has), the portable one first.
#[allow(unused_variables)]
fn sets(cpu: CpuFeatures) -> Vec<Kernels> {
    #[allow(unused_mut)]
    let mut v = vec![SCALAR];
    #[cfg(target_arch = "x86_64")]
    v.extend(x86::kernels(cpu));
    v
}

fn dot_q8_scalar(w: &[BlockQ8], x: &[BlockX]) -> f32 {
    let mut acc = 0f32;
    for (a, b) in w.iter().zip(x) {
        let s: i32 =
            a.qs.iter()
                .zip(&b.qs)
                .map(|(&p, &q)| i32::from(p) * i32::from(q))
                .sum();
        acc += a.d * b.d * s as f32;
    }
    acc
}

fn dot_q4_scalar(w: &[BlockQ4], x: &[BlockX]) -> f32 {
    let mut acc = 0f32;
    for (a, b) in w.iter().zip(x) {
        let mut s = 0i32;
        for (i, &byte) in a.qs.iter().enumerate() {
            s += i32::from(byte & 0x0F) * i32::from(b.qs[i]);
            s += i32::from(byte >> 4) * i32::from(b.qs[i + 16]);
        }
        acc += a.d * b.d * s as f32 + a.m * b.sum;
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::blocks::{BlockQ4, BlockQ8, BlockX};
    use super::Kernels;
    use crate::lm::cpu::CpuFeatures;

    mod wide;

    /// How far ahead of the block being multiplied the weights are prefetched. Rows are
    /// contiguous, so this runs a few rows ahead; at one activation row the loop waits on
    /// memory and the hardware prefetcher alone lags. Measured on SmolLM2-135M `q8_0`, one
    /// particle, 2-core AVX2 VM, three alternating runs: decode step 14.9–15.8 ms without,
    /// 11.4–14.2 ms at 2 KiB (two sets of runs), 11.7–12.9 at 4 KiB, 13.1–13.7 at 512 B.
    const PREFETCH_BYTES: usize = 2048;

    /// Ask for the weights `PREFETCH_BYTES` ahead of `p` (a hint: it never faults, so the
    /// address may lie past the end of the row or matrix).
    #[inline(always)]
    pub(super) fn prefetch<T>(p: *const T) {
        // SAFETY: prefetching reads nothing architecturally and cannot fault.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>().wrapping_add(PREFETCH_BYTES)) }
    }

    /// Horizontal sum of eight f32 lanes.
    ///
    /// # Safety
    /// The CPU has AVX (inlined into the kernels, which have it).
    #[inline(always)]
    pub(super) unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps::<1>(v);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Σ u_i · s_i over 32 bytes as eight i32 lanes (u unsigned, s signed): each lane the
    /// exact sum of four products, whichever instructions form it.
    pub(super) trait DotBytes {
        /// # Safety
        /// The CPU has the instructions of the implementation.
        unsafe fn dot(u: __m256i, s: __m256i) -> __m256i;
    }

    /// AVX2: `maddubs` (pairs, i16) then `madd` by ones (i32).
    pub(super) struct Madd;
    /// AVX-VNNI's `vpdpbusd` (VEX).
    pub(super) struct AvxVnni;
    /// AVX-512 VNNI's `vpdpbusd` on 256 bits (EVEX, with VL).
    pub(super) struct Avx512Vnni;

    impl DotBytes for Madd {
        #[inline(always)]
        unsafe fn dot(u: __m256i, s: __m256i) -> __m256i {
            _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
        }
    }

    impl DotBytes for AvxVnni {
        #[inline(always)]
        unsafe fn dot(u: __m256i, s: __m256i) -> __m256i {
            _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s)
        }
    }

    impl DotBytes for Avx512Vnni {
        #[inline(always)]
        unsafe fn dot(u: __m256i, s: __m256i) -> __m256i {
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
        }
    }

    /// One kernel set: the bodies below with the byte products of `$dot`, compiled with
    /// `$features` (the bodies are inlined into these wrappers, so every intrinsic is
    /// compiled for them).
    macro_rules! kernel_set {
        ($name:literal, $features:literal, $dot:ty) => {{
            #[target_feature(enable = $features)]
            unsafe fn q8(w: &[BlockQ8], x: &[BlockX]) -> f32 {
                unsafe { dot_q8::<$dot>(w, x) }
            }
            #[target_feature(enable = $features)]
            unsafe fn q4(w: &[BlockQ4], x: &[BlockX]) -> f32 {
                unsafe { dot_q4::<$dot>(w, x) }
            }
            #[target_feature(enable = $features)]
            unsafe fn q8x4(w: &[BlockQ8], x: [&[BlockX]; 4]) -> [f32; 4] {
                unsafe { dot_q8x4::<$dot>(w, x) }
            }
            #[target_feature(enable = $features)]
            unsafe fn q4x4(w: &[BlockQ4], x: [&[BlockX]; 4]) -> [f32; 4] {
                unsafe { dot_q4x4::<$dot>(w, x) }
            }
            #[target_feature(enable = $features)]
            unsafe fn q8x2x4(w: [&[BlockQ8]; 2], x: [&[BlockX]; 4], ahead: bool) -> [[f32; 4]; 2] {
                unsafe { dot_q8x2x4::<$dot>(w, x, ahead) }
            }
            #[target_feature(enable = $features)]
            unsafe fn q4x2x4(w: [&[BlockQ4]; 2], x: [&[BlockX]; 4], ahead: bool) -> [[f32; 4]; 2] {
                unsafe { dot_q4x2x4::<$dot>(w, x, ahead) }
            }
            // SAFETY (all six): these functions are reachable only through the `Kernels`
            // built here, which `kernels()` builds only after detecting `$features`.
            Kernels {
                name: $name,
                q8: |w, x| unsafe { q8(w, x) },
                q4: |w, x| unsafe { q4(w, x) },
                q8x4: |w, x| unsafe { q8x4(w, x) },
                q4x4: |w, x| unsafe { q4x4(w, x) },
                q8x2x4: |w, x, ahead| unsafe { q8x2x4(w, x, ahead) },
                q4x2x4: |w, x, ahead| unsafe { q4x2x4(w, x, ahead) },
            }
        }};
    }

    /// The kernel sets `cpu` allows, narrowest first: AVX2, the 256-bit VNNI sets, then the
    /// 512-bit one (`cpu` says which instruction families may be used; which encodings of
    /// VNNI exist is asked of the CPU here).
    pub(super) fn kernels(cpu: CpuFeatures) -> Vec<Kernels> {
        use std::arch::is_x86_feature_detected as has;
        let mut v = Vec::new();
        // (`CpuFeatures` sets `avx2` only where AVX2 and FMA were detected.)
        if !cpu.avx2 {
            return v;
        }
        v.push(kernel_set!("avx2", "avx2,fma", Madd));
        if !cpu.vnni {
            return v;
        }
        // Both VNNI forms where both exist (the same instruction, VEX or EVEX encoded), so
        // that the tests run both; the last is used.
        let evex = has!("avx512f") && has!("avx512vl") && has!("avx512vnni");
        if evex {
            v.push(kernel_set!(
                "avx512-vnni",
                "avx2,fma,avx512f,avx512vl,avx512vnni",
                Avx512Vnni
            ));
        }
        if has!("avxvnni") {
            v.push(kernel_set!("avx-vnni", "avx2,fma,avxvnni", AvxVnni));
        }
        // The two-by-four kernels on 512-bit registers (the others as AVX-512 VNNI's);
        // `cpu.avx512` stands for AVX-512 F, DQ, BW and VL.
        if cpu.avx512 && evex {
            let mut k = kernel_set!("avx512", "avx2,fma,avx512f,avx512vl,avx512vnni", Avx512Vnni);
            // SAFETY: the features of `wide::q8x2x4` were detected (`cpu`, `evex`).
            k.q8x2x4 = |w, x, ahead| unsafe { wide::q8x2x4(w, x, ahead) };
            k.q4x2x4 = |w, x, ahead| unsafe { wide::q4x2x4(w, x, ahead) };
            v.push(k);
        }
        v
    }

    /// [`hsum`] of each of four registers.
    #[inline(always)]
    unsafe fn sums4(acc: &[__m256; 4]) -> [f32; 4] {
        let mut out = [0f32; 4];
        for (o, &a) in out.iter_mut().zip(acc) {
            *o = unsafe { hsum(a) };
        }
        out
    }

    /// [`sums4`] of two rows of registers.
    #[inline(always)]
    unsafe fn sums2x4(acc: &[[__m256; 4]; 2]) -> [[f32; 4]; 2] {
        unsafe { [sums4(&acc[0]), sums4(&acc[1])] }
    }

    #[inline(always)]
    unsafe fn dot_q8x2x4<D: DotBytes>(
        w: [&[BlockQ8]; 2],
        x: [&[BlockX]; 4],
        ahead: bool,
    ) -> [[f32; 4]; 2] {
        let mut acc = [[_mm256_setzero_ps(); 4]; 2];
        for (b, (a0, a1)) in w[0].iter().zip(w[1]).enumerate() {
            // (A branch the same way for the whole row: predicted.)
            if ahead {
                prefetch(a0);
                prefetch(a1);
            }
            // SAFETY: `qs` are 32 bytes; unaligned loads.
            let (w0, w1) = unsafe {
                (
                    _mm256_loadu_si256(a0.qs.as_ptr().cast()),
                    _mm256_loadu_si256(a1.qs.as_ptr().cast()),
                )
            };
            let (u0, u1) = (_mm256_sign_epi8(w0, w0), _mm256_sign_epi8(w1, w1));
            for r in 0..4 {
                let xb = &x[r][b];
                // SAFETY: as above.
                let xv = unsafe { _mm256_loadu_si256(xb.qs.as_ptr().cast()) };
                let s0 = D::dot(u0, _mm256_sign_epi8(xv, w0));
                let s1 = D::dot(u1, _mm256_sign_epi8(xv, w1));
                let (c0, c1) = (_mm256_set1_ps(a0.d * xb.d), _mm256_set1_ps(a1.d * xb.d));
                acc[0][r] = _mm256_fmadd_ps(c0, _mm256_cvtepi32_ps(s0), acc[0][r]);
                acc[1][r] = _mm256_fmadd_ps(c1, _mm256_cvtepi32_ps(s1), acc[1][r]);
            }
        }
        sums2x4(&acc)
    }

    #[inline(always)]
    unsafe fn dot_q4x2x4<D: DotBytes>(
        w: [&[BlockQ4]; 2],
        x: [&[BlockX]; 4],
        ahead: bool,
    ) -> [[f32; 4]; 2] {
        let mut acc = [[_mm256_setzero_ps(); 4]; 2];
        let mut mins = [[0f32; 4]; 2];
        let low = _mm256_set1_epi8(0x0F);
        let nibbles = |packed: __m128i| {
            _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(packed), packed), low)
        };
        for (b, (a0, a1)) in w[0].iter().zip(w[1]).enumerate() {
            // (A branch the same way for the whole row: predicted.)
            if ahead {
                prefetch(a0);
                prefetch(a1);
            }
            // SAFETY: `qs` are 16 bytes; unaligned loads.
            let (q0, q1) = unsafe {
                (
                    nibbles(_mm_loadu_si128(a0.qs.as_ptr().cast())),
                    nibbles(_mm_loadu_si128(a1.qs.as_ptr().cast())),
                )
            };
            for r in 0..4 {
                let xb = &x[r][b];
                // SAFETY: `qs` are 32 bytes; unaligned load.
                let xv = unsafe { _mm256_loadu_si256(xb.qs.as_ptr().cast()) };
                let (s0, s1) = (D::dot(q0, xv), D::dot(q1, xv));
                let (c0, c1) = (_mm256_set1_ps(a0.d * xb.d), _mm256_set1_ps(a1.d * xb.d));
                acc[0][r] = _mm256_fmadd_ps(c0, _mm256_cvtepi32_ps(s0), acc[0][r]);
                acc[1][r] = _mm256_fmadd_ps(c1, _mm256_cvtepi32_ps(s1), acc[1][r]);
                mins[0][r] += a0.m * xb.sum;
                mins[1][r] += a1.m * xb.sum;
            }
        }
        let mut out = sums2x4(&acc);
        for (o, m) in out.iter_mut().zip(&mins) {
            for r in 0..4 {
                o[r] += m[r];
            }
        }
        out
    }

    #[inline(always)]
    unsafe fn dot_q8x4<D: DotBytes>(w: &[BlockQ8], x: [&[BlockX]; 4]) -> [f32; 4] {
        let mut acc = [_mm256_setzero_ps(); 4];
        for (b, a) in w.iter().enumerate() {
            prefetch(a);
            // SAFETY: `qs` are 32 bytes; unaligned loads.
            let wv = unsafe { _mm256_loadu_si256(a.qs.as_ptr().cast()) };
            let aw = _mm256_sign_epi8(wv, wv);
            for r in 0..4 {
                let xb = &x[r][b];
                // SAFETY: as above.
                let xv = unsafe { _mm256_loadu_si256(xb.qs.as_ptr().cast()) };
                let sum = D::dot(aw, _mm256_sign_epi8(xv, wv));
                let scale = _mm256_set1_ps(a.d * xb.d);
                acc[r] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sum), acc[r]);
            }
        }
        sums4(&acc)
    }

    #[inline(always)]
    unsafe fn dot_q4x4<D: DotBytes>(w: &[BlockQ4], x: [&[BlockX]; 4]) -> [f32; 4] {
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut mins = [0f32; 4];
        let low = _mm256_set1_epi8(0x0F);
        for (b, a) in w.iter().enumerate() {
            prefetch(a);
            // SAFETY: `qs` are 16 bytes; unaligned load.
            let packed = unsafe { _mm_loadu_si128(a.qs.as_ptr().cast()) };
            let q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(packed), packed), low);
            for r in 0..4 {
                let xb = &x[r][b];
                // SAFETY: `qs` are 32 bytes; unaligned load.
                let xv = unsafe { _mm256_loadu_si256(xb.qs.as_ptr().cast()) };
                let sum = D::dot(q, xv);
                let scale = _mm256_set1_ps(a.d * xb.d);
                acc[r] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sum), acc[r]);
                mins[r] += a.m * xb.sum;
            }
        }
        let mut out = sums4(&acc);
        for r in 0..4 {
            out[r] += mins[r];
        }
        out
    }

    #[inline(always)]
    unsafe fn dot_q8<D: DotBytes>(w: &[BlockQ8], x: &[BlockX]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (a, b) in w.iter().zip(x) {
            prefetch(a);
            // SAFETY: `qs` are 32 bytes; unaligned loads.
            let (wv, xv) = unsafe {
                (
                    _mm256_loadu_si256(a.qs.as_ptr().cast()),
                    _mm256_loadu_si256(b.qs.as_ptr().cast()),
                )
            };
            let sum = D::dot(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
            let scale = _mm256_set1_ps(a.d * b.d);
            acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sum), acc);
        }
        hsum(acc)
    }

    #[inline(always)]
    unsafe fn dot_q4<D: DotBytes>(w: &[BlockQ4], x: &[BlockX]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut mins = 0f32;
        let low = _mm256_set1_epi8(0x0F);
        for (a, b) in w.iter().zip(x) {
            prefetch(a);
            // SAFETY: `qs` are 16 and 32 bytes; unaligned loads.
            let (packed, xv) = unsafe {
                (
                    _mm_loadu_si128(a.qs.as_ptr().cast()),
                    _mm256_loadu_si256(b.qs.as_ptr().cast()),
                )
            };
            // Low nibbles are elements 0..16, high nibbles 16..32.
            let both = _mm256_set_m128i(_mm_srli_epi16::<4>(packed), packed);
            let q = _mm256_and_si256(both, low);
            let sum = D::dot(q, xv);
            let scale = _mm256_set1_ps(a.d * b.d);
            acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sum), acc);
            mins += a.m * b.sum;
        }
        hsum(acc) + mins
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_pcg::Pcg64;

    use super::*;
    use crate::lm::quant::blocks::BLOCK;

    /// Seed of the random blocks.
    const SEED: u64 = 0x51_0C;

    /// Every kernel set gives the scalar result, on random blocks including the extreme
    /// values (−128 weights from files, ±127 activations). Integer sums are exact, so the
    /// only difference is the order of the f32 block accumulation.
    #[test]
    fn kernels_agree_with_the_scalar_kernels() {
        let mut rng = Pcg64::seed_from_u64(SEED);
        for blocks in [1, 3, 18, 48] {
            let w8: Vec<BlockQ8> = (0..blocks)
                .map(|_| BlockQ8 {
                    d: rng.random_range(0.001..0.1),
                    qs: std::array::from_fn(|_| rng.random_range(-128..=127)),
                })
                .collect();
            let w4: Vec<BlockQ4> = (0..blocks)
                .map(|_| BlockQ4 {
                    d: rng.random_range(0.001..0.1),
                    m: rng.random_range(-0.5..0.5),
                    qs: std::array::from_fn(|_| rng.random()),
                })
                .collect();
            let x: Vec<BlockX> = (0..blocks)
                .map(|_| {
                    let v: Vec<f32> = (0..BLOCK).map(|_| rng.random_range(-3.0..3.0)).collect();
                    BlockX::quantize(&v)
                })
                .collect();
            let (r8, r4) = ((SCALAR.q8)(&w8, &x), (SCALAR.q4)(&w4, &x));
            let tol = |r: f32| 1e-5 * (1.0 + r.abs()) * blocks as f32;
            for k in available() {
                let (a8, a4) = ((k.q8)(&w8, &x), (k.q4)(&w4, &x));
                assert!((a8 - r8).abs() <= tol(r8), "{} q8: {a8} vs {r8}", k.name);
                assert!((a4 - r4).abs() <= tol(r4), "{} q4: {a4} vs {r4}", k.name);
                // The four-row kernels: the same row four times, and the row among others.
                let other: Vec<BlockX> = x.iter().rev().copied().collect();
                let rows = [&x[..], &other[..], &x[..], &other[..]];
                let (b8, b4) = ((k.q8x4)(&w8, rows), (k.q4x4)(&w4, rows));
                for r in [0, 2] {
                    assert!(
                        (b8[r] - r8).abs() <= tol(r8),
                        "{} q8x4: {} vs {r8}",
                        k.name,
                        b8[r]
                    );
                    assert!(
                        (b4[r] - r4).abs() <= tol(r4),
                        "{} q4x4: {} vs {r4}",
                        k.name,
                        b4[r]
                    );
                }
                let (o8, o4) = ((SCALAR.q8)(&w8, &other), (SCALAR.q4)(&w4, &other));
                assert!((b8[1] - o8).abs() <= tol(o8) && (b4[3] - o4).abs() <= tol(o4));
                // The two-by-four kernels: each weight row gives what the four-row kernel
                // gives for it, bit for bit (the same sums in the same order).
                let w8r: Vec<BlockQ8> = w8.iter().rev().copied().collect();
                let w4r: Vec<BlockQ4> = w4.iter().rev().copied().collect();
                // With and without prefetching the weights that follow.
                for ahead in [true, false] {
                    let t8 = (k.q8x2x4)([&w8, &w8r], rows, ahead);
                    let t4 = (k.q4x2x4)([&w4, &w4r], rows, ahead);
                    assert_eq!(t8, [b8, (k.q8x4)(&w8r, rows)], "{} q8x2x4", k.name);
                    assert_eq!(t4, [b4, (k.q4x4)(&w4r, rows)], "{} q4x2x4", k.name);
                }
                // The VNNI sets form the same i32 sums with other instructions: the AVX2
                // set's bits in every kernel.
                let avx2 = available().into_iter().find(|k| k.name == "avx2");
                if let Some(a) = avx2.filter(|_| k.name != "scalar") {
                    assert_eq!((k.q8)(&w8, &x), (a.q8)(&w8, &x), "{} q8", k.name);
                    assert_eq!((k.q4)(&w4, &x), (a.q4)(&w4, &x), "{} q4", k.name);
                    assert_eq!((k.q8x4)(&w8, rows), (a.q8x4)(&w8, rows), "{}", k.name);
                    assert_eq!((k.q4x4)(&w4, rows), (a.q4x4)(&w4, rows), "{}", k.name);
                    let (t8, t4) = (
                        (k.q8x2x4)([&w8, &w8r], rows, true),
                        (k.q4x2x4)([&w4, &w4r], rows, true),
                    );
                    assert_eq!(t8, (a.q8x2x4)([&w8, &w8r], rows, false), "{}", k.name);
                    assert_eq!(t4, (a.q4x2x4)([&w4, &w4r], rows, false), "{}", k.name);
                }
            }
        }
        let names: Vec<&str> = available().iter().map(|k| k.name).collect();
        eprintln!("kernel sets tested on this CPU: {names:?}");
    }
}
