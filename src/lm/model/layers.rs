//! The building blocks of a decoder: linear maps (dense or quantized), fused projections, one
//! block's weights and the rotary-embedding frequencies of one kind of layer.

use candle_core::quantized::QMatMul;
use std::sync::Arc;

use candle_core::{Device, Module, Tensor};

use super::dense;
use crate::lm::quant::QMatrix;

use crate::lm::cache::ScoreOptions;
use crate::lm::family::RopeScaling;

/// A dense f32 or bf16 matrix on `device`: bf16 stays bf16 only on the CPU (where the
/// streaming product widens it) and unless `dense` (the f32 reference) is asked for.
fn dense_on(w: &Tensor, device: &Device, dense: bool) -> candle_core::Result<Tensor> {
    if w.dtype() == candle_core::DType::BF16 && (dense || !device.is_cpu()) {
        return w.to_dtype(candle_core::DType::F32)?.to_device(device);
    }
    w.to_device(device)
}

/// A linear map `y = x W^T` with `W: [out, in]`.
#[derive(Debug, Clone)]
pub(super) enum Linear {
    /// Stores `W` (`[out, in]`, contiguous, as model files do): each output's weights
    /// contiguous, read in order by the dot-product tiles of [`dense`].
    Dense(Tensor),
    /// candle's quantized matmul ([`crate::lm::WeightFormat::Quantized`]).
    Quant(QMatMul),
    /// Our block formats with int8 dot products ([`crate::lm::WeightFormat::Q8_0`], ...).
    Int(Arc<QMatrix>),
}

impl Linear {
    /// A dense layer from `W: [out, in]` (as f32; a contiguous f32 `W` is shared, not
    /// copied).
    pub(super) fn dense(w: Tensor) -> candle_core::Result<Self> {
        Ok(Linear::Dense(
            w.to_dtype(candle_core::DType::F32)?.contiguous()?,
        ))
    }

    /// The map on `device`; a quantized matrix leaves the CPU as dense f32.
    /// With `dense`, quantized maps become dense f32 on the CPU too.
    pub(super) fn to_device(&self, device: &Device, dense: bool) -> candle_core::Result<Self> {
        match self {
            Linear::Dense(w) => Ok(Linear::Dense(dense_on(w, device, dense)?)),
            Linear::Quant(_) | Linear::Int(_) if device.is_cpu() && !dense => Ok(self.clone()),
            Linear::Int(q) => {
                let [rows, cols] = q.dims();
                let w = Tensor::from_vec(q.dequantize(), (rows, cols), &candle_core::Device::Cpu)?;
                Linear::dense(w.to_device(device)?)
            }
            Linear::Quant(QMatMul::QTensor(q)) => {
                Linear::dense(q.dequantize(&candle_core::Device::Cpu)?.to_device(device)?)
            }
            Linear::Quant(QMatMul::Tensor(w) | QMatMul::TensorF16(w)) => {
                Linear::dense(w.to_dtype(candle_core::DType::F32)?.to_device(device)?)
            }
        }
    }

    /// Bytes the weights occupy.
    pub(super) fn bytes(&self) -> usize {
        match self {
            Linear::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            Linear::Quant(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            Linear::Quant(QMatMul::Tensor(w) | QMatMul::TensorF16(w)) => {
                w.elem_count() * w.dtype().size_in_bytes()
            }
            Linear::Int(q) => q.bytes(),
        }
    }

    pub(super) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Linear::Dense(w) => dense_forward(w, x),
            Linear::Quant(q) => q.forward(x),
            Linear::Int(q) => int_forward(q, x),
        }
    }
}

/// `x Wᵀ` with a dense `W: [out, in]`: our tiles on the CPU (f32 only where they run in
/// AVX2 and FMA, or AVX-512), candle's GEMM otherwise (bf16 widened for it on other devices: the GEMM
/// has no bf16 × f32 product).
fn dense_forward(w: &Tensor, x: &Tensor) -> candle_core::Result<Tensor> {
    if let Some(y) = cpu_dense_forward(w, x)? {
        return Ok(y);
    }
    if w.dtype() == candle_core::DType::BF16 {
        return x.matmul(&w.to_dtype(candle_core::DType::F32)?.t()?);
    }
    x.matmul(&w.t()?)
}

