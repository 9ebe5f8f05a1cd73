//! Grammar constraints on toy kernels: the masked-proposal SMC target equals the exact
//! constrained posterior (enumeration), matchers fork independently, bad grammars are
//! typed errors.
#![cfg(feature = "grammar")]

use crate::common::{assert_unbiased, seeded};
use smc_steer::grammar::{Grammar, GrammarConstraint, GrammarError};
use smc_steer::potential::{replay, Hard, Potential, Product, SeqPotential, SeqView};
use smc_steer::replicate::run_replicates;
use smc_steer::testing::enumerate;
use smc_steer::testing::ToyKernel;
use smc_steer::{FeynmanKac, ProposalKind, Smc, SmcConfig, Truncation, Vocabulary};

const MASTER_SEED: u64 = 0x5EED_6A11;

/// Tokens that overlap, so most strings have several tokenizations.
fn vocab() -> Vocabulary {
    Vocabulary::from_strs(&["1", "2", "12", "-", "2-", "a"]).unwrap()
}

/// A bigram kernel over `vocab()` with fixed pseudo-random rows (EOS included).
fn kernel() -> ToyKernel {
    let v = vocab();
    let n = v.dist_len();
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut row = || {
        let mut r: Vec<f64> = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                0.2 + ((state >> 33) as f64 / (1u64 << 31) as f64)
            })
            .collect();
        let s: f64 = r.iter().sum();
        r.iter_mut().for_each(|x| *x /= s);
        r
    };
    let initial = row();
    let transition: Vec<Vec<f64>> = (0..v.len()).map(|_| row()).collect();
    ToyKernel::bigram(v, &initial, &transition).unwrap()
}

fn date_like() -> GrammarConstraint {
    GrammarConstraint::new(&vocab(), Grammar::regex(r"(1|2)+-2?")).unwrap()
}

fn regex_ok(text: &str, complete: bool) -> bool {
    // The language (1|2)+-2? by hand: digits, one dash, at most one 2.
    let (digits, rest) = match text.find('-') {
        Some(i) => (&text[..i], Some(&text[i + 1..])),
        None => (text, None),
    };
    let digits_ok = digits.chars().all(|c| c == '1' || c == '2');
    match rest {
        None => digits_ok && !complete,
        Some(r) => digits_ok && !digits.is_empty() && (r.is_empty() || r == "2"),
    }
}

/// Every sequence over `n` tokens of length at most `max` (the empty one included).
fn all_sequences(n: usize, max: usize) -> Vec<Vec<u32>> {
    let mut out = vec![Vec::new()];
    let mut frontier = vec![Vec::new()];
    for _ in 0..max {
        let mut next = Vec::new();
        for s in &frontier {
            for t in 0..n as u32 {
                let mut x: Vec<u32> = s.clone();
                x.push(t);
                next.push(x);
            }
        }
        out.extend(next.iter().cloned());
        frontier = next;
    }
    out
}

#[test]
fn potential_matches_the_language() {
    let v = vocab();
    let c = date_like();
    // Every token sequence up to length 4, against the hand-written matcher.
    for tokens in &all_sequences(v.len(), 4) {
        let bytes = v.decode_bytes(tokens);
        let text = String::from_utf8(bytes.clone()).unwrap();
        let (matcher, view) = replay(&c, &v, tokens, &bytes).unwrap();
        assert_eq!(
            c.prefix(&matcher, &view) == 0.0,
            regex_ok(&text, false) || regex_ok(&text, true),
            "prefix {text:?}"
        );
        assert_eq!(
            c.complete(&matcher, &view) == 0.0,
            regex_ok(&text, true),
            "complete {text:?}"
        );
    }
}

#[test]
fn mask_equals_naive_next_token_weights() {
    let v = vocab();
    let c = date_like();
    let naive = Hard::on_view("naive", move |s: &SeqView<'_>| {
        let text = std::str::from_utf8(s.bytes).unwrap_or("\u{fffd}");
        regex_ok(text, false) || regex_ok(text, true)
    });
    // Every token sequence up to length 3, dead prefixes included (every entry -inf).
    for tokens in all_sequences(v.len(), 3) {
        let bytes = v.decode_bytes(&tokens);
        let (matcher, view) = replay(&c, &v, &tokens, &bytes).unwrap();
        let mut fast = vec![0.0; v.dist_len()];
        c.log_weight_next(&matcher, &view, &mut fast).unwrap();
        let mut slow = vec![0.0; v.dist_len()];
        SeqPotential::log_weight_next(&naive, &view, &mut slow);
        // The naive check's EOS entry: the text is complete.
        let text = String::from_utf8(bytes.clone()).unwrap();
        let base_ok = regex_ok(&text, false) || regex_ok(&text, true);
        slow[v.len()] = if base_ok && regex_ok(&text, true) {
            0.0
        } else {
            f64::NEG_INFINITY
        };
        assert_eq!(fast, slow, "prefix {text:?}");
    }
}

