//! Loading model files without any download: a tiny random llama written to GGUF (with
//! tokenizer metadata and a chat template) and to Hugging Face safetensors, plus every kind of
//! bad file (truncated at many lengths, unsupported architecture, vocabulary mismatch,
//! missing file).
#![cfg(feature = "lm")]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Tensor;
use smc_steer::lm::hf_name;
use smc_steer::lm::{
    ChatMessage, KernelOptions, LlamaConfig, LlamaModel, LmError, LoadOptions, RopeStyle,
    TransformerKernel, WeightFormat,
};
use smc_steer::testing::max_abs_diff;
use smc_steer::Kernel;

const VOCAB: usize = 40;

fn config(style: RopeStyle) -> LlamaConfig {
    LlamaConfig {
        vocab_size: VOCAB,
        hidden_size: 32,
        intermediate_size: 64,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 8,
        rope_theta: 10_000.0,
        rope_style: style,
        rms_eps: 1e-5,
        max_seq_len: 64,
        tie_embeddings: true,
    }
}

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("smc-steer-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Byte-level BPE tokens: 3 control tokens, a..z, "Ġ" (space), "Ċ" (newline), merges.
fn tokenizer_tokens(n: usize) -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    tokens.extend(('a'..='z').map(String::from));
    tokens.extend(
        ["\u{120}", "\u{10a}", "ab", "\u{120}a", "\u{120}ab"]
            .iter()
            .map(|s| s.to_string()),
    );
    let mut i = 0;
    while tokens.len() < n {
        tokens.push(format!("pad{i}"));
        i += 1;
    }
    let types = (0..tokens.len())
        .map(|i| if i < 3 { 3 } else { 1 })
        .collect();
    let merges = ["a b", "\u{120} a", "\u{120}a b"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    (tokens, types, merges)
}

fn write_gguf(path: &Path, arch: &str, n_tokens: usize, dtype: GgmlDType) {
    let c = config(RopeStyle::Interleaved);
    write_gguf_with(path, arch, n_tokens, &c, |_| dtype);
}

/// A GGUF file of the random model of `c`, each matrix in the type `dtype(name)`.
fn write_gguf_with(
    path: &Path,
    arch: &str,
    n_tokens: usize,
    c: &LlamaConfig,
    dtype: impl Fn(&str) -> GgmlDType,
) {
    let c = c.clone();
    let tensors = LlamaModel::random_tensors(&c, 11).unwrap();
    let (tokens, types, merges) = tokenizer_tokens(n_tokens);
    let s = |x: &str| Value::String(x.to_string());
    let u = |x: usize| Value::U32(x as u32);
    let template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), s(arch)),
        (format!("{arch}.embedding_length"), u(c.hidden_size)),
        (
            format!("{arch}.feed_forward_length"),
            u(c.intermediate_size),
        ),
        (format!("{arch}.block_count"), u(c.n_layers)),
        (format!("{arch}.attention.head_count"), u(c.n_heads)),
        (format!("{arch}.attention.head_count_kv"), u(c.n_kv_heads)),
        (format!("{arch}.rope.dimension_count"), u(c.head_dim)),
        (format!("{arch}.rope.freq_base"), Value::F32(10_000.0)),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-5),
        ),
        (format!("{arch}.context_length"), u(c.max_seq_len)),
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s("smollm")),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(merges.iter().map(|t| s(t)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.chat_template".into(), s(template)),
    ];
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let q: Vec<(String, QTensor)> = names
        .iter()
        .map(|n| {
            let t = &tensors[*n];
            // Norm vectors stay f32 (as in real files).
            let dt = if t.rank() == 1 {
                GgmlDType::F32
            } else {
                dtype(n)
            };
            ((*n).clone(), QTensor::quantize(t, dt).unwrap())
        })
        .collect();
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = q.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta_refs, &tensor_refs).unwrap();
}

