//! Benchmarks on SmolLM2-135M-Instruct: decode steps, SMC steps, prefill, KV-cache bytes,
//! against candle-transformers' stock `quantized_llama` measured in the same run.
//!
//! ```text
//! scripts/fetch-model.sh && cargo run --release --example bench -- [--json] [--ns 1,8,32,64]
//!     [--steps 8] [--prompt-tokens 64] [--model PATH] [--skip-candle]
//!     [--device cpu|cuda[:N]] [--attention cpu|gather] [--formats f32,q8_0,...]
//!     [--sizes qwen3-0.6b,llama-3.2-1b]
//! ```
//!
//! `--device` runs the kernel on a GPU (builds with `--features cuda`); every
//! figure then carries the device's name, and the stock-candle baseline (CPU only) is
//! skipped. `--attention gather` measures the device-generic path on the CPU.
//!
//! With `--json` every figure is one JSON object per line with `metric`, `impl`, `n` and
//! `value` (plus `unit`); derived ratios come last. Timings are medians over `--steps` steps.
//! Beside each `decode_step_ms`, `forward_ms` times the model's forward pass alone (the
//! device waited for), and `distribution_share` = 1 − forward / decode is the kernel's work
//! on the next-token distributions (on a GPU: normalising, the copy to the host, widening).
//! `SMC_BENCH_ONLY=cache`, `constraints` or `potentials` runs one group of figures;
//! `SMC_BENCH_ONLY=formats` compares weight formats (`--formats f32,q8_0,...`), with
//! llama.cpp's step in the same run when `SMC_BENCH_LLAMA_CPP` names its build and
//! LLaMPPL's task time on this machine when `SMC_BENCH_LLAMPPL_S` gives it
//! (`scripts/llamppl-task.py`);
//! `SMC_BENCH_ONLY=sizes` runs random-weight models at the real sizes of Qwen3-0.6B and
//! Llama-3.2-1B (`--sizes`, `--formats`; default f32 and q8_0);
//! `SMC_BENCH_ONLY=scale` measures large populations (`--ns 256,512`), the CPU
//! utilisation of SMC steps, the engine's share of each step (`smc_overhead_in_step`)
//! and one draw from a vocabulary-sized distribution against libm's `exp`; `SMC_BENCH_ONLY=decode` stops after the decode, SMC-step and KV-cache figures.

mod cache;
mod constraints;
mod formats;
mod llamacpp;
/// Where the command line looks for a model by default, shared so the bench looks there too.
#[path = "../../src/bin/smc-steer/model_path.rs"]
mod model_path;
mod potentials;
mod scale;
mod sizes;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use smc_steer::lm::{
    cpu_features, cpu_kernels, device_name, parse_device, AttentionPath, KernelOptions, LlamaModel,
    LogitRows, SeqTokens, TransformerKernel, WeightFormat, KERNELS_ENV,
};
use smc_steer::potential::Trivial;
use smc_steer::{Extend, FeynmanKac, Kernel, SeqId, Smc, SmcConfig, TokenId};

const TEXT: &str = "The history of the Federal Reserve begins in 1913, when Congress passed the \
Federal Reserve Act after a series of financial panics. The new central bank was designed to \
provide an elastic currency, to supervise banks, and to serve as a lender of last resort. Over \
the following century its role grew: it now sets interest rates, manages inflation, and works to \
keep employment high. Critics say it has too much power; supporters say it keeps the economy \
stable. Economists still debate how it should respond to shocks, and each meeting of its \
committee is watched closely by markets around the world, from New York to Tokyo and London. \
In this essay we look at three episodes that shaped the institution, and at the lessons they \
hold for the next crisis, whenever it comes, and however it begins.";

