//! Exponentials of whole rows of log-values (a vocabulary's log-probabilities): the
//! log-sum-exp of a next-token distribution and the draw from it take one `exp` per
//! vocabulary entry per particle, 25 million per step at 512 particles over a 49,152-token
//! vocabulary. libm's scalar `exp` was 7% of such a step's samples (`perf`,
//! docs/benchmarks.md); this one runs four lanes at a time.
//!
//! # Maths
//! `eˣ = 2ᵏ · eʳ` with `k = round(x / ln 2)` and `r = x − k ln 2` (`ln 2` split in two parts
//! so that `k ln 2` is exact to 2⁻¹⁰⁶ for the `k` that occur), `|r| ≤ ln 2 / 2`, and `eʳ`
//! by its Taylor polynomial of degree 13 (truncation error below `0.35¹⁴ / 14! < 10⁻¹⁷`),
//! evaluated by Estrin's scheme (pairs of terms combined with `r²`, `r⁴`, `r⁸`: a chain of
//! eight operations instead of Horner's 26, which bounded the loop's speed).
//! Inputs outside `[-708, 709]` (where `2ᵏ` would leave the normal range), `-inf` and NaN
//! take libm's `exp`, so the result is within 1 ulp of libm's on 2 M points over
//! [−745, 710] (test `agrees_with_libm`, which allows 2 for other libms) and
//! `exp(-inf) = 0` exactly.
//!
//! # Determinism
//! The polynomial is evaluated with separate multiplies and adds in a fixed order (no
//! fused multiply-add, which a compiler may not introduce on its own), and sums use four
//! accumulators in a fixed order: the AVX2 build and the portable build give the same
//! bits, whatever CPU runs them.

/// Lanes of the loops (four f64 in an AVX2 register).
const LANES: usize = 4;
/// Below this, `2ᵏ` is subnormal: libm takes the value.
const LOW: f64 = -708.0;
/// Above this, `eˣ` overflows: libm takes the value.
const HIGH: f64 = 709.0;

/// `1.5 · 2⁵²`: adding it rounds to an integer held in the low mantissa bits.
const ROUND: f64 = 6_755_399_441_055_744.0;
const LOG2E: f64 = std::f64::consts::LOG2_E;
/// `ln 2` in two parts: the first with 32 significant bits, so `k · LN2_HI` is exact.
const LN2_HI: f64 = 0.693_147_180_369_123_8;
const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
/// `1 / n!` for `n = 2, 3, …, 13` (the terms of degree 0 and 1 are `1 + r`).
const C: [f64; 12] = [
    1.0 / 2.0,
    1.0 / 6.0,
    1.0 / 24.0,
    1.0 / 120.0,
    1.0 / 720.0,
    1.0 / 5_040.0,
    1.0 / 40_320.0,
    1.0 / 362_880.0,
    1.0 / 3_628_800.0,
    1.0 / 39_916_800.0,
    1.0 / 479_001_600.0,
    1.0 / 6_227_020_800.0,
];

/// `out[i] = exp(xs[i] − shift)`, `out` resized to `xs.len()`; returns `Σ out[i]`, summed
/// as [`sum_exp_shifted`] sums (the same value).
pub(crate) fn exp_shifted_into(xs: &[f64], shift: f64, out: &mut Vec<f64>) -> f64 {
    // Every entry is written below: a reused buffer of the right length is not cleared
    // first (a pass over 400 KB per draw at a 49,152-token vocabulary).
    if out.len() != xs.len() {
        out.clear();
        out.resize(xs.len(), 0.0);
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { exp_shifted_avx2(xs, shift, out) };
    }
    exp_shifted_body(xs, shift, out)
}

