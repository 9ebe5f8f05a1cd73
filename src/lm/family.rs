//! Model families as data: what distinguishes Llama 3, Qwen2/2.5, Qwen3, Gemma 2/3, Phi-3
//! and Mistral from the plain llama decoder of [`super::model`].
//!
//! One decoder ([`super::LlamaModel`]) runs every family; a family is a [`ModelType`] plus an
//! [`ArchOptions`] value read from the checkpoint's own `config.json` ([`parse_hf_config`]) or
//! GGUF metadata. Every option the decoder does not implement is refused with
//! [`LmError::UnsupportedOption`] naming it, and an unknown `model_type` with
//! [`LmError::UnsupportedArchitecture`], so that a checkpoint is never run as a silently wrong
//! model.

use serde_json::{Map, Value};

use super::config::{limits, LlamaConfig, RopeStyle};
use super::error::{LmError, LmResult};

/// The `model_type`s (Hugging Face `config.json`) the decoder implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelType {
    /// `llama`: Llama 2/3.x, SmolLM/SmolLM2 and other llama-layout models.
    Llama,
    /// `mistral`: llama layout with a sliding window on every layer.
    Mistral,
    /// `qwen2`: biases on the query, key and value projections.
    Qwen2,
    /// `qwen3`: per-head RMSNorm of queries and keys, explicit `head_dim`.
    Qwen3,
    /// `gemma2`: GeGLU, (1 + w) norms, sandwich norms, soft-caps, alternating windows.
    Gemma2,
    /// `gemma3_text` (GGUF `gemma3`): Gemma 2 without soft-caps, with query/key norms, a local
    /// RoPE base for sliding layers and a sliding-window pattern.
    Gemma3,
    /// `phi3`: fused `qkv_proj` and `gate_up_proj`, sliding window, LongRoPE.
    Phi3,
}

impl ModelType {
    /// The `model_type` string of `config.json`.
    pub fn name(self) -> &'static str {
        match self {
            ModelType::Llama => "llama",
            ModelType::Mistral => "mistral",
            ModelType::Qwen2 => "qwen2",
            ModelType::Qwen3 => "qwen3",
            ModelType::Gemma2 => "gemma2",
            ModelType::Gemma3 => "gemma3_text",
            ModelType::Phi3 => "phi3",
        }
    }

    /// Parse a `model_type` (`None` when unknown).
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "llama" => ModelType::Llama,
            "mistral" => ModelType::Mistral,
            "qwen2" => ModelType::Qwen2,
            "qwen3" => ModelType::Qwen3,
            "gemma2" => ModelType::Gemma2,
            "gemma3_text" => ModelType::Gemma3,
            "phi3" => ModelType::Phi3,
            _ => return None,
        })
    }

    /// Whether this family is Gemma 2 or 3 (shared Gemma conventions).
    pub fn is_gemma(self) -> bool {
        matches!(self, ModelType::Gemma2 | ModelType::Gemma3)
    }
}

/// The feed-forward activation (applied to the gate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (SwiGLU): llama, Qwen, Phi-3, Mistral.
    Silu,
    /// GELU, tanh approximation (GeGLU, `gelu_pytorch_tanh`): Gemma.
    GeluTanh,
}

/// How RoPE frequencies are rescaled for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// No rescaling.
    None,
    /// `linear`: every frequency divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// `llama3`: low frequencies divided by `factor`, high ones kept, smoothed in between.
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f64,
        /// `low_freq_factor`.
        low_freq_factor: f64,
        /// `high_freq_factor`.
        high_freq_factor: f64,
        /// `original_max_position_embeddings`.
        original_max_position_embeddings: usize,
    },
    /// Precomputed per-frequency divisors (GGUF `rope_freqs.weight`, llama.cpp's encoding of
    /// `llama3` scaling).
    Factors(Vec<f64>),
    /// `longrope` (`su`): per-frequency divisors, `short_factor` while a forward call stays
    /// within `original_max_position_embeddings`, else `long_factor`; cos and sin scaled by
    /// `attention_factor`.
    LongRope {
        /// Divisors for short contexts.
        short_factor: Vec<f64>,
        /// Divisors for long contexts.
        long_factor: Vec<f64>,
        /// `original_max_position_embeddings`.
        original_max_position_embeddings: usize,
        /// Factor on cos and sin.
        attention_factor: f64,
    },
}

