//! Loading weights: every source (GGUF file, Hugging Face safetensors, in-memory tensors,
//! random weights) is a [`WeightSource`]; [`LlamaModel::build`] checks shapes and assembles
//! the decoder from any of them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

use super::layers::{Embedding, Layer, Linear, Proj, Rope};
use super::LlamaModel;
use crate::lm::cache::ScoreOptions;
use crate::lm::checkpoint::{hf_config_full, hf_name_for};
use crate::lm::config::{limits, LlamaConfig};
use crate::lm::error::{LmError, LmResult};
use crate::lm::family::{ArchOptions, LayerKind, ModelType, RopeScaling};
use crate::lm::gguf::{gguf_arch, gguf_config, GgufFile};
use crate::lm::quant::{GgufBlocks, QFormat, QMatrix};

/// How weight matrices are stored and multiplied.
///
/// The block formats (`Q8_0`, `Q4_0`, `Q4_1`, `Native`) keep 32 weights per block with
/// their scale and multiply with integer dot products against activations quantized per
/// block of 32 to int8, f32 accumulation (llama.cpp's approach; kernels chosen at run time
/// from the CPU's features). A matrix stored in the file in the requested format is used as
/// stored (a `Q5_0` matrix counts as `Q8_0` and a `Q4_K` one as `Q4_1`: they decode exactly
/// into those blocks); any other is quantized at load. The embedding's rows are stored in the same
/// blocks (shared with a tied output layer) and decoded on lookup. See
/// `docs/benchmarks.md` for speed and the KL divergence of each format to f32.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum WeightFormat {
    /// Dequantize everything to f32 (default; fastest on CPU for batched decoding).
    #[default]
    F32,
    /// Keep GGUF's quantized matrices and use candle's quantized matmul (smaller, slower at
    /// large batches; greedy outputs may differ from f32 on near-ties). Ignored for
    /// safetensors checkpoints.
    Quantized,
    /// 8-bit blocks: `w = d · q`.
    Q8_0,
    /// 4-bit blocks: `w = d · (q − 8)`.
    Q4_0,
    /// 4-bit blocks with a minimum: `w = d · q + m`.
    Q4_1,
    /// As stored in the GGUF file: `Q8_0`, `Q4_0` and `Q4_1` matrices as they are, `Q5_0`
    /// as 8-bit and `Q4_K` as 4-bit blocks holding the same weights bit for bit, float
    /// matrices as f32, other block types (`Q5_1`, `Q5_K`, `Q6_K`, ...) requantized to
    /// `Q8_0`.
    Native,
    /// bfloat16 matrices and embedding (half of f32's memory and memory traffic; weights
    /// rounded to 8 significant bits), multiplied in f32 (each weight widened on the fly,
    /// f32 accumulation). On other devices than the CPU the weights are widened to f32.
    Bf16,
}

impl WeightFormat {
    /// The format's name as the command line spells it (`f32`, `candle-quantized`, `q8_0`,
    /// `q4_0`, `q4_1`, `native`, `bf16`).
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "f32",
            WeightFormat::Quantized => "candle-quantized",
            WeightFormat::Q8_0 => "q8_0",
            WeightFormat::Q4_0 => "q4_0",
            WeightFormat::Q4_1 => "q4_1",
            WeightFormat::Native => "native",
            WeightFormat::Bf16 => "bf16",
        }
    }

    /// Every format, in the order of [`WeightFormat::name`].
    pub const ALL: [WeightFormat; 7] = [
        WeightFormat::F32,
        WeightFormat::Quantized,
        WeightFormat::Q8_0,
        WeightFormat::Q4_0,
        WeightFormat::Q4_1,
        WeightFormat::Native,
        WeightFormat::Bf16,
    ];

    /// The format named `name` (see [`WeightFormat::name`]).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == name)
    }

    /// The block format every matrix is converted to, for the explicit block formats.
    fn block_format(self) -> Option<QFormat> {
        match self {
            WeightFormat::Q8_0 => Some(QFormat::Q8_0),
            WeightFormat::Q4_0 => Some(QFormat::Q4_0),
            WeightFormat::Q4_1 => Some(QFormat::Q4_1),
            _ => None,
        }
    }
}

/// A linear layer from `W: [out, in]`: in the block `format`, quantized straight from W's
/// f32 rows, or dense f32 without a format or when the width is not a multiple of 32.
fn linear_from(w: Tensor, format: Option<QFormat>) -> LmResult<Linear> {
    if let Some(f) = format {
        let (rows, cols) = w.dims2()?;
        let data = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if let Some(q) = QMatrix::quantize(f, &data, rows, cols) {
            return Ok(Linear::Int(Arc::new(q)));
        }
    }
    Ok(Linear::dense(w)?)
}

