//! Character-level potentials: the trie walk gives exactly the naive per-token weights
//! (`Potential::log_weight_next`'s default, one prefix evaluation per token), on toy
//! vocabularies and on SmolLM2's vocabulary.

use crate::common::{assert_unbiased, seeded};
use smc_steer::grammar::charlevel::{ByteRecognizer, CharPotential, TokenTrie};
use smc_steer::potential::{SeqPotential, SeqView};
use smc_steer::replicate::run_replicates;
use smc_steer::testing::enumerate;
use smc_steer::testing::ToyKernel;
use smc_steer::testing::{assert_potential_consistent, assert_same_potential};
use smc_steer::{FeynmanKac, ProposalKind, Smc, SmcConfig, Truncation, Vocabulary};

/// Every word has at most `max` ASCII letters; each letter `e` costs 0.3 nats; outputs may
/// only end after a full stop or with no text.
struct Words {
    max: u8,
}

impl ByteRecognizer for Words {
    /// (letters in the current word, letters `e` so far, last byte was '.')
    type State = (u8, u32, bool);
    fn name(&self) -> &str {
        "words"
    }
    fn initial(&self) -> Self::State {
        (0, 0, true)
    }
    fn step(&self, &(run, es, _): &Self::State, b: u8) -> Option<Self::State> {
        let es = es + u32::from(b == b'e');
        if b.is_ascii_alphabetic() {
            (run < self.max).then_some((run + 1, es, false))
        } else {
            Some((0, es, b == b'.'))
        }
    }
    fn log_weight(&self, s: &Self::State) -> f64 {
        -0.3 * s.1 as f64
    }
    fn complete(&self, s: &Self::State) -> f64 {
        if s.2 {
            self.log_weight(s)
        } else {
            f64::NEG_INFINITY
        }
    }
}

/// The same potential, evaluated naively on whole texts (no trie, no recognizer).
struct NaiveWords {
    max: usize,
}

impl SeqPotential for NaiveWords {
    fn name(&self) -> &str {
        "naive-words"
    }
    fn prefix(&self, s: &SeqView<'_>) -> f64 {
        let ok = s
            .bytes
            .split(|b| !b.is_ascii_alphabetic())
            .all(|w| w.len() <= self.max);
        if ok {
            -0.3 * s.bytes.iter().filter(|b| **b == b'e').count() as f64
        } else {
            f64::NEG_INFINITY
        }
    }
    fn complete(&self, s: &SeqView<'_>) -> f64 {
        if s.bytes.is_empty() || s.bytes.last() == Some(&b'.') {
            self.prefix(s)
        } else {
            f64::NEG_INFINITY
        }
    }
}

fn toy_vocab() -> Vocabulary {
    let mut t: Vec<Vec<u8>> = [
        "the", "th", "t", "e", "ee", " ", " the", ".", "e.", "", "abcd", "x", "the",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    t.push(vec![0xC3]);
    t.push("é".as_bytes().to_vec());
    Vocabulary::new(t).unwrap()
}

#[test]
fn trie_walk_equals_naive_weights_on_a_toy_vocabulary() {
    // Every sequence of up to 3 tokens of a 15-token vocabulary (with an empty token, a
    // lone lead byte and a 2-byte character), for 4 limits.
    let v = toy_vocab();
    for max in [1u8, 2, 3, 4] {
        let fast = CharPotential::new(Words { max });
        let slow = NaiveWords { max: max as usize };
        assert_same_potential(&fast, &slow, &v, 3);
        assert_potential_consistent(&fast, &v, 2);
    }
}

#[test]
fn trie_has_one_node_per_distinct_prefix() {
    let v = Vocabulary::from_strs(&["ab", "a", "abc", "b", "ab"]).unwrap();
    let t = TokenTrie::new(&v);
    assert_eq!(t.n_nodes(), 4); // a, ab, abc, b
    assert_eq!(t.n_tokens(), 5);
}

#[test]
fn one_token_at_a_time_agrees_with_the_trie_walk() {
    // What AWRS asks (`log_weight_of`, one token read from the recognizer state) against
    // the trie walk, through the consistency check.
    let v = toy_vocab();
    assert_potential_consistent(&CharPotential::new(Words { max: 3 }), &v, 3);
}

#[test]
fn locally_optimal_smc_with_a_char_potential_is_unbiased() {
    let kernel = || ToyKernel::random_bigram(4, 0.25, 77).unwrap();
    struct NoCd;
    impl ByteRecognizer for NoCd {
        type State = u8;
        fn name(&self) -> &str {
            "no-cd"
        }
        fn initial(&self) -> u8 {
            0
        }
        fn step(&self, prev: &u8, b: u8) -> Option<u8> {
            (!(*prev == b'c' && b == b'd')).then_some(b)
        }
        fn log_weight(&self, s: &u8) -> f64 {
            if *s == b'a' {
                0.4
            } else {
                0.0
            }
        }
    }
    let pot = std::sync::Arc::new(CharPotential::new(NoCd));
    let exact = enumerate(&kernel(), pot.as_ref(), &[], 4, Truncation::Truncate).unwrap();
    let runs = run_replicates(seeded(99), 300, |seed| {
        let model = FeynmanKac::from_arc(pot.clone()).with_proposal(ProposalKind::LocallyOptimal);
        let config = SmcConfig {
            particles: 6,
            max_tokens: 4,
            seed,
            ..SmcConfig::default()
        };
        Smc::new(kernel(), model, &[], config)?.run()
    })
    .unwrap();
    assert_unbiased(&runs, exact.log_z, "char-level");
}

#[cfg(feature = "lm")]
#[test]
fn trie_walk_equals_naive_weights_on_the_smollm2_vocabulary() {
    use smc_steer::lm::{GgufFile, Tokenizer};
    use smc_steer::testing::assert_same_scores;
    let Some(path) = crate::common::real_model() else {
        return;
    };
    let gguf = GgufFile::open(&path).unwrap();
    let tok = Tokenizer::from_gguf(&gguf).unwrap();
    let v = Vocabulary::new(tok.token_bytes().to_vec()).unwrap();
    let fast = CharPotential::for_vocab(Words { max: 5 }, &v);
    let slow = NaiveWords { max: 5 };
    for text in [
        "",
        "The",
        "The sentence ends here.",
        "Some",
        "caf\u{e9} ",
        "Hello",
    ] {
        let ids = tok.encode(text).unwrap();
        assert_same_scores(&fast, &slow, &v, &ids);
    }
    // A partial UTF-8 character at the end of the prefix.
    let e_acute = tok.encode("é").unwrap();
    assert_same_scores(&fast, &slow, &v, &e_acute[..1]);
}
