//! Typed errors of the language-model kernel.
//!
//! [`LmError`] describes what went wrong while loading a model, tokenizing, or running the
//! transformer; at the [`crate::Kernel`] boundary it converts into
//! [`crate::SmcError::Kernel`] ([`crate::SmcError::TokenOutOfRange`] for bad token ids,
//! [`crate::SmcError::CapacityExceeded`] when the KV cache is exhausted).

use std::path::PathBuf;

use thiserror::Error;

use crate::error::SmcError;

/// Errors of the `lm` module.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum LmError {
    /// The model file does not exist.
    #[error(
        "model file not found: {path} (run scripts/fetch-model.sh to download \
         SmolLM2-135M-Instruct, or set SMC_STEER_MODEL to a GGUF file)"
    )]
    ModelNotFound {
        /// The path that was tried.
        path: PathBuf,
    },
    /// An I/O error while reading a model or tokenizer file.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The model file is truncated or not a valid GGUF / safetensors file.
    #[error("invalid or corrupt model file {path}: {reason}")]
    CorruptModel {
        /// The file.
        path: PathBuf,
        /// What the reader reported.
        reason: String,
    },
    /// A required metadata key or tensor is missing or has the wrong type or shape.
    #[error("model format error: {0}")]
    Format(String),
    /// The file holds an architecture this crate does not implement.
    #[error("unsupported model architecture `{0}` (supported: GGUF `llama`/`mistral`, Hugging Face LlamaForCausalLM/MistralForCausalLM)")]
    UnsupportedArchitecture(String),
    /// The tokenizer could not be built or failed on an input.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// The tokenizer and the model disagree on the vocabulary.
    #[error("vocabulary mismatch: the tokenizer has {tokenizer} tokens but the model has {model}")]
    VocabMismatch {
        /// Tokens known to the tokenizer.
        tokenizer: usize,
        /// Rows of the model's output layer.
        model: usize,
    },
    /// The chat template failed to render.
    #[error("chat template error: {0}")]
    ChatTemplate(String),
    /// A prompt with no tokens.
    #[error("the prompt is empty (a language model needs at least one token to condition on)")]
    EmptyPrompt,
    /// A request without tokens to append.
    #[error("an extend request for sequence {0} has no tokens")]
    NoTokens(u64),
    /// A sequence would exceed the model's context window.
    #[error("sequence of {len} tokens exceeds the context window of {max} tokens")]
    ContextOverflow {
        /// The length the sequence would have.
        len: usize,
        /// The model's context window.
        max: usize,
    },
    /// A token id outside the model's vocabulary.
    #[error("token id {token} is out of range for a vocabulary of {vocab_size} tokens")]
    TokenOutOfRange {
        /// The token.
        token: u32,
        /// The vocabulary size.
        vocab_size: usize,
    },
    /// The KV-cache pool has no free blocks left.
    #[error(
        "KV cache exhausted: {needed} more blocks of {block_size} tokens needed but only {free} \
         of {capacity} are free (raise the cache capacity or use fewer particles/tokens)"
    )]
    CacheExhausted {
        /// Blocks the operation needed.
        needed: usize,
        /// Free blocks.
        free: usize,
        /// Total blocks in the pool.
        capacity: usize,
        /// Tokens per block.
        block_size: usize,
    },
    /// A sequence handle unknown to the cache or kernel.
    #[error("unknown sequence handle {0}")]
    UnknownSequence(u64),
    /// An invalid option value.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// An error raised by candle.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Shorthand for results of the `lm` module.
pub type LmResult<T> = std::result::Result<T, LmError>;

impl From<LmError> for SmcError {
    fn from(e: LmError) -> Self {
        match e {
            LmError::TokenOutOfRange { token, vocab_size } => {
                SmcError::TokenOutOfRange { token, vocab_size }
            }
            e @ LmError::CacheExhausted { .. } => SmcError::CapacityExceeded(e.to_string()),
            other => SmcError::Kernel(other.to_string()),
        }
    }
}