/// `x Wᵀ` by the tiles of [`dense`] on the CPU (`x: [n, in]` f32): bf16 `W` always, f32 `W`
/// where the tiles run in AVX2 and FMA (or AVX-512). `None` for every other case.
fn cpu_dense_forward(w: &Tensor, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
    use candle_core::{DType, Storage};
    let (n, k) = match x.dims() {
        &[n, k] => (n, k),
        _ => return Ok(None),
    };
    let ours = match w.dtype() {
        DType::BF16 => true,
        DType::F32 => dense::available(),
        _ => false,
    };
    if !ours || !w.device().is_cpu() || x.dtype() != DType::F32 {
        return Ok(None);
    }
    let (m, wk) = w.dims2()?;
    if wk != k {
        candle_core::bail!("input width {k} for a matrix of {:?}", [m, wk]);
    }
    let (storage, layout) = w.storage_and_layout();
    let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) else {
        return Ok(None);
    };
    let y = with_host_rows(x, |xs| {
        if w.dtype() == DType::BF16 {
            Ok(dense::matmul(
                xs,
                n,
                &cpu.as_slice::<half::bf16>()?[start..end],
                k,
                m,
            ))
        } else {
            Ok(dense::matmul(
                xs,
                n,
                &cpu.as_slice::<f32>()?[start..end],
                k,
                m,
            ))
        }
    })?;
    match y {
        Some(y) => Ok(Some(Tensor::from_vec(y, (n, m), x.device())?)),
        None => Ok(None),
    }
}

/// `f(rows)` with the elements of a host f32 tensor in row-major order, read in place when
/// contiguous (as activations come out of the norms), else from a contiguous copy made
/// first (the copy reads the same storage); `None` where `f` gives `None` or the tensor
/// is not host f32. Copying the activations for every product was 2% of a step's
/// samples at 64 particles.
fn with_host_rows<R>(
    x: &Tensor,
    f: impl FnOnce(&[f32]) -> candle_core::Result<Option<R>>,
) -> candle_core::Result<Option<R>> {
    use candle_core::{DType, Storage};
    if x.dtype() != DType::F32 {
        return Ok(None);
    }
    let x = if x.is_contiguous() {
        x.clone()
    } else {
        x.contiguous()?
    };
    let (storage, layout) = x.storage_and_layout();
    let (Storage::Cpu(cpu), Some((a, b))) = (&*storage, layout.contiguous_offsets()) else {
        return Ok(None);
    };
    f(&cpu.as_slice::<f32>()?[a..b])
}

/// `x Wᵀ` with a block-quantized `W` (on the CPU; `x: [n, in]`).
fn int_forward(q: &QMatrix, x: &Tensor) -> candle_core::Result<Tensor> {
    let (n, cols) = x.dims2()?;
    if cols != q.dims()[1] {
        candle_core::bail!("input width {cols} for a matrix of {:?}", q.dims());
    }
    let x = x.to_dtype(candle_core::DType::F32)?;
    match with_host_rows(&x, |xs| Ok(Some(q.matmul(xs, n))))? {
        Some(y) => Tensor::from_vec(y, (n, q.dims()[0]), x.device()),
        // Not on the host: the rows copied out.
        None => Tensor::from_vec(
            q.matmul(&x.flatten_all()?.to_vec1::<f32>()?, n),
            (n, q.dims()[0]),
            x.device(),
        ),
    }
}

/// The token embedding: dense rows, or (CPU, block formats) block-quantized rows decoded
/// on lookup, shared with a tied output layer.
#[derive(Debug, Clone)]
pub(super) enum Embedding {
    Dense(Tensor),
    Blocks(Arc<QMatrix>),
}

impl Embedding {
    /// Rows `ids` as `[ids, hidden]` f32 on `device`.
    pub(super) fn lookup(&self, ids: &Tensor, device: &Device) -> candle_core::Result<Tensor> {
        match self {
            // bf16 rows are widened (a no-op for f32).
            Embedding::Dense(t) => t.index_select(ids, 0)?.to_dtype(candle_core::DType::F32),
            Embedding::Blocks(q) => {
                let ids = ids.to_vec1::<u32>()?;
                let rows = q.rows_f32(&ids).ok_or_else(|| {
                    candle_core::Error::Msg("token id outside the embedding".into())
                })?;
                Tensor::from_vec(rows, (ids.len(), q.dims()[1]), device)
            }
        }
    }

    /// Bytes of the rows (a block matrix shared with the output layer counts here).
    pub(super) fn bytes(&self) -> usize {
        match self {
            Embedding::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Embedding::Blocks(q) => q.bytes(),
        }
    }

    /// The embedding on `device` (blocks stay only on the CPU without `dense`).
    pub(super) fn to_device(&self, device: &Device, dense: bool) -> candle_core::Result<Self> {
        match self {
            Embedding::Dense(t) => Ok(Embedding::Dense(dense_on(t, device, dense)?)),
            Embedding::Blocks(_) if device.is_cpu() && !dense => Ok(self.clone()),
            Embedding::Blocks(q) => {
                let [rows, cols] = q.dims();
                let t = Tensor::from_vec(q.dequantize(), (rows, cols), &Device::Cpu)?;
                Ok(Embedding::Dense(t.to_device(device)?))
            }
        }
    }
}

