//! [`TransformerKernel`]: the SMC core's [`Kernel`] on a llama-family transformer.
//!
//! * [`Kernel::start`] runs the prompt through the model once, at batch size 1, and keeps its
//!   keys and values in the shared [`PagedKvCache`].
//! * [`Kernel::fork`] shares every block of the parent (resampling copies nothing).
//! * [`Kernel::extend`] appends tokens to a whole batch of sequences in **one** forward pass;
//!   sequences may append different numbers of tokens (forced tokens, infilling).
//!
//! Distributions have `vocab + 1` entries: every stop token of the model (`<|endoftext|>`,
//! `<|im_end|>`, the GGUF's EOS id, ...) has its probability moved into the final EOS entry
//! (log-sum-exp) and its own entry set to `-inf`, so the core sees exactly one way to end.

use std::collections::HashSet;
use std::path::Path;

use candle_core::Device;
use rayon::prelude::*;

use super::cache::{AttentionPath, CacheSeq, PagedKvCache};
use super::chat::{ChatMessage, ChatTemplate};
use super::config::LlamaConfig;
use super::error::{LmError, LmResult};
use super::gguf::GgufFile;
use super::model::{LlamaModel, LoadOptions, LogitRows, SeqTokens, WeightFormat};
use super::tokenizer::Tokenizer;
use crate::core::error::{Result, SmcError};
use crate::core::kernel::{Extend, Extension, Kernel, SeqId};
use crate::core::vocab::{TokenId, Vocabulary};

/// Strings that end generation when the tokenizer has them as special (control) tokens.
const STOP_STRINGS: &[&str] = &[
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "</s>",
];

/// Options of a [`TransformerKernel`].
#[derive(Debug, Clone)]
pub struct KernelOptions {
    /// Weight storage (f32 by default).
    pub weights: WeightFormat,
    /// Tokens per KV-cache block.
    pub block_size: usize,
    /// Tokens the KV cache can hold in total (all sequences, shared tokens counted once).
    /// Default (`None`): sized from the request and grown when a prompt starts, to the
    /// prompt (stored once) plus `particles * (max_new_tokens + block_size)` (each particle's
    /// growth, with one partly filled block copied on write), the growth capped by the
    /// context window. A fixed size never grows.
    pub cache_tokens: Option<usize>,
    /// Expected number of particles (sizes the default cache).
    pub particles: usize,
    /// Expected number of generated tokens per particle (sizes the default cache).
    pub max_new_tokens: usize,
    /// Cap on the context window.
    pub max_seq_len: Option<usize>,
    /// Softmax temperature (1 = the model's distribution).
    pub temperature: f64,
    /// Attention back-end over the paged cache (CPU block-table kernel by default;
    /// [`AttentionPath::Gather`] uses candle operations only, for any device). On a device
    /// other than the CPU the gather back-end is always used.
    pub attention: AttentionPath,
    /// Where the weights, the KV cache and the forward pass live (default: the CPU). See
    /// [`crate::lm::parse_device`].
    pub device: Device,
    /// Refuse a request whose estimated memory ([`memory_estimate`]) exceeds
    /// [`KernelOptions::memory_limit`] or, without one, the memory the system reports as
    /// available ([`LmError::InsufficientMemory`]). On by default.
    pub check_memory: bool,
    /// Memory the kernel may plan for, in bytes (default: what the system reports as
    /// available when a request is sized).
    pub memory_limit: Option<u64>,
}

impl Default for KernelOptions {
    fn default() -> Self {
        Self {
            weights: WeightFormat::F32,
            block_size: 4,
            cache_tokens: None,
            particles: 64,
            max_new_tokens: 256,
            max_seq_len: None,
            temperature: 1.0,
            attention: AttentionPath::Cpu,
            device: Device::Cpu,
            check_memory: true,
            memory_limit: None,
        }
    }
}

/// Memory a request needs beyond the weights, in bytes: the KV cache for the prompt (stored
/// once) plus `particles` sequences growing by `max_new_tokens` (each with one partly filled
/// block of `block_size` copied on write), and the activations of one step (a logits row and
/// the distributions built from it per particle, the hidden states of the prompt's forward
/// pass). `None` when the size overflows. An estimate, meant to refuse what cannot fit.
pub fn memory_estimate(
    c: &LlamaConfig,
    particles: usize,
    prompt_tokens: usize,
    max_new_tokens: usize,
    block_size: usize,
) -> Option<u64> {
    let kv = kv_tokens(particles, prompt_tokens, max_new_tokens, block_size)?
        .checked_mul(c.cache_layout(block_size, 1).bytes_per_token())?;
    // Per particle and step: f32 logits, the f64 distribution and two f64 working copies
    // (proposal, mask) over the vocabulary plus EOS.
    let per_row = c.vocab_size.checked_add(1)?.checked_mul(4 + 3 * 8)?;
    let step = particles.max(1).checked_mul(per_row)?;
    // Per prompt token: the residual stream, its norm, attention output and projections,
    // the SwiGLU gate and up halves (f32).
    let width =
        4 * c.hidden_size + 2 * c.intermediate_size + (c.n_heads + 2 * c.n_kv_heads) * c.head_dim;
    let prompt = prompt_tokens.max(1).checked_mul(width)?.checked_mul(4)?;
    let total = kv.checked_add(step)?.checked_add(prompt)?;
    u64::try_from(total).ok()
}

