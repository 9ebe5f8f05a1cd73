//! The batched, cached forward pass: all new tokens of all sequences in one matrix, attention
//! through each sequence's block table.

use candle_core::{DType, Tensor};

use super::activation::gated;
use super::layers::Layer;
use super::{LlamaModel, LogitRows, SeqTokens};
use crate::lm::cache::{PagedKvCache, QueryMeta};
use crate::lm::config::RopeStyle;
use crate::lm::error::{LmError, LmResult};

impl LlamaModel {
    /// Append tokens to several cached sequences in one batched pass and return logits.
    ///
    /// All new tokens of all entries are processed together; entry `i`'s tokens take
    /// positions `len_i, len_i + 1, ...` where `len_i` is its current cache length, and each
    /// attends causally to its own sequence only. Returns a `[rows, vocab]` f32 tensor, rows as
    /// selected by `rows`.
    ///
    /// On error the cache is left as before the call.
    ///
    /// # Errors
    /// [`LmError::NoTokens`], [`LmError::TokenOutOfRange`], [`LmError::ContextOverflow`],
    /// [`LmError::UnknownSequence`], [`LmError::CacheExhausted`], [`LmError::Candle`].
    pub fn forward(
        &self,
        batch: &[SeqTokens<'_>],
        cache: &mut PagedKvCache,
        rows: LogitRows,
    ) -> LmResult<Tensor> {
        let layout = cache.layout();
        let c = &self.config;
        if layout.n_layers != c.n_layers
            || layout.n_kv_heads != c.n_kv_heads
            || layout.head_dim != c.head_dim
        {
            return Err(LmError::InvalidConfig(
                "the cache was built for another model".into(),
            ));
        }
        let mut appends = Vec::with_capacity(batch.len());
        for e in batch {
            if e.tokens.is_empty() {
                return Err(LmError::NoTokens(e.seq.0));
            }
            self.check_tokens(e.tokens)?;
            let len = cache
                .seq_len(e.seq)
                .ok_or(LmError::UnknownSequence(e.seq.0))?;
            if len + e.tokens.len() > c.max_seq_len {
                return Err(LmError::ContextOverflow {
                    len: len + e.tokens.len(),
                    max: c.max_seq_len,
                });
            }
            appends.push((e.seq, e.tokens.len()));
        }
        let starts = cache.reserve(&appends)?;
        let result = self.forward_reserved(batch, &starts, cache, rows);
        if result.is_err() {
            for (e, &s) in batch.iter().zip(&starts) {
                let _ = cache.truncate(e.seq, s);
            }
        }
        result
    }

    fn forward_reserved(
        &self,
        batch: &[SeqTokens<'_>],
        starts: &[usize],
        cache: &mut PagedKvCache,
        rows: LogitRows,
    ) -> LmResult<Tensor> {
        let c = &self.config;
        let (nh, nkv, hd) = (c.n_heads, c.n_kv_heads, c.head_dim);
        let dev = self.device();
        let tables: Vec<Vec<u32>> = batch
            .iter()
            .map(|e| cache.block_table(e.seq).map(<[u32]>::to_vec))
            .collect::<Option<_>>()
            .ok_or_else(|| LmError::InvalidConfig("sequence vanished from the cache".into()))?;
        let mut ids = Vec::new();
        let mut meta: Vec<(usize, usize)> = Vec::new(); // (entry, position)
        let mut slots = Vec::new();
        for (i, e) in batch.iter().enumerate() {
            let positions = starts[i]..starts[i] + e.tokens.len();
            slots.extend(cache.slots(&tables[i], positions.clone())?);
            ids.extend_from_slice(e.tokens);
            meta.extend(positions.map(|pos| (i, pos)));
        }
        let n_tok = ids.len();
        let queries: Vec<QueryMeta<'_>> = meta
            .iter()
            .map(|&(i, pos)| QueryMeta {
                blocks: &tables[i],
                pos,
            })
            .collect();
        // Angles of every token's position, `[tokens, head_dim / 2]` per kind of layer. On a
        // device other than the CPU they also go there as `[tokens, 1, head_dim / 2]` tensors:
        // candle's rotary kernels then treat each token as its own batch entry, so the
        // particles' different positions need no padding.
        let half = hd / 2;
        let max_pos = meta.iter().map(|m| m.1).max().unwrap_or(0);
        let on_host = dev.is_cpu();
        let angles = self
            .ropes
            .iter()
            .map(|r| {
                let (cos, sin) = r.tables(meta.iter().map(|m| m.1), max_pos);
                let tables = if on_host {
                    None
                } else {
                    Some((
                        Tensor::from_slice(&cos, (n_tok, 1, half), dev)?,
                        Tensor::from_slice(&sin, (n_tok, 1, half), dev)?,
                    ))
                };
                Ok(Angles { cos, sin, tables })
            })
            .collect::<LmResult<Vec<_>>>()?;
        let mut x = self.embed_tokens(&Tensor::from_vec(ids, n_tok, dev)?)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let angles = &angles[layer.rope];
            let [q, k, v] = self.qkv(layer, &x, true)?;
            let q = self.rope(&q, nh, angles)?;
            let k = self.rope(&k, nkv, angles)?;
            cache.write(li, &slots, &k, &v)?;
            let a = cache
                .attend(li, &q, &queries, nh, layer.scores)?
                .to_device(dev)?;
            x = self.finish_block(layer, x, &a, true)?;
        }
        let x = match rows {
            LogitRows::All => x,
            LogitRows::Last => {
                let mut last = Vec::with_capacity(batch.len());
                let mut off = 0u32;
                for e in batch {
                    off += e.tokens.len() as u32;
                    last.push(off - 1);
                }
                let n = last.len();
                x.index_select(&Tensor::from_vec(last, n, dev)?, 0)?
            }
        };
        self.logits(&x)
    }

    /// Rotate the heads of `t` (`[tokens, heads * head_dim]`) by each token's angles: on the
    /// CPU in place on the host (a few multiply-adds per value; candle's rotary kernel costs
    /// more in task overhead at one token per batch entry), elsewhere with candle's rotary
    /// kernels.
    fn rope(&self, t: &Tensor, heads: usize, angles: &Angles) -> LmResult<Tensor> {
        let (n, width) = t.dims2()?;
        let hd = self.config.head_dim;
        if let Some((cos, sin)) = &angles.tables {
            let x = t.contiguous()?.reshape((n, heads, 1, hd))?;
            let y = match self.config.rope_style {
                RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&x, cos, sin)?,
                RopeStyle::Half => candle_nn::rotary_emb::rope(&x, cos, sin)?,
            };
            return Ok(y.reshape((n, width))?);
        }
        let mut v = t.flatten_all()?.to_vec1::<f32>()?;
        let half = hd / 2;
        for (i, row) in v.chunks_exact_mut(width).enumerate() {
            let (c, s) = (
                &angles.cos[i * half..(i + 1) * half],
                &angles.sin[i * half..(i + 1) * half],
            );
            for head in row.chunks_exact_mut(hd) {
                match self.config.rope_style {
                    RopeStyle::Interleaved => {
                        for (j, pair) in head.chunks_exact_mut(2).enumerate() {
                            let (x0, x1) = (pair[0], pair[1]);
                            pair[0] = x0 * c[j] - x1 * s[j];
                            pair[1] = x0 * s[j] + x1 * c[j];
                        }
                    }
                    RopeStyle::Half => {
                        let (a, b) = head.split_at_mut(half);
                        for j in 0..half {
                            let (x0, x1) = (a[j], b[j]);
                            a[j] = x0 * c[j] - x1 * s[j];
                            b[j] = x0 * s[j] + x1 * c[j];
                        }
                    }
                }
            }
        }
        Ok(Tensor::from_vec(v, (n, width), t.device())?)
    }