/// Whether a layer attends to the whole prefix or to a sliding window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// Whole prefix; RoPE with `rope_theta` and the model's [`RopeScaling`].
    Global,
    /// Sliding window of [`ArchOptions::sliding_window`] tokens; RoPE with
    /// [`ArchOptions::rope_local_theta`] when set (Gemma 3), else as global layers.
    Sliding,
}

/// Everything beyond [`LlamaConfig`]'s dimensions that a family changes (biases, query/key
/// norms, Gemma's extra norms, soft-caps and scaled embeddings, sliding windows, RoPE
/// scaling), read from `config.json` ([`parse_hf_config`]) or GGUF metadata. See
/// `docs/models.md`.
#[derive(Debug, Clone, PartialEq)]
pub struct ArchOptions {
    /// The family.
    pub model_type: ModelType,
    /// Biases on the query, key and value projections (Qwen2).
    pub qkv_bias: bool,
    /// Per-head RMSNorm of queries and keys before RoPE (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// Norm weights are stored as `w` of `(1 + w)` (Gemma checkpoints; GGUF stores `1 + w`).
    pub norm_plus_one: bool,
    /// Multiply embeddings by `sqrt(hidden_size)` (Gemma).
    pub scale_embeddings: bool,
    /// Norms after attention and after the feed-forward layer (Gemma's sandwich norms).
    pub post_norms: bool,
    /// Feed-forward activation.
    pub activation: Activation,
    /// Attention score scale (default `head_dim^-1/2`; Gemma: `query_pre_attn_scalar^-1/2`).
    pub attn_scale: f64,
    /// Soft cap of attention scores (Gemma 2).
    pub attn_softcap: Option<f64>,
    /// Soft cap of the final logits (Gemma 2).
    pub final_softcap: Option<f64>,
    /// Sliding-window size for [`LayerKind::Sliding`] layers.
    pub sliding_window: Option<usize>,
    /// Kind of every layer (length `n_layers`).
    pub layers: Vec<LayerKind>,
    /// RoPE frequency scaling of global layers.
    pub rope_scaling: RopeScaling,
    /// RoPE base of sliding layers (Gemma 3's `rope_local_base_freq`).
    pub rope_local_theta: Option<f64>,
}

impl ArchOptions {
    /// The plain llama decoder (SmolLM2, Llama 2): no family extras.
    pub fn llama(c: &LlamaConfig) -> Self {
        Self {
            model_type: ModelType::Llama,
            qkv_bias: false,
            qk_norm: false,
            norm_plus_one: false,
            scale_embeddings: false,
            post_norms: false,
            activation: Activation::Silu,
            attn_scale: 1.0 / (c.head_dim as f64).sqrt(),
            attn_softcap: None,
            final_softcap: None,
            sliding_window: None,
            layers: vec![LayerKind::Global; c.n_layers],
            rope_scaling: RopeScaling::None,
            rope_local_theta: None,
        }
    }

    /// The window of layer `i` (`None`: global).
    pub fn window(&self, i: usize) -> Option<usize> {
        match self.layers.get(i) {
            Some(LayerKind::Sliding) => self.sliding_window,
            _ => None,
        }
    }
}

/// Largest `config.json` read (bytes).
pub(crate) const MAX_CONFIG_BYTES: u64 = 1 << 20;

fn unsupported(mt: &str, option: impl Into<String>) -> LmError {
    LmError::UnsupportedOption {
        model_type: mt.to_string(),
        option: option.into(),
    }
}

/// transformers' `Gemma3TextConfig` defaults: what a multimodal Gemma 3 `config.json`
/// leaves out of its `text_config` (gemma-3-4b-it lists only hidden and intermediate
/// sizes, layers, `rope_scaling` and `sliding_window`).
const GEMMA3_TEXT_DEFAULTS: &str = r#"{
    "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216,
    "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
    "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "attention_bias": false, "query_pre_attn_scalar": 256, "sliding_window": 4096,
    "final_logit_softcapping": null, "attn_logit_softcapping": null, "rope_scaling": null,
    "rope_local_base_freq": 10000.0, "sliding_window_pattern": 6,
    "tie_word_embeddings": true
}"#;