/// How a GGUF matrix of one type is held under one [`WeightFormat`]: the loader's decision,
/// also reported by [`GgufFile::weight_plan`] (so the report cannot disagree with the load).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// candle's quantized matmul on the stored blocks.
    Candle,
    /// The stored blocks, decoded exactly into ours.
    Exact(GgufBlocks),
    /// Dequantized, then quantized to a block format of ours.
    Requantize(QFormat),
    /// Dequantized to a dense matrix (f32, or bf16 for [`WeightFormat::Bf16`]).
    Dense,
}

impl Plan {
    fn of(weights: WeightFormat, dtype: GgmlDType) -> Self {
        let float = matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        let stored = match dtype {
            GgmlDType::Q8_0 => Some(GgufBlocks::Q8_0),
            GgmlDType::Q4_0 => Some(GgufBlocks::Q4_0),
            GgmlDType::Q4_1 => Some(GgufBlocks::Q4_1),
            GgmlDType::Q5_0 => Some(GgufBlocks::Q5_0),
            GgmlDType::Q4K => Some(GgufBlocks::Q4K),
            _ => None,
        };
        let wanted = match weights {
            WeightFormat::Quantized if !float => return Plan::Candle,
            WeightFormat::Native if float => None,
            // Block types without an exact decoding of ours (`Q5_1`, `Q5_K`, `Q6_K`, ...).
            WeightFormat::Native => Some(stored.map_or(QFormat::Q8_0, GgufBlocks::format)),
            other => other.block_format(),
        };
        match (wanted, stored) {
            // The file's blocks, decoded exactly, when they are held in the wanted format
            // (a `Q5_0` file for `q8_0`, `Q4_K` for `q4_1`: better than requantizing).
            (Some(f), Some(s)) if f == s.format() => Plan::Exact(s),
            (Some(f), _) => Plan::Requantize(f),
            (None, _) => Plan::Dense,
        }
    }

    /// In words, for reports.
    fn describe(self, weights: WeightFormat) -> &'static str {
        match self {
            Plan::Candle => "candle's quantized matmul on the stored blocks",
            Plan::Exact(GgufBlocks::Q5_0) => "8-bit blocks holding the stored weights exactly",
            Plan::Exact(GgufBlocks::Q4K) => "4-bit blocks holding the stored weights exactly",
            Plan::Exact(_) => "the stored blocks",
            Plan::Requantize(QFormat::Q8_0) => "requantized to q8_0",
            Plan::Requantize(QFormat::Q4_0) => "requantized to q4_0",
            Plan::Requantize(QFormat::Q4_1) => "requantized to q4_1",
            Plan::Dense if weights == WeightFormat::Bf16 => "dense bf16",
            Plan::Dense => "dense f32",
        }
    }
}

/// llama.cpp's name of a GGUF tensor type (`Q4_K`, `F16`, ...).
fn ggml_type_name(dtype: GgmlDType) -> &'static str {
    match dtype {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

impl GgufFile {
    /// The file's matrices (tensors of two or more dimensions) by stored type, with their
    /// count and how `weights` holds them, as [`LlamaModel::from_gguf`] loads them. (A
    /// matrix whose width does not fit its blocks is requantized, or held dense when the
    /// width is not a multiple of 32; no common file has one.)
    ///
    /// # Example
    /// ```no_run
    /// use smc_steer::lm::{GgufFile, WeightFormat};
    /// let gguf = GgufFile::open(std::path::Path::new("model.Q4_K_M.gguf"))?;
    /// for (ty, (count, held)) in gguf.weight_plan(WeightFormat::Native) {
    ///     println!("{count} {ty} matrices: {held}");
    /// }
    /// # Ok::<(), smc_steer::lm::LmError>(())
    /// ```
    pub fn weight_plan(
        &self,
        weights: WeightFormat,
    ) -> std::collections::BTreeMap<&'static str, (usize, &'static str)> {
        let mut plan = std::collections::BTreeMap::new();
        for info in self.content.tensor_infos.values() {
            if info.shape.rank() < 2 {
                continue;
            }
            let entry = plan
                .entry(ggml_type_name(info.ggml_dtype))
                .or_insert((0, Plan::of(weights, info.ggml_dtype).describe(weights)));
            entry.0 += 1;
        }
        plan
    }
}

