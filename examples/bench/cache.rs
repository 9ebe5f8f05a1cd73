//! KV-cache figures (issue 4): resampling cost against history length, decode step and
//! end-to-end SMC time against a contiguous per-particle cache, and the bytes a whole SMC run
//! keeps against the bytes of its distinct tokens.
//!
//! The contiguous baseline is the same kernel with `block_size` equal to a whole sequence's
//! capacity: every sequence is one block, so a fork's first write copies the whole history,
//! which is what a per-particle contiguous cache does on resampling.
//!
//! `SMC_BENCH_ONLY=cache` runs only these figures; `SMC_BENCH_QUICK=1` shrinks them (fewer
//! repetitions, 32-token SMC runs).

use std::collections::HashMap;
use std::time::Instant;

use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use smc_steer::lm::{
    GgufFile, KernelOptions, LlamaModel, LoadOptions, Tokenizer, TransformerKernel,
};
use smc_steer::potential::Soft;
use smc_steer::resampling::systematic;
use smc_steer::{
    Extend, Extension, FeynmanKac, Kernel, Resampling, SeqId, Smc, SmcConfig, TokenId, Vocabulary,
};

use super::{argmax_token, median, ms, Args, Report, TEXT};

/// Particles in every figure of this module.
const N: usize = 64;
/// Distinct lineages the population descends from (like a population after resampling).
const LINEAGES: usize = 8;

/// Whether only the cache figures were asked for (`SMC_BENCH_ONLY=cache`).
pub fn only() -> bool {
    std::env::var("SMC_BENCH_ONLY").is_ok_and(|v| v == "cache")
}

fn quick() -> bool {
    std::env::var("SMC_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0")
}

fn emit(
    report: &mut Report,
    metric: &str,
    imp: &str,
    value: f64,
    unit: &str,
    extra: &[(&str, usize)],
) {
    let mut line = serde_json::json!({
        "metric": metric, "impl": imp, "n": N, "value": value, "unit": unit
    });
    let mut shown = String::new();
    for &(key, v) in extra {
        line[key] = v.into();
        shown.push_str(&format!(" {key}={v}"));
    }
    if report.json {
        println!("{line}");
    } else {
        println!("{metric:<22} {imp:<10} n={N:<4} {value:>14.3} {unit}{shown}");
    }
    report.lines.push(line);
}

struct Setup {
    model: LlamaModel,
    tokenizer: Tokenizer,
    prompt: Vec<TokenId>,
    text: Vec<TokenId>,
}

impl Setup {
    fn kernel(&self, block_size: usize, cache_tokens: usize) -> Result<TransformerKernel, String> {
        let opts = KernelOptions {
            block_size,
            cache_tokens: Some(cache_tokens),
            ..KernelOptions::default()
        };
        TransformerKernel::from_parts(self.model.clone(), Some(self.tokenizer.clone()), None, opts)
            .map_err(|e| e.to_string())
    }

