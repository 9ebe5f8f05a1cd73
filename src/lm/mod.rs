//! The language-model kernel (feature `lm`): a llama-family transformer on candle.
//!
//! * [`model`]: the transformer ([`LlamaModel`]), loaded from GGUF or safetensors, with the
//!   KV cache kept outside the weights.
//! * [`cache`]: the paged, reference-counted KV cache shared by a particle population.
//! * [`tokenizer`]: byte-level BPE tokenizers from GGUF metadata or `tokenizer.json`.
//! * [`chat`]: the model's own chat template, rendered with minijinja.
//! * [`kernel`]: [`TransformerKernel`], the [`crate::Kernel`] implementation.

pub mod cache;
pub mod error;
pub mod model;

pub use cache::{CacheLayout, CacheSeq, PagedKvCache};
pub use error::{LmError, LmResult};
pub use model::{
    GgufFile, LlamaConfig, LlamaModel, LoadOptions, LogitRows, RopeStyle, SeqTokens, WeightFormat,
};
