//! The gather back-end: the pool is one candle tensor per layer on any device, and attention
//! is written with candle operations only (gather rows, batched matrix products, masked
//! softmax), so nothing moves to the host.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};

use super::store::KvStore;
use super::{AttentionPath, CacheLayout, QueryMeta, ScoreOptions};
use crate::lm::error::{LmError, LmResult};

/// Candle tensors, one per layer, `[num_blocks * block_size, n_kv_heads * head_dim]`.
#[derive(Debug)]
pub(super) struct GatherStore {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    device: Device,
    /// The scatter index of the last write, reused by the following layers of the same
    /// forward pass (same slots).
    last_scatter: Option<(Vec<u32>, Tensor)>,
    /// The attention plan of the last call, likewise.
    last_plan: Mutex<Option<(Vec<u32>, Arc<Plan>)>>,
}

impl GatherStore {
    /// A zeroed pool for `layout` on `device`.
    pub(super) fn new(layout: &CacheLayout, device: &Device) -> LmResult<Self> {
        let shape = (
            layout.num_blocks * layout.block_size,
            layout.n_kv_heads * layout.head_dim,
        );
        let alloc = || -> LmResult<Vec<Tensor>> {
            (0..layout.n_layers)
                .map(|_| Ok(Tensor::zeros(shape, DType::F32, device)?))
                .collect()
        };
        Ok(Self {
            keys: alloc()?,
            values: alloc()?,
            device: device.clone(),
            last_scatter: None,
            last_plan: Mutex::new(None),
        })
    }

    /// Pool row indices of `slots`, repeated across a row's width (for `scatter_set`); the
    /// last one is kept, since every layer of a forward pass writes the same slots.
    fn scatter_index(&mut self, slots: &[u32], width: usize) -> LmResult<Tensor> {
        if let Some((s, idx)) = &self.last_scatter {
            if s == slots {
                return Ok(idx.clone());
            }
        }
        let idx: Vec<u32> = slots
            .iter()
            .flat_map(|&s| std::iter::repeat_n(s, width))
            .collect();
        let idx = Tensor::from_vec(idx, (slots.len(), width), &self.device)?;
        self.last_scatter = Some((slots.to_vec(), idx.clone()));
        Ok(idx)
    }
}

impl KvStore for GatherStore {
    fn path(&self) -> AttentionPath {
        AttentionPath::Gather
    }

    fn device(&self) -> Device {
        self.device.clone()
    }

    fn grow(&mut self, layout: &CacheLayout, num_blocks: usize) -> LmResult<()> {
        let cols = layout.n_kv_heads * layout.head_dim;
        let rows = (num_blocks - layout.num_blocks) * layout.block_size;
        // Build every grown tensor before replacing any, so that a failure changes nothing.
        let grown = self
            .keys
            .iter()
            .chain(self.values.iter())
            .map(|t| {
                let z = Tensor::zeros((rows, cols), DType::F32, &self.device)?;
                Ok(Tensor::cat(&[t, &z], 0)?)
            })
            .collect::<LmResult<Vec<_>>>()?;
        let n = self.keys.len();
        let mut grown = grown.into_iter();
        self.keys = grown.by_ref().take(n).collect();
        self.values = grown.collect();
        Ok(())
    }

