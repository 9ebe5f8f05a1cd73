//! Property tests of the paged KV cache (issue 4) on a tiny random-weight model (no download).
//!
//! * proptest: random sequences of multi-token appends, forks, resamples with arbitrary
//!   ancestor vectors and releases, run on the CPU and the gather attention paths side by
//!   side. After every operation each live sequence's next-token logits equal a from-scratch
//!   recomputation (f32, 1e-4), the two paths agree, every block's reference count equals the
//!   number of block tables holding it, and at the end the pool is completely free. Small pools
//!   make exhaustion happen: it must be the typed error and leave the cache usable.
//! * The gather path for several grouped-query shapes against the CPU path and recomputation.
//! * SMC-steer's K-way extension shares the parent's blocks (cache use far below N·K·len).
#![cfg(feature = "lm")]

use proptest::prelude::*;
use smc_steer::lm::{
    AttentionPath, CacheSeq, KernelOptions, LlamaConfig, LlamaModel, LmError, LogitRows,
    PagedKvCache, RopeStyle, SeqTokens, TransformerKernel,
};
use smc_steer::potential::Soft;
use smc_steer::{Algorithm, FeynmanKac, Kernel, Smc, SmcConfig};

const VOCAB: usize = 40;

fn config(n_heads: usize, n_kv_heads: usize, style: RopeStyle) -> LlamaConfig {
    LlamaConfig {
        vocab_size: VOCAB,
        hidden_size: n_heads * 8,
        intermediate_size: 48,
        n_layers: 2,
        n_heads,
        n_kv_heads,
        head_dim: 8,
        rope_theta: 10_000.0,
        rope_style: style,
        rms_eps: 1e-5,
        max_seq_len: 256,
        tie_embeddings: false,
    }
}

