//! Byte-level BPE tokenizers, built from GGUF metadata or loaded from `tokenizer.json`.
//!
//! A GGUF file stores its tokenizer as metadata: the token strings
//! (`tokenizer.ggml.tokens`), the BPE merges (`tokenizer.ggml.merges`), token types
//! (control tokens are special), BOS/EOS ids, and the name of the pre-tokenizer
//! (`tokenizer.ggml.pre`). This module turns that into a Hugging Face `tokenizers`
//! tokenizer. Supported pre-tokenizers:
//!
//! * `smollm`: split every digit on its own, then the GPT-2 byte-level regex, no prefix
//!   space (SmolLM/SmolLM2);
//! * `gpt2`, `default` (or absent): the GPT-2 byte-level regex;
//! * `llama-bpe`, `llama3`: the Llama-3 regex, then byte-level mapping.
//!
//! Every token is also available as a byte string ([`Tokenizer::token_bytes`]), which is
//! what the SMC core's [`crate::Vocabulary`] and text potentials work with.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{json, Value};

use super::error::{LmError, LmResult};
use super::gguf::GgufFile;

/// The Llama-3 pre-tokenizer regex (as used by `llama-bpe`).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2/2.5/3's split: Llama 3's with single digits.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A tokenizer with byte strings for every token id.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    token_bytes: Vec<Vec<u8>>,
    special: Vec<bool>,
    bos: Option<u32>,
    eos: Option<u32>,
    /// End-of-generation ids declared next to `tokenizer.json` (`generation_config.json`, else
    /// `config.json`): Llama 3 stops on three ids, Gemma on `<eos>` and `<end_of_turn>`.
    stop_ids: Vec<u32>,
}

