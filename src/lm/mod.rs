//! The language-model kernel (feature `lm`): a llama-family transformer on candle.
//!
//! | file | holds |
//! |---|---|
//! | `config.rs` | [`LlamaConfig`] and the header [`limits`] |
//! | `family.rs` | per-family options ([`ArchOptions`]) as data, read from `config.json` |
//! | `gguf.rs` | [`GgufFile`]: llama.cpp's format, dimensions and options from its metadata |
//! | `checkpoint.rs` | Hugging Face checkpoints: tensor names, `config.json` |
//! | `model/` | [`LlamaModel`]: weights loading behind one trait, layers, the batched forward pass, a reference pass |
//! | `quant/` | quantized weights (Q8_0, Q4_0, Q4_1) multiplied with int8 dot products, kernels picked at run time |
//! | `cache/` | [`PagedKvCache`]: block tables shared by a population, two attention back-ends behind one trait |
//! | `tokenizer.rs`, `chat.rs` | [`Tokenizer`] and [`ChatTemplate`] |
//! | `device.rs` | choosing a candle device by name ([`parse_device`]) |
//! | `kernel.rs` | [`TransformerKernel`], the [`crate::Kernel`] implementation |

mod cache;
mod chat;
mod checkpoint;
mod columns;
mod config;
mod cpu;
mod device;
mod error;
mod exp32;
mod family;
mod gguf;
mod kernel;
mod model;
mod quant;
mod tokenizer;

pub use cache::{AttentionPath, CacheLayout, CacheSeq, PagedKvCache, QueryMeta, ScoreOptions};
pub use chat::{ChatMessage, ChatTemplate, CHATML};
pub use checkpoint::{hf_name, hf_name_for};
pub use config::{limits, LlamaConfig, RopeStyle};
pub use cpu::{cpu_features, KERNELS_ENV};
pub use device::{device_name, parse_device, supported_devices};
pub use error::{human_bytes, LmError, LmResult};
pub use family::{parse_hf_config, Activation, ArchOptions, LayerKind, ModelType, RopeScaling};
pub use gguf::GgufFile;
pub use kernel::{
    available_memory, memory_estimate, read_config, KernelOptions, TransformerKernel,
};
pub use model::{LlamaModel, LoadOptions, LogitRows, SeqTokens, WeightFormat};
pub use quant::cpu_kernels;
pub use tokenizer::Tokenizer;
