//! Large populations: decode and SMC step times at n = 256 and 512 and the CPU utilisation
//! of the SMC steps (process CPU time over wall time, 200% = both cores of a 2-core
//! machine busy all the time), to find serial stages.
//!
//! `smc_overhead` divides the SMC step by a plain decode step measured before it, so it
//! carries the drift between the two phases (±15% on a shared VM);
//! `smc_overhead_in_step` divides each SMC step by the time its own kernel calls took
//! (the batched forward pass and log-softmax), read by a timing wrapper around the kernel:
//! the engine's share alone, with no second phase to compare against.
//!
//! Also the draw of one token from a next-token distribution of the real vocabulary's size
//! (`sample_row_us`), beside the same draw with libm's scalar `exp` and a sequential sum
//! (`sample_row_libm_us`, the form it replaced) and their ratio, measured in this run.
//!
//! `SMC_BENCH_ONLY=scale cargo run --release --example bench -- --json [--ns 256,512]`

use std::time::Instant;

use rand::{Rng, SeedableRng};
use smc_steer::potential::Trivial;
use smc_steer::sampling::sample_log_categorical;
use std::sync::atomic::{AtomicU64, Ordering};

use smc_steer::{Extend, Extension, FeynmanKac, Kernel, SeqId, Smc, SmcConfig, TokenId};
use smc_steer::{Result as SmcResult, Vocabulary};

use super::{decode_ours, median, ms, Args, Report};

/// User plus system CPU seconds of this process so far (Linux `/proc/self/stat`, in clock
/// ticks of 1/100 s, the value of `getconf CLK_TCK` on Linux x86-64).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after ')'.
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// A kernel that adds the wall time of its `start` and `extend` calls to `spent` (ns).
struct Timed<'a, K> {
    inner: K,
    spent: &'a AtomicU64,
}

impl<K: Kernel> Timed<'_, K> {
    fn timed<T>(&mut self, f: impl FnOnce(&mut K) -> T) -> T {
        let t0 = Instant::now();
        let out = f(&mut self.inner);
        let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.spent.fetch_add(ns, Ordering::Relaxed);
        out
    }
}

impl<K: Kernel> Kernel for Timed<'_, K> {
    fn vocab(&self) -> &Vocabulary {
        self.inner.vocab()
    }
    fn start(&mut self, prompt: &[TokenId]) -> SmcResult<(SeqId, Vec<f64>)> {
        self.timed(|k| k.start(prompt))
    }
    fn fork(&mut self, seq: SeqId) -> SmcResult<SeqId> {
        self.inner.fork(seq)
    }
    fn release(&mut self, seq: SeqId) {
        self.inner.release(seq)
    }
    fn extend(&mut self, batch: &[Extend<'_>]) -> SmcResult<Vec<Extension>> {
        self.timed(|k| k.extend(batch))
    }
    fn normalised_by_construction(&self) -> bool {
        self.inner.normalised_by_construction()
    }
    fn recycle(&mut self, buffers: Vec<Vec<f64>>) {
        self.inner.recycle(buffers)
    }
}

/// Seed of the sampling figure's draws.
const SAMPLE_SEED: u64 = 11;
/// Draws per repetition of the sampling figure.
const SAMPLE_DRAWS: usize = 256;

/// The draw as `sample_log_categorical` made it before its vectorised `exp`: libm's `exp`
/// per entry and a sequential sum, then a scan of the running sum (the scan written with
/// `position`; its cost is the library's).
fn sample_libm<R: Rng>(log_w: &[f64], rng: &mut R) -> Option<usize> {
    let max = log_w.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return None;
    }
    let ps: Vec<f64> = log_w.iter().map(|&x| (x - max).exp()).collect();
    let u = rng.random::<f64>() * ps.iter().sum::<f64>();
    let mut running = 0.0;
    ps.iter()
        .position(|&p| {
            running += p;
            u < running
        })
        .or_else(|| ps.iter().rposition(|&p| p > 0.0))
}

