//! A paged, reference-counted key/value cache shared by a whole particle population.
//!
//! Keys and values live in fixed-size blocks (`block_size` tokens) drawn from one
//! preallocated pool per layer. Every sequence owns a *block table* (the ids of its blocks, in
//! order) and a length. Blocks carry reference counts:
//!
//! * [`PagedKvCache::fork`] copies the block table and bumps the counts: the prompt's keys
//!   and values (and every token two particles have in common) are stored once.
//! * Appending to a sequence whose last block is partially filled *and* shared first copies
//!   that one block (copy-on-write); a block with more than one reference is never written.
//! * [`PagedKvCache::release`] drops references; blocks whose count reaches zero go back to
//!   the free list.
//! * Running out of blocks is the typed error [`LmError::CacheExhausted`], raised before
//!   anything is modified, so the cache stays usable.
//!
//! Attention ([`PagedKvCache::attend`]) reads keys and values through the block tables,
//! directly from the pool: no gathered copy of a sequence's history is ever built. It runs
//! in parallel over (query token, head) pairs with rayon, accumulates in f32, and handles
//! grouped-query attention by mapping each query head to its key/value head. Per layer,
//! [`ScoreOptions`] sets the score scale, an optional soft-cap and an optional sliding window:
//! blocks wholly before a query's window are skipped (not read) but never released early,
//! since global layers, forks and truncation still need them.
//!
//! ```text
//!  pool (one per layer, K and V)     block tables                 refs
//!  ┌────┬────┬────┬────┬────┬───┐
//!  │ b0 │ b1 │ b2 │ b3 │ b4 │ … │    prompt  : [b0 b1 b2]         b0: 3  b1: 3
//!  └────┴────┴────┴────┴────┴───┘    particle: [b0 b1 b3]         b2: 1  (prompt's partial
//!   b0, b1: full prompt blocks       particle: [b0 b1 b4]         b3: 1   last block, copied
//!   b2: prompt's partial last block                               b4: 1   on first write)
//! ```
//!
//! Two attention paths read the same block tables ([`AttentionPath`]):
//!
//! * [`AttentionPath::Cpu`] (the default): the pool is host memory and
//!   [`PagedKvCache::attend`] walks the block tables directly, as described above.
//!   Pool layout (per layer, for keys and values alike): block `b`, key/value head `h`,
//!   slot `s`, dimension `d` is at `((b * n_kv_heads + h) * block_size + s) * head_dim + d`,
//!   so the keys of one head inside one block are contiguous.
//! * [`AttentionPath::Gather`]: the pool is one candle tensor per layer,
//!   `[num_blocks * block_size, n_kv_heads * head_dim]`, on any candle device. New keys and
//!   values are written with `scatter_set`, and [`PagedKvCache::attend_gather`] gathers each
//!   sequence's rows with `index_select` into a padded contiguous batch, then runs ordinary
//!   masked softmax attention with batched matrix products (query heads of one group are
//!   stacked, so repeated key/value heads are never materialised). Only candle operations
//!   are used, so a CUDA or Metal build has a correct path.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::error::{LmError, LmResult};

/// Which attention implementation reads the cache (and so where the pool lives).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionPath {
    /// Host pool; attention written for the paged layout, reading blocks in place
    /// (parallel over query tokens and heads with rayon).
    #[default]
    Cpu,
    /// Pool of candle tensors on any device; blocks are gathered with `index_select` into
    /// contiguous keys/values, then ordinary attention runs with candle operations.
    Gather,
}

/// Key/value storage of the pool.
#[derive(Debug)]
enum Pool {
    /// Host vectors, one per layer, in the block-major layout of the module documentation.
    Host {
        keys: Vec<Vec<f32>>,
        values: Vec<Vec<f32>>,
    },
    /// Candle tensors, one per layer, `[num_blocks * block_size, n_kv_heads * head_dim]`.
    Tensor {
        keys: Vec<Tensor>,
        values: Vec<Tensor>,
    },
}

/// `n` zeroed vectors of `len` floats, allocated fallibly (the size comes from the
/// request).
fn zeroed_layers(n: usize, len: usize) -> LmResult<Vec<Vec<f32>>> {
    let mut out = Vec::new();
    out.try_reserve_exact(n)
        .map_err(|_| LmError::InvalidConfig(format!("too many layers ({n})")))?;
    for _ in 0..n {
        let mut v: Vec<f32> = Vec::new();
        v.try_reserve_exact(len).map_err(|_| LmError::OutOfMemory {
            what: "the KV cache".into(),
            bytes: (len as u64).saturating_mul(8).saturating_mul(n as u64),
        })?;
        v.resize(len, 0.0);
        out.push(v);
    }
    Ok(out)
}

/// Handle of a sequence stored in a [`PagedKvCache`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheSeq(pub u64);

/// Shape of the cache: what the model needs per token, and the pool size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLayout {
    /// Number of transformer layers.
    pub n_layers: usize,
    /// Number of key/value heads.
    pub n_kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Blocks in the pool.
    pub num_blocks: usize,
}

