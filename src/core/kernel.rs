//! The Markov kernel `M_t`: next-token distributions for a whole population at once.
//!
//! A kernel holds sequences (a prompt plus generated tokens) behind opaque [`SeqId`]
//! handles, so that an implementation can keep per-sequence state such as a KV cache.
//! The SMC engine only ever calls it in batches: [`Kernel::extend`] appends tokens to many
//! sequences and returns every sequence's next-token log-probabilities in one call, which a
//! transformer implements as one batched forward pass.
//!
//! Distributions are log-probabilities over `vocab.len() + 1` symbols (EOS last).

use crate::core::error::Result;
use crate::core::vocab::{TokenId, Vocabulary};

/// Opaque handle of a sequence held by a kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

/// One entry of a batched [`Kernel::extend`] call: append `tokens` to `seq`.
#[derive(Debug, Clone, Copy)]
pub struct Extend<'a> {
    /// The sequence to extend.
    pub seq: SeqId,
    /// Tokens to append (at least one; EOS is never sent to a kernel).
    pub tokens: &'a [TokenId],
}

/// What a kernel returns for one [`Extend`] request.
#[derive(Debug, Clone, PartialEq)]
pub struct Extension {
    /// `log p(tokens[i] | prefix, tokens[..i])` for `i = 1..tokens.len()`: the scores of the
    /// appended tokens after the first (the first one's score was in the previous
    /// distribution). Empty when one token was appended.
    pub inner_log_probs: Vec<f64>,
    /// Next-token log-probabilities after all appended tokens (`vocab.len() + 1` entries).
    pub next_log_probs: Vec<f64>,
}

/// A batched Markov kernel over token sequences.
///
/// Implementations: [`crate::testing::ToyKernel`] (an exact table kernel for tests) and the
/// transformer kernel of the `lm` feature.
///
/// # Contract
/// * [`Kernel::start`] processes a prompt once and returns its handle and next-token
///   distribution; [`Kernel::fork`] makes a copy that shares the prompt.
/// * [`Kernel::extend`] handles a whole batch at once; each distribution is normalised in
///   log space (`log Σ exp = 0` up to rounding) and has `vocab().dist_len()` entries.
/// * [`Kernel::release`] frees a sequence; the engine releases every sequence it started.
/// * [`Kernel::recycle`] receives distributions the kernel returned earlier, which the
///   engine no longer holds; a kernel may fill them again or drop them.
pub trait Kernel: Send {
    /// The vocabulary (byte strings of the ordinary tokens; EOS is `vocab().eos()`).
    fn vocab(&self) -> &Vocabulary;

    /// Start a sequence from `prompt` and return its next-token distribution.
    ///
    /// # Errors
    /// Implementation-defined (an empty prompt for a language model, a prompt longer than
    /// the context window, out-of-range tokens).
    fn start(&mut self, prompt: &[TokenId]) -> Result<(SeqId, Vec<f64>)>;

    /// A new sequence identical to `seq` (sharing whatever can be shared).
    ///
    /// # Errors
    /// Unknown handle, or no capacity left.
    fn fork(&mut self, seq: SeqId) -> Result<SeqId>;

    /// Free a sequence. Releasing an unknown handle does nothing.
    fn release(&mut self, seq: SeqId);

    /// Append tokens to several sequences and return their new distributions, in order.
    ///
    /// # Errors
    /// Unknown handle, out-of-range token, capacity exceeded, or a backend failure.
    fn extend(&mut self, batch: &[Extend<'_>]) -> Result<Vec<Extension>>;

    /// Whether every distribution this kernel returns is normalised by construction (it
    /// subtracts its own log-sum-exp), so that the engine need not check it. The engine
    /// then still checks lengths and NaNs, and skips only its own log-sum-exp over each
    /// distribution: a pass of `vocab + 1` exponentials per particle and step (a tenth of
    /// an SMC step's time at 512 particles of a 49,152-token vocabulary). Default `false`:
    /// the engine checks `|log Σ p| ≤ 1e-6` and reports
    /// [`SmcError::UnnormalisedDistribution`](crate::SmcError::UnnormalisedDistribution).
    fn normalised_by_construction(&self) -> bool {
        false
    }

    /// Take back distributions the engine no longer needs (each one a `Vec` this kernel
    /// returned earlier), so that a later [`Kernel::extend`] can fill them instead of
    /// allocating. Why: a distribution is `vocab + 1` f64 per particle (400 MB per step at
    /// 1,024 particles of a 49,152-token vocabulary), and memory the allocator has handed
    /// back to the system is paid for again in page faults, step after step. The default
    /// drops them.
    fn recycle(&mut self, buffers: Vec<Vec<f64>>) {
        drop(buffers);
    }
}

impl<K: Kernel + ?Sized> Kernel for Box<K> {
    fn vocab(&self) -> &Vocabulary {
        (**self).vocab()
    }
    fn start(&mut self, prompt: &[TokenId]) -> Result<(SeqId, Vec<f64>)> {
        (**self).start(prompt)
    }
    fn fork(&mut self, seq: SeqId) -> Result<SeqId> {
        (**self).fork(seq)
    }
    fn release(&mut self, seq: SeqId) {
        (**self).release(seq)
    }
    fn extend(&mut self, batch: &[Extend<'_>]) -> Result<Vec<Extension>> {
        (**self).extend(batch)
    }
    fn normalised_by_construction(&self) -> bool {
        (**self).normalised_by_construction()
    }
    fn recycle(&mut self, buffers: Vec<Vec<f64>>) {
        (**self).recycle(buffers)
    }
}

/// A borrowed kernel is a kernel, so one loaded model can serve many runs in turn.
impl<K: Kernel + ?Sized> Kernel for &mut K {
    fn vocab(&self) -> &Vocabulary {
        (**self).vocab()
    }
    fn start(&mut self, prompt: &[TokenId]) -> Result<(SeqId, Vec<f64>)> {
        (**self).start(prompt)
    }
    fn fork(&mut self, seq: SeqId) -> Result<SeqId> {
        (**self).fork(seq)
    }
    fn release(&mut self, seq: SeqId) {
        (**self).release(seq)
    }
    fn extend(&mut self, batch: &[Extend<'_>]) -> Result<Vec<Extension>> {
        (**self).extend(batch)
    }
    fn normalised_by_construction(&self) -> bool {
        (**self).normalised_by_construction()
    }
    fn recycle(&mut self, buffers: Vec<Vec<f64>>) {
        (**self).recycle(buffers)
    }
}