    /// The paged kernel (the default block size) and the contiguous baseline (one block of
    /// `seq_capacity` tokens per sequence, room for `2N + 16` sequences).
    fn pair(&self, seq_capacity: usize) -> Result<[(&'static str, TransformerKernel); 2], String> {
        let block = smc_steer::lm::KernelOptions::default().block_size;
        Ok([
            ("smc-steer", self.paged(block, seq_capacity)?),
            ("contiguous", self.contiguous(seq_capacity)?),
        ])
    }

    /// The paged kernel with `block` tokens per block.
    fn paged(&self, block: usize, seq_capacity: usize) -> Result<TransformerKernel, String> {
        self.kernel(block, 4096 + N * (seq_capacity + block))
    }

    /// The contiguous baseline.
    fn contiguous(&self, seq_capacity: usize) -> Result<TransformerKernel, String> {
        let block = seq_capacity.div_ceil(16) * 16;
        self.kernel(block, block * (2 * N + 16))
    }
}

fn err(e: smc_steer::SmcError) -> String {
    e.to_string()
}

/// `N` particles whose histories are the prompt plus `gen` tokens, in `LINEAGES` lineages of
/// `N / LINEAGES` particles; every particle's last token is its own. Returns the handles and
/// each particle's next token.
fn population(
    k: &mut TransformerKernel,
    s: &Setup,
    gen: usize,
) -> Result<(Vec<SeqId>, Vec<TokenId>), String> {
    let (root, _) = k.start(&s.prompt).map_err(err)?;
    let lineages: Vec<SeqId> = (0..LINEAGES)
        .map(|_| k.fork(root))
        .collect::<Result<_, _>>()
        .map_err(err)?;
    k.release(root);
    let suffixes: Vec<&[TokenId]> = (0..LINEAGES).map(|i| &s.text[i..i + gen - 1]).collect();
    let batch: Vec<Extend<'_>> = lineages
        .iter()
        .zip(&suffixes)
        .map(|(&seq, t)| Extend { seq, tokens: t })
        .collect();
    k.extend(&batch).map_err(err)?;
    let mut seqs = Vec::with_capacity(N);
    for &l in &lineages {
        for _ in 0..N / LINEAGES {
            seqs.push(k.fork(l).map_err(err)?);
        }
        k.release(l);
    }
    let last: Vec<[TokenId; 1]> = (0..N).map(|i| [s.text[300 + i]]).collect();
    let next = decode(k, &seqs, &last)?;
    Ok((seqs, next))
}

/// One decode step: append `tokens[i]` to `seqs[i]`; returns the argmax next tokens.
fn decode(
    k: &mut TransformerKernel,
    seqs: &[SeqId],
    tokens: &[[TokenId; 1]],
) -> Result<Vec<TokenId>, String> {
    let batch: Vec<Extend<'_>> = seqs
        .iter()
        .zip(tokens)
        .map(|(&seq, t)| Extend { seq, tokens: t })
        .collect();
    let out = k.extend(&batch).map_err(err)?;
    Ok(out
        .iter()
        .map(|x| argmax_token(&x.next_log_probs))
        .collect())
}

/// Replace the population by `ancestors` the way the SMC engine does: the first copy of an
/// ancestor keeps its sequence, later copies fork it, ancestors without copies are released.
fn reindex(
    k: &mut TransformerKernel,
    seqs: &[SeqId],
    next: &[TokenId],
    ancestors: &[usize],
) -> Result<(Vec<SeqId>, Vec<TokenId>), String> {
    let mut taken = vec![false; seqs.len()];
    let mut new = Vec::with_capacity(ancestors.len());
    for &a in ancestors {
        if std::mem::replace(&mut taken[a], true) {
            new.push(k.fork(seqs[a]).map_err(err)?);
        } else {
            new.push(seqs[a]);
        }
    }
    for (i, &s) in seqs.iter().enumerate() {
        if !taken[i] {
            k.release(s);
        }
    }
    Ok((new, ancestors.iter().map(|&a| next[a]).collect()))
}

/// Median decode step and median resample step (systematic resampling of log-weights drawn
/// from N(0, 1), i.e. ESS ≈ N/e, then the forks/releases and the first decode step after
/// them, where copy-on-write happens).
fn resample_figures(
    k: &mut TransformerKernel,
    s: &Setup,
    gen: usize,
    reps: usize,
) -> Result<(f64, f64), String> {
    let (mut seqs, mut next) = population(k, s, gen)?;
    let mut decode_ms = Vec::new();
    for _ in 0..reps {
        let toks: Vec<[TokenId; 1]> = next.iter().map(|&t| [t]).collect();
        let t0 = Instant::now();
        next = decode(k, &seqs, &toks)?;
        decode_ms.push(ms(t0));
    }
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(11);
    let normal = Normal::new(0.0, 1.0).map_err(|e| e.to_string())?;
    let mut resample_ms = Vec::new();
    for _ in 0..reps {
        let lw: Vec<f64> = (0..N).map(|_| normal.sample(&mut rng)).collect();
        let max = lw.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = lw.iter().map(|x| (x - max).exp()).collect();
        let total: f64 = w.iter().sum();
        let w: Vec<f64> = w.iter().map(|x| x / total).collect();
        let ancestors = systematic(&w, N, &mut rng).map_err(err)?;
        let t0 = Instant::now();
        let (s2, n2) = reindex(k, &seqs, &next, &ancestors)?;
        let toks: Vec<[TokenId; 1]> = n2.iter().map(|&t| [t]).collect();
        next = decode(k, &s2, &toks)?;
        resample_ms.push(ms(t0));
        seqs = s2;
    }
    for s in seqs {
        k.release(s);
    }
    Ok((median(decode_ms), median(resample_ms)))
}

/// A kernel wrapper that follows the particle tree: every token a sequence holds is a node
/// (a fork shares its parent's nodes), so the distinct (position, ancestry) tokens of the
/// live sequences can be counted after every batched extension.
struct Tracker<'a> {
    inner: &'a mut TransformerKernel,
    parent: Vec<usize>,
    tip: HashMap<SeqId, usize>,
    /// Cache bytes and distinct-token bytes after the last extension.
    last: (usize, usize),
}