/// KV-cache tokens for a prompt shared by `particles` sequences growing by `max_new_tokens`.
fn kv_tokens(
    particles: usize,
    prompt_tokens: usize,
    max_new_tokens: usize,
    block_size: usize,
) -> Option<usize> {
    let prompt = prompt_tokens
        .div_ceil(block_size.max(1))
        .checked_mul(block_size)?;
    let growth = max_new_tokens
        .div_ceil(block_size.max(1))
        .checked_add(1)?
        .checked_mul(block_size)?
        .checked_mul(particles.max(1))?;
    prompt.checked_add(growth)
}

/// Memory the system reports as available (Linux: `MemAvailable`, lowered to the cgroup's
/// remaining limit when there is one); `None` where unknown.
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let mut avail = kib.saturating_mul(1024);
    let read = |p: &str| -> Option<u64> { std::fs::read_to_string(p).ok()?.trim().parse().ok() };
    if let (Some(max), Some(cur)) = (
        read("/sys/fs/cgroup/memory.max"),
        read("/sys/fs/cgroup/memory.current"),
    ) {
        avail = avail.min(max.saturating_sub(cur));
    }
    Some(avail)
}

/// A model's hyper-parameters read from its file header or `config.json` only (no
/// weights), validated, the context window capped as when loading: enough to check a request
/// before loading ([`KernelOptions::check`]).
///
/// # Errors
/// As [`TransformerKernel::load`] for the header.
pub fn read_config(path: &Path) -> LmResult<LlamaConfig> {
    let mut c = if path.is_dir() {
        super::checkpoint::hf_config(path)?
    } else {
        super::gguf::gguf_config(&GgufFile::open(path)?.content)?
    };
    c.max_seq_len = c.max_seq_len.min(super::config::limits::MAX_CONTEXT);
    c.validate()?;
    Ok(c)
}

impl KernelOptions {
    /// Check a request against a model before loading it: the generation must leave room
    /// for a prompt in the context window, and (with [`KernelOptions::check_memory`]) the
    /// memory estimate without the prompt must fit.
    ///
    /// # Errors
    /// [`LmError::RequestTooLong`], [`LmError::InsufficientMemory`],
    /// [`LmError::InvalidConfig`].
    pub fn check(&self, c: &LlamaConfig) -> LmResult<()> {
        if self.max_new_tokens >= c.max_seq_len {
            return Err(LmError::RequestTooLong {
                prompt: 1,
                max_new_tokens: self.max_new_tokens,
                window: c.max_seq_len,
            });
        }
        check_request(c, self, 0)
    }
}

/// Bytes of logits normalised and copied to the host at a time on a device other than the
/// CPU: small enough that the allocator hands one chunk's host memory to the next.
const DEVICE_CHUNK_BYTES: usize = 8 << 20;

/// Role of one output row of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Row {
    /// An ordinary token.
    Token,
    /// A stop token: its mass goes to EOS.
    Stop,
    /// A row without a tokenizer entry (embedding padding): probability zero.
    Padding,
}

/// The transformer kernel: a [`LlamaModel`], its tokenizer and chat template and one
/// [`PagedKvCache`] for the whole population, as a [`crate::Kernel`]: one batched forward
/// pass per step, next-token log-probabilities in f64 with stop tokens merged into EOS.
#[derive(Debug)]
pub struct TransformerKernel {
    model: LlamaModel,
    tokenizer: Option<Tokenizer>,
    chat: Option<ChatTemplate>,
    vocab: Vocabulary,
    cache: PagedKvCache,
    /// Model rows whose mass goes to EOS.
    stop: Vec<u32>,
    /// What each output row is.
    kind: Vec<Row>,
    temperature: f64,
    opts: KernelOptions,
    /// Distribution buffers given back by the engine ([`Kernel::recycle`]), filled by the
    /// next [`Kernel::extend`].
    spare: Vec<Vec<f64>>,
}

