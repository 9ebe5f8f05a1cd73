//! Weight formats side by side: load time, weight memory, decode step, SMC step and model
//! GFLOP/s per batch size, the accuracy of each format as the KL divergence of its
//! next-token distributions from f32's over 1,000 positions of real text (the bench passage
//! followed by the README, no repetition), LLaMPPL's example task end to end
//! (`llamppl_task_s`), and llama.cpp's decode step on the same file in the same format when
//! a build is given (`llamacpp_decode_step_ms`, `SMC_BENCH_LLAMA_CPP`; see `llamacpp.rs`).
//!
//! `SMC_BENCH_ONLY=formats cargo run --release --example bench -- --json [--formats f32,q8_0]`

use std::time::Instant;

use std::sync::Arc;

use smc_steer::constraints::MaxWordLetters;
use smc_steer::lm::{
    LlamaConfig, LlamaModel, LoadOptions, LogitRows, SeqTokens, TransformerKernel, WeightFormat,
};
use smc_steer::logspace::log_sum_exp;
use smc_steer::potential::DynPotential;
use smc_steer::{FeynmanKac, ProposalKind, Smc, SmcConfig, TokenId};

use super::{decode_ours, llamacpp, median, smc_steps, Args, Report};

/// Positions of real text scored for the KL divergence.
const KL_POSITIONS: usize = 1000;
/// Tokens per forward call while scoring them.
const KL_CHUNK: usize = 250;

/// Multiply-adds of the matrix products of one token (projections, MLP, output layer).
fn matmul_params(c: &LlamaConfig) -> f64 {
    let (h, q, kv, i) = (
        c.hidden_size as f64,
        (c.n_heads * c.head_dim) as f64,
        (c.n_kv_heads * c.head_dim) as f64,
        c.intermediate_size as f64,
    );
    c.n_layers as f64 * (h * (q + 2.0 * kv) + q * h + 3.0 * h * i) + c.vocab_size as f64 * h
}

/// Next-token log-probabilities (f64) of every position of `tokens`.
fn log_probs(model: &LlamaModel, tokens: &[TokenId]) -> Result<Vec<Vec<f64>>, String> {
    let e = |e: smc_steer::lm::LmError| e.to_string();
    let mut cache = model.new_cache(16, tokens.len() + 16).map_err(e)?;
    let seq = cache.create();
    let mut rows = Vec::with_capacity(tokens.len());
    for chunk in tokens.chunks(KL_CHUNK) {
        let logits = model
            .forward(
                &[SeqTokens { seq, tokens: chunk }],
                &mut cache,
                LogitRows::All,
            )
            .map_err(e)?;
        for r in logits.to_vec2::<f32>().map_err(|e| e.to_string())? {
            let r: Vec<f64> = r.iter().map(|&v| f64::from(v)).collect();
            let lse = log_sum_exp(&r);
            rows.push(r.iter().map(|&v| v - lse).collect());
        }
    }
    Ok(rows)
}

/// KL(p ‖ q) of two log-probability rows.
fn kl(p: &[f64], q: &[f64]) -> f64 {
    p.iter()
        .zip(q)
        .filter(|(a, _)| a.is_finite())
        .map(|(&a, &b)| a.exp() * (a - b))
        .sum()
}

