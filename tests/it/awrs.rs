//! AWRS: properly weighted draws, checked against exact sums.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::common::*;
use smc_steer::awrs::{awrs, AwrsOptions};
use smc_steer::potential::{DynPotential, Hard, SeqPotential};
use smc_steer::replicate::run_replicates;
use smc_steer::testing::enumerate;
use smc_steer::testing::ToyKernel;
use smc_steer::{FeynmanKac, ProposalKind, SeqView, Smc, SmcConfig, Truncation, Vocabulary};

const REPS: usize = 20_000;

/// Allows a fixed set of tokens and counts evaluations.
struct Allowed {
    ok: Vec<bool>,
    calls: AtomicUsize,
}
/// As a Boolean potential: a prefix is allowed when its last token is, and EOS when EOS is.
impl SeqPotential for Allowed {
    fn name(&self) -> &str {
        "allowed-set"
    }
    fn prefix(&self, s: &SeqView<'_>) -> f64 {
        let ok = s.tokens.last().is_none_or(|t| {
            self.calls.fetch_add(1, Ordering::Relaxed);
            self.ok[*t as usize]
        });
        if ok {
            0.0
        } else {
            f64::NEG_INFINITY
        }
    }
    fn complete(&self, s: &SeqView<'_>) -> f64 {
        if self.prefix(s) == f64::NEG_INFINITY {
            return f64::NEG_INFINITY;
        }
        self.calls.fetch_add(1, Ordering::Relaxed);
        if self.ok[s.vocab.eos() as usize] {
            0.0
        } else {
            f64::NEG_INFINITY
        }
    }
}

/// Every way the weight walk can stop: the default adaptive rule, the paper's recursive
/// estimator, a walk capped after one evaluation, and the exhaustive walk (exact weights).
fn option_sets() -> Vec<(&'static str, AwrsOptions)> {
    vec![
        ("default", AwrsOptions::default()),
        ("recursive", AwrsOptions::recursive()),
        (
            "capped",
            AwrsOptions {
                remainder_ratio: 0.1,
                max_walk: 1,
            },
        ),
        (
            "exact",
            AwrsOptions {
                remainder_ratio: 0.0,
                max_walk: usize::MAX,
            },
        ),
    ]
}

#[test]
fn weighted_draws_are_unbiased_for_the_constrained_sum() {
    let vocab = Vocabulary::from_strs(&["a", "b", "c", "d", "e", "f", "g"]).unwrap();
    let view = SeqView {
        tokens: &[],
        bytes: &[],
        vocab: &vocab,
    };
    let probs = [0.3, 0.05, 0.2, 0.02, 0.25, 0.08, 0.06, 0.04];
    let log_p: Vec<f64> = probs.iter().map(|p: &f64| p.ln()).collect();
    for (case, ok) in [
        (
            "half",
            vec![false, true, false, true, false, true, true, false],
        ),
        (
            "rare",
            vec![false, false, false, true, false, false, false, false],
        ),
        (
            "eos-only",
            vec![false, false, false, false, false, false, false, true],
        ),
    ] {
        for (label, options) in option_sets() {
            let c = Allowed {
                ok: ok.clone(),
                calls: AtomicUsize::new(0),
            };
            let f = |t: u32| 1.0 + t as f64;
            let exact: f64 = probs
                .iter()
                .zip(&ok)
                .enumerate()
                .map(|(i, (p, o))| if *o { p * f(i as u32) } else { 0.0 })
                .sum();
            let z: f64 = probs
                .iter()
                .zip(&ok)
                .map(|(p, o)| if *o { *p } else { 0.0 })
                .sum();
            let mut r = rng(master_seed());
            let (mut s, mut s2, mut w_sum) = (0.0, 0.0, 0.0);
            for _ in 0..REPS {
                let d = awrs(&log_p, &view, &c, &(), options, &mut r).unwrap();
                let t = d.token.expect("some token is allowed");
                assert!(ok[t as usize], "{case}: drew a disallowed token");
                let w = d.log_weight.exp();
                s += w * f(t);
                s2 += (w * f(t)).powi(2);
                w_sum += w;
            }
            let mean = s / REPS as f64;
            let se = ((s2 / REPS as f64 - mean * mean).max(0.0) / REPS as f64).sqrt();
            assert!(
                (mean - exact).abs() <= 4.0 * se + 1e-12,
                "{case}/{label}: E[w f] = {mean} ± {se}, exact {exact}"
            );
            assert!(
                (w_sum / REPS as f64 - z).abs() <= 4.0 * se + 0.01 * z,
                "{case}/{label}: E[w] vs Z = {z}"
            );
            // Lazy: the paper's recursive estimator needs far fewer evaluations than the 8
            // of a full mask per draw; walking everything (ρ = 0) is the full mask.
            let per_draw = c.calls.load(Ordering::Relaxed) as f64 / REPS as f64;
            match label {
                "recursive" => assert!(per_draw < 8.0, "{case}: {per_draw} evaluations"),
                "exact" => assert!((per_draw - 8.0).abs() < 1e-12, "{case}: {per_draw}"),
                _ => assert!(per_draw <= 8.0, "{case}: {per_draw} evaluations"),
            }
        }
    }
}

