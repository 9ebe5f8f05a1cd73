//! A decoder-only transformer on candle for the llama, Mistral, Qwen2/3, Gemma 2/3 and Phi-3
//! families, with the KV cache kept outside.
//!
//! Architecture: LLaMA (Touvron et al., 2023, "LLaMA: Open and Efficient Foundation Language
//! Models", arXiv:2302.13971) — pre-norm decoder blocks with RMSNorm (Zhang & Sennrich, 2019),
//! rotary position embeddings (RoPE; Su et al., 2021, arXiv:2104.09864), grouped-query
//! attention (GQA; Ainslie et al., 2023, arXiv:2305.13245) and a gated feed-forward layer
//! (SwiGLU or GeGLU; Shazeer, 2020, arXiv:2002.05202), with tied or untied input/output
//! embeddings. What the families change (biases, query/key norms, Gemma's sandwich norms,
//! soft-caps and scaled embeddings, sliding windows, RoPE scaling, fused projections) is data:
//! [`ArchOptions`] from [`super::family`], read from `config.json` or GGUF metadata. See
//! `docs/models.md` for what is supported and how it is verified.
//!
//! The weights ([`LlamaModel`]) are immutable; all per-sequence state lives in a
//! [`PagedKvCache`] passed to [`LlamaModel::forward`], so one model serves a whole particle
//! population whose sequences share prefixes. A forward call takes any number of sequences,
//! each appending any number of tokens at its own positions: all new tokens of all sequences
//! are stacked into one `[tokens, hidden]` matrix, so every projection is a single matrix
//! product, and attention reads each sequence's keys and values through its block table.
//!
//! Loading: GGUF files (llama.cpp's format, read with candle's GGUF reader) and Hugging Face
//! checkpoints (`config.json` + `*.safetensors`). Weights are dequantized to f32 by default
//! ([`WeightFormat::F32`], the fastest choice on CPU at batch ≥ 8); [`WeightFormat::Quantized`]
//! keeps GGUF's quantized matrices and multiplies with candle's `QMatMul`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};
use rand::{Rng, SeedableRng};

use super::cache::ScoreOptions;
use super::cache::{AttentionPath, CacheLayout, CacheSeq, PagedKvCache, QueryMeta};
use super::error::{LmError, LmResult};
use super::family::{
    parse_hf_config, Activation, ArchOptions, LayerKind, ModelType, RopeScaling, MAX_CONFIG_BYTES,
};

/// How rotary embeddings pair the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(2i, 2i+1)`: GGUF llama files (llama.cpp permutes the query/key weights).
    Interleaved,
    /// Pairs `(i, i + d/2)`: Hugging Face checkpoints ("neox" style).
    Half,
}

/// Hyper-parameters of a llama-family model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Rows of the embedding and output matrices.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Width of the SwiGLU layer.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub n_layers: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (divides `n_heads`).
    pub n_kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// RoPE pairing convention.
    pub rope_style: RopeStyle,
    /// RMSNorm epsilon.
    pub rms_eps: f64,
    /// Context window (positions for which rotary tables exist).
    pub max_seq_len: usize,
    /// Whether the output layer reuses the embedding matrix.
    pub tie_embeddings: bool,
}

/// The largest dimensions a model may declare. They are far above any released llama-family
/// model and keep every size computed from a model file's header (weights, KV cache,
/// activations) well inside `usize`, so that a corrupt or hostile header is refused before
/// anything is allocated.
pub mod limits {
    /// Vocabulary rows.
    pub const MAX_VOCAB: usize = 1 << 22;
    /// Model width, head dimension times heads, and SwiGLU width.
    pub const MAX_WIDTH: usize = 1 << 18;
    /// Decoder blocks.
    pub const MAX_LAYERS: usize = 1 << 12;
    /// Query or key/value heads.
    pub const MAX_HEADS: usize = 1 << 12;
    /// Context window (positions); larger declared windows are capped to it.
    pub const MAX_CONTEXT: usize = 1 << 24;
}

impl LlamaConfig {
    /// Check the internal consistency of the dimensions and that each is within
    /// [`limits`].
    ///
    /// # Errors
    /// [`LmError::Format`].
    pub fn validate(&self) -> LmResult<()> {
        let bad = |m: String| Err(LmError::Format(m));
        for (name, value, max) in [
            ("vocabulary size", self.vocab_size, limits::MAX_VOCAB),
            ("hidden size", self.hidden_size, limits::MAX_WIDTH),
            (
                "intermediate size",
                self.intermediate_size,
                limits::MAX_WIDTH,
            ),
            ("layer count", self.n_layers, limits::MAX_LAYERS),
            ("head count", self.n_heads, limits::MAX_HEADS),
            ("key/value head count", self.n_kv_heads, limits::MAX_HEADS),
            ("head dimension", self.head_dim, limits::MAX_WIDTH),
            (
                "query width (heads x head dimension)",
                self.n_heads.saturating_mul(self.head_dim),
                limits::MAX_WIDTH,
            ),
            ("context window", self.max_seq_len, limits::MAX_CONTEXT),
        ] {
            if value > max {
                return bad(format!(
                    "{name} {value} exceeds the supported maximum {max} (corrupt model file?)"
                ));
            }
        }
        if self.vocab_size == 0
            || self.hidden_size == 0
            || self.intermediate_size == 0
            || self.n_layers == 0
            || self.n_heads == 0
            || self.n_kv_heads == 0
            || self.head_dim == 0
            || self.max_seq_len == 0
        {
            return bad(format!("a model dimension is zero: {self:?}"));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!(
                "{} query heads are not a multiple of {} key/value heads",
                self.n_heads, self.n_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head dimension {} is odd (RoPE needs pairs)",
                self.head_dim
            ));
        }
        if !(self.rope_theta > 0.0 && self.rms_eps >= 0.0) {
            return bad(format!(
                "invalid rope_theta {} or rms_eps {}",
                self.rope_theta, self.rms_eps
            ));
        }
        Ok(())
    }

    /// A cache layout for this model with `num_blocks` blocks of `block_size` tokens.
    pub fn cache_layout(&self, block_size: usize, num_blocks: usize) -> CacheLayout {
        CacheLayout {
            n_layers: self.n_layers,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            block_size,
            num_blocks,
        }
    }
}

/// How weight matrices are stored and multiplied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// Dequantize everything to f32 (default; fastest on CPU for batched decoding).
    #[default]
    F32,
    /// Keep GGUF's quantized matrices and use candle's quantized matmul (smaller, slower at
    /// large batches; greedy outputs may differ from f32 on near-ties). Ignored for
    /// safetensors checkpoints.
    Quantized,
}

/// Options for loading a model.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Weight storage.
    pub weights: WeightFormat,
    /// Cap on the context window (default: the model's own).
    pub max_seq_len: Option<usize>,
}

/// A linear map `y = x W^T` with `W: [out, in]`.
#[derive(Debug, Clone)]
enum Linear {
    /// Stores `W^T` (`[in, out]`, contiguous): the row-major product `x W^T` then streams
    /// the weights in order, which is markedly faster for small batches.
    Dense(Tensor),
    Quant(QMatMul),
}

impl Linear {
    /// A dense layer from `W: [out, in]`.
    fn dense(w: Tensor) -> candle_core::Result<Self> {
        Ok(Linear::Dense(w.t()?.contiguous()?))
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Linear::Dense(wt) => x.matmul(wt),
            Linear::Quant(q) => q.forward(x),
        }
    }
}

/// Several linear maps applied to the same input. Dense maps are fused into one matrix
/// (`[in, Σ out]`) so that a single matrix product computes all of them.
#[derive(Debug, Clone)]
enum Proj {
    Fused { wt: Tensor, sizes: Vec<usize> },
    Split(Vec<Linear>),
}