struct Args {
    json: bool,
    ns: Vec<usize>,
    steps: usize,
    prompt_tokens: usize,
    model: Option<PathBuf>,
    skip_candle: bool,
    device: String,
    attention: AttentionPath,
    /// `--formats`, when given (each group has its own default).
    formats: Option<Vec<WeightFormat>>,
    /// `--sizes`: the real-size models of `SMC_BENCH_ONLY=sizes` (all when empty).
    sizes: Vec<String>,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        json: false,
        ns: vec![1, 8, 32, 64],
        steps: 8,
        prompt_tokens: 64,
        model: None,
        skip_candle: false,
        device: "cpu".into(),
        attention: AttentionPath::Cpu,
        formats: None,
        sizes: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match flag.as_str() {
            "--json" => a.json = true,
            "--skip-candle" => a.skip_candle = true,
            "--ns" => {
                a.ns = value("--ns")?
                    .split(',')
                    .map(|s| s.trim().parse::<usize>().map_err(|e| format!("--ns: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--steps" => {
                a.steps = value("--steps")?
                    .parse()
                    .map_err(|e| format!("--steps: {e}"))?
            }
            "--prompt-tokens" => {
                a.prompt_tokens = value("--prompt-tokens")?
                    .parse()
                    .map_err(|e| format!("--prompt-tokens: {e}"))?
            }
            "--model" => a.model = Some(PathBuf::from(value("--model")?)),
            "--device" => a.device = value("--device")?,
            "--formats" => {
                a.formats = Some(
                    value("--formats")?
                        .split(',')
                        .map(|s| {
                            WeightFormat::from_name(s.trim())
                                .ok_or(format!("--formats: unknown format `{s}`"))
                        })
                        .collect::<Result<_, _>>()?,
                )
            }
            "--sizes" => {
                a.sizes = value("--sizes")?
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .collect();
                sizes::selected(&a.sizes)?;
            }
            "--attention" => {
                a.attention = match value("--attention")?.as_str() {
                    "cpu" => AttentionPath::Cpu,
                    "gather" => AttentionPath::Gather,
                    other => return Err(format!("--attention: unknown back-end `{other}`")),
                }
            }
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    if a.steps == 0 || a.ns.is_empty() || a.ns.contains(&0) {
        return Err("--steps and every n must be positive".into());
    }
    Ok(a)
}

struct Report {
    json: bool,
    /// Name of the device the kernel runs on, carried by every figure.
    device: String,
    lines: Vec<serde_json::Value>,
}

impl Report {
    fn emit(&mut self, metric: &str, imp: &str, n: usize, value: f64, unit: &str) {
        let line = serde_json::json!({ "metric": metric, "impl": imp, "n": n, "value": value, "unit": unit, "device": self.device });
        if self.json {
            println!("{line}");
        } else {
            println!("{metric:<22} {imp:<10} n={n:<4} {value:>12.3} {unit}");
        }
        self.lines.push(line);
    }

    fn get(&self, metric: &str, imp: &str, n: usize) -> Option<f64> {
        self.lines
            .iter()
            .find(|l| l["metric"] == metric && l["impl"] == imp && l["n"] == n)
            .and_then(|l| l["value"].as_f64())
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let m = xs.len() / 2;
    if xs.len() % 2 == 1 {
        xs[m]
    } else {
        0.5 * (xs[m - 1] + xs[m])
    }
}

/// The most likely ordinary token (a cheap deterministic decode choice).
fn argmax_token(log_probs: &[f64]) -> TokenId {
    let n = log_probs.len() - 1;
    (0..n)
        .max_by(|&a, &b| log_probs[a].total_cmp(&log_probs[b]))
        .unwrap_or(0) as TokenId
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn load(args: &Args, particles: usize, new_tokens: usize) -> Result<TransformerKernel, String> {
    load_with(args, particles, new_tokens, WeightFormat::F32)
}

fn load_with(
    args: &Args,
    particles: usize,
    new_tokens: usize,
    weights: WeightFormat,
) -> Result<TransformerKernel, String> {
    let opts = KernelOptions {
        weights,
        particles,
        max_new_tokens: new_tokens,
        device: parse_device(&args.device).map_err(|e| e.to_string())?,
        attention: args.attention,
        ..KernelOptions::default()
    };
    let path = model_path::resolve(args.model.as_deref());
    TransformerKernel::load(&path, opts).map_err(|e| model_path::explain(&e))
}

/// Plain batched decode through our kernel: `n` sequences forked from one prompt, one token
/// each per step. Returns per-step milliseconds and the cache bytes in use at the end.
fn decode_ours(
    kernel: &mut TransformerKernel,
    prompt: &[TokenId],
    n: usize,
    steps: usize,
) -> Result<(Vec<f64>, usize), String> {
    let e = |e: smc_steer::SmcError| e.to_string();
    let (root, dist) = kernel.start(prompt).map_err(e)?;
    let mut seqs: Vec<SeqId> = vec![root];
    for _ in 1..n {
        seqs.push(kernel.fork(root).map_err(e)?);
    }
    let mut next: Vec<TokenId> = vec![argmax_token(&dist); n];
    let mut times = Vec::new();
    for step in 0..=steps {
        let toks: Vec<[TokenId; 1]> = next.iter().map(|t| [*t]).collect();
        let batch: Vec<Extend<'_>> = seqs
            .iter()
            .zip(&toks)
            .map(|(s, t)| Extend { seq: *s, tokens: t })
            .collect();
        let t0 = Instant::now();
        let out = kernel.extend(&batch).map_err(e)?;
        if step > 0 {
            // The first step is a warm-up.
            times.push(ms(t0));
        }
        next = out
            .iter()
            .map(|x| argmax_token(&x.next_log_probs))
            .collect();
    }
    let bytes = kernel.cache().used_bytes();
    for s in seqs {
        kernel.release(s);
    }
    Ok((times, bytes))
}

/// The model's forward pass alone for the decode of [`decode_ours`] (`n` sequences forked
/// from one prompt, one token each per step), on a cache of its own, the logits left where
/// they were computed and the device waited for (one logit copied back): the decode step
/// less the kernel's work on the distributions (normalising, the copy to the host,
/// widening to f64). Per-step milliseconds.
fn forward_only(
    model: &LlamaModel,
    attention: AttentionPath,
    prompt: &[TokenId],
    n: usize,
    steps: usize,
) -> Result<Vec<f64>, String> {
    let e = |e: smc_steer::lm::LmError| e.to_string();
    let block = 16;
    // The prompt once, then every sequence's own blocks (a copy of the shared last block
    // and its growth).
    let capacity = prompt.len() + n * (steps + 2 + 2 * block);
    let mut cache = model
        .new_cache_with(block, capacity, attention)
        .map_err(e)?;
    let root = cache.create();
    let first = [SeqTokens {
        seq: root,
        tokens: prompt,
    }];
    model
        .forward(&first, &mut cache, LogitRows::Last)
        .map_err(e)?;
    let mut seqs = vec![root];
    for _ in 1..n {
        seqs.push(cache.fork(root).map_err(e)?);
    }
    let mut times = Vec::new();
    for step in 0..=steps {
        let token = [prompt[step % prompt.len()]];
        let batch: Vec<SeqTokens<'_>> = seqs
            .iter()
            .map(|&seq| SeqTokens {
                seq,
                tokens: &token,
            })
            .collect();
        let t0 = Instant::now();
        // On a worker of rayon's pool, as the kernel runs it (see `TransformerKernel::start`).
        let logits =
            rayon::scope(|_| model.forward(&batch, &mut cache, LogitRows::All)).map_err(e)?;
        // Wait for the device: copying one logit back waits for the work before it.
        logits
            .narrow(0, 0, 1)
            .and_then(|t| t.narrow(1, 0, 1))
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| e.to_string())?;
        if step > 0 {
            times.push(ms(t0));
        }
    }
    Ok(times)
}

/// Full SMC steps (forward, sampling, a trivial potential, ESS, resampling when due).
fn smc_steps<K: Kernel>(
    kernel: K,
    prompt: &[TokenId],
    n: usize,
    steps: usize,
) -> Result<Vec<f64>, String> {
    // Particles that draw EOS leave the batch; after a 64-token prompt that is rare in 8 steps.
    let model = FeynmanKac::new(Trivial);
    let config = SmcConfig {
        particles: n,
        max_tokens: steps + 2,
        ..SmcConfig::default()
    };
    let mut smc = Smc::new(kernel, model, prompt, config).map_err(|e| e.to_string())?;
    let mut times = Vec::new();
    for step in 0..=steps {
        let t0 = Instant::now();
        smc.step().map_err(|e| e.to_string())?;
        if step > 0 {
            times.push(ms(t0));
        }
    }
    Ok(times)
}

/// candle-transformers' stock quantized_llama with every weight dequantized to f32.
fn decode_candle(
    path: &std::path::Path,
    prompt: &[TokenId],
    n: usize,
    steps: usize,
) -> Result<Vec<f64>, String> {
    use candle_core::{Device, Tensor};
    use candle_transformers::models::quantized_llama::ModelWeights;
    let e = |e: candle_core::Error| e.to_string();
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).map_err(e)?;
    let mut model = ModelWeights::from_gguf(content, &mut file, &Device::Cpu).map_err(e)?;
    let rows: Vec<u32> = (0..n).flat_map(|_| prompt.iter().copied()).collect();
    let x = Tensor::from_vec(rows, (n, prompt.len()), &Device::Cpu).map_err(e)?;
    let logits = model.forward(&x, 0).map_err(e)?;
    let mut next: Vec<u32> = logits
        .argmax(candle_core::D::Minus1)
        .map_err(e)?
        .to_vec1::<u32>()
        .map_err(e)?;
    let mut times = Vec::new();
    for step in 0..=steps {
        let x = Tensor::from_vec(next.clone(), (n, 1), &Device::Cpu).map_err(e)?;
        let t0 = Instant::now();
        let logits = model.forward(&x, prompt.len() + step).map_err(e)?;
        next = logits
            .argmax(candle_core::D::Minus1)
            .map_err(e)?
            .to_vec1::<u32>()
            .map_err(e)?;
        if step > 0 {
            times.push(ms(t0));
        }
    }
    Ok(times)
}

fn run() -> Result<(), String> {
    let args = parse()?;
    let device = parse_device(&args.device).map_err(|e| e.to_string())?;
    let mut report = Report {
        json: args.json,
        device: device_name(&device),
        lines: Vec::new(),
    };
    // What the CPU kernels use here (stderr: the JSON lines stay on stdout).
    eprintln!(
        "cpu kernels: {} (int8: {}; {} caps them)",
        cpu_features().join(", "),
        cpu_kernels().last().copied().unwrap_or("scalar"),
        KERNELS_ENV
    );
    if cache::only() {
        return cache::run(&mut report, &args);
    }
    let only = std::env::var("SMC_BENCH_ONLY").unwrap_or_default();
    if only == "constraints" {
        let kernel = load(&args, 32, 64)?;
        return constraints::run(&mut report, &args, kernel.vocab());
    }
    if only == "formats" {
        let kernel = load(&args, 1, 64)?;
        // Real text without repetition (a repeated passage would be predicted by copying):
        // the passage above, then this project's README.
        let text = format!("{TEXT}\n\n{}", include_str!("../../README.md"));
        let text = kernel.encode(&text).map_err(|e| e.to_string())?;
        return formats::run(&mut report, &args, &text);
    }
    if only == "sizes" {
        let formats = args
            .formats
            .clone()
            .unwrap_or(vec![WeightFormat::F32, WeightFormat::Q8_0]);
        return sizes::run(&mut report, &args, &formats);
    }
    if only == "scale" {
        let kernel = load(&args, 1, 64)?;
        let text = kernel.encode(&TEXT.repeat(4)).map_err(|e| e.to_string())?;
        return scale::run(
            &mut report,
            &args,
            &text[..args.prompt_tokens.min(text.len())],
        );
    }
    if only == "potentials" {
        let kernel = load(&args, 1, 64)?;
        let tokens = kernel.encode(&TEXT.repeat(8)).map_err(|e| e.to_string())?;
        return potentials::run(&mut report, kernel.vocab(), &tokens);
    }
    let max_n = *args.ns.iter().max().unwrap_or(&1);
    let mut kernel = load(&args, max_n, 512)?;
    let text_tokens = kernel.encode(&TEXT.repeat(4)).map_err(|e| e.to_string())?;
    if text_tokens.len() < 256.max(args.prompt_tokens) {
        return Err("benchmark text too short".into());
    }
    let prompt: Vec<TokenId> = text_tokens[..args.prompt_tokens].to_vec();
    if !args.json {
        println!(
            "SmolLM2-135M-Instruct, f32 weights, {}-token prompt, medians over {} steps, on {}",
            args.prompt_tokens, args.steps, report.device
        );
    }

    // Prefill: one 256-token prompt (batch 1), then 8 different 256-token suffixes at once.
    let long: Vec<TokenId> = text_tokens[..256].to_vec();
    let t0 = Instant::now();
    let (root, _) = kernel.start(&long).map_err(|e| e.to_string())?;
    let single = 256.0 / t0.elapsed().as_secs_f64();
    kernel.release(root);
    report.emit("prefill_tokens_per_s", "smc-steer", 1, single, "tokens/s");
    let batch_n = 8;
    let (root, _) = kernel.start(&long[..1]).map_err(|e| e.to_string())?;
    let mut seqs = vec![root];
    for _ in 1..batch_n {
        seqs.push(kernel.fork(root).map_err(|e| e.to_string())?);
    }
    let suffixes: Vec<&[TokenId]> = (0..batch_n).map(|i| &text_tokens[1 + i..256 + i]).collect();
    let batch: Vec<Extend<'_>> = seqs
        .iter()
        .zip(&suffixes)
        .map(|(s, t)| Extend { seq: *s, tokens: t })
        .collect();
    let t0 = Instant::now();
    kernel.extend(&batch).map_err(|e| e.to_string())?;
    let batched = (255 * batch_n) as f64 / t0.elapsed().as_secs_f64();
    for s in seqs {
        kernel.release(s);
    }
    report.emit(
        "prefill_tokens_per_s",
        "smc-steer",
        batch_n,
        batched,
        "tokens/s",
    );
    let best_prefill = single.max(batched);

    for &n in &args.ns {
        let (times, _) = decode_ours(&mut kernel, &prompt, n, args.steps)?;
        let step = median(times);
        report.emit("decode_step_ms", "smc-steer", n, step, "ms");
        let attention = kernel.cache().attention_path();
        let times = forward_only(kernel.model(), attention, &prompt, n, args.steps)?;
        report.emit("forward_ms", "smc-steer", n, median(times), "ms");
        report.emit(
            "tokens_per_second",
            "smc-steer",
            n,
            n as f64 / (step / 1e3),
            "tokens/s",
        );
        let smc_kernel = load(&args, n, args.steps + 4)?;
        let times = smc_steps(smc_kernel, &prompt, n, args.steps)?;
        report.emit("smc_step_ms", "smc-steer", n, median(times), "ms");
        if !args.skip_candle && device.is_cpu() {
            // Read by candle when it loads quantized tensors: dequantize every weight to f32.
            std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
            let path = model_path::resolve(args.model.as_deref());
            let times = decode_candle(&path, &prompt, n, args.steps)?;
            report.emit("decode_step_ms", "candle", n, median(times), "ms");
        }
    }

    // KV bytes: 64 particles, the prompt, 64 generated tokens.
    let kv_n = 64;
    let (_, ours) = decode_ours(&mut kernel, &prompt, kv_n, 63)?;
    let per_token = kernel.cache().layout().bytes_per_token();
    report.emit("kv_bytes", "smc-steer", kv_n, ours as f64, "bytes");
    report.emit(
        "kv_bytes",
        "naive",
        kv_n,
        (kv_n * (prompt.len() + 64) * per_token) as f64,
        "bytes",
    );

    for &n in &args.ns {
        if let (Some(smc), Some(dec)) = (
            report.get("smc_step_ms", "smc-steer", n),
            report.get("decode_step_ms", "smc-steer", n),
        ) {
            report.emit("smc_overhead", "smc-steer", n, smc / dec, "ratio");
        }
        if let (Some(fwd), Some(dec)) = (
            report.get("forward_ms", "smc-steer", n),
            report.get("decode_step_ms", "smc-steer", n),
        ) {
            // The kernel's work beyond the forward pass, as a share of its decode step.
            report.emit(
                "distribution_share",
                "smc-steer",
                n,
                (1.0 - fwd / dec).max(0.0),
                "ratio",
            );
        }
        if let (Some(c), Some(ours)) = (
            report.get("decode_step_ms", "candle", n),
            report.get("decode_step_ms", "smc-steer", n),
        ) {
            report.emit("speedup_vs_candle", "smc-steer", n, c / ours, "ratio");
        }
    }
    if let Some(dec) = report.get("decode_step_ms", "smc-steer", 64) {
        report.emit(
            "decode_efficiency",
            "smc-steer",
            64,
            (64.0 / (dec / 1e3)) / best_prefill,
            "ratio",
        );
    }
    if only == "decode" {
        return Ok(());
    }
    constraints::run(&mut report, &args, kernel.vocab())?;
    let text = kernel.encode(&TEXT.repeat(8)).map_err(|e| e.to_string())?;
    potentials::run(&mut report, kernel.vocab(), &text)?;
    cache::run(&mut report, &args)?;
    Ok(())
}
