//! Ready-made constraints with fast next-token weights.

use std::sync::{Arc, Mutex};

use crate::core::vocab::{complete_text, incomplete_tail_start, prefix_text, TokenId, Vocabulary};
use crate::potential::{Potential, SeqView};

/// Every word has at most `max` letters — the classic hard constraint of the SMC-steering
/// literature.
///
/// # The rule
/// A *word* is a maximal run of non-whitespace characters, and its *letters* are its
/// alphabetic characters plus every U+FFFD (an invalid byte, which may hide a letter).
/// Nothing but whitespace splits a word, so neither an invalid byte nor a symbol glued to
/// letters lets a long word pass as two short ones: `domin\u{FFFD}te` has 8 letters and
/// `wait—what` 8, while `don't`, `hello,` and `2024` have 4, 5 and 0. Text is read with the
/// crate's one UTF-8 rule ([`crate::core::vocab::prefix_text`] for prefixes,
/// [`crate::core::vocab::complete_text`] at EOS).
///
/// Its state is the trailing word's letter count (O(1) per token). Each token's letter
/// profile (letters before its first whitespace, the longest word after it) is read once
/// per vocabulary (keyed by [`Vocabulary::id`], shared by every particle), so
/// [`Potential::log_weight_next`] compares two numbers per token; only after a held-back
/// incomplete character does it walk the joined bytes.
///
/// # Example
/// ```
/// use smc_steer::constraints::MaxWordLetters;
/// use smc_steer::potential::{Potential, SeqView};
/// use smc_steer::Vocabulary;
/// let v = Vocabulary::from_strs(&["hello", " world", "s"]).unwrap();
/// let c = MaxWordLetters::new(5);
/// let (state, view) = smc_steer::potential::replay(&c, &v, &[0], b"hello").unwrap();
/// let mut w = vec![0.0; 4];
/// c.log_weight_next(&state, &view, &mut w).unwrap();
/// assert_eq!(w, vec![f64::NEG_INFINITY, 0.0, f64::NEG_INFINITY, 0.0]);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxWordLetters {
    max: usize,
}

impl MaxWordLetters {
    /// At most `max` letters per word.
    pub fn new(max: usize) -> Self {
        Self { max }
    }

    /// Whether `c` counts as a letter of its word.
    fn is_letter(c: char) -> bool {
        c.is_alphabetic() || c == char::REPLACEMENT_CHARACTER
    }

    /// The trailing word's letters after appending the characters of `text` to a trailing
    /// word of `run` letters; `None` when a word goes over the limit.
    fn walk(&self, mut run: usize, text: &str) -> Option<usize> {
        for c in text.chars() {
            if c.is_whitespace() {
                run = 0;
            } else if Self::is_letter(c) {
                run += 1;
                if run > self.max {
                    return None;
                }
            }
        }
        Some(run)
    }

    /// Whether appending `text` to a trailing word of `run` letters keeps every word within
    /// the limit.
    fn extends(&self, run: usize, text: &str) -> bool {
        self.walk(run, text).is_some()
    }

    /// Whether the live `state` may be followed by a token of bytes `token` (`buf` is
    /// scratch space for joining it to the held-back tail).
    fn allows(&self, state: &WordState, token: &[u8], buf: &mut Vec<u8>) -> bool {
        if state.tail.is_empty() {
            self.extends(state.run, &prefix_text(token))
        } else {
            buf.clear();
            buf.extend_from_slice(&state.tail);
            buf.extend_from_slice(token);
            self.extends(state.run, &prefix_text(buf))
        }
    }

    /// The letter profile of every token read alone (see [`TokenLetters`]).
    fn profiles(vocab: &Vocabulary) -> Vec<TokenLetters> {
        let cap = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        vocab
            .tokens()
            .iter()
            .map(|t| {
                let (mut lead, mut rest, mut run, mut split) = (0usize, 0usize, 0usize, false);
                for c in prefix_text(t).chars() {
                    if c.is_whitespace() {
                        split = true;
                        run = 0;
                    } else if Self::is_letter(c) {
                        run += 1;
                        if split {
                            rest = rest.max(run);
                        } else {
                            lead = run;
                        }
                    }
                }
                TokenLetters {
                    lead: cap(lead),
                    rest: cap(rest),
                }
            })
            .collect()
    }