impl Proj {
    fn new(parts: Vec<Linear>) -> candle_core::Result<Self> {
        let dense: Vec<&Tensor> = parts
            .iter()
            .filter_map(|l| match l {
                Linear::Dense(wt) => Some(wt),
                Linear::Quant(_) => None,
            })
            .collect();
        if dense.len() < parts.len() {
            return Ok(Proj::Split(parts));
        }
        let sizes = dense
            .iter()
            .map(|t| t.dim(1))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Proj::Fused {
            wt: Tensor::cat(&dense, 1)?,
            sizes,
        })
    }

    /// All outputs (`[rows, out_i]` each; fused outputs are column views of one product).
    fn forward(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        match self {
            Proj::Fused { wt, sizes } => {
                let y = x.matmul(wt)?;
                let mut off = 0;
                let mut out = Vec::with_capacity(sizes.len());
                for &n in sizes {
                    out.push(y.narrow(1, off, n)?);
                    off += n;
                }
                Ok(out)
            }
            Proj::Split(ls) => ls.iter().map(|l| l.forward(x)).collect(),
        }
    }

    /// The separate maps (views into the fused matrix), for the unfused reference path.
    fn parts(&self) -> candle_core::Result<Vec<Linear>> {
        match self {
            Proj::Fused { wt, sizes } => {
                let mut off = 0;
                let mut out = Vec::with_capacity(sizes.len());
                for &n in sizes {
                    out.push(Linear::Dense(wt.narrow(1, off, n)?));
                    off += n;
                }
                Ok(out)
            }
            Proj::Split(ls) => Ok(ls.clone()),
        }
    }
}

#[derive(Debug, Clone)]
struct Layer {
    attn_norm: Tensor,
    /// Query, key and value projections.
    qkv: Proj,
    /// Query, key and value biases (Qwen2).
    qkv_bias: Option<[Tensor; 3]>,
    /// Per-head RMSNorm weights of queries and keys (Qwen3, Gemma 3).
    qk_norm: Option<[Tensor; 2]>,
    wo: Linear,
    /// Norm of the attention output before the residual add (Gemma).
    post_attn_norm: Option<Tensor>,
    /// Norm before the feed-forward layer.
    ffn_norm: Tensor,
    /// Gate and up projections of the gated feed-forward layer.
    gate_up: Proj,
    w_down: Linear,
    /// Norm of the feed-forward output before the residual add (Gemma).
    post_ffw_norm: Option<Tensor>,
    /// Attention scores: scale, soft-cap, sliding window.
    scores: ScoreOptions,
    /// Index into [`LlamaModel::ropes`].
    rope: usize,
}

/// RoPE frequencies of one kind of layer.
#[derive(Debug, Clone)]
struct Rope {
    /// `1 / (divisor_i * theta^(2i/d))` for `i < d/2`.
    inv_freq: Vec<f64>,
    /// LongRoPE: the frequencies for forward calls reaching past `original` positions.
    long: Option<(Vec<f64>, usize)>,
    /// Factor on cos and sin (LongRoPE's attention factor; 1 otherwise).
    mscale: f64,
}

impl Rope {
    fn new(theta: f64, head_dim: usize, scaling: &RopeScaling) -> Self {
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

    fn plain(inv_freq: Vec<f64>) -> Self {
        Self {
            inv_freq,
            long: None,
            mscale: 1.0,
        }
    }

    /// The frequencies for a forward call whose largest position is `max_pos`. LongRoPE
    /// switches on the whole call, as transformers does: every token of a call that reaches
    /// past the original window uses the long factors.
    fn freqs(&self, max_pos: usize) -> &[f64] {
        match &self.long {
            Some((long, original)) if max_pos + 1 > *original => long,
            _ => &self.inv_freq,
        }
    }

    /// `cos` and `sin` of the angles of `positions`, `[positions, d/2]` each, row-major.
    fn tables(
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

/// Which rows of logits [`LlamaModel::forward`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitRows {
    /// One row per appended token, in batch order.
    All,
    /// One row per sequence: after its last appended token.
    Last,
}

/// One entry of a batched forward call: append `tokens` to cache sequence `seq`.
#[derive(Debug, Clone, Copy)]
pub struct SeqTokens<'a> {
    /// The sequence.
    pub seq: CacheSeq,
    /// Tokens to append (at least one).
    pub tokens: &'a [u32],
}

/// The weights of a llama-family model. See the [module documentation](self).
#[derive(Debug, Clone)]
pub struct LlamaModel {
    config: LlamaConfig,
    arch: ArchOptions,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    /// RoPE frequencies: global layers first, then (Gemma 3) sliding layers. The angles of
    /// a position are computed when a token at that position is processed (not tabulated for
    /// the whole context window, whose declared size comes from the model file and may be
    /// huge).
    ropes: Vec<Rope>,
}

/// A source of named tensors (GGUF names: `blk.{i}.attn_q.weight`, ...).
trait WeightSource {
    /// A tensor as f32, or `None` when absent.
    fn dense(&mut self, name: &str) -> LmResult<Option<Tensor>>;
    /// Whether the tensor exists.
    fn has(&mut self, name: &str) -> bool;
    /// A matrix for a linear layer, or `None` when absent.
    fn linear(&mut self, name: &str) -> LmResult<Option<Linear>> {
        self.dense(name)?
            .map(Linear::dense)
            .transpose()
            .map_err(LmError::from)
    }
}

fn require<T>(t: Option<T>, name: &str) -> LmResult<T> {
    t.ok_or_else(|| LmError::Format(format!("missing tensor `{name}`")))
}

fn check_shape(t: &Tensor, dims: &[usize], name: &str) -> LmResult<()> {
    if t.dims() != dims {
        return Err(LmError::Format(format!(
            "tensor `{name}` has shape {:?}, expected {dims:?}",
            t.dims()
        )));
    }
    Ok(())
}

fn linear_dims(l: &Linear) -> Vec<usize> {
    match l {
        Linear::Dense(wt) => wt.dims().iter().rev().copied().collect(),
        Linear::Quant(QMatMul::QTensor(q)) => q.shape().dims().to_vec(),
        Linear::Quant(QMatMul::Tensor(w) | QMatMul::TensorF16(w)) => w.dims().to_vec(),
    }
}

impl LlamaModel {
    fn build(config: LlamaConfig, arch: ArchOptions, src: &mut dyn WeightSource) -> LmResult<Self> {
        config.validate()?;
        let c = &config;
        if arch.layers.len() != c.n_layers {
            return Err(LmError::Format(format!(
                "{} layer kinds for {} layers",
                arch.layers.len(),
                c.n_layers
            )));
        }
        let (h, hd, q_out, kv_out, inter) = (
            c.hidden_size,
            c.head_dim,
            c.n_heads * c.head_dim,
            c.n_kv_heads * c.head_dim,
            c.intermediate_size,
        );
        let embed = require(src.dense("token_embd.weight")?, "token_embd.weight")?;
        check_shape(&embed, &[c.vocab_size, h], "token_embd.weight")?;
        let lin =
            |src: &mut dyn WeightSource, name: String, dims: [usize; 2]| -> LmResult<Linear> {
                let l = require(src.linear(&name)?, &name)?;
                if linear_dims(&l) != dims {
                    return Err(LmError::Format(format!(
                        "tensor `{name}` has shape {:?}, expected {dims:?}",
                        linear_dims(&l)
                    )));
                }
                Ok(l)
            };
        let vector = |src: &mut dyn WeightSource, name: String, len: usize| -> LmResult<Tensor> {
            let t = require(src.dense(&name)?, &name)?;
            check_shape(&t, &[len], &name)?;
            Ok(t)
        };
        // Rows `[from, from + n)` of a fused `[out, in]` matrix as a dense layer.
        let rows = |w: &Tensor, from: usize, n: usize| -> LmResult<Linear> {
            Ok(Linear::dense(w.narrow(0, from, n)?.contiguous()?)?)
        };
        let has = |src: &mut dyn WeightSource, name: &str| src.has(name);
        let sliding_rope = usize::from(arch.rope_local_theta.is_some());
        // No capacity from the header: a missing tensor ends the loop with an error first.
        let mut layers = Vec::new();
        for i in 0..c.n_layers {
            let p = format!("blk.{i}");
            // Phi-3 stores the three projections as one matrix, rows [q | k | v].
            let fused_qkv = format!("{p}.attn_qkv.weight");
            let qkv = if has(src, &fused_qkv) {
                let w = require(src.dense(&fused_qkv)?, &fused_qkv)?;
                check_shape(&w, &[q_out + 2 * kv_out, h], &fused_qkv)?;
                vec![
                    rows(&w, 0, q_out)?,
                    rows(&w, q_out, kv_out)?,
                    rows(&w, q_out + kv_out, kv_out)?,
                ]
            } else {
                vec![
                    lin(src, format!("{p}.attn_q.weight"), [q_out, h])?,
                    lin(src, format!("{p}.attn_k.weight"), [kv_out, h])?,
                    lin(src, format!("{p}.attn_v.weight"), [kv_out, h])?,
                ]
            };
            let qkv_bias = if arch.qkv_bias {
                Some([
                    vector(src, format!("{p}.attn_q.bias"), q_out)?,
                    vector(src, format!("{p}.attn_k.bias"), kv_out)?,
                    vector(src, format!("{p}.attn_v.bias"), kv_out)?,
                ])
            } else {
                None
            };
            let qk_norm = if arch.qk_norm {
                Some([
                    vector(src, format!("{p}.attn_q_norm.weight"), hd)?,
                    vector(src, format!("{p}.attn_k_norm.weight"), hd)?,
                ])
            } else {
                None
            };
            let wo = lin(src, format!("{p}.attn_output.weight"), [h, q_out])?;
            // Phi-3 stores gate and up as one matrix, rows [gate | up], named `ffn_up`.
            let gate = format!("{p}.ffn_gate.weight");
            let gate_up = if has(src, &gate) {
                vec![
                    lin(src, gate, [inter, h])?,
                    lin(src, format!("{p}.ffn_up.weight"), [inter, h])?,
                ]
            } else {
                let name = format!("{p}.ffn_up.weight");
                let w = require(src.dense(&name)?, &gate)?;
                check_shape(&w, &[2 * inter, h], &name)?;
                vec![rows(&w, 0, inter)?, rows(&w, inter, inter)?]
            };
            let w_down = lin(src, format!("{p}.ffn_down.weight"), [h, inter])?;
            let attn_norm = vector(src, format!("{p}.attn_norm.weight"), h)?;
            let ffn_norm = vector(src, format!("{p}.ffn_norm.weight"), h)?;
            let (post_attn_norm, post_ffw_norm) = if arch.post_norms {
                (
                    Some(vector(src, format!("{p}.post_attention_norm.weight"), h)?),
                    Some(vector(src, format!("{p}.post_ffw_norm.weight"), h)?),
                )
            } else {
                (None, None)
            };
            let sliding = arch.layers[i] == LayerKind::Sliding;
            layers.push(Layer {
                attn_norm,
                qkv: Proj::new(qkv)?,
                qkv_bias,
                qk_norm,
                wo,
                post_attn_norm,
                ffn_norm,
                gate_up: Proj::new(gate_up)?,
                w_down,
                post_ffw_norm,
                scores: ScoreOptions {
                    scale: arch.attn_scale as f32,
                    softcap: arch.attn_softcap.map(|x| x as f32),
                    window: arch.window(i),
                },
                rope: if sliding { sliding_rope } else { 0 },
            });
        }
        let lm_head = if c.tie_embeddings {
            None
        } else {
            src.linear("output.weight")?
        };
        let lm_head = match lm_head {
            Some(l) => {
                if linear_dims(&l) != [c.vocab_size, h] {
                    return Err(LmError::Format(format!(
                        "tensor `output.weight` has shape {:?}, expected {:?}",
                        linear_dims(&l),
                        [c.vocab_size, h]
                    )));
                }
                l
            }
            // Tied embeddings (or no separate output matrix in the file).
            None => match src.linear("token_embd.weight")? {
                Some(Linear::Quant(q)) => Linear::Quant(q),
                _ => Linear::dense(embed.clone())?,
            },
        };
        let norm = require(src.dense("output_norm.weight")?, "output_norm.weight")?;
        check_shape(&norm, &[h], "output_norm.weight")?;
        let mut ropes = vec![Rope::new(c.rope_theta, hd, &arch.rope_scaling)];
        if let Some(theta) = arch.rope_local_theta {
            // Gemma 3's sliding layers: their own base, never rescaled.
            ropes.push(Rope::new(theta, hd, &RopeScaling::None));
        }
        Ok(Self {
            config,
            arch,
            embed,
            layers,
            norm,
            lm_head,
            ropes,
        })
    }