#[test]
fn tiny_gguf_loads_and_matches_in_memory_model() {
    let dir = tmp_dir("gguf-ok");
    let path = dir.join("tiny.gguf");
    write_gguf(&path, "llama", VOCAB, GgmlDType::F32);
    let opts = KernelOptions {
        cache_tokens: Some(256),
        ..Default::default()
    };
    let mut k = TransformerKernel::load(&path, opts).unwrap();
    let c = config(RopeStyle::Interleaved);
    let reference = LlamaModel::random(c, 11).unwrap();
    let ids = k.encode("ab abc\n").unwrap();
    // "ab" | "Ġ" | "ab" | "c" | "Ċ": the rank-0 merge "a b" applies before "Ġ a".
    assert_eq!(ids, vec![31, 29, 31, 5, 30]);
    assert_eq!(k.decode(&ids), "ab abc\n");
    let full = reference.forward_full(&ids).unwrap();
    let ours = k.model().forward_full(&ids).unwrap();
    assert!(max_abs_diff(&full, &ours).unwrap() < 1e-6);
    let (_, d) = k.start(&ids).unwrap();
    assert_eq!(d.len(), VOCAB + 1);
    assert_eq!(d[0], f64::NEG_INFINITY);
    assert_eq!(d[2], f64::NEG_INFINITY);
    assert!(d[VOCAB].is_finite(), "stop-token mass merged into EOS");
    let prompt = k.chat_prompt(&[ChatMessage::user("ab")]).unwrap();
    assert_eq!(prompt[0], 1);
    assert_eq!(
        k.decode(&prompt),
        "<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\n"
    );

    // Quantized storage (Q8_0) loads and stays close to f32.
    let qpath = dir.join("tiny-q8.gguf");
    write_gguf(&qpath, "llama", VOCAB, GgmlDType::Q8_0);
    let opts = LoadOptions {
        weights: WeightFormat::Quantized,
        ..Default::default()
    };
    let qm = LlamaModel::from_gguf(&qpath, &opts).unwrap();
    let d = max_abs_diff(&qm.forward_full(&ids).unwrap(), &full).unwrap();
    assert!(d < 0.1, "Q8_0 vs f32: {d}");
    std::fs::remove_dir_all(&dir).ok();
}

