//! SMC, importance sampling and SMC-steer against exact enumeration on toy kernels.

use std::collections::HashMap;

use crate::common::*;
use rand::Rng;
use smc_steer::potential::{DynPotential, Hard, TokenWeights, Trivial};
use smc_steer::replicate::run_replicates;
use smc_steer::testing::enumerate;
use smc_steer::testing::ToyKernel;
use smc_steer::{
    Algorithm, FeynmanKac, ProposalKind, Resampling, Smc, SmcConfig, SmcResult, Truncation,
    Vocabulary,
};

const MAX_TOKENS: usize = 4;

/// Every configuration the statistical tests cover: each resampling scheme, importance
/// sampling, and SMC-steer.
fn configurations() -> Vec<(String, SmcConfig)> {
    let base = SmcConfig {
        particles: 8,
        max_tokens: MAX_TOKENS,
        ..SmcConfig::default()
    };
    let mut out: Vec<(String, SmcConfig)> = Resampling::ALL
        .into_iter()
        .map(|r| {
            (
                format!("smc-{}", r.name()),
                SmcConfig {
                    resampling: r,
                    ess_threshold: 0.7,
                    ..base.clone()
                },
            )
        })
        .collect();
    out.push((
        "importance-sampling".into(),
        SmcConfig {
            ess_threshold: 0.0,
            ..base.clone()
        },
    ));
    out.push((
        "always-resample".into(),
        SmcConfig {
            ess_threshold: 1.0,
            ..base.clone()
        },
    ));
    out.push((
        "smc-steer-k3".into(),
        SmcConfig {
            particles: 4,
            algorithm: Algorithm::Steer { beam: 3 },
            ..base.clone()
        },
    ));
    out
}

fn run(
    config: &SmcConfig,
    model: FeynmanKac,
    seed: u64,
) -> smc_steer::Result<SmcResult<FeynmanKac>> {
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
}

#[test]
fn z_hat_is_unbiased_for_every_scheme_and_algorithm() {
    for truncation in [Truncation::Truncate, Truncation::ForceEos] {
        let exact = enumerate(&kernel(), &potential(), &[], MAX_TOKENS, truncation).unwrap();
        for (name, config) in configurations() {
            let config = SmcConfig {
                truncation,
                ..config
            };
            let reps = run_replicates(master_seed(), 300, |seed| {
                run(&config, FeynmanKac::new(potential()), seed)
            })
            .unwrap();
            assert_unbiased(&reps, exact.log_z, &format!("{name} ({truncation:?})"));
        }
    }
}

#[test]
fn proposals_are_unbiased_and_respect_the_constraint() {
    let exact = enumerate(
        &kernel(),
        &potential(),
        &[],
        MAX_TOKENS,
        Truncation::Truncate,
    )
    .unwrap();
    let mask: std::sync::Arc<dyn DynPotential> =
        std::sync::Arc::new(Hard::on_text("no-cc", |t: &str| !t.contains("cc")));
    for (name, proposal) in [
        ("locally-optimal", ProposalKind::LocallyOptimal),
        ("mask", ProposalKind::Mask(mask)),
        (
            "custom-uniform",
            ProposalKind::Custom(std::sync::Arc::new(UniformProposal)),
        ),
    ] {
        let config = SmcConfig {
            particles: 8,
            max_tokens: MAX_TOKENS,
            ..SmcConfig::default()
        };
        let reps = run_replicates(master_seed(), 300, |seed| {
            run(
                &config,
                FeynmanKac::new(potential()).with_proposal(proposal.clone()),
                seed,
            )
        })
        .unwrap();
        assert_unbiased(&reps, exact.log_z, name);
        for r in &reps.runs {
            for c in &r.particles {
                assert!(
                    c.log_weight == f64::NEG_INFINITY || !c.text.contains("cc"),
                    "{name} kept {:?}",
                    c.text
                );
            }
        }
    }
}

/// Uniform over all symbols: a valid (if poor) proposal.
struct UniformProposal;
impl smc_steer::Proposal for UniformProposal {
    fn name(&self) -> &str {
        "uniform"
    }
    fn log_probs(&self, _: &smc_steer::SeqView<'_>, p: &[f64], out: &mut [f64]) {
        out.fill(-(p.len() as f64).ln());
    }
}

/// Large-N posterior: draw from the weighted particles and compare with the exact posterior.
#[test]
fn posterior_passes_chi_square_for_every_scheme_and_algorithm() {
    let exact = enumerate(
        &kernel(),
        &potential(),
        &[],
        MAX_TOKENS,
        Truncation::Truncate,
    )
    .unwrap();
    let target = exact.posterior();
    for (name, config) in configurations() {
        let n = if matches!(config.algorithm, Algorithm::Steer { .. }) {
            6000
        } else {
            20000
        };
        let config = SmcConfig {
            particles: n,
            ..config
        };
        let result = run(&config, FeynmanKac::new(potential()), master_seed()).unwrap();
        assert_posterior_fits(&result, &target, master_seed(), &name);
    }
}