    /// A model with random weights (for tests and benchmarks): deterministic given `seed`.
    ///
    /// # Errors
    /// [`LmError::Format`] for an inconsistent configuration.
    pub fn random(config: LlamaConfig, seed: u64) -> LmResult<Self> {
        let tensors = Self::random_tensors(&config, seed)?;
        Self::from_tensors(config, tensors)
    }

    /// The random weights of [`LlamaModel::random`], named as in GGUF files (useful to write
    /// test checkpoints).
    ///
    /// # Errors
    /// [`LmError::Format`] for an inconsistent configuration.
    pub fn random_tensors(config: &LlamaConfig, seed: u64) -> LmResult<HashMap<String, Tensor>> {
        config.validate()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut tensors = HashMap::new();
        let c = config;
        let h = c.hidden_size;
        let mat = |rows: usize, cols: usize, rng: &mut rand::rngs::StdRng| {
            let scale = 1.5 / (cols as f32).sqrt();
            let data: Vec<f32> = (0..rows * cols)
                .map(|_| rng.random_range(-scale..scale))
                .collect();
            Tensor::from_vec(data, (rows, cols), &Device::Cpu)
        };
        let norm = |rng: &mut rand::rngs::StdRng| {
            let data: Vec<f32> = (0..h)
                .map(|_| 1.0 + rng.random_range(-0.2f32..0.2))
                .collect();
            Tensor::from_vec(data, h, &Device::Cpu)
        };
        tensors.insert(
            "token_embd.weight".to_string(),
            mat(c.vocab_size, h, &mut rng)?,
        );
        for i in 0..c.n_layers {
            let p = format!("blk.{i}");
            let qo = c.n_heads * c.head_dim;
            let kvo = c.n_kv_heads * c.head_dim;
            tensors.insert(format!("{p}.attn_q.weight"), mat(qo, h, &mut rng)?);
            tensors.insert(format!("{p}.attn_k.weight"), mat(kvo, h, &mut rng)?);
            tensors.insert(format!("{p}.attn_v.weight"), mat(kvo, h, &mut rng)?);
            tensors.insert(format!("{p}.attn_output.weight"), mat(h, qo, &mut rng)?);
            tensors.insert(
                format!("{p}.ffn_gate.weight"),
                mat(c.intermediate_size, h, &mut rng)?,
            );
            tensors.insert(
                format!("{p}.ffn_up.weight"),
                mat(c.intermediate_size, h, &mut rng)?,
            );
            tensors.insert(
                format!("{p}.ffn_down.weight"),
                mat(h, c.intermediate_size, &mut rng)?,
            );
            tensors.insert(format!("{p}.attn_norm.weight"), norm(&mut rng)?);
            tensors.insert(format!("{p}.ffn_norm.weight"), norm(&mut rng)?);
        }
        tensors.insert("output_norm.weight".to_string(), norm(&mut rng)?);
        if !c.tie_embeddings {
            tensors.insert("output.weight".to_string(), mat(c.vocab_size, h, &mut rng)?);
        }
        Ok(tensors)
    }

    /// Build a model from f32 tensors named as in GGUF files (`token_embd.weight`,
    /// `blk.{i}.attn_q.weight`, ..., `output_norm.weight`, optional `output.weight`).
    ///
    /// # Errors
    /// [`LmError::Format`] for missing tensors or wrong shapes.
    pub fn from_tensors(config: LlamaConfig, tensors: HashMap<String, Tensor>) -> LmResult<Self> {
        let arch = ArchOptions::llama(&config);
        Self::from_tensors_with(config, arch, tensors)
    }