pub fn run(report: &mut Report, args: &Args, text: &[TokenId]) -> Result<(), String> {
    let path = super::model_path::resolve(args.model.as_deref());
    let text = &text[..KL_POSITIONS.min(text.len())];
    let mut reference: Option<Vec<Vec<f64>>> = None;
    let formats = args.formats.clone().unwrap_or(vec![
        WeightFormat::F32,
        WeightFormat::Q8_0,
        WeightFormat::Q4_0,
        WeightFormat::Q4_1,
        WeightFormat::Native,
    ]);
    for &format in &formats {
        let imp = format!("smc-steer-{}", format.name());
        let t0 = Instant::now();
        let opts = LoadOptions {
            weights: format,
            ..LoadOptions::default()
        };
        let model = LlamaModel::from_gguf(&path, &opts).map_err(|e| e.to_string())?;
        report.emit("load_s", &imp, 1, t0.elapsed().as_secs_f64(), "s");
        report.emit(
            "weight_bytes",
            &imp,
            1,
            model.weight_bytes() as f64,
            "bytes",
        );
        let flops = 2.0 * matmul_params(model.config());
        let lp = log_probs(&model, text)?;
        match &reference {
            None if format == WeightFormat::F32 => reference = Some(lp),
            None => {}
            Some(r) => {
                let kls: Vec<f64> = r.iter().zip(&lp).map(|(p, q)| kl(p, q)).collect();
                let mean = kls.iter().sum::<f64>() / kls.len() as f64;
                let max = kls.iter().copied().fold(0.0, f64::max);
                report.emit("kl_mean", &imp, kls.len(), mean, "nats");
                report.emit("kl_max", &imp, kls.len(), max, "nats");
            }
        }
        drop(model);
        let max_n = *args.ns.iter().max().unwrap_or(&1);
        let mut kernel = super::load_with(args, max_n, args.steps + 4, format)?;
        let prompt = &text[..args.prompt_tokens];
        for &n in &args.ns {
            let (times, _) = decode_ours(&mut kernel, prompt, n, args.steps)?;
            let step = median(times);
            report.emit("decode_step_ms", &imp, n, step, "ms");
            report.emit(
                "gflops",
                &imp,
                n,
                flops * n as f64 / (step / 1e3) / 1e9,
                "GFLOP/s",
            );
            let times = smc_steps(&mut kernel, prompt, n, args.steps)?;
            report.emit("smc_step_ms", &imp, n, median(times), "ms");
        }
        let task = llamppl_task(&mut kernel)?;
        report.emit("llamppl_task_s", &imp, LLAMPPL_PARTICLES, task, "s");
        let (peer, here) = llamppl_peer_s()?;
        report.emit(
            if here {
                "llamppl_speedup"
            } else {
                "llamppl_speedup_cross_machine"
            },
            &imp,
            LLAMPPL_PARTICLES,
            peer / task,
            "ratio",
        );
        drop(kernel);
        let Some(bin) = llamacpp::find() else {
            continue;
        };
        let threads = rayon::current_num_threads();
        let Some(rows) = llamacpp::decode_step_ms(
            &bin,
            &path,
            format,
            args.prompt_tokens,
            args.steps,
            &args.ns,
            threads,
        )?
        else {
            continue;
        };
        let peer = format!("llama.cpp-{}", format.name());
        for (n, ms) in rows {
            report.emit("llamacpp_decode_step_ms", &peer, n, ms, "ms");
            for metric in ["decode_step_ms", "smc_step_ms"] {
                if let Some(ours) = report.get(metric, &imp, n) {
                    let name = format!("{}_vs_llamacpp", metric.trim_end_matches("_ms"));
                    report.emit(&name, &imp, n, ours / ms, "ratio");
                }
            }
        }
    }
    if llamacpp::find().is_none() {
        eprintln!(
            "llama.cpp: {} is not set to a directory with llama-batched-bench and \
             llama-quantize (scripts/build-llama-cpp.sh); its figures are skipped",
            llamacpp::ENV
        );
    }
    Ok(())
}

/// Particles and tokens of the LLaMPPL comparison task.
const LLAMPPL_PARTICLES: usize = 32;
const LLAMPPL_TOKENS: usize = 30;
/// LLaMPPL 0.2.3's wall time on that task (HF transformers, f32, 2 torch threads, 2-core
/// AVX-512 EPYC; `shared/REFERENCES.md`), used when [`LLAMPPL_ENV`] is not set: the ratio
/// is then across machines, see docs/benchmarks.md.
const LLAMPPL_PEER_S: f64 = 28.7;
/// LLaMPPL's time on this machine (seconds, from `scripts/llamppl-task.py`): the ratio is
/// then read on one machine.
const LLAMPPL_ENV: &str = "SMC_BENCH_LLAMPPL_S";

/// LLaMPPL's seconds for the task, and whether they were measured on this machine.
fn llamppl_peer_s() -> Result<(f64, bool), String> {
    match std::env::var(LLAMPPL_ENV) {
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(s) if s.is_finite() && s > 0.0 => Ok((s, true)),
            _ => Err(format!(
                "{LLAMPPL_ENV}: `{v}` is not a positive number of seconds"
            )),
        },
        Err(_) => Ok((LLAMPPL_PEER_S, false)),
    }
}
/// Seed of the task's run.
const LLAMPPL_SEED: u64 = 7;

/// LLaMPPL's example task as `smc-steer run --prompt "The Fed says" --max-word-letters 5
/// -n 32 --max-tokens 30` runs it (the constraint's mask as the proposal): wall seconds
/// from the prompt to the weighted posterior.
fn llamppl_task(kernel: &mut TransformerKernel) -> Result<f64, String> {
    let e = |e: smc_steer::SmcError| e.to_string();
    let prompt = kernel.encode("The Fed says").map_err(|e| e.to_string())?;
    let constraint: Arc<dyn DynPotential> = Arc::new(MaxWordLetters::new(5));
    let program =
        FeynmanKac::from_arc(constraint.clone()).with_proposal(ProposalKind::Mask(constraint));
    let config = SmcConfig {
        particles: LLAMPPL_PARTICLES,
        max_tokens: LLAMPPL_TOKENS,
        seed: LLAMPPL_SEED,
        ..SmcConfig::default()
    };
    kernel
        .set_request(LLAMPPL_PARTICLES, LLAMPPL_TOKENS)
        .map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    Smc::new(kernel, program, &prompt, config)
        .map_err(e)?
        .run()
        .map_err(e)?;
    Ok(t0.elapsed().as_secs_f64())
}