/// Draw 1,000 completions from the weighted particles of `result` and compare them with the
/// exact posterior `target` (chi-square, p > 1e-3); every draw must be in its support.
fn assert_posterior_fits(
    result: &SmcResult<FeynmanKac>,
    target: &HashMap<(Vec<u32>, bool), f64>,
    seed: u64,
    name: &str,
) {
    const DRAWS: usize = 1000;
    let keys: Vec<(Vec<u32>, bool)> = target.keys().cloned().collect();
    let probs: Vec<f64> = keys.iter().map(|k| target[k]).collect();
    let weights = result.normalised_weights();
    let ancestors = Resampling::Multinomial
        .resample(&weights, DRAWS, &mut rng(seed))
        .unwrap();
    let mut counts: HashMap<(Vec<u32>, bool), f64> = HashMap::new();
    for a in ancestors {
        let c = &result.particles[a];
        *counts.entry((c.tokens.clone(), c.eos)).or_default() += 1.0;
    }
    for k in counts.keys() {
        assert!(
            target.contains_key(k),
            "{name}: sampled an outcome outside the support: {k:?}"
        );
    }
    let observed: Vec<f64> = keys
        .iter()
        .map(|k| counts.get(k).copied().unwrap_or(0.0))
        .collect();
    let (stat, df) = chi_square(&observed, &probs);
    let p = chi_square_p(stat, df);
    assert!(
        p > 1e-3,
        "{name}: chi-square {stat:.1} on {df} df, p = {p:.2e}"
    );
}

#[test]
fn locally_optimal_weights_equal_z_exactly_when_the_potential_factorises() {
    // A unigram kernel and token-level weights that forbid EOS: every sequence has length
    // T, each step's incremental weight is Σ_v p(v)·w(v), so every particle's weight is Z.
    let vocab = Vocabulary::from_strs(&["a", "b", "c"]).unwrap();
    let kernel = ToyKernel::unigram(vocab, &[0.2, 0.3, 0.1, 0.4]).unwrap();
    let weights = TokenWeights::new("w", vec![0.5, -1.0, 2.0, f64::NEG_INFINITY]).unwrap();
    let exact = enumerate(&kernel, &weights, &[], MAX_TOKENS, Truncation::Truncate).unwrap();
    let per_step: f64 = (0.2 * 0.5f64.exp() + 0.3 * (-1.0f64).exp() + 0.1 * 2.0f64.exp()).ln();
    assert!((exact.log_z - MAX_TOKENS as f64 * per_step).abs() < 1e-12);
    for resampling in Resampling::ALL {
        let config = SmcConfig {
            particles: 16,
            max_tokens: MAX_TOKENS,
            resampling,
            ess_threshold: 1.0,
            ..Default::default()
        };
        let model = FeynmanKac::new(weights.clone()).with_proposal(ProposalKind::LocallyOptimal);
        let result = Smc::new(kernel.clone(), model, &[], config)
            .unwrap()
            .run()
            .unwrap();
        for c in &result.particles {
            assert!(
                (c.log_weight - exact.log_z).abs() < 1e-9,
                "{} vs {}",
                c.log_weight,
                exact.log_z
            );
        }
        assert!((result.log_z - exact.log_z).abs() < 1e-9);
    }
    // The same identity for the mask proposal and a token-level hard constraint.
    let hard =
        TokenWeights::new("no-b", vec![0.0, f64::NEG_INFINITY, 0.0, f64::NEG_INFINITY]).unwrap();
    let exact = enumerate(&kernel, &hard, &[], MAX_TOKENS, Truncation::Truncate).unwrap();
    assert!((exact.log_z - MAX_TOKENS as f64 * 0.3f64.ln()).abs() < 1e-12);
    let model =
        FeynmanKac::new(hard.clone()).with_proposal(ProposalKind::Mask(std::sync::Arc::new(hard)));
    let config = SmcConfig {
        particles: 16,
        max_tokens: MAX_TOKENS,
        ..Default::default()
    };
    let result = Smc::new(kernel, model, &[], config).unwrap().run().unwrap();
    for c in &result.particles {
        assert!((c.log_weight - exact.log_z).abs() < 1e-9);
        assert!(!c.tokens.contains(&1));
    }
}

#[test]
fn trivial_potential_gives_log_z_zero_exactly() {
    for (name, config) in configurations() {
        let result = run(&config, FeynmanKac::new(Trivial), master_seed()).unwrap();
        assert!(
            result.log_z.abs() < 1e-12,
            "{name}: log Z = {}",
            result.log_z
        );
    }
}

