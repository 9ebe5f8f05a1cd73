//! Particle programs: observe, multi-token steps, twists, multi-context particles, errors.

use crate::common::*;
use smc_steer::logspace::{log_mul, log_sum_exp};
use smc_steer::potential::{SeqPotential, SeqView, Soft, TokenWeights, Trivial};
use smc_steer::replicate::run_replicates;
use smc_steer::testing::enumerate;
use smc_steer::{
    Algorithm, FeynmanKac, Flow, Particle, Program, Result, Smc, SmcConfig, SmcError, TokenId,
    Truncation,
};

const MAX_TOKENS: usize = 4;

/// Observes a fixed fragment, then stops.
#[derive(Clone)]
struct Fragment(Vec<TokenId>);
impl Program for Fragment {
    fn step(&mut self, p: &mut Particle<'_>) -> Result<Flow> {
        p.observe_tokens_in(0, &self.0)?;
        p.finish();
        Ok(Flow::Yield)
    }
}

#[test]
fn observed_fragment_scores_its_exact_log_probability_in_one_kernel_call() {
    let k = kernel();
    let expected = k.log_probs(&[2])[0] + k.log_probs(&[2, 0])[1] + k.log_probs(&[2, 0, 1])[2];
    let config = SmcConfig {
        particles: 3,
        ..SmcConfig::default()
    };
    let mut smc = Smc::new(k, Fragment(vec![0, 1, 2]), &[2], config).unwrap();
    smc.step().unwrap();
    assert_eq!(smc.kernel().extend_calls, 1);
    let result = smc.finish();
    for c in &result.particles {
        assert!((c.log_weight - expected).abs() < 1e-12);
        assert_eq!(c.tokens, vec![0, 1, 2]);
    }
    assert!((result.log_z - expected).abs() < 1e-12);
}

/// Samples two tokens per SMC step (a sub-step in between), scoring the potential.
#[derive(Clone)]
struct TwoPerStep {
    potential: Soft,
    prefix: f64,
}
impl TwoPerStep {
    fn advance(&mut self, p: &mut Particle<'_>) -> Result<bool> {
        let t = p.sample()?;
        let view = p.view();
        let s = if t == p.vocab().eos() {
            self.potential.complete(&view)
        } else {
            self.potential.prefix(&view)
        };
        p.score(s - self.prefix)?;
        self.prefix = s;
        Ok(t != p.vocab().eos())
    }
}
impl Program for TwoPerStep {
    fn step(&mut self, p: &mut Particle<'_>) -> Result<Flow> {
        // First call of a step: one token, then ask for a fresh distribution.
        if p.tokens().len().is_multiple_of(2) {
            if self.advance(p)? {
                return Ok(Flow::Continue);
            }
            return Ok(Flow::Yield);
        }
        self.advance(p)?;
        Ok(Flow::Yield)
    }
}

fn soft() -> Soft {
    Soft::on_text("likes-a", |t: &str| {
        0.7 * t.matches('a').count() as f64 - 0.3 * t.matches('c').count() as f64
    })
}

#[test]
fn multi_token_steps_are_unbiased_and_batched() {
    let exact = enumerate(&kernel(), &soft(), &[], MAX_TOKENS, Truncation::Truncate).unwrap();
    let config = SmcConfig {
        particles: 8,
        max_tokens: MAX_TOKENS,
        ..SmcConfig::default()
    };
    let reps = run_replicates(master_seed(), 300, |seed| {
        let program = TwoPerStep {
            potential: soft(),
            prefix: 0.0,
        };
        let mut smc = Smc::new(
            kernel(),
            program,
            &[],
            SmcConfig {
                seed,
                ..config.clone()
            },
        )?;
        let mut steps = 0;
        while smc.step()? {
            steps += 1;
        }
        // At most two kernel calls per step (one per sub-step).
        assert!(smc.kernel().extend_calls <= 2 * steps);
        assert!(steps <= MAX_TOKENS / 2);
        Ok(smc.finish())
    })
    .unwrap();
    assert_unbiased(&reps, exact.log_z, "two-per-step");
}