    /// Embedding rows of `ids` (Gemma: times `sqrt(hidden_size)`, rounded to f32 first as
    /// transformers does).
    pub(super) fn embed_tokens(&self, ids: &Tensor) -> LmResult<Tensor> {
        let x = self.embed.lookup(ids, self.device())?;
        if self.arch.scale_embeddings {
            let s = (self.config.hidden_size as f32).sqrt();
            return Ok((x * f64::from(s))?);
        }
        Ok(x)
    }

    /// Queries, keys and values of one block (`[tokens, heads * head_dim]` each, before
    /// RoPE): input norm, projections (one fused product when `fused`), biases and per-head
    /// query/key norms.
    pub(super) fn qkv(&self, layer: &Layer, x: &Tensor, fused: bool) -> LmResult<[Tensor; 3]> {
        let c = &self.config;
        let eps = c.rms_eps as f32;
        let h = candle_nn::ops::rms_norm(x, &layer.attn_norm, eps)?;
        let out = if fused {
            layer.qkv.forward(&h)?
        } else {
            layer
                .qkv
                .parts()?
                .iter()
                .map(|l| l.forward(&h))
                .collect::<candle_core::Result<Vec<_>>>()?
        };
        let [mut q, mut k, mut v]: [Tensor; 3] = out
            .try_into()
            .map_err(|_| LmError::Format("query/key/value projection".into()))?;
        if let Some([bq, bk, bv]) = &layer.qkv_bias {
            q = q.broadcast_add(bq)?;
            k = k.broadcast_add(bk)?;
            v = v.broadcast_add(bv)?;
        }
        if let Some([nq, nk]) = &layer.qk_norm {
            // RMSNorm over each head's `head_dim` values.
            let per_head = |t: &Tensor, w: &Tensor| -> LmResult<Tensor> {
                let (n, width) = t.dims2()?;
                let hd = c.head_dim;
                let flat = t.contiguous()?.reshape((n * width / hd, hd))?;
                Ok(candle_nn::ops::rms_norm(&flat, w, eps)?.reshape((n, width))?)
            };
            q = per_head(&q, nq)?;
            k = per_head(&k, nk)?;
        }
        Ok([q, k, v])
    }

