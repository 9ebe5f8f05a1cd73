//! AWRS: properly weighted draws, checked against exact sums.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use smc_steer::awrs::{awrs, AwrsOptions, PotentialConstraint, TokenConstraint};
use smc_steer::exact::enumerate;
use smc_steer::potential::Hard;
use smc_steer::replicate::run_replicates;
use smc_steer::{FeynmanKac, ProposalKind, SeqView, Smc, SmcConfig, Truncation, Vocabulary};

const REPS: usize = 20_000;

/// Allows a fixed set of tokens and counts evaluations.
struct Allowed {
    ok: Vec<bool>,
    calls: AtomicUsize,
}
impl TokenConstraint for Allowed {
    fn name(&self) -> &str {
        "allowed-set"
    }
    fn allows(&self, _: &SeqView<'_>, t: u32) -> bool {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.ok[t as usize]
    }
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
        for draws in [1, 2, 4] {
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
            let mut r = rng(MASTER_SEED);
            let (mut s, mut s2, mut w_sum) = (0.0, 0.0, 0.0);
            for _ in 0..REPS {
                let d = awrs(
                    &log_p,
                    &view,
                    &c,
                    AwrsOptions {
                        estimate_draws: draws,
                    },
                    &mut r,
                )
                .unwrap();
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
                "{case}/{draws}: E[w f] = {mean} ± {se}, exact {exact}"
            );
            assert!(
                (w_sum / REPS as f64 - z).abs() <= 4.0 * se + 0.01 * z,
                "{case}/{draws}: E[w] vs Z = {z}"
            );
            // Lazy: far fewer evaluations than the 8 of a full mask per draw.
            let per_draw = c.calls.load(Ordering::Relaxed) as f64 / REPS as f64;
            assert!(per_draw < 8.0, "{case}: {per_draw} evaluations per draw");
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
    let d = awrs(&log_p, &view, &c, AwrsOptions::default(), &mut rng(1)).unwrap();
    assert_eq!(d.token, None);
    assert_eq!(d.log_weight, f64::NEG_INFINITY);
    assert_eq!(d.evaluations, 3);
    assert!(awrs(
        &log_p,
        &view,
        &c,
        AwrsOptions { estimate_draws: 0 },
        &mut rng(1)
    )
    .is_err());
}

#[test]
fn smc_with_awrs_is_unbiased_and_respects_the_constraint() {
    let constraint: Arc<dyn TokenConstraint> =
        Arc::new(PotentialConstraint(Hard::on_text("no-cc", |t: &str| {
            !t.contains("cc")
        })));
    let exact = enumerate(&kernel(), &potential(), &[], 4, Truncation::Truncate).unwrap();
    let config = SmcConfig {
        particles: 8,
        max_tokens: 4,
        ..SmcConfig::default()
    };
    let reps = run_replicates(MASTER_SEED, 300, |seed| {
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