/// Bootstrap steps with the potential plus a twist (a look-ahead heuristic).
#[derive(Clone)]
struct Twisted {
    inner: FeynmanKac,
}
impl Program for Twisted {
    fn start(&mut self, p: &mut Particle<'_>) -> Result<()> {
        self.inner.start(p)
    }
    fn step(&mut self, p: &mut Particle<'_>) -> Result<Flow> {
        let flow = self.inner.step(p)?;
        let b = p.text().matches('b').count() as f64;
        p.twist(1.5 * b - 0.4)?;
        Ok(flow)
    }
}

#[test]
fn twists_guide_without_changing_the_target() {
    for truncation in [Truncation::Truncate, Truncation::ForceEos] {
        let exact = enumerate(&kernel(), &potential(), &[], MAX_TOKENS, truncation).unwrap();
        let mut configs: Vec<(String, SmcConfig)> = smc_steer::Resampling::ALL
            .into_iter()
            .map(|r| {
                (
                    r.name().to_string(),
                    SmcConfig {
                        resampling: r,
                        ..SmcConfig::default()
                    },
                )
            })
            .collect();
        configs.push((
            "steer".into(),
            SmcConfig {
                algorithm: Algorithm::Steer { beam: 2 },
                ..SmcConfig::default()
            },
        ));
        for (name, config) in configs {
            let config = SmcConfig {
                particles: 8,
                max_tokens: MAX_TOKENS,
                truncation,
                ..config
            };
            let reps = run_replicates(master_seed(), 300, |seed| {
                let program = Twisted {
                    inner: FeynmanKac::new(potential()),
                };
                Smc::new(
                    kernel(),
                    program,
                    &[],
                    SmcConfig {
                        seed,
                        ..config.clone()
                    },
                )?
                .run()
            })
            .unwrap();
            assert_unbiased(&reps, exact.log_z, &format!("{name} ({truncation:?})"));
            for r in &reps.runs {
                for c in &r.particles {
                    assert!(c.log_weight == f64::NEG_INFINITY || !c.text.contains("cc"));
                }
            }
        }
    }
}

/// A product of experts: sample in context 0, observe the same token in context 1.
#[derive(Clone)]
struct ProductOfExperts;
impl Program for ProductOfExperts {
    fn step(&mut self, p: &mut Particle<'_>) -> Result<Flow> {
        let t = p.sample_in(0)?;
        p.observe_tokens_in(1, &[t])?;
        Ok(Flow::Yield)
    }
}

/// Exact `log Z` of `p(x | a)·p(x | b)` over sequences up to `t` tokens (truncated).
fn product_log_z(a: &[TokenId], b: &[TokenId], t: usize) -> f64 {
    let k = kernel();
    let eos = 3usize;
    let mut masses = Vec::new();
    let mut stack = vec![(Vec::<TokenId>::new(), 0.0f64)];
    while let Some((x, lm)) = stack.pop() {
        if x.len() == t {
            masses.push(lm);
            continue;
        }
        let ha: Vec<TokenId> = a.iter().chain(&x).copied().collect();
        let hb: Vec<TokenId> = b.iter().chain(&x).copied().collect();
        let (da, db) = (k.log_probs(&ha), k.log_probs(&hb));
        masses.push(log_mul(lm, da[eos] + db[eos]));
        for v in 0..3u32 {
            let mut y = x.clone();
            y.push(v);
            stack.push((y, lm + da[v as usize] + db[v as usize]));
        }
    }
    log_sum_exp(&masses)
}

