//! The host back-end: the pool is host memory and attention walks each query's block table
//! in place (no gathered copy of a sequence's history), in parallel over (query token, head)
//! pairs with rayon, accumulating in f32. Grouped-query attention maps each query head to its
//! key/value head.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

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
fn offset(l: &CacheLayout, block: u32, head: usize, slot: usize) -> usize {
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

    /// [`Self::attend_one`], compiled for AVX2 where the CPU has it (chosen at run time).
    /// The loops only get wider vectors: no operation is fused or reordered (no FMA), so
    /// both builds give the same bits.
    fn attend_one_best(head: &HeadQuery<'_>, scores: &mut Vec<f32>, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { Self::attend_one_avx2(head, scores, out) };
        }
        Self::attend_one(head, scores, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn attend_one_avx2(head: &HeadQuery<'_>, scores: &mut Vec<f32>, out: &mut [f32]) {
        Self::attend_one(head, scores, out)
    }

    /// One query head's attention output into `out` (`scores` is scratch space).
    #[inline(always)]
    fn attend_one(head: &HeadQuery<'_>, scores: &mut Vec<f32>, out: &mut [f32]) {
        let HeadQuery {
            layout,
            keys,
            values,
            q,
            meta,
            kv_head,
            opts,
        } = *head;
        let (bs, hd) = (layout.block_size, layout.head_dim);
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
            let base = offset(layout, block, kv_head, 0);
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
            let base = offset(layout, block, kv_head, 0);
            for (vv, &p) in values[base + from * hd..base + to * hd]
                .chunks_exact(hd)
                .zip(&mut w)
            {
                axpy(p * inv, vv, out);
            }
        }
    }
}

/// One query head against one key/value head of one layer's cache.
#[derive(Clone, Copy)]
struct HeadQuery<'a> {
    layout: &'a CacheLayout,
    keys: &'a [f32],
    values: &'a [f32],
    q: &'a [f32],
    meta: QueryMeta<'a>,
    kv_head: usize,
    opts: ScoreOptions,
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
        out.par_chunks_mut(hd)
            .enumerate()
            .with_min_len(4)
            .for_each_init(Vec::new, |scores: &mut Vec<f32>, (row, o)| {
                let (t, h) = (row / n_heads, row % n_heads);
                let qv = &q[row * hd..(row + 1) * hd];
                let head = HeadQuery {
                    layout,
                    keys,
                    values,
                    q: qv,
                    meta: queries[t],
                    kv_head: h / group,
                    opts,
                };
                Self::attend_one_best(&head, scores, o);
            });
        Ok(Tensor::from_vec(
            out,
            (queries.len(), n_heads * hd),
            &Device::Cpu,
        )?)
    }
}

/// Dot product with eight independent accumulators (vectorises without fast-math).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
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
#[inline(always)]
fn axpy(a: f32, x: &[f32], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o += a * v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_naive() {
        let a: Vec<f32> = (0..19).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..19).map(|i| 1.0 - i as f32).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - naive).abs() < 1e-3);
    }

    /// The build chosen at run time gives the bits of the portable build (uneven head
    /// dimension, partial last block, a window, a soft cap).
    #[test]
    fn attention_builds_agree_bit_for_bit() {
        let layout = CacheLayout {
            n_layers: 1,
            n_kv_heads: 2,
            head_dim: 20,
            block_size: 4,
            num_blocks: 5,
        };
        let floats = block_floats(&layout) * layout.num_blocks;
        let val = |i: usize, k: f32| ((i * 2_654_435_761) % 1000) as f32 / 500.0 - 1.0 + k;
        let keys: Vec<f32> = (0..floats).map(|i| val(i, 0.0)).collect();
        let values: Vec<f32> = (0..floats).map(|i| val(i + 7, 0.1)).collect();
        let q: Vec<f32> = (0..20).map(|i| val(i + 3, -0.2)).collect();
        let blocks = [3u32, 0, 4, 1];
        for (pos, opts) in [
            (
                13,
                ScoreOptions {
                    scale: 0.22,
                    softcap: None,
                    window: None,
                },
            ),
            (
                14,
                ScoreOptions {
                    scale: 0.5,
                    softcap: Some(5.0),
                    window: Some(6),
                },
            ),
        ] {
            let meta = QueryMeta {
                blocks: &blocks,
                pos,
            };
            let head = HeadQuery {
                layout: &layout,
                keys: &keys,
                values: &values,
                q: &q,
                meta,
                kv_head: 1,
                opts,
            };
            let (mut s1, mut s2) = (Vec::new(), Vec::new());
            let (mut o1, mut o2) = (vec![0f32; 20], vec![0f32; 20]);
            HostStore::attend_one(&head, &mut s1, &mut o1);
            HostStore::attend_one_best(&head, &mut s2, &mut o2);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&o1), bits(&o2));
            assert!(o1.iter().all(|x| x.is_finite() && *x != 0.0));
        }
    }
}
