//! The gated activation of the feed-forward layers, `act(gate) ⊙ up`.
//!
//! SiLU on host f32 rows is one pass over the outputs with the vectorised exponential of
//! `exp32` (`g / (e⁻ᵍ + 1) · u`, the formula of candle's `silu`, then the product); candle
//! took one libm `expf` per element and a second pass (and buffer) for the product, 2–3%
//! of an SMC step's samples at 64 particles. Every other case uses candle's operations.

use candle_core::{DType, Storage, Tensor};
use rayon::prelude::*;

use crate::lm::exp32;
use crate::lm::family::Activation;

/// Output rows per parallel task (a few thousand elements each for real widths).
const ROWS_PER_TASK: usize = 4;

/// `act(g) · u` elementwise, for `g, u` of one shape.
pub(super) fn gated(act: Activation, g: &Tensor, u: &Tensor) -> candle_core::Result<Tensor> {
    if act == Activation::Silu {
        if let Some(y) = silu_mul_host(g, u)? {
            return Ok(y);
        }
    }
    let a = match act {
        Activation::Silu => g.silu()?,
        // candle's `gelu` is the tanh approximation (`gelu_pytorch_tanh`).
        Activation::GeluTanh => g.gelu()?,
    };
    a * u
}

/// [`gated`] with SiLU for two host f32 `[n, width]` tensors whose rows are contiguous
/// (the halves of the fused gate/up product are such views); `None` otherwise.
fn silu_mul_host(g: &Tensor, u: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let (&[n, width], true) = (g.dims(), g.dims() == u.dims()) else {
        return Ok(None);
    };
    // (Empty tensors go to candle: the row chunks below need a width.)
    if !g.device().is_cpu() || g.dtype() != DType::F32 || u.dtype() != DType::F32 || n * width == 0
    {
        return Ok(None);
    }
    // The gate copied into the output first, then the output updated in place beside the
    // up rows: one tensor's storage borrowed at a time (both halves may share one).
    let mut out = Vec::with_capacity(n * width);
    let copied = with_rows(g, width, |rows, stride| {
        for r in 0..n {
            out.extend_from_slice(&rows[r * stride..r * stride + width]);
        }
    })?;
    if copied.is_none() {
        return Ok(None);
    }
    let done = with_rows(u, width, |rows, stride| {
        out.par_chunks_mut(width * ROWS_PER_TASK)
            .enumerate()
            .for_each(|(t, chunk)| {
                for (i, o) in chunk.chunks_exact_mut(width).enumerate() {
                    let r = t * ROWS_PER_TASK + i;
                    silu_mul(o, &rows[r * stride..r * stride + width]);
                }
            });
    })?;
    match done {
        Some(()) => Ok(Some(Tensor::from_vec(out, (n, width), g.device())?)),
        None => Ok(None),
    }
}

/// `f(data, stride)` with a host f32 `[n, width]` tensor's rows, row `r` at
/// `data[r · stride..r · stride + width]`; `None` (without calling `f`) unless the tensor
/// is such, with contiguous rows inside its storage.
fn with_rows<R>(
    t: &Tensor,
    width: usize,
    f: impl FnOnce(&[f32], usize) -> R,
) -> candle_core::Result<Option<R>> {
    let n = t.dims().first().copied().unwrap_or(0);
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Ok(None);
    };
    let data = cpu.as_slice::<f32>()?;
    let (stride, start) = (layout.stride(), layout.start_offset());
    let &[row_stride, 1] = stride else {
        return Ok(None);
    };
    let end = match n {
        0 => start,
        _ => start + (n - 1) * row_stride + width,
    };
    if end > data.len() {
        return Ok(None);
    }
    Ok(Some(f(&data[start..end], row_stride)))
}

/// `o[i] = o[i] / (e^{−o[i]} + 1) · u[i]` (`o` holds the gate), with AVX2 where the CPU has
/// it: the same operations in either build, so the same bits.
fn silu_mul(o: &mut [f32], u: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { silu_mul_avx2(o, u) };
    }
    silu_mul_portable(o, u)
}