/// `Σ exp(xs[i] − shift)`, summed in four interleaved partial sums (entries `i ≡ j mod 4`
/// in sum `j`, in index order) added as `(s₀ + s₁) + (s₂ + s₃)`.
pub(crate) fn sum_exp_shifted(xs: &[f64], shift: f64) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { sum_exp_avx2(xs, shift) };
    }
    sum_exp_body(xs, shift)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn exp_shifted_avx2(xs: &[f64], shift: f64, out: &mut [f64]) -> f64 {
    use std::arch::x86_64::*;
    let mut xc = xs.chunks_exact(LANES);
    let mut oc = out.chunks_exact_mut(LANES);
    let s = _mm256_set1_pd(shift);
    let mut acc = _mm256_setzero_pd();
    for (x, o) in (&mut xc).zip(&mut oc) {
        // SAFETY: both chunks hold four f64.
        unsafe {
            let e = avx2::exp(_mm256_sub_pd(_mm256_loadu_pd(x.as_ptr()), s));
            _mm256_storeu_pd(o.as_mut_ptr(), e);
            acc = _mm256_add_pd(acc, e);
        }
    }
    let mut lanes = [0.0f64; LANES];
    // SAFETY: `lanes` holds four f64.
    unsafe { _mm256_storeu_pd(lanes.as_mut_ptr(), acc) };
    for ((a, x), o) in lanes
        .iter_mut()
        .zip(xc.remainder())
        .zip(oc.into_remainder())
    {
        *o = exp1(x - shift);
        *a += *o;
    }
    (lanes[0] + lanes[1]) + (lanes[2] + lanes[3])
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_exp_avx2(xs: &[f64], shift: f64) -> f64 {
    use std::arch::x86_64::*;
    let mut xc = xs.chunks_exact(LANES);
    let s = _mm256_set1_pd(shift);
    let mut acc = _mm256_setzero_pd();
    for x in &mut xc {
        // SAFETY: the chunk holds four f64.
        let v = unsafe { _mm256_sub_pd(_mm256_loadu_pd(x.as_ptr()), s) };
        acc = _mm256_add_pd(acc, avx2::exp(v));
    }
    let mut lanes = [0.0f64; LANES];
    // SAFETY: `lanes` holds four f64.
    unsafe { _mm256_storeu_pd(lanes.as_mut_ptr(), acc) };
    for (a, x) in lanes.iter_mut().zip(xc.remainder()) {
        *a += exp1(x - shift);
    }
    (lanes[0] + lanes[1]) + (lanes[2] + lanes[3])
}

/// [`exp4`]'s steps on one AVX2 register, operation for operation (the same bits).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{C, HIGH, LANES, LN2_HI, LN2_LO, LOG2E, LOW, ROUND};

    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) fn exp(x: __m256d) -> __m256d {
        let lo = _mm256_set1_pd(LOW);
        let hi = _mm256_set1_pd(HIGH);
        // Lanes outside [LOW, HIGH] or NaN: the ordered comparisons fail.
        let inside = _mm256_and_pd(
            _mm256_cmp_pd::<_CMP_GE_OQ>(x, lo),
            _mm256_cmp_pd::<_CMP_LE_OQ>(x, hi),
        );
        let v = _mm256_min_pd(_mm256_max_pd(x, lo), hi);
        let round = _mm256_set1_pd(ROUND);
        let t = _mm256_add_pd(_mm256_mul_pd(v, _mm256_set1_pd(LOG2E)), round);
        let k = _mm256_sub_pd(t, round);
        let r = _mm256_sub_pd(
            _mm256_sub_pd(v, _mm256_mul_pd(k, _mm256_set1_pd(LN2_HI))),
            _mm256_mul_pd(k, _mm256_set1_pd(LN2_LO)),
        );
        let (add, mul) = (_mm256_add_pd, _mm256_mul_pd);
        let c = |i: usize| _mm256_set1_pd(C[i]);
        let q = |i: usize| add(c(i), mul(c(i + 1), r));
        let r2 = mul(r, r);
        let r4 = mul(r2, r2);
        let r8 = mul(r4, r4);
        let s0 = add(r, mul(q(0), r2));
        let s1 = add(q(2), mul(q(4), r2));
        let s2 = add(q(6), mul(q(8), r2));
        let p = add(
            _mm256_set1_pd(1.0),
            add(add(s0, mul(s1, r4)), mul(add(s2, mul(q(10), r4)), r8)),
        );
        let bits = _mm256_slli_epi64::<52>(_mm256_add_epi64(
            _mm256_castpd_si256(t),
            _mm256_set1_epi64x(1023),
        ));
        let y = _mm256_mul_pd(p, _mm256_castsi256_pd(bits));
        if _mm256_movemask_pd(inside) == 0b1111 {
            return y;
        }
        let (mut xs, mut ys) = ([0.0f64; LANES], [0.0f64; LANES]);
        // SAFETY: both arrays hold four f64.
        unsafe {
            _mm256_storeu_pd(xs.as_mut_ptr(), x);
            _mm256_storeu_pd(ys.as_mut_ptr(), y);
        }
        for (y, x) in ys.iter_mut().zip(xs) {
            if !(LOW..=HIGH).contains(&x) {
                *y = x.exp();
            }
        }
        // SAFETY: `ys` holds four f64.
        unsafe { _mm256_loadu_pd(ys.as_ptr()) }
    }
}

fn exp_shifted_body(xs: &[f64], shift: f64, out: &mut [f64]) -> f64 {
    let mut acc = [0.0f64; LANES];
    let mut xc = xs.chunks_exact(LANES);
    let mut oc = out.chunks_exact_mut(LANES);
    for (x, o) in (&mut xc).zip(&mut oc) {
        let v = exp4([x[0] - shift, x[1] - shift, x[2] - shift, x[3] - shift]);
        o.copy_from_slice(&v);
        for (a, e) in acc.iter_mut().zip(v) {
            *a += e;
        }
    }
    for ((a, x), o) in acc.iter_mut().zip(xc.remainder()).zip(oc.into_remainder()) {
        *o = exp1(x - shift);
        *a += *o;
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3])
}

fn sum_exp_body(xs: &[f64], shift: f64) -> f64 {
    let mut acc = [0.0f64; LANES];
    let mut xc = xs.chunks_exact(LANES);
    for x in &mut xc {
        let v = exp4([x[0] - shift, x[1] - shift, x[2] - shift, x[3] - shift]);
        for (a, e) in acc.iter_mut().zip(v) {
            *a += e;
        }
    }
    for (a, x) in acc.iter_mut().zip(xc.remainder()) {
        *a += exp1(x - shift);
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3])
}