    /// The rest of a block after attention: output projection, (Gemma) post-attention norm,
    /// residual; pre-feed-forward norm, gated feed-forward layer, (Gemma) post-feed-forward
    /// norm, residual.
    pub(super) fn finish_block(
        &self,
        layer: &Layer,
        x: Tensor,
        a: &Tensor,
        fused: bool,
    ) -> LmResult<Tensor> {
        let eps = self.config.rms_eps as f32;
        let mut o = layer.wo.forward(a)?;
        if let Some(w) = &layer.post_attn_norm {
            o = candle_nn::ops::rms_norm(&o, w, eps)?;
        }
        let x = (x + o)?;
        let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, eps)?;
        let gu = if fused {
            layer.gate_up.forward(&h)?
        } else {
            layer
                .gate_up
                .parts()?
                .iter()
                .map(|l| l.forward(&h))
                .collect::<candle_core::Result<Vec<_>>>()?
        };
        let (Some(g), Some(u)) = (gu.first(), gu.get(1)) else {
            return Err(LmError::Format("gate/up projection".into()));
        };
        let mut m = layer.w_down.forward(&gated(self.arch.activation, g, u)?)?;
        if let Some(w) = &layer.post_ffw_norm {
            m = candle_nn::ops::rms_norm(&m, w, eps)?;
        }
        Ok((x + m)?)
    }

    /// Final norm, output layer and (Gemma 2) final soft-cap.
    pub(super) fn logits(&self, x: &Tensor) -> LmResult<Tensor> {
        let x = candle_nn::ops::rms_norm(x, &self.norm, self.config.rms_eps as f32)?;
        let logits = self.lm_head.forward(&x)?.to_dtype(DType::F32)?;
        Ok(match self.arch.final_softcap {
            Some(cap) => ((logits / cap)?.tanh()? * cap)?,
            None => logits,
        })
    }
}

/// RoPE angles of the tokens of one forward call for one kind of layer.
struct Angles {
    /// `cos` of every token's angles, `[tokens, head_dim / 2]` row-major.
    cos: Vec<f32>,
    /// `sin`, likewise.
    sin: Vec<f32>,
    /// The same as `[tokens, 1, head_dim / 2]` tensors on the model's device, when it is not
    /// the CPU.
    tables: Option<(Tensor, Tensor)>,
}