const NO_NODE: usize = usize::MAX;

impl Tracker<'_> {
    fn grow(&mut self, mut tip: usize, n: usize) -> usize {
        for _ in 0..n {
            self.parent.push(tip);
            tip = self.parent.len() - 1;
        }
        tip
    }

    fn distinct_tokens(&self) -> usize {
        let mut seen = vec![false; self.parent.len()];
        let mut count = 0;
        for &t in self.tip.values() {
            let mut node = t;
            while node != NO_NODE && !seen[node] {
                seen[node] = true;
                count += 1;
                node = self.parent[node];
            }
        }
        count
    }
}

impl Kernel for Tracker<'_> {
    fn vocab(&self) -> &Vocabulary {
        self.inner.vocab()
    }
    fn start(&mut self, prompt: &[TokenId]) -> smc_steer::Result<(SeqId, Vec<f64>)> {
        let (seq, d) = self.inner.start(prompt)?;
        let tip = self.grow(NO_NODE, prompt.len());
        self.tip.insert(seq, tip);
        Ok((seq, d))
    }
    fn fork(&mut self, seq: SeqId) -> smc_steer::Result<SeqId> {
        let new = self.inner.fork(seq)?;
        let tip = self.tip.get(&seq).copied().unwrap_or(NO_NODE);
        self.tip.insert(new, tip);
        Ok(new)
    }
    fn release(&mut self, seq: SeqId) {
        self.inner.release(seq);
        self.tip.remove(&seq);
    }
    fn recycle(&mut self, buffers: Vec<Vec<f64>>) {
        self.inner.recycle(buffers)
    }
    fn extend(&mut self, batch: &[Extend<'_>]) -> smc_steer::Result<Vec<Extension>> {
        let out = self.inner.extend(batch)?;
        for e in batch {
            let tip = self.tip.get(&e.seq).copied().unwrap_or(NO_NODE);
            let tip = self.grow(tip, e.tokens.len());
            self.tip.insert(e.seq, tip);
        }
        let per_token = self.inner.cache().layout().bytes_per_token();
        self.last = (
            self.inner.cache().used_bytes(),
            self.distinct_tokens() * per_token,
        );
        Ok(out)
    }
}

/// SMC over `N` particles × `max_tokens` with ESS-triggered (N/2) systematic resampling and a
/// soft potential that makes the weights diverge. Returns (wall seconds, resampling steps,
/// cache bytes and distinct-token bytes after the last extension).
fn smc_run(
    k: &mut TransformerKernel,
    prompt: &[TokenId],
    max_tokens: usize,
) -> Result<(f64, usize, (usize, usize)), String> {
    let program = FeynmanKac::new(Soft::on_text("few-e", |t: &str| {
        -(t.matches('e').count() as f64)
    }));
    let config = SmcConfig {
        particles: N,
        max_tokens,
        ess_threshold: 0.5,
        resampling: Resampling::Systematic,
        seed: 5,
        record: true,
        ..SmcConfig::default()
    };
    let mut tracker = Tracker {
        inner: k,
        parent: Vec::new(),
        tip: HashMap::new(),
        last: (0, 0),
    };
    let t0 = Instant::now();
    let result = Smc::new(&mut tracker, program, prompt, config)
        .and_then(Smc::run)
        .map_err(err)?;
    let wall = t0.elapsed().as_secs_f64();
    let resamples = result.records.iter().filter(|r| r.resampled).count();
    Ok((wall, resamples, tracker.last))
}