/// `exp` of one value, by the same steps as one lane of [`exp4`].
#[inline(always)]
fn exp1(x: f64) -> f64 {
    exp4([x, 0.0, 0.0, 0.0])[0]
}

/// `exp` of four values: the polynomial on every lane (straight-line code the compiler
/// vectorises), then libm for lanes outside `[LOW, HIGH]`.
#[inline(always)]
fn exp4(x: [f64; LANES]) -> [f64; LANES] {
    let mut out = [0.0f64; LANES];
    let mut outside = false;
    for l in 0..LANES {
        let v = x[l];
        outside |= !(LOW..=HIGH).contains(&v);
        let v = v.clamp(LOW, HIGH);
        let t = v * LOG2E + ROUND;
        let k = t - ROUND;
        let r = (v - k * LN2_HI) - k * LN2_LO;
        // Estrin's scheme: pairs, then powers r², r⁴, r⁸ (a short dependency chain).
        let q = |i: usize| C[i] + C[i + 1] * r;
        let r2 = r * r;
        let r4 = r2 * r2;
        let r8 = r4 * r4;
        let s0 = r + q(0) * r2;
        let s1 = q(2) + q(4) * r2;
        let s2 = q(6) + q(8) * r2;
        // The 1 added last, to the small terms' sum: one rounding of the result's size.
        let p = 1.0 + ((s0 + s1 * r4) + (s2 + q(10) * r4) * r8);
        // `t`'s low bits hold `k` (|k| < 1024): `k + 1023` shifted into the exponent field.
        let scale = f64::from_bits(t.to_bits().wrapping_add(1023) << 52);
        out[l] = p * scale;
    }
    if outside {
        for l in 0..LANES {
            if !(LOW..=HIGH).contains(&x[l]) {
                out[l] = x[l].exp();
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Units in the last place between two positive finite values.
    fn ulps(a: f64, b: f64) -> u64 {
        a.to_bits().abs_diff(b.to_bits())
    }

    /// Within 2 ulp of libm's `exp` over the whole range a log-probability takes (and past
    /// it), on a grid of 2,000,001 points and at the range's edges.
    #[test]
    fn agrees_with_libm() {
        let mut xs: Vec<f64> = (0..=2_000_000)
            .map(|i| -745.0 + 1455.0 * f64::from(i) / 2e6)
            .collect();
        xs.extend([
            0.0, -0.0, 1e-300, -1e-300, LOW, HIGH, -708.0001, 709.0001, -744.44, 709.78,
        ]);
        let mut got = Vec::new();
        exp_shifted_into(&xs, 0.0, &mut got);
        let mut worst = 0;
        for (&x, &g) in xs.iter().zip(&got) {
            let want = x.exp();
            let d = ulps(g, want);
            assert!(d <= 2, "exp({x:e}) = {g:e}, libm {want:e} ({d} ulp)");
            worst = worst.max(d);
        }
        eprintln!("largest difference: {worst} ulp");
    }

    /// `-inf` gives exactly 0, `+inf` gives `+inf`, NaN stays NaN; values past the range
    /// underflow and overflow as libm's do.
    #[test]
    fn special_values() {
        let xs = [f64::NEG_INFINITY, f64::INFINITY, f64::NAN, -800.0, 800.0];
        let mut got = Vec::new();
        exp_shifted_into(&xs, 0.0, &mut got);
        assert_eq!(got[0], 0.0);
        assert_eq!(got[1], f64::INFINITY);
        assert!(got[2].is_nan());
        assert_eq!(got[3], 0.0);
        assert_eq!(got[4], f64::INFINITY);
    }

    /// The AVX2 build, the portable build, the remainder path and the sum give the same
    /// bits; the sum is the four-accumulator sum of the values.
    #[test]
    fn every_build_and_path_agrees() {
        let xs: Vec<f64> = (0..1003)
            .map(|i| -30.0 * (f64::from(i) * 0.618_034).fract() - 0.25)
            .chain([f64::NEG_INFINITY, -900.0])
            .collect();
        let shift = -1.5;
        let mut fast = Vec::new();
        let fast_sum = exp_shifted_into(&xs, shift, &mut fast);
        let mut portable = vec![0.0; xs.len()];
        let portable_sum = exp_shifted_body(&xs, shift, &mut portable);
        assert_eq!(fast, portable);
        let one_by_one: Vec<f64> = xs.iter().map(|&x| exp1(x - shift)).collect();
        assert_eq!(fast, one_by_one);
        let mut acc = [0.0; LANES];
        for (i, v) in fast.iter().enumerate() {
            acc[i % LANES] += v;
        }
        let want = (acc[0] + acc[1]) + (acc[2] + acc[3]);
        assert_eq!(sum_exp_shifted(&xs, shift), want);
        assert_eq!(sum_exp_body(&xs, shift), want);
        assert_eq!(fast_sum, want);
        assert_eq!(portable_sum, want);
    }
}