    /// As [`LlamaModel::from_tensors`], for any family: the tensors are named as in GGUF
    /// files and stored as the decoder multiplies them (Gemma norms as `1 + w`).
    ///
    /// # Errors
    /// [`LmError::Format`] for missing tensors or wrong shapes.
    pub fn from_tensors_with(
        config: LlamaConfig,
        arch: ArchOptions,
        tensors: HashMap<String, Tensor>,
    ) -> LmResult<Self> {
        struct Map(HashMap<String, Tensor>);
        impl WeightSource for Map {
            fn dense(&mut self, name: &str) -> LmResult<Option<Tensor>> {
                Ok(match self.0.get(name) {
                    Some(t) => Some(t.to_dtype(DType::F32)?),
                    None => None,
                })
            }
            fn has(&mut self, name: &str) -> bool {
                self.0.contains_key(name)
            }
        }
        Self::build(config, arch, &mut Map(tensors))
    }

    /// Load a GGUF file.
    ///
    /// # Errors
    /// [`LmError::ModelNotFound`], [`LmError::CorruptModel`] (truncated or invalid file),
    /// [`LmError::UnsupportedArchitecture`], [`LmError::Format`].
    pub fn from_gguf(path: &Path, opts: &LoadOptions) -> LmResult<Self> {
        let mut gguf = GgufFile::open(path)?;
        Self::from_gguf_file(&mut gguf, opts)
    }

