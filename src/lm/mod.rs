//! The language-model kernel (feature `lm`): a llama-family transformer on candle.
//!
//! * [`model`]: the transformer ([`LlamaModel`]), loaded from GGUF or safetensors, with the
//!   KV cache kept outside the weights.
//! * [`family`]: the per-family options (Llama 3, Qwen2/3, Gemma 2/3, Phi-3, Mistral) as
//!   data, read from `config.json`.
//! * [`cache`]: the paged, reference-counted KV cache shared by a particle population.
//! * [`tokenizer`]: BPE tokenizers (byte-level and SentencePiece-style) from GGUF metadata or
//!   `tokenizer.json`.
//! * [`chat`]: the model's own chat template, rendered with minijinja.
//! * [`kernel`]: [`TransformerKernel`], the [`crate::Kernel`] implementation.

pub mod cache;
pub mod chat;
pub mod error;
pub mod family;
pub mod kernel;
pub mod model;
pub mod tokenizer;

pub use cache::{AttentionPath, CacheLayout, CacheSeq, PagedKvCache, QueryMeta, ScoreOptions};
pub use chat::{ChatMessage, ChatTemplate};
pub use error::{human_bytes, LmError, LmResult};
pub use family::{Activation, ArchOptions, LayerKind, ModelType, RopeScaling};
pub use kernel::{
    available_memory, memory_estimate, read_config, KernelOptions, TransformerKernel,
};
pub use model::{
    GgufFile, LlamaConfig, LlamaModel, LoadOptions, LogitRows, RopeStyle, SeqTokens, WeightFormat,
};
pub use tokenizer::Tokenizer;