impl TransformerKernel {
    /// Load a model: a GGUF file, or a Hugging Face directory (`config.json`,
    /// `*.safetensors`, `tokenizer.json`), at the path given: a default location is the
    /// application's choice (the command line's is `$SMC_STEER_MODEL`, then `models/`).
    ///
    /// # Errors
    /// Every [`LmError`] of loading: missing file, corrupt file, unsupported architecture,
    /// tokenizer problems, vocabulary mismatch.
    pub fn load(path: &Path, opts: KernelOptions) -> LmResult<Self> {
        let load = LoadOptions {
            weights: opts.weights,
            max_seq_len: opts.max_seq_len,
            device: opts.device.clone(),
        };
        if path.is_dir() {
            let model = LlamaModel::from_safetensors(path, &load)?;
            let tokenizer = Tokenizer::from_file(&path.join("tokenizer.json"))?;
            let chat = hf_chat_template(path, &tokenizer)?;
            return Self::from_parts(model, Some(tokenizer), chat, opts);
        }
        let mut gguf = GgufFile::open(path)?;
        let model = LlamaModel::from_gguf_file(&mut gguf, &load)?;
        // A tokenizer that cannot be built from the file's metadata is a problem of the
        // model file, not of the request.
        let tokenizer = Tokenizer::from_gguf(&gguf).map_err(|e| match e {
            LmError::Tokenizer(reason) => LmError::CorruptModel {
                path: path.to_path_buf(),
                reason: format!("tokenizer metadata: {reason}"),
            },
            other => other,
        })?;
        // llama.cpp's files have exactly one embedding row per token.
        let rows = model.config().vocab_size;
        if tokenizer.vocab_size() != rows {
            return Err(LmError::VocabMismatch {
                tokenizer: tokenizer.vocab_size(),
                model: rows,
            });
        }
        let chat = ChatTemplate::from_gguf(&gguf)?;
        Self::from_parts(model, Some(tokenizer), chat, opts)
    }

    /// Assemble a kernel from a model and (optionally) its tokenizer and chat template.
    ///
    /// Without a tokenizer, token `i` has the bytes `"<i>"` and there is no stop token (used
    /// with random test models).
    ///
    /// # Errors
    /// [`LmError::VocabMismatch`] when the tokenizer has more tokens than the model has
    /// output rows; [`LmError::InvalidConfig`] for bad options.
    pub fn from_parts(
        model: LlamaModel,
        tokenizer: Option<Tokenizer>,
        chat: Option<ChatTemplate>,
        opts: KernelOptions,
    ) -> LmResult<Self> {
        if !(opts.temperature.is_finite() && opts.temperature > 0.0) {
            return Err(LmError::InvalidConfig(format!(
                "temperature must be positive and finite (got {})",
                opts.temperature
            )));
        }
        let n = model.config().vocab_size;
        let (bytes, known, stop) = match &tokenizer {
            Some(t) => {
                if t.vocab_size() > n {
                    return Err(LmError::VocabMismatch {
                        tokenizer: t.vocab_size(),
                        model: n,
                    });
                }
                for (what, id) in [("BOS", t.bos_id()), ("EOS", t.eos_id())] {
                    if let Some(id) = id.filter(|&i| i as usize >= t.vocab_size()) {
                        return Err(LmError::Format(format!(
                            "the {what} token id {id} is outside the vocabulary of {} tokens",
                            t.vocab_size()
                        )));
                    }
                }
                // Only as special tokens: `</s>` is ordinary text in Qwen's vocabulary
                // (id 128247) and an HTML tag in Gemma 3's (212, not special).
                let mut stop: Vec<u32> = STOP_STRINGS
                    .iter()
                    .filter_map(|s| t.token_id(s))
                    .filter(|&id| t.is_special(id))
                    .collect();
                stop.extend(t.eos_id());
                stop.extend_from_slice(t.stop_ids());
                stop.retain(|&s| (s as usize) < n);
                let stop: Vec<u32> = stop
                    .into_iter()
                    .collect::<HashSet<_>>()
                    .into_iter()
                    .collect();
                let mut bytes = t.token_bytes().to_vec();
                bytes.resize(n, Vec::new());
                (bytes, t.vocab_size(), stop)
            }
            None => (
                (0..n).map(|i| format!("<{i}>").into_bytes()).collect(),
                n,
                Vec::new(),
            ),
        };
        let mut stop = stop;
        stop.sort_unstable();
        let mut kind: Vec<Row> = (0..n)
            .map(|i| if i < known { Row::Token } else { Row::Padding })
            .collect();
        for &s in &stop {
            kind[s as usize] = Row::Stop;
        }
        let vocab = Vocabulary::new(bytes).map_err(|e| LmError::InvalidConfig(e.to_string()))?;
        if opts.block_size == 0 {
            return Err(LmError::InvalidConfig("block size must be positive".into()));
        }
        let window = model.config().max_seq_len;
        let capacity = match opts.cache_tokens {
            Some(c) => c,
            // The particles' growth now; the prompt's blocks are added when it starts.
            None => {
                check_request(model.config(), &opts, 0)?;
                kv_tokens(
                    opts.particles,
                    0,
                    opts.max_new_tokens.min(window),
                    opts.block_size,
                )
                .ok_or_else(|| too_large(&opts))?
            }
        };
        // The host back-end keeps its pool in host memory; elsewhere the pool stays on the
        // model's device.
        let attention = if model.device().is_cpu() {
            opts.attention
        } else {
            AttentionPath::Gather
        };
        let cache = model.new_cache_with(opts.block_size, capacity.max(1), attention)?;
        Ok(Self {
            model,
            tokenizer,
            chat,
            vocab,
            cache,
            stop,
            kind,
            temperature: opts.temperature,
            opts,
            spare: Vec::new(),
        })
    }