/// A dense layer in the storage of `weights` (bf16 for [`WeightFormat::Bf16`]); other
/// layers as they are.
fn stored(l: Linear, weights: WeightFormat) -> LmResult<Linear> {
    Ok(match l {
        Linear::Dense(w) if weights == WeightFormat::Bf16 => {
            Linear::Dense(w.to_dtype(DType::BF16)?)
        }
        other => other,
    })
}

/// The text decoder's tensors under their text-only names. Multimodal checkpoints (Gemma 3
/// 4b+) hold the decoder as `language_model.model.*` (as released) or
/// `model.language_model.*` (as transformers ≥ 4.52 saves them) next to a vision tower and
/// projector, which are dropped; text-only checkpoints pass through unchanged.
fn text_decoder_tensors(tensors: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    let rename = |k: &str| -> Option<String> {
        if let Some(rest) = k
            .strip_prefix("language_model.model.")
            .or_else(|| k.strip_prefix("model.language_model."))
        {
            return Some(format!("model.{rest}"));
        }
        matches!(k, "language_model.lm_head.weight" | "lm_head.weight")
            .then(|| "lm_head.weight".to_string())
    };
    let wrapped = !tensors.contains_key("model.embed_tokens.weight")
        && tensors
            .keys()
            .any(|k| k.starts_with("language_model.") || k.starts_with("model.language_model."));
    if !wrapped {
        return tensors;
    }
    tensors
        .into_iter()
        .filter_map(|(k, v)| rename(&k).map(|k| (k, v)))
        .collect()
}

/// Options for loading a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Weight storage.
    pub weights: WeightFormat,
    /// Cap on the context window (default: the model's own).
    pub max_seq_len: Option<usize>,
    /// Where the weights live and the forward pass runs (default: the CPU). On other
    /// devices quantized matrices are dequantized to f32 (see [`LlamaModel::to_device`]).
    pub device: Device,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            weights: WeightFormat::default(),
            max_seq_len: None,
            device: Device::Cpu,
        }
    }
}

/// A source of named tensors (GGUF names: `blk.{i}.attn_q.weight`, ...).
pub(super) trait WeightSource {
    /// A tensor as f32, or `None` when absent.
    fn dense(&mut self, name: &str) -> LmResult<Option<Tensor>>;
    /// Whether the tensor exists.
    fn has(&mut self, name: &str) -> bool;
    /// A matrix for a linear layer in the block `format` (dense f32 for `None`), or `None`
    /// when absent.
    fn linear(&mut self, name: &str, format: Option<QFormat>) -> LmResult<Option<Linear>> {
        self.dense(name)?
            .map(|w| linear_from(w, format))
            .transpose()
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
        Linear::Dense(w) => w.dims().to_vec(),
        Linear::Quant(QMatMul::QTensor(q)) => q.shape().dims().to_vec(),
        Linear::Quant(QMatMul::Tensor(w) | QMatMul::TensorF16(w)) => w.dims().to_vec(),
        Linear::Int(q) => q.dims().to_vec(),
    }
}

impl LlamaModel {
    fn build(
        config: LlamaConfig,
        arch: ArchOptions,
        weights: WeightFormat,
        src: &mut dyn WeightSource,
    ) -> LmResult<Self> {
        let block = weights.block_format();
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
                let l = stored(require(src.linear(&name, block)?, &name)?, weights)?;
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
            stored(
                linear_from(w.narrow(0, from, n)?.contiguous()?, block)?,
                weights,
            )
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
            src.linear("output.weight", block)?
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
            None => match src.linear("token_embd.weight", block)? {
                Some(l) => l,
                None => linear_from(embed.clone(), block)?,
            },
        };
        // In a block format the embedding's rows are blocks too, decoded on lookup: a tied
        // output layer shares them; otherwise the file's own blocks (`native`) or the
        // embedding quantized to the requested format.
        let embed_blocks = match (&lm_head, c.tie_embeddings) {
            (Linear::Int(q), true) => Some(q.clone()),
            _ if weights == WeightFormat::Native => {
                match src.linear("token_embd.weight", block)? {
                    Some(Linear::Int(q)) => Some(q),
                    _ => None,
                }
            }
            _ if block.is_some() => match linear_from(embed.clone(), block)? {
                Linear::Int(q) => Some(q),
                _ => None,
            },
            _ => None,
        };
        let lm_head = stored(lm_head, weights)?;
        let embed = match (embed_blocks, &lm_head) {
            (Some(q), _) if q.dims() == [c.vocab_size, h] => Embedding::Blocks(q),
            // A dense tied output layer is `[vocab, hidden]` like the embedding: one matrix
            // serves both (looked up by rows, multiplied by the tiles).
            (_, Linear::Dense(w)) if c.tie_embeddings && w.dims() == [c.vocab_size, h] => {
                Embedding::Dense(w.clone())
            }
            _ if weights == WeightFormat::Bf16 => Embedding::Dense(embed.to_dtype(DType::BF16)?),
            _ => Embedding::Dense(embed),
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
        Self::build(config, arch, WeightFormat::F32, &mut Map(tensors))
    }

