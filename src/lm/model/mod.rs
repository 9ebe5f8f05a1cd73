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
//! ([`WeightFormat::F32`], the reference); [`WeightFormat::Bf16`] halves them, the block
//! formats ([`WeightFormat::Q8_0`], [`WeightFormat::Native`], ...) multiply with int8 dot
//! products, and [`WeightFormat::Quantized`] keeps GGUF's quantized matrices for candle's
//! `QMatMul`. Dense matrices are kept as `W: [out, in]` (as the files store them) and
//! multiplied by dot-product register tiles (`dense`, AVX2+FMA or AVX-512) or, without those
//! instructions, candle's GEMM.

mod activation;
mod dense;
mod forward;
mod layers;
mod load;
mod reference;

use std::sync::Arc;

use candle_core::{Device, Tensor};

pub use load::{LoadOptions, WeightFormat};

use crate::lm::cache::{AttentionPath, CacheSeq, PagedKvCache};
use crate::lm::config::LlamaConfig;
use crate::lm::error::{LmError, LmResult};
use crate::lm::family::ArchOptions;
use layers::{Embedding, Layer, Linear, Rope};

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

/// The weights of a llama-family model (the families are data: [`ArchOptions`]). The weights
/// are immutable; all per-sequence state lives in a [`PagedKvCache`] passed to
/// [`LlamaModel::forward`], so one model serves a whole particle population whose sequences
/// share prefixes. Supported families and how each is verified: `docs/models.md`.
#[derive(Debug, Clone)]
pub struct LlamaModel {
    config: LlamaConfig,
    arch: ArchOptions,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    /// RoPE frequencies: global layers first, then (Gemma 3) sliding layers. The angles of
    /// a position are computed when a token at that position is processed (not tabulated for
    /// the whole context window, whose declared size comes from the model file and may be
    /// huge).
    ropes: Vec<Rope>,
}

impl LlamaModel {
    /// The model's hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Bytes the weights occupy in memory: the embedding, every matrix and norm, and the
    /// output layer (not counted again when it is the tied embedding's own matrix).
    pub fn weight_bytes(&self) -> usize {
        let t = |x: &Tensor| x.elem_count() * x.dtype().size_in_bytes();
        let o = |x: &Option<Tensor>| x.as_ref().map_or(0, t);
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                t(&l.attn_norm)
                    + t(&l.ffn_norm)
                    + o(&l.post_attn_norm)
                    + o(&l.post_ffw_norm)
                    + l.qkv.bytes()
                    + l.gate_up.bytes()
                    + l.wo.bytes()
                    + l.w_down.bytes()
                    + l.qkv_bias.as_ref().map_or(0, |b| b.iter().map(t).sum())
                    + l.qk_norm.as_ref().map_or(0, |b| b.iter().map(t).sum())
            })
            .sum();
        // A tied output layer shares the embedding's matrix (dense or blocks).
        let head = match (&self.embed, &self.lm_head) {
            (Embedding::Blocks(e), Linear::Int(h)) if Arc::ptr_eq(e, h) => 0,
            (Embedding::Dense(e), Linear::Dense(h)) if e.id() == h.id() => 0,
            _ => self.lm_head.bytes(),
        };
        self.embed.bytes() + t(&self.norm) + layers + head
    }

    /// The device holding the weights (where the forward pass runs).
    pub fn device(&self) -> &Device {
        self.norm.device()
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
            self.device(),
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lm::RopeStyle;
    use crate::testing::max_abs_diff;

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
