//! Real tokenizers (Llama 3, Qwen3, Gemma 3, Llama 2) from `tokenizer.json` against Python
//! `tokenizers` / `transformers` (`tests/fixtures/tokenizers/`, see
//! `tests/fixtures/families/README.md`): ids of a 225-string corpus with and without special
//! tokens, the byte string of every id (FNV-1a hashes), the end-of-turn ids, and the chat
//! templates rendered with minijinja.
//!
//! The tokenizer files themselves are not in the repository: `scripts/fetch-tokenizers.sh`
//! puts them in `models/tokenizers/` (git-ignored). Each test skips with a message when they are
//! missing.
#![cfg(feature = "lm")]

use std::path::{Path, PathBuf};

use smc_steer::lm::{
    ChatMessage, ChatTemplate, KernelOptions, LlamaConfig, LlamaModel, RopeStyle, Tokenizer,
    TransformerKernel,
};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The fetched tokenizer directory, or `None` (with a message) when absent outside CI;
/// under CI (which runs `scripts/fetch-tokenizers.sh`) a missing tokenizer fails the test.
fn tokenizer_dir(name: &str) -> Option<PathBuf> {
    let dir = root().join("models/tokenizers").join(name);
    if dir.join("tokenizer.json").is_file() {
        Some(dir)
    } else if crate::common::under_ci() {
        panic!(
            "CI is set and {} is missing (run scripts/fetch-tokenizers.sh)",
            dir.display()
        );
    } else {
        eprintln!(
            "SKIPPED: {} missing (run scripts/fetch-tokenizers.sh)",
            dir.display()
        );
        None
    }
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// FNV-1a 64 over, for each id in order, its byte length (u32 little-endian) then its bytes.
fn fnv(table: &[Vec<u8>]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for t in table {
        for &b in (t.len() as u32).to_le_bytes().iter().chain(t) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    format!("{h:016x}")
}

fn check(name: &str) {
    let Some(dir) = tokenizer_dir(name) else {
        return;
    };
    let fixtures = root().join("tests/fixtures/tokenizers");
    let r = json(&fixtures.join(format!("{name}.reference.json")));
    let corpus = json(&fixtures.join("corpus.json"));
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let mut bad = Vec::new();
    for (k, (text, enc)) in corpus
        .as_array()
        .unwrap()
        .iter()
        .zip(r["encodings"].as_array().unwrap())
        .enumerate()
    {
        let text = text.as_str().unwrap();
        if tok.encode_with_special(text).unwrap() != ids(&enc[0])
            || tok.encode(text).unwrap() != ids(&enc[1])
        {
            bad.push((k, text.to_string()));
        }
    }
    assert!(
        bad.is_empty(),
        "{name}: {} of 225 corpus strings tokenize differently, e.g. {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
    assert_eq!(
        tok.vocab_size() as u64,
        r["vocab_size"].as_u64().unwrap(),
        "{name}: vocabulary size"
    );
    assert_eq!(
        fnv(tok.token_bytes()),
        r["vocab_bytes"]["fnv1a64_all"].as_str().unwrap(),
        "{name}: token byte table"
    );
    for (token, id) in r["stop_tokens"]["end_of_turn"].as_object().unwrap() {
        if let Some(id) = id.as_u64() {
            assert_eq!(tok.token_id(token), Some(id as u32), "{name}: {token}");
        }
    }
    let cfg = json(&dir.join("tokenizer_config.json"));
    let template = cfg["chat_template"].as_str().map(|src| {
        let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
        ChatTemplate::new(src, s("bos_token"), s("eos_token")).unwrap()
    });
    for case in r["chat_template"]["cases"].as_array().unwrap() {
        let messages: Vec<ChatMessage> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let agp = case["add_generation_prompt"].as_bool().unwrap();
        let got = template
            .as_ref()
            .map(|t| t.apply(&messages, agp))
            .transpose()
            .ok()
            .flatten();
        let case_name = case["name"].as_str().unwrap_or("?");
        match case["text"].as_str() {
            Some(want) => assert_eq!(got.as_deref(), Some(want), "{name} {case_name}"),
            None => assert!(got.is_none(), "{name} {case_name}: expected an error"),
        }
    }
}

#[test]
fn llama3_tokenizer_matches_python() {
    check("llama3");
}

#[test]
fn qwen3_tokenizer_matches_python() {
    check("qwen3");
}

#[test]
fn gemma3_tokenizer_matches_python() {
    check("gemma3");
}

#[test]
fn llama2_tokenizer_matches_python() {
    check("llama2");
}

/// The kernel's stop tokens from each real tokenizer: the EOS and the end-of-turn tokens,
/// only where they are special tokens. `</s>` is ordinary text in Qwen3's vocabulary (id
/// 128247) and a non-special HTML tag in Gemma 3's (id 212): generating it must not end a
/// sequence.
#[test]
fn stop_tokens_are_special_tokens_only() {
    let expected: [(&str, &[u32]); 4] = [
        ("llama3", &[128001, 128009]),
        ("qwen3", &[151643, 151645]),
        // Gemma 3's tokenizer names `<end_of_turn>` as its EOS; `<eos>` (1) comes from
        // the checkpoint's generation_config.json, which is not part of the tokenizer.
        ("gemma3", &[106]),
        ("llama2", &[2]),
    ];
    for (name, want) in expected {
        let Some(dir) = tokenizer_dir(name) else {
            return;
        };
        let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
        let config = LlamaConfig {
            vocab_size: tok.vocab_size(),
            hidden_size: 8,
            intermediate_size: 8,
            n_layers: 1,
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: 8,
            rope_theta: 10_000.0,
            rope_style: RopeStyle::Half,
            rms_eps: 1e-5,
            max_seq_len: 16,
            tie_embeddings: true,
        };
        let model = LlamaModel::random(config, 1).unwrap();
        let kernel =
            TransformerKernel::from_parts(model, Some(tok), None, KernelOptions::default())
                .unwrap();
        assert_eq!(kernel.stop_tokens(), want, "{name}");
    }
}
