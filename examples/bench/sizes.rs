//! Real-size models without downloads: Qwen3-0.6B and Llama-3.2-1B with their published
//! shapes and configuration options, random weights (normal, σ = 0.02, as transformers
//! initialises them; a fixed seed), written once as a bf16 safetensors checkpoint (as the
//! published ones are) next to the real tokenizer of the family, then loaded through
//! `TransformerKernel::load` like any Hugging Face directory. Per model and weight format:
//! `load_s`, `weight_bytes`, `decode_step_ms` and `smc_step_ms` per n.
//!
//! ```text
//! scripts/fetch-tokenizers.sh
//! SMC_BENCH_ONLY=sizes cargo run --release --example bench -- --json --ns 1,64 --steps 3 \
//!     [--formats f32,q8_0] [--sizes qwen3-0.6b,llama-3.2-1b]
//! ```
//!
//! The checkpoints go to `target/bench-models/` (1.2 GB and 2.5 GB) and are reused when
//! their seed marker matches. `load_s` is measured with the files in the page cache (they
//! were just written or read), so it is the cost of parsing, converting and packing the
//! weights, not of the disk.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;

use smc_steer::lm::{parse_device, KernelOptions, TransformerKernel, WeightFormat};

use super::{decode_ours, median, smc_steps, Args, Report, TEXT};

/// Seed of the random weights (recorded in the checkpoint directory).
const WEIGHT_SEED: u64 = 0x5EED_0001;
/// Standard deviation of the random weights (transformers' `initializer_range`).
const WEIGHT_STD: f32 = 0.02;
/// Elements drawn per parallel chunk (each chunk has its own seeded generator, so the
/// weights do not depend on the thread count).
const CHUNK: usize = 1 << 20;

/// A model size: its published `config.json` and the tokenizer folder of its family.
pub struct Size {
    pub name: &'static str,
    /// Folder under `models/tokenizers/` (from `scripts/fetch-tokenizers.sh`).
    tokenizer: &'static str,
    config: &'static str,
    /// `generation_config.json` of the instruct release (its stop tokens).
    generation: &'static str,
}

/// Qwen3-0.6B: 28 layers, hidden 1024, 16 query heads and 8 key/value heads of 128, q/k
/// norms, tied embeddings, vocabulary 151,936.
const QWEN3_0_6B: Size = Size {
    name: "qwen3-0.6b",
    tokenizer: "qwen3",
    config: r#"{
  "architectures": ["Qwen3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
  "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
  "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
  "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
  "rms_norm_eps": 1e-06, "rope_scaling": null, "rope_theta": 1000000,
  "sliding_window": null, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
  "use_cache": true, "use_sliding_window": false, "vocab_size": 151936
}"#,
    generation: r#"{"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643}"#,
};

/// Llama-3.2-1B: 16 layers, hidden 2048, 32 query heads and 8 key/value heads of 64,
/// `llama3` RoPE scaling, tied embeddings, vocabulary 128,256.
const LLAMA_3_2_1B: Size = Size {
    name: "llama-3.2-1b",
    tokenizer: "llama3",
    config: r#"{
  "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "head_dim": 64,
  "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
  "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": false,
  "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16,
  "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
  "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "rope_theta": 500000.0, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
  "use_cache": true, "vocab_size": 128256
}"#,
    generation: r#"{"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}"#,
};

pub const ALL: [Size; 2] = [QWEN3_0_6B, LLAMA_3_2_1B];

/// Tensor names and shapes of a checkpoint with this `config.json` (Llama/Qwen3 layout,
/// tied head).
fn shapes(config: &serde_json::Value) -> Result<Vec<(String, Vec<usize>)>, String> {
    let get = |k: &str| {
        config[k]
            .as_u64()
            .map(|v| v as usize)
            .ok_or(format!("config.json: no `{k}`"))
    };
    let (h, i, layers, heads, kv, d, vocab) = (
        get("hidden_size")?,
        get("intermediate_size")?,
        get("num_hidden_layers")?,
        get("num_attention_heads")?,
        get("num_key_value_heads")?,
        get("head_dim")?,
        get("vocab_size")?,
    );
    let qwen3 = config["model_type"] == "qwen3";
    let mut out = vec![
        ("model.embed_tokens.weight".to_string(), vec![vocab, h]),
        ("model.norm.weight".to_string(), vec![h]),
    ];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        out.push((format!("{p}.self_attn.q_proj.weight"), vec![heads * d, h]));
        out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv * d, h]));
        out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv * d, h]));
        out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, heads * d]));
        if qwen3 {
            out.push((format!("{p}.self_attn.q_norm.weight"), vec![d]));
            out.push((format!("{p}.self_attn.k_norm.weight"), vec![d]));
        }
        out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
        out.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
        out.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
    }
    Ok(out)
}