impl CacheLayout {
    /// Bytes of the whole pool (keys and values, all layers).
    pub fn pool_bytes(&self) -> usize {
        2 * self.n_layers
            * self.num_blocks
            * self.block_size
            * self.n_kv_heads
            * self.head_dim
            * std::mem::size_of::<f32>()
    }

    /// Bytes that one token occupies in the pool (keys and values, all layers).
    pub fn bytes_per_token(&self) -> usize {
        2 * self.n_layers * self.n_kv_heads * self.head_dim * std::mem::size_of::<f32>()
    }
}

#[derive(Debug, Clone)]
struct SeqState {
    blocks: Vec<u32>,
    len: usize,
}

/// Where one query token sits: its sequence's block table and its absolute position.
///
/// The token attends to positions `0..=pos` of that sequence.
#[derive(Debug, Clone, Copy)]
pub struct QueryMeta<'a> {
    /// The block table of the token's sequence.
    pub blocks: &'a [u32],
    /// The token's absolute position.
    pub pos: usize,
}

/// How one layer turns query-key products into attention weights.
///
/// Families differ here only by data: the score scale (`head_dim^-1/2`, or Gemma's
/// `query_pre_attn_scalar^-1/2`), Gemma 2's soft-capping of the scores and the sliding window
/// of Mistral, Phi-3 and Gemma's local layers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoreOptions {
    /// Factor applied to every query-key dot product.
    pub scale: f32,
    /// Soft cap: scores become `cap * tanh(score / cap)` before the mask and softmax.
    pub softcap: Option<f32>,
    /// Sliding window: a query at position `i` sees keys `j` with `i - window < j <= i`
    /// (the window counts the query's own token). `None`: the whole prefix.
    pub window: Option<usize>,
}

impl ScoreOptions {
    /// Plain causal attention with the given scale.
    pub fn scaled(scale: f32) -> Self {
        Self {
            scale,
            softcap: None,
            window: None,
        }
    }

    /// The first visible key position of a query at `pos`.
    fn first_visible(&self, pos: usize) -> usize {
        match self.window {
            Some(w) => (pos + 1).saturating_sub(w),
            None => 0,
        }
    }

    /// Scale (and soft-cap) one raw dot product.
    #[inline]
    fn score(&self, dot: f32) -> f32 {
        let s = dot * self.scale;
        match self.softcap {
            Some(cap) => cap * (s / cap).tanh(),
            None => s,
        }
    }
}

/// The paged KV cache. See the [module documentation](self).
#[derive(Debug)]
pub struct PagedKvCache {
    layout: CacheLayout,
    /// Floats per block per layer (`n_kv_heads * block_size * head_dim`).
    block_floats: usize,
    pool: Pool,
    refs: Vec<u32>,
    free: Vec<u32>,
    seqs: HashMap<u64, SeqState>,
    next_id: u64,
}

impl PagedKvCache {
    /// Allocate a host pool of `layout.num_blocks` blocks per layer, read by the CPU
    /// attention path ([`AttentionPath::Cpu`]).
    ///
    /// # Errors
    /// [`LmError::InvalidConfig`] when a dimension is zero or the pool size overflows.
    pub fn new(layout: CacheLayout) -> LmResult<Self> {
        Self::with_path(layout, AttentionPath::Cpu, &Device::Cpu)
    }

    /// Allocate a pool for the given attention path. With [`AttentionPath::Gather`] the pool
    /// tensors live on `device`; with [`AttentionPath::Cpu`] the pool is host memory and
    /// `device` is ignored.
    ///
    /// # Errors
    /// [`LmError::InvalidConfig`] when a dimension is zero or the pool size overflows;
    /// [`LmError::Candle`] when the device cannot allocate the pool.
    pub fn with_path(layout: CacheLayout, path: AttentionPath, device: &Device) -> LmResult<Self> {
        let CacheLayout {
            n_layers,
            n_kv_heads,
            head_dim,
            block_size,
            num_blocks,
        } = layout;
        if n_layers == 0 || n_kv_heads == 0 || head_dim == 0 || block_size == 0 || num_blocks == 0 {
            return Err(LmError::InvalidConfig(format!(
                "every cache dimension must be positive: {layout:?}"
            )));
        }
        if num_blocks > u32::MAX as usize {
            return Err(LmError::InvalidConfig(format!(
                "too many cache blocks ({num_blocks})"
            )));
        }
        let block_floats = n_kv_heads
            .checked_mul(block_size)
            .and_then(|x| x.checked_mul(head_dim))
            .ok_or_else(|| LmError::InvalidConfig("cache block size overflows".into()))?;
        let layer_floats = block_floats
            .checked_mul(num_blocks)
            .filter(|&n| n.checked_mul(4 * 2 * n_layers).is_some())
            .ok_or_else(|| LmError::InvalidConfig("cache pool size overflows".into()))?;
        let pool = match path {
            AttentionPath::Cpu => Pool::Host {
                keys: zeroed_layers(n_layers, layer_floats)?,
                values: zeroed_layers(n_layers, layer_floats)?,
            },
            AttentionPath::Gather => {
                let shape = (num_blocks * block_size, n_kv_heads * head_dim);
                let alloc = || -> LmResult<Vec<Tensor>> {
                    (0..n_layers)
                        .map(|_| Ok(Tensor::zeros(shape, DType::F32, device)?))
                        .collect()
                };
                Pool::Tensor {
                    keys: alloc()?,
                    values: alloc()?,
                }
            }
        };
        Ok(Self {
            layout,
            block_floats,
            pool,
            refs: vec![0; num_blocks],
            // Pop from the end: hand out low block ids first.
            free: (0..num_blocks as u32).rev().collect(),
            seqs: HashMap::new(),
            next_id: 0,
        })
    }