fn check_refcounts(cache: &PagedKvCache) -> Result<(), TestCaseError> {
    let mut counts = vec![0u32; cache.num_blocks()];
    for s in cache.sequences() {
        for &b in cache.block_table(s).unwrap_or(&[]) {
            counts[b as usize] += 1;
        }
    }
    for (b, &n) in counts.iter().enumerate() {
        prop_assert_eq!(
            cache.ref_count(b as u32),
            n,
            "reference count of block {}",
            b
        );
    }
    let used = counts.iter().filter(|&&n| n > 0).count();
    prop_assert_eq!(
        used + cache.free_blocks(),
        cache.num_blocks(),
        "leaked or double-freed blocks"
    );
    Ok(())
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// One operation on the particle population (indices are taken modulo the population).
#[derive(Debug, Clone)]
enum Op {
    /// Append tokens (1..4 each) to some particles in one batched forward.
    Append(Vec<(usize, Vec<u32>)>),
    /// Fork one particle.
    Fork(usize),
    /// Replace the population by forks of these ancestors.
    Resample(Vec<usize>),
    /// A particle finishes: its sequence is released.
    Release(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let tokens = prop::collection::vec(0..VOCAB as u32, 1..4);
    prop_oneof![
        4 => prop::collection::vec((any::<usize>(), tokens), 1..6).prop_map(Op::Append),
        1 => any::<usize>().prop_map(Op::Fork),
        2 => prop::collection::vec(any::<usize>(), 1..8).prop_map(Op::Resample),
        1 => any::<usize>().prop_map(Op::Release),
    ]
}

/// A particle: its handle in the CPU-path cache, in the gather-path cache, and its tokens.
#[derive(Debug, Clone)]
struct Particle {
    cpu: CacheSeq,
    gather: CacheSeq,
    tokens: Vec<u32>,
}

/// Logits rows of the CPU path and of the gather path.
type RowPair = (Vec<Vec<f32>>, Vec<Vec<f32>>);

struct Harness {
    model: LlamaModel,
    cpu: PagedKvCache,
    gather: PagedKvCache,
}

impl Harness {
    /// Append on both paths; `Ok(None)` when the pool is exhausted (checked to be the typed
    /// error on both, with nothing modified).
    fn forward(
        &mut self,
        entries: &[(CacheSeq, CacheSeq, &[u32])],
    ) -> Result<Option<RowPair>, TestCaseError> {
        let lens: Vec<_> = entries
            .iter()
            .map(|e| (self.cpu.seq_len(e.0), self.gather.seq_len(e.1)))
            .collect();
        let free = (self.cpu.free_blocks(), self.gather.free_blocks());
        let cpu_batch: Vec<SeqTokens<'_>> = entries
            .iter()
            .map(|e| SeqTokens {
                seq: e.0,
                tokens: e.2,
            })
            .collect();
        let gather_batch: Vec<SeqTokens<'_>> = entries
            .iter()
            .map(|e| SeqTokens {
                seq: e.1,
                tokens: e.2,
            })
            .collect();
        let a = self
            .model
            .forward(&cpu_batch, &mut self.cpu, LogitRows::All);
        let b = self
            .model
            .forward(&gather_batch, &mut self.gather, LogitRows::All);
        match (a, b) {
            (Ok(a), Ok(b)) => Ok(Some((
                a.to_vec2::<f32>().map_err(fail)?,
                b.to_vec2::<f32>().map_err(fail)?,
            ))),
            (Err(LmError::CacheExhausted { .. }), Err(LmError::CacheExhausted { .. })) => {
                for (e, l) in entries.iter().zip(&lens) {
                    prop_assert_eq!((self.cpu.seq_len(e.0), self.gather.seq_len(e.1)), *l);
                }
                prop_assert_eq!((self.cpu.free_blocks(), self.gather.free_blocks()), free);
                Ok(None)
            }
            (a, b) => Err(TestCaseError::fail(format!(
                "paths disagree: {:?} vs {:?}",
                a.err(),
                b.err()
            ))),
        }
    }

    /// Compare logits rows (one per appended token) with recomputation from scratch.
    fn check_rows(
        &self,
        history: &[u32],
        appended: usize,
        cpu: &[Vec<f32>],
        gather: &[Vec<f32>],
    ) -> Result<(), TestCaseError> {
        let full = self
            .model
            .forward_full(history)
            .map_err(fail)?
            .to_vec2::<f32>()
            .map_err(fail)?;
        let first = history.len() - appended;
        for j in 0..appended {
            let want = &full[first + j];
            let dc = max_diff(&cpu[j], want);
            let dg = max_diff(&gather[j], want);
            let dp = max_diff(&cpu[j], &gather[j]);
            prop_assert!(dc < 1e-4, "cpu path vs recomputation: {}", dc);
            prop_assert!(dg < 1e-4, "gather path vs recomputation: {}", dg);
            prop_assert!(dp < 1e-4, "cpu vs gather path: {}", dp);
        }
        Ok(())
    }

    /// Every live particle's next-token logits vs recomputation: fork each particle, append a
    /// probe token to all the forks in one batch, compare, release the forks.
    fn probe(&mut self, live: &[Particle]) -> Result<(), TestCaseError> {
        let mut forks = Vec::new();
        for p in live {
            let a = self.cpu.fork(p.cpu).map_err(fail)?;
            let b = self.gather.fork(p.gather).map_err(fail)?;
            forks.push((a, b, [(p.tokens.len() * 7 % VOCAB) as u32]));
        }
        let entries: Vec<(CacheSeq, CacheSeq, &[u32])> =
            forks.iter().map(|f| (f.0, f.1, &f.2[..])).collect();
        let out = self.forward(&entries)?;
        if let Some((a, b)) = out {
            for (i, p) in live.iter().enumerate() {
                let mut h = p.tokens.clone();
                h.push(forks[i].2[0]);
                self.check_rows(&h, 1, &a[i..=i], &b[i..=i])?;
            }
        }
        for f in forks {
            self.cpu.release(f.0);
            self.gather.release(f.1);
        }
        check_refcounts(&self.cpu)?;
        check_refcounts(&self.gather)
    }
}

fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

fn run_ops(
    seed: u64,
    block_size: usize,
    capacity: usize,
    prompt: Vec<u32>,
    ops: Vec<Op>,
) -> Result<(), TestCaseError> {
    let model = LlamaModel::random(config(4, 2, RopeStyle::Interleaved), seed).map_err(fail)?;
    let cpu = model
        .new_cache_with(block_size, capacity, AttentionPath::Cpu)
        .map_err(fail)?;
    let gather = model
        .new_cache_with(block_size, capacity, AttentionPath::Gather)
        .map_err(fail)?;
    prop_assert_eq!(gather.attention_path(), AttentionPath::Gather);
    let mut h = Harness { model, cpu, gather };
    let root = Particle {
        cpu: h.cpu.create(),
        gather: h.gather.create(),
        tokens: prompt.clone(),
    };
    let Some((a, b)) = h.forward(&[(root.cpu, root.gather, &prompt)])? else {
        // The prompt alone does not fit: nothing was stored.
        h.cpu.release(root.cpu);
        h.gather.release(root.gather);
        prop_assert_eq!(h.cpu.free_blocks(), h.cpu.num_blocks());
        return Ok(());
    };
    h.check_rows(&prompt, prompt.len(), &a, &b)?;
    let mut live = vec![root];
    for op in ops {
        match op {
            Op::Append(entries) => {
                let mut seen = vec![false; live.len()];
                let chosen: Vec<(usize, Vec<u32>)> = entries
                    .into_iter()
                    .map(|(i, t)| (i % live.len(), t))
                    .filter(|(i, _)| !std::mem::replace(&mut seen[*i], true))
                    .collect();
                let batch: Vec<(CacheSeq, CacheSeq, &[u32])> = chosen
                    .iter()
                    .map(|(i, t)| (live[*i].cpu, live[*i].gather, &t[..]))
                    .collect();
                if let Some((a, b)) = h.forward(&batch)? {
                    let mut row = 0;
                    for (i, t) in &chosen {
                        live[*i].tokens.extend_from_slice(t);
                        let n = t.len();
                        h.check_rows(&live[*i].tokens, n, &a[row..row + n], &b[row..row + n])?;
                        row += n;
                    }
                }
            }
            Op::Fork(i) => {
                let p = &live[i % live.len()];
                let q = Particle {
                    cpu: h.cpu.fork(p.cpu).map_err(fail)?,
                    gather: h.gather.fork(p.gather).map_err(fail)?,
                    tokens: p.tokens.clone(),
                };
                live.push(q);
            }
            Op::Resample(ancestors) => {
                let mut next = Vec::with_capacity(ancestors.len());
                for a in ancestors {
                    let p = &live[a % live.len()];
                    next.push(Particle {
                        cpu: h.cpu.fork(p.cpu).map_err(fail)?,
                        gather: h.gather.fork(p.gather).map_err(fail)?,
                        tokens: p.tokens.clone(),
                    });
                }
                for p in live.drain(..) {
                    h.cpu.release(p.cpu);
                    h.gather.release(p.gather);
                }
                live = next;
            }
            Op::Release(i) => {
                if live.len() > 1 {
                    let p = live.swap_remove(i % live.len());
                    h.cpu.release(p.cpu);
                    h.gather.release(p.gather);
                }
            }
        }
        check_refcounts(&h.cpu)?;
        check_refcounts(&h.gather)?;
        h.probe(&live)?;
    }
    for p in live {
        h.cpu.release(p.cpu);
        h.gather.release(p.gather);
    }
    for c in [&h.cpu, &h.gather] {
        prop_assert_eq!(c.free_blocks(), c.num_blocks(), "blocks leaked");
        prop_assert_eq!(c.num_sequences(), 0);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    /// Large pools: every operation succeeds.
    #[test]
    fn paged_cache_matches_recomputation(
        seed in 0u64..1000,
        block_size in prop::sample::select(vec![1usize, 2, 3, 4, 16]),
        prompt in prop::collection::vec(0..VOCAB as u32, 1..12),
        ops in prop::collection::vec(op(), 1..12),
    ) {
        run_ops(seed, block_size, 2048, prompt, ops)?;
    }

    /// Small pools: exhaustion happens, is typed, and leaves both caches usable and exact.
    #[test]
    fn exhaustion_leaves_the_cache_usable(
        seed in 0u64..1000,
        block_size in prop::sample::select(vec![1usize, 2, 4]),
        capacity in 12usize..40,
        prompt in prop::collection::vec(0..VOCAB as u32, 1..8),
        ops in prop::collection::vec(op(), 1..10),
    ) {
        run_ops(seed, block_size, capacity, prompt, ops)?;
    }
}

/// The gather path for grouped-query shapes (group 1, 2, 4) and both rotary styles, against
/// the CPU path and recomputation, with sequences of different lengths in one batch (padding).
#[test]
fn gather_path_matches_cpu_path_for_gqa_shapes() {
    for (nh, nkv, style) in [
        (4, 4, RopeStyle::Half),
        (4, 2, RopeStyle::Interleaved),
        (4, 1, RopeStyle::Half),
        (6, 2, RopeStyle::Interleaved),
    ] {
        let model = LlamaModel::random(config(nh, nkv, style), 11).unwrap();
        let mut h = Harness {
            cpu: model.new_cache_with(4, 512, AttentionPath::Cpu).unwrap(),
            gather: model.new_cache_with(4, 512, AttentionPath::Gather).unwrap(),
            model,
        };
        let prompt = [3u32, 1, 4, 1, 5, 9];
        let root = (h.cpu.create(), h.gather.create());
        h.forward(&[(root.0, root.1, &prompt)]).unwrap().unwrap();
        let appends: [&[u32]; 4] = [&[2], &[7, 1, 8, 2, 8], &[], &[6, 6]];
        let mut entries = Vec::new();
        for t in appends.iter().filter(|t| !t.is_empty()) {
            entries.push((
                h.cpu.fork(root.0).unwrap(),
                h.gather.fork(root.1).unwrap(),
                *t,
            ));
        }
        let (a, b) = h.forward(&entries).unwrap().unwrap();
        let mut row = 0;
        for e in &entries {
            let mut hist = prompt.to_vec();
            hist.extend_from_slice(e.2);
            let n = e.2.len();
            h.check_rows(&hist, n, &a[row..row + n], &b[row..row + n])
                .unwrap_or_else(|err| panic!("heads {nh}/{nkv} {style:?}: {err}"));
            row += n;
        }
    }
}

/// The kernel built with `AttentionPath::Gather` gives the same distributions as the default.
#[test]
fn kernel_option_selects_the_gather_path() {
    let mk = |attention| {
        let opts = KernelOptions {
            block_size: 4,
            cache_tokens: Some(256),
            attention,
            ..Default::default()
        };
        let model = LlamaModel::random(config(4, 2, RopeStyle::Interleaved), 5).unwrap();
        TransformerKernel::from_parts(model, None, None, opts).unwrap()
    };
    let (mut a, mut b) = (mk(AttentionPath::Cpu), mk(AttentionPath::Gather));
    assert_eq!(b.cache().attention_path(), AttentionPath::Gather);
    let (ra, da) = a.start(&[1, 2, 3]).unwrap();
    let (rb, db) = b.start(&[1, 2, 3]).unwrap();
    let close = |x: &[f64], y: &[f64]| {
        x.iter()
            .zip(y)
            .all(|(p, q)| (p.is_infinite() && p == q) || (p - q).abs() < 1e-4)
    };
    assert!(close(&da, &db));
    let (fa, fb) = (a.fork(ra).unwrap(), b.fork(rb).unwrap());
    let t = [9u32, 8];
    let ea = a
        .extend(&[smc_steer::Extend {
            seq: fa,
            tokens: &t,
        }])
        .unwrap();
    let eb = b
        .extend(&[smc_steer::Extend {
            seq: fb,
            tokens: &t,
        }])
        .unwrap();
    assert!(close(&ea[0].next_log_probs, &eb[0].next_log_probs));
    assert!(close(&ea[0].inner_log_probs, &eb[0].inner_log_probs));
}

/// A kernel wrapper recording the cache's use right after each batched extension, when all
/// of SMC-steer's N·K candidates are live.
struct Probe<'a> {
    inner: &'a mut TransformerKernel,
    peak_blocks: usize,
    max_batch: usize,
}

impl Kernel for Probe<'_> {
    fn vocab(&self) -> &smc_steer::Vocabulary {
        self.inner.vocab()
    }
    fn start(&mut self, prompt: &[u32]) -> smc_steer::Result<(smc_steer::SeqId, Vec<f64>)> {
        self.inner.start(prompt)
    }
    fn fork(&mut self, seq: smc_steer::SeqId) -> smc_steer::Result<smc_steer::SeqId> {
        self.inner.fork(seq)
    }
    fn release(&mut self, seq: smc_steer::SeqId) {
        self.inner.release(seq)
    }
    fn recycle(&mut self, buffers: Vec<Vec<f64>>) {
        self.inner.recycle(buffers)
    }
    fn extend(
        &mut self,
        batch: &[smc_steer::Extend<'_>],
    ) -> smc_steer::Result<Vec<smc_steer::Extension>> {
        let out = self.inner.extend(batch)?;
        let cache = self.inner.cache();
        self.peak_blocks = self.peak_blocks.max(cache.used_blocks());
        self.max_batch = self.max_batch.max(batch.len());
        // Refcounts are consistent at the widest point of every step.
        let mut counts = vec![0u32; cache.num_blocks()];
        for s in cache.sequences() {
            for &b in cache.block_table(s).unwrap_or(&[]) {
                counts[b as usize] += 1;
            }
        }
        for (b, &c) in counts.iter().enumerate() {
            assert_eq!(cache.ref_count(b as u32), c, "block {b}");
        }
        Ok(out)
    }
}

/// SMC-steer extends each particle K times through kernel forks: the K children share their
/// parent's blocks, so the cache holds far fewer than N·K·len tokens, and the pool is free
/// after the run.
#[test]
fn steer_extensions_share_the_parents_blocks() {
    let (n, beam, max_tokens, block) = (8usize, 3usize, 24usize, 4usize);
    let opts = KernelOptions {
        block_size: block,
        cache_tokens: Some(4096),
        ..Default::default()
    };
    let model = LlamaModel::random(config(4, 2, RopeStyle::Interleaved), 21).unwrap();
    let mut kernel = TransformerKernel::from_parts(model, None, None, opts).unwrap();
    let prompt: Vec<u32> = (0..20).map(|i| i % VOCAB as u32).collect();
    // A soft potential that never kills particles, so all N·K candidates stay live.
    let program = FeynmanKac::new(Soft::on_text("prefers-1", |t: &str| {
        0.1 * t.matches('1').count() as f64
    }));
    let config = SmcConfig {
        particles: n,
        algorithm: Algorithm::Steer { beam },
        max_tokens,
        seed: 3,
        ..Default::default()
    };
    let mut probe = Probe {
        inner: &mut kernel,
        peak_blocks: 0,
        max_batch: 0,
    };
    let result = Smc::new(&mut probe, program, &prompt, config)
        .and_then(Smc::run)
        .unwrap();
    assert_eq!(result.particles.len(), n);
    assert!(result.steps >= max_tokens, "{} steps", result.steps);
    let (peak_blocks, max_batch) = (probe.peak_blocks, probe.max_batch);
    assert_eq!(max_batch, n * beam, "one forward for all N·K candidates");
    // Without sharing, each of the N·K candidates would hold the prompt and its history.
    let unshared_tokens = n * beam * (prompt.len() + max_tokens);
    let peak_tokens = peak_blocks * block;
    eprintln!(
        "steer: peak {peak_blocks} blocks ({peak_tokens} token slots) with {max_batch} \
         candidates vs {unshared_tokens} tokens without sharing"
    );
    // Live data: the prompt once, N parents' histories (≤ max_tokens each), plus for every
    // candidate its private copy of the parent's partial last block and one new block.
    let bound = prompt.len().div_ceil(block) + n * max_tokens.div_ceil(block) + 2 * n * beam;
    assert!(peak_blocks <= bound, "{peak_blocks} > {bound}");
    assert!(
        peak_tokens * 3 < unshared_tokens,
        "{peak_tokens} vs {unshared_tokens}"
    );
    assert_eq!(kernel.cache().free_blocks(), kernel.cache().num_blocks());
    assert_eq!(kernel.cache().num_sequences(), 0);
}
