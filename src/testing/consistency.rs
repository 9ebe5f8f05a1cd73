//! Reusable checks for potentials (after genlm-control's potential consistency tests).
//!
//! [`assert_potential_consistent`] checks that a [`Potential`]'s prefix, next-token and
//! complete scores agree with each other along every sequence of a small vocabulary, and
//! that its state behaves like a value (cloning and advancing a copy leaves the original
//! alone). [`assert_same_potential`] checks that two implementations of one potential (a
//! fast one and a naive one, say) give the same scores. Both panic with the offending
//! sequence: they are test assertions.

use crate::core::vocab::{TokenId, Vocabulary};
use crate::potential::{replay, Potential};

/// Sequences visited at most (the checks are exhaustive up to `max_len` below this).
const MAX_SEQUENCES: usize = 200_000;

fn same(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

/// Every sequence over `vocab` of length at most `max_len`, the empty one first.
fn sequences(vocab: &Vocabulary, max_len: usize) -> Vec<Vec<TokenId>> {
    let mut out = vec![Vec::new()];
    let mut frontier = vec![Vec::new()];
    for _ in 0..max_len {
        let mut next = Vec::new();
        for s in &frontier {
            for t in 0..vocab.len() as TokenId {
                let mut x: Vec<TokenId> = s.clone();
                x.push(t);
                next.push(x);
            }
        }
        out.extend(next.iter().cloned());
        assert!(
            out.len() <= MAX_SEQUENCES,
            "too many sequences: lower max_len"
        );
        frontier = next;
    }
    out
}

/// Assert that `p` is consistent on every sequence of `vocab` up to `max_len` tokens:
///
/// * no score is NaN;
/// * `log_weight_next(x)[v] = prefix(x·v) − prefix(x)` for every token `v`, and
///   `complete(x) − prefix(x)` for EOS (all `-inf` when `prefix(x)` is `-inf`);
/// * `log_weight_of(x, v)` equals `log_weight_next(x)[v]`;
/// * advancing a clone of the state leaves the original state's scores unchanged.
///
/// # Panics
/// On the first inconsistency, naming the sequence and the token, and on an error from
/// the potential.
///
/// # Example
/// ```
/// use smc_steer::constraints::MaxWordLetters;
/// use smc_steer::testing::assert_potential_consistent;
/// use smc_steer::Vocabulary;
/// let v = Vocabulary::new(vec![b"ab".to_vec(), b" ".to_vec(), vec![0xC3], vec![0xA9]]).unwrap();
/// assert_potential_consistent(&MaxWordLetters::new(3), &v, 4);
/// ```
pub fn assert_potential_consistent<P: Potential + ?Sized>(
    p: &P,
    vocab: &Vocabulary,
    max_len: usize,
) {
    let name = p.name().to_string();
    let eos = vocab.eos() as usize;
    for x in sequences(vocab, max_len) {
        let bytes = vocab.decode_bytes(&x);
        let (state, view) = replay(p, vocab, &x, &bytes)
            .unwrap_or_else(|e| panic!("{name}: advancing through {x:?} failed: {e}"));
        let base = p.prefix(&state, &view);
        let end = p.complete(&state, &view);
        assert!(
            !base.is_nan() && !end.is_nan(),
            "{name}: NaN score after {x:?}"
        );
        let mut next = vec![0.0; vocab.dist_len()];
        p.log_weight_next(&state, &view, &mut next)
            .unwrap_or_else(|e| panic!("{name}: next-token weights after {x:?} failed: {e}"));
        for (v, w) in next.iter().enumerate() {
            assert!(
                !w.is_nan(),
                "{name}: NaN next-token weight after {x:?} for {v}"
            );
            let expected = if base == f64::NEG_INFINITY {
                f64::NEG_INFINITY
            } else if v == eos {
                end - base
            } else {
                let mut y = x.clone();
                y.push(v as TokenId);
                let y_bytes = vocab.decode_bytes(&y);
                let (s, yv) = replay(p, vocab, &y, &y_bytes)
                    .unwrap_or_else(|e| panic!("{name}: advancing through {y:?} failed: {e}"));
                p.prefix(&s, &yv) - base
            };
            assert!(
                same(*w, expected),
                "{name}: after {x:?}, log_weight_next[{v}] = {w} but prefix/complete give {expected}"
            );
            let alone = p
                .log_weight_of(&state, &view, v as TokenId)
                .unwrap_or_else(|e| panic!("{name}: log_weight_of({v}) after {x:?} failed: {e}"));
            assert!(
                same(alone, *w),
                "{name}: after {x:?}, log_weight_of({v}) = {alone} but log_weight_next gives {w}"
            );
        }
        // The state is a value: advancing a copy leaves it alone (a vocabulary always
        // has token 0).
        let mut copy = state.clone();
        p.advance(&mut copy, &view, 0)
            .unwrap_or_else(|e| panic!("{name}: advancing {x:?} by token 0 failed: {e}"));
        let again = p.prefix(&state, &view);
        assert!(
            same(again, base),
            "{name}: advancing a clone changed the state of {x:?}"
        );
    }
}

/// Assert that `a` and `b` give the same prefix, complete and next-token scores on every
/// sequence of `vocab` up to `max_len` tokens (a fast implementation against a naive one).
///
/// # Panics
/// On the first difference, naming the sequence.
pub fn assert_same_potential<A: Potential + ?Sized, B: Potential + ?Sized>(
    a: &A,
    b: &B,
    vocab: &Vocabulary,
    max_len: usize,
) {
    for x in sequences(vocab, max_len) {
        assert_same_scores(a, b, vocab, &x);
    }
}

/// Assert that `a` and `b` give the same prefix, complete and next-token scores after the
/// tokens `x` (for sequences too long to enumerate, such as real text).
///
/// # Panics
/// On a difference, naming the sequence.
pub fn assert_same_scores<A: Potential + ?Sized, B: Potential + ?Sized>(
    a: &A,
    b: &B,
    vocab: &Vocabulary,
    x: &[TokenId],
) {
    let bytes = vocab.decode_bytes(x);
    let (sa, view) = replay(a, vocab, x, &bytes)
        .unwrap_or_else(|e| panic!("{}: advancing through {x:?} failed: {e}", a.name()));
    let (sb, _) = replay(b, vocab, x, &bytes)
        .unwrap_or_else(|e| panic!("{}: advancing through {x:?} failed: {e}", b.name()));
    let pair = |what: &str, u: f64, w: f64| {
        assert!(
            same(u, w),
            "{what} after {x:?}: {} gives {u}, {} gives {w}",
            a.name(),
            b.name()
        )
    };
    pair("prefix", a.prefix(&sa, &view), b.prefix(&sb, &view));
    pair("complete", a.complete(&sa, &view), b.complete(&sb, &view));
    let (mut na, mut nb) = (vec![0.0; vocab.dist_len()], vec![0.0; vocab.dist_len()]);
    a.log_weight_next(&sa, &view, &mut na)
        .unwrap_or_else(|e| panic!("{}: next-token weights after {x:?} failed: {e}", a.name()));
    b.log_weight_next(&sb, &view, &mut nb)
        .unwrap_or_else(|e| panic!("{}: next-token weights after {x:?} failed: {e}", b.name()));
    for (u, w) in na.iter().zip(&nb) {
        pair("log_weight_next", *u, *w);
    }
}
