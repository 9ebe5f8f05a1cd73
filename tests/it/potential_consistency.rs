//! Every built-in potential passes `testing::assert_potential_consistent`: prefix,
//! next-token and complete scores agree along every short sequence of a vocabulary with
//! awkward tokens (an empty token, a lone UTF-8 lead byte, a continuation byte, spaces).

use smc_steer::constraints::MaxWordLetters;
use smc_steer::grammar::charlevel::{ByteRecognizer, CharPotential};
use smc_steer::potential::{Hard, Product, Soft, TokenWeights, Trivial};
use smc_steer::testing::assert_potential_consistent;
use smc_steer::{TokenId, Vocabulary};

fn vocab() -> Vocabulary {
    Vocabulary::new(vec![
        b"ab".to_vec(),
        b" c".to_vec(),
        vec![0xC3],
        vec![0xA9],
        Vec::new(),
        b"e.".to_vec(),
    ])
    .unwrap()
}

/// Words of at most 2 ASCII letters; each `e` costs 0.5; ends only after a full stop.
struct Short;
impl ByteRecognizer for Short {
    type State = u8;
    fn name(&self) -> &str {
        "short"
    }
    fn initial(&self) -> u8 {
        0
    }
    fn step(&self, run: &u8, b: u8) -> Option<u8> {
        if !b.is_ascii_alphabetic() {
            return Some(if b == b'.' { 100 } else { 0 });
        }
        let run = if *run == 100 { 0 } else { *run };
        (run < 2).then_some(run + 1)
    }
    fn log_weight(&self, _: &u8) -> f64 {
        0.0
    }
    fn complete(&self, s: &u8) -> f64 {
        if *s == 100 {
            0.0
        } else {
            f64::NEG_INFINITY
        }
    }
}

const DEPTH: usize = 3;

#[test]
fn trivial_hard_and_soft() {
    let v = vocab();
    assert_potential_consistent(&Trivial, &v, DEPTH);
    assert_potential_consistent(
        &Hard::on_text("no-c", |t: &str| !t.contains('c')),
        &v,
        DEPTH,
    );
    assert_potential_consistent(
        &Hard::on_tokens("no-2-twice", |t: &[TokenId]| {
            t.windows(2).all(|w| w != [2, 2])
        }),
        &v,
        DEPTH,
    );
    assert_potential_consistent(
        &Hard::on_text("ends-in-dot", |t: &str| t.ends_with('.')).complete_only(),
        &v,
        DEPTH,
    );
    assert_potential_consistent(
        &Soft::on_text("likes-a", |t: &str| 0.3 * t.matches('a').count() as f64),
        &v,
        DEPTH,
    );
}

#[test]
fn token_weights_and_products() {
    let v = vocab();
    let w =
        TokenWeights::new("w", vec![0.5, -1.0, f64::NEG_INFINITY, 0.2, 0.0, 1.0, -0.3]).unwrap();
    assert_potential_consistent(&w, &v, DEPTH);
    let product = Product::new("p")
        .with(w)
        .with(MaxWordLetters::new(3))
        .with(Soft::on_text("likes-c", |t: &str| {
            0.7 * t.matches('c').count() as f64
        }));
    assert_potential_consistent(&product, &v, DEPTH);
}

#[test]
fn word_letters_and_byte_recognizers() {
    let v = vocab();
    for max in [1, 2, 3, 5] {
        assert_potential_consistent(&MaxWordLetters::new(max), &v, DEPTH);
    }
    assert_potential_consistent(&CharPotential::new(Short), &v, DEPTH);
}

#[cfg(feature = "grammar")]
#[test]
fn grammar_constraints() {
    use smc_steer::grammar::{Grammar, GrammarConstraint};
    let v = Vocabulary::from_strs(&["1", "2", "12", "-", "2-", "a"]).unwrap();
    for grammar in [
        Grammar::regex(r"(1|2)+-2?"),
        Grammar::lark(r#"start: "1" ("2" | "-")* "a"?"#),
    ] {
        let c = GrammarConstraint::new(&v, grammar).unwrap();
        assert_potential_consistent(&c, &v, DEPTH);
    }
}

/// A potential whose state machinery fails after `after` tokens (as a grammar matcher does
/// when llguidance hits a parser limit).
struct Breaks {
    after: usize,
}

impl smc_steer::potential::Potential for Breaks {
    type State = usize;
    fn name(&self) -> &str {
        "breaks"
    }
    fn start(&self, _: &Vocabulary) -> usize {
        0
    }
    fn advance(
        &self,
        n: &mut usize,
        _: &smc_steer::SeqView<'_>,
        _: TokenId,
    ) -> smc_steer::Result<()> {
        *n += 1;
        if *n > self.after {
            return Err(smc_steer::SmcError::Program(
                "the state machine broke".into(),
            ));
        }
        Ok(())
    }
    fn prefix(&self, _: &usize, _: &smc_steer::SeqView<'_>) -> f64 {
        0.0
    }
    fn complete(&self, _: &usize, _: &smc_steer::SeqView<'_>) -> f64 {
        0.0
    }
}

#[test]
fn a_failing_advance_is_an_error_of_the_run_for_every_sampler() {
    use smc_steer::{FeynmanKac, ProposalKind, Smc, SmcConfig, SmcError};
    use std::sync::Arc;
    let broken = Arc::new(Breaks { after: 1 });
    let models = [
        ("potential", FeynmanKac::new(Breaks { after: 1 })),
        (
            "mask",
            FeynmanKac::new(Trivial).with_proposal(ProposalKind::Mask(broken.clone())),
        ),
        (
            "awrs",
            FeynmanKac::new(Trivial).with_proposal(ProposalKind::Awrs(broken.clone())),
        ),
        (
            "locally-optimal",
            FeynmanKac::new(Breaks { after: 1 }).with_proposal(ProposalKind::LocallyOptimal),
        ),
    ];
    for (label, model) in models {
        // EOS has probability 0.05, so (with the default seed) particles reach the second
        // token, where advancing fails.
        let kernel = smc_steer::testing::ToyKernel::random_bigram(3, 0.05, 11).unwrap();
        let config = SmcConfig {
            particles: 8,
            max_tokens: 6,
            ..SmcConfig::default()
        };
        match Smc::new(kernel, model, &[], config).unwrap().run() {
            Err(SmcError::Program(m)) => assert!(m.contains("broke"), "{label}: {m}"),
            other => panic!("{label}: expected the potential's error, got {other:?}"),
        }
    }
}