    /// Grow the pool to `num_blocks` blocks (no-op when it already has as many). Existing
    /// sequences and block ids stay valid; the new blocks are handed out after the blocks
    /// already free.
    ///
    /// # Errors
    /// [`LmError::InvalidConfig`] when the size overflows; [`LmError::OutOfMemory`] when the
    /// allocation fails (the cache is then unchanged); [`LmError::Candle`] for a device pool.
    pub fn grow(&mut self, num_blocks: usize) -> LmResult<()> {
        let old = self.layout.num_blocks;
        if num_blocks <= old {
            return Ok(());
        }
        if num_blocks > u32::MAX as usize {
            return Err(LmError::InvalidConfig(format!(
                "too many cache blocks ({num_blocks})"
            )));
        }
        let layer_floats = self
            .block_floats
            .checked_mul(num_blocks)
            .filter(|&n| n.checked_mul(4 * 2 * self.layout.n_layers).is_some())
            .ok_or_else(|| LmError::InvalidConfig("cache pool size overflows".into()))?;
        let extra = num_blocks - old;
        let oom = |bytes: usize| LmError::OutOfMemory {
            what: "the KV cache".into(),
            bytes: bytes as u64,
        };
        self.refs
            .try_reserve_exact(extra)
            .map_err(|_| oom(extra * 4))?;
        self.free
            .try_reserve_exact(extra)
            .map_err(|_| oom(extra * 4))?;
        match &mut self.pool {
            Pool::Host { keys, values } => {
                // Reserve everything first so that a failure leaves the pool as it was.
                let add = layer_floats - self.block_floats * old;
                for v in keys.iter_mut().chain(values.iter_mut()) {
                    v.try_reserve_exact(add)
                        .map_err(|_| oom(add * 4 * 2 * self.layout.n_layers))?;
                }
                for v in keys.iter_mut().chain(values.iter_mut()) {
                    v.resize(layer_floats, 0.0);
                }
            }
            Pool::Tensor { keys, values } => {
                let cols = self.layout.n_kv_heads * self.layout.head_dim;
                let rows = extra * self.layout.block_size;
                for t in keys.iter_mut().chain(values.iter_mut()) {
                    let z = Tensor::zeros((rows, cols), DType::F32, t.device())?;
                    *t = Tensor::cat(&[&*t, &z], 0)?;
                }
            }
        }
        self.refs.resize(num_blocks, 0);
        // Hand out the blocks already free first, then the new ones in increasing order.
        let mut free: Vec<u32> = (old as u32..num_blocks as u32).rev().collect();
        free.append(&mut self.free);
        self.free = free;
        self.layout.num_blocks = num_blocks;
        Ok(())
    }

    /// The cache's layout.
    pub fn layout(&self) -> CacheLayout {
        self.layout
    }

    /// The attention path this cache was built for.
    pub fn attention_path(&self) -> AttentionPath {
        match self.pool {
            Pool::Host { .. } => AttentionPath::Cpu,
            Pool::Tensor { .. } => AttentionPath::Gather,
        }
    }