/// Read a `config.json` (text) into the decoder's dimensions and family options.
///
/// # Errors
/// [`LmError::UnsupportedArchitecture`] for a `model_type` not in [`ModelType`];
/// [`LmError::UnsupportedOption`] for an option (or option value) the decoder does not
/// implement; [`LmError::Format`] for missing or mistyped fields.
pub fn parse_hf_config(text: &str) -> LmResult<(LlamaConfig, ArchOptions)> {
    let v: Value =
        serde_json::from_str(text).map_err(|e| LmError::Format(format!("config.json: {e}")))?;
    let Some(o) = v.as_object() else {
        return Err(LmError::Format("config.json is not a JSON object".into()));
    };
    // Multimodal wrappers name their decoder's options in a `text_config`. Gemma 3 4b+
    // (`gemma3`): the text decoder is loaded (its weights are renamed by the loader, the
    // vision tower is left out); its `text_config` lists only what differs from
    // transformers' `Gemma3TextConfig`, so those defaults fill the rest.
    if let Some(tc) = o.get("text_config").filter(|x| !x.is_null()) {
        let mt = o
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("unknown");
        if mt != "gemma3" {
            return Err(unsupported(
                mt,
                "multimodal checkpoint (`text_config`) of this family; use a text-only model",
            ));
        }
        let Some(fields) = tc.as_object() else {
            return Err(LmError::Format(
                "config.json: `text_config` is not a JSON object".into(),
            ));
        };
        let mut merged: serde_json::Map<String, Value> = serde_json::from_str(GEMMA3_TEXT_DEFAULTS)
            .map_err(|e| LmError::Format(format!("Gemma 3 text defaults: {e}")))?;
        merged.extend(fields.iter().map(|(k, v)| (k.clone(), v.clone())));
        merged.insert("model_type".into(), Value::from("gemma3_text"));
        return parse_hf_config(&Value::Object(merged).to_string());
    }
    let mt_name = o
        .get("model_type")
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| {
            // Old llama checkpoints name only the architecture.
            let arch = v.get("architectures")?.get(0)?.as_str()?;
            match arch {
                "LlamaForCausalLM" => Some("llama".to_string()),
                "MistralForCausalLM" => Some("mistral".to_string()),
                _ => Some(arch.to_string()),
            }
        })
        .unwrap_or_else(|| "unknown".into());
    let mt = ModelType::from_name(&mt_name)
        .ok_or_else(|| LmError::UnsupportedArchitecture(mt_name.clone()))?;
    let m = mt_name.as_str();
    let usize_of = |key: &str| -> LmResult<Option<usize>> {
        match o.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| LmError::Format(format!("config.json: `{key}` is not a count"))),
        }
    };
    let need = |key: &str| -> LmResult<usize> {
        usize_of(key)?.ok_or_else(|| LmError::Format(format!("config.json: missing `{key}`")))
    };
    let f64_of = |key: &str| -> LmResult<Option<f64>> {
        match o.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x
                .as_f64()
                .map(Some)
                .ok_or_else(|| LmError::Format(format!("config.json: `{key}` is not a number"))),
        }
    };
    let bool_of = |key: &str| o.get(key).and_then(Value::as_bool);

    // Options no family here implements, refused whatever their family.
    if o.get("quantization_config").is_some_and(|x| !x.is_null()) {
        return Err(unsupported(
            m,
            "quantization_config (quantized safetensors)",
        ));
    }
    if let Some(p) = f64_of("partial_rotary_factor")? {
        if p != 1.0 {
            return Err(unsupported(m, format!("partial_rotary_factor {p}")));
        }
    }
    if bool_of("mlp_bias") == Some(true) {
        return Err(unsupported(m, "mlp_bias true"));
    }
    if bool_of("attention_bias") == Some(true) {
        return Err(unsupported(m, "attention_bias true"));
    }
    if o.get("rope_parameters").is_some_and(|x| !x.is_null()) && o.get("rope_theta").is_none() {
        return Err(unsupported(
            m,
            "rope_parameters (transformers 5 normalised config; write rope_theta/rope_scaling)",
        ));
    }
    let act_key = if mt.is_gemma() {
        "hidden_activation"
    } else {
        "hidden_act"
    };
    let act = o
        .get(act_key)
        .or_else(|| o.get("hidden_act"))
        .and_then(Value::as_str);
    let activation = match (mt.is_gemma(), act) {
        (false, None | Some("silu")) => Activation::Silu,
        (true, None | Some("gelu_pytorch_tanh" | "gelu_tanh")) => Activation::GeluTanh,
        (_, Some(a)) => return Err(unsupported(m, format!("{act_key} `{a}`"))),
    };

    let hidden = need("hidden_size")?;
    let n_heads = need("num_attention_heads")?;
    let n_layers = need("num_hidden_layers")?;
    let head_dim = match usize_of("head_dim")? {
        Some(d) => d,
        None => hidden.checked_div(n_heads).unwrap_or(0),
    };
    let config = LlamaConfig {
        vocab_size: need("vocab_size")?,
        hidden_size: hidden,
        intermediate_size: need("intermediate_size")?,
        n_layers,
        n_heads,
        n_kv_heads: usize_of("num_key_value_heads")?.unwrap_or(n_heads),
        head_dim,
        rope_theta: f64_of("rope_theta")?.unwrap_or(10_000.0),
        rope_style: RopeStyle::Half,
        rms_eps: f64_of("rms_norm_eps")?.unwrap_or(1e-5),
        // Capped as when loading: some configs declare windows far beyond any table.
        max_seq_len: usize_of("max_position_embeddings")?
            .unwrap_or(4096)
            .min(limits::MAX_CONTEXT),
        // Gemma's configs omit it and always tie; a missing `lm_head.weight` ties anyway.
        tie_embeddings: bool_of("tie_word_embeddings").unwrap_or(mt.is_gemma()),
    };
    // Before anything sized by the header (the per-layer list below) is allocated.
    config.validate()?;

    let mut a = ArchOptions::llama(&config);
    a.model_type = mt;
    a.activation = activation;
    let window = usize_of("sliding_window")?;
    match mt {
        ModelType::Llama => {}
        ModelType::Mistral | ModelType::Phi3 => {
            // Every layer slides (a window at least the context is the same as none).
            a.sliding_window = window;
            if window.is_some() {
                a.layers = vec![LayerKind::Sliding; n_layers];
            }
        }
        ModelType::Qwen2 | ModelType::Qwen3 => {
            a.qkv_bias = mt == ModelType::Qwen2;
            a.qk_norm = mt == ModelType::Qwen3;
            // The released configs carry `sliding_window` with `use_sliding_window: false`,
            // which transformers ignores; the `true` case (windows from `max_window_layers`
            // on) is not implemented.
            if bool_of("use_sliding_window") == Some(true) {
                return Err(unsupported(m, "use_sliding_window true"));
            }
        }
        ModelType::Gemma2 | ModelType::Gemma3 => {
            a.norm_plus_one = true;
            a.scale_embeddings = true;
            a.post_norms = true;
            a.qk_norm = mt == ModelType::Gemma3;
            let qpas = f64_of("query_pre_attn_scalar")?.unwrap_or(head_dim as f64);
            if qpas <= 0.0 {
                return Err(LmError::Format(format!(
                    "config.json: query_pre_attn_scalar {qpas}"
                )));
            }
            a.attn_scale = 1.0 / qpas.sqrt();
            a.attn_softcap = f64_of("attn_logit_softcapping")?;
            a.final_softcap = f64_of("final_logit_softcapping")?;
            for cap in [a.attn_softcap, a.final_softcap].into_iter().flatten() {
                if cap <= 0.0 {
                    return Err(LmError::Format(format!("config.json: soft-cap {cap}")));
                }
            }
            a.sliding_window = window;
            a.layers = layer_kinds(o, mt, m, n_layers)?;
            if mt == ModelType::Gemma3 {
                a.rope_local_theta = Some(f64_of("rope_local_base_freq")?.unwrap_or(10_000.0));
            }
        }
    }
    if a.layers.contains(&LayerKind::Sliding) && a.sliding_window.is_none() {
        return Err(LmError::Format(
            "config.json: sliding layers without `sliding_window`".into(),
        ));
    }
    if a.sliding_window == Some(0) {
        return Err(LmError::Format("config.json: sliding_window 0".into()));
    }
    a.rope_scaling = rope_scaling(o, m, &config)?;
    Ok((config, a))
}

