//! The gather back-end: the pool is one candle tensor per layer on any device, and attention
//! is written with candle operations only (gather rows, batched matrix products, masked
//! softmax), so nothing moves to the host.

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
        })
    }

    /// Pool row indices of `slots`, repeated across a row's width (for `scatter_set`).
    fn scatter_index(&self, slots: &[u32], width: usize) -> LmResult<Tensor> {
        let idx: Vec<u32> = slots
            .iter()
            .flat_map(|&s| std::iter::repeat_n(s, width))
            .collect();
        Ok(Tensor::from_vec(idx, (slots.len(), width), &self.device)?)
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
        let (bs, hd, nkv) = (layout.block_size, layout.head_dim, layout.n_kv_heads);
        let (kp, vp) = (&self.keys[layer], &self.values[layer]);
        let n_tok = queries.len();
        if q.dims() != [n_tok, n_heads * hd] {
            return Err(LmError::InvalidConfig(
                "attention shapes do not match the cache".into(),
            ));
        }
        let q = &q.to_device(&self.device)?.to_dtype(DType::F32)?;
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
}
