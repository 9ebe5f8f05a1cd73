//! Ready-made constraints with fast next-token weights.

use crate::potential::{Potential, SeqView};
use crate::vocab::utf8_prefix;

/// Every word has at most `max` letters (a word is a run of alphabetic characters) — the
/// classic hard constraint of the SMC-steering literature.
///
/// Its [`Potential::log_weight_next`] walks each token's bytes once from the current
/// trailing word length, instead of re-checking the whole text per token.
///
/// # Example
/// ```
/// use smc_steer::constraints::MaxWordLetters;
/// use smc_steer::potential::{Potential, SeqView};
/// use smc_steer::Vocabulary;
/// let v = Vocabulary::from_strs(&["hello", " world", "s"]).unwrap();
/// let c = MaxWordLetters::new(5);
/// let view = SeqView { tokens: &[0], bytes: b"hello", vocab: &v };
/// let mut w = vec![0.0; 4];
/// c.log_weight_next(&view, &mut w);
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

    /// Letters in the trailing word of `text`.
    fn trailing(text: &str) -> usize {
        text.chars().rev().take_while(|c| c.is_alphabetic()).count()
    }

    /// Whether appending the characters of `text` to a trailing run of `run` letters keeps
    /// every word within the limit.
    fn extends(&self, mut run: usize, text: &str) -> bool {
        for c in text.chars() {
            if c.is_alphabetic() {
                run += 1;
                if run > self.max {
                    return false;
                }
            } else {
                run = 0;
            }
        }
        true
    }

    fn ok(&self, text: &str) -> bool {
        self.extends(0, text)
    }
}

impl Potential for MaxWordLetters {
    fn name(&self) -> &str {
        "max-word-letters"
    }

    fn prefix(&self, seq: &SeqView<'_>) -> f64 {
        if self.ok(seq.text()) {
            0.0
        } else {
            f64::NEG_INFINITY
        }
    }

    fn complete(&self, seq: &SeqView<'_>) -> f64 {
        if self.ok(&String::from_utf8_lossy(seq.bytes)) {
            0.0
        } else {
            f64::NEG_INFINITY
        }
    }

    fn log_weight_next(&self, seq: &SeqView<'_>, out: &mut [f64]) {
        let text = seq.text();
        if !self.ok(text) {
            out.fill(f64::NEG_INFINITY);
            return;
        }
        let run = Self::trailing(text);
        // Bytes after the last complete character (a multi-byte character split by tokens).
        let tail = &seq.bytes[text.len()..];
        let mut buf = Vec::with_capacity(tail.len() + 16);
        for (v, o) in out.iter_mut().enumerate().take(seq.vocab.len()) {
            let token = seq.vocab.bytes(v as u32);
            let ok = if tail.is_empty() {
                self.extends(run, utf8_prefix(token))
            } else {
                buf.clear();
                buf.extend_from_slice(tail);
                buf.extend_from_slice(token);
                self.extends(run, utf8_prefix(&buf))
            };
            *o = if ok { 0.0 } else { f64::NEG_INFINITY };
        }
        out[seq.vocab.len()] = self.complete(seq) - self.prefix(seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Vocabulary;

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
        for prefix in [
            vec![],
            vec![0],
            vec![0, 1],
            vec![1, 4],
            vec![0, 5],
            vec![3, 0, 5],
            vec![8],
        ] {
            let bytes = v.decode_bytes(&prefix);
            let view = SeqView {
                tokens: &prefix,
                bytes: &bytes,
                vocab: &v,
            };
            let (mut fast, mut reference) = (vec![0.0; v.dist_len()], vec![0.0; v.dist_len()]);
            c.log_weight_next(&view, &mut fast);
            slow.log_weight_next(&view, &mut reference);
            assert_eq!(fast, reference, "prefix {prefix:?}");
        }
    }
}
