//! Issue 12: every model family against `transformers`' own log-probs.
//!
//! For each fixture in `tests/fixtures/families/<family>/` (tiny random-weight checkpoints made
//! by `scripts/make-family-fixtures.py`, see its README) the decoder must reproduce
//! `reference.json` — log P(next = v | ids[0..=i]) for **every** position i and **every** id v
//! of three sequences (5, 17, 33 tokens) — within 1e-4 in f32:
//!
//! * as one full forward pass ([`LlamaModel::forward_full`], no cache);
//! * through the paged KV cache (blocks of 4 tokens, so sliding windows of 7–8 cross block
//!   boundaries), on both attention paths: a prefill, then token by token in batched calls
//!   next to a diverging fork (junk tokens, later released as resampling would), a fork that
//!   continues with the reference tokens alongside the original, and the original's release
//!   with the run continuing on the fork.
#![cfg(feature = "lm")]

use std::path::{Path, PathBuf};

use candle_core::{Tensor, D};
use smc_steer::lm::{
    AttentionPath, CacheSeq, LlamaModel, LmError, LoadOptions, LogitRows, PagedKvCache,
    RopeScaling, SeqTokens,
};

/// Largest accepted |Δ log-prob| (the fixtures' `tolerance`).
const TOL: f32 = 1e-4;

fn fixture(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/families")
        .join(family)
}

struct Reference {
    /// (ids, log-probs per position).
    sequences: Vec<(Vec<u32>, Vec<Vec<f32>>)>,
}

fn reference(family: &str) -> Reference {
    let text = std::fs::read_to_string(fixture(family).join("reference.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let sequences = v["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let ids = s["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            let lp = s["logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|row| {
                    row.as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_f64().unwrap() as f32)
                        .collect()
                })
                .collect();
            (ids, lp)
        })
        .collect();
    Reference { sequences }
}

fn log_softmax_rows(logits: &Tensor) -> Vec<Vec<f32>> {
    candle_nn::ops::log_softmax(logits, D::Minus1)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
}

/// Max |Δ| of one row against the reference row.
fn row_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "vocabulary size");
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max)
}

/// Positions a first cache call must cover so that the LongRoPE factor choice (made per
/// forward call, as transformers does) is the one of the reference's single full pass.
fn min_prefill(model: &LlamaModel, len: usize) -> usize {
    match &model.arch().rope_scaling {
        RopeScaling::LongRope {
            original_max_position_embeddings: orig,
            ..
        } if len > *orig => orig + 1,
        _ => 3,
    }
}

/// Run one reference sequence through the paged cache; returns max |Δ| seen.
fn paged_diff(
    model: &LlamaModel,
    path: AttentionPath,
    ids: &[u32],
    want: &[Vec<f32>],
    junk_vocab: u32,
) -> f32 {
    let mut cache: PagedKvCache = model.new_cache_with(4, 4 * ids.len(), path).unwrap();
    let mut worst = 0f32;
    let p = min_prefill(model, ids.len()).min(ids.len());
    let mut s = cache.create();
    let rows = model
        .forward(
            &[SeqTokens {
                seq: s,
                tokens: &ids[..p],
            }],
            &mut cache,
            LogitRows::All,
        )
        .unwrap();
    for (i, r) in log_softmax_rows(&rows).iter().enumerate() {
        worst = worst.max(row_diff(r, &want[i]));
    }
    // A particle that diverges at once (and is dropped half-way, as by resampling).
    let mut junk: Option<CacheSeq> = Some(cache.fork(s).unwrap());
    // A particle forked later that follows the reference alongside `s`.
    let mut twin: Option<CacheSeq> = None;
    for i in p..ids.len() {
        if i == p + 2 {
            twin = Some(cache.fork(s).unwrap());
        }
        if i == (p + ids.len()) / 2 {
            if let Some(j) = junk.take() {
                cache.release(j);
            }
            // Resampling kept the twin twice: the original goes, a fork of the twin goes on.
            if let Some(t) = twin {
                cache.release(s);
                s = cache.fork(t).unwrap();
            }
        }
        let tok = [ids[i]];
        let other = [(ids[i] * 7 + 3) % junk_vocab];
        let mut batch = vec![SeqTokens {
            seq: s,
            tokens: &tok,
        }];
        if let Some(j) = junk {
            batch.push(SeqTokens {
                seq: j,
                tokens: &other,
            });
        }
        if let Some(t) = twin {
            batch.push(SeqTokens {
                seq: t,
                tokens: &tok,
            });
        }
        let rows = log_softmax_rows(&model.forward(&batch, &mut cache, LogitRows::Last).unwrap());
        worst = worst.max(row_diff(&rows[0], &want[i]));
        if twin.is_some() {
            worst = worst.max(row_diff(rows.last().unwrap(), &want[i]));
        }
    }
    worst
}

