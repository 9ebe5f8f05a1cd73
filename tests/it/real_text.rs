//! The defects that real text exposes (issue 9): invalid UTF-8 inside the text, EOS forced
//! at the token limit under a constraint, word steps on non-ASCII text and very long
//! words, non-normalised kernels and pooled replicate expectations. Each test failed on
//! the code before the fix.

use std::sync::Arc;

use crate::common::*;
use smc_steer::constraints::MaxWordLetters;
use smc_steer::feynman_kac::{StepUnit, WORD_STEP_MAX_TOKENS};
use smc_steer::potential::{DynPotential, Hard, Product, SeqView, Soft, Trivial};
use smc_steer::replicate::run_replicates;
use smc_steer::testing::enumerate;
use smc_steer::testing::ToyKernel;
use smc_steer::{FeynmanKac, ProposalKind, Smc, SmcConfig, SmcError, Truncation, Vocabulary};

/// `a`, `c` and a lone UTF-8 lead byte, as byte-level BPE vocabularies have.
fn lead_byte_vocab() -> Vocabulary {
    Vocabulary::new(vec![b"a".to_vec(), b"c".to_vec(), vec![0xC3]]).unwrap()
}

fn lead_byte_kernel() -> ToyKernel {
    ToyKernel::unigram(lead_byte_vocab(), &[0.3, 0.3, 0.3, 0.1]).unwrap()
}

fn view<'a>(v: &'a Vocabulary, tokens: &'a [u32], bytes: &'a [u8]) -> SeqView<'a> {
    SeqView {
        tokens,
        bytes,
        vocab: v,
    }
}

#[test]
fn an_invalid_byte_cannot_hide_text_from_a_potential() {
    let v = lead_byte_vocab();
    let no_c = Hard::on_text("no-c", |t: &str| !t.contains('c'));
    let (prefix, complete, _) = scores(&no_c, &v, &[2, 1]);
    assert_eq!(complete, f64::NEG_INFINITY);
    assert_eq!(prefix, f64::NEG_INFINITY);
    // Held back only while it may still be completed: [a, 0xC3] reads "a" as a prefix and
    // "a\u{FFFD}" once complete.
    let bytes = v.decode_bytes(&[0, 2]);
    let s = view(&v, &[0, 2], &bytes);
    assert_eq!(s.text(), "a");
    assert_eq!(s.complete_text(), "a\u{FFFD}");
    // Next-token weights follow the same rule: after [0xC3], `c` is forbidden.
    let (_, _, w) = scores(&no_c, &v, &[2]);
    assert_eq!(w[1], f64::NEG_INFINITY);

    // Exact target and SMC (both truncation policies): no mass on any text with a `c`.
    for truncation in [Truncation::Truncate, Truncation::ForceEos] {
        let exact = enumerate(&lead_byte_kernel(), &no_c, &[], 4, truncation).unwrap();
        assert!(exact
            .outcomes
            .iter()
            .all(|o| !v.decode_bytes(&o.tokens).contains(&b'c')));
        for proposal in [
            ProposalKind::Bootstrap,
            ProposalKind::Mask(Arc::new(no_c.clone())),
        ] {
            let config = SmcConfig {
                particles: 64,
                max_tokens: 4,
                truncation,
                seed: master_seed(),
                ..SmcConfig::default()
            };
            let model = FeynmanKac::new(no_c.clone()).with_proposal(proposal);
            let r = Smc::new(lead_byte_kernel(), model, &[], config)
                .unwrap()
                .run()
                .unwrap();
            for d in r.posterior() {
                assert!(!d.bytes.contains(&b'c'), "{:?} has mass", d.bytes);
            }
        }
    }
}