    /// Whether a token of profile `p` may follow a trailing word of `run` letters (the
    /// same answer as [`Self::allows`] with no held-back bytes).
    fn allows_profile(&self, run: usize, p: TokenLetters) -> bool {
        self.limits(run).is_some_and(|l| l.allow(p))
    }

    /// The bounds a token's profile must keep after a trailing word of `run` letters;
    /// `None` when that word is already over the limit (nothing may follow).
    fn limits(&self, run: usize) -> Option<ProfileLimits> {
        let room = self.max.checked_sub(run)?;
        Some(ProfileLimits {
            lead: u32::try_from(room).unwrap_or(u32::MAX),
            rest: u32::try_from(self.max).unwrap_or(u32::MAX),
        })
    }

    #[cfg(test)]
    fn ok(&self, text: &str) -> bool {
        self.extends(0, text)
    }

    fn value(ok: bool) -> f64 {
        if ok {
            0.0
        } else {
            f64::NEG_INFINITY
        }
    }
}

/// The profiles of `vocab`'s tokens, built once per vocabulary and shared: every particle
/// starts its own state, and a table per particle would cost O(vocabulary) time and memory
/// each (a few most recent vocabularies are kept).
fn shared_profiles(vocab: &Vocabulary) -> Arc<Vec<TokenLetters>> {
    const KEEP: usize = 4;
    static CACHE: Mutex<Vec<(u64, Arc<Vec<TokenLetters>>)>> = Mutex::new(Vec::new());
    // A poisoned lock only means another thread panicked while holding it; the cache is a
    // list of finished tables, valid either way.
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, p)) = cache.iter().find(|(id, _)| *id == vocab.id()) {
        return Arc::clone(p);
    }
    // Built under the lock: particles starting together wait for one table.
    let p = Arc::new(MaxWordLetters::profiles(vocab));
    if cache.len() == KEEP {
        cache.remove(0);
    }
    cache.push((vocab.id(), Arc::clone(&p)));
    p
}

/// Letters of a token read alone: before its first whitespace (`lead`, all of them when it
/// has none) and in its longest word after it (`rest`, 0 when it has none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TokenLetters {
    lead: u32,
    rest: u32,
}

/// What a token's [`TokenLetters`] may hold after a given trailing word: `run + lead ≤ max`
/// is `lead ≤ max − run`, and `rest ≤ max`.
#[derive(Debug, Clone, Copy)]
struct ProfileLimits {
    lead: u32,
    rest: u32,
}

impl ProfileLimits {
    /// Two comparisons of u32 joined without a branch, so that a loop over the vocabulary
    /// vectorises (it runs for every particle at every step).
    #[inline]
    fn allow(self, p: TokenLetters) -> bool {
        (p.lead <= self.lead) & (p.rest <= self.rest)
    }
}

/// The state of [`MaxWordLetters`]: O(1) per token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WordState {
    /// Every token's letter profile, shared by all particles (and runs) on a vocabulary.
    profiles: Arc<Vec<TokenLetters>>,
    /// Whether every word so far is within the limit.
    ok: bool,
    /// Letters in the trailing word of the text read so far.
    run: usize,
    /// Bytes held back: an incomplete character at the end (at most 3 bytes).
    tail: Vec<u8>,
}

impl WordState {
    /// The token profiles, when they decide the next token alone: nothing is held back
    /// (else the token's bytes join the held-back ones) and they are `vocab`'s.
    fn profiles_for(&self, vocab: &Vocabulary) -> Option<&[TokenLetters]> {
        (self.tail.is_empty() && self.profiles.len() == vocab.len())
            .then_some(self.profiles.as_slice())
    }
}