/// Generation under `c`: the grammar's mask is the proposal, no other potential.
fn masked(c: GrammarConstraint) -> FeynmanKac {
    FeynmanKac::new(smc_steer::potential::Trivial)
        .with_proposal(ProposalKind::Mask(std::sync::Arc::new(c)))
}

/// Mean Ẑ/Z over replicates within 4 standard errors, and every surviving particle in the
/// language.
fn check_unbiased(truncation: Truncation, particles: usize, reps: usize) {
    let max_tokens = 5;
    let c = date_like();
    let exact = enumerate(&kernel(), &c, &[], max_tokens, truncation).unwrap();
    assert!(exact.log_z.is_finite());
    let config = SmcConfig {
        particles,
        max_tokens,
        truncation,
        ..SmcConfig::default()
    };
    let runs = run_replicates(seeded(MASTER_SEED), reps, |seed| {
        Smc::new(
            kernel(),
            masked(c.clone()),
            &[],
            SmcConfig {
                seed,
                ..config.clone()
            },
        )?
        .run()
    })
    .unwrap();
    for r in &runs.runs {
        for p in r
            .particles
            .iter()
            .filter(|p| p.log_weight > f64::NEG_INFINITY)
        {
            let complete = p.eos;
            assert!(
                regex_ok(&p.text, complete) || (!complete && regex_ok(&p.text, true)),
                "particle {:?} (eos {complete}) is outside the language",
                p.text
            );
        }
    }
    assert_unbiased(&runs, exact.log_z, &format!("{truncation:?}"));
    // The posterior probability of ending with EOS, pooled over the runs.
    let p_eos_exact = exact.expectation(|_, eos| if eos { 1.0 } else { 0.0 });
    let est = runs.expectation(|p| if p.eos { 1.0 } else { 0.0 });
    assert!(
        (est.mean - p_eos_exact).abs() <= 4.0 * est.se + 0.02,
        "P(eos) {} ± {} vs exact {p_eos_exact}",
        est.mean,
        est.se
    );
}

#[test]
fn masked_smc_is_unbiased_truncated() {
    check_unbiased(Truncation::Truncate, 8, 400);
}

#[test]
fn masked_smc_is_unbiased_with_forced_eos() {
    check_unbiased(Truncation::ForceEos, 8, 400);
}

#[test]
fn constraint_as_mask_proposal_in_feynman_kac_is_unbiased() {
    let max_tokens = 4;
    let c = std::sync::Arc::new(date_like());
    let exact = enumerate(&kernel(), c.as_ref(), &[], max_tokens, Truncation::Truncate).unwrap();
    let runs = run_replicates(seeded(MASTER_SEED) ^ 1, 200, |seed| {
        let model = FeynmanKac::from_arc(c.clone()).with_proposal(ProposalKind::Mask(c.clone()));
        let config = SmcConfig {
            particles: 6,
            max_tokens,
            seed,
            ..SmcConfig::default()
        };
        Smc::new(kernel(), model, &[], config)?.run()
    })
    .unwrap();
    assert_unbiased(&runs, exact.log_z, "grammar-as-mask");
}

#[test]
fn grammar_times_a_soft_potential_is_unbiased() {
    let max_tokens = 4;
    let c = date_like();
    let soft = smc_steer::potential::Soft::on_text("likes-2", |t: &str| {
        0.5 * t.matches('2').count() as f64
    });
    let target = Product::new("both").with(c.clone()).with(soft.clone());
    let exact = enumerate(&kernel(), &target, &[], max_tokens, Truncation::Truncate).unwrap();
    let runs = run_replicates(seeded(MASTER_SEED) ^ 2, 300, |seed| {
        let config = SmcConfig {
            particles: 8,
            max_tokens,
            seed,
            ..SmcConfig::default()
        };
        let model = FeynmanKac::new(soft.clone())
            .with_proposal(ProposalKind::Mask(std::sync::Arc::new(c.clone())));
        Smc::new(kernel(), model, &[], config)?.run()
    })
    .unwrap();
    assert_unbiased(&runs, exact.log_z, "grammar-times-soft");
}

#[test]
fn forked_matchers_advance_independently() {
    for shared in [false, true] {
        let c = date_like().with_shared_lexer_cache(shared);
        let mut a = c.matcher();
        assert!(a.consume(0)); // "1"
        let mut b = a.clone();
        assert!(b.consume(3)); // "1-"
        assert!(a.consume(2)); // "112"
        let eos = vocab().eos();
        // a is still before the dash, b after it.
        let ma = a.mask().unwrap();
        let mb = b.mask().unwrap();
        assert!(ma.allows(3) && !ma.allows(eos));
        assert!(!mb.allows(3) && mb.allows(eos) && mb.allows(1) && !mb.allows(0));
        assert!(b.consume(1)); // "1-2": complete, nothing more
        let mb = b.mask().unwrap();
        assert_eq!(mb.count(), 1);
        assert!(mb.allows(eos));
        assert!(!b.consume(1));
        assert!(b.is_dead());
        assert!(a.consume(4)); // "1122-" — a unaffected by b's death
        assert!(a.accepts_eos());
    }
}