#[test]
fn exact_enumeration_sums_to_one_without_potential() {
    for truncation in [Truncation::Truncate, Truncation::ForceEos] {
        let exact = enumerate(&kernel(), &Trivial, &[], MAX_TOKENS, truncation).unwrap();
        match truncation {
            // Truncation keeps all the mass; forcing EOS conditions on ending within T.
            Truncation::Truncate => assert!(exact.log_z.abs() < 1e-12),
            _ => assert!(exact.log_z < 0.0),
        }
    }
}

#[test]
fn no_positive_weight_particle_violates_the_hard_constraint() {
    let mut rng = rng(master_seed());
    for (name, config) in configurations() {
        let result = run(&config, FeynmanKac::new(potential()), rng.random()).unwrap();
        for c in &result.particles {
            if c.log_weight > f64::NEG_INFINITY {
                assert!(
                    !c.text.contains("cc"),
                    "{name}: {:?} has positive weight",
                    c.text
                );
            }
        }
    }
}

#[test]
fn same_seed_same_result_whatever_the_thread_count() {
    let go = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            configurations()
                .into_iter()
                .map(|(_, c)| {
                    let r = run(
                        &SmcConfig { particles: 64, ..c },
                        FeynmanKac::new(potential()),
                        master_seed(),
                    )
                    .unwrap();
                    (
                        r.log_z,
                        r.particles
                            .iter()
                            .map(|p| (p.tokens.clone(), p.log_weight))
                            .collect::<Vec<_>>(),
                    )
                })
                .collect::<Vec<_>>()
        })
    };
    assert_eq!(go(1), go(2));
}

#[test]
fn every_step_makes_one_batched_kernel_call() {
    let config = SmcConfig {
        particles: 32,
        max_tokens: 6,
        ..SmcConfig::default()
    };
    let mut smc = Smc::new(kernel(), FeynmanKac::new(potential()), &[], config).unwrap();
    let mut steps = 0;
    while smc.step().unwrap() {
        steps += 1;
        // A step whose particles all finished on EOS needs no kernel call.
        assert!(smc.kernel().extend_calls <= steps);
    }
    let calls = smc.kernel().extend_calls;
    assert!(calls >= steps - 1 && calls <= steps);
    let result = smc.finish();
    assert_eq!(result.steps, steps);
}

#[test]
fn all_dead_is_a_defined_result() {
    let impossible = Hard::on_tokens("nothing", |_| false);
    let result = run(
        &configurations()[0].1,
        FeynmanKac::new(impossible),
        master_seed(),
    )
    .unwrap();
    assert!(result.all_dead);
    assert_eq!(result.log_z, f64::NEG_INFINITY);
    assert!(result.posterior().is_empty());
    assert_eq!(result.ess, 0.0);
    assert_eq!(result.expectation(|_| 1.0), None);
}

/// Tests sized to detect a 2% bias in Ẑ for each algorithm family: each asserts that its
/// 4-standard-error band is at most 0.02 wide (so a bias of 2% or more fails it), then
/// that the mean of Ẑ/Z is inside it. With N = 32 particles the relative variance of one
/// run's Ẑ is about 0.05 (SMC) to 0.06 (importance sampling), so 3,000 replicates give a
/// standard error near 0.004: the detectable bias is 4·SE ≈ 1.6–1.8%.
#[test]
fn every_algorithm_family_detects_a_two_percent_bias() {
    let exact = enumerate(
        &kernel(),
        &potential(),
        &[],
        MAX_TOKENS,
        Truncation::Truncate,
    )
    .unwrap();
    let base = SmcConfig {
        particles: 32,
        max_tokens: MAX_TOKENS,
        ess_threshold: 0.7,
        ..SmcConfig::default()
    };
    let mask = potential();
    let awrs: std::sync::Arc<dyn DynPotential> =
        std::sync::Arc::new(Hard::on_text("no-cc", |t: &str| !t.contains("cc")));
    let families: Vec<(&str, SmcConfig, ProposalKind)> = vec![
        ("smc-bootstrap", base.clone(), ProposalKind::Bootstrap),
        (
            "importance-sampling",
            SmcConfig {
                ess_threshold: 0.0,
                ..base.clone()
            },
            ProposalKind::Bootstrap,
        ),
        (
            "smc-steer-k3",
            SmcConfig {
                particles: 12,
                algorithm: Algorithm::Steer { beam: 3 },
                ..base.clone()
            },
            ProposalKind::Bootstrap,
        ),
        (
            "locally-optimal",
            base.clone(),
            ProposalKind::LocallyOptimal,
        ),
        (
            "mask",
            base.clone(),
            ProposalKind::Mask(std::sync::Arc::new(mask)),
        ),
        ("awrs", base.clone(), ProposalKind::Awrs(awrs)),
    ];
    for (name, config, proposal) in families {
        let reps = run_replicates(master_seed() ^ 0x2, 3000, |seed| {
            run(
                &config,
                FeynmanKac::new(potential()).with_proposal(proposal.clone()),
                seed,
            )
        })
        .unwrap();
        assert_unbiased_with_power(&reps, exact.log_z, 0.02, name);
    }
}