    fn copy_block(
        &mut self,
        layout: &CacheLayout,
        src: u32,
        dst: u32,
        slots: usize,
    ) -> LmResult<()> {
        let bs = layout.block_size;
        for pool in self.keys.iter().chain(self.values.iter()) {
            let rows = pool.narrow(0, src as usize * bs, slots)?.copy()?;
            pool.slice_set(&rows, 0, dst as usize * bs)?;
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
        if slots.is_empty() {
            return Ok(());
        }
        let (n, w) = (slots.len(), layout.n_kv_heads * layout.head_dim);
        if k.elem_count() != n * w || v.elem_count() != n * w {
            return Err(LmError::InvalidConfig(
                "key/value rows do not match the cache".into(),
            ));
        }
        let idx = self.scatter_index(slots, w)?;
        let rows = |t: &Tensor| -> LmResult<Tensor> {
            Ok(t.to_device(&self.device)?
                .to_dtype(DType::F32)?
                .reshape((n, w))?
                .contiguous()?)
        };
        self.keys[layer].scatter_set(&idx, &rows(k)?, 0)?;
        self.values[layer].scatter_set(&idx, &rows(v)?, 0)?;
        Ok(())
    }

    fn read(
        &self,
        _layout: &CacheLayout,
        layer: usize,
        slots: &[u32],
    ) -> LmResult<(Tensor, Tensor)> {
        let idx = Tensor::from_slice(slots, slots.len(), &self.device)?;
        Ok((
            self.keys[layer].index_select(&idx, 0)?,
            self.values[layer].index_select(&idx, 0)?,
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
        let (hd, nkv) = (layout.head_dim, layout.n_kv_heads);
        let (kp, vp) = (&self.keys[layer], &self.values[layer]);
        let n_tok = queries.len();
        if q.dims() != [n_tok, n_heads * hd] {
            return Err(LmError::InvalidConfig(
                "attention shapes do not match the cache".into(),
            ));
        }
        let dev = &self.device;
        if n_tok == 0 {
            return Ok(Tensor::zeros((0, n_heads * hd), DType::F32, dev)?);
        }
        let q = &q.to_device(dev)?.to_dtype(DType::F32)?;
        let group = n_heads / nkv;
        let plan = self.plan(layout, queries, n_heads, opts)?;
        let (s, t_max, l_max) = (plan.runs, plan.t_max, plan.l_max);
        let gather = |pool: &Tensor| -> candle_core::Result<Tensor> {
            pool.index_select(&plan.kv_idx, 0)?
                .reshape((s, l_max, nkv, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let k = gather(kp)?;
        let v = gather(vp)?;
        let q_pad = Tensor::cat(&[q, &Tensor::zeros((1, n_heads * hd), DType::F32, dev)?], 0)?;
        let qb = q_pad
            .index_select(&plan.q_idx, 0)?
            .reshape((s, t_max, nkv, group, hd))?
            .permute((0, 2, 3, 1, 4))?
            .reshape((s, nkv, group * t_max, hd))?
            .contiguous()?;
        let mut scores = (qb.matmul(&k.transpose(2, 3)?.contiguous()?)? * f64::from(opts.scale))?;
        if let Some(cap) = opts.softcap {
            scores = ((scores / f64::from(cap))?.tanh()? * f64::from(cap))?;
        }
        let p = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&plan.mask)?)?;
        let out = p
            .matmul(&v)?
            .reshape((s, nkv, group, t_max, hd))?
            .permute((0, 3, 1, 2, 4))?
            .reshape((s * t_max, n_heads * hd))?;
        Ok(out.index_select(&plan.back, 0)?)
    }
}

/// The index tensors and mask of one attention call: which pool rows each padded run reads,
/// where each query sits in the padded batch, and back. They depend on the block tables,
/// positions, window and head count only, so the layers of one forward pass share them.
#[derive(Debug)]
struct Plan {
    runs: usize,
    t_max: usize,
    l_max: usize,
    /// Pool rows of every run's keys, `[runs * l_max]` (padding: row 0, masked out).
    kv_idx: Tensor,
    /// Query row of each padded query slot, `[runs * t_max]` (padding: the zero row).
    q_idx: Tensor,
    /// Additive mask, `[runs, 1, group * t_max, l_max]` (query heads of a group stacked).
    mask: Tensor,
    /// Row of query `i` in the padded output, `[queries]`.
    back: Tensor,
}

/// What a [`Plan`] depends on, flattened: head count, window, then per query its position,
/// its table's length and the table.
fn plan_key(queries: &[QueryMeta<'_>], n_heads: usize, opts: ScoreOptions) -> Vec<u32> {
    let mut key = vec![n_heads as u32, opts.window.map_or(u32::MAX, |w| w as u32)];
    for m in queries {
        key.push(m.pos as u32);
        key.push(m.blocks.len() as u32);
        key.extend_from_slice(m.blocks);
    }
    key
}

impl GatherStore {
    /// The plan of an attention call: the last one when the call matches it (the next layer
    /// of the same forward pass), else built on the host and sent to the device once.
    fn plan(
        &self,
        layout: &CacheLayout,
        queries: &[QueryMeta<'_>],
        n_heads: usize,
        opts: ScoreOptions,
    ) -> LmResult<Arc<Plan>> {
        let key = plan_key(queries, n_heads, opts);
        let mut last = self
            .last_plan
            .lock()
            .map_err(|_| LmError::InvalidConfig("attention plan lock poisoned".into()))?;
        if let Some((k, plan)) = last.as_ref() {
            if *k == key {
                return Ok(Arc::clone(plan));
            }
        }
        let plan = Arc::new(self.build_plan(layout, queries, n_heads, opts)?);
        *last = Some((key, Arc::clone(&plan)));
        Ok(plan)
    }

    fn build_plan(
        &self,
        layout: &CacheLayout,
        queries: &[QueryMeta<'_>],
        n_heads: usize,
        opts: ScoreOptions,
    ) -> LmResult<Plan> {
        let bs = layout.block_size;
        let group = n_heads / layout.n_kv_heads;
        let n_tok = queries.len();
        let dev = &self.device;
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
        let mut kv_idx = vec![0u32; s * l_max];
        let mut q_idx = vec![n_tok as u32; s * t_max];
        let mut mask = vec![f32::NEG_INFINITY; s * group * t_max * l_max];
        let mut back = vec![0u32; n_tok];
        for (r, &(first, len, blocks, start)) in runs.iter().enumerate() {
            let end = start + len;
            if end > blocks.len() * bs {
                return Err(LmError::InvalidConfig(format!(
                    "positions up to {end} are not reserved"
                )));
            }
            for p in 0..end {
                kv_idx[r * l_max + p] = blocks[p / bs] * bs as u32 + (p % bs) as u32;
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
                    back[first + t] = (r * t_max + t) as u32;
                }
                for g in 0..group {
                    let row = (r * group + g) * t_max + t;
                    mask[row * l_max + lo..row * l_max + hi].fill(0.0);
                }
            }
        }
        Ok(Plan {
            runs: s,
            t_max,
            l_max,
            kv_idx: Tensor::from_vec(kv_idx, s * l_max, dev)?,
            q_idx: Tensor::from_vec(q_idx, s * t_max, dev)?,
            mask: Tensor::from_vec(mask, (s, 1, group * t_max, l_max), dev)?,
            back: Tensor::from_vec(back, n_tok, dev)?,
        })
    }
}