/// Run every cache figure and add it to `report`.
pub fn run(report: &mut Report, args: &Args) -> Result<(), String> {
    let path = super::model_path::resolve(args.model.as_deref());
    let mut gguf = GgufFile::open(&path).map_err(|e| super::model_path::explain(&e))?;
    let model = LlamaModel::from_gguf_file(&mut gguf, &LoadOptions::default())
        .map_err(|e| e.to_string())?;
    let tokenizer = Tokenizer::from_gguf(&gguf).map_err(|e| e.to_string())?;
    let text = tokenizer
        .encode(&TEXT.repeat(6))
        .map_err(|e| e.to_string())?;
    if text.len() < 600 {
        return Err("benchmark text too short".into());
    }
    let setup = Setup {
        prompt: text[..args.prompt_tokens.min(64)].to_vec(),
        text,
        model,
        tokenizer,
    };
    let quick = quick();
    let reps = if quick { 3 } else { 7 };
    if !report.json {
        println!(
            "KV cache: {N} particles, {}-token prompt, medians over {reps} steps{}",
            setup.prompt.len(),
            if quick { " (quick)" } else { "" }
        );
    }

    // Resampling and decoding after 32 and 256 generated tokens.
    let mut resample: HashMap<(&str, usize), f64> = HashMap::new();
    let mut decode_ms: HashMap<(&str, usize), f64> = HashMap::new();
    for gen in [32usize, 256] {
        let capacity = setup.prompt.len() + gen + 2 * reps + 8;
        let g = [("gen_tokens", gen)];
        for (imp, mut k) in setup.pair(capacity)? {
            let (dec, res) = resample_figures(&mut k, &setup, gen, reps)?;
            emit(report, "resample_ms", imp, res, "ms", &g);
            emit(report, "decode_step_ms", imp, dec, "ms", &g);
            // What resampling adds to the decode step after it (forks, releases, copies).
            emit(report, "resample_extra_ms", imp, res - dec, "ms", &g);
            resample.insert((imp, gen), res);
            decode_ms.insert((imp, gen), dec);
            if k.cache().free_blocks() != k.cache().num_blocks() {
                return Err(format!("{imp}: cache blocks leaked"));
            }
        }
    }
    for imp in ["smc-steer", "contiguous"] {
        if let (Some(a), Some(b)) = (resample.get(&(imp, 256)), resample.get(&(imp, 32))) {
            emit(report, "resample_growth", imp, a / b, "ratio", &[]);
        }
    }
    if let (Some(p), Some(c)) = (
        decode_ms.get(&("smc-steer", 256)),
        decode_ms.get(&("contiguous", 256)),
    ) {
        let g = [("gen_tokens", 256)];
        emit(report, "decode_step_ratio", "smc-steer", p / c, "ratio", &g);
    }

    // End-to-end SMC, paged (16- and 4-token blocks) vs contiguous; bytes of the paged runs.
    let max_tokens = if quick { 32 } else { 128 };
    let capacity = setup.prompt.len() + max_tokens + 2;
    let runs = [
        ("smc-steer", setup.paged(16, capacity)?, 16),
        ("smc-steer", setup.paged(4, capacity)?, 4),
        ("contiguous", setup.contiguous(capacity)?, 0),
    ];
    let mut wall: HashMap<usize, f64> = HashMap::new();
    for (imp, mut k, block) in runs {
        let (secs, resamples, (used, unique)) = smc_run(&mut k, &setup.prompt, max_tokens)?;
        let block = if block == 0 {
            capacity.div_ceil(16) * 16
        } else {
            block
        };
        let x = [("gen_tokens", max_tokens), ("block_size", block)];
        emit(report, "smc_wall_s", imp, secs, "s", &x);
        // To stderr, so that `--json` output stays one object per line.
        eprintln!("  ({imp}, block {block}: {resamples} resampling steps)");
        wall.insert(block, secs);
        if imp == "smc-steer" {
            emit(report, "kv_bytes", imp, used as f64, "bytes", &x);
            emit(
                report,
                "kv_unique_token_bytes",
                imp,
                unique as f64,
                "bytes",
                &x,
            );
            let overhead = used as f64 / unique.max(1) as f64;
            emit(report, "kv_overhead", imp, overhead, "ratio", &x);
        }
        if k.cache().free_blocks() != k.cache().num_blocks() {
            return Err(format!("{imp}: cache blocks leaked"));
        }
    }
    let contiguous_block = capacity.div_ceil(16) * 16;
    for block in [16, 4] {
        if let (Some(p), Some(c)) = (wall.get(&block), wall.get(&contiguous_block)) {
            let x = [("gen_tokens", max_tokens), ("block_size", block)];
            emit(report, "smc_speedup", "smc-steer", c / p, "ratio", &x);
        }
    }
    Ok(())
}
