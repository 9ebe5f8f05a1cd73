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
//! in parallel over (query token, key/value head) pairs with rayon, accumulates in f32, and
//! handles grouped-query attention by taking the query heads of one key/value head
//! together (each key and value row read once for the group). Per layer,
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
//! Where the pool lives and how attention reads it is a back-end behind one trait
//! (`KvStore`, private): the bookkeeping above is shared, and [`AttentionPath`] only picks
//! the back-end when the cache is built.
//!
//! * [`AttentionPath::Cpu`] (the default on the CPU, `host.rs`): the pool is host memory and
//!   attention walks the block tables directly, as described above. Pool layout (per layer,
//!   for keys and values alike): block `b`, key/value head `h`, slot `s`, dimension `d` is at
//!   `((b * n_kv_heads + h) * block_size + s) * head_dim + d`, so the keys of one head inside
//!   one block are contiguous.
//! * [`AttentionPath::Gather`] (`gather.rs`): the pool is one candle tensor per layer,
//!   `[num_blocks * block_size, n_kv_heads * head_dim]`, on any candle device. New keys and
//!   values are written with `scatter_set`; attention gathers each sequence's rows with
//!   `index_select` into a padded contiguous batch, then runs ordinary masked softmax
//!   attention with batched matrix products (query heads of one group are stacked, so repeated
//!   key/value heads are never materialised). Only candle operations are used, so forks,
//!   copy-on-write and attention on a CUDA or Metal device move no key/value data to the
//!   host.

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use super::error::{LmError, LmResult};

mod gather;
mod host;
mod host_attention;
mod store;

use gather::GatherStore;
use host::HostStore;
use store::KvStore;

/// Which attention back-end reads the cache (and so where the pool lives).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionPath {
    /// Host pool; attention written for the paged layout, reading blocks in place
    /// (parallel over query tokens and heads with rayon). The fastest choice on the CPU.
    #[default]
    Cpu,
    /// Pool of candle tensors on any device; blocks are gathered with `index_select` into
    /// contiguous keys/values, then ordinary attention runs with candle operations.
    Gather,
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

/// The paged, reference-counted KV cache shared by a particle population: fixed-size blocks
/// from one pool, a block table per sequence, forks that share blocks, copy-on-write of a
/// shared partial block, typed exhaustion ([`LmError::CacheExhausted`]) that leaves the cache
/// usable, and two attention back-ends ([`AttentionPath`]). Layout and sizing:
/// `docs/cache.md`.
#[derive(Debug)]
pub struct PagedKvCache {
    layout: CacheLayout,
    store: Box<dyn KvStore>,
    refs: Vec<u32>,
    free: Vec<u32>,
    seqs: HashMap<u64, SeqState>,
    next_id: u64,
}

impl PagedKvCache {
    /// Allocate a host pool of `layout.num_blocks` blocks per layer, read by the CPU
    /// attention back-end ([`AttentionPath::Cpu`]).
    ///
    /// # Errors
    /// [`LmError::InvalidConfig`] when a dimension is zero or the pool size overflows;
    /// [`LmError::OutOfMemory`] when the pool cannot be allocated.
    pub fn new(layout: CacheLayout) -> LmResult<Self> {
        Self::with_path(layout, AttentionPath::Cpu, &Device::Cpu)
    }