#[test]
fn word_limits_see_through_invalid_bytes_and_glued_symbols() {
    // "domin" + 0xC3 + "te": one 8-letter word, not "domin" and "te".
    let v = Vocabulary::new(vec![
        b"domin".to_vec(),
        vec![0xC3],
        b"te".to_vec(),
        b" ".to_vec(),
    ])
    .unwrap();
    let c = MaxWordLetters::new(5);
    let (prefix, complete, _) = scores(&c, &v, &[0, 1, 2]);
    assert_eq!(prefix, f64::NEG_INFINITY);
    assert_eq!(complete, f64::NEG_INFINITY);
    assert_eq!(scores(&c, &v, &[2, 1, 3, 0]).0, 0.0);
    let (_, _, w) = scores(&c, &v, &[0, 1]);
    // After "domin\u{C3}": `te` makes 8 letters, a space ends the word (6 letters with the
    // invalid byte: already too long once it is known to be invalid), EOS makes it 6.
    assert_eq!(w[2], f64::NEG_INFINITY);
    assert_eq!(w[3], f64::NEG_INFINITY);
    assert_eq!(w[v.eos() as usize], f64::NEG_INFINITY);
}

/// SMC on text with invalid bytes in the middle matches the exact target, and no surviving
/// particle breaks the word limit.
#[test]
fn smc_with_invalid_bytes_in_the_middle_is_unbiased() {
    let v = Vocabulary::new(vec![b"ab".to_vec(), vec![0xC3], b" ".to_vec(), vec![0xA9]]).unwrap();
    let kernel = || ToyKernel::unigram(v.clone(), &[0.3, 0.25, 0.2, 0.1, 0.15]).unwrap();
    let c = MaxWordLetters::new(3);
    for truncation in [Truncation::Truncate, Truncation::ForceEos] {
        let exact = enumerate(&kernel(), &c, &[], 4, truncation).unwrap();
        let reps = run_replicates(master_seed(), 300, |seed| {
            let config = SmcConfig {
                particles: 8,
                max_tokens: 4,
                truncation,
                seed,
                ..SmcConfig::default()
            };
            Smc::new(kernel(), FeynmanKac::new(c), &[], config)?.run()
        })
        .unwrap();
        assert_unbiased(
            &reps,
            exact.log_z,
            &format!("invalid bytes ({truncation:?})"),
        );
        for r in &reps.runs {
            for p in r
                .particles
                .iter()
                .filter(|p| p.log_weight > f64::NEG_INFINITY)
            {
                let text = if p.eos {
                    smc_steer::vocab::complete_text(&p.bytes)
                } else {
                    smc_steer::vocab::prefix_text(&p.bytes)
                };
                assert!(
                    text.split_whitespace().all(|w| w
                        .chars()
                        .filter(|c| c.is_alphabetic() || *c == '\u{FFFD}')
                        .count()
                        <= 3),
                    "{text:?}"
                );
            }
        }
    }
}

/// A unigram kernel over {a, b}.
fn ab_kernel() -> ToyKernel {
    ToyKernel::unigram(
        Vocabulary::from_strs(&["a", "b"]).unwrap(),
        &[0.5, 0.3, 0.2],
    )
    .unwrap()
}

/// A mask whose complete score requires the text to end in `b`.
fn ends_in_b() -> Hard {
    Hard::on_text("ends-in-b", |t: &str| t.ends_with('b')).complete_only()
}

#[test]
fn force_eos_asks_the_proposals_constraint() {
    let exact = enumerate(&ab_kernel(), &ends_in_b(), &[], 2, Truncation::ForceEos).unwrap();
    let constraint: Arc<dyn DynPotential> = Arc::new(ends_in_b());
    for (label, proposal) in [
        ("mask", ProposalKind::Mask(Arc::new(ends_in_b()))),
        ("awrs", ProposalKind::Awrs(constraint)),
    ] {
        let reps = run_replicates(master_seed(), 1000, |seed| {
            let config = SmcConfig {
                particles: 8,
                max_tokens: 2,
                truncation: Truncation::ForceEos,
                seed,
                ..SmcConfig::default()
            };
            let model = FeynmanKac::new(Trivial).with_proposal(proposal.clone());
            Smc::new(ab_kernel(), model, &[], config)?.run()
        })
        .unwrap();
        for r in &reps.runs {
            for p in r
                .particles
                .iter()
                .filter(|p| p.log_weight > f64::NEG_INFINITY)
            {
                assert!(p.text.ends_with('b'), "{label}: {:?} survived", p.text);
            }
        }
        assert_unbiased(&reps, exact.log_z, label);
    }
}