/// One tensor: norms are ones (as initialised), matrices N(0, σ²) from per-chunk seeds.
fn random_tensor(index: usize, name: &str, shape: &[usize]) -> Result<Tensor, String> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = if name.ends_with("norm.weight") {
        vec![1.0; n]
    } else {
        let normal = Normal::new(0.0f32, WEIGHT_STD).map_err(|e| e.to_string())?;
        let mut data = vec![0.0f32; n];
        data.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(chunk, out)| {
                let seed = WEIGHT_SEED ^ ((index as u64) << 32) ^ chunk as u64;
                let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(seed);
                for x in out {
                    *x = normal.sample(&mut rng);
                }
            });
        data
    };
    Tensor::from_vec(data, shape, &Device::Cpu)
        .and_then(|t| t.to_dtype(DType::BF16))
        .map_err(|e| e.to_string())
}

/// The checkpoint directory of `size`, written if missing (or made with another seed).
fn checkpoint(size: &Size) -> Result<PathBuf, String> {
    // The working directory when it holds the tokenizers (a bench binary carried to another
    // machine, run from a checkout there), else the checkout this bench was built from.
    let here = Path::new(".");
    let root = if here.join("models/tokenizers").is_dir() {
        here
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR"))
    };
    let tokenizers = root.join("models/tokenizers").join(size.tokenizer);
    if !tokenizers.join("tokenizer.json").is_file() {
        return Err(format!(
            "{} is missing: run scripts/fetch-tokenizers.sh",
            tokenizers.join("tokenizer.json").display()
        ));
    }
    let dir = root.join("target/bench-models").join(size.name);
    let marker = dir.join("SEED");
    let seed = format!("{WEIGHT_SEED:#x} {WEIGHT_STD}\n");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(seed.as_str()) {
        return Ok(dir);
    }
    let io = |e: std::io::Error| format!("{}: {e}", dir.display());
    std::fs::create_dir_all(&dir).map_err(io)?;
    let config: serde_json::Value = serde_json::from_str(size.config).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let mut tensors = HashMap::new();
    for (index, (name, shape)) in shapes(&config)?.into_iter().enumerate() {
        let t = random_tensor(index, &name, &shape)?;
        tensors.insert(name, t);
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))
        .map_err(|e| e.to_string())?;
    std::fs::write(dir.join("config.json"), size.config).map_err(io)?;
    std::fs::write(dir.join("generation_config.json"), size.generation).map_err(io)?;
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tokenizers.join(f), dir.join(f)).map_err(io)?;
    }
    std::fs::write(&marker, seed).map_err(io)?;
    eprintln!(
        "wrote {} ({:.1} s)",
        dir.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(dir)
}

/// The sizes named by `--sizes` (all by default).
pub fn selected(names: &[String]) -> Result<Vec<&'static Size>, String> {
    if names.is_empty() {
        return Ok(ALL.iter().collect());
    }
    names
        .iter()
        .map(|n| {
            ALL.iter().find(|s| s.name == n.as_str()).ok_or(format!(
                "--sizes: unknown model `{n}` (known: {})",
                ALL.map(|s| s.name).join(", ")
            ))
        })
        .collect()
}

pub fn run(report: &mut Report, args: &Args, formats: &[WeightFormat]) -> Result<(), String> {
    let max_n = *args.ns.iter().max().unwrap_or(&1);
    for size in selected(&args.sizes)? {
        let dir = checkpoint(size)?;
        for &format in formats {
            let imp = format!("{}-{}", size.name, format.name());
            let opts = KernelOptions {
                weights: format,
                particles: max_n,
                max_new_tokens: args.steps + 4,
                device: parse_device(&args.device).map_err(|e| e.to_string())?,
                attention: args.attention,
                ..KernelOptions::default()
            };
            let t0 = Instant::now();
            let mut kernel = TransformerKernel::load(&dir, opts).map_err(|e| e.to_string())?;
            report.emit("load_s", &imp, 1, t0.elapsed().as_secs_f64(), "s");
            report.emit(
                "weight_bytes",
                &imp,
                1,
                kernel.model().weight_bytes() as f64,
                "bytes",
            );
            let text = kernel.encode(&TEXT.repeat(2)).map_err(|e| e.to_string())?;
            let prompt = text[..args.prompt_tokens.min(text.len())].to_vec();
            for &n in &args.ns {
                let (times, _) = decode_ours(&mut kernel, &prompt, n, args.steps)?;
                report.emit("decode_step_ms", &imp, n, median(times), "ms");
                let times = smc_steps(&mut kernel, &prompt, n, args.steps)?;
                report.emit("smc_step_ms", &imp, n, median(times), "ms");
            }
        }
    }
    Ok(())
}