impl Potential for MaxWordLetters {
    type State = WordState;

    fn name(&self) -> &str {
        "max-word-letters"
    }

    fn start(&self, vocab: &Vocabulary) -> WordState {
        WordState {
            profiles: shared_profiles(vocab),
            ok: true,
            run: 0,
            tail: Vec::new(),
        }
    }

    fn advance(
        &self,
        state: &mut WordState,
        seq: &SeqView<'_>,
        token: TokenId,
    ) -> crate::Result<()> {
        if !state.ok {
            return Ok(());
        }
        let mut buf = std::mem::take(&mut state.tail);
        buf.extend_from_slice(seq.vocab.bytes(token));
        // Everything before an incomplete trailing character reads the same whatever comes
        // next, so it is settled now; the rest waits for the next token.
        let cut = incomplete_tail_start(&buf);
        match self.walk(state.run, &String::from_utf8_lossy(&buf[..cut])) {
            Some(run) => state.run = run,
            None => state.ok = false,
        }
        state.tail = buf.split_off(cut);
        Ok(())
    }

    fn prefix(&self, state: &WordState, _: &SeqView<'_>) -> f64 {
        Self::value(state.ok)
    }

    fn complete(&self, state: &WordState, _: &SeqView<'_>) -> f64 {
        // A finished sequence holds nothing back: the tail reads as U+FFFD.
        Self::value(state.ok && self.extends(state.run, &complete_text(&state.tail)))
    }

    fn log_weight_next(
        &self,
        state: &WordState,
        seq: &SeqView<'_>,
        out: &mut [f64],
    ) -> crate::Result<()> {
        if !state.ok {
            out.fill(f64::NEG_INFINITY);
            return Ok(());
        }
        let n = seq.vocab.len();
        if let Some(profiles) = state.profiles_for(seq.vocab) {
            let Some(limits) = self.limits(state.run) else {
                out.fill(f64::NEG_INFINITY);
                return Ok(());
            };
            for (o, &p) in out.iter_mut().zip(profiles) {
                *o = Self::value(limits.allow(p));
            }
        } else {
            let mut buf = Vec::with_capacity(state.tail.len() + 16);
            for (v, o) in out.iter_mut().enumerate().take(n) {
                *o = Self::value(self.allows(state, seq.vocab.bytes(v as TokenId), &mut buf));
            }
        }
        if let Some(o) = out.get_mut(seq.vocab.len()) {
            *o = self.complete(state, seq);
        }
        Ok(())
    }