/// Full-forward and paged-cache differences of a loaded model against the reference.
fn check(family: &str, model: &LlamaModel) -> (f32, f32) {
    let r = reference(family.split(' ').next().unwrap_or(family));
    let vocab = model.config().vocab_size as u32;
    let (mut full, mut paged) = (0f32, 0f32);
    for (ids, want) in &r.sequences {
        assert_eq!(want.len(), ids.len());
        let got = log_softmax_rows(&model.forward_full(ids).unwrap());
        for (g, w) in got.iter().zip(want) {
            full = full.max(row_diff(g, w));
        }
        for path in [AttentionPath::Cpu, AttentionPath::Gather] {
            paged = paged.max(paged_diff(model, path, ids, want, vocab));
        }
    }
    eprintln!("{family}: full forward max |Δ| {full:.2e}, paged cache max |Δ| {paged:.2e}");
    assert!(
        full <= TOL,
        "{family}: full forward max |Δ log-prob| {full}"
    );
    assert!(
        paged <= TOL,
        "{family}: paged cache max |Δ log-prob| {paged}"
    );
    (full, paged)
}

fn hf(family: &str) -> LlamaModel {
    LlamaModel::from_safetensors(&fixture(family), &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{family}: {e}"))
}

#[test]
fn llama3_hf_matches_transformers() {
    check("llama3", &hf("llama3"));
}

#[test]
fn qwen2_hf_matches_transformers() {
    check("qwen2", &hf("qwen2"));
}

#[test]
fn qwen3_hf_matches_transformers() {
    check("qwen3", &hf("qwen3"));
}

#[test]
fn mistral_hf_matches_transformers() {
    check("mistral", &hf("mistral"));
}

#[test]
fn gemma2_hf_matches_transformers() {
    check("gemma2", &hf("gemma2"));
}

#[test]
fn gemma3_hf_matches_transformers() {
    check("gemma3", &hf("gemma3"));
}

#[test]
fn phi3_hf_matches_transformers() {
    check("phi3", &hf("phi3"));
}

#[test]
fn phi3_longrope_hf_matches_transformers() {
    check("phi3_longrope", &hf("phi3_longrope"));
}

/// Gemma 3 4b+ checkpoints are multimodal: `config.json` wraps the decoder's options in a
/// `text_config`, and the decoder's tensors sit under `language_model.model.*` (as
/// released) or `model.language_model.*` (transformers ≥ 4.52) next to a vision tower. The
/// gemma3 fixture rewritten both ways (with vision tensors added) must load as the text
/// model and match transformers' log-probs as before.
#[test]
fn gemma3_multimodal_checkpoints_load_their_text_decoder() {
    let src = fixture("gemma3");
    let text_config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    for prefix in ["language_model.model.", "model.language_model."] {
        let dir = std::env::temp_dir().join(format!(
            "smc-steer-gemma3-mm-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let config = serde_json::json!({
            "architectures": ["Gemma3ForConditionalGeneration"],
            "model_type": "gemma3",
            "image_token_index": 262144,
            "mm_tokens_per_image": 256,
            "text_config": text_config,
            "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 8,
                "num_hidden_layers": 1, "num_attention_heads": 1, "patch_size": 14}
        });
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        let mut wrapped: std::collections::HashMap<String, Tensor> = tensors
            .iter()
            .map(|(k, v)| {
                let rest = k.strip_prefix("model.").unwrap_or(k);
                (format!("{prefix}{rest}"), v.clone())
            })
            .collect();
        let junk = Tensor::ones(8, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        wrapped.insert(
            "vision_tower.vision_model.post_layernorm.weight".into(),
            junk.clone(),
        );
        wrapped.insert("multi_modal_projector.mm_soft_emb_norm.weight".into(), junk);
        candle_core::safetensors::save(&wrapped, dir.join("model.safetensors")).unwrap();
        let model = LlamaModel::from_safetensors(&dir, &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{prefix}: {e}"));
        check("gemma3", &model);
        std::fs::remove_dir_all(&dir).ok();
    }
}

/// Chat templates outside `tokenizer_config.json`: `chat_template.jinja`, then
/// `chat_template.json` (where newer and multimodal checkpoints keep them), give the same
/// template; a malformed `chat_template.json` is a typed error naming the file.
#[test]
fn chat_templates_from_their_own_files() {
    use smc_steer::lm::{ChatMessage, KernelOptions, TransformerKernel};
    let src = fixture("llama3");
    let messages = [ChatMessage::new("user", "Hi")];
    let load = |dir: &Path| TransformerKernel::load(dir, KernelOptions::default());
    let want = load(&src)
        .unwrap()
        .apply_chat_template(&messages, true)
        .unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer_config.json")).unwrap())
            .unwrap();
    let template = cfg["chat_template"].as_str().unwrap().to_string();
    cfg.as_object_mut().unwrap().remove("chat_template");
    let files: [(&str, Option<String>); 3] = [
        ("chat_template.jinja", Some(template.clone())),
        (
            "chat_template.json",
            Some(serde_json::json!({ "chat_template": template }).to_string()),
        ),
        ("chat_template.json", None),
    ];
    for (file, content) in files {
        let dir = with_config("llama3", |_| {});
        for f in ["tokenizer.json", "generation_config.json"] {
            if src.join(f).is_file() {
                std::fs::copy(src.join(f), dir.join(f)).unwrap();
            }
        }
        std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
        match content {
            Some(text) => {
                std::fs::write(dir.join(file), text).unwrap();
                let got = load(&dir)
                    .unwrap()
                    .apply_chat_template(&messages, true)
                    .unwrap();
                assert_eq!(got, want, "{file}");
            }
            None => {
                std::fs::write(dir.join(file), "{\"chat_template\": ").unwrap();
                let Err(err) = load(&dir) else {
                    panic!("a malformed chat_template.json loaded");
                };
                assert!(err.to_string().contains(file), "{err}");
            }
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}

/// The released gemma-3-4b-it `config.json` lists only what differs from transformers'
/// `Gemma3TextConfig` in its `text_config`: the defaults fill the rest (8 query and 4
/// key/value heads of 256, vocabulary 262,208, every sixth layer global, local RoPE base
/// 10 000, scores scaled by 256^-1/2); a `text_config` that is not an object is a format
/// error, and another family's multimodal wrapper is refused.
#[test]
fn gemma3_4b_config_takes_transformers_text_defaults() {
    let config = r#"{"architectures": ["Gemma3ForConditionalGeneration"],
        "boi_token_index": 255999, "eoi_token_index": 256000, "eos_token_id": [1, 106],
        "image_token_index": 262144, "initializer_range": 0.02, "mm_tokens_per_image": 256,
        "model_type": "gemma3",
        "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
            "model_type": "gemma3_text", "num_hidden_layers": 34,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024},
        "torch_dtype": "bfloat16",
        "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
            "model_type": "siglip_vision_model", "num_attention_heads": 16,
            "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": false}}"#;
    let (c, a) = smc_steer::lm::parse_hf_config(config).unwrap();
    assert_eq!(
        (c.vocab_size, c.hidden_size, c.intermediate_size, c.n_layers),
        (262_208, 2560, 10_240, 34)
    );
    assert_eq!((c.n_heads, c.n_kv_heads, c.head_dim), (8, 4, 256));
    assert_eq!(c.rope_theta, 1_000_000.0);
    assert!(c.tie_embeddings);
    assert_eq!(a.model_type, smc_steer::lm::ModelType::Gemma3);
    assert_eq!(a.sliding_window, Some(1024));
    let global: Vec<usize> = (0..34)
        .filter(|&i| a.layers[i] == smc_steer::lm::LayerKind::Global)
        .collect();
    assert_eq!(global, vec![5, 11, 17, 23, 29]);
    assert_eq!(a.rope_local_theta, Some(10_000.0));
    assert!(
        (a.attn_scale - 1.0 / 16.0).abs() < 1e-12,
        "{}",
        a.attn_scale
    );
    assert!(
        matches!(a.rope_scaling, RopeScaling::Linear { factor } if factor == 8.0),
        "{:?}",
        a.rope_scaling
    );
    let bad = r#"{"model_type": "gemma3", "text_config": "gemma3_text"}"#;
    let err = smc_steer::lm::parse_hf_config(bad).unwrap_err();
    assert!(
        matches!(&err, LmError::Format(m) if m.contains("text_config")),
        "{err}"
    );
    let llava = r#"{"model_type": "llava", "text_config": {"model_type": "llama"}}"#;
    let err = smc_steer::lm::parse_hf_config(llava).unwrap_err();
    assert!(
        matches!(&err, LmError::UnsupportedOption { model_type, .. } if model_type == "llava"),
        "{err}"
    );
}

/// An edit of a `config.json`.
type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;

/// A copy of a fixture directory with `config.json` edited.
fn with_config(family: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let src = fixture(family);
    let dir = std::env::temp_dir().join(format!(
        "smc-steer-family-{family}-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["model.safetensors", "config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    dir
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[test]
fn unknown_model_types_and_options_are_typed_errors_naming_them() {
    let load = |dir: &Path| LlamaModel::from_safetensors(dir, &LoadOptions::default());
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "llama3",
            Box::new(|c| c["model_type"] = "falcon".into()),
            "falcon",
        ),
        (
            "llama3",
            Box::new(|c| c["rope_scaling"]["rope_type"] = "yarn".into()),
            "rope_scaling type `yarn`",
        ),
        (
            "qwen2",
            Box::new(|c| c["use_sliding_window"] = true.into()),
            "use_sliding_window",
        ),
        (
            "phi3",
            Box::new(|c| c["partial_rotary_factor"] = 0.75.into()),
            "partial_rotary_factor",
        ),
        (
            "gemma2",
            Box::new(|c| c["hidden_activation"] = "gelu".into()),
            "hidden_activation `gelu`",
        ),
        (
            "mistral",
            Box::new(|c| c["mlp_bias"] = true.into()),
            "mlp_bias",
        ),
    ];
    for (family, edit, needle) in cases {
        let dir = with_config(family, edit);
        let err = load(&dir).unwrap_err();
        assert!(
            matches!(
                err,
                LmError::UnsupportedArchitecture(_) | LmError::UnsupportedOption { .. }
            ),
            "{family}: {err}"
        );
        assert!(err.to_string().contains(needle), "{family}: {err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
fn each_family_option_matters() {
    // The options are data: switching one off in config.json moves the log-probs far beyond
    // the tolerance (so the tests above really exercise them).
    let cases: Vec<(&str, Edit)> = vec![
        (
            "llama3",
            Box::new(|c| c["rope_scaling"] = serde_json::Value::Null),
        ),
        (
            "mistral",
            Box::new(|c| c["sliding_window"] = serde_json::Value::Null),
        ),
        (
            "gemma2",
            Box::new(|c| c["final_logit_softcapping"] = serde_json::Value::Null),
        ),
        (
            "gemma2",
            Box::new(|c| c["attn_logit_softcapping"] = serde_json::Value::Null),
        ),
        (
            "gemma3",
            Box::new(|c| c["rope_local_base_freq"] = 1e6.into()),
        ),
        (
            "gemma3",
            Box::new(|c| c["query_pre_attn_scalar"] = 16.into()),
        ),
    ];
    for (family, edit) in cases {
        let dir = with_config(family, edit);
        let m = LlamaModel::from_safetensors(&dir, &LoadOptions::default()).unwrap();
        let r = reference(family);
        let (ids, want) = &r.sequences[2];
        let got = log_softmax_rows(&m.forward_full(ids).unwrap());
        let d = got
            .iter()
            .zip(want)
            .map(|(g, w)| row_diff(g, w))
            .fold(0f32, f32::max);
        assert!(
            d > 100.0 * TOL,
            "{family}: ablation moved log-probs by only {d}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}

fn gguf(family: &str) -> LlamaModel {
    LlamaModel::from_gguf(&fixture(family).join("model.gguf"), &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{family}: {e}"))
}

/// Weights and options from the GGUF alone (llama.cpp's names, Gemma's stored 1 + w,
/// Phi-3's fused matrices, `rope_freqs` / `rope_factors_*` tensors) give the same log-probs.
#[test]
fn gguf_fixtures_match_transformers() {
    for family in [
        "llama3",
        "qwen2",
        "qwen3",
        "gemma2",
        "gemma3",
        "phi3",
        "phi3_longrope",
    ] {
        let path = fixture(family).join("model.gguf");
        assert!(path.is_file(), "{family}: no model.gguf");
        check(&format!("{family} (GGUF)"), &gguf(family));
    }
}

/// The toy tokenizers (`tokenizer.json` via the `tokenizers` crate): ids with and without
/// special tokens as Python `tokenizers` gives them; stop ids from `generation_config.json`;
/// chat templates from `tokenizer_config.json` rendered with minijinja as jinja2 renders them
/// (errors where the template raises).
#[test]
fn hf_tokenizers_stop_tokens_and_chat_templates_match_transformers() {
    use smc_steer::lm::{ChatMessage, KernelOptions, Tokenizer, TransformerKernel};
    for family in [
        "llama3",
        "qwen2",
        "qwen3",
        "gemma2",
        "gemma3",
        "phi3",
        "phi3_longrope",
        "mistral",
    ] {
        let dir = fixture(family);
        let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
        let r: serde_json::Value = serde_json::from_str(&text).unwrap();
        let ids = |v: &serde_json::Value| -> Vec<u32> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        };
        let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
        for case in r["tokenizer_cases"].as_array().unwrap() {
            let s = case["text"].as_str().unwrap();
            assert_eq!(tok.encode(s).unwrap(), ids(&case["ids"]), "{family}: {s:?}");
            assert_eq!(
                tok.encode_with_special(s).unwrap(),
                ids(&case["ids_with_special"]),
                "{family}: {s:?} with special tokens"
            );
        }
        let gen: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("generation_config.json")).unwrap(),
        )
        .unwrap();
        let eos = match &gen["eos_token_id"] {
            serde_json::Value::Array(_) => ids(&gen["eos_token_id"]),
            n => vec![n.as_u64().unwrap() as u32],
        };
        assert_eq!(tok.stop_ids(), eos.as_slice(), "{family}");
        let kernel = TransformerKernel::load(&dir, KernelOptions::default()).unwrap();
        for id in &eos {
            assert!(kernel.stop_tokens().contains(id), "{family}: stop id {id}");
        }
        for case in r["chat"].as_array().unwrap() {
            let messages: Vec<ChatMessage> = case["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| {
                    ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap())
                })
                .collect();
            let agp = case["add_generation_prompt"].as_bool().unwrap();
            let got = kernel.apply_chat_template(&messages, agp);
            let name = case["name"].as_str().unwrap_or("?");
            match case["text"].as_str() {
                Some(want) => {
                    let got = got.unwrap_or_else(|e| panic!("{family} {name}: {e}"));
                    assert_eq!(got, want, "{family} {name}");
                    assert_eq!(
                        tok.encode(&got).unwrap(),
                        ids(&case["ids"]),
                        "{family} {name}: ids"
                    );
                }
                None => assert!(got.is_err(), "{family} {name}: expected an error"),
            }
        }
    }
}

/// The tokenizers stored in the fixture GGUFs — byte-level BPE (llama-bpe, qwen2
/// pre-tokenizers) and SentencePiece-style BPE rebuilt from piece scores (Gemma, Phi-3) — give
/// the ids of Python `tokenizers`, and every GGUF loads as a whole kernel.
#[test]
fn gguf_tokenizers_match_and_kernels_load() {
    use smc_steer::lm::{GgufFile, KernelOptions, Tokenizer, TransformerKernel};
    for family in [
        "llama3",
        "qwen2",
        "qwen3",
        "gemma2",
        "gemma3",
        "phi3",
        "phi3_longrope",
    ] {
        let path = fixture(family).join("model.gguf");
        let tok = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap())
            .unwrap_or_else(|e| panic!("{family}: {e}"));
        let text = std::fs::read_to_string(fixture(family).join("reference.json")).unwrap();
        let r: serde_json::Value = serde_json::from_str(&text).unwrap();
        for case in r["tokenizer_cases"].as_array().unwrap() {
            let s = case["text"].as_str().unwrap();
            let want: Vec<u32> = case["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(tok.encode(s).unwrap(), want, "{family} (GGUF): {s:?}");
        }
        let k = TransformerKernel::load(&path, KernelOptions::default())
            .unwrap_or_else(|e| panic!("{family} (GGUF): {e}"));
        assert!(!k.stop_tokens().is_empty(), "{family} (GGUF)");
    }
}

/// `smc-steer run --model DIR` picks the family from the directory; `inspect` names it.
#[cfg(feature = "cli")]
#[test]
fn cli_runs_every_family_directory() {
    for (family, model_type) in [
        ("llama3", "llama"),
        ("qwen2", "qwen2"),
        ("qwen3", "qwen3"),
        ("gemma2", "gemma2"),
        ("gemma3", "gemma3_text"),
        ("phi3", "phi3"),
        ("phi3_longrope", "phi3"),
        ("mistral", "mistral"),
    ] {
        let dir = fixture(family);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_smc-steer"))
            .args(["run", "--model"])
            .arg(&dir)
            .args(["--prompt", "Hello, world", "--chat", "--particles", "3"])
            .args(["--max-tokens", "4", "--seed", "1", "--format", "json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{family}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_smc-steer"))
            .args(["inspect", "--format", "json", "--model"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{family}");
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(info["architecture"], model_type, "{family}");
    }
}
