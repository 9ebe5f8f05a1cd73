//! `eˣ` on lanes of eight f32, for the model's CPU loops that take one exponential per
//! element: the attention softmax (one per query head and visible position) and the
//! SiLU of the feed-forward layers. libm's scalar `expf` was 2% of an SMC step's samples at
//! 64 particles (`perf`); this runs eight lanes at a time.
//!
//! The portable form ([`exp8`], arrays the compiler vectorises for any target) and the AVX2
//! form (`x86::exp8`, intrinsics) perform the same IEEE operations in the same order (no
//! fused multiply-add), so they give the same bits on every CPU (test
//! `exp8_is_accurate`).

/// Constants of [`exp8`]: `ln 2` in two parts (`k · LN2_HI` is exact for the `k` that
/// occur), `log₂ e`, and the range where `eˣ` is a normal float.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const LOG2_E: f32 = std::f32::consts::LOG2_E;
const EXP_MIN: f32 = -87.0;
const EXP_MAX: f32 = 88.0;

/// `eˣ` on eight lanes: `2ᵏ · eʳ` with `k = round(x · log₂ e)` (ties to even),
/// `r = (x − k·LN2_HI) − k·LN2_LO` (`|r| ≤ 0.35`) and `eʳ` by its Taylor polynomial of
/// degree 7 (truncation below `0.35⁸ / 8! < 1.3·10⁻⁸`, a tenth of an f32 ulp), in Horner's
/// form with separate multiplies and adds. Below `EXP_MIN` it is 0 (`e⁻⁸⁷ < 2⁻¹²⁵`, far
/// below anything it is added to here); above `EXP_MAX` infinity (the true value there is
/// within a factor of two of the largest f32, and the uses here only need it huge); NaN
/// stays NaN. Within 2 ulp of the exact value in between (test `exp8_is_accurate`).
#[inline(always)]
pub(crate) fn exp8(x: [f32; 8]) -> [f32; 8] {
    let mut out = [0f32; 8];
    for (o, &x) in out.iter_mut().zip(&x) {
        let k = (x * LOG2_E).round_ties_even();
        let r = (x - k * LN2_HI) - k * LN2_LO;
        let p = poly(r);
        let scale = f32::from_bits(((k as i32).wrapping_add(127) as u32).wrapping_shl(23));
        *o = if x.is_nan() {
            x
        } else if x < EXP_MIN {
            0.0
        } else if x > EXP_MAX {
            f32::INFINITY
        } else {
            p * scale
        };
    }
    out
}

/// Taylor coefficients of `eʳ`, highest degree first (`1/7!` … `1/1!`, `1`).
const EXP_POLY: [f32; 8] = [
    1.0 / 5040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

/// `eʳ` by [`EXP_POLY`] in Horner's form, multiply then add.
#[inline(always)]
fn poly(r: f32) -> f32 {
    let mut p = EXP_POLY[0];
    for &c in &EXP_POLY[1..] {
        p = p * r + c;
    }
    p
}

/// One lane of [`exp8`].
#[inline(always)]
pub(crate) fn exp1(x: f32) -> f32 {
    exp8([x; 8])[0]
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::{EXP_MAX, EXP_MIN, EXP_POLY, LN2_HI, LN2_LO, LOG2_E};

    /// [`super::exp8`] on a register, the same operations in the same order.
    ///
    /// # Safety
    /// AVX2 must be enabled.
    #[inline(always)]
    pub(crate) unsafe fn exp8(x: __m256) -> __m256 {
        let k = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(LOG2_E)),
        );
        let r = _mm256_sub_ps(
            _mm256_sub_ps(x, _mm256_mul_ps(k, _mm256_set1_ps(LN2_HI))),
            _mm256_mul_ps(k, _mm256_set1_ps(LN2_LO)),
        );
        let mut p = _mm256_set1_ps(EXP_POLY[0]);
        for &c in &EXP_POLY[1..] {
            p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(c));
        }
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(k),
            _mm256_set1_epi32(127),
        ));
        let e = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
        let low = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(EXP_MIN));
        let high = _mm256_cmp_ps::<_CMP_GT_OQ>(x, _mm256_set1_ps(EXP_MAX));
        let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x);
        let e = _mm256_andnot_ps(low, e);
        let e = _mm256_blendv_ps(e, _mm256_set1_ps(f32::INFINITY), high);
        _mm256_blendv_ps(e, x, nan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`exp8`] is within 2 ulp of `eˣ` (computed in f64 and rounded) over its whole
    /// range; its special values; the AVX2 build gives the portable bits.
    #[test]
    fn exp8_is_accurate() {
        const POINTS: u32 = 1_000_000;
        let mut worst = 0;
        let mut xs = Vec::new();
        for i in 0..=POINTS {
            let x = EXP_MIN + (EXP_MAX - EXP_MIN) * (i as f32 / POINTS as f32);
            let want = (x as f64).exp() as f32;
            let got = exp1(x);
            worst = worst.max(got.to_bits().abs_diff(want.to_bits()));
            xs.push(x);
        }
        assert!(worst <= 2, "{worst} ulp");
        assert_eq!(exp1(0.0), 1.0);
        assert_eq!(exp1(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp1(-100.0), 0.0);
        assert_eq!(exp1(100.0), f32::INFINITY);
        assert!(exp1(f32::NAN).is_nan());
        xs.extend([
            f32::NEG_INFINITY,
            -100.0,
            100.0,
            f32::NAN,
            0.0,
            -0.0,
            88.5,
            -87.5,
        ]);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            #[target_feature(enable = "avx2")]
            fn avx2(x: [f32; 8]) -> [f32; 8] {
                let mut out = [0f32; 8];
                // SAFETY: AVX2 is enabled here; both arrays hold eight floats.
                unsafe {
                    let e = x86::exp8(std::arch::x86_64::_mm256_loadu_ps(x.as_ptr()));
                    std::arch::x86_64::_mm256_storeu_ps(out.as_mut_ptr(), e);
                }
                out
            }
            let bits = |v: [f32; 8]| v.map(f32::to_bits);
            for c in xs.chunks_exact(8) {
                let x: [f32; 8] = std::array::from_fn(|i| c[i]);
                // SAFETY: the CPU has AVX2 (checked just above).
                assert_eq!(bits(exp8(x)), bits(unsafe { avx2(x) }), "{x:?}");
            }
        }
    }
}
