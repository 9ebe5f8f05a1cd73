//! Hugging Face checkpoints: tensor names and `config.json`.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use super::config::LlamaConfig;
use super::error::{LmError, LmResult};
use super::family::{parse_hf_config, ArchOptions, ModelType, MAX_CONFIG_BYTES};

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
