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
//! grouped-query attention by mapping each query head to its key/value head.
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
//! Pool layout (per layer, for keys and values alike): block `b`, key/value head `h`,
//! slot `s`, dimension `d` is at `((b * n_kv_heads + h) * block_size + s) * head_dim + d`, so
//! the keys of one head inside one block are contiguous.

use std::collections::HashMap;

use rayon::prelude::*;

use super::error::{LmError, LmResult};

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

/// The paged KV cache. See the [module documentation](self).
#[derive(Debug)]
pub struct PagedKvCache {
    layout: CacheLayout,
    /// Floats per block per layer (`n_kv_heads * block_size * head_dim`).
    block_floats: usize,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    refs: Vec<u32>,
    free: Vec<u32>,
    seqs: HashMap<u64, SeqState>,
    next_id: u64,
}

impl PagedKvCache {
    /// Allocate a pool of `layout.num_blocks` blocks per layer.
    ///
    /// # Errors
    /// [`LmError::InvalidConfig`] when a dimension is zero or the pool size overflows.
    pub fn new(layout: CacheLayout) -> LmResult<Self> {
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
        let keys = (0..n_layers).map(|_| vec![0f32; layer_floats]).collect();
        let values = (0..n_layers).map(|_| vec![0f32; layer_floats]).collect();
        Ok(Self {
            layout,
            block_floats,
            keys,
            values,
            refs: vec![0; num_blocks],
            // Pop from the end: hand out low block ids first.
            free: (0..num_blocks as u32).rev().collect(),
            seqs: HashMap::new(),
            next_id: 0,
        })
    }

    /// The cache's layout.
    pub fn layout(&self) -> CacheLayout {
        self.layout
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
        let cow = state.len % bs != 0
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
    /// the new tokens; in both cases nothing is modified. (The block count is computed per
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
        let bs = self.layout.block_size;
        let mut starts = Vec::with_capacity(appends.len());
        for &(seq, n) in appends {
            // Checked above: the handle exists.
            let Some(mut state) = self.seqs.remove(&seq.0) else {
                return Err(LmError::UnknownSequence(seq.0));
            };
            if n > 0 && state.len % bs != 0 {
                if let Some(last) = state.blocks.last_mut() {
                    if self.refs[*last as usize] > 1 {
                        let fresh = self.alloc();
                        self.copy_block(*last, fresh, state.len % bs);
                        self.refs[*last as usize] -= 1;
                        *last = fresh;
                    }
                }
            }
            starts.push(state.len);
            state.len += n;
            while state.blocks.len() < state.len.div_ceil(bs) {
                let b = self.alloc();
                state.blocks.push(b);
            }
            self.seqs.insert(seq.0, state);
        }
        Ok(starts)
    }

    /// Take a block from the free list (the caller has checked that one is there).
    fn alloc(&mut self) -> u32 {
        let b = self.free.pop().expect("free list checked by the caller");
        self.refs[b as usize] = 1;
        b
    }

    /// Copy the first `slots` token slots of block `src` into block `dst`, in every layer.
    fn copy_block(&mut self, src: u32, dst: u32, slots: usize) {
        let (bs, hd) = (self.layout.block_size, self.layout.head_dim);
        let bf = self.block_floats;
        for pool in self.keys.iter_mut().chain(self.values.iter_mut()) {
            for h in 0..self.layout.n_kv_heads {
                let from = src as usize * bf + h * bs * hd;
                let to = dst as usize * bf + h * bs * hd;
                pool.copy_within(from..from + slots * hd, to);
            }
        }
    }

    /// Offset of (block, head, slot) inside a layer's pool.
    #[inline]
    fn offset(&self, block: u32, head: usize, slot: usize) -> usize {
        ((block as usize * self.layout.n_kv_heads + head) * self.layout.block_size + slot)
            * self.layout.head_dim
    }

    /// Store one token's keys and values (`n_kv_heads * head_dim` floats each, head-major) at
    /// position `pos` of the sequence whose block table is `blocks`, in layer `layer`.
    ///
    /// The position must have been reserved with [`PagedKvCache::reserve`], which guarantees
    /// that its block is not shared.
    pub fn write(&mut self, layer: usize, blocks: &[u32], pos: usize, k: &[f32], v: &[f32]) {
        let (bs, hd) = (self.layout.block_size, self.layout.head_dim);
        let block = blocks[pos / bs];
        debug_assert_eq!(self.refs[block as usize], 1, "write into a shared block");
        let slot = pos % bs;
        for h in 0..self.layout.n_kv_heads {
            let o = self.offset(block, h, slot);
            self.keys[layer][o..o + hd].copy_from_slice(&k[h * hd..(h + 1) * hd]);
            self.values[layer][o..o + hd].copy_from_slice(&v[h * hd..(h + 1) * hd]);
        }
    }

    /// Causal attention for a batch of query tokens in layer `layer`, reading keys and values
    /// through block tables.
    ///
    /// `q` holds `queries.len()` rows of `n_heads * head_dim` floats (head-major, rotary
    /// embedding already applied); row `i` attends to positions `0..=queries[i].pos` of its
    /// sequence, whose keys and values must already be written. The result (same shape as
    /// `q`) goes to `out`. `n_heads` must be a multiple of the number of key/value heads.
    pub fn attend(
        &self,
        layer: usize,
        q: &[f32],
        queries: &[QueryMeta<'_>],
        n_heads: usize,
        scale: f32,
        out: &mut [f32],
    ) {
        let hd = self.layout.head_dim;
        let group = n_heads / self.layout.n_kv_heads;
        let keys = &self.keys[layer];
        let values = &self.values[layer];
        out.par_chunks_mut(hd)
            .enumerate()
            .with_min_len(4)
            .for_each_init(Vec::new, |scores: &mut Vec<f32>, (row, o)| {
                let (t, h) = (row / n_heads, row % n_heads);
                let meta = queries[t];
                let qv = &q[row * hd..(row + 1) * hd];
                self.attend_one(keys, values, qv, meta, h / group, scale, scores, o);
            });
    }

    #[allow(clippy::too_many_arguments)]
    fn attend_one(
        &self,
        keys: &[f32],
        values: &[f32],
        q: &[f32],
        meta: QueryMeta<'_>,
        kv_head: usize,
        scale: f32,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let (bs, hd) = (self.layout.block_size, self.layout.head_dim);
        let n = meta.pos + 1;
        scores.clear();
        scores.reserve(n);
        let mut max = f32::NEG_INFINITY;
        for (bi, &block) in meta.blocks.iter().enumerate().take(n.div_ceil(bs)) {
            let slots = (n - bi * bs).min(bs);
            let base = self.offset(block, kv_head, 0);
            for kv in keys[base..base + slots * hd].chunks_exact(hd) {
                let s = dot(q, kv) * scale;
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
        for (bi, &block) in meta.blocks.iter().enumerate().take(n.div_ceil(bs)) {
            let slots = (n - bi * bs).min(bs);
            let base = self.offset(block, kv_head, 0);
            let w = &scores[bi * bs..bi * bs + slots];
            for (vv, &p) in values[base..base + slots * hd].chunks_exact(hd).zip(w) {
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
            c.write(0, &blocks, pos, &k, &k);
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
        assert_eq!(c.keys[0][o_old..o_old + 4], c.keys[0][o_new..o_new + 4]);
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