#[test]
fn multi_context_particles_share_each_batched_call() {
    let (a, b): (&[TokenId], &[TokenId]) = (&[0], &[1, 2]);
    let log_z = product_log_z(a, b, MAX_TOKENS);
    let config = SmcConfig {
        particles: 8,
        max_tokens: MAX_TOKENS,
        ..SmcConfig::default()
    };
    let reps = run_replicates(master_seed(), 300, |seed| {
        let mut smc = Smc::with_contexts(
            kernel(),
            ProductOfExperts,
            &[a, b],
            SmcConfig {
                seed,
                ..config.clone()
            },
        )?;
        let mut steps = 0;
        while smc.step()? {
            steps += 1;
        }
        assert!(
            smc.kernel().extend_calls <= steps,
            "both contexts go in the same call"
        );
        assert_eq!(
            smc.kernel().live_sequences(),
            0,
            "finished particles release their sequences"
        );
        Ok(smc.finish())
    })
    .unwrap();
    assert_unbiased(&reps, log_z, "product-of-experts");
}

/// Samples twice in one sub-step: the second distribution is stale.
#[derive(Clone)]
struct StaleSample;
impl Program for StaleSample {
    fn step(&mut self, p: &mut Particle<'_>) -> Result<Flow> {
        p.observe(0)?;
        p.sample()?;
        Ok(Flow::Yield)
    }
}

/// Never yields.
#[derive(Clone)]
struct Spinner;
impl Program for Spinner {
    fn step(&mut self, _: &mut Particle<'_>) -> Result<Flow> {
        Ok(Flow::Continue)
    }
}

struct NanPotential;
impl SeqPotential for NanPotential {
    fn name(&self) -> &str {
        "broken"
    }
    fn prefix(&self, s: &SeqView<'_>) -> f64 {
        if s.tokens.is_empty() {
            0.0
        } else {
            f64::NAN
        }
    }
    fn complete(&self, _: &SeqView<'_>) -> f64 {
        f64::NAN
    }
}

#[test]
fn bad_input_gives_typed_errors() {
    let fk = || FeynmanKac::new(Trivial);
    let err = |config: SmcConfig| Smc::new(kernel(), fk(), &[], config).err();
    assert_eq!(
        err(SmcConfig {
            particles: 0,
            ..Default::default()
        }),
        Some(SmcError::ZeroParticles)
    );
    assert_eq!(
        err(SmcConfig {
            ess_threshold: 1.5,
            ..Default::default()
        }),
        Some(SmcError::InvalidEssThreshold(1.5))
    );
    assert!(matches!(
        err(SmcConfig {
            ess_threshold: f64::NAN,
            ..Default::default()
        }),
        Some(SmcError::InvalidEssThreshold(_))
    ));
    assert_eq!(
        err(SmcConfig {
            algorithm: Algorithm::Steer { beam: 0 },
            ..Default::default()
        }),
        Some(SmcError::ZeroBeam)
    );
    assert!(matches!(
        err(SmcConfig {
            max_tokens: 0,
            ..Default::default()
        }),
        Some(SmcError::InvalidConfig(_))
    ));

    let wrong = TokenWeights::new("five-tokens", vec![0.0; 6]).unwrap();
    let e = Smc::new(kernel(), FeynmanKac::new(wrong), &[], SmcConfig::default()).err();
    assert!(
        matches!(
            e,
            Some(SmcError::VocabularyMismatch {
                expected: 3,
                found: 5,
                ..
            })
        ),
        "{e:?}"
    );

    let e = Smc::new(
        kernel(),
        FeynmanKac::new(NanPotential),
        &[],
        SmcConfig::default(),
    )
    .unwrap()
    .run()
    .err();
    assert_eq!(
        e,
        Some(SmcError::NanPotential {
            name: "broken".into()
        })
    );
    assert!(e.unwrap().to_string().contains("broken"));

    let e = Smc::new(kernel(), StaleSample, &[], SmcConfig::default())
        .unwrap()
        .run()
        .err();
    assert!(
        matches!(e, Some(SmcError::Program(ref m)) if m.contains("stale")),
        "{e:?}"
    );

    let e = Smc::new(kernel(), Spinner, &[], SmcConfig::default())
        .unwrap()
        .run()
        .err();
    assert!(matches!(e, Some(SmcError::Program(_))), "{e:?}");

    let e = Smc::new(kernel(), fk(), &[7], SmcConfig::default()).err();
    assert!(
        matches!(e, Some(SmcError::TokenOutOfRange { token: 7, .. })),
        "{e:?}"
    );
}