/// Which Gemma layers slide: `layer_types` when given, else Gemma 2's even layers or Gemma 3's
/// `sliding_window_pattern` (every `pattern`-th layer global).
fn layer_kinds(
    o: &Map<String, Value>,
    mt: ModelType,
    m: &str,
    n_layers: usize,
) -> LmResult<Vec<LayerKind>> {
    if let Some(types) = o.get("layer_types").and_then(Value::as_array) {
        if types.len() != n_layers {
            return Err(LmError::Format(format!(
                "config.json: {} layer_types for {n_layers} layers",
                types.len()
            )));
        }
        return types
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(LayerKind::Sliding),
                Some("full_attention") => Ok(LayerKind::Global),
                other => Err(unsupported(m, format!("layer type {other:?}"))),
            })
            .collect();
    }
    Ok(match mt {
        ModelType::Gemma2 => (0..n_layers)
            .map(|i| {
                if i % 2 == 0 {
                    LayerKind::Sliding
                } else {
                    LayerKind::Global
                }
            })
            .collect(),
        _ => {
            let pattern = match o.get("sliding_window_pattern").and_then(Value::as_u64) {
                Some(0) => return Err(LmError::Format("sliding_window_pattern 0".into())),
                Some(p) => usize::try_from(p).unwrap_or(usize::MAX),
                // gemma-3 configs without the key use transformers' default.
                None => 6,
            };
            (0..n_layers)
                .map(|i| {
                    if (i + 1) % pattern == 0 {
                        LayerKind::Global
                    } else {
                        LayerKind::Sliding
                    }
                })
                .collect()
        }
    })
}