/// GPT-2's reversible map from bytes to printable characters; returns char -> byte.
fn byte_decoder() -> HashMap<char, u8> {
    let mut printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut map = HashMap::with_capacity(256);
    let mut extra = 0u32;
    for b in 0u32..256 {
        let c = if printable.contains(&b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        // All code points here are valid chars (< 0x200).
        if let Some(ch) = char::from_u32(c) {
            map.insert(ch, b as u8);
        }
    }
    map
}

/// Bytes of a byte-level BPE token string (characters outside the map keep their UTF-8).
fn byte_level_bytes(token: &str, dec: &HashMap<char, u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(token.len());
    for ch in token.chars() {
        match dec.get(&ch) {
            Some(&b) => out.push(b),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out
}

fn tok_err(e: impl std::fmt::Display) -> LmError {
    LmError::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Build the tokenizer stored in a GGUF file's metadata.
    ///
    /// # Errors
    /// [`LmError::Tokenizer`] for missing or malformed metadata, or an unsupported tokenizer
    /// model or pre-tokenizer.
    pub fn from_gguf(g: &GgufFile) -> LmResult<Self> {
        let model = g.meta_str("tokenizer.ggml.model").unwrap_or("");
        if model == "llama" {
            return Self::from_gguf_spm(g);
        }
        if model != "gpt2" {
            return Err(LmError::Tokenizer(format!(
                "unsupported GGUF tokenizer model `{model}` (implemented: byte-level BPE `gpt2`, SentencePiece-style BPE `llama`)"
            )));
        }
        let strings = |key: &str| -> LmResult<Vec<String>> {
            let v = g
                .meta(key)
                .ok_or_else(|| tok_err(format!("missing metadata `{key}`")))?;
            let arr = v.to_vec().map_err(|e| tok_err(format!("`{key}`: {e}")))?;
            arr.iter()
                .map(|x| {
                    x.to_string()
                        .cloned()
                        .map_err(|e| tok_err(format!("`{key}`: {e}")))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<i32> = match g.meta("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(tok_err)?
                .iter()
                .map(|x| x.to_i32().map_err(tok_err))
                .collect::<LmResult<_>>()?,
            None => vec![1; tokens.len()],
        };
        let id = |key: &str| {
            g.meta(key).and_then(|v| {
                v.to_u32()
                    .ok()
                    .or_else(|| v.to_i32().ok().map(|x| x as u32))
            })
        };
        let pre = g.meta_str("tokenizer.ggml.pre").unwrap_or("default");
        let pre_tokenizer = match pre {
            "smollm" => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
            ]}),
            "default" | "gpt2" | "gpt-2" => {
                json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})
            }
            "llama-bpe" | "llama3" | "llama-v3" => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
            ]}),
            "qwen2" => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_REGEX}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}
            ]}),
            other => {
                return Err(LmError::Tokenizer(format!(
                "unsupported pre-tokenizer `{other}` (supported: smollm, gpt2, default, llama-bpe, qwen2)"
            )))
            }
        };
        // Qwen's tokenizer.json normalises to NFC before splitting (llama.cpp does too).
        let normalizer = if pre == "qwen2" {
            json!({"type": "NFC"})
        } else {
            Value::Null
        };
        let mut vocab = serde_json::Map::with_capacity(tokens.len());
        let mut added = Vec::new();
        for (i, t) in tokens.iter().enumerate() {
            vocab.insert(t.clone(), json!(i));
            // 3 = control, 4 = user-defined (llama.cpp's token types).
            let ty = types.get(i).copied().unwrap_or(1);
            if ty == 3 || ty == 4 {
                added.push(
                    json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": ty == 3}),
                );
            }
        }
        if vocab.len() != tokens.len() {
            return Err(tok_err(format!(
                "`tokenizer.ggml.tokens` lists {} tokens but only {} distinct ones",
                tokens.len(),
                vocab.len()
            )));
        }
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
                "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges}
        });
        let inner =
            tokenizers::Tokenizer::from_bytes(spec.to_string().as_bytes()).map_err(tok_err)?;
        let dec = byte_decoder();
        let mut token_bytes = Vec::with_capacity(tokens.len());
        let mut special = Vec::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            let ty = types.get(i).copied().unwrap_or(1);
            let is_added = ty == 3 || ty == 4;
            special.push(ty == 3);
            token_bytes.push(if is_added {
                t.as_bytes().to_vec()
            } else {
                byte_level_bytes(t, &dec)
            });
        }
        Ok(Self {
            inner,
            token_bytes,
            special,
            bos: id("tokenizer.ggml.bos_token_id"),
            eos: id("tokenizer.ggml.eos_token_id"),
            stop_ids: Vec::new(),
        })
    }

    /// A SentencePiece-style BPE tokenizer (`tokenizer.ggml.model = llama`: Llama 2, Mistral,
    /// Gemma, Phi-3) from GGUF metadata: pieces with `▁` for spaces and byte fallback. GGUF
    /// stores piece scores, not merges; the merges are rebuilt as transformers'
    /// `SentencePieceExtractor` does (every split of a piece into two pieces, highest piece
    /// score first). `tokenizer.ggml.add_space_prefix` (default true) prepends `▁`.
    fn from_gguf_spm(g: &GgufFile) -> LmResult<Self> {
        let tokens: Vec<String> = g
            .meta("tokenizer.ggml.tokens")
            .ok_or_else(|| tok_err("missing metadata `tokenizer.ggml.tokens`"))?
            .to_vec()
            .map_err(tok_err)?
            .iter()
            .map(|x| x.to_string().cloned().map_err(tok_err))
            .collect::<LmResult<_>>()?;
        let floats = |key: &str| -> LmResult<Vec<f32>> {
            match g.meta(key) {
                Some(v) => v
                    .to_vec()
                    .map_err(tok_err)?
                    .iter()
                    .map(|x| x.to_f32().map_err(tok_err))
                    .collect(),
                None => Ok(vec![0.0; tokens.len()]),
            }
        };
        let scores = floats("tokenizer.ggml.scores")?;
        let types: Vec<i32> = match g.meta("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(tok_err)?
                .iter()
                .map(|x| x.to_i32().map_err(tok_err))
                .collect::<LmResult<_>>()?,
            None => vec![1; tokens.len()],
        };
        if scores.len() != tokens.len() || types.len() != tokens.len() {
            return Err(tok_err("token, score and type lists differ in length"));
        }
        let mut vocab = serde_json::Map::with_capacity(tokens.len());
        let mut index: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
        let mut added = Vec::new();
        let mut unk = None;
        for (i, t) in tokens.iter().enumerate() {
            vocab.insert(t.clone(), json!(i));
            index.insert(t.as_str(), i);
            match types[i] {
                // 3 = control, 4 = user-defined (llama.cpp's token types).
                3 | 4 => added.push(
                    json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": types[i] == 3}),
                ),
                2 => unk = Some(t.clone()),
                _ => {}
            }
        }
        if vocab.len() != tokens.len() {
            return Err(tok_err("`tokenizer.ggml.tokens` repeats a token"));
        }
        // (left, right, score of the merged piece, ids of left and right).
        let mut merges: Vec<(&str, &str, f32, usize, usize)> = Vec::new();
        for (i, piece) in tokens.iter().enumerate() {
            if types[i] != 1 {
                continue;
            }
            let mut local = Vec::new();
            for (cut, _) in piece.char_indices().skip(1) {
                let (l, r) = piece.split_at(cut);
                if let (Some(&a), Some(&b)) = (index.get(l), index.get(r)) {
                    local.push((l, r, scores[i], a, b));
                }
            }
            local.sort_by_key(|m| (m.3, m.4));
            merges.extend(local);
        }
        // Highest score first; ties: longer left, then longer right piece (stable).
        merges.sort_by(|x, y| {
            y.2.total_cmp(&x.2)
                .then(y.0.len().cmp(&x.0.len()))
                .then(y.1.len().cmp(&x.1.len()))
        });
        let merges: Vec<Value> = merges.iter().map(|m| json!([m.0, m.1])).collect();
        let prefix = g
            .meta("tokenizer.ggml.add_space_prefix")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(true);
        let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
        let normalizer = if prefix {
            json!({"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "\u{2581}"}, replace]})
        } else {
            replace
        };
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": null,
            "post_processor": null,
            "decoder": null,
            "model": {"type": "BPE", "dropout": null, "unk_token": unk,
                "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
                "byte_fallback": true, "ignore_merges": false, "vocab": vocab, "merges": merges}
        });
        let mut t = Self::from_json(&spec.to_string(), None)?;
        let id = |key: &str| g.meta(key).and_then(|v| v.to_u32().ok());
        t.bos = id("tokenizer.ggml.bos_token_id");
        t.eos = id("tokenizer.ggml.eos_token_id");
        Ok(t)
    }

    /// Load a Hugging Face `tokenizer.json`. BOS/EOS come from `tokenizer_config.json` in the
    /// same directory when present; the stop ids ([`Tokenizer::stop_ids`]) from
    /// `generation_config.json`'s `eos_token_id` (a number or a list), else `config.json`'s.
    ///
    /// # Errors
    /// [`LmError::Io`], [`LmError::Tokenizer`].
    pub fn from_file(path: &Path) -> LmResult<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| LmError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        Self::from_json(&text, Some(path))
    }

    /// A tokenizer from `tokenizer.json` text; `path` (the file's location) finds the
    /// neighbouring `tokenizer_config.json` and `generation_config.json`.
    fn from_json(text: &str, path: Option<&Path>) -> LmResult<Self> {
        let json: Value = serde_json::from_str(text).map_err(tok_err)?;
        let inner = tokenizers::Tokenizer::from_bytes(text.as_bytes()).map_err(tok_err)?;
        let n = inner.get_vocab_size(true);
        let byte_level = json["decoder"]["type"] == "ByteLevel"
            || json["pre_tokenizer"]["type"] == "ByteLevel"
            || text.contains("\"ByteLevel\"");
        let mut added: HashMap<u32, (String, bool)> = HashMap::new();
        if let Some(arr) = json["added_tokens"].as_array() {
            for a in arr {
                if let (Some(id), Some(c)) = (a["id"].as_u64(), a["content"].as_str()) {
                    added.insert(
                        id as u32,
                        (c.to_string(), a["special"].as_bool().unwrap_or(false)),
                    );
                }
            }
        }
        let dec = byte_decoder();
        let mut token_bytes = Vec::with_capacity(n);
        let mut special = Vec::with_capacity(n);
        for id in 0..n as u32 {
            if let Some((c, s)) = added.get(&id) {
                token_bytes.push(c.as_bytes().to_vec());
                special.push(*s);
                continue;
            }
            let t = inner.id_to_token(id).unwrap_or_default();
            special.push(false);
            token_bytes.push(if byte_level {
                byte_level_bytes(&t, &dec)
            } else if let Some(hex) = t.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')) {
                u8::from_str_radix(hex, 16)
                    .map(|b| vec![b])
                    .unwrap_or_else(|_| t.into_bytes())
            } else {
                t.replace('\u{2581}', " ").into_bytes()
            });
        }
        let cfg: Value = path
            .and_then(Path::parent)
            .map(|d| d.join("tokenizer_config.json"))
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null);
        let named = |key: &str| -> Option<u32> {
            let v = &cfg[key];
            let s = v.as_str().or_else(|| v["content"].as_str())?;
            inner.token_to_id(s)
        };
        let dir = path.and_then(Path::parent);
        let stop_ids = ["generation_config.json", "config.json"]
            .iter()
            .find_map(|f| {
                let text = std::fs::read_to_string(dir?.join(f)).ok()?;
                let v: Value = serde_json::from_str(&text).ok()?;
                let raw: Vec<u64> = match &v["eos_token_id"] {
                    Value::Number(n) => n.as_u64().into_iter().collect(),
                    Value::Array(a) => a.iter().filter_map(Value::as_u64).collect(),
                    _ => return None,
                };
                let ids: Vec<u32> = raw
                    .into_iter()
                    .filter_map(|i| u32::try_from(i).ok())
                    .collect();
                Some(ids)
            })
            .unwrap_or_default();
        Ok(Self {
            bos: named("bos_token"),
            eos: named("eos_token"),
            inner,
            token_bytes,
            special,
            stop_ids,
        })
    }

    /// Number of token ids.
    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }

    /// The byte string of every token, indexed by id (special tokens: their text).
    pub fn token_bytes(&self) -> &[Vec<u8>] {
        &self.token_bytes
    }

    /// Whether a token is a special (control) token.
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// The beginning-of-sequence token, if the tokenizer defines one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// The end-of-sequence token, if the tokenizer defines one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// End-of-generation ids declared by the model directory (`generation_config.json` or
    /// `config.json` `eos_token_id`); empty for GGUF files, whose single EOS is
    /// [`Tokenizer::eos_id`].
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// The id of a token given its exact string (e.g. `"<|im_end|>"`).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Tokenize text. Special-token strings in the text (such as `<|im_start|>`) become their
    /// ids; no BOS is added.
    ///
    /// # Errors
    /// [`LmError::Tokenizer`].
    pub fn encode(&self, text: &str) -> LmResult<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Tokenize text with the tokenizer's post-processor (`add_special_tokens`: the BOS that
    /// Llama, Gemma and Phi-3 tokenizers prepend).
    ///
    /// # Errors
    /// [`LmError::Tokenizer`].
    pub fn encode_with_special(&self, text: &str) -> LmResult<Vec<u32>> {
        let enc = self.inner.encode(text, true).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Concatenated bytes of tokens (unknown ids contribute nothing).
    pub fn decode_bytes(&self, ids: &[u32]) -> Vec<u8> {
        let mut out = Vec::new();
        for &i in ids {
            if let Some(b) = self.token_bytes.get(i as usize) {
                out.extend_from_slice(b);
            }
        }
        out
    }

    /// Decoded text of tokens (invalid UTF-8 replaced by U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> String {
        String::from_utf8_lossy(&self.decode_bytes(ids)).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_decoder_is_a_bijection() {
        let d = byte_decoder();
        assert_eq!(d.len(), 256);
        let mut bytes: Vec<u8> = d.values().copied().collect();
        bytes.sort_unstable();
        bytes.dedup();
        assert_eq!(bytes.len(), 256);
        assert_eq!(byte_level_bytes("\u{120}hello\u{10a}", &d), b" hello\n");
    }
}