/// A proposal that does not sum to one.
struct Unnormalised;
impl smc_steer::Proposal for Unnormalised {
    fn name(&self) -> &str {
        "unnormalised"
    }
    fn log_probs(&self, _: &SeqView<'_>, _: &[f64], out: &mut [f64]) {
        out.fill(0.0);
    }
}

#[test]
fn an_invalid_proposal_is_named_in_the_error() {
    let model = FeynmanKac::new(Trivial).with_proposal(smc_steer::ProposalKind::Custom(
        std::sync::Arc::new(Unnormalised),
    ));
    let e = Smc::new(kernel(), model, &[], SmcConfig::default())
        .unwrap()
        .run()
        .err();
    assert!(
        matches!(e, Some(SmcError::InvalidProposal { ref name, .. }) if name == "unnormalised"),
        "{e:?}"
    );
}

#[test]
fn records_serialise_to_json() {
    let config = SmcConfig {
        particles: 6,
        record: true,
        record_text: true,
        max_tokens: 3,
        ..Default::default()
    };
    let result = Smc::new(kernel(), FeynmanKac::new(potential()), &[], config)
        .unwrap()
        .run()
        .unwrap();
    assert_eq!(result.records.len(), result.steps);
    let json = serde_json::to_string(&result.records).unwrap();
    let back: Vec<smc_steer::record::StepRecord> = serde_json::from_str(&json).unwrap();
    assert_eq!(back.len(), result.records.len());
    for (r, b) in result.records.iter().zip(&back) {
        assert_eq!(r.ancestors, b.ancestors);
        assert_eq!(r.log_weights.len(), 6);
        assert_eq!(b.texts.as_ref().map(Vec::len), Some(6));
        assert!(r.ess > 0.0 && r.ess <= 6.0 + 1e-9);
    }
    let total: f64 = result.records.iter().map(|r| r.log_z_increment).sum();
    assert!(
        (total - result.log_z).abs() < 1e-9,
        "increments add up to log Z"
    );
}

/// Twists by 1 at every step.
#[derive(Clone)]
struct ConstantTwist;
impl Program for ConstantTwist {
    fn step(&mut self, p: &mut Particle<'_>) -> Result<Flow> {
        p.observe(0)?;
        p.twist(1.0)?;
        Ok(Flow::Yield)
    }
}

#[test]
fn a_twist_is_removed_before_the_next_step() {
    let config = SmcConfig {
        particles: 2,
        ess_threshold: 0.0,
        max_tokens: 3,
        ..Default::default()
    };
    let k = kernel();
    let mut expected = 0.0;
    let mut history = vec![];
    let mut smc = Smc::new(k.clone(), ConstantTwist, &[], config).unwrap();
    while smc.step().unwrap() {
        expected += k.log_probs(&history)[0];
        history.push(0);
        for w in smc.log_weights() {
            assert!(
                (w - (expected + 1.0)).abs() < 1e-12,
                "one twist in the weight, not one per step"
            );
        }
        assert!(
            (smc.log_z() - expected).abs() < 1e-12,
            "log Z excludes the twist"
        );
    }
    let result = smc.finish();
    assert!((result.log_z - expected).abs() < 1e-12);
}

/// A kernel over word pieces: `a`, `b` continue a word, ` a`, ` b` start one.
fn word_kernel() -> smc_steer::testing::ToyKernel {
    let vocab = smc_steer::Vocabulary::from_strs(&["a", "b", " a", " b"]).unwrap();
    let table = [
        [0.1, 0.2, 0.3, 0.2, 0.2],
        [0.3, 0.1, 0.2, 0.2, 0.2],
        [0.25, 0.25, 0.1, 0.2, 0.2],
        [0.2, 0.3, 0.2, 0.1, 0.2],
    ];
    let first = [0.2, 0.1, 0.3, 0.3, 0.1];
    smc_steer::testing::ToyKernel::bigram(
        vocab,
        &first,
        &table.iter().map(|r| r.to_vec()).collect::<Vec<_>>(),
    )
    .unwrap()
}