#[test]
fn nothing_allowed_gives_a_dead_draw() {
    let vocab = Vocabulary::from_strs(&["a", "b"]).unwrap();
    let view = SeqView {
        tokens: &[],
        bytes: &[],
        vocab: &vocab,
    };
    let c = Allowed {
        ok: vec![false; 3],
        calls: AtomicUsize::new(0),
    };
    let log_p = [0.5f64.ln(), 0.25f64.ln(), 0.25f64.ln()];
    let d = awrs(&log_p, &view, &c, &(), AwrsOptions::default(), &mut rng(1)).unwrap();
    assert_eq!(d.token, None);
    assert_eq!(d.log_weight, f64::NEG_INFINITY);
    assert_eq!(d.evaluations, 3);
    for bad in [-1.0, f64::NAN] {
        let options = AwrsOptions {
            remainder_ratio: bad,
            ..AwrsOptions::default()
        };
        assert!(awrs(&log_p, &view, &c, &(), options, &mut rng(1)).is_err());
    }
}

#[test]
fn smc_with_awrs_is_unbiased_and_respects_the_constraint() {
    let constraint: Arc<dyn DynPotential> =
        Arc::new(Hard::on_text("no-cc", |t: &str| !t.contains("cc")));
    let exact = enumerate(&kernel(), &potential(), &[], 4, Truncation::Truncate).unwrap();
    let config = SmcConfig {
        particles: 8,
        max_tokens: 4,
        ..SmcConfig::default()
    };
    let reps = run_replicates(master_seed(), 300, |seed| {
        let model =
            FeynmanKac::new(potential()).with_proposal(ProposalKind::Awrs(constraint.clone()));
        Smc::new(
            kernel(),
            model,
            &[],
            SmcConfig {
                seed,
                ..config.clone()
            },
        )?
        .run()
    })
    .unwrap();
    assert_unbiased(&reps, exact.log_z, "smc-awrs");
    for r in &reps.runs {
        for c in &r.particles {
            assert!(c.log_weight == f64::NEG_INFINITY || !c.text.contains("cc"));
        }
    }
}

/// Seed of the sparse-constraint replicates.
const SPARSE_SEED: u64 = 0x5EED_A3A5;