/// A separate mask and potential under `ForceEos`: the target is `p · mask · φ`.
#[test]
fn force_eos_with_a_separate_mask_and_potential() {
    let likes_a = Soft::on_text("likes-a", |t: &str| 0.6 * t.matches('a').count() as f64);
    let target = Product::new("target")
        .with(likes_a.clone())
        .with(ends_in_b());
    let exact = enumerate(&ab_kernel(), &target, &[], 3, Truncation::ForceEos).unwrap();
    let reps = run_replicates(master_seed(), 600, |seed| {
        let config = SmcConfig {
            particles: 8,
            max_tokens: 3,
            truncation: Truncation::ForceEos,
            seed,
            ..SmcConfig::default()
        };
        let model = FeynmanKac::new(likes_a.clone())
            .with_proposal(ProposalKind::Mask(Arc::new(ends_in_b())));
        Smc::new(ab_kernel(), model, &[], config)?.run()
    })
    .unwrap();
    assert_unbiased(&reps, exact.log_z, "mask + soft potential, force-eos");
}

/// Han characters and an ideographic full stop: each is a word of its own (UAX #29), so
/// word steps resample after every token instead of never. (No spaces: two spaces in a
/// row are one segment.)
fn cjk_kernel() -> ToyKernel {
    let vocab = Vocabulary::from_strs(&["日", "本", "語", "。"]).unwrap();
    ToyKernel::unigram(vocab, &[0.25, 0.2, 0.2, 0.2, 0.15]).unwrap()
}

#[test]
fn word_steps_find_boundaries_in_cjk_text() {
    let soft = Soft::on_text("likes-nihon", |t: &str| {
        0.5 * t.matches("日本").count() as f64
    });
    let exact = enumerate(&cjk_kernel(), &soft, &[], 4, Truncation::Truncate).unwrap();
    let reps = run_replicates(master_seed(), 300, |seed| {
        let config = SmcConfig {
            particles: 8,
            max_tokens: 4,
            seed,
            ..SmcConfig::default()
        };
        let model = FeynmanKac::new(soft.clone()).with_step_unit(StepUnit::Word);
        Smc::new(cjk_kernel(), model, &[], config)?.run()
    })
    .unwrap();
    assert_unbiased(&reps, exact.log_z, "cjk word steps");
    // Every Han character ends a word: a step per token.
    for r in &reps.runs {
        let longest = r
            .particles
            .iter()
            .map(|p| p.tokens.len())
            .max()
            .unwrap_or(0);
        assert!(r.steps >= longest, "{} steps for {longest} tokens", r.steps);
    }
}

#[test]
fn a_word_longer_than_the_cap_ends_the_step_instead_of_failing() {
    // One letter token and a rare EOS: words of ~100 tokens.
    let vocab = Vocabulary::from_strs(&["a"]).unwrap();
    let kernel = || ToyKernel::unigram(vocab.clone(), &[0.999, 0.001]).unwrap();
    let max_tokens = 5 * WORD_STEP_MAX_TOKENS;
    let config = SmcConfig {
        particles: 4,
        max_tokens,
        seed: master_seed(),
        ..SmcConfig::default()
    };
    let model = FeynmanKac::new(Trivial).with_step_unit(StepUnit::Word);
    let r = Smc::new(kernel(), model, &[], config)
        .unwrap()
        .run()
        .unwrap();
    assert_eq!(r.log_z, 0.0);
    assert!(
        r.steps >= max_tokens / WORD_STEP_MAX_TOKENS,
        "{} steps",
        r.steps
    );
}

/// A kernel over word pieces with a bigram table.
fn pieces_kernel() -> ToyKernel {
    let vocab = Vocabulary::from_strs(&["ab", "c", " a", " bc"]).unwrap();
    let table = [
        [0.1, 0.2, 0.3, 0.2, 0.2],
        [0.3, 0.1, 0.2, 0.2, 0.2],
        [0.25, 0.25, 0.1, 0.2, 0.2],
        [0.2, 0.3, 0.2, 0.1, 0.2],
    ];
    let first = [0.2, 0.1, 0.3, 0.3, 0.1];
    ToyKernel::bigram(
        vocab,
        &first,
        &table.iter().map(|r| r.to_vec()).collect::<Vec<_>>(),
    )
    .unwrap()
}