fn rope_scaling(o: &Map<String, Value>, m: &str, c: &LlamaConfig) -> LmResult<RopeScaling> {
    let Some(rs) = o.get("rope_scaling").filter(|x| !x.is_null()) else {
        return Ok(RopeScaling::None);
    };
    let Some(rs) = rs.as_object() else {
        return Err(LmError::Format(
            "config.json: rope_scaling is not an object".into(),
        ));
    };
    let ty = rs
        .get("rope_type")
        .or_else(|| rs.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |key: &str| -> LmResult<f64> {
        rs.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| LmError::Format(format!("config.json: rope_scaling.{key} missing")))
    };
    let orig = || -> LmResult<usize> {
        rs.get("original_max_position_embeddings")
            .or_else(|| o.get("original_max_position_embeddings"))
            .and_then(Value::as_u64)
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n > 0)
            .ok_or_else(|| {
                LmError::Format(
                    "config.json: rope_scaling needs original_max_position_embeddings".into(),
                )
            })
    };
    let half = c.head_dim / 2;
    let factors = |key: &str| -> LmResult<Vec<f64>> {
        let list = rs
            .get(key)
            .and_then(Value::as_array)
            .ok_or_else(|| LmError::Format(format!("config.json: rope_scaling.{key} missing")))?;
        let f: Vec<f64> = list.iter().filter_map(Value::as_f64).collect();
        if f.len() != half || f.iter().any(|&x| x <= 0.0 || !x.is_finite()) {
            return Err(LmError::Format(format!(
                "config.json: rope_scaling.{key} needs {half} positive numbers"
            )));
        }
        Ok(f)
    };
    Ok(match ty {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: num("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: orig()?,
        },
        "longrope" | "su" => {
            let original = orig()?;
            let attention_factor = match rs.get("attention_factor").and_then(Value::as_f64) {
                Some(f) => f,
                None => {
                    // transformers: sqrt(1 + ln(scale) / ln(original)) with
                    // scale = max_position_embeddings / original (1 when not larger).
                    let scale = c.max_seq_len as f64 / original as f64;
                    if scale <= 1.0 {
                        1.0
                    } else {
                        (1.0 + scale.ln() / (original as f64).ln()).sqrt()
                    }
                }
            };
            RopeScaling::LongRope {
                short_factor: factors("short_factor")?,
                long_factor: factors("long_factor")?,
                original_max_position_embeddings: original,
                attention_factor,
            }
        }
        other => return Err(unsupported(m, format!("rope_scaling type `{other}`"))),
    })
}
