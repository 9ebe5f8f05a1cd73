//! Locally constrained decoding is biased; SMC converges to the exact constrained posterior.
//!
//! Toy kernel over `a`, `b`: `a` is likely first but usually ends right after; `b` is rare
//! first but continues. Constraint: at least three letters before EOS. Masked (locally
//! constrained) decoding forbids EOS too late to avoid committing to `a`; the posterior
//! strongly prefers sequences starting with `b`. The numbers are written to stdout (run
//! with `--nocapture`) and quoted in docs/bias.md.

use std::collections::HashMap;
use std::sync::Arc;

use crate::common::*;
use smc_steer::potential::{Hard, SeqPotential};
use smc_steer::testing::enumerate;
use smc_steer::testing::ToyKernel;
use smc_steer::{FeynmanKac, ProposalKind, Smc, SmcConfig, TokenId, Truncation, Vocabulary};

const MAX_TOKENS: usize = 4;

fn toy() -> ToyKernel {
    let vocab = Vocabulary::from_strs(&["a", "b"]).unwrap();
    ToyKernel::bigram(
        vocab,
        &[0.7, 0.3, 0.0],
        &[vec![0.05, 0.05, 0.9], vec![0.45, 0.45, 0.1]],
    )
    .unwrap()
}

fn at_least_three() -> Hard {
    Hard::on_tokens("at-least-3", |t: &[TokenId]| t.len() >= 3).complete_only()
}

type Key = (Vec<TokenId>, bool);

/// Exact distribution of locally constrained (masked) sampling: at each step draw from the
/// kernel renormalised over the allowed tokens, ignoring weights.
fn masked_decoding(kernel: &ToyKernel, constraint: &dyn SeqPotential) -> HashMap<Key, f64> {
    let vocab = kernel.vocab_ref().clone();
    let mut out = HashMap::new();
    let mut stack = vec![(Vec::<TokenId>::new(), 1.0f64)];
    while let Some((x, q)) = stack.pop() {
        if x.len() == MAX_TOKENS {
            *out.entry((x, false)).or_default() += q;
            continue;
        }
        let p: Vec<f64> = kernel.log_probs(&x).iter().map(|l| l.exp()).collect();
        let bytes = vocab.decode_bytes(&x);
        let mut w = vec![0.0; vocab.dist_len()];
        constraint.log_weight_next(
            &smc_steer::SeqView {
                tokens: &x,
                bytes: &bytes,
                vocab: &vocab,
            },
            &mut w,
        );
        let mass: f64 = p
            .iter()
            .zip(&w)
            .filter(|(_, w)| **w > f64::NEG_INFINITY)
            .map(|(p, _)| p)
            .sum();
        for v in 0..vocab.dist_len() {
            if w[v] == f64::NEG_INFINITY || p[v] == 0.0 {
                continue;
            }
            let qv = q * p[v] / mass;
            if v == vocab.len() {
                *out.entry((x.clone(), true)).or_default() += qv;
            } else {
                let mut y = x.clone();
                y.push(v as TokenId);
                stack.push((y, qv));
            }
        }
    }
    out
}

fn tv(a: &HashMap<Key, f64>, b: &HashMap<Key, f64>) -> f64 {
    let keys: std::collections::HashSet<&Key> = a.keys().chain(b.keys()).collect();
    0.5 * keys
        .into_iter()
        .map(|k| (a.get(k).unwrap_or(&0.0) - b.get(k).unwrap_or(&0.0)).abs())
        .sum::<f64>()
}

#[test]
fn smc_converges_where_locally_constrained_decoding_is_biased() {
    let kernel = toy();
    let exact = enumerate(
        &kernel,
        &at_least_three(),
        &[],
        MAX_TOKENS,
        Truncation::Truncate,
    )
    .unwrap();
    let posterior = exact.posterior();
    let lcd = masked_decoding(&kernel, &at_least_three());
    let lcd_tv = tv(&lcd, &posterior);
    let first_b = |d: &HashMap<Key, f64>| {
        d.iter()
            .filter(|(k, _)| k.0.first() == Some(&1))
            .map(|(_, p)| p)
            .sum::<f64>()
    };
    println!("exact posterior P(first = b) = {:.4}", first_b(&posterior));
    println!(
        "masked decoding P(first = b) = {:.4}; TV(masked, exact) = {:.4}",
        first_b(&lcd),
        lcd_tv
    );
    assert!(
        lcd_tv > 0.3,
        "the toy must make masked decoding clearly biased"
    );

    // Masked sampling as an importance sampler: its unweighted draws are masked decoding;
    // its weights correct them to the posterior. SMC with resampling converges too.
    let model = || {
        FeynmanKac::new(at_least_three())
            .with_proposal(ProposalKind::Mask(Arc::new(at_least_three())))
    };
    for (name, threshold) in [("importance", 0.0), ("smc", 0.5)] {
        let mut last_tv = f64::INFINITY;
        for n in [100, 1_000, 10_000] {
            let config = SmcConfig {
                particles: n,
                max_tokens: MAX_TOKENS,
                ess_threshold: threshold,
                seed: MASTER_SEED,
                ..SmcConfig::default()
            };
            let result = Smc::new(kernel.clone(), model(), &[], config)
                .unwrap()
                .run()
                .unwrap();
            let weighted: HashMap<Key, f64> = result
                .posterior()
                .into_iter()
                .map(|d| ((d.tokens, d.eos), d.probability))
                .collect();
            let d = tv(&weighted, &posterior);
            println!(
                "{name:>10} N = {n:>6}: TV(SMC, exact) = {d:.4}, log Z = {:.4} (exact {:.4})",
                result.log_z, exact.log_z
            );
            last_tv = d;
            if name == "importance" && n == 10_000 {
                // Unweighted particles are masked decoding: they match its exact law, not the posterior.
                let mut counts: HashMap<Key, f64> = HashMap::new();
                for c in &result.particles {
                    *counts.entry((c.tokens.clone(), c.eos)).or_default() += 1.0;
                }
                let keys: Vec<&Key> = lcd.keys().collect();
                let observed: Vec<f64> = keys
                    .iter()
                    .map(|k| counts.get(*k).copied().unwrap_or(0.0))
                    .collect();
                let (stat, df) =
                    chi_square(&observed, &keys.iter().map(|k| lcd[*k]).collect::<Vec<_>>());
                assert!(
                    chi_square_p(stat, df) > 1e-3,
                    "unweighted draws follow masked decoding"
                );
                let (stat, df) = chi_square(
                    &observed,
                    &keys
                        .iter()
                        .map(|k| posterior.get(*k).copied().unwrap_or(0.0))
                        .collect::<Vec<_>>(),
                );
                assert!(chi_square_p(stat, df) < 1e-6, "and not the posterior");
            }
        }
        assert!(last_tv < 0.05, "{name}: TV at N = 10000 is {last_tv}");
    }
}