    /// Load a GGUF file.
    ///
    /// # Errors
    /// [`LmError::ModelNotFound`], [`LmError::CorruptModel`] (truncated or invalid file),
    /// [`LmError::UnsupportedArchitecture`], [`LmError::Format`]; [`LmError::InvalidConfig`]
    /// when `SMC_STEER_CPU_KERNELS` has a value other than `native`, `avx2`, `portable`.
    pub fn from_gguf(path: &Path, opts: &LoadOptions) -> LmResult<Self> {
        let mut gguf = GgufFile::open(path)?;
        Self::from_gguf_file(&mut gguf, opts)
    }

    /// Load the model from an opened GGUF file (see [`GgufFile`]).
    ///
    /// # Errors
    /// As [`LlamaModel::from_gguf`].
    pub fn from_gguf_file(gguf: &mut GgufFile, opts: &LoadOptions) -> LmResult<Self> {
        crate::lm::cpu::check_kernels_env()?;
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
            weights: WeightFormat,
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
            fn linear(&mut self, name: &str, _: Option<QFormat>) -> LmResult<Option<Linear>> {
                let Some(q) = self.g.qtensor(name)? else {
                    return Ok(None);
                };
                let plan = Plan::of(self.weights, q.dtype());
                if plan == Plan::Candle {
                    return Ok(Some(Linear::Quant(QMatMul::QTensor(Arc::new(q)))));
                }
                if let (Plan::Exact(s), &[rows, cols]) = (plan, q.shape().dims()) {
                    if let Some(m) = QMatrix::from_gguf(s, &q.data()?, rows, cols) {
                        return Ok(Some(Linear::Int(Arc::new(m))));
                    }
                }
                let w = q.dequantize(&Device::Cpu)?;
                Ok(Some(linear_from(
                    w,
                    match plan {
                        // Blocks that did not fit (a width not a multiple of 256 for
                        // `Q4_K`): requantized to the format they would be held in.
                        Plan::Exact(s) => Some(s.format()),
                        Plan::Requantize(f) => Some(f),
                        Plan::Candle | Plan::Dense => None,
                    },
                )?))
            }
        }
        let weights = opts.weights;
        let src = &mut Src { g: gguf, weights };
        Self::build(config, arch, weights, src)?.to_device(&opts.device)
    }

    /// Load a Hugging Face checkpoint directory (`config.json` and one or more
    /// `*.safetensors` files). Weights are converted to f32.
    ///
    /// # Errors
    /// [`LmError::ModelNotFound`], [`LmError::Io`], [`LmError::CorruptModel`],
    /// [`LmError::UnsupportedArchitecture`], [`LmError::Format`]; [`LmError::InvalidConfig`]
    /// for `SMC_STEER_CPU_KERNELS` as in [`LlamaModel::from_gguf`].
    pub fn from_safetensors(dir: &Path, opts: &LoadOptions) -> LmResult<Self> {
        crate::lm::cpu::check_kernels_env()?;
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
        let tensors = text_decoder_tensors(tensors);
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
            opts.weights,
            &mut Hf {
                tensors,
                model_type,
            },
        )?
        .to_device(&opts.device)
    }

    /// The same model with its weights on `device` (a copy; the weights are moved once).
    /// Quantized matrices become dense f32 on any device but the CPU, where candle's
    /// quantized products run.
    ///
    /// # Errors
    /// [`LmError::Candle`] when the device cannot hold the weights.
    pub fn to_device(self, device: &Device) -> LmResult<Self> {
        if device.same_device(self.device()) {
            return Ok(self);
        }
        self.convert(device, false)
    }

    /// The same model with every quantized matrix dequantized to dense f32 (the same
    /// weights, multiplied in f32): the reference against which the quantized products are
    /// tested.
    ///
    /// # Errors
    /// [`LmError::Candle`] when the dense matrices cannot be built.
    pub fn to_dense(self) -> LmResult<Self> {
        let device = self.device().clone();
        self.convert(&device, true)
    }

    fn convert(self, device: &Device, dense: bool) -> LmResult<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| l.to_device(device, dense))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            embed: self.embed.to_device(device, dense)?,
            layers,
            norm: self.norm.to_device(device)?,
            lm_head: self.lm_head.to_device(device, dense)?,
            ..self
        })
    }
}
