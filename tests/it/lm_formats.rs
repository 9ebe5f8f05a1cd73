//! Every weight format agrees with f32 on SmolLM2.
//!
//! Two questions, two tolerances:
//!
//! * **Are the int8 products right?** A model in a block format against the same model with
//!   its matrices dequantized to f32 (`LlamaModel::to_dense`: the same weights, f32
//!   products). The only difference is the int8 quantization of the activations (per block of
//!   32, step `max|x|/127`, error at most half a step): the unit tests in `lm::quant` bound
//!   each product by it; end to end, over 30 layers, the tolerance is a mean KL of 0.01 nats
//!   per token (issue 13's goal for Q8_0, where activations are the only other rounding).
//! * **What does the format lose?** Against the f32 model of the file: `q8_0` requantizes
//!   the file's weights to 256 levels per block and must stay within the same 0.01 nats;
//!   `native` keeps the file's own blocks, so it is the first question again. 4-bit
//!   requantization of the file's 4-bit weights rounds them a second time; that loss is a
//!   property of the format, reported (printed, and in docs/benchmarks.md), and checked only
//!   to be finite and below 2 nats.

#![cfg(feature = "lm")]

use smc_steer::lm::{LlamaModel, LoadOptions, LogitRows, SeqTokens, Tokenizer, WeightFormat};
use smc_steer::logspace::log_sum_exp;

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
            let r: Vec<f64> = r.iter().map(|&v| f64::from(v)).collect();
            let lse = log_sum_exp(&r);
            r.iter().map(|&v| v - lse).collect()
        })
        .collect()
}

/// The real model's f32 run on the test text: what every format is compared with.
struct F32Run {
    path: std::path::PathBuf,
    tokens: Vec<u32>,
    log_probs: Vec<Vec<f64>>,
    weight_bytes: usize,
}

impl F32Run {
    /// `None` (skipped, with a message) when the model is absent outside CI.
    fn new() -> Option<Self> {
        let path = real_model()?;
        let gguf = smc_steer::lm::GgufFile::open(&path).unwrap();
        let tokens = Tokenizer::from_gguf(&gguf).unwrap().encode(TEXT).unwrap();
        assert!(tokens.len() > 40);
        let model = load(&path, WeightFormat::F32);
        Some(Self {
            log_probs: log_probs(&model, &tokens),
            weight_bytes: model.weight_bytes(),
            path,
            tokens,
        })
    }
}

fn load(path: &std::path::Path, weights: WeightFormat) -> LlamaModel {
    let opts = LoadOptions {
        weights,
        ..LoadOptions::default()
    };
    LlamaModel::from_gguf(path, &opts).unwrap()
}

/// Mean and max over positions of KL(p ‖ q).
fn mean_kl(p: &[Vec<f64>], q: &[Vec<f64>]) -> (f64, f64) {
    let kls: Vec<f64> = p
        .iter()
        .zip(q)
        .map(|(p, q)| p.iter().zip(q).map(|(&a, &b)| a.exp() * (a - b)).sum())
        .collect();
    let max = kls.iter().copied().fold(0.0, f64::max);
    (kls.iter().sum::<f64>() / kls.len() as f64, max)
}

#[test]
fn every_weight_format_agrees_with_f32() {
    let Some(f32_run) = F32Run::new() else { return };
    for (format, loss_tolerance) in [
        (WeightFormat::Q8_0, 0.01),
        (WeightFormat::Native, 0.01),
        (WeightFormat::Q4_0, 2.0),
        (WeightFormat::Q4_1, 2.0),
    ] {
        let model = load(&f32_run.path, format);
        let f32_bytes = f32_run.weight_bytes;
        assert!(
            model.weight_bytes() * 2 < f32_bytes,
            "{}: {} bytes vs f32 {f32_bytes}",
            format.name(),
            model.weight_bytes()
        );
        let got = log_probs(&model, &f32_run.tokens);
        let bytes = model.weight_bytes();
        let same_weights = log_probs(&model.to_dense().unwrap(), &f32_run.tokens);
        let (kernel_kl, kernel_max) = mean_kl(&same_weights, &got);
        let (loss, loss_max) = mean_kl(&f32_run.log_probs, &got);
        eprintln!(
            "{:>7}: int8 products vs f32 products of the same weights: mean KL {kernel_kl:.5} \
             (max {kernel_max:.4}); vs the file's f32 model: mean KL {loss:.5} (max \
             {loss_max:.4}); {} MB of weights",
            format.name(),
            bytes / 1_000_000
        );
        assert!(
            kernel_kl.is_finite() && kernel_kl <= 0.01,
            "{}: int8 products differ from f32 products by mean KL {kernel_kl}",
            format.name()
        );
        assert!(
            loss.is_finite() && loss <= loss_tolerance,
            "{}: mean KL to f32 {loss}",
            format.name()
        );
    }
}

/// bf16 weights: the products are the f32 products of the rounded weights (the model
/// against itself widened to f32 by `to_dense`: only the summation order differs, so the
/// tolerance is float noise, a mean KL of 1e-6 nats); the format's loss against the file's
/// f32 model comes from rounding each weight to 8 significant bits (relative error ≤ 2⁻⁹,
/// finer than `q8_0`'s step of max|w|/127 per block), held to `q8_0`'s 0.01 nats; the weights
/// take half of f32's memory.
#[test]
fn bf16_weights_agree_with_f32() {
    let Some(f32_run) = F32Run::new() else { return };
    let f32_bytes = f32_run.weight_bytes;
    let model = load(&f32_run.path, WeightFormat::Bf16);
    // Half, but for the norm vectors (kept in f32).
    assert!(
        100 * model.weight_bytes() <= 51 * f32_bytes,
        "bf16: {} bytes vs f32 {f32_bytes}",
        model.weight_bytes()
    );
    let got = log_probs(&model, &f32_run.tokens);
    let widened = log_probs(&model.to_dense().unwrap(), &f32_run.tokens);
    let (products, loss) = (
        mean_kl(&widened, &got).0,
        mean_kl(&f32_run.log_probs, &got).0,
    );
    eprintln!("bf16: vs f32 products of the same weights: mean KL {products:.2e}; vs the file's f32 model: mean KL {loss:.5}");
    assert!(products.abs() <= 1e-6, "bf16 products: mean KL {products}");
    assert!(
        loss.is_finite() && loss <= 0.01,
        "bf16: mean KL to f32 {loss}"
    );
}