/// [`silu_mul`] on arrays of eight lanes.
fn silu_mul_portable(o: &mut [f32], u: &[f32]) {
    let mut oc = o.chunks_exact_mut(8);
    let mut uc = u.chunks_exact(8);
    for (o, u) in (&mut oc).zip(&mut uc) {
        let mut minus = [0f32; 8];
        for (m, &g) in minus.iter_mut().zip(o.iter()) {
            *m = -g;
        }
        let e = exp32::exp8(minus);
        for ((o, e), u) in o.iter_mut().zip(e).zip(u) {
            *o = *o / (e + 1.0) * u;
        }
    }
    for (o, u) in oc.into_remainder().iter_mut().zip(uc.remainder()) {
        *o = *o / (exp32::exp1(-*o) + 1.0) * u;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn silu_mul_avx2(o: &mut [f32], u: &[f32]) {
    use std::arch::x86_64::*;
    let mut oc = o.chunks_exact_mut(8);
    let mut uc = u.chunks_exact(8);
    for (o, u) in (&mut oc).zip(&mut uc) {
        // SAFETY: AVX2 is enabled; each chunk holds eight floats.
        unsafe {
            let g = _mm256_loadu_ps(o.as_ptr());
            let e = exp32::x86::exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
            let s = _mm256_div_ps(g, _mm256_add_ps(e, _mm256_set1_ps(1.0)));
            _mm256_storeu_ps(
                o.as_mut_ptr(),
                _mm256_mul_ps(s, _mm256_loadu_ps(u.as_ptr())),
            );
        }
    }
    for (o, u) in oc.into_remainder().iter_mut().zip(uc.remainder()) {
        *o = *o / (exp32::exp1(-*o) + 1.0) * u;
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// The fused SiLU agrees with candle's `silu` then product to within a few f32 ulps
    /// (the exponential is within 2 ulp of libm's, and each of the divide, add and
    /// multiply rounds once): relative 1e-6 plus 1e-30 absolute, on the halves of one
    /// fused tensor (strided rows, as the model passes them), including gates far in both
    /// tails (±95) where `e⁻ᵍ` is 0 or infinite; the two builds give the same bits; GELU
    /// takes candle's path.
    #[test]
    fn fused_silu_matches_candle() -> candle_core::Result<()> {
        let (n, width) = (5, 37);
        let val = |i: usize| ((i * 2_654_435_761) % 2000) as f32 / 100.0 - 10.0;
        let mut data: Vec<f32> = (0..n * 2 * width).map(val).collect();
        data[3] = 95.0;
        data[4] = -95.0;
        let both = Tensor::from_vec(data, (n, 2 * width), &Device::Cpu)?;
        let (g, u) = (both.narrow(1, 0, width)?, both.narrow(1, width, width)?);
        let ours = gated(Activation::Silu, &g, &u)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let want = (g.silu()? * &u)?.flatten_all()?.to_vec1::<f32>()?;
        for (i, (a, b)) in ours.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs() + 1e-30,
                "element {i}: {a} vs {b}"
            );
        }
        let gc: Vec<f32> = g.contiguous()?.flatten_all()?.to_vec1()?;
        let uc: Vec<f32> = u.contiguous()?.flatten_all()?.to_vec1()?;
        let mut portable = gc.clone();
        silu_mul_portable(&mut portable, &uc);
        let mut best = gc;
        silu_mul(&mut best, &uc);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&portable), bits(&best));
        assert_eq!(bits(&portable), bits(&ours));
        let empty = Tensor::zeros((0, 2 * width), candle_core::DType::F32, &Device::Cpu)?;
        let halves = (empty.narrow(1, 0, width)?, empty.narrow(1, width, width)?);
        assert_eq!(
            gated(Activation::Silu, &halves.0, &halves.1)?.dims(),
            [0, width]
        );
        let gelu = gated(Activation::GeluTanh, &g, &u)?;
        let want = (g.gelu()? * &u)?;
        assert_eq!(
            bits(&gelu.flatten_all()?.to_vec1()?),
            bits(&want.flatten_all()?.to_vec1()?)
        );
        Ok(())
    }
}