/// Several linear maps applied to the same input. Dense maps are fused into one matrix
/// (`[in, Σ out]`) so that a single matrix product computes all of them.
#[derive(Debug, Clone)]
pub(super) enum Proj {
    Fused {
        w: Tensor,
        sizes: Vec<usize>,
    },
    /// Block-quantized maps stacked by rows: one activation quantization, one product.
    FusedInt {
        q: Arc<QMatrix>,
        sizes: Vec<usize>,
    },
    Split(Vec<Linear>),
}

impl Proj {
    pub(super) fn new(parts: Vec<Linear>) -> candle_core::Result<Self> {
        let ints: Vec<&QMatrix> = parts
            .iter()
            .filter_map(|l| match l {
                Linear::Int(q) => Some(q.as_ref()),
                _ => None,
            })
            .collect();
        if ints.len() == parts.len() {
            if let Some(q) = QMatrix::stack(&ints) {
                return Ok(Proj::FusedInt {
                    sizes: ints.iter().map(|q| q.dims()[0]).collect(),
                    q: Arc::new(q),
                });
            }
        }
        let dense: Vec<&Tensor> = parts
            .iter()
            .filter_map(|l| match l {
                Linear::Dense(w) => Some(w),
                Linear::Quant(_) | Linear::Int(_) => None,
            })
            .collect();
        if dense.len() < parts.len() {
            return Ok(Proj::Split(parts));
        }
        let sizes = dense
            .iter()
            .map(|t| t.dim(0))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Proj::Fused {
            w: Tensor::cat(&dense, 0)?,
            sizes,
        })
    }

    /// The maps on `device` (with `dense`, as dense f32 matrices).
    pub(super) fn to_device(&self, device: &Device, dense: bool) -> candle_core::Result<Self> {
        match self {
            Proj::Fused { w, sizes } => Ok(Proj::Fused {
                w: dense_on(w, device, dense)?,
                sizes: sizes.clone(),
            }),
            Proj::FusedInt { .. } if device.is_cpu() && !dense => Ok(self.clone()),
            // Elsewhere the parts become dense f32 matrices, fused again.
            Proj::FusedInt { .. } => Proj::new(
                self.parts()?
                    .iter()
                    .map(|l| l.to_device(device, dense))
                    .collect::<candle_core::Result<_>>()?,
            ),
            Proj::Split(ls) => Ok(Proj::Split(
                ls.iter()
                    .map(|l| l.to_device(device, dense))
                    .collect::<candle_core::Result<_>>()?,
            )),
        }
    }

    /// Bytes the weights occupy.
    pub(super) fn bytes(&self) -> usize {
        match self {
            Proj::Fused { w, .. } => w.elem_count() * w.dtype().size_in_bytes(),
            Proj::FusedInt { q, .. } => q.bytes(),
            Proj::Split(ls) => ls.iter().map(Linear::bytes).sum(),
        }
    }

    /// All outputs (`[rows, out_i]` each; fused outputs are column views of one product).
    pub(super) fn forward(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        let (y, sizes) = match self {
            Proj::Fused { w, sizes } => (dense_forward(w, x)?, sizes),
            Proj::FusedInt { q, sizes } => (int_forward(q, x)?, sizes),
            Proj::Split(ls) => return ls.iter().map(|l| l.forward(x)).collect(),
        };
        let mut off = 0;
        let mut out = Vec::with_capacity(sizes.len());
        for &n in sizes {
            out.push(y.narrow(1, off, n)?);
            off += n;
        }
        Ok(out)
    }

    /// The separate maps (views into the fused matrix), for the unfused reference path.
    pub(super) fn parts(&self) -> candle_core::Result<Vec<Linear>> {
        match self {
            Proj::Fused { w, sizes } => {
                let mut off = 0;
                let mut out = Vec::with_capacity(sizes.len());
                for &n in sizes {
                    out.push(Linear::Dense(w.narrow(0, off, n)?));
                    off += n;
                }
                Ok(out)
            }
            Proj::FusedInt { q, sizes } => {
                let mut off = 0;
                let mut out = Vec::with_capacity(sizes.len());
                for &n in sizes {
                    let part = q
                        .slice_rows(off, n)
                        .ok_or_else(|| candle_core::Error::Msg("fused rows out of range".into()))?;
                    out.push(Linear::Int(Arc::new(part)));
                    off += n;
                }
                Ok(out)
            }
            Proj::Split(ls) => Ok(ls.clone()),
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct Layer {
    pub(super) attn_norm: Tensor,
    /// Query, key and value projections.
    pub(super) qkv: Proj,
    /// Query, key and value biases (Qwen2).
    pub(super) qkv_bias: Option<[Tensor; 3]>,
    /// Per-head RMSNorm weights of queries and keys (Qwen3, Gemma 3).
    pub(super) qk_norm: Option<[Tensor; 2]>,
    pub(super) wo: Linear,
    /// Norm of the attention output before the residual add (Gemma).
    pub(super) post_attn_norm: Option<Tensor>,
    /// Norm before the feed-forward layer.
    pub(super) ffn_norm: Tensor,
    /// Gate and up projections of the gated feed-forward layer.
    pub(super) gate_up: Proj,
    pub(super) w_down: Linear,
    /// Norm of the feed-forward output before the residual add (Gemma).
    pub(super) post_ffw_norm: Option<Tensor>,
    /// Attention scores: scale, soft-cap, sliding window.
    pub(super) scores: ScoreOptions,
    /// Index into [`LlamaModel::ropes`].
    pub(super) rope: usize,
}

impl Layer {
    /// The block's weights on `device` (with `dense`, every matrix as dense f32).
    pub(super) fn to_device(&self, device: &Device, dense: bool) -> candle_core::Result<Self> {
        let t = |x: &Tensor| x.to_device(device);
        let opt = |x: &Option<Tensor>| x.as_ref().map(t).transpose();
        Ok(Self {
            attn_norm: t(&self.attn_norm)?,
            qkv: self.qkv.to_device(device, dense)?,
            qkv_bias: match &self.qkv_bias {
                Some([a, b, c]) => Some([t(a)?, t(b)?, t(c)?]),
                None => None,
            },
            qk_norm: match &self.qk_norm {
                Some([a, b]) => Some([t(a)?, t(b)?]),
                None => None,
            },
            wo: self.wo.to_device(device, dense)?,
            post_attn_norm: opt(&self.post_attn_norm)?,
            ffn_norm: t(&self.ffn_norm)?,
            gate_up: self.gate_up.to_device(device, dense)?,
            w_down: self.w_down.to_device(device, dense)?,
            post_ffw_norm: opt(&self.post_ffw_norm)?,
            scores: self.scores,
            rope: self.rope,
        })
    }
}

/// RoPE frequencies of one kind of layer.
#[derive(Debug, Clone)]
pub(super) struct Rope {
    /// `1 / (divisor_i * theta^(2i/d))` for `i < d/2`.
    pub(super) inv_freq: Vec<f64>,
    /// LongRoPE: the frequencies for forward calls reaching past `original` positions.
    pub(super) long: Option<(Vec<f64>, usize)>,
    /// Factor on cos and sin (LongRoPE's attention factor; 1 otherwise).
    pub(super) mscale: f64,
}

impl Rope {
    pub(super) fn new(theta: f64, head_dim: usize, scaling: &RopeScaling) -> Self {
        let base: Vec<f64> = (0..head_dim / 2)
            .map(|i| theta.powf(-((2 * i) as f64) / head_dim as f64))
            .collect();
        let divide = |f: &[f64]| base.iter().zip(f).map(|(b, d)| b / d).collect();
        match scaling {
            RopeScaling::None => Self::plain(base),
            RopeScaling::Linear { factor } => {
                Self::plain(base.iter().map(|b| b / factor).collect())
            }
            RopeScaling::Factors(f) => Self::plain(divide(f)),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                // Meta's reference: wavelengths shorter than original/high keep their
                // frequency, longer than original/low are divided by `factor`, and the band in
                // between interpolates linearly in original/wavelength.
                let orig = *original_max_position_embeddings as f64;
                let inv = base
                    .iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < orig / high_freq_factor {
                            f
                        } else if wavelen > orig / low_freq_factor {
                            f / factor
                        } else {
                            let s = (orig / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - s) * f / factor + s * f
                        }
                    })
                    .collect();
                Self::plain(inv)
            }
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor,
            } => Self {
                inv_freq: divide(short_factor),
                long: Some((divide(long_factor), *original_max_position_embeddings)),
                mscale: *attention_factor,
            },
        }
    }

    pub(super) fn plain(inv_freq: Vec<f64>) -> Self {
        Self {
            inv_freq,
            long: None,
            mscale: 1.0,
        }
    }

    /// The frequencies for a forward call whose largest position is `max_pos`. LongRoPE
    /// switches on the whole call, as transformers does: every token of a call that reaches
    /// past the original window uses the long factors.
    pub(super) fn freqs(&self, max_pos: usize) -> &[f64] {
        match &self.long {
            Some((long, original)) if max_pos + 1 > *original => long,
            _ => &self.inv_freq,
        }
    }

    /// `cos` and `sin` of the angles of `positions`, `[positions, d/2]` each, row-major.
    pub(super) fn tables(
        &self,
        positions: impl Iterator<Item = usize>,
        max_pos: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let f = self.freqs(max_pos);
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for pos in positions {
            for &w in f {
                let a = pos as f64 * w;
                cos.push((a.cos() * self.mscale) as f32);
                sin.push((a.sin() * self.mscale) as f32);
            }
        }
        (cos, sin)
    }
}
