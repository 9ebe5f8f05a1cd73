//! The device-generic forward pass (weights, RoPE, attention over the paged cache all as
//! candle operations on the kernel's device, the cache read by the gather back-end) agrees
//! with the default CPU path on SmolLM2, through a whole SMC run with forks and resampling.
//!
//! Both kernels run in lockstep behind one [`Kernel`]: every call goes to both, their
//! next-token log-probabilities are compared, and the SMC engine sees the CPU path's. On the
//! CPU the device-generic path must agree within 1e-4 in log-probability; on a GPU (set
//! `SMC_STEER_TEST_DEVICE=cuda:0`, as scripts/gpu-check.sh does) within 1e-3, since the
//! GPU's matrix products sum in another order.

#![cfg(feature = "lm")]

use std::collections::HashMap;

use smc_steer::lm::{parse_device, AttentionPath, ChatMessage, KernelOptions, TransformerKernel};
use smc_steer::{
    Extend, Extension, FeynmanKac, Kernel, SeqId, Smc, SmcConfig, TokenId, Vocabulary,
};

use crate::common::real_model;

/// The environment variable naming the device of the device-generic path (default `cpu`).
const DEVICE_ENV: &str = "SMC_STEER_TEST_DEVICE";
/// Seed of the SMC run.
const SMC_SEED: u64 = 7;

/// Two kernels in lockstep; the first one's results are returned.
struct Lockstep {
    reference: TransformerKernel,
    device: TransformerKernel,
    /// Sequence of the device kernel for each sequence of the reference kernel.
    seqs: HashMap<SeqId, SeqId>,
    /// Largest |difference| of a log-probability seen so far (finite entries).
    max_diff: f64,
    /// Log-probability rows compared.
    rows: usize,
}

impl Lockstep {
    fn compare(&mut self, a: &[f64], b: &[f64]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            if x.is_finite() || y.is_finite() {
                self.max_diff = self.max_diff.max((x - y).abs());
            }
        }
        self.rows += 1;
    }
}

impl Kernel for Lockstep {
    fn vocab(&self) -> &Vocabulary {
        self.reference.vocab()
    }

    fn start(&mut self, prompt: &[TokenId]) -> smc_steer::Result<(SeqId, Vec<f64>)> {
        let (a, pa) = self.reference.start(prompt)?;
        let (b, pb) = self.device.start(prompt)?;
        self.compare(&pa, &pb);
        self.seqs.insert(a, b);
        Ok((a, pa))
    }

    fn fork(&mut self, seq: SeqId) -> smc_steer::Result<SeqId> {
        let a = self.reference.fork(seq)?;
        let b = self.device.fork(self.seqs[&seq])?;
        self.seqs.insert(a, b);
        Ok(a)
    }

    fn release(&mut self, seq: SeqId) {
        self.reference.release(seq);
        if let Some(b) = self.seqs.remove(&seq) {
            self.device.release(b);
        }
    }

    /// The engine holds the reference kernel's distributions: those go back to it (the
    /// device kernel's are dropped in `extend`).
    fn recycle(&mut self, buffers: Vec<Vec<f64>>) {
        self.reference.recycle(buffers)
    }

    fn extend(&mut self, batch: &[Extend<'_>]) -> smc_steer::Result<Vec<Extension>> {
        let ea = self.reference.extend(batch)?;
        let mapped: Vec<Extend<'_>> = batch
            .iter()
            .map(|e| Extend {
                seq: self.seqs[&e.seq],
                tokens: e.tokens,
            })
            .collect();
        let eb = self.device.extend(&mapped)?;
        for (x, y) in ea.iter().zip(&eb) {
            self.compare(&x.next_log_probs, &y.next_log_probs);
            self.compare(&x.inner_log_probs, &y.inner_log_probs);
        }
        Ok(ea)
    }
}

#[test]
fn device_generic_path_agrees_with_the_cpu_path_through_smc() {
    let Some(path) = real_model() else { return };
    let name = std::env::var(DEVICE_ENV).unwrap_or_else(|_| "cpu".into());
    let device = parse_device(&name).unwrap();
    let tolerance = if device.is_cpu() { 1e-4 } else { 1e-3 };
    let opts = KernelOptions {
        particles: 6,
        max_new_tokens: 10,
        ..Default::default()
    };
    let reference = TransformerKernel::load(&path, opts.clone()).unwrap();
    let device_kernel = TransformerKernel::load(
        &path,
        KernelOptions {
            device: device.clone(),
            attention: AttentionPath::Gather,
            ..opts
        },
    )
    .unwrap();
    assert_eq!(
        device_kernel.cache().attention_path(),
        AttentionPath::Gather
    );
    let prompt = reference
        .chat_prompt(&[ChatMessage::user("Name three colours.")])
        .unwrap();
    let mut k = Lockstep {
        reference,
        device: device_kernel,
        seqs: HashMap::new(),
        max_diff: 0.0,
        rows: 0,
    };
    // Resample at every step: every step forks and releases sequences in both caches.
    let config = SmcConfig {
        particles: 6,
        max_tokens: 10,
        ess_threshold: 1.0,
        seed: SMC_SEED,
        ..Default::default()
    };
    let program = FeynmanKac::new(smc_steer::potential::Trivial);
    let result = Smc::new(&mut k, program, &prompt, config)
        .and_then(Smc::run)
        .unwrap();
    assert!(!result.particles.is_empty());
    eprintln!(
        "device {name}: max |log p(cpu) - log p(device path)| = {:e} over {} rows",
        k.max_diff, k.rows
    );
    assert!(k.rows > 10, "only {} rows compared", k.rows);
    assert!(
        k.max_diff <= tolerance,
        "device path differs by {:e} (> {tolerance:e})",
        k.max_diff
    );
    assert_eq!(k.device.cache().num_sequences(), 0, "sequences left");
}