#[test]
fn word_steps_with_mask_and_awrs_proposals_are_unbiased() {
    let limit = MaxWordLetters::new(3);
    let constraint: Arc<dyn DynPotential> = Arc::new(limit);
    for truncation in [Truncation::Truncate, Truncation::ForceEos] {
        let exact = enumerate(&pieces_kernel(), &limit, &[], 4, truncation).unwrap();
        for (label, proposal) in [
            ("mask", ProposalKind::Mask(Arc::new(limit))),
            ("awrs", ProposalKind::Awrs(constraint.clone())),
        ] {
            let reps = run_replicates(master_seed(), 300, |seed| {
                let config = SmcConfig {
                    particles: 8,
                    max_tokens: 4,
                    truncation,
                    seed,
                    ..SmcConfig::default()
                };
                let model = FeynmanKac::new(Trivial)
                    .with_proposal(proposal.clone())
                    .with_step_unit(StepUnit::Word);
                Smc::new(pieces_kernel(), model, &[], config)?.run()
            })
            .unwrap();
            assert_unbiased(
                &reps,
                exact.log_z,
                &format!("{label} word steps ({truncation:?})"),
            );
        }
    }
}

#[test]
fn a_kernel_that_is_not_normalised_is_a_typed_error() {
    let vocab = Vocabulary::from_strs(&["a", "b"]).unwrap();
    let half = ToyKernel::from_fn(vocab, |_| vec![0.3f64.ln(), 0.3f64.ln(), 0.2f64.ln()]);
    let err = Smc::new(half, FeynmanKac::new(Trivial), &[], SmcConfig::default()).unwrap_err();
    match &err {
        SmcError::UnnormalisedDistribution { kernel, log_mass } => {
            assert!(kernel.contains("ToyKernel"), "{kernel}");
            assert!((log_mass - 0.8f64.ln()).abs() < 1e-12);
        }
        other => panic!("expected UnnormalisedDistribution, got {other:?}"),
    }
    assert!(err.to_string().contains("not normalised"));
}

/// Replicate expectations pool runs by their Ẑ: with 2 particles per run each run's
/// self-normalised estimate is biased, and averaging them with equal weights (the old
/// rule) misses the exact posterior mean; pooling by Ẑ is consistent.
#[test]
fn replicate_expectations_are_pooled_by_z() {
    let kernel = || {
        ToyKernel::unigram(
            Vocabulary::from_strs(&["a", "b"]).unwrap(),
            &[0.45, 0.45, 0.1],
        )
        .unwrap()
    };
    let likes_b = Soft::on_text("likes-b", |t: &str| 1.5 * t.matches('b').count() as f64);
    let exact = enumerate(&kernel(), &likes_b, &[], 3, Truncation::Truncate).unwrap();
    let f = |tokens: &[u32]| tokens.iter().filter(|t| **t == 1).count() as f64;
    let truth = exact.expectation(|t, _| f(t));
    let reps = run_replicates(master_seed(), 4000, |seed| {
        let config = SmcConfig {
            particles: 2,
            max_tokens: 3,
            ess_threshold: 0.0,
            seed,
            ..SmcConfig::default()
        };
        Smc::new(kernel(), FeynmanKac::new(likes_b.clone()), &[], config)?.run()
    })
    .unwrap();
    let e = reps.expectation(|c| f(&c.tokens));
    assert!(
        (e.mean - truth).abs() <= 4.0 * e.se,
        "pooled {} ± {} vs exact {truth}",
        e.mean,
        e.se
    );
    // The pooled posterior and the pooled expectation agree.
    let pooled: f64 = reps
        .pooled_posterior()
        .iter()
        .map(|d| d.probability * f(&d.tokens))
        .sum();
    assert!((pooled - e.mean).abs() < 1e-9);
}