    /// Size the kernel for the next runs: `particles` sequences generating up to
    /// `max_new_tokens` tokens each (the KV cache grows accordingly when a prompt starts,
    /// unless [`KernelOptions::cache_tokens`] fixed it).
    ///
    /// # Errors
    /// [`LmError::InsufficientMemory`] (with [`KernelOptions::check_memory`]) when the
    /// request cannot fit without a prompt already; [`LmError::InvalidConfig`] when it
    /// overflows.
    pub fn set_request(&mut self, particles: usize, max_new_tokens: usize) -> LmResult<()> {
        let mut opts = self.opts.clone();
        opts.particles = particles;
        opts.max_new_tokens = max_new_tokens;
        check_request(self.model.config(), &opts, 0)?;
        self.opts = opts;
        Ok(())
    }

    /// Check that `prompt_tokens` plus the configured generation fit the context window
    /// and (with [`KernelOptions::check_memory`]) the memory limit, before any model work.
    ///
    /// # Errors
    /// [`LmError::RequestTooLong`], [`LmError::InsufficientMemory`].
    pub fn check_fits(&self, prompt_tokens: usize) -> LmResult<()> {
        let window = self.model.config().max_seq_len;
        if prompt_tokens.saturating_add(self.opts.max_new_tokens) > window {
            return Err(LmError::RequestTooLong {
                prompt: prompt_tokens,
                max_new_tokens: self.opts.max_new_tokens,
                window,
            });
        }
        if self.opts.cache_tokens.is_some() {
            return Ok(());
        }
        check_request(self.model.config(), &self.opts, prompt_tokens)
    }

    /// Grow the cache (when its size is not fixed) so that a prompt of `prompt_tokens` and
    /// the configured particles' growth fit next to what is already stored.
    fn reserve_for_prompt(&mut self, prompt_tokens: usize) -> LmResult<()> {
        if self.opts.cache_tokens.is_some() {
            return Ok(());
        }
        let window = self.model.config().max_seq_len;
        let growth = self
            .opts
            .max_new_tokens
            .min(window.saturating_sub(prompt_tokens));
        check_request(self.model.config(), &self.opts, prompt_tokens)?;
        let bs = self.opts.block_size;
        let needed = kv_tokens(self.opts.particles, prompt_tokens, growth, bs)
            .ok_or_else(|| too_large(&self.opts))?
            / bs;
        let blocks = self
            .cache
            .used_blocks()
            .checked_add(needed)
            .ok_or_else(|| too_large(&self.opts))?;
        self.cache.grow(blocks)
    }

    /// The model.
    pub fn model(&self) -> &LlamaModel {
        &self.model
    }

    /// The KV cache (for statistics such as [`PagedKvCache::used_bytes`]).
    pub fn cache(&self) -> &PagedKvCache {
        &self.cache
    }

