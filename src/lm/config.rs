//! Hyper-parameters of a llama-family model ([`LlamaConfig`]) and the limits a model file's
//! header must respect ([`limits`]).

use super::cache::CacheLayout;
use super::error::{LmError, LmResult};

/// How rotary embeddings pair the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(2i, 2i+1)`: GGUF llama files (llama.cpp permutes the query/key weights).
    Interleaved,
    /// Pairs `(i, i + d/2)`: Hugging Face checkpoints ("neox" style).
    Half,
}

/// Hyper-parameters of a llama-family model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Rows of the embedding and output matrices.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Width of the SwiGLU layer.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub n_layers: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (divides `n_heads`).
    pub n_kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// RoPE pairing convention.
    pub rope_style: RopeStyle,
    /// RMSNorm epsilon.
    pub rms_eps: f64,
    /// Context window (positions for which rotary tables exist).
    pub max_seq_len: usize,
    /// Whether the output layer reuses the embedding matrix.
    pub tie_embeddings: bool,
}

/// The largest dimensions a model may declare. They are far above any released llama-family
/// model and keep every size computed from a model file's header (weights, KV cache,
/// activations) well inside `usize`, so that a corrupt or hostile header is refused before
/// anything is allocated.
pub mod limits {
    /// Vocabulary rows.
    pub const MAX_VOCAB: usize = 1 << 22;
    /// Model width, head dimension times heads, and SwiGLU width.
    pub const MAX_WIDTH: usize = 1 << 18;
    /// Decoder blocks.
    pub const MAX_LAYERS: usize = 1 << 12;
    /// Query or key/value heads.
    pub const MAX_HEADS: usize = 1 << 12;
    /// Context window (positions); larger declared windows are capped to it.
    pub const MAX_CONTEXT: usize = 1 << 24;
}

impl LlamaConfig {
    /// Check the internal consistency of the dimensions and that each is within
    /// [`limits`].
    ///
    /// # Errors
    /// [`LmError::Format`].
    pub fn validate(&self) -> LmResult<()> {
        let bad = |m: String| Err(LmError::Format(m));
        for (name, value, max) in [
            ("vocabulary size", self.vocab_size, limits::MAX_VOCAB),
            ("hidden size", self.hidden_size, limits::MAX_WIDTH),
            (
                "intermediate size",
                self.intermediate_size,
                limits::MAX_WIDTH,
            ),
            ("layer count", self.n_layers, limits::MAX_LAYERS),
            ("head count", self.n_heads, limits::MAX_HEADS),
            ("key/value head count", self.n_kv_heads, limits::MAX_HEADS),
            ("head dimension", self.head_dim, limits::MAX_WIDTH),
            (
                "query width (heads x head dimension)",
                self.n_heads.saturating_mul(self.head_dim),
                limits::MAX_WIDTH,
            ),
            ("context window", self.max_seq_len, limits::MAX_CONTEXT),
        ] {
            if value > max {
                return bad(format!(
                    "{name} {value} exceeds the supported maximum {max} (corrupt model file?)"
                ));
            }
        }
        if self.vocab_size == 0
            || self.hidden_size == 0
            || self.intermediate_size == 0
            || self.n_layers == 0
            || self.n_heads == 0
            || self.n_kv_heads == 0
            || self.head_dim == 0
            || self.max_seq_len == 0
        {
            return bad(format!("a model dimension is zero: {self:?}"));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!(
                "{} query heads are not a multiple of {} key/value heads",
                self.n_heads, self.n_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head dimension {} is odd (RoPE needs pairs)",
                self.head_dim
            ));
        }
        if !(self.rope_theta > 0.0 && self.rms_eps >= 0.0) {
            return bad(format!(
                "invalid rope_theta {} or rms_eps {}",
                self.rope_theta, self.rms_eps
            ));
        }
        Ok(())
    }

    /// A cache layout for this model with `num_blocks` blocks of `block_size` tokens.
    pub fn cache_layout(&self, block_size: usize, num_blocks: usize) -> CacheLayout {
        CacheLayout {
            n_layers: self.n_layers,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            block_size,
            num_blocks,
        }
    }
}