    /// Allocate a pool for the given attention back-end. With [`AttentionPath::Gather`] the
    /// pool tensors live on `device`; [`AttentionPath::Cpu`] needs `device` to be the CPU.
    ///
    /// # Errors
    /// [`LmError::InvalidConfig`] when a dimension is zero, the pool size overflows, or the
    /// CPU back-end is asked for another device; [`LmError::OutOfMemory`] or
    /// [`LmError::Candle`] when the pool cannot be allocated.
    pub fn with_path(layout: CacheLayout, path: AttentionPath, device: &Device) -> LmResult<Self> {
        check_pool_size(&layout, layout.num_blocks)?;
        let store: Box<dyn KvStore> = match path {
            AttentionPath::Cpu if !device.is_cpu() => {
                return Err(LmError::InvalidConfig(format!(
                    "the CPU attention back-end keeps its pool in host memory; use \
                     AttentionPath::Gather for {device:?}"
                )))
            }
            AttentionPath::Cpu => Box::new(HostStore::new(&layout)?),
            AttentionPath::Gather => Box::new(GatherStore::new(&layout, device)?),
        };
        let num_blocks = layout.num_blocks;
        Ok(Self {
            layout,
            store,
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
        check_pool_size(&self.layout, num_blocks)?;
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
        self.store.grow(&self.layout, num_blocks)?;
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
        self.store.path()
    }

    /// The device holding the pool (the CPU for [`AttentionPath::Cpu`]).
    pub fn device(&self) -> Device {
        self.store.device()
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
                    if let Err(e) = self
                        .store
                        .copy_block(&self.layout, last, fresh, state.len % bs)
                    {
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

    /// Pool slot (`block * block_size + slot in block`) of position `pos` in a sequence
    /// with block table `blocks`.
    #[inline]
    fn slot(blocks: &[u32], pos: usize, bs: usize) -> u32 {
        blocks[pos / bs] * bs as u32 + (pos % bs) as u32
    }

    /// Pool slots of the positions `positions` of a sequence with block table `blocks`, for
    /// [`PagedKvCache::write`].
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

    fn check_slots(&self, layer: usize, slots: &[u32]) -> LmResult<()> {
        if layer >= self.layout.n_layers {
            return Err(LmError::InvalidConfig(format!(
                "no layer {layer} in the cache"
            )));
        }
        let bs = self.layout.block_size as u32;
        match slots
            .iter()
            .find(|&&s| self.refs.get((s / bs) as usize).is_none_or(|&r| r == 0))
        {
            Some(s) => Err(LmError::InvalidConfig(format!(
                "pool slot {s} is not reserved"
            ))),
            None => Ok(()),
        }
    }

    /// Store the keys and values of several tokens of one layer. `k` and `v` are
    /// `[slots.len(), n_kv_heads * head_dim]` tensors; row `i` goes to pool slot `slots[i]`
    /// (see [`PagedKvCache::slots`]), which must belong to a reserved block.
    ///
    /// # Errors
    /// [`LmError::InvalidConfig`] for a wrong layer, an unreserved slot or mismatched shapes;
    /// [`LmError::Candle`].
    pub fn write(&mut self, layer: usize, slots: &[u32], k: &Tensor, v: &Tensor) -> LmResult<()> {
        self.check_slots(layer, slots)?;
        debug_assert!(
            slots
                .iter()
                .all(|&s| self.refs[(s / self.layout.block_size as u32) as usize] == 1),
            "write into a shared block"
        );
        self.store.write(&self.layout, layer, slots, k, v)
    }

    /// The stored keys and values of pool slots `slots` of one layer
    /// (`[slots.len(), n_kv_heads * head_dim]` each, on the pool's device).
    ///
    /// # Errors
    /// [`LmError::InvalidConfig`] for a wrong layer or an unreserved slot; [`LmError::Candle`].
    pub fn read(&self, layer: usize, slots: &[u32]) -> LmResult<(Tensor, Tensor)> {
        self.check_slots(layer, slots)?;
        self.store.read(&self.layout, layer, slots)
    }

    /// Causal attention of one layer: query row `i` of `q` (`[queries.len(), n_heads *
    /// head_dim]`) attends to positions `0..=queries[i].pos` of the sequence whose block
    /// table is `queries[i].blocks` (limited by `scores.window`), with grouped-query heads.
    /// Returns a tensor of `q`'s shape on the pool's device.
    ///
    /// # Errors
    /// [`LmError::InvalidConfig`] when the shapes do not match the cache or a position is not
    /// reserved; [`LmError::Candle`].
    pub fn attend(
        &self,
        layer: usize,
        q: &Tensor,
        queries: &[QueryMeta<'_>],
        n_heads: usize,
        scores: ScoreOptions,
    ) -> LmResult<Tensor> {
        let hd = self.layout.head_dim;
        if layer >= self.layout.n_layers
            || n_heads == 0
            || !n_heads.is_multiple_of(self.layout.n_kv_heads)
            || q.dims() != [queries.len(), n_heads * hd]
        {
            return Err(LmError::InvalidConfig(
                "attention shapes do not match the cache".into(),
            ));
        }
        let bs = self.layout.block_size;
        if let Some(m) = queries.iter().find(|m| m.pos >= m.blocks.len() * bs) {
            return Err(LmError::InvalidConfig(format!(
                "position {} is not reserved",
                m.pos
            )));
        }
        self.store
            .attend(&self.layout, layer, q, queries, n_heads, scores)
    }
}

/// Refuse pool sizes that are zero or overflow (bytes of all layers, keys and values).
fn check_pool_size(layout: &CacheLayout, num_blocks: usize) -> LmResult<()> {
    let CacheLayout {
        n_layers,
        n_kv_heads,
        head_dim,
        block_size,
        ..
    } = *layout;
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
    n_kv_heads
        .checked_mul(block_size)
        .and_then(|x| x.checked_mul(head_dim))
        .and_then(|x| x.checked_mul(num_blocks))
        .and_then(|n| n.checked_mul(4 * 2 * n_layers))
        .map(|_| ())
        .ok_or_else(|| LmError::InvalidConfig("cache pool size overflows".into()))
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
            let k = Tensor::from_vec(k, (1, 8), &Device::Cpu).unwrap();
            let s = c.slots(&blocks, pos..pos + 1).unwrap();
            c.write(0, &s, &k, &k).unwrap();
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
        let rows = |blocks: &[u32]| {
            let s = c.slots(blocks, 4..6).unwrap();
            c.read(0, &s).unwrap().0.to_vec2::<f32>().unwrap()
        };
        assert_eq!(rows(&blocks), rows(&tb));
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
}