    /// The tokenizer, when the kernel was loaded from a model file.
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_ref()
    }

    /// Model token ids whose probability is merged into EOS.
    pub fn stop_tokens(&self) -> &[u32] {
        &self.stop
    }

    /// The softmax temperature.
    pub fn temperature(&self) -> f64 {
        self.temperature
    }

    /// Change the softmax temperature (affects later calls only).
    ///
    /// # Errors
    /// [`LmError::InvalidConfig`] unless positive and finite.
    pub fn set_temperature(&mut self, t: f64) -> LmResult<()> {
        if !(t.is_finite() && t > 0.0) {
            return Err(LmError::InvalidConfig(format!(
                "temperature must be positive (got {t})"
            )));
        }
        self.temperature = t;
        Ok(())
    }

    /// Tokenize text (special-token markers become their ids; no BOS is added).
    ///
    /// # Errors
    /// [`LmError::Tokenizer`] (also when the kernel has no tokenizer).
    pub fn encode(&self, text: &str) -> LmResult<Vec<TokenId>> {
        self.tokenizer
            .as_ref()
            .ok_or_else(|| LmError::Tokenizer("this kernel has no tokenizer".into()))?
            .encode(text)
    }

    /// Decoded text of tokens (EOS and unknown ids contribute nothing).
    pub fn decode(&self, tokens: &[TokenId]) -> String {
        self.vocab.decode(tokens)
    }

    /// Render a conversation with the model's chat template.
    ///
    /// # Errors
    /// [`LmError::ChatTemplate`] (also when the model has no template).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> LmResult<String> {
        self.chat
            .as_ref()
            .ok_or_else(|| LmError::ChatTemplate("the model has no chat template".into()))?
            .apply(messages, add_generation_prompt)
    }

    /// Token ids of a conversation rendered with the chat template, ending with the
    /// assistant header (ready for [`Kernel::start`]).
    ///
    /// # Errors
    /// As [`TransformerKernel::apply_chat_template`] and [`TransformerKernel::encode`].
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> LmResult<Vec<TokenId>> {
        self.encode(&self.apply_chat_template(messages, true)?)
    }

    /// Normalised log-probabilities over `vocab + 1` symbols from one row of logits.
    fn distribution(&self, logits: &[f32]) -> Vec<f64> {
        let mut out = Vec::new();
        self.distribution_into(logits, &mut out);
        out
    }

    /// [`Self::distribution`] written into `out` (whatever it held before), so that a
    /// recycled buffer is filled in place.
    fn distribution_into(&self, logits: &[f32], out: &mut Vec<f64>) {
        let n = self.vocab.len();
        let inv_t = 1.0 / self.temperature;
        let mut max = f64::NEG_INFINITY;
        for (&l, &k) in logits.iter().zip(&self.kind) {
            if k != Row::Padding {
                max = max.max(f64::from(l) * inv_t);
            }
        }
        // Tokens' shifted logits first (stop and padding rows stay `-inf`), their mass in
        // one vectorised pass; the few stop rows' mass, pooled into the EOS entry, apart.
        let mut stop_sum = 0.0;
        out.clear();
        out.resize(n + 1, f64::NEG_INFINITY);
        for ((&l, &k), o) in logits.iter().zip(&self.kind).zip(out.iter_mut()) {
            let z = f64::from(l) * inv_t - max;
            match k {
                Row::Token => *o = z,
                Row::Stop => stop_sum += z.exp(),
                Row::Padding => {}
            }
        }
        let sum = crate::core::exp::sum_exp_shifted(&out[..n], 0.0) + stop_sum;
        let lse = sum.ln();
        for o in out.iter_mut().take(n) {
            *o -= lse;
        }
        out[n] = if stop_sum > 0.0 {
            stop_sum.ln() - lse
        } else {
            f64::NEG_INFINITY
        };
    }

    /// [`Self::distribution`] of every row of `logits: [rows, vocab]` into `out` (one
    /// buffer per row), in parallel, read where the forward pass left them on the CPU
    /// ([`for_each_host_row`]); on another device the rows are normalised there
    /// ([`Self::device_distributions`]).
    fn distributions(&self, logits: &candle_core::Tensor, out: &mut [Vec<f64>]) -> LmResult<()> {
        let (rows, width) = logits.dims2()?;
        if rows != out.len() {
            return Err(LmError::InvalidConfig(format!(
                "{rows} rows of logits for {} distributions",
                out.len()
            )));
        }
        if !logits.device().is_cpu() && width > 0 {
            return self.device_distributions(logits, out, DEVICE_CHUNK_BYTES / (4 * width));
        }
        for_each_host_row(logits, out, |r, o| self.distribution_into(r, o))
    }

    /// The distributions of `logits: [rows, vocab]` normalised on the logits' device in f32
    /// (temperature, padding rows at `-inf`, `z − max − log Σ exp(z − max)` per row), copied
    /// to the host `chunk_rows` rows at a time (the next chunk copied while this one is
    /// widened) and widened to f64 into `out` with the stop rows pooled into EOS
    /// ([`Self::widen_into`]).
    ///
    /// Why: on a GPU the host's share of a step was most of it at 1024 particles (H200,
    /// SmolLM2: decode step 437–456 ms, the forward pass 67 ms of it): candle's `to_vec1`
    /// copies a device tensor's whole storage to the host and then the slice again, 400 MB
    /// of fresh memory per step at 1024 particles, paid for in page faults; and the host
    /// took an f64 exponential per vocabulary entry and particle. Chunks of a few MB moved
    /// by `to_device` (one copy) are reused by the allocator from one to the next, the copy
    /// of one overlaps the widening of the last, and the host only widens: 95–96 ms (see
    /// docs/gpu.md). Rounding: f32 log-probabilities, within about 1e-6 relative of the f64
    /// path (checked in
    /// `device_normalisation_matches_the_host_path`).
    fn device_distributions(
        &self,
        logits: &candle_core::Tensor,
        out: &mut [Vec<f64>],
        chunk_rows: usize,
    ) -> LmResult<()> {
        let (_, width) = logits.dims2()?;
        let bias = if self.kind.contains(&Row::Padding) {
            let bias: Vec<f32> = self
                .kind
                .iter()
                .map(|&k| {
                    if k == Row::Padding {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
                .collect();
            Some(candle_core::Tensor::from_vec(bias, width, logits.device())?)
        } else {
            None
        };
        let chunk_rows = chunk_rows.max(1);
        // Rows `first..first + len` normalised on the device (launched, not waited for).
        let normalised = |first: usize, len: usize| -> LmResult<candle_core::Tensor> {
            // The narrowed rows are a view; the first operation writes them compactly, so
            // that the copy to the host moves this chunk alone.
            let mut z = logits
                .narrow(0, first, len)?
                .to_dtype(candle_core::DType::F32)?
                .affine(1.0 / self.temperature, 0.0)?;
            if let Some(bias) = &bias {
                z = z.broadcast_add(bias)?;
            }
            let z = z.broadcast_sub(&z.max_keepdim(1)?)?;
            Ok(z.broadcast_sub(&z.exp()?.sum_keepdim(1)?.log()?)?)
        };
        // One copy to the host (`to_vec1` copies the whole storage, then the slice again).
        let fetch = |t: candle_core::Tensor| -> LmResult<candle_core::Tensor> {
            Ok(t.to_device(&candle_core::Device::Cpu)?)
        };
        let mut chunks = out.chunks_mut(chunk_rows).peekable();
        let mut first = 0;
        let mut host = match chunks.peek() {
            Some(c) => fetch(normalised(0, c.len())?)?,
            None => return Ok(()),
        };
        while let Some(outs) = chunks.next() {
            first += outs.len();
            let next = match chunks.peek() {
                Some(c) => Some(normalised(first, c.len())?),
                None => None,
            };
            // The next chunk crosses the bus while this one is widened.
            let (widened, fetched) = rayon::join(
                || for_each_host_row(&host, outs, |r, o| self.widen_into(r, o)),
                || next.map(fetch).transpose(),
            );
            widened?;
            match fetched? {
                Some(t) => host = t,
                None => break,
            }
        }
        Ok(())
    }

    /// One row of normalised log-probabilities over the model's rows (f32) as a
    /// distribution over `vocab + 1` symbols in `out`: tokens widened to f64, stop and
    /// padding rows `-inf`, the stop rows' mass pooled into the EOS entry.
    fn widen_into(&self, log_probs: &[f32], out: &mut Vec<f64>) {
        let n = self.vocab.len();
        out.clear();
        out.extend(log_probs.iter().zip(&self.kind).take(n).map(|(&l, &k)| {
            if k == Row::Token {
                f64::from(l)
            } else {
                f64::NEG_INFINITY
            }
        }));
        out.resize(n, f64::NEG_INFINITY);
        // A few stop rows (often one): a running log-sum-exp.
        let pooled = self
            .stop
            .iter()
            .filter_map(|&row| log_probs.get(row as usize))
            .fold(f64::NEG_INFINITY, |acc, &l| {
                crate::core::logspace::log_add_exp(acc, f64::from(l))
            });
        out.push(pooled);
    }

    fn run(&mut self, batch: &[Extend<'_>]) -> LmResult<Vec<Extension>> {
        let mut seen = HashSet::with_capacity(batch.len());
        for e in batch {
            if !seen.insert(e.seq) {
                return Err(LmError::InvalidConfig(format!(
                    "sequence {} appears twice in one extend batch",
                    e.seq.0
                )));
            }
        }
        let entries: Vec<SeqTokens<'_>> = batch
            .iter()
            .map(|e| SeqTokens {
                seq: CacheSeq(e.seq.0),
                tokens: e.tokens,
            })
            .collect();
        let logits = self
            .model
            .forward(&entries, &mut self.cache, LogitRows::All)?;
        // Recycled buffers first (see `Kernel::recycle`), fresh ones for the rest.
        let rows = logits.dims2()?.0;
        let mut dists = std::mem::take(&mut self.spare);
        if dists.len() > rows {
            self.spare = dists.split_off(rows);
        }
        dists.resize_with(rows, Vec::new);
        self.distributions(&logits, &mut dists)?;
        let mut out = Vec::with_capacity(batch.len());
        let mut r = 0;
        for e in batch {
            let n = e.tokens.len();
            let inner = (1..n)
                .map(|j| dists[r + j - 1][e.tokens[j] as usize])
                .collect();
            out.push(Extension {
                inner_log_probs: inner,
                next_log_probs: Vec::new(),
            });
            r += n;
        }
        // Move the last distribution of each entry out instead of cloning it; the rows of
        // inner tokens go back to the spare buffers.
        let mut dists = dists.into_iter().map(Some).collect::<Vec<_>>();
        let mut r = 0;
        for (e, ext) in batch.iter().zip(out.iter_mut()) {
            r += e.tokens.len();
            ext.next_log_probs = dists[r - 1].take().unwrap_or_default();
        }
        self.spare.extend(dists.into_iter().flatten());
        Ok(out)
    }

    fn start_inner(&mut self, prompt: &[TokenId]) -> LmResult<(SeqId, Vec<f64>)> {
        if prompt.is_empty() {
            return Err(LmError::EmptyPrompt);
        }
        let max = self.model.config().max_seq_len;
        if prompt.len() > max {
            return Err(LmError::ContextOverflow {
                len: prompt.len(),
                max,
            });
        }
        self.reserve_for_prompt(prompt.len())?;
        let seq = self.cache.create();
        let entry = [SeqTokens {
            seq,
            tokens: prompt,
        }];
        match self.model.forward(&entry, &mut self.cache, LogitRows::Last) {
            Ok(logits) => {
                let row = logits.flatten_all()?.to_vec1::<f32>()?;
                Ok((SeqId(seq.0), self.distribution(&row)))
            }
            Err(e) => {
                self.cache.release(seq);
                Err(e)
            }
        }
    }
}

/// `fill(row, buffer)` for every row of `rows: [n, width]` (f32 in host memory) and the
/// buffer of the same index, in parallel. Contiguous rows are read where they are: copying
/// them out first was a serial pass over 100 MB per step at 512 particles.
fn for_each_host_row(
    rows: &candle_core::Tensor,
    out: &mut [Vec<f64>],
    fill: impl Fn(&[f32], &mut Vec<f64>) + Sync,
) -> LmResult<()> {
    let (_, width) = rows.dims2()?;
    {
        let (storage, layout) = rows.storage_and_layout();
        if let (candle_core::Storage::Cpu(cpu), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        {
            if let (Ok(data), true) = (cpu.as_slice::<f32>(), width > 0) {
                data[start..end]
                    .par_chunks(width)
                    .zip(out.par_iter_mut())
                    .for_each(|(r, o)| fill(r, o));
                return Ok(());
            }
        }
    }
    let host = rows.to_vec2::<f32>()?;
    host.par_iter()
        .zip(out.par_iter_mut())
        .for_each(|(r, o)| fill(r, o));
    Ok(())
}

fn too_large(opts: &KernelOptions) -> LmError {
    LmError::InvalidConfig(format!(
        "{} particles generating {} tokens each is too large a request",
        opts.particles, opts.max_new_tokens
    ))
}

/// Refuse a request whose memory estimate exceeds the memory limit (see
/// [`KernelOptions::check_memory`]).
fn check_request(c: &LlamaConfig, opts: &KernelOptions, prompt_tokens: usize) -> LmResult<()> {
    let growth = opts
        .max_new_tokens
        .min(c.max_seq_len.saturating_sub(prompt_tokens));
    let needed = memory_estimate(c, opts.particles, prompt_tokens, growth, opts.block_size)
        .ok_or_else(|| too_large(opts))?;
    if !opts.check_memory {
        return Ok(());
    }
    let Some(available) = opts.memory_limit.or_else(available_memory) else {
        return Ok(());
    };
    if needed > available {
        let hint = if prompt_tokens > 0
            && memory_estimate(c, opts.particles, 0, growth, opts.block_size)
                .is_some_and(|m| m <= available)
        {
            "use a shorter prompt".to_string()
        } else {
            let per_particle = memory_estimate(c, 1, 0, growth, opts.block_size)
                .unwrap_or(u64::MAX)
                .max(1);
            format!(
                "lower --particles (to about {} here) or --max-tokens",
                (available / per_particle).max(1)
            )
        };
        return Err(LmError::InsufficientMemory {
            needed,
            available,
            what: if prompt_tokens == 0 {
                format!(
                    "the KV cache and activations of {} particles x {} tokens",
                    opts.particles, growth
                )
            } else {
                format!(
                    "the KV cache and activations of a {prompt_tokens}-token prompt and {} \
                     particles x {} tokens",
                    opts.particles, growth
                )
            },
            hint,
        });
    }
    Ok(())
}

fn hf_chat_template(dir: &Path, tok: &Tokenizer) -> LmResult<Option<ChatTemplate>> {
    let json = |file: &str| -> LmResult<Option<serde_json::Value>> {
        match std::fs::read_to_string(dir.join(file)) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| LmError::Tokenizer(format!("{file}: {e}"))),
            Err(_) => Ok(None),
        }
    };
    // Where transformers looks: `tokenizer_config.json`, then the separate files newer
    // checkpoints (and multimodal ones, `chat_template.json`) carry.
    let template = match json("tokenizer_config.json")?
        .and_then(|c| c["chat_template"].as_str().map(str::to_string))
    {
        Some(t) => Some(t),
        None => match std::fs::read_to_string(dir.join("chat_template.jinja")) {
            Ok(t) => Some(t),
            Err(_) => json("chat_template.json")?
                .and_then(|c| c["chat_template"].as_str().map(str::to_string)),
        },
    };
    let Some(src) = template else {
        return Ok(None);
    };
    let name = |id: Option<u32>| id.map(|i| tok.decode(&[i])).unwrap_or_default();
    ChatTemplate::new(&src, name(tok.bos_id()), name(tok.eos_id())).map(Some)
}

impl Kernel for TransformerKernel {
    fn vocab(&self) -> &Vocabulary {
        &self.vocab
    }

    /// Every distribution is `z − log Σ exp z` of its own row (`distribution`).
    fn normalised_by_construction(&self) -> bool {
        true
    }

    /// Keeps buffers of this vocabulary's size, at most two per particle of
    /// [`KernelOptions::particles`] (memory the population holds anyway).
    fn recycle(&mut self, buffers: Vec<Vec<f64>>) {
        let len = self.vocab.len() + 1;
        let keep = self.opts.particles.max(1) * 2;
        for b in buffers {
            if self.spare.len() >= keep {
                break;
            }
            if b.capacity() >= len {
                self.spare.push(b);
            }
        }
    }

    fn start(&mut self, prompt: &[TokenId]) -> Result<(SeqId, Vec<f64>)> {
        // A forward pass runs hundreds of short parallel regions (one per matrix product,
        // norm and attention). Started from a thread outside rayon's pool, each region is
        // handed over to the pool and waited for; started on a worker, the worker takes part
        // in it and only the other cores need waking. Measured on SmolLM2-135M, one
        // particle, 2-core AVX2 VM, alternating within one process: `q8_0` decode step
        // 7–15% faster, f32 about 4%.
        rayon::scope(|_| self.start_inner(prompt)).map_err(SmcError::from)
    }

    fn fork(&mut self, seq: SeqId) -> Result<SeqId> {
        Ok(SeqId(
            self.cache.fork(CacheSeq(seq.0)).map_err(SmcError::from)?.0,
        ))
    }

    fn release(&mut self, seq: SeqId) {
        self.cache.release(CacheSeq(seq.0));
    }

    fn extend(&mut self, batch: &[Extend<'_>]) -> Result<Vec<Extension>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        // On a worker of the thread pool (see `start`).
        rayon::scope(|_| self.run(batch)).map_err(SmcError::from)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal};

    use super::*;
    use crate::lm::config::RopeStyle;

    /// Seed of the random logits.
    const LOGITS_SEED: u64 = 11;

    /// The device-side normalisation (run here on the CPU, as candle operations, in chunks
    /// of rows) gives the host path's distributions, stop rows pooled and padding rows at
    /// zero probability, into buffers that held other values, to
    /// f32 rounding: |difference| ≤ 1e-5 for logits of standard deviation 4 over 50 rows
    /// (f32 log-probabilities of magnitude ≲ 30 carry ≲ 30 · 2⁻²⁴ ≈ 2e-6 each, the f32
    /// log-normaliser a few ulp more).
    #[test]
    fn device_normalisation_matches_the_host_path() {
        let config = LlamaConfig {
            vocab_size: 50,
            hidden_size: 16,
            intermediate_size: 32,
            n_layers: 1,
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 8,
            rope_theta: 10_000.0,
            rope_style: RopeStyle::Half,
            rms_eps: 1e-5,
            max_seq_len: 32,
            tie_embeddings: true,
        };
        let model = LlamaModel::random(config, 3).unwrap();
        let opts = KernelOptions {
            temperature: 0.7,
            ..Default::default()
        };
        let mut k = TransformerKernel::from_parts(model, None, None, opts).unwrap();
        k.stop = vec![3, 7];
        for &s in &k.stop {
            k.kind[s as usize] = Row::Stop;
        }
        k.kind[48] = Row::Padding;
        k.kind[49] = Row::Padding;
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(LOGITS_SEED);
        let normal = Normal::new(0.0f32, 4.0).unwrap();
        let rows = 6;
        let data: Vec<f32> = (0..rows * 50).map(|_| normal.sample(&mut rng)).collect();
        let logits = Tensor::from_vec(data, (rows, 50), &Device::Cpu).unwrap();
        // Recycled buffers hold anything: the fill must not depend on it.
        let mut host = vec![vec![0.5; 3]; rows];
        k.distributions(&logits, &mut host).unwrap();
        // Chunks of one row, of 4 (a full chunk and a partial one), of all rows, of more.
        for chunk_rows in [1, 4, 6, 100] {
            let mut device = vec![vec![1.0; 70]; rows];
            k.device_distributions(&logits, &mut device, chunk_rows)
                .unwrap();
            assert_eq!(host.len(), rows);
            assert_eq!(device.len(), rows);
            for (a, b) in host.iter().zip(&device) {
                assert_eq!(a.len(), 51);
                assert_eq!(b.len(), 51);
                for (i, (x, y)) in a.iter().zip(b).enumerate() {
                    if x.is_infinite() || y.is_infinite() {
                        assert_eq!(x, y, "entry {i}, chunks of {chunk_rows}");
                    } else {
                        assert!((x - y).abs() <= 1e-5, "entry {i}: {x} vs {y}");
                    }
                }
                // Stop rows and padding have no mass of their own; EOS holds the stops'.
                for i in [3, 7, 48, 49] {
                    assert_eq!(b[i], f64::NEG_INFINITY);
                }
                assert!(b[50].is_finite());
                let total: f64 = b.iter().map(|l| l.exp()).sum();
                assert!((total - 1.0).abs() < 1e-5, "mass {total}");
            }
        }
    }
}