    /// One token from the state alone (the view is not read, so nothing is copied).
    fn log_weight_of(
        &self,
        state: &WordState,
        seq: &SeqView<'_>,
        token: TokenId,
    ) -> crate::Result<f64> {
        if !state.ok {
            return Ok(f64::NEG_INFINITY);
        }
        if token == seq.vocab.eos() {
            return Ok(self.complete(state, seq));
        }
        if let Some(&p) = state
            .profiles_for(seq.vocab)
            .and_then(|ps| ps.get(token as usize))
        {
            return Ok(Self::value(self.allows_profile(state.run, p)));
        }
        let mut buf = Vec::new();
        Ok(Self::value(self.allows(
            state,
            seq.vocab.bytes(token),
            &mut buf,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_next_weights_match_the_default() {
        let toks = [
            "ab",
            "cde",
            "f ",
            " ",
            "é",
            "\u{c3}",
            "\u{a9}xyz",
            "123",
            "abcdef",
            "",
        ];
        let v = Vocabulary::new(
            toks.iter()
                .map(|t| {
                    if *t == "\u{c3}" {
                        vec![0xC3]
                    } else if *t == "\u{a9}xyz" {
                        vec![0xA9, b'x', b'y', b'z']
                    } else {
                        t.as_bytes().to_vec()
                    }
                })
                .collect(),
        )
        .unwrap();
        let c = MaxWordLetters::new(5);
        let slow = crate::potential::Hard::on_text("slow", |t: &str| MaxWordLetters::new(5).ok(t));
        // The same check through the slow path's complete score too.
        let check_complete = |prefix: &[u32]| {
            let bytes = v.decode_bytes(prefix);
            let (state, view) = crate::potential::replay(&c, &v, prefix, &bytes).unwrap();
            assert_eq!(
                c.complete(&state, &view),
                crate::potential::SeqPotential::complete(&slow, &view),
                "complete {prefix:?}"
            );
        };
        check_complete(&[0, 5]);
        check_complete(&[2, 5, 0]);
        for prefix in [
            vec![],
            vec![0],
            vec![0, 1],
            vec![1, 4],
            vec![0, 5],
            vec![3, 0, 5],
            vec![8],
            vec![5, 0],
            vec![0, 5, 6],
            vec![5, 3, 1],
            vec![4, 5],
        ] {
            let bytes = v.decode_bytes(&prefix);
            let (state, view) = crate::potential::replay(&c, &v, &prefix, &bytes).unwrap();
            let (mut fast, mut reference) = (vec![0.0; v.dist_len()], vec![0.0; v.dist_len()]);
            c.log_weight_next(&state, &view, &mut fast).unwrap();
            crate::potential::SeqPotential::log_weight_next(&slow, &view, &mut reference);
            assert_eq!(fast, reference, "prefix {prefix:?}");
        }
    }
}

#[cfg(test)]
mod profiles {
    use super::*;

    /// The per-token profile gives the walk's answer for every trailing-word length, on
    /// tokens with several words, leading/trailing/inner whitespace, non-ASCII letters,
    /// symbols, invalid bytes and an incomplete last character.
    #[test]
    fn profiles_agree_with_the_walk() {
        let mut toks: Vec<Vec<u8>> = [
            "abc",
            " abc",
            "abc ",
            "ab cdefg",
            "a b c",
            "  ",
            "",
            "é\u{e8}x",
            "x—y",
            "12ab",
            "ab\tcdefgh ij",
            "abcdef",
            " abcdef",
            "abcdef ",
            "wait\u{2014}wh",
            "\n\nab",
        ]
        .iter()
        .map(|t| t.as_bytes().to_vec())
        .collect();
        toks.extend([
            vec![0xC3, b'a', b'b'],
            vec![b'a', 0xC3],
            vec![0xFF, 0xFE, b' ', b'x'],
        ]);
        let v = Vocabulary::new(toks).unwrap();
        for max in [0, 1, 3, 5] {
            let c = MaxWordLetters::new(max);
            let profiles = MaxWordLetters::profiles(&v);
            assert_eq!(*shared_profiles(&v), profiles);
            assert!(Arc::ptr_eq(
                &shared_profiles(&v),
                &shared_profiles(&v.clone())
            ));
            let mut buf = Vec::new();
            for run in 0..=max {
                let state = WordState {
                    profiles: Arc::new(profiles.clone()),
                    ok: true,
                    run,
                    tail: Vec::new(),
                };
                for (t, &p) in profiles.iter().enumerate() {
                    assert_eq!(
                        c.allows_profile(run, p),
                        c.allows(&state, v.bytes(t as TokenId), &mut buf),
                        "max {max}, run {run}, token {:?}",
                        v.bytes(t as TokenId)
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod word_rule {
    use super::*;

    #[test]
    fn nothing_but_whitespace_splits_a_word() {
        let c = MaxWordLetters::new(5);
        assert!(!c.ok("domin\u{FFFD}te"));
        assert!(!c.ok("wait\u{2014}what"));
        assert!(!c.ok("ab1cdef"));
        assert!(c.ok("don't hello, 2024 x\u{215B}F"));
        assert!(c.ok("short words only"));
        assert!(!c.ok("a\u{FFFD}\u{FFFD}\u{FFFD}\u{FFFD}\u{FFFD}"));
    }
}
