//! Vocabularies: tokens as byte strings, with one extra end-of-sequence symbol.
//!
//! Every next-token distribution in the crate has `len() + 1` entries: the ordinary tokens
//! `0..len()` and EOS at index [`Vocabulary::eos`]. A language model with several stop tokens
//! merges their mass into that one EOS entry.

use std::borrow::Cow;

use crate::core::error::{Result, SmcError};

/// A token id. Ordinary tokens are `0..vocab.len()`; EOS is `vocab.len()`.
pub type TokenId = u32;

/// The byte strings of a kernel's tokens; EOS is implicit and has no bytes.
#[derive(Debug, Clone)]
pub struct Vocabulary {
    tokens: Vec<Vec<u8>>,
    /// Distinct for every vocabulary built (clones share it): a vocabulary never changes
    /// once built, so potentials may cache what they derive from it under this key.
    id: u64,
}

/// Equal when the tokens are equal (whatever their [`Vocabulary::id`]).
impl PartialEq for Vocabulary {
    fn eq(&self, other: &Self) -> bool {
        self.tokens == other.tokens
    }
}

impl Eq for Vocabulary {}

impl Vocabulary {
    /// Build a vocabulary from token byte strings.
    ///
    /// # Errors
    /// [`SmcError::InvalidConfig`] if the vocabulary is empty or too large for a `u32` id.
    ///
    /// # Example
    /// ```
    /// use smc_steer::Vocabulary;
    /// let v = Vocabulary::new(vec![b"a".to_vec(), b"b".to_vec()]).unwrap();
    /// assert_eq!(v.eos(), 2);
    /// assert_eq!(v.decode(&[0, 1, 0]), "aba");
    /// ```
    pub fn new(tokens: Vec<Vec<u8>>) -> Result<Self> {
        if tokens.is_empty() {
            return Err(SmcError::InvalidConfig(
                "a vocabulary needs at least one token".into(),
            ));
        }
        if tokens.len() >= u32::MAX as usize {
            return Err(SmcError::InvalidConfig(
                "vocabulary too large for u32 token ids".into(),
            ));
        }
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Self { tokens, id })
    }

    /// A key for this vocabulary's contents, distinct for every vocabulary built and shared
    /// by its clones: what a potential derives from the tokens can be cached under it.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Build a vocabulary from strings (one token each).
    ///
    /// # Errors
    /// As [`Vocabulary::new`].
    pub fn from_strs(tokens: &[&str]) -> Result<Self> {
        Self::new(tokens.iter().map(|t| t.as_bytes().to_vec()).collect())
    }

    /// Number of ordinary tokens (EOS excluded).
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Always false: a vocabulary has at least one token.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The EOS id, equal to `len()`.
    pub fn eos(&self) -> TokenId {
        self.tokens.len() as TokenId
    }

    /// Length of every next-token distribution: `len() + 1`.
    pub fn dist_len(&self) -> usize {
        self.tokens.len() + 1
    }

    /// The bytes of a token; EOS and out-of-range ids have none.
    pub fn bytes(&self, token: TokenId) -> &[u8] {
        self.tokens
            .get(token as usize)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// All token byte strings, indexed by id.
    pub fn tokens(&self) -> &[Vec<u8>] {
        &self.tokens
    }

    /// Check that `token` is an ordinary token or EOS.
    ///
    /// # Errors
    /// [`SmcError::TokenOutOfRange`].
    pub fn check(&self, token: TokenId) -> Result<()> {
        if (token as usize) <= self.tokens.len() {
            Ok(())
        } else {
            Err(SmcError::TokenOutOfRange {
                token,
                vocab_size: self.tokens.len(),
            })
        }
    }

    /// Concatenated bytes of `tokens` (EOS contributes nothing).
    pub fn decode_bytes(&self, tokens: &[TokenId]) -> Vec<u8> {
        let mut out = Vec::new();
        for &t in tokens {
            out.extend_from_slice(self.bytes(t));
        }
        out
    }

    /// Decoded text of `tokens`, with invalid UTF-8 replaced by U+FFFD.
    pub fn decode(&self, tokens: &[TokenId]) -> String {
        String::from_utf8_lossy(&self.decode_bytes(tokens)).into_owned()
    }
}