/// 10 allowed tokens out of 1,000 under a uniform kernel: the old two-draw estimator was 0
/// for ~98% of draws, so most runs of 16 particles died at the first step. Every AWRS
/// draw is now positive (a dead run would need every draw to find nothing, and something
/// is allowed), and its weight has a small relative variance.
#[test]
fn sparse_constraints_do_not_kill_particles() {
    const V: usize = 1000;
    let vocab = Vocabulary::new((0..V).map(|i| format!("t{i} ").into_bytes()).collect()).unwrap();
    let view = SeqView {
        tokens: &[],
        bytes: &[],
        vocab: &vocab,
    };
    // EOS gets no mass: a uniform kernel over the 1,000 ordinary tokens.
    let mut log_p = vec![-(V as f64).ln(); V + 1];
    log_p[V] = f64::NEG_INFINITY;
    let mut ok = vec![false; V + 1];
    for i in (0..V).step_by(V / 10) {
        ok[i + 7] = true;
    }
    let c = Allowed {
        ok,
        calls: AtomicUsize::new(0),
    };
    let z = 0.01;
    let mut r = rng(SPARSE_SEED);
    const DRAWS: usize = 4000;
    let (mut zero, mut s, mut s2) = (0usize, 0.0, 0.0);
    for _ in 0..DRAWS {
        let d = awrs(&log_p, &view, &c, &(), AwrsOptions::default(), &mut r).unwrap();
        let w = d.log_weight.exp() / z;
        zero += usize::from(w == 0.0);
        s += w;
        s2 += w * w;
    }
    let mean = s / DRAWS as f64;
    let rel_var = s2 / DRAWS as f64 - mean * mean;
    let se = (rel_var / DRAWS as f64).sqrt();
    assert_eq!(zero, 0, "a draw with an allowed token got weight 0");
    assert!(
        (mean - 1.0).abs() <= 4.0 * se + 1e-9,
        "E[w]/Z = {mean} ± {se}"
    );
    // The adaptive walk bounds the relative variance by ρ² = 1/4; here it is far smaller.
    assert!(rel_var < 0.05, "relative variance of w: {rel_var}");

    // Whole SMC runs: fewer than 5% of 16-particle runs may die (none should), and the
    // spread of Ẑ over runs is within 2× that of the mask proposal (which evaluates the
    // whole vocabulary) on the same task: a kernel over 1,000 tokens whose next-token
    // distribution depends on the previous token, and an allowed set of 10 tokens that
    // depends on it too.
    let kernel = sparse_kernel(V);
    let allowed = Hard::on_tokens("sparse", |t: &[u32]| {
        (0..t.len()).all(|i| sparse_allows(&t[..i], t[i]))
    });
    let constraint: Arc<dyn DynPotential> = Arc::new(allowed.clone());
    let mut spread = Vec::new();
    for proposal in [
        ProposalKind::Mask(Arc::new(allowed.clone())),
        ProposalKind::Awrs(constraint),
    ] {
        let config = SmcConfig {
            particles: 16,
            max_tokens: 3,
            ..SmcConfig::default()
        };
        let reps = run_replicates(SPARSE_SEED, 100, |seed| {
            let model = FeynmanKac::new(allowed.clone()).with_proposal(proposal.clone());
            let config = SmcConfig {
                seed,
                ..config.clone()
            };
            Smc::new(kernel.clone(), model, &[], config)?.run()
        })
        .unwrap();
        let dead = reps.runs.iter().filter(|r| r.all_dead).count();
        assert!(dead * 20 < reps.runs.len(), "{dead} of 100 runs died");
        // Relative variance of Ẑ around the pooled mean.
        spread.push(reps.z_ratio(reps.log_mean_z()).se.powi(2));
    }
    let (mask, awrs_spread) = (spread[0], spread[1]);
    eprintln!(
        "sparse: one-draw relative variance {rel_var:.2e}; Var(Ẑ/Z) over runs: mask {mask:.3e}, AWRS {awrs_spread:.3e}"
    );
    assert!(
        awrs_spread <= 2.0 * mask,
        "Var(Ẑ)/Z² with AWRS {awrs_spread:.3e} vs mask {mask:.3e}"
    );
}

/// A kernel over `v` tokens (and EOS with probability 0.02) whose log-probabilities after
/// token `prev` are a fixed pseudo-random function of `(prev, token)`.
fn sparse_kernel(v: usize) -> ToyKernel {
    let vocab = Vocabulary::new((0..v).map(|i| format!("t{i} ").into_bytes()).collect()).unwrap();
    ToyKernel::from_fn(vocab, move |hist: &[u32]| {
        let prev = hist.last().map_or(v as u64, |t| *t as u64);
        let scores: Vec<f64> = (0..v as u64)
            .map(|t| {
                let mut h = (prev * 1_000_003 + t).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                h ^= h >> 31;
                1.5 * ((h % 10_000) as f64 / 10_000.0 - 0.5) * 4.0
            })
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
        let mut out: Vec<f64> = scores
            .iter()
            .map(|s| s - max - total.ln() + 0.98f64.ln())
            .collect();
        out.push(0.02f64.ln());
        out
    })
}

/// After `prefix`, token `t` is allowed when `(t + 7·last) mod 100 = 0`: 10 of 1,000.
fn sparse_allows(prefix: &[u32], t: u32) -> bool {
    let last = prefix.last().copied().unwrap_or(0);
    (t + 7 * last).is_multiple_of(100)
}