    /// Load the model from an opened GGUF file (see [`GgufFile`]).
    ///
    /// # Errors
    /// As [`LlamaModel::from_gguf`].
    pub fn from_gguf_file(gguf: &mut GgufFile, opts: &LoadOptions) -> LmResult<Self> {
        let mut config = gguf_config(&gguf.content)?;
        config.max_seq_len = config.max_seq_len.min(limits::MAX_CONTEXT);
        config.validate()?;
        let arch = gguf_arch(gguf, &config)?;
        if let Some(m) = opts.max_seq_len {
            config.max_seq_len = config.max_seq_len.min(m.max(1));
        }
        config.tie_embeddings = !gguf.content.tensor_infos.contains_key("output.weight");
        struct Src<'a> {
            g: &'a mut GgufFile,
            quantized: bool,
        }
        impl WeightSource for Src<'_> {
            fn dense(&mut self, name: &str) -> LmResult<Option<Tensor>> {
                match self.g.qtensor(name)? {
                    Some(q) => Ok(Some(q.dequantize(&Device::Cpu)?)),
                    None => Ok(None),
                }
            }
            fn has(&mut self, name: &str) -> bool {
                self.g.content.tensor_infos.contains_key(name)
            }
            fn linear(&mut self, name: &str) -> LmResult<Option<Linear>> {
                let Some(q) = self.g.qtensor(name)? else {
                    return Ok(None);
                };
                let float = matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
                if self.quantized && !float {
                    Ok(Some(Linear::Quant(QMatMul::QTensor(Arc::new(q)))))
                } else {
                    Ok(Some(Linear::dense(q.dequantize(&Device::Cpu)?)?))
                }
            }
        }
        let quantized = opts.weights == WeightFormat::Quantized;
        Self::build(config, arch, &mut Src { g: gguf, quantized })
    }

    /// Load a Hugging Face checkpoint directory (`config.json` and one or more
    /// `*.safetensors` files). Weights are converted to f32.
    ///
    /// # Errors
    /// [`LmError::ModelNotFound`], [`LmError::Io`], [`LmError::CorruptModel`],
    /// [`LmError::UnsupportedArchitecture`], [`LmError::Format`].
    pub fn from_safetensors(dir: &Path, opts: &LoadOptions) -> LmResult<Self> {
        let (mut config, arch) = hf_config_full(dir)?;
        config.max_seq_len = config.max_seq_len.min(limits::MAX_CONTEXT);
        if let Some(m) = opts.max_seq_len {
            config.max_seq_len = config.max_seq_len.min(m.max(1));
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| LmError::Io {
                path: dir.to_path_buf(),
                source: e,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(LmError::ModelNotFound {
                path: dir.join("model.safetensors"),
            });
        }
        let mut tensors = HashMap::new();
        for f in &files {
            let t = candle_core::safetensors::load(f, &Device::Cpu).map_err(|e| {
                LmError::CorruptModel {
                    path: f.clone(),
                    reason: e.to_string(),
                }
            })?;
            tensors.extend(t);
        }
        if !tensors.contains_key("lm_head.weight") {
            config.tie_embeddings = true;
        }
        struct Hf {
            tensors: HashMap<String, Tensor>,
            model_type: ModelType,
        }
        impl WeightSource for Hf {
            fn dense(&mut self, name: &str) -> LmResult<Option<Tensor>> {
                let hf = hf_name_for(self.model_type, name);
                let Some(t) = self.tensors.get(&hf) else {
                    return Ok(None);
                };
                let t = t.to_dtype(DType::F32)?;
                // Gemma checkpoints store w of the (1 + w) norm factor; the decoder
                // multiplies by the factor (as GGUF stores it), computed here once in f32
                // as transformers does.
                if self.model_type.is_gemma() && name.ends_with("norm.weight") {
                    return Ok(Some((t + 1.0)?));
                }
                Ok(Some(t))
            }
            fn has(&mut self, name: &str) -> bool {
                self.tensors
                    .contains_key(&hf_name_for(self.model_type, name))
            }
        }
        let model_type = arch.model_type;
        Self::build(
            config,
            arch,
            &mut Hf {
                tensors,
                model_type,
            },
        )
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The model's family options.
    pub fn arch(&self) -> &ArchOptions {
        &self.arch
    }

    /// A cache for this model holding `capacity_tokens` tokens in blocks of `block_size`.
    ///
    /// # Errors
    /// [`LmError::InvalidConfig`] for a zero size.
    pub fn new_cache(&self, block_size: usize, capacity_tokens: usize) -> LmResult<PagedKvCache> {
        self.new_cache_with(block_size, capacity_tokens, AttentionPath::Cpu)
    }

    /// A cache for this model read by the given attention path
    /// ([`AttentionPath::Gather`] keeps its pool as tensors on the model's device).
    ///
    /// # Errors
    /// [`LmError::InvalidConfig`] for a zero size; [`LmError::Candle`] when the pool cannot
    /// be allocated.
    pub fn new_cache_with(
        &self,
        block_size: usize,
        capacity_tokens: usize,
        path: AttentionPath,
    ) -> LmResult<PagedKvCache> {
        if block_size == 0 {
            return Err(LmError::InvalidConfig("block size must be positive".into()));
        }
        let blocks = capacity_tokens.div_ceil(block_size);
        PagedKvCache::with_path(
            self.config.cache_layout(block_size, blocks),
            path,
            self.embed.device(),
        )
    }

    fn check_tokens(&self, tokens: &[u32]) -> LmResult<()> {
        let v = self.config.vocab_size;
        match tokens.iter().find(|&&t| t as usize >= v) {
            Some(&token) => Err(LmError::TokenOutOfRange {
                token,
                vocab_size: v,
            }),
            None => Ok(()),
        }
    }

    /// Append tokens to several cached sequences in one batched pass and return logits.
    ///
    /// All new tokens of all entries are processed together; entry `i`'s tokens take
    /// positions `len_i, len_i + 1, ...` where `len_i` is its current cache length, and each
    /// attends causally to its own sequence only. Returns a `[rows, vocab]` f32 tensor, rows as
    /// selected by `rows`.
    ///
    /// On error the cache is left as before the call.
    ///
    /// # Errors
    /// [`LmError::NoTokens`], [`LmError::TokenOutOfRange`], [`LmError::ContextOverflow`],
    /// [`LmError::UnknownSequence`], [`LmError::CacheExhausted`], [`LmError::Candle`].
    pub fn forward(
        &self,
        batch: &[SeqTokens<'_>],
        cache: &mut PagedKvCache,
        rows: LogitRows,
    ) -> LmResult<Tensor> {
        let layout = cache.layout();
        let c = &self.config;
        if layout.n_layers != c.n_layers
            || layout.n_kv_heads != c.n_kv_heads
            || layout.head_dim != c.head_dim
        {
            return Err(LmError::InvalidConfig(
                "the cache was built for another model".into(),
            ));
        }
        let mut appends = Vec::with_capacity(batch.len());
        for e in batch {
            if e.tokens.is_empty() {
                return Err(LmError::NoTokens(e.seq.0));
            }
            self.check_tokens(e.tokens)?;
            let len = cache
                .seq_len(e.seq)
                .ok_or(LmError::UnknownSequence(e.seq.0))?;
            if len + e.tokens.len() > c.max_seq_len {
                return Err(LmError::ContextOverflow {
                    len: len + e.tokens.len(),
                    max: c.max_seq_len,
                });
            }
            appends.push((e.seq, e.tokens.len()));
        }
        let starts = cache.reserve(&appends)?;
        let result = self.forward_reserved(batch, &starts, cache, rows);
        if result.is_err() {
            for (e, &s) in batch.iter().zip(&starts) {
                let _ = cache.truncate(e.seq, s);
            }
        }
        result
    }

    fn forward_reserved(
        &self,
        batch: &[SeqTokens<'_>],
        starts: &[usize],
        cache: &mut PagedKvCache,
        rows: LogitRows,
    ) -> LmResult<Tensor> {
        let c = &self.config;
        let (nh, nkv, hd) = (c.n_heads, c.n_kv_heads, c.head_dim);
        let tables: Vec<Vec<u32>> = batch
            .iter()
            .map(|e| cache.block_table(e.seq).map(<[u32]>::to_vec))
            .collect::<Option<_>>()
            .ok_or_else(|| LmError::InvalidConfig("sequence vanished from the cache".into()))?;
        let mut ids = Vec::new();
        let mut meta: Vec<(usize, usize)> = Vec::new(); // (entry, position)
        for (i, e) in batch.iter().enumerate() {
            for (j, &t) in e.tokens.iter().enumerate() {
                ids.push(t);
                meta.push((i, starts[i] + j));
            }
        }
        let n_tok = ids.len();
        let queries: Vec<QueryMeta<'_>> = meta
            .iter()
            .map(|&(i, pos)| QueryMeta {
                blocks: &tables[i],
                pos,
            })
            .collect();
        let slots: Vec<u32> = match cache.attention_path() {
            AttentionPath::Cpu => Vec::new(),
            AttentionPath::Gather => {
                let mut slots = Vec::with_capacity(n_tok);
                for (i, e) in batch.iter().enumerate() {
                    slots.extend(cache.slots(&tables[i], starts[i]..starts[i] + e.tokens.len())?);
                }
                slots
            }
        };
        let half = hd / 2;
        let max_pos = meta.iter().map(|m| m.1).max().unwrap_or(0);
        let angles: Vec<(Vec<f32>, Vec<f32>)> = self
            .ropes
            .iter()
            .map(|r| r.tables(meta.iter().map(|m| m.1), max_pos))
            .collect();
        let ids_t = Tensor::from_vec(ids, n_tok, &Device::Cpu)?;
        let mut x = self.embed_tokens(&ids_t)?;
        let mut attn = vec![0f32; n_tok * nh * hd];
        for (li, layer) in self.layers.iter().enumerate() {
            let (cos, sin) = &angles[layer.rope];
            let [q, k, v] = self.qkv(layer, &x, true)?;
            let mut q = q.flatten_all()?.to_vec1::<f32>()?;
            let mut k = k.flatten_all()?.to_vec1::<f32>()?;
            let v = v.flatten_all()?.to_vec1::<f32>()?;
            for t in 0..n_tok {
                let (c0, s0) = (
                    &cos[t * half..(t + 1) * half],
                    &sin[t * half..(t + 1) * half],
                );
                self.rope_row(&mut q[t * nh * hd..(t + 1) * nh * hd], c0, s0);
                self.rope_row(&mut k[t * nkv * hd..(t + 1) * nkv * hd], c0, s0);
            }
            let a = match cache.attention_path() {
                AttentionPath::Cpu => {
                    for (t, &(i, pos)) in meta.iter().enumerate() {
                        let kv = t * nkv * hd..(t + 1) * nkv * hd;
                        cache.write(li, &tables[i], pos, &k[kv.clone()], &v[kv])?;
                    }
                    cache.attend(li, &q, &queries, nh, layer.scores, &mut attn)?;
                    Tensor::from_slice(&attn, (n_tok, nh * hd), &Device::Cpu)?
                }
                AttentionPath::Gather => {
                    let dev = cache.device();
                    let kt = Tensor::from_vec(k, (n_tok, nkv * hd), &dev)?;
                    let vt = Tensor::from_vec(v, (n_tok, nkv * hd), &dev)?;
                    let qt = Tensor::from_vec(q, (n_tok, nh * hd), &dev)?;
                    cache.write_rows(li, &slots, &kt, &vt)?;
                    cache
                        .attend_gather(li, &qt, &queries, nh, layer.scores)?
                        .to_device(x.device())?
                }
            };
            x = self.finish_block(layer, x, &a, true)?;
        }
        let x = match rows {
            LogitRows::All => x,
            LogitRows::Last => {
                let mut last = Vec::with_capacity(batch.len());
                let mut off = 0u32;
                for e in batch {
                    off += e.tokens.len() as u32;
                    last.push(off - 1);
                }
                let n = last.len();
                x.index_select(&Tensor::from_vec(last, n, &Device::Cpu)?, 0)?
            }
        };
        self.logits(&x)
    }

    /// Embedding rows of `ids` (Gemma: times `sqrt(hidden_size)`, rounded to f32 first as
    /// transformers does).
    fn embed_tokens(&self, ids: &Tensor) -> LmResult<Tensor> {
        let x = self.embed.index_select(ids, 0)?;
        if self.arch.scale_embeddings {
            let s = (self.config.hidden_size as f32).sqrt();
            return Ok((x * f64::from(s))?);
        }
        Ok(x)
    }

    /// Queries, keys and values of one block (`[tokens, heads * head_dim]` each, before
    /// RoPE): input norm, projections (one fused product when `fused`), biases and per-head
    /// query/key norms.
    fn qkv(&self, layer: &Layer, x: &Tensor, fused: bool) -> LmResult<[Tensor; 3]> {
        let c = &self.config;
        let eps = c.rms_eps as f32;
        let h = candle_nn::ops::rms_norm(x, &layer.attn_norm, eps)?;
        let out = if fused {
            layer.qkv.forward(&h)?
        } else {
            layer
                .qkv
                .parts()?
                .iter()
                .map(|l| l.forward(&h))
                .collect::<candle_core::Result<Vec<_>>>()?
        };
        let [mut q, mut k, mut v]: [Tensor; 3] = out
            .try_into()
            .map_err(|_| LmError::Format("query/key/value projection".into()))?;
        if let Some([bq, bk, bv]) = &layer.qkv_bias {
            q = q.broadcast_add(bq)?;
            k = k.broadcast_add(bk)?;
            v = v.broadcast_add(bv)?;
        }
        if let Some([nq, nk]) = &layer.qk_norm {
            // RMSNorm over each head's `head_dim` values.
            let per_head = |t: &Tensor, w: &Tensor| -> LmResult<Tensor> {
                let (n, width) = t.dims2()?;
                let hd = c.head_dim;
                let flat = t.contiguous()?.reshape((n * width / hd, hd))?;
                Ok(candle_nn::ops::rms_norm(&flat, w, eps)?.reshape((n, width))?)
            };
            q = per_head(&q, nq)?;
            k = per_head(&k, nk)?;
        }
        Ok([q, k, v])
    }

    /// The rest of a block after attention: output projection, (Gemma) post-attention norm,
    /// residual; pre-feed-forward norm, gated feed-forward layer, (Gemma) post-feed-forward
    /// norm, residual.
    fn finish_block(&self, layer: &Layer, x: Tensor, a: &Tensor, fused: bool) -> LmResult<Tensor> {
        let eps = self.config.rms_eps as f32;
        let mut o = layer.wo.forward(a)?;
        if let Some(w) = &layer.post_attn_norm {
            o = candle_nn::ops::rms_norm(&o, w, eps)?;
        }
        let x = (x + o)?;
        let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, eps)?;
        let gu = if fused {
            layer.gate_up.forward(&h)?
        } else {
            layer
                .gate_up
                .parts()?
                .iter()
                .map(|l| l.forward(&h))
                .collect::<candle_core::Result<Vec<_>>>()?
        };
        let (Some(g), Some(u)) = (gu.first(), gu.get(1)) else {
            return Err(LmError::Format("gate/up projection".into()));
        };
        let g = match self.arch.activation {
            Activation::Silu => g.silu()?,
            // candle's `gelu` is the tanh approximation (`gelu_pytorch_tanh`).
            Activation::GeluTanh => g.gelu()?,
        };
        let mut m = layer.w_down.forward(&(g * u)?)?;
        if let Some(w) = &layer.post_ffw_norm {
            m = candle_nn::ops::rms_norm(&m, w, eps)?;
        }
        Ok((x + m)?)
    }

    /// Final norm, output layer and (Gemma 2) final soft-cap.
    fn logits(&self, x: &Tensor) -> LmResult<Tensor> {
        let x = candle_nn::ops::rms_norm(x, &self.norm, self.config.rms_eps as f32)?;
        let logits = self.lm_head.forward(&x)?.to_dtype(DType::F32)?;
        Ok(match self.arch.final_softcap {
            Some(cap) => ((logits / cap)?.tanh()? * cap)?,
            None => logits,
        })
    }

    /// Rotate every head of one token's query or key row in place (`cos`, `sin`: the
    /// token's angles from `Rope::tables`).
    fn rope_row(&self, row: &mut [f32], cos: &[f32], sin: &[f32]) {
        let hd = self.config.head_dim;
        let half = hd / 2;
        for head in row.chunks_exact_mut(hd) {
            match self.config.rope_style {
                RopeStyle::Interleaved => {
                    for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                        let (x0, x1) = (pair[0], pair[1]);
                        pair[0] = x0 * cos[i] - x1 * sin[i];
                        pair[1] = x0 * sin[i] + x1 * cos[i];
                    }
                }
                RopeStyle::Half => {
                    let (a, b) = head.split_at_mut(half);
                    for i in 0..half {
                        let (x0, x1) = (a[i], b[i]);
                        a[i] = x0 * cos[i] - x1 * sin[i];
                        b[i] = x0 * sin[i] + x1 * cos[i];
                    }
                }
            }
        }
    }

    /// Reference forward pass without any cache: logits `[tokens.len(), vocab]` for one
    /// sequence starting at position 0, computed with plain candle tensor operations
    /// (masked softmax attention, candle's rotary kernels). Quadratic in the length; meant for
    /// tests.
    ///
    /// # Errors
    /// [`LmError::EmptyPrompt`], [`LmError::TokenOutOfRange`], [`LmError::ContextOverflow`],
    /// [`LmError::Candle`].
    pub fn forward_full(&self, tokens: &[u32]) -> LmResult<Tensor> {
        let c = &self.config;
        if tokens.is_empty() {
            return Err(LmError::EmptyPrompt);
        }
        self.check_tokens(tokens)?;
        let n = tokens.len();
        if n > c.max_seq_len {
            return Err(LmError::ContextOverflow {
                len: n,
                max: c.max_seq_len,
            });
        }
        let (nh, nkv, hd) = (c.n_heads, c.n_kv_heads, c.head_dim);
        let half = hd / 2;
        let dev = Device::Cpu;
        let ropes = self
            .ropes
            .iter()
            .map(|r| {
                let (cos, sin) = r.tables(0..n, n - 1);
                Ok((
                    Tensor::from_vec(cos, (n, half), &dev)?,
                    Tensor::from_vec(sin, (n, half), &dev)?,
                ))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let rope = |t: &Tensor, r: usize| {
            let (cos, sin) = &ropes[r];
            match c.rope_style {
                RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(t, cos, sin),
                RopeStyle::Half => candle_nn::rotary_emb::rope(t, cos, sin),
            }
        };
        // Causal mask, restricted to the last `window` keys when the layer slides.
        let mask = |window: Option<usize>| {
            let w = window.unwrap_or(usize::MAX);
            let m: Vec<f32> = (0..n * n)
                .map(|i| {
                    let (q, k) = (i / n, i % n);
                    if k > q || q - k >= w {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
                .collect();
            Tensor::from_vec(m, (1, n, n), &dev)
        };
        // Key/value head of each query head (the reference materialises repeated heads).
        let kv_index: Vec<u32> = (0..nh).map(|h| (h / (nh / nkv)) as u32).collect();
        let kv_index = Tensor::from_vec(kv_index, nh, &dev)?;
        let ids = Tensor::from_slice(tokens, n, &dev)?;
        let mut x = self.embed_tokens(&ids)?;
        for layer in &self.layers {
            let heads = |t: Tensor, k: usize| -> candle_core::Result<Tensor> {
                t.reshape((1, n, k, hd))?.transpose(1, 2)?.contiguous()
            };
            let [q, k, v] = self.qkv(layer, &x, false)?;
            let q = rope(&heads(q, nh)?, layer.rope)?;
            let k = rope(&heads(k, nkv)?, layer.rope)?;
            let v = heads(v, nkv)?;
            let k = k.squeeze(0)?.index_select(&kv_index, 0)?;
            let v = v.squeeze(0)?.index_select(&kv_index, 0)?;
            let q = q.squeeze(0)?;
            let sc = layer.scores;
            let mut scores = (q.matmul(&k.t()?)? * f64::from(sc.scale))?;
            if let Some(cap) = sc.softcap {
                scores = ((scores / f64::from(cap))?.tanh()? * f64::from(cap))?;
            }
            let p = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask(sc.window)?)?)?;
            let a = p.matmul(&v)?.transpose(0, 1)?.reshape((n, nh * hd))?;
            x = self.finish_block(layer, x, &a, false)?;
        }
        Ok(self.logits(&x)?.contiguous()?)
    }
}

/// An opened GGUF file: parsed header and metadata, plus the reader for tensor data.
pub struct GgufFile {
    path: PathBuf,
    file: File,
    /// The parsed header (metadata and tensor directory).
    pub content: gguf_file::Content,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.content.tensor_infos.len())
            .finish()
    }
}

impl GgufFile {
    /// Open and parse a GGUF file's header.
    ///
    /// # Errors
    /// [`LmError::ModelNotFound`], [`LmError::Io`], [`LmError::CorruptModel`].
    pub fn open(path: &Path) -> LmResult<Self> {
        if !path.exists() {
            return Err(LmError::ModelNotFound {
                path: path.to_path_buf(),
            });
        }
        if !path.is_file() {
            // A device such as /dev/zero would be read without end.
            return Err(LmError::CorruptModel {
                path: path.to_path_buf(),
                reason: "not a regular file".into(),
            });
        }
        let mut file = File::open(path).map_err(|e| LmError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        // candle's reader checks lengths against the file size; a panic on a header it did
        // not anticipate (a zero alignment, say) still becomes a typed error.
        let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            gguf_file::Content::read(&mut file)
        }));
        let corrupt = |reason: String| LmError::CorruptModel {
            path: path.to_path_buf(),
            reason,
        };
        let content = match read {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(corrupt(e.to_string())),
            Err(_) => return Err(corrupt("the GGUF header is malformed".into())),
        };
        // Every tensor must lie inside the file (a truncated download fails here, not later).
        let size = file
            .metadata()
            .map_err(|e| LmError::Io {
                path: path.to_path_buf(),
                source: e,
            })?
            .len();
        for (name, info) in &content.tensor_infos {
            // Checked arithmetic: dimensions and offsets come straight from the file.
            let elems = info
                .shape
                .dims()
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
            let block = info.ggml_dtype.block_size().max(1) as u64;
            let end = elems
                .and_then(|e| (e / block).checked_mul(info.ggml_dtype.type_size() as u64))
                .and_then(|b| b.checked_add(content.tensor_data_offset))
                .and_then(|b| b.checked_add(info.offset));
            let Some(end) = end else {
                return Err(corrupt(format!("tensor `{name}` has an impossible size")));
            };
            if end > size {
                return Err(LmError::CorruptModel {
                    path: path.to_path_buf(),
                    reason: format!(
                        "tensor `{name}` ends at byte {end} but the file has {size} bytes (truncated download? delete it and rerun scripts/fetch-model.sh)"
                    ),
                });
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            content,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Read a tensor (`None` when the file has no tensor of that name).
    fn qtensor(&mut self, name: &str) -> LmResult<Option<QTensor>> {
        if !self.content.tensor_infos.contains_key(name) {
            return Ok(None);
        }
        self.file.rewind().map_err(|e| LmError::Io {
            path: self.path.clone(),
            source: e,
        })?;
        let t = self
            .content
            .tensor(&mut self.file, name, &Device::Cpu)
            .map_err(|e| LmError::CorruptModel {
                path: self.path.clone(),
                reason: format!("tensor `{name}`: {e}"),
            })?;
        Ok(Some(t))
    }

    /// A metadata value.
    pub fn meta(&self, key: &str) -> Option<&gguf_file::Value> {
        self.content.metadata.get(key)
    }

    /// A string metadata value.
    pub fn meta_str(&self, key: &str) -> Option<&str> {
        self.meta(key)
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
    }
}

fn md_usize(ct: &gguf_file::Content, key: &str) -> LmResult<usize> {
    let v = ct
        .metadata
        .get(key)
        .ok_or_else(|| LmError::Format(format!("missing metadata `{key}`")))?;
    let n = v
        .to_u64()
        .or_else(|_| v.to_u32().map(u64::from))
        .or_else(|_| v.to_i32().map(|x| x.max(0) as u64))
        .or_else(|_| v.to_i64().map(|x| x.max(0) as u64))
        .map_err(|e| LmError::Format(format!("metadata `{key}`: {e}")))?;
    usize::try_from(n).map_err(|_| LmError::Format(format!("metadata `{key}` too large")))
}

fn md_f64(ct: &gguf_file::Content, key: &str) -> Option<f64> {
    let v = ct.metadata.get(key)?;
    v.to_f32().map(f64::from).or_else(|_| v.to_f64()).ok()
}

/// GGUF architectures and their families. `llama` and `mistral` files have their query and
/// key rows permuted for interleaved RoPE; the others keep Hugging Face's rotate-half layout.
const GGUF_ARCHS: &[(&str, ModelType)] = &[
    ("llama", ModelType::Llama),
    ("mistral", ModelType::Mistral),
    ("qwen2", ModelType::Qwen2),
    ("qwen3", ModelType::Qwen3),
    ("gemma2", ModelType::Gemma2),
    ("gemma3", ModelType::Gemma3),
    ("phi3", ModelType::Phi3),
];

fn gguf_arch_name(ct: &gguf_file::Content) -> LmResult<(String, ModelType)> {
    let arch = ct
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .ok_or_else(|| LmError::Format("missing metadata `general.architecture`".into()))?
        .clone();
    match GGUF_ARCHS.iter().find(|(name, _)| *name == arch) {
        Some(&(_, mt)) => Ok((arch, mt)),
        None => Err(LmError::UnsupportedArchitecture(arch)),
    }
}

pub(crate) fn gguf_config(ct: &gguf_file::Content) -> LmResult<LlamaConfig> {
    let (arch, mt) = gguf_arch_name(ct)?;
    let p = |k: &str| format!("{arch}.{k}");
    let hidden = md_usize(ct, &p("embedding_length"))?;
    let n_heads = md_usize(ct, &p("attention.head_count"))?;
    let n_kv_heads = md_usize(ct, &p("attention.head_count_kv")).unwrap_or(n_heads);
    let head_dim = md_usize(ct, &p("attention.key_length"))
        .or_else(|_| md_usize(ct, &p("rope.dimension_count")))
        .unwrap_or(hidden.checked_div(n_heads).unwrap_or(0));
    if let Ok(rd) = md_usize(ct, &p("rope.dimension_count")) {
        if rd != head_dim {
            return Err(LmError::Format(format!(
                "partial rotary embeddings (rope dimension {rd} != head dimension {head_dim}) are not supported"
            )));
        }
    }
    let embd = ct
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| LmError::Format("missing tensor `token_embd.weight`".into()))?;
    let vocab_size = embd.shape.dims().first().copied().unwrap_or(0);
    if let Ok(declared) = md_usize(ct, &p("vocab_size")) {
        if declared != vocab_size {
            return Err(LmError::Format(format!(
                "metadata `{arch}.vocab_size` is {declared} but `token_embd.weight` has {vocab_size} rows"
            )));
        }
    }
    Ok(LlamaConfig {
        vocab_size,
        hidden_size: hidden,
        intermediate_size: md_usize(ct, &p("feed_forward_length"))?,
        n_layers: md_usize(ct, &p("block_count"))?,
        n_heads,
        n_kv_heads,
        head_dim,
        rope_theta: md_f64(ct, &p("rope.freq_base")).unwrap_or(10_000.0),
        rope_style: match mt {
            ModelType::Llama | ModelType::Mistral => RopeStyle::Interleaved,
            _ => RopeStyle::Half,
        },
        rms_eps: md_f64(ct, &p("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
        max_seq_len: md_usize(ct, &p("context_length")).unwrap_or(4096),
        tie_embeddings: !ct.tensor_infos.contains_key("output.weight"),
    })
}

/// Family options of a GGUF file, from llama.cpp's metadata keys and tensors (see
/// `tests/fixtures/families/README.md`): `rope_freqs.weight` (Llama 3 RoPE scaling),
/// `rope_factors_{long,short}.weight` (Phi-3 LongRoPE), `<arch>.attention.sliding_window`,
/// Gemma's soft-caps and scale, Gemma 3's `rope.freq_base_swa`. Where a key llama.cpp does not
/// write is absent, llama.cpp's own rule applies.
pub(crate) fn gguf_arch(g: &mut GgufFile, c: &LlamaConfig) -> LmResult<ArchOptions> {
    let (arch, mt) = gguf_arch_name(&g.content)?;
    let ct = &g.content;
    let p = |k: &str| format!("{arch}.{k}");
    let mut a = ArchOptions::llama(c);
    a.model_type = mt;
    let window = md_usize(ct, &p("attention.sliding_window"))
        .ok()
        .filter(|&w| w > 0);
    match mt {
        ModelType::Llama | ModelType::Mistral | ModelType::Phi3 => {
            if window.is_some() {
                a.sliding_window = window;
                a.layers = vec![LayerKind::Sliding; c.n_layers];
            }
        }
        ModelType::Qwen2 | ModelType::Qwen3 => {}
        ModelType::Gemma2 | ModelType::Gemma3 => {
            // Norms are stored as 1 + w already: nothing to add.
            a.scale_embeddings = true;
            a.post_norms = true;
            a.activation = Activation::GeluTanh;
            a.attn_scale = match md_f64(ct, &p("attention.scale")) {
                Some(s) if s > 0.0 => s,
                // llama.cpp: gemma-2-27b (46 layers) scales by (hidden/heads)^-1/2.
                _ if mt == ModelType::Gemma2 && c.n_layers == 46 => {
                    1.0 / ((c.hidden_size / c.n_heads) as f64).sqrt()
                }
                _ => 1.0 / (c.head_dim as f64).sqrt(),
            };
            if mt == ModelType::Gemma2 {
                a.attn_softcap = md_f64(ct, &p("attn_logit_softcapping")).filter(|&x| x > 0.0);
                a.final_softcap = md_f64(ct, &p("final_logit_softcapping")).filter(|&x| x > 0.0);
            }
            a.sliding_window = window;
            if window.is_some() {
                // Gemma 2: even layers slide; Gemma 3: all but every sixth (llama.cpp's
                // fixed pattern; the GGUF does not record it).
                a.layers = (0..c.n_layers)
                    .map(|i| {
                        let sliding = match mt {
                            ModelType::Gemma2 => i % 2 == 0,
                            _ => (i + 1) % 6 != 0,
                        };
                        if sliding {
                            LayerKind::Sliding
                        } else {
                            LayerKind::Global
                        }
                    })
                    .collect();
            }
            if mt == ModelType::Gemma3 {
                a.rope_local_theta = Some(md_f64(ct, &p("rope.freq_base_swa")).unwrap_or(10_000.0));
            }
        }
    }
    let has = |name: &str| g.content.tensor_infos.contains_key(name);
    a.qkv_bias = has("blk.0.attn_q.bias");
    a.qk_norm = has("blk.0.attn_q_norm.weight");
    let half = c.head_dim / 2;
    let mut factors = |name: &str| -> LmResult<Option<Vec<f64>>> {
        let Some(t) = g.qtensor(name)? else {
            return Ok(None);
        };
        let v = t
            .dequantize(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        if v.len() != half || v.iter().any(|&x| !(x > 0.0 && x.is_finite())) {
            return Err(LmError::Format(format!(
                "tensor `{name}` needs {half} positive factors"
            )));
        }
        Ok(Some(v.into_iter().map(f64::from).collect()))
    };
    let freqs = factors("rope_freqs.weight")?;
    let long = factors("rope_factors_long.weight")?;
    let short = factors("rope_factors_short.weight")?;
    a.rope_scaling = match (freqs, long, short) {
        (Some(f), None, None) => RopeScaling::Factors(f),
        (None, Some(long_factor), Some(short_factor)) => {
            let ct = &g.content;
            let original = md_usize(ct, &p("rope.scaling.original_context_length"))?;
            if original == 0 {
                return Err(LmError::Format(
                    "rope.scaling.original_context_length is 0".into(),
                ));
            }
            let attention_factor = match md_f64(ct, &p("rope.scaling.attn_factor")) {
                Some(f) => f,
                None => {
                    let scale = c.max_seq_len as f64 / original as f64;
                    if scale <= 1.0 {
                        1.0
                    } else {
                        (1.0 + scale.ln() / (original as f64).ln()).sqrt()
                    }
                }
            };
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings: original,
                attention_factor,
            }
        }
        (None, None, None) => RopeScaling::None,
        _ => {
            return Err(LmError::UnsupportedOption {
                model_type: arch.clone(),
                option: "this combination of rope_freqs / rope_factors tensors".into(),
            })
        }
    };
    Ok(a)
}

/// Translate a GGUF tensor name (`blk.3.attn_q.weight`) into the Hugging Face llama name
/// (`model.layers.3.self_attn.q_proj.weight`).
pub fn hf_name(gguf: &str) -> String {
    match gguf {
        "token_embd.weight" => return "model.embed_tokens.weight".into(),
        "output_norm.weight" => return "model.norm.weight".into(),
        "output.weight" => return "lm_head.weight".into(),
        _ => {}
    }
    let Some(rest) = gguf.strip_prefix("blk.") else {
        return gguf.into();
    };
    let Some((i, part)) = rest.split_once('.') else {
        return gguf.into();
    };
    let hf = match part {
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        other => other,
    };
    format!("model.layers.{i}.{hf}")
}

/// [`hf_name`] for a family: Gemma's four norms per block, Phi-3's fused projections and
/// Qwen's biases and query/key norms.
pub fn hf_name_for(model_type: ModelType, gguf: &str) -> String {
    let Some((i, part)) = gguf
        .strip_prefix("blk.")
        .and_then(|rest| rest.split_once('.'))
    else {
        return hf_name(gguf);
    };
    let gemma = model_type.is_gemma();
    let hf = match part {
        "attn_q.bias" => "self_attn.q_proj.bias",
        "attn_k.bias" => "self_attn.k_proj.bias",
        "attn_v.bias" => "self_attn.v_proj.bias",
        "attn_qkv.weight" => "self_attn.qkv_proj.weight",
        "attn_q_norm.weight" => "self_attn.q_norm.weight",
        "attn_k_norm.weight" => "self_attn.k_norm.weight",
        "post_attention_norm.weight" if gemma => "post_attention_layernorm.weight",
        "ffn_norm.weight" if gemma => "pre_feedforward_layernorm.weight",
        "post_ffw_norm.weight" if gemma => "post_feedforward_layernorm.weight",
        "ffn_up.weight" if model_type == ModelType::Phi3 => "mlp.gate_up_proj.weight",
        _ => return hf_name(gguf),
    };
    format!("model.layers.{i}.{hf}")
}

pub(crate) fn hf_config(dir: &Path) -> LmResult<LlamaConfig> {
    hf_config_full(dir).map(|(c, _)| c)
}

/// Read a checkpoint directory's `config.json`: dimensions and family options
/// ([`parse_hf_config`]).
pub(crate) fn hf_config_full(dir: &Path) -> LmResult<(LlamaConfig, ArchOptions)> {
    let path = dir.join("config.json");
    if !path.is_file() {
        return Err(LmError::ModelNotFound { path });
    }
    let mut text = String::new();
    // A config is a few kilobytes; the bound keeps a wrong path (a device, a huge file) from
    // being read whole.
    File::open(&path)
        .and_then(|f| f.take(MAX_CONFIG_BYTES + 1).read_to_string(&mut text))
        .map_err(|e| LmError::Io {
            path: path.clone(),
            source: e,
        })?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(LmError::CorruptModel {
            path,
            reason: format!("larger than {MAX_CONFIG_BYTES} bytes"),
        });
    }
    // Malformed or inconsistent values are a problem of this file; unknown families and
    // options keep their own error types.
    parse_hf_config(&text).map_err(|e| match e {
        LmError::Format(reason) => LmError::CorruptModel { path, reason },
        other => other,
    })
}

/// The rows of a `[rows, vocab]` logits tensor as f32 vectors.
///
/// # Errors
/// [`LmError::Candle`] if the tensor is not 2-D.
pub fn logits_to_rows(logits: &Tensor) -> LmResult<Vec<Vec<f32>>> {
    Ok(logits.to_dtype(DType::F32)?.to_vec2::<f32>()?)
}

/// Largest absolute difference between two equally shaped tensors.
///
/// # Errors
/// [`LmError::Candle`] on shape mismatch.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> LmResult<f32> {
    Ok((a - b)?
        .abs()?
        .flatten_all()?
        .max(D::Minus1)?
        .to_scalar::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(style: RopeStyle, tie: bool) -> LlamaModel {
        let config = LlamaConfig {
            vocab_size: 50,
            hidden_size: 32,
            intermediate_size: 48,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
            rope_theta: 10_000.0,
            rope_style: style,
            rms_eps: 1e-5,
            max_seq_len: 128,
            tie_embeddings: tie,
        };
        LlamaModel::random(config, 7).unwrap()
    }

    #[test]
    fn cached_prefill_equals_full_recomputation() {
        for (style, tie) in [(RopeStyle::Interleaved, true), (RopeStyle::Half, false)] {
            let m = tiny(style, tie);
            let toks: Vec<u32> = (0..21).map(|i| (i * 7 % 50) as u32).collect();
            let full = m.forward_full(&toks).unwrap();
            let mut cache = m.new_cache(4, 64).unwrap();
            let s = cache.create();
            let got = m
                .forward(
                    &[SeqTokens {
                        seq: s,
                        tokens: &toks,
                    }],
                    &mut cache,
                    LogitRows::All,
                )
                .unwrap();
            let d = max_abs_diff(&full, &got).unwrap();
            assert!(d < 1e-4, "{style:?}: {d}");
            // Then token by token on a fork.
            let f = cache.fork(s).unwrap();
            let mut seq = toks.clone();
            for t in [3u32, 9, 41] {
                seq.push(t);
                let got = m
                    .forward(
                        &[SeqTokens {
                            seq: f,
                            tokens: &[t],
                        }],
                        &mut cache,
                        LogitRows::Last,
                    )
                    .unwrap();
                let full = m.forward_full(&seq).unwrap();
                let last = full.narrow(0, seq.len() - 1, 1).unwrap();
                let d = max_abs_diff(&last, &got).unwrap();
                assert!(d < 1e-4, "{style:?}: {d}");
            }
        }
    }
}
