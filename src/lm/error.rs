//! Typed errors of the language-model kernel.
//!
//! [`LmError`] describes what went wrong while loading a model, tokenizing, or running the
//! transformer; at the [`crate::Kernel`] boundary it converts into
//! [`crate::SmcError::Backend`] ([`crate::SmcError::TokenOutOfRange`] for bad token ids,
//! [`crate::SmcError::CapacityExceeded`] when the KV cache is exhausted).

use std::path::PathBuf;

use thiserror::Error;

use crate::core::error::SmcError;

/// Errors of the `lm` module.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum LmError {
    /// The model file does not exist. The message names the path only: how to get a model
    /// is the application's to say.
    #[error("model file not found: {path}")]
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
    #[error("unsupported model architecture `{0}` (supported: GGUF llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3; Hugging Face model_type llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3; see docs/models.md)")]
    UnsupportedArchitecture(String),
    /// The model's configuration asks for an option (or option value) the decoder does not
    /// implement; running without it would give a silently wrong model.
    #[error("unsupported option for model_type `{model_type}`: {option} (see docs/models.md)")]
    UnsupportedOption {
        /// The family.
        model_type: String,
        /// The option and its value.
        option: String,
    },
    /// The requested device is unknown, not compiled into this build, or cannot be opened.
    #[error("device `{device}` is not available: {reason}")]
    DeviceUnavailable {
        /// The name that was asked for.
        device: String,
        /// Why it cannot be used.
        reason: String,
    },
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
         of {capacity} are free (raise --cache-tokens, or lower --particles or --max-tokens)"
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
    /// An allocation sized by the request failed.
    #[error("cannot allocate {bytes} bytes for {what} (out of memory)")]
    OutOfMemory {
        /// What was being allocated.
        what: String,
        /// Bytes requested.
        bytes: u64,
    },
    /// The request would need more memory than the machine has available.
    #[error(
        "this request needs about {} for {what} but only {} is available; {hint} \
         (or pass --ignore-memory-check to try anyway)",
        human_bytes(*.needed), human_bytes(*.available)
    )]
    InsufficientMemory {
        /// Estimated bytes needed.
        needed: u64,
        /// Bytes available.
        available: u64,
        /// What needs the memory.
        what: String,
        /// What to lower.
        hint: String,
    },
    /// The prompt plus the generated tokens cannot fit the context window.
    #[error(
        "a prompt of {prompt} tokens plus up to {max_new_tokens} generated tokens ({}) exceed \
         the context window of {window} tokens (lower --max-tokens to {} at most, or shorten \
         the prompt)",
        .prompt + .max_new_tokens, .window.saturating_sub(*.prompt)
    )]
    RequestTooLong {
        /// Prompt tokens.
        prompt: usize,
        /// Generated tokens requested per particle.
        max_new_tokens: usize,
        /// The model's context window.
        window: usize,
    },
    /// A sequence handle unknown to the cache or kernel.
    #[error("unknown sequence handle {0}")]
    UnknownSequence(u64),
    /// An invalid option value.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// An error raised by candle (without the backtrace candle attaches when
    /// `RUST_BACKTRACE` is set: messages stay one line).
    #[error("candle: {0}")]
    Candle(candle_core::Error),
}

impl From<candle_core::Error> for LmError {
    fn from(e: candle_core::Error) -> Self {
        LmError::Candle(strip_backtrace(e))
    }
}

fn strip_backtrace(e: candle_core::Error) -> candle_core::Error {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => strip_backtrace(*inner),
        other => other,
    }
}

/// `1.5 GiB`, `12.0 MiB`, ...
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut x = b as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} bytes")
    } else {
        format!("{x:.1} {}", UNITS[u])
    }
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
            other => SmcError::Backend {
                context: "kernel error",
                source: crate::core::error::SourceError::new(other),
            },
        }
    }
}
