//! GGUF files (llama.cpp's format): the header, tensor reads, and the model's dimensions and
//! family options from llama.cpp's metadata keys.

use std::fs::File;
use std::io::Seek;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, QTensor};
use candle_core::Device;

use super::config::{LlamaConfig, RopeStyle};
use super::error::{LmError, LmResult};
use super::family::{Activation, ArchOptions, LayerKind, ModelType, RopeScaling};

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
                        "tensor `{name}` ends at byte {end} but the file has {size} bytes (truncated download? delete it and download it again)"
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
    pub(crate) fn qtensor(&mut self, name: &str) -> LmResult<Option<QTensor>> {
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
