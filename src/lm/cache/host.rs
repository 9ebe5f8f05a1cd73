//! The host back-end: the pool is host memory and attention walks each query's block table
//! in place (no gathered copy of a sequence's history), in parallel over (query token,
//! key/value head) pairs with rayon, accumulating in f32; the arithmetic of one pair, all
//! the query heads that share its key/value head, is in `host_attention.rs`.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::host_attention::{attend_group, GroupQuery, Scratch};
use super::store::KvStore;
use super::{AttentionPath, CacheLayout, QueryMeta, ScoreOptions};
use crate::lm::error::{LmError, LmResult};

/// Host vectors, one per layer, in the block-major layout of the module documentation.
#[derive(Debug)]
pub(super) struct HostStore {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
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

/// Floats of one block of one layer.
fn block_floats(l: &CacheLayout) -> usize {
    l.n_kv_heads * l.block_size * l.head_dim
}

/// Offset of (block, head, slot) in a layer's pool.
#[inline]
pub(super) fn offset(l: &CacheLayout, block: u32, head: usize, slot: usize) -> usize {
    ((block as usize * l.n_kv_heads + head) * l.block_size + slot) * l.head_dim
}

/// The rows of a `[n, width]` tensor as one host vector.
fn host_rows(t: &Tensor) -> LmResult<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

impl HostStore {
    /// A zeroed pool for `layout` (sizes already checked by the cache).
    pub(super) fn new(layout: &CacheLayout) -> LmResult<Self> {
        let floats = block_floats(layout) * layout.num_blocks;
        Ok(Self {
            keys: zeroed_layers(layout.n_layers, floats)?,
            values: zeroed_layers(layout.n_layers, floats)?,
        })
    }
}

impl KvStore for HostStore {
    fn path(&self) -> AttentionPath {
        AttentionPath::Cpu
    }

    fn device(&self) -> Device {
        Device::Cpu
    }

    fn grow(&mut self, layout: &CacheLayout, num_blocks: usize) -> LmResult<()> {
        let bf = block_floats(layout);
        let add = bf * (num_blocks - layout.num_blocks);
        // Reserve everything first so that a failure leaves the pool as it was.
        for v in self.keys.iter_mut().chain(self.values.iter_mut()) {
            v.try_reserve_exact(add).map_err(|_| LmError::OutOfMemory {
                what: "the KV cache".into(),
                bytes: (add as u64) * 4 * 2 * layout.n_layers as u64,
            })?;
        }
        for v in self.keys.iter_mut().chain(self.values.iter_mut()) {
            v.resize(bf * num_blocks, 0.0);
        }
        Ok(())
    }

    fn copy_block(
        &mut self,
        layout: &CacheLayout,
        src: u32,
        dst: u32,
        slots: usize,
    ) -> LmResult<()> {
        let hd = layout.head_dim;
        for pool in self.keys.iter_mut().chain(self.values.iter_mut()) {
            for h in 0..layout.n_kv_heads {
                let from = offset(layout, src, h, 0);
                let to = offset(layout, dst, h, 0);
                pool.copy_within(from..from + slots * hd, to);
            }
        }
        Ok(())
    }

    fn write(
        &mut self,
        layout: &CacheLayout,
        layer: usize,
        slots: &[u32],
        k: &Tensor,
        v: &Tensor,
    ) -> LmResult<()> {
        let (bs, hd, nkv) = (layout.block_size, layout.head_dim, layout.n_kv_heads);
        let (k, v) = (host_rows(k)?, host_rows(v)?);
        let w = nkv * hd;
        if k.len() != slots.len() * w || v.len() != k.len() {
            return Err(LmError::InvalidConfig(
                "key/value rows do not match the cache".into(),
            ));
        }
        let (keys, values) = (&mut self.keys[layer], &mut self.values[layer]);
        for (i, &s) in slots.iter().enumerate() {
            let (block, slot) = (s / bs as u32, s as usize % bs);
            for h in 0..nkv {
                let o = offset(layout, block, h, slot);
                let r = i * w + h * hd;
                keys[o..o + hd].copy_from_slice(&k[r..r + hd]);
                values[o..o + hd].copy_from_slice(&v[r..r + hd]);
            }
        }
        Ok(())
    }

    fn read(
        &self,
        layout: &CacheLayout,
        layer: usize,
        slots: &[u32],
    ) -> LmResult<(Tensor, Tensor)> {
        let (bs, hd, nkv) = (layout.block_size, layout.head_dim, layout.n_kv_heads);
        let (mut k, mut v) = (Vec::new(), Vec::new());
        for &s in slots {
            let (block, slot) = (s / bs as u32, s as usize % bs);
            for h in 0..nkv {
                let o = offset(layout, block, h, slot);
                k.extend_from_slice(&self.keys[layer][o..o + hd]);
                v.extend_from_slice(&self.values[layer][o..o + hd]);
            }
        }
        let shape = (slots.len(), nkv * hd);
        Ok((
            Tensor::from_vec(k, shape, &Device::Cpu)?,
            Tensor::from_vec(v, shape, &Device::Cpu)?,
        ))
    }

    fn attend(
        &self,
        layout: &CacheLayout,
        layer: usize,
        q: &Tensor,
        queries: &[QueryMeta<'_>],
        n_heads: usize,
        opts: ScoreOptions,
    ) -> LmResult<Tensor> {
        let hd = layout.head_dim;
        let q = host_rows(q)?;
        if q.len() != queries.len() * n_heads * hd {
            return Err(LmError::InvalidConfig(
                "attention shapes do not match the cache".into(),
            ));
        }
        let group = n_heads / layout.n_kv_heads;
        let (keys, values) = (&self.keys[layer], &self.values[layer]);
        let mut out = vec![0f32; q.len()];
        // One task per (token, key/value head): the group's rows are contiguous in `q`.
        let width = group * hd;
        out.par_chunks_mut(width)
            .enumerate()
            .with_min_len(2)
            .for_each_init(Scratch::default, |scratch, (unit, o)| {
                let (t, kv_head) = (unit / layout.n_kv_heads, unit % layout.n_kv_heads);
                let g = GroupQuery {
                    layout,
                    keys,
                    values,
                    qs: &q[unit * width..(unit + 1) * width],
                    meta: queries[t],
                    kv_head,
                    opts,
                };
                attend_group(&g, scratch, o);
            });
        Ok(Tensor::from_vec(
            out,
            (queries.len(), n_heads * hd),
            &Device::Cpu,
        )?)
    }
}