/// Where an incomplete trailing UTF-8 character starts (`bytes.len()` when there is none).
///
/// A sequence being generated token by token may end inside a multi-byte character whose
/// remaining bytes are still to come; only such a *trailing, still completable* sequence
/// is held back. Invalid bytes anywhere else are never held back.
pub fn incomplete_tail_start(bytes: &[u8]) -> usize {
    // A UTF-8 character has at most 4 bytes, so an incomplete one starts in the last 3.
    let from = bytes.len().saturating_sub(3);
    for i in from..bytes.len() {
        if let Err(e) = std::str::from_utf8(&bytes[i..]) {
            if e.valid_up_to() == 0 && e.error_len().is_none() {
                return i;
            }
        }
    }
    bytes.len()
}

/// The text of an *unfinished* sequence, as every text potential sees it.
///
/// # The rule
/// Bytes are decoded as UTF-8 with each invalid sequence replaced by U+FFFD (as
/// [`String::from_utf8_lossy`] does), except that an incomplete character at the very end
/// (one that later bytes may still complete) is held back. Invalid bytes inside the text
/// therefore stay visible, so no constraint can be escaped by emitting a lone lead byte:
/// `[0xC3, b'c']` reads `"\u{FFFD}c"`, while `[b'a', 0xC3]` reads `"a"` until its next byte
/// arrives. A complete sequence (one that ended) holds nothing back: see
/// [`complete_text`]. Borrowed whenever the bytes need no replacement.
///
/// # Example
/// ```
/// use smc_steer::vocab::{complete_text, prefix_text};
/// assert_eq!(prefix_text(&[b'a', 0xC3]), "a");
/// assert_eq!(prefix_text(&[0xC3, b'c']), "\u{FFFD}c");
/// assert_eq!(complete_text(&[b'a', 0xC3]), "a\u{FFFD}");
/// ```
pub fn prefix_text(bytes: &[u8]) -> Cow<'_, str> {
    String::from_utf8_lossy(&bytes[..incomplete_tail_start(bytes)])
}

/// The text of a *complete* sequence: every invalid sequence, a trailing incomplete
/// character included, becomes U+FFFD. See [`prefix_text`] for the rule.
pub fn complete_text(bytes: &[u8]) -> Cow<'_, str> {
    String::from_utf8_lossy(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Clones share an id; every vocabulary built gets its own, and equality reads only the
    /// tokens.
    #[test]
    fn ids_follow_construction_not_contents() {
        let a = Vocabulary::from_strs(&["x", "yz"]).unwrap();
        let b = Vocabulary::from_strs(&["x", "yz"]).unwrap();
        assert_eq!(a.clone().id(), a.id());
        assert_ne!(a.id(), b.id());
        assert_eq!(a, b);
    }

    #[test]
    fn eos_is_last_and_has_no_bytes() {
        let v = Vocabulary::from_strs(&["x", "yz"]).unwrap();
        assert_eq!(v.eos(), 2);
        assert_eq!(v.bytes(2), b"");
        assert!(v.check(2).is_ok());
        assert!(matches!(v.check(3), Err(SmcError::TokenOutOfRange { .. })));
        assert!(Vocabulary::new(vec![]).is_err());
    }

    #[test]
    fn prefix_text_holds_back_only_an_incomplete_tail() {
        let e = "é".as_bytes();
        assert_eq!(prefix_text(&[b'a', e[0]]), "a");
        assert_eq!(prefix_text(&[b'a', e[0], e[1]]), "aé");
        // A lone lead byte followed by ASCII is invalid, not incomplete: it stays visible.
        assert_eq!(prefix_text(&[0xC3, b'c']), "\u{FFFD}c");
        assert_eq!(prefix_text(&[b'x', 0xC3, b'c', 0xE2, 0x82]), "x\u{FFFD}c");
        // A continuation byte with no lead can never be completed.
        assert_eq!(prefix_text(&[b'a', 0x80]), "a\u{FFFD}");
        // Incomplete 4-byte character at the end.
        let crab = "🦀".as_bytes();
        assert_eq!(prefix_text(&crab[..3]), "");
        assert_eq!(complete_text(&crab[..3]), "\u{FFFD}");
        assert_eq!(complete_text(&[b'a', 0xC3]), "a\u{FFFD}");
        assert_eq!(incomplete_tail_start(b"plain"), 5);
    }
}
