//! A reference forward pass without any cache, written with plain candle operations, against
//! which the cached, batched pass is tested.

use candle_core::{Device, Tensor};

use super::LlamaModel;
use crate::lm::config::RopeStyle;
use crate::lm::error::{LmError, LmResult};

impl LlamaModel {
    /// Reference forward pass without any cache: logits `[tokens.len(), vocab]` for one
    /// sequence starting at position 0, computed with plain candle tensor operations
    /// (masked softmax attention, candle's rotary kernels). Quadratic in the length; meant for
    /// tests.
    ///
    /// # Errors
    /// [`LmError::EmptyPrompt`], [`LmError::TokenOutOfRange`], [`LmError::ContextOverflow`],
    /// [`LmError::Candle`].
    pub fn forward_full(&self, tokens: &[u32]) -> LmResult<Tensor> {
        let c = &self.config;
        if tokens.is_empty() {
            return Err(LmError::EmptyPrompt);
        }
        self.check_tokens(tokens)?;
        let n = tokens.len();
        if n > c.max_seq_len {
            return Err(LmError::ContextOverflow {
                len: n,
                max: c.max_seq_len,
            });
        }
        let (nh, nkv, hd) = (c.n_heads, c.n_kv_heads, c.head_dim);
        let half = hd / 2;
        let dev = Device::Cpu;
        let ropes = self
            .ropes
            .iter()
            .map(|r| {
                let (cos, sin) = r.tables(0..n, n - 1);
                Ok((
                    Tensor::from_vec(cos, (n, half), &dev)?,
                    Tensor::from_vec(sin, (n, half), &dev)?,
                ))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let rope = |t: &Tensor, r: usize| {
            let (cos, sin) = &ropes[r];
            match c.rope_style {
                RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(t, cos, sin),
                RopeStyle::Half => candle_nn::rotary_emb::rope(t, cos, sin),
            }
        };
        // Causal mask, restricted to the last `window` keys when the layer slides.
        let mask = |window: Option<usize>| {
            let w = window.unwrap_or(usize::MAX);
            let m: Vec<f32> = (0..n * n)
                .map(|i| {
                    let (q, k) = (i / n, i % n);
                    if k > q || q - k >= w {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
                .collect();
            Tensor::from_vec(m, (1, n, n), &dev)
        };
        // Key/value head of each query head (the reference materialises repeated heads).
        let kv_index: Vec<u32> = (0..nh).map(|h| (h / (nh / nkv)) as u32).collect();
        let kv_index = Tensor::from_vec(kv_index, nh, &dev)?;
        let ids = Tensor::from_slice(tokens, n, &dev)?;
        let mut x = self.embed_tokens(&ids)?;
        for layer in &self.layers {
            let heads = |t: Tensor, k: usize| -> candle_core::Result<Tensor> {
                t.reshape((1, n, k, hd))?.transpose(1, 2)?.contiguous()
            };
            let [q, k, v] = self.qkv(layer, &x, false)?;
            let q = rope(&heads(q, nh)?, layer.rope)?;
            let k = rope(&heads(k, nkv)?, layer.rope)?;
            let v = heads(v, nkv)?;
            let k = k.squeeze(0)?.index_select(&kv_index, 0)?;
            let v = v.squeeze(0)?.index_select(&kv_index, 0)?;
            let q = q.squeeze(0)?;
            let sc = layer.scores;
            let mut scores = (q.matmul(&k.t()?)? * f64::from(sc.scale))?;
            if let Some(cap) = sc.softcap {
                scores = ((scores / f64::from(cap))?.tanh()? * f64::from(cap))?;
            }
            let p = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask(sc.window)?)?)?;
            let a = p.matmul(&v)?.transpose(0, 1)?.reshape((n, nh * hd))?;
            x = self.finish_block(layer, x, &a, false)?;
        }
        Ok(self.logits(&x)?.contiguous()?)
    }
}