#[test]
fn word_steps_keep_the_target_and_resample_at_word_boundaries() {
    use smc_steer::feynman_kac::StepUnit;
    let soft = || Soft::on_text("likes-b", |t: &str| 0.8 * t.matches('b').count() as f64);
    let exact = enumerate(&word_kernel(), &soft(), &[], 5, Truncation::Truncate).unwrap();
    for proposal in [
        smc_steer::ProposalKind::Bootstrap,
        smc_steer::ProposalKind::LocallyOptimal,
    ] {
        let config = SmcConfig {
            particles: 8,
            max_tokens: 5,
            record: true,
            record_text: true,
            ..SmcConfig::default()
        };
        let reps = run_replicates(master_seed(), 400, |seed| {
            let model = FeynmanKac::new(soft())
                .with_proposal(proposal.clone())
                .with_step_unit(StepUnit::Word);
            let r = Smc::new(
                word_kernel(),
                model,
                &[],
                SmcConfig {
                    seed,
                    ..config.clone()
                },
            )?
            .run()?;
            for rec in &r.records {
                assert!(rec.texts.is_some());
            }
            Ok(r)
        })
        .unwrap();
        assert_unbiased(&reps, exact.log_z, &format!("{proposal:?}"));
        // Fewer steps than tokens: several tokens per step.
        let steps: usize = reps.runs.iter().map(|r| r.steps).sum();
        let tokens: usize = reps
            .runs
            .iter()
            .map(|r| {
                r.particles
                    .iter()
                    .map(|p| p.tokens.len())
                    .max()
                    .unwrap_or(0)
            })
            .sum();
        assert!(steps < tokens, "{steps} steps for {tokens} tokens");
    }
}

#[test]
fn record_lineage_links_each_particle_to_its_parent() {
    for algorithm in [Algorithm::Standard, Algorithm::Steer { beam: 3 }] {
        let config = SmcConfig {
            particles: 6,
            max_tokens: 5,
            record: true,
            record_text: true,
            ess_threshold: 0.9,
            algorithm,
            seed: master_seed(),
            ..Default::default()
        };
        let result = Smc::new(kernel(), FeynmanKac::new(potential()), &[], config)
            .unwrap()
            .run()
            .unwrap();
        for pair in result.records.windows(2) {
            let (prev, cur) = (&pair[0], &pair[1]);
            let prev_texts = prev.texts.as_ref().unwrap();
            for (i, &parent) in cur.parents.iter().enumerate() {
                let child = &cur.texts.as_ref().unwrap()[i];
                assert!(
                    child.starts_with(prev_texts[parent].as_str()),
                    "{algorithm:?}: {child:?} from {:?}",
                    prev_texts[parent]
                );
            }
            if algorithm == Algorithm::Standard {
                assert_eq!(cur.parents, prev.ancestors);
            }
        }
    }
}

#[test]
fn a_borrowed_kernel_serves_several_runs_and_gets_its_sequences_back() {
    let mut k = kernel();
    for seed in 0..3 {
        let config = SmcConfig {
            particles: 8,
            max_tokens: 4,
            seed,
            ..Default::default()
        };
        let r = Smc::new(&mut k, FeynmanKac::new(potential()), &[], config)
            .unwrap()
            .run()
            .unwrap();
        assert_eq!(r.particles.len(), 8);
        assert_eq!(k.live_sequences(), 0);
    }
    // A run that fails part-way releases its sequences when dropped.
    let e = Smc::new(
        &mut k,
        FeynmanKac::new(NanPotential),
        &[],
        SmcConfig::default(),
    )
    .unwrap()
    .run();
    assert!(e.is_err());
    assert_eq!(k.live_sequences(), 0);
}