/// Microseconds per draw from rows of `vocab + 1` log-probabilities (a softmax of varied
/// logits), ours and the libm form, alternating rounds; medians of five rounds.
fn sampling_figures(report: &mut Report, vocab: usize) {
    let rows: Vec<Vec<f64>> = (0..8u64)
        .map(|r| {
            let logits: Vec<f64> = (0..=vocab as u64)
                .map(|i| ((i.wrapping_mul(2_654_435_761) ^ r) % 4096) as f64 / 256.0)
                .collect();
            let z = smc_steer::logspace::log_sum_exp(&logits);
            logits.iter().map(|l| l - z).collect()
        })
        .collect();
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(SAMPLE_SEED);
    let (mut ours, mut libm) = (Vec::new(), Vec::new());
    let mut checksum = 0usize;
    for _ in 0..5 {
        let t0 = Instant::now();
        for i in 0..SAMPLE_DRAWS {
            checksum += sample_log_categorical(&rows[i % rows.len()], &mut rng).unwrap_or(0);
        }
        ours.push(t0.elapsed().as_secs_f64() * 1e6 / SAMPLE_DRAWS as f64);
        let t0 = Instant::now();
        for i in 0..SAMPLE_DRAWS {
            checksum += sample_libm(&rows[i % rows.len()], &mut rng).unwrap_or(0);
        }
        libm.push(t0.elapsed().as_secs_f64() * 1e6 / SAMPLE_DRAWS as f64);
    }
    std::hint::black_box(checksum);
    let (ours, libm) = (median(ours), median(libm));
    report.emit("sample_row_us", "smc-steer", vocab + 1, ours, "us");
    report.emit("sample_row_libm_us", "libm-exp", vocab + 1, libm, "us");
    report.emit(
        "sample_row_speedup",
        "smc-steer",
        vocab + 1,
        libm / ours,
        "ratio",
    );
}

pub fn run(report: &mut Report, args: &Args, prompt: &[TokenId]) -> Result<(), String> {
    let mut vocab = None;
    for &n in &args.ns {
        let mut kernel = super::load(args, n, args.steps + 4)?;
        vocab.get_or_insert(kernel.vocab().len());
        let (times, _) = decode_ours(&mut kernel, prompt, n, args.steps)?;
        let decode = median(times);
        report.emit("decode_step_ms", "smc-steer", n, decode, "ms");
        let config = SmcConfig {
            particles: n,
            max_tokens: args.steps + 2,
            ..SmcConfig::default()
        };
        let spent = AtomicU64::new(0);
        let timed = Timed {
            inner: &mut kernel,
            spent: &spent,
        };
        let mut smc =
            Smc::new(timed, FeynmanKac::new(Trivial), prompt, config).map_err(|e| e.to_string())?;
        smc.step().map_err(|e| e.to_string())?; // warm-up
        let (cpu0, wall0) = (cpu_seconds(), Instant::now());
        let (mut times, mut in_step) = (Vec::new(), Vec::new());
        for _ in 0..args.steps {
            let k0 = spent.load(Ordering::Relaxed);
            let t0 = Instant::now();
            smc.step().map_err(|e| e.to_string())?;
            let step = ms(t0);
            times.push(step);
            let kernel_ms = (spent.load(Ordering::Relaxed) - k0) as f64 / 1e6;
            in_step.push(step / kernel_ms.max(f64::MIN_POSITIVE));
        }
        let wall = wall0.elapsed().as_secs_f64();
        drop(smc);
        let step = median(times);
        report.emit("smc_step_ms", "smc-steer", n, step, "ms");
        report.emit("smc_overhead", "smc-steer", n, step / decode, "ratio");
        report.emit(
            "smc_overhead_in_step",
            "smc-steer",
            n,
            median(in_step),
            "ratio",
        );
        if let (Some(a), Some(b)) = (cpu0, cpu_seconds()) {
            report.emit(
                "cpu_utilisation",
                "smc-steer",
                n,
                100.0 * (b - a) / wall,
                "%",
            );
        }
    }
    if let Some(v) = vocab {
        sampling_figures(report, v);
    }
    Ok(())
}