/// `native` on a file of `Q4_K` and `Q5_0` matrices (llama.cpp's usual 4-bit mixes) keeps
/// their weights exactly: the model widened back to f32 computes what the file's weights
/// dequantized by candle compute, the int8 products stay within activation rounding of it,
/// and the weights take 4-bit room where the file is 4-bit. `Q4_K` needs rows of 256.
#[test]
fn native_keeps_q4_k_and_q5_0_weights_exactly() {
    let dir = tmp_dir("gguf-kquant");
    let path = dir.join("tiny-q4k.gguf");
    let c = LlamaConfig {
        hidden_size: 256,
        intermediate_size: 512,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 64,
        ..config(RopeStyle::Interleaved)
    };
    // Values and the down projection in Q5_0 (as llama.cpp's Q4_K_M mixes put them in
    // higher precision), the rest in Q4_K: a fused projection of both kinds too.
    write_gguf_with(&path, "llama", VOCAB, &c, |name| {
        if name.contains("attn_v") || name.contains("ffn_down") {
            GgmlDType::Q5_0
        } else {
            GgmlDType::Q4K
        }
    });
    let load = |weights| {
        let opts = LoadOptions {
            weights,
            ..Default::default()
        };
        LlamaModel::from_gguf(&path, &opts).unwrap()
    };
    let ids = [3u32, 17, 5, 29, 31, 8, 12];
    let file_weights = load(WeightFormat::F32);
    let expected = file_weights.forward_full(&ids).unwrap();
    let native = load(WeightFormat::Native);
    let requantized = load(WeightFormat::Q8_0);
    assert!(
        native.weight_bytes() * 10 < requantized.weight_bytes() * 8,
        "4-bit blocks: {} bytes vs {} as Q8_0",
        native.weight_bytes(),
        requantized.weight_bytes()
    );
    let got = native.forward_full(&ids).unwrap();
    let widened = native.to_dense().unwrap().forward_full(&ids).unwrap();
    let same = max_abs_diff(&widened, &expected).unwrap();
    assert!(same < 1e-5, "the file's weights widened back: {same}");
    // Activations are rounded to int8 per block of 32 (relative step 1/127 of the block's
    // largest value) before every product: a few percent of the logits' scale end to end.
    let products = max_abs_diff(&got, &expected).unwrap();
    let scale = expected
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        products < 0.05 * scale,
        "int8 products vs f32 products: {products} (logits up to {scale})"
    );
    eprintln!("native vs the file's weights in f32: {products} (logits up to {scale})");
    // The report of how each stored type is held agrees with what was loaded: per layer
    // q, k, o, gate, up in Q4_K and v, down in Q5_0, plus the (tied) embedding in Q4_K.
    let gguf = smc_steer::lm::GgufFile::open(&path).unwrap();
    let plan = gguf.weight_plan(WeightFormat::Native);
    let layers = c.n_layers;
    assert_eq!(
        plan["Q4_K"],
        (
            5 * layers + 1,
            "4-bit blocks holding the stored weights exactly"
        )
    );
    assert_eq!(
        plan["Q5_0"],
        (
            2 * layers,
            "8-bit blocks holding the stored weights exactly"
        )
    );
    assert_eq!(plan.len(), 2, "{plan:?}");
    assert_eq!(
        gguf.weight_plan(WeightFormat::Q4_0)["Q4_K"].1,
        "requantized to q4_0"
    );
    assert_eq!(gguf.weight_plan(WeightFormat::F32)["Q5_0"].1, "dense f32");
    // The same file cut short in its K-quant blocks: a typed error under every format
    // that reads them, never a panic.
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() * 3 / 4]).unwrap();
    for weights in [WeightFormat::Native, WeightFormat::Q4_1, WeightFormat::F32] {
        let opts = LoadOptions {
            weights,
            ..Default::default()
        };
        match LlamaModel::from_gguf(&cut, &opts) {
            Err(LmError::CorruptModel { .. }) => {}
            other => panic!("{}: expected CorruptModel, got {other:?}", weights.name()),
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_model_files_are_typed_errors() {
    let dir = tmp_dir("gguf-bad");
    let opts = || KernelOptions {
        cache_tokens: Some(64),
        ..Default::default()
    };

    let missing = dir.join("nope.gguf");
    let err = TransformerKernel::load(&missing, opts()).unwrap_err();
    assert!(matches!(err, LmError::ModelNotFound { .. }));
    // The library names the path only; the command line adds how to get a model.
    assert_eq!(
        err.to_string(),
        format!("model file not found: {}", missing.display())
    );

    let arch = dir.join("gpt2.gguf");
    write_gguf(&arch, "gpt2", VOCAB, GgmlDType::F32);
    let err = TransformerKernel::load(&arch, opts()).unwrap_err();
    assert!(
        matches!(err, LmError::UnsupportedArchitecture(ref a) if a == "gpt2"),
        "{err}"
    );

    let mismatch = dir.join("mismatch.gguf");
    write_gguf(&mismatch, "llama", VOCAB + 5, GgmlDType::F32);
    let err = TransformerKernel::load(&mismatch, opts()).unwrap_err();
    assert!(
        matches!(
            err,
            LmError::VocabMismatch {
                tokenizer: 45,
                model: 40
            }
        ),
        "{err}"
    );

    // Truncated at many lengths: always an error, never a panic.
    let good = dir.join("good.gguf");
    write_gguf(&good, "llama", VOCAB, GgmlDType::F32);
    let bytes = std::fs::read(&good).unwrap();
    let cut = dir.join("cut.gguf");
    let mut len = 0;
    while len < bytes.len() {
        std::fs::write(&cut, &bytes[..len]).unwrap();
        let err = TransformerKernel::load(&cut, opts()).unwrap_err();
        assert!(
            matches!(
                err,
                LmError::CorruptModel { .. } | LmError::Format(_) | LmError::Tokenizer(_)
            ),
            "cut at {len}: {err}"
        );
        len += 1 + len / 3;
    }
    // Corrupted magic.
    let mut bad = bytes.clone();
    bad[0] ^= 0xff;
    std::fs::write(&cut, &bad).unwrap();
    let err = TransformerKernel::load(&cut, opts()).unwrap_err();
    assert!(matches!(err, LmError::CorruptModel { .. }), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn safetensors_checkpoint_loads_with_half_rotary_layout() {
    let dir = tmp_dir("hf");
    let c = config(RopeStyle::Half);
    let tensors = LlamaModel::random_tensors(&c, 12).unwrap();
    let hf: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| (hf_name(k), v.clone()))
        .collect();
    candle_core::safetensors::save(&hf, dir.join("model.safetensors")).unwrap();
    let cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 64,
        "tie_word_embeddings": true
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let loaded = LlamaModel::from_safetensors(&dir, &LoadOptions::default()).unwrap();
    assert_eq!(loaded.config(), &c);
    let reference = LlamaModel::from_tensors(c, tensors).unwrap();
    let ids = [3u32, 9, 27, 1, 0, 39];
    let d = max_abs_diff(
        &loaded.forward_full(&ids).unwrap(),
        &reference.forward_full(&ids).unwrap(),
    )
    .unwrap();
    assert!(d < 1e-6, "{d}");

    let mut bad = cfg.clone();
    bad["model_type"] = "gpt_neox".into();
    bad["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]);
    std::fs::write(dir.join("config.json"), bad.to_string()).unwrap();
    let err = LlamaModel::from_safetensors(&dir, &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, LmError::UnsupportedArchitecture(_)), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