    /// The device holding the pool (the CPU for [`AttentionPath::Cpu`]).
    pub fn device(&self) -> Device {
        match &self.pool {
            Pool::Tensor { keys, .. } => keys.first().map_or(Device::Cpu, |t| t.device().clone()),
            Pool::Host { .. } => Device::Cpu,
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.layout.block_size
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.layout.num_blocks
    }

    /// Blocks on the free list.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Blocks referenced by at least one sequence.
    pub fn used_blocks(&self) -> usize {
        self.layout.num_blocks - self.free.len()
    }

    /// Bytes of keys and values held by used blocks.
    pub fn used_bytes(&self) -> usize {
        self.used_blocks() * self.layout.block_size * self.layout.bytes_per_token()
    }

    /// Number of live sequences.
    pub fn num_sequences(&self) -> usize {
        self.seqs.len()
    }

    /// Reference count of a block (0 when free or out of range).
    pub fn ref_count(&self, block: u32) -> u32 {
        self.refs.get(block as usize).copied().unwrap_or(0)
    }

    /// The block table of a sequence.
    pub fn block_table(&self, seq: CacheSeq) -> Option<&[u32]> {
        self.seqs.get(&seq.0).map(|s| s.blocks.as_slice())
    }

    /// Number of tokens stored for a sequence.
    pub fn seq_len(&self, seq: CacheSeq) -> Option<usize> {
        self.seqs.get(&seq.0).map(|s| s.len)
    }

    /// Handles of all live sequences (unordered).
    pub fn sequences(&self) -> Vec<CacheSeq> {
        self.seqs.keys().map(|&k| CacheSeq(k)).collect()
    }

    /// A new empty sequence.
    pub fn create(&mut self) -> CacheSeq {
        let id = self.next_id;
        self.next_id += 1;
        self.seqs.insert(
            id,
            SeqState {
                blocks: Vec::new(),
                len: 0,
            },
        );
        CacheSeq(id)
    }

    /// A new sequence sharing all of `seq`'s blocks (no data is copied).
    ///
    /// # Errors
    /// [`LmError::UnknownSequence`].
    pub fn fork(&mut self, seq: CacheSeq) -> LmResult<CacheSeq> {
        let state = self
            .seqs
            .get(&seq.0)
            .ok_or(LmError::UnknownSequence(seq.0))?
            .clone();
        for &b in &state.blocks {
            self.refs[b as usize] += 1;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.seqs.insert(id, state);
        Ok(CacheSeq(id))
    }

    /// Drop a sequence; blocks nobody else references return to the free list. Unknown
    /// handles are ignored.
    pub fn release(&mut self, seq: CacheSeq) {
        if let Some(state) = self.seqs.remove(&seq.0) {
            for b in state.blocks {
                self.decref(b);
            }
        }
    }

    fn decref(&mut self, b: u32) {
        let r = &mut self.refs[b as usize];
        debug_assert!(*r > 0, "block {b} released too often");
        *r -= 1;
        if *r == 0 {
            self.free.push(b);
        }
    }

    /// Shorten a sequence to `len` tokens (no-op if it is not longer), releasing whole blocks
    /// past the end.
    ///
    /// # Errors
    /// [`LmError::UnknownSequence`].
    pub fn truncate(&mut self, seq: CacheSeq, len: usize) -> LmResult<()> {
        let bs = self.layout.block_size;
        let state = self
            .seqs
            .get_mut(&seq.0)
            .ok_or(LmError::UnknownSequence(seq.0))?;
        if len >= state.len {
            return Ok(());
        }
        state.len = len;
        let keep = len.div_ceil(bs);
        let dropped: Vec<u32> = state.blocks.drain(keep..).collect();
        for b in dropped {
            self.decref(b);
        }
        Ok(())
    }

    /// Blocks that appending `n` tokens to `state` needs (copy-on-write included).
    fn blocks_needed(&self, state: &SeqState, n: usize) -> usize {
        let bs = self.layout.block_size;
        let new_blocks = (state.len + n).div_ceil(bs) - state.blocks.len();
        let cow = !state.len.is_multiple_of(bs)
            && n > 0
            && state
                .blocks
                .last()
                .is_some_and(|&b| self.refs[b as usize] > 1);
        new_blocks + usize::from(cow)
    }

    /// Make room for appending tokens: for each `(seq, n)`, the sequence's length grows by
    /// `n` and it gets private storage for the new positions (copying a shared, partially
    /// filled last block first). Returns each sequence's first new position.
    ///
    /// The new slots hold stale data until [`PagedKvCache::write`] fills them.
    ///
    /// # Errors
    /// [`LmError::UnknownSequence`], or [`LmError::CacheExhausted`] when the pool cannot hold
    /// the new tokens, or [`LmError::Candle`] when a device copy fails; in every case the
    /// sequences keep their lengths and contents. (The block count is computed per
    /// request, so two requests whose sequences share a partial last block may be counted as
    /// needing one copy too many.)
    pub fn reserve(&mut self, appends: &[(CacheSeq, usize)]) -> LmResult<Vec<usize>> {
        let mut needed = 0usize;
        for &(seq, n) in appends {
            let state = self
                .seqs
                .get(&seq.0)
                .ok_or(LmError::UnknownSequence(seq.0))?;
            needed += self.blocks_needed(state, n);
        }
        if needed > self.free.len() {
            return Err(LmError::CacheExhausted {
                needed,
                free: self.free.len(),
                capacity: self.layout.num_blocks,
                block_size: self.layout.block_size,
            });
        }
        let mut starts = Vec::with_capacity(appends.len());
        for (i, &(seq, n)) in appends.iter().enumerate() {
            match self.reserve_one(seq, n) {
                Ok(start) => starts.push(start),
                Err(e) => {
                    // Undo the appends made so far (a copied block stays, holding the same
                    // data as the shared one it replaced).
                    for (&(s, _), &start) in appends[..i].iter().zip(&starts) {
                        let _ = self.truncate(s, start);
                    }
                    return Err(e);
                }
            }
        }
        Ok(starts)
    }

    /// One append of [`PagedKvCache::reserve`], after the free blocks have been counted.
    fn reserve_one(&mut self, seq: CacheSeq, n: usize) -> LmResult<usize> {
        let bs = self.layout.block_size;
        let Some(mut state) = self.seqs.remove(&seq.0) else {
            return Err(LmError::UnknownSequence(seq.0));
        };
        if n > 0 && !state.len.is_multiple_of(bs) {
            if let Some(&last) = state.blocks.last() {
                if self.refs[last as usize] > 1 {
                    let fresh = self.alloc();
                    if let Err(e) = self.copy_block(last, fresh, state.len % bs) {
                        self.decref(fresh);
                        self.seqs.insert(seq.0, state);
                        return Err(e);
                    }
                    self.refs[last as usize] -= 1;
                    if let Some(l) = state.blocks.last_mut() {
                        *l = fresh;
                    }
                }
            }
        }
        let start = state.len;
        state.len += n;
        while state.blocks.len() < state.len.div_ceil(bs) {
            let b = self.alloc();
            state.blocks.push(b);
        }
        self.seqs.insert(seq.0, state);
        Ok(start)
    }

    /// Take a block from the free list (the caller has checked that one is there).
    fn alloc(&mut self) -> u32 {
        let b = self.free.pop().expect("free list checked by the caller");
        self.refs[b as usize] = 1;
        b
    }

    /// Copy the first `slots` token slots of block `src` into block `dst`, in every layer.
    fn copy_block(&mut self, src: u32, dst: u32, slots: usize) -> LmResult<()> {
        let (bs, hd) = (self.layout.block_size, self.layout.head_dim);
        let bf = self.block_floats;
        match &mut self.pool {
            Pool::Host { keys, values } => {
                for pool in keys.iter_mut().chain(values.iter_mut()) {
                    for h in 0..self.layout.n_kv_heads {
                        let from = src as usize * bf + h * bs * hd;
                        let to = dst as usize * bf + h * bs * hd;
                        pool.copy_within(from..from + slots * hd, to);
                    }
                }
            }
            Pool::Tensor { keys, values } => {
                for pool in keys.iter().chain(values.iter()) {
                    let rows = pool.narrow(0, src as usize * bs, slots)?.copy()?;
                    pool.slice_set(&rows, 0, dst as usize * bs)?;
                }
            }
        }
        Ok(())
    }

    /// Offset of (block, head, slot) inside a layer's host pool.
    #[inline]
    fn offset(&self, block: u32, head: usize, slot: usize) -> usize {
        ((block as usize * self.layout.n_kv_heads + head) * self.layout.block_size + slot)
            * self.layout.head_dim
    }

    /// Store one token's keys and values (`n_kv_heads * head_dim` floats each, head-major) at
    /// position `pos` of the sequence whose block table is `blocks`, in layer `layer`
    /// (either attention path; the gather path prefers [`PagedKvCache::write_rows`]).
    ///
    /// The position must have been reserved with [`PagedKvCache::reserve`], which guarantees
    /// that its block is not shared.
    ///
    /// # Errors
    /// [`LmError::InvalidConfig`] for a position outside the table or rows of the wrong
    /// length; [`LmError::Candle`] from a device write.
    pub fn write(
        &mut self,
        layer: usize,
        blocks: &[u32],
        pos: usize,
        k: &[f32],
        v: &[f32],
    ) -> LmResult<()> {
        let (bs, hd, nkv) = (
            self.layout.block_size,
            self.layout.head_dim,
            self.layout.n_kv_heads,
        );
        let block = *blocks
            .get(pos / bs)
            .ok_or_else(|| LmError::InvalidConfig(format!("position {pos} was not reserved")))?;
        if k.len() != nkv * hd || v.len() != nkv * hd || layer >= self.layout.n_layers {
            return Err(LmError::InvalidConfig(
                "key/value row or layer does not match the cache".into(),
            ));
        }
        debug_assert_eq!(self.refs[block as usize], 1, "write into a shared block");
        let slot = pos % bs;
        match &mut self.pool {
            Pool::Host { keys, values } => {
                for h in 0..nkv {
                    let o = ((block as usize * nkv + h) * bs + slot) * hd;
                    keys[layer][o..o + hd].copy_from_slice(&k[h * hd..(h + 1) * hd]);
                    values[layer][o..o + hd].copy_from_slice(&v[h * hd..(h + 1) * hd]);
                }
            }
            Pool::Tensor { .. } => {
                let dev = self.device();
                let k = Tensor::from_slice(k, (1, nkv * hd), &dev)?;
                let v = Tensor::from_slice(v, (1, nkv * hd), &dev)?;
                self.write_rows(layer, &[Self::slot(blocks, pos, bs)], &k, &v)?;
            }
        }
        Ok(())
    }

    /// Pool row (gather layout) of position `pos` in a sequence with block table `blocks`.
    #[inline]
    fn slot(blocks: &[u32], pos: usize, bs: usize) -> u32 {
        blocks[pos / bs] * bs as u32 + (pos % bs) as u32
    }

    /// Pool rows of the positions `positions` of a sequence with block table `blocks`, in
    /// the gather path's layout (`block * block_size + slot`), for
    /// [`PagedKvCache::write_rows`].
    ///
    /// # Errors
    /// [`LmError::InvalidConfig`] for a position outside the table.
    pub fn slots(&self, blocks: &[u32], positions: std::ops::Range<usize>) -> LmResult<Vec<u32>> {
        let bs = self.layout.block_size;
        if positions.end > blocks.len() * bs {
            return Err(LmError::InvalidConfig(format!(
                "positions up to {} are not reserved",
                positions.end
            )));
        }
        Ok(positions.map(|p| Self::slot(blocks, p, bs)).collect())
    }

    /// Gather path: store the keys and values of several tokens at once. `k` and `v` are
    /// `[slots.len(), n_kv_heads * head_dim]` f32 tensors on the pool's device; row `i` goes
    /// to pool row `slots[i]` (see [`PagedKvCache::slots`]), which must be reserved.
    ///
    /// # Errors
    /// [`LmError::InvalidConfig`] on the CPU path or for a wrong shape;
    /// [`LmError::Candle`] from the device.
    pub fn write_rows(
        &mut self,
        layer: usize,
        slots: &[u32],
        k: &Tensor,
        v: &Tensor,
    ) -> LmResult<()> {
        let w = self.layout.n_kv_heads * self.layout.head_dim;
        let Pool::Tensor { keys, values } = &self.pool else {
            return Err(LmError::InvalidConfig(
                "write_rows needs a cache built for the gather attention path".into(),
            ));
        };
        let (Some(kp), Some(vp)) = (keys.get(layer), values.get(layer)) else {
            return Err(LmError::InvalidConfig(format!(
                "no layer {layer} in the cache"
            )));
        };
        if slots.is_empty() {
            return Ok(());
        }
        let n = slots.len();
        let idx: Vec<u32> = slots
            .iter()
            .flat_map(|&s| std::iter::repeat_n(s, w))
            .collect();
        let idx = Tensor::from_vec(idx, (n, w), kp.device())?;
        kp.scatter_set(&idx, &k.reshape((n, w))?.contiguous()?, 0)?;
        vp.scatter_set(&idx, &v.reshape((n, w))?.contiguous()?, 0)?;
        Ok(())
    }

    /// Causal attention for a batch of query tokens in layer `layer`, reading keys and values
    /// through block tables.
    ///
    /// `q` holds `queries.len()` rows of `n_heads * head_dim` floats (head-major, rotary
    /// embedding already applied); row `i` attends to positions `0..=queries[i].pos` of its
    /// sequence, whose keys and values must already be written. The result (same shape as
    /// `q`) goes to `out`. `n_heads` must be a multiple of the number of key/value heads.
    ///
    /// # Errors
    /// [`LmError::InvalidConfig`] when the cache was built for [`AttentionPath::Gather`]
    /// (use [`PagedKvCache::attend_gather`]) or a shape does not match.
    pub fn attend(
        &self,
        layer: usize,
        q: &[f32],
        queries: &[QueryMeta<'_>],
        n_heads: usize,
        scores: ScoreOptions,
        out: &mut [f32],
    ) -> LmResult<()> {
        let opts = scores;
        let hd = self.layout.head_dim;
        let Pool::Host { keys, values } = &self.pool else {
            return Err(LmError::InvalidConfig(
                "attend needs a cache built for the CPU attention path".into(),
            ));
        };
        if n_heads == 0
            || !n_heads.is_multiple_of(self.layout.n_kv_heads)
            || q.len() != queries.len() * n_heads * hd
            || out.len() != q.len()
            || layer >= self.layout.n_layers
        {
            return Err(LmError::InvalidConfig(
                "attention shapes do not match the cache".into(),
            ));
        }
        let group = n_heads / self.layout.n_kv_heads;
        let keys = &keys[layer];
        let values = &values[layer];
        out.par_chunks_mut(hd)
            .enumerate()
            .with_min_len(4)
            .for_each_init(Vec::new, |scores: &mut Vec<f32>, (row, o)| {
                let (t, h) = (row / n_heads, row % n_heads);
                let meta = queries[t];
                let qv = &q[row * hd..(row + 1) * hd];
                self.attend_one(keys, values, qv, meta, h / group, opts, scores, o);
            });
        Ok(())
    }

    /// Gather path: causal attention for a batch of query tokens in layer `layer` with
    /// candle operations only (works on any device).
    ///
    /// `q` is `[queries.len(), n_heads * head_dim]` (rotary embedding applied) on the pool's
    /// device; the result has the same shape. Consecutive queries with the same block table
    /// and consecutive positions form one sequence's run. Each run's keys and values
    /// (positions `0..=last`) are gathered with `index_select` into a padded
    /// `[runs, n_kv_heads, max_len, head_dim]` batch; the query heads sharing a key/value head
    /// are stacked into one matrix, so grouped-query attention needs no repeated heads.
    ///
    /// # Errors
    /// [`LmError::InvalidConfig`] on the CPU path or for mismatched shapes;
    /// [`LmError::Candle`] from the device.
    pub fn attend_gather(
        &self,
        layer: usize,
        q: &Tensor,
        queries: &[QueryMeta<'_>],
        n_heads: usize,
        opts: ScoreOptions,
    ) -> LmResult<Tensor> {
        let (bs, hd, nkv) = (
            self.layout.block_size,
            self.layout.head_dim,
            self.layout.n_kv_heads,
        );
        let Pool::Tensor { keys, values } = &self.pool else {
            return Err(LmError::InvalidConfig(
                "attend_gather needs a cache built for the gather attention path".into(),
            ));
        };
        let (Some(kp), Some(vp)) = (keys.get(layer), values.get(layer)) else {
            return Err(LmError::InvalidConfig(format!(
                "no layer {layer} in the cache"
            )));
        };
        let n_tok = queries.len();
        if n_heads == 0 || !n_heads.is_multiple_of(nkv) || q.dims() != [n_tok, n_heads * hd] {
            return Err(LmError::InvalidConfig(
                "attention shapes do not match the cache".into(),
            ));
        }
        let dev = kp.device();
        let group = n_heads / nkv;
        // Runs: (first query row, number of rows, block table, first position).
        let mut runs: Vec<(usize, usize, &[u32], usize)> = Vec::new();
        for (i, m) in queries.iter().enumerate() {
            match runs.last_mut() {
                Some((_, len, blocks, start))
                    if std::ptr::eq(*blocks, m.blocks) && *start + *len == m.pos =>
                {
                    *len += 1
                }
                _ => runs.push((i, 1, m.blocks, m.pos)),
            }
        }
        let s = runs.len();
        let t_max = runs.iter().map(|r| r.1).max().unwrap_or(0);
        let l_max = runs.iter().map(|r| r.3 + r.1).max().unwrap_or(0);
        if s == 0 {
            return Ok(Tensor::zeros((0, n_heads * hd), DType::F32, dev)?);
        }
        // Pool rows of every run's keys (padding: row 0, masked out).
        let mut kv_idx = vec![0u32; s * l_max];
        // Query row of each padded query slot (padding: the zero row `n_tok`).
        let mut q_idx = vec![n_tok as u32; s * t_max];
        // Additive mask, [runs, group * t_max, l_max] (query heads of a group stacked).
        let mut mask = vec![f32::NEG_INFINITY; s * group * t_max * l_max];
        for (r, &(first, len, blocks, start)) in runs.iter().enumerate() {
            let end = start + len;
            if end > blocks.len() * bs {
                return Err(LmError::InvalidConfig(format!(
                    "positions up to {end} are not reserved"
                )));
            }
            for p in 0..end {
                kv_idx[r * l_max + p] = Self::slot(blocks, p, bs);
            }
            for t in 0..t_max {
                // A padding query row sees key 0 only (finite softmax; discarded later).
                let (lo, hi) = if t < len {
                    (opts.first_visible(start + t), start + t + 1)
                } else {
                    (0, 1)
                };
                if t < len {
                    q_idx[r * t_max + t] = (first + t) as u32;
                }
                for g in 0..group {
                    let row = (r * group + g) * t_max + t;
                    mask[row * l_max + lo..row * l_max + hi].fill(0.0);
                }
            }
        }
        let kv_idx = Tensor::from_vec(kv_idx, s * l_max, dev)?;
        let gather = |pool: &Tensor| -> candle_core::Result<Tensor> {
            pool.index_select(&kv_idx, 0)?
                .reshape((s, l_max, nkv, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let k = gather(kp)?;
        let v = gather(vp)?;
        let q_pad = Tensor::cat(&[q, &Tensor::zeros((1, n_heads * hd), DType::F32, dev)?], 0)?;
        let q_idx = Tensor::from_vec(q_idx, s * t_max, dev)?;
        let qb = q_pad
            .index_select(&q_idx, 0)?
            .reshape((s, t_max, nkv, group, hd))?
            .permute((0, 2, 3, 1, 4))?
            .reshape((s, nkv, group * t_max, hd))?
            .contiguous()?;
        let mut scores = (qb.matmul(&k.transpose(2, 3)?.contiguous()?)? * f64::from(opts.scale))?;
        if let Some(cap) = opts.softcap {
            scores = ((scores / f64::from(cap))?.tanh()? * f64::from(cap))?;
        }
        let mask = Tensor::from_vec(mask, (s, 1, group * t_max, l_max), dev)?;
        let p = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?)?;
        let out = p
            .matmul(&v)?
            .reshape((s, nkv, group, t_max, hd))?
            .permute((0, 3, 1, 2, 4))?
            .reshape((s * t_max, n_heads * hd))?;
        // Back to query order: row of query i in the padded batch.
        let mut back = vec![0u32; n_tok];
        for (r, &(first, len, _, _)) in runs.iter().enumerate() {
            for t in 0..len {
                back[first + t] = (r * t_max + t) as u32;
            }
        }
        let back = Tensor::from_vec(back, n_tok, dev)?;
        Ok(out.index_select(&back, 0)?)
    }

    #[allow(clippy::too_many_arguments)]
    fn attend_one(
        &self,
        keys: &[f32],
        values: &[f32],
        q: &[f32],
        meta: QueryMeta<'_>,
        kv_head: usize,
        opts: ScoreOptions,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let (bs, hd) = (self.layout.block_size, self.layout.head_dim);
        let n = meta.pos + 1;
        // With a sliding window, blocks wholly before the window are skipped (never read);
        // they stay allocated because forks, truncation and global layers may need them.
        let lo = opts.first_visible(meta.pos);
        // (block, first slot, end slot) of every block overlapping the visible range.
        let spans = || {
            meta.blocks
                .iter()
                .enumerate()
                .take(n.div_ceil(bs))
                .skip(lo / bs)
                .map(move |(bi, &block)| {
                    let from = lo.saturating_sub(bi * bs);
                    let to = (n - bi * bs).min(bs);
                    (block, from, to)
                })
        };
        scores.clear();
        scores.reserve(n - lo);
        let mut max = f32::NEG_INFINITY;
        for (block, from, to) in spans() {
            let base = self.offset(block, kv_head, 0);
            for kv in keys[base + from * hd..base + to * hd].chunks_exact(hd) {
                let s = opts.score(dot(q, kv));
                max = max.max(s);
                scores.push(s);
            }
        }
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        out.fill(0.0);
        let inv = 1.0 / sum;
        let mut w = scores.iter();
        for (block, from, to) in spans() {
            let base = self.offset(block, kv_head, 0);
            for (vv, &p) in values[base + from * hd..base + to * hd]
                .chunks_exact(hd)
                .zip(&mut w)
            {
                axpy(p * inv, vv, out);
            }
        }
    }
}

/// Dot product with eight independent accumulators (vectorises without fast-math).
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `out += a * x`.
#[inline]
fn axpy(a: f32, x: &[f32], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o += a * v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(num_blocks: usize) -> CacheLayout {
        CacheLayout {
            n_layers: 2,
            n_kv_heads: 2,
            head_dim: 4,
            block_size: 4,
            num_blocks,
        }
    }

    fn check_refcounts(c: &PagedKvCache) {
        let mut counts = vec![0u32; c.num_blocks()];
        for s in c.sequences() {
            for &b in c.block_table(s).unwrap() {
                counts[b as usize] += 1;
            }
        }
        for (b, &n) in counts.iter().enumerate() {
            assert_eq!(c.ref_count(b as u32), n, "block {b}");
        }
        let used = counts.iter().filter(|&&n| n > 0).count();
        assert_eq!(used + c.free_blocks(), c.num_blocks());
    }

    #[test]
    fn fork_shares_and_cow_copies_partial_block() {
        let mut c = PagedKvCache::new(layout(8)).unwrap();
        let a = c.create();
        c.reserve(&[(a, 6)]).unwrap();
        let blocks = c.block_table(a).unwrap().to_vec();
        for pos in 0..6 {
            let k: Vec<f32> = (0..8).map(|i| (pos * 10 + i) as f32).collect();
            c.write(0, &blocks, pos, &k, &k).unwrap();
        }
        let b = c.fork(a).unwrap();
        assert_eq!(c.used_blocks(), 2);
        check_refcounts(&c);
        c.reserve(&[(b, 1)]).unwrap();
        let tb = c.block_table(b).unwrap().to_vec();
        assert_eq!(tb[0], blocks[0]);
        assert_ne!(tb[1], blocks[1]);
        assert_eq!(c.used_blocks(), 3);
        // The copied slots hold the same data.
        let o_old = c.offset(blocks[1], 1, 1);
        let o_new = c.offset(tb[1], 1, 1);
        let Pool::Host { keys, .. } = &c.pool else {
            panic!("host pool expected")
        };
        assert_eq!(keys[0][o_old..o_old + 4], keys[0][o_new..o_new + 4]);
        check_refcounts(&c);
        c.release(a);
        c.release(b);
        assert_eq!(c.free_blocks(), 8);
    }

    #[test]
    fn exhaustion_is_an_error_and_leaves_cache_usable() {
        let mut c = PagedKvCache::new(layout(2)).unwrap();
        let a = c.create();
        c.reserve(&[(a, 5)]).unwrap();
        let err = c.reserve(&[(a, 4)]).unwrap_err();
        assert!(
            matches!(
                err,
                LmError::CacheExhausted {
                    needed: 1,
                    free: 0,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(c.seq_len(a), Some(5));
        c.reserve(&[(a, 3)]).unwrap();
        assert_eq!(c.seq_len(a), Some(8));
        c.truncate(a, 3).unwrap();
        assert_eq!(c.free_blocks(), 1);
        check_refcounts(&c);
    }

    #[test]
    fn dot_matches_naive() {
        let a: Vec<f32> = (0..19).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..19).map(|i| 1.0 - i as f32).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - naive).abs() < 1e-3);
    }
}