/// The exact identities above hold because every weight is equal; with unequal weights
/// (a bigram kernel, a potential that does not factorise) a wrong ancestor choice would
/// show in the posterior. Chi-square of draws from the weighted particles against the
/// exact posterior, for the locally optimal and mask proposals under every resampling
/// scheme (N = 20,000 so that the particle error is small beside 1,000 draws' noise).
#[test]
fn locally_optimal_and_mask_posteriors_with_unequal_weights() {
    let exact = enumerate(
        &kernel(),
        &potential(),
        &[],
        MAX_TOKENS,
        Truncation::Truncate,
    )
    .unwrap();
    let target = exact.posterior();
    for resampling in Resampling::ALL {
        for proposal in [
            ProposalKind::LocallyOptimal,
            ProposalKind::Mask(std::sync::Arc::new(potential())),
        ] {
            let config = SmcConfig {
                particles: 20_000,
                max_tokens: MAX_TOKENS,
                resampling,
                ess_threshold: 0.9,
                ..SmcConfig::default()
            };
            let model = FeynmanKac::new(potential()).with_proposal(proposal.clone());
            let result = run(&config, model, master_seed() ^ 0x3).unwrap();
            let weights = result.normalised_weights();
            let positive: Vec<f64> = weights.iter().copied().filter(|w| *w > 0.0).collect();
            assert!(
                positive.iter().any(|w| (w - positive[0]).abs() > 1e-12),
                "{}: the weights should differ",
                resampling.name()
            );
            assert_posterior_fits(
                &result,
                &target,
                master_seed() ^ 0x4,
                &format!("{} {proposal:?}", resampling.name()),
            );
        }
    }
}

/// A kernel that refills the distributions the engine gives back ([`Kernel::recycle`]),
/// poisoned with NaN in between: if the engine handed back a distribution it still read,
/// its run would change (or fail on the NaN).
struct Recycling {
    inner: ToyKernel,
    spare: Vec<Vec<f64>>,
    recycled: usize,
    reused: usize,
}

impl smc_steer::Kernel for Recycling {
    fn vocab(&self) -> &Vocabulary {
        self.inner.vocab()
    }
    fn start(
        &mut self,
        prompt: &[smc_steer::TokenId],
    ) -> smc_steer::Result<(smc_steer::SeqId, Vec<f64>)> {
        self.inner.start(prompt)
    }
    fn fork(&mut self, seq: smc_steer::SeqId) -> smc_steer::Result<smc_steer::SeqId> {
        self.inner.fork(seq)
    }
    fn release(&mut self, seq: smc_steer::SeqId) {
        self.inner.release(seq)
    }
    fn recycle(&mut self, buffers: Vec<Vec<f64>>) {
        for mut b in buffers {
            b.iter_mut().for_each(|x| *x = f64::NAN);
            self.recycled += 1;
            self.spare.push(b);
        }
    }
    fn extend(
        &mut self,
        batch: &[smc_steer::Extend<'_>],
    ) -> smc_steer::Result<Vec<smc_steer::Extension>> {
        let mut out = self.inner.extend(batch)?;
        for ext in &mut out {
            if let Some(mut b) = self.spare.pop() {
                b.clear();
                b.extend_from_slice(&ext.next_log_probs);
                ext.next_log_probs = b;
                self.reused += 1;
            }
        }
        Ok(out)
    }
}

#[test]
fn recycled_distributions_leave_every_run_unchanged() {
    for (name, config) in configurations() {
        let config = SmcConfig {
            particles: 32,
            seed: master_seed(),
            ..config
        };
        let plain = Smc::new(kernel(), FeynmanKac::new(potential()), &[], config.clone())
            .and_then(Smc::run)
            .unwrap();
        let recycling = Recycling {
            inner: kernel(),
            spare: Vec::new(),
            recycled: 0,
            reused: 0,
        };
        let mut smc = Smc::new(recycling, FeynmanKac::new(potential()), &[], config).unwrap();
        while smc.step().unwrap() {}
        let (recycled, reused) = (smc.kernel().recycled, smc.kernel().reused);
        let result = smc.finish();
        assert!(recycled > 0 && reused > 0, "{name}: nothing recycled");
        assert_eq!(plain.log_z, result.log_z, "{name}");
        let key = |r: &SmcResult<FeynmanKac>| {
            r.particles
                .iter()
                .map(|p| (p.tokens.clone(), p.log_weight))
                .collect::<Vec<_>>()
        };
        assert_eq!(key(&plain), key(&result), "{name}");
    }
}