#[test]
fn invalid_grammars_are_typed_errors() {
    let v = vocab();
    match GrammarConstraint::new(&v, Grammar::regex("(1|2")) {
        Err(GrammarError::InvalidRegex { pattern, message }) => {
            assert_eq!(pattern, "(1|2");
            assert!(!message.is_empty());
        }
        other => panic!("expected InvalidRegex, got {other:?}"),
    }
    match Grammar::regex("[z-a]").validate() {
        Err(GrammarError::InvalidRegex { .. }) => {}
        other => panic!("expected InvalidRegex, got {other:?}"),
    }
    match GrammarConstraint::new(&v, Grammar::lark("start: foo\n")) {
        Err(GrammarError::InvalidLark { message }) => assert!(message.contains("foo"), "{message}"),
        other => panic!("expected InvalidLark, got {other:?}"),
    }
    match Grammar::json_schema_str("{\"type\": ") {
        Err(GrammarError::InvalidSchema { .. }) => {}
        other => panic!("expected InvalidSchema, got {other:?}"),
    }
    match Grammar::json_schema(serde_json::json!({"type": "frobnicate"})).validate() {
        Err(GrammarError::InvalidSchema { message }) => {
            assert!(message.contains("frobnicate"), "{message}")
        }
        other => panic!("expected InvalidSchema, got {other:?}"),
    }
    match Grammar::json_schema(serde_json::json!(3)).validate() {
        Err(GrammarError::InvalidSchema { .. }) => {}
        other => panic!("expected InvalidSchema, got {other:?}"),
    }
    // The errors convert to the engine's error type with the message kept.
    let e: smc_steer::SmcError = Grammar::regex("(").validate().unwrap_err().into();
    assert!(e.to_string().contains("invalid regex"), "{e}");
}

#[test]
fn lark_and_json_schema_constraints_work_on_a_toy_vocabulary() {
    let v = Vocabulary::from_strs(&["{", "}", "\"", "a", ":", "1", "2", "\"a\":", ","]).unwrap();
    let schema = serde_json::json!({
        "type": "object",
        "properties": {"a": {"type": "integer"}},
        "required": ["a"],
        "additionalProperties": false
    });
    let c = GrammarConstraint::new(&v, Grammar::json_schema(schema)).unwrap();
    let mut m = c.matcher();
    assert!(m.consume_all(&[0, 7, 5, 6])); // {"a":12
    assert!(!m.accepts_eos());
    assert!(m.consume(1)); // }
    assert!(m.accepts_eos());
    let mut bad = c.matcher();
    assert!(bad.consume(0));
    assert!(!bad.consume(5)); // {1 is not an object
                              // The same through `matcher_after`: alive where the prefix is, dead past a bad token.
    let after = c.matcher_after(&[0, 7, 5, 6, 1]).unwrap();
    assert!(!after.is_dead() && after.accepts_eos());
    assert!(c.matcher_after(&[0, 5, 1]).unwrap().is_dead());
    let lark =
        GrammarConstraint::new(&v, Grammar::lark("start: \"a\"+ (\",\" \"a\"+)*\n")).unwrap();
    let mut m = lark.matcher();
    assert!(m.consume_all(&[3, 3, 8, 3]));
    assert!(m.accepts_eos());
    assert!(!m.consume(5));
}

#[test]
fn a_constraint_no_token_can_satisfy_kills_every_particle() {
    // The vocabulary has no `z`: the mask is empty from the start.
    let c = GrammarConstraint::new(&vocab(), Grammar::regex("z+")).unwrap();
    let config = SmcConfig {
        particles: 4,
        max_tokens: 3,
        ..SmcConfig::default()
    };
    let r = Smc::new(kernel(), masked(c), &[], config)
        .unwrap()
        .run()
        .unwrap();
    assert!(r.all_dead);
    assert_eq!(r.log_z, f64::NEG_INFINITY);
}

#[test]
fn vocabulary_mismatch_is_reported() {
    let other = Vocabulary::from_strs(&["1", "2"]).unwrap();
    let c = GrammarConstraint::new(&other, Grammar::regex("1+")).unwrap();
    let err = Smc::new(kernel(), masked(c), &[], SmcConfig::default()).unwrap_err();
    assert!(
        matches!(err, smc_steer::SmcError::VocabularyMismatch { .. }),
        "{err}"
    );
}
