//! Shared toy models for the statistical tests.
#![allow(dead_code)]

use rand::SeedableRng;
use rand_pcg::Pcg64Mcg;
use smc_steer::potential::{Hard, Product, Soft};
use smc_steer::testing::ToyKernel;

/// Whether this run is CI (`CI=true` or `CI=1`), where tests must not skip.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Where the command line looks for a model by default, shared so the tests look there too.
#[cfg(feature = "lm")]
#[path = "../../src/bin/smc-steer/model_path.rs"]
mod model_path;

/// The real model's path (`$SMC_STEER_MODEL`, else the repository's `models/`); `None`
/// (with a message) when it is absent outside CI. Under CI a missing model fails the test
/// instead of skipping it.
#[cfg(feature = "lm")]
pub fn real_model() -> Option<std::path::PathBuf> {
    let path = model_path::resolve(None);
    if path.exists() {
        return Some(path);
    }
    let e = model_path::explain(&smc_steer::lm::LmError::ModelNotFound { path });
    if under_ci() {
        panic!("CI is set and the model is missing: {e}");
    }
    skip(&format!("model not available: {e}"));
    None
}

/// Say that a test skips, visibly: straight to the process's stderr, which the test
/// harness does not capture (its `eprintln!` capture would hide the line behind `ok`).
pub fn skip(why: &str) {
    use std::io::Write;
    let test = std::thread::current()
        .name()
        .unwrap_or("a test")
        .to_string();
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// Seed of the toy bigram kernel used throughout.
pub const KERNEL_SEED: u64 = 20261127;
/// Default master seed of replicate runs.
pub const MASTER_SEED: u64 = 0xC0FFEE;

/// The environment variable that moves every statistical suite to fresh seeds:
/// `SMC_TEST_SEED=123 cargo test --release`. Unset, the suites use their fixed seeds.
pub const SEED_VAR: &str = "SMC_TEST_SEED";

/// `default` mixed with `SMC_TEST_SEED` when it is set. The seed in use is printed, so a
/// failing test's output says how to reproduce it.
pub fn seeded(default: u64) -> u64 {
    let seed = match std::env::var(SEED_VAR) {
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(extra) => default ^ extra.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            Err(_) => panic!("{SEED_VAR} must be an unsigned integer, got {v:?}"),
        },
        Err(_) => default,
    };
    eprintln!("seed {seed:#x} (default {default:#x}; {SEED_VAR} moves it)");
    seed
}

/// The master seed of replicate runs ([`MASTER_SEED`], moved by `SMC_TEST_SEED`).
pub fn master_seed() -> u64 {
    seeded(MASTER_SEED)
}

/// A bigram kernel over `a`, `b`, `c` with EOS probability 0.3.
pub fn kernel() -> ToyKernel {
    ToyKernel::random_bigram(3, 0.3, KERNEL_SEED).expect("valid toy kernel")
}

/// A hard constraint (no two consecutive `c`) times a soft score (0.7 per `a`).
pub fn potential() -> Product {
    Product::new("no-cc-likes-a")
        .with(Hard::on_text("no-cc", |t: &str| !t.contains("cc")))
        .with(Soft::on_text("likes-a", |t: &str| {
            0.7 * t.matches('a').count() as f64
        }))
}

/// The prefix score, complete score and next-token weights of `p` after `tokens` (its
/// state replayed from the start).
pub fn scores<P: smc_steer::potential::Potential + ?Sized>(
    p: &P,
    vocab: &smc_steer::Vocabulary,
    tokens: &[u32],
) -> (f64, f64, Vec<f64>) {
    let bytes = vocab.decode_bytes(tokens);
    let (state, view) = smc_steer::potential::replay(p, vocab, tokens, &bytes).unwrap();
    let mut next = vec![0.0; vocab.dist_len()];
    p.log_weight_next(&state, &view, &mut next).unwrap();
    (p.prefix(&state, &view), p.complete(&state, &view), next)
}

/// A seeded test RNG.
pub fn rng(seed: u64) -> Pcg64Mcg {
    Pcg64Mcg::seed_from_u64(seed)
}

/// Assert that the mean of `Ẑ` over replicates is within 4 standard errors of the exact
/// `Z = exp(log_z)`.
pub fn assert_unbiased<P>(reps: &smc_steer::replicate::Replicates<P>, log_z: f64, label: &str) {
    let ratio = reps.z_ratio(log_z);
    assert!(
        (ratio.mean - 1.0).abs() <= 4.0 * ratio.se,
        "{label}: mean Ẑ/Z = {} ± {} (see the seed printed above)",
        ratio.mean,
        ratio.se
    );
}

/// As [`assert_unbiased`], and also that the test has the power to see a bias of
/// `detectable` (relative, e.g. 0.02): its 4-SE band must be narrower than that.
pub fn assert_unbiased_with_power<P>(
    reps: &smc_steer::replicate::Replicates<P>,
    log_z: f64,
    detectable: f64,
    label: &str,
) {
    let ratio = reps.z_ratio(log_z);
    assert!(
        4.0 * ratio.se <= detectable,
        "{label}: SE {} too large to detect a {detectable} bias; add replicates",
        ratio.se
    );
    eprintln!(
        "{label}: Ẑ/Z = {:.4} ± {:.4}, detectable bias {:.2}%",
        ratio.mean,
        ratio.se,
        400.0 * ratio.se
    );
    assert_unbiased(reps, log_z, label);
}

/// Chi-square goodness of fit of `counts` against `probs`, merging cells with expected
/// count below 5 into one. Returns (statistic, degrees of freedom).
pub fn chi_square(counts: &[f64], probs: &[f64]) -> (f64, usize) {
    let total: f64 = counts.iter().sum();
    let mut cells: Vec<(f64, f64)> = Vec::new();
    let (mut small_obs, mut small_exp) = (0.0, 0.0);
    for (c, p) in counts.iter().zip(probs) {
        let e = p * total;
        if e < 5.0 {
            small_obs += c;
            small_exp += e;
        } else {
            cells.push((*c, e));
        }
    }
    if small_exp > 0.0 {
        cells.push((small_obs, small_exp));
    }
    let stat = cells.iter().map(|(o, e)| (o - e).powi(2) / e).sum();
    (stat, cells.len().saturating_sub(1))
}

/// Upper tail probability of a chi-square statistic.
pub fn chi_square_p(stat: f64, df: usize) -> f64 {
    use statrs::distribution::{ChiSquared, ContinuousCDF};
    let d = ChiSquared::new(df.max(1) as f64).expect("df > 0");
    1.0 - d.cdf(stat)
}
