//! Every weight format agrees with f32 on SmolLM2: the KL divergence of its next-token
//! distributions from f32's, over the positions of a real sentence.
//!
//! Tolerances. Per matrix product the block formats are exact up to rounding bounded by the
//! format (unit test `lm::quant::tests`: half a quantization step per weight, `d/2` with
//! `d = max|w|/127` for Q8_0 and `(max − min)/15` for 4-bit blocks, and `max|x|/254` per
//! activation). Through 30 layers these bounds are not useful end to end, so the model-level
//! tolerance is the distribution-level goal: mean KL ≤ 0.01 nats per token for the 8-bit
//! format (issue 13's goal), and for `native` (here the file's own Q4_1 blocks, which the
//! f32 reference dequantizes: only the int8 activations differ); 4-bit requantization of
//! those weights rounds them a second time, 16 levels per block: mean KL ≤ 0.1 nats. The
//! figures measured are printed (and in docs/benchmarks.md).

#![cfg(feature = "lm")]

use smc_steer::lm::{LlamaModel, LoadOptions, LogitRows, SeqTokens, Tokenizer, WeightFormat};

use crate::common::real_model;

const TEXT: &str = "The history of the Federal Reserve begins in 1913, when Congress passed \
the Federal Reserve Act after a series of financial panics. The new central bank was designed \
to provide an elastic currency, to supervise banks, and to serve as a lender of last resort.";

fn log_probs(model: &LlamaModel, tokens: &[u32]) -> Vec<Vec<f64>> {
    let mut cache = model.new_cache(16, tokens.len() + 16).unwrap();
    let seq = cache.create();
    let logits = model
        .forward(&[SeqTokens { seq, tokens }], &mut cache, LogitRows::All)
        .unwrap();
    logits
        .to_vec2::<f32>()
        .unwrap()
        .into_iter()
        .map(|r| {
            let max = r.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
            let lse = max + r.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
            r.iter().map(|&v| v as f64 - lse).collect()
        })
        .collect()
}

#[test]
fn every_weight_format_agrees_with_f32() {
    let Some(path) = real_model() else { return };
    let gguf = smc_steer::lm::GgufFile::open(&path).unwrap();
    let tokens = Tokenizer::from_gguf(&gguf).unwrap().encode(TEXT).unwrap();
    assert!(tokens.len() > 40);
    let load = |weights| {
        let opts = LoadOptions {
            weights,
            ..LoadOptions::default()
        };
        LlamaModel::from_gguf(&path, &opts).unwrap()
    };
    let f32_model = load(WeightFormat::F32);
    let reference = log_probs(&f32_model, &tokens);
    let f32_bytes = f32_model.weight_bytes();
    drop(f32_model);
    for (format, tolerance) in [
        (WeightFormat::Q8_0, 0.01),
        (WeightFormat::Native, 0.01),
        (WeightFormat::Q4_0, 0.1),
        (WeightFormat::Q4_1, 0.1),
    ] {
        let model = load(format);
        assert!(
            model.weight_bytes() * 2 < f32_bytes,
            "{}: {} bytes vs f32 {f32_bytes}",
            format.name(),
            model.weight_bytes()
        );
        let got = log_probs(&model, &tokens);
        let kls: Vec<f64> = reference
            .iter()
            .zip(&got)
            .map(|(p, q)| p.iter().zip(q).map(|(&a, &b)| a.exp() * (a - b)).sum())
            .collect();
        let mean = kls.iter().sum::<f64>() / kls.len() as f64;
        let max = kls.iter().copied().fold(0.0, f64::max);
        eprintln!(
            "{:>7}: mean KL {mean:.5} nats, max {max:.4}, {} MB of weights",
            format.name(),
            model.weight_bytes() / 1_000_000
        );
        assert!(
            mean.is_finite() && mean <= tolerance,
            "{}: mean KL {mean}",
            format.name()
        );
    }
}
