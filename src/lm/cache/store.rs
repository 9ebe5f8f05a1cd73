//! The attention back-end contract: where keys and values live and how attention reads them.

use candle_core::{Device, Tensor};

use super::{AttentionPath, CacheLayout, QueryMeta, ScoreOptions};
use crate::lm::error::LmResult;

/// Storage of a [`super::PagedKvCache`]'s pool and the attention that reads it.
///
/// The cache owns the block tables and reference counts and calls a store only with
/// arguments it has checked: slots (`block * block_size + slot_in_block`) of reserved
/// positions, layers below `n_layers`, rows of `n_kv_heads * head_dim` values.
pub(super) trait KvStore: std::fmt::Debug + Send + Sync {
    /// Which back-end this is.
    fn path(&self) -> AttentionPath;
    /// The device holding the pool.
    fn device(&self) -> Device;
    /// Grow the pool from `layout.num_blocks` to `num_blocks` blocks (new blocks zeroed).
    /// On failure the pool is unchanged.
    fn grow(&mut self, layout: &CacheLayout, num_blocks: usize) -> LmResult<()>;
    /// Copy the first `slots` slots of block `src` to block `dst`, in every layer.
    fn copy_block(
        &mut self,
        layout: &CacheLayout,
        src: u32,
        dst: u32,
        slots: usize,
    ) -> LmResult<()>;
    /// Write key and value rows (`[slots.len(), n_kv_heads * head_dim]`) of one layer.
    fn write(
        &mut self,
        layout: &CacheLayout,
        layer: usize,
        slots: &[u32],
        k: &Tensor,
        v: &Tensor,
    ) -> LmResult<()>;
    /// Read key and value rows of one layer (`[slots.len(), n_kv_heads * head_dim]` each).
    fn read(&self, layout: &CacheLayout, layer: usize, slots: &[u32])
        -> LmResult<(Tensor, Tensor)>;
    /// Causal attention of queries `q` (`[queries.len(), n_heads * head_dim]`, on the
    /// store's device) over their sequences' cached keys and values; the result has `q`'s
    /// shape.
    fn attend(
        &self,
        layout: &CacheLayout,
        layer: usize,
        q: &Tensor,
        queries: &[QueryMeta<'_>],
        n_heads: usize,
        opts: ScoreOptions,
    ) -> LmResult<Tensor>;
}
