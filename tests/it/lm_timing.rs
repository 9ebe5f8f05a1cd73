//! Hand-run timing check (not a timed test; it asserts nothing about speed):
//!
//! ```text
//! cargo test --release --test it lm_timing -- --ignored --nocapture
//! ```
//!
//! Decode step time at batch 1/8/32/64 after a 64-token prompt, for our model (f32 weights,
//! paged cache, prompt shared) and for candle-transformers' stock `quantized_llama` with every
//! weight dequantized to f32 (`CANDLE_DEQUANTIZE_ALL=1`). Medians over 8 steps.
#![cfg(feature = "lm")]

use std::time::Instant;

use candle_core::{Device, Tensor};
use smc_steer::lm::{
    KernelOptions, LlamaModel, LoadOptions, LogitRows, SeqTokens, TransformerKernel,
};
use smc_steer::{Extend, Kernel};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[test]
#[ignore = "timing, run by hand"]
fn decode_step_timing() {
    let Some(path) = crate::common::real_model() else {
        return;
    };
    let sizes: Vec<usize> = std::env::var("SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 8, 32, 64]);
    let steps = 8;
    let prompt: Vec<u32> = (0..64).map(|i| 1000 + 17 * i).collect();

    let opts = KernelOptions {
        particles: 64,
        max_new_tokens: 64,
        ..Default::default()
    };
    let t = Instant::now();
    let mut k = TransformerKernel::load(&path, opts).unwrap();
    eprintln!("load: {:.2} s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let (root, _) = k.start(&prompt).unwrap();
    let pre = t.elapsed().as_secs_f64();
    eprintln!(
        "smc-steer prefill 64 tokens: {:.1} ms ({:.0} tok/s)",
        pre * 1e3,
        64.0 / pre
    );
    for &n in &sizes {
        let seqs: Vec<_> = (0..n).map(|_| k.fork(root).unwrap()).collect();
        let mut times = Vec::new();
        for step in 0..steps + 1 {
            let toks: Vec<[u32; 1]> = (0..n).map(|i| [(500 + 31 * i + 7 * step) as u32]).collect();
            let batch: Vec<Extend<'_>> = seqs
                .iter()
                .zip(&toks)
                .map(|(&s, t)| Extend { seq: s, tokens: t })
                .collect();
            let t = Instant::now();
            k.extend(&batch).unwrap();
            if step > 0 {
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        let m = median(times);
        eprintln!(
            "TIMING impl=smc-steer n={n} decode_step_ms={m:.1} tok/s={:.1}",
            n as f64 / m * 1e3
        );
        for s in seqs {
            k.release(s);
        }
    }
    drop(k);

    // Breakdown: the model's forward pass alone (no log-softmax), and the pass without the
    // output layer's cost (rows = Last on a single sequence is not comparable, so time the
    // full [n, vocab] logits and the conversion separately).
    let model = LlamaModel::from_gguf(&path, &LoadOptions::default()).unwrap();
    let mut cache = model.new_cache(16, 64 * 80 + 128).unwrap();
    let root = cache.create();
    model
        .forward(
            &[SeqTokens {
                seq: root,
                tokens: &prompt,
            }],
            &mut cache,
            LogitRows::Last,
        )
        .unwrap();
    for &n in &sizes {
        let seqs: Vec<_> = (0..n).map(|_| cache.fork(root).unwrap()).collect();
        let (mut fwd, mut conv) = (Vec::new(), Vec::new());
        for step in 0..steps + 1 {
            let toks: Vec<[u32; 1]> = (0..n).map(|i| [(500 + 31 * i + 7 * step) as u32]).collect();
            let batch: Vec<SeqTokens<'_>> = seqs
                .iter()
                .zip(&toks)
                .map(|(&s, t)| SeqTokens { seq: s, tokens: t })
                .collect();
            let t = Instant::now();
            let l = model.forward(&batch, &mut cache, LogitRows::All).unwrap();
            let t1 = t.elapsed().as_secs_f64() * 1e3;
            let _rows = l.to_vec2::<f32>().unwrap();
            let t2 = t.elapsed().as_secs_f64() * 1e3;
            if step > 0 {
                fwd.push(t1);
                conv.push(t2 - t1);
            }
        }
        eprintln!(
            "BREAKDOWN n={n} forward_ms={:.1} to_vec_ms={:.1}",
            median(fwd),
            median(conv)
        );
        for s in seqs {
            cache.release(s);
        }
    }

    if std::env::var("SKIP_CANDLE").is_ok() {
        return;
    }
    // candle-transformers stock model, all weights dequantized to f32, on a fresh thread
    // (candle reads the variable once per thread).
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    std::thread::spawn(move || {
        let mut file = std::fs::File::open(&path).unwrap();
        let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
        let mut m = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
            content,
            &mut file,
            &Device::Cpu,
        )
        .unwrap();
        for &n in &sizes {
            m.clear_kv_cache();
            let rows: Vec<u32> = (0..n).flat_map(|_| prompt.iter().copied()).collect();
            let x = Tensor::from_vec(rows, (n, 64), &Device::Cpu).unwrap();
            m.forward(&x, 0).unwrap();
            let mut times = Vec::new();
            for step in 0..steps + 1 {
                let toks: Vec<u32> = (0..n).map(|i| (500 + 31 * i + 7 * step) as u32).collect();
                let x = Tensor::from_vec(toks, (n, 1), &Device::Cpu).unwrap();
                let t = Instant::now();
                let l = m.forward(&x, 64 + step).unwrap();
                let _ = l.to_vec2::<f32>().unwrap();
                if step > 0 {
                    times.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            let med = median(times);
            eprintln!(
                "TIMING impl=candle n={n} decode_step_ms={med:.1} tok/s={:.1}",
                n as f64 / med * 1e3
            );
        }
    })
    .join()
    .unwrap();
}
