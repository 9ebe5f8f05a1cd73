//! Vocabularies: tokens as byte strings, with one extra end-of-sequence symbol.
//!
//! Every next-token distribution in the crate has `len() + 1` entries: the ordinary tokens
//! `0..len()` and EOS at index [`Vocabulary::eos`]. A language model with several stop tokens
//! merges their mass into that one EOS entry.

use crate::error::{Result, SmcError};

/// A token id. Ordinary tokens are `0..vocab.len()`; EOS is `vocab.len()`.
pub type TokenId = u32;

/// The byte strings of a kernel's tokens; EOS is implicit and has no bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vocabulary {
    tokens: Vec<Vec<u8>>,
}

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
        Ok(Self { tokens })
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

/// The longest prefix of `bytes` that is valid UTF-8, as text.
///
/// A partial sequence may end inside a multi-byte character; potentials on prefixes see the
/// text up to the last complete character.
pub fn utf8_prefix(bytes: &[u8]) -> &str {
    match std::str::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => {
            let valid = e.valid_up_to();
            // Safe by construction: `valid_up_to` marks a UTF-8 boundary.
            std::str::from_utf8(&bytes[..valid]).unwrap_or("")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn utf8_prefix_drops_incomplete_tail() {
        let s = "é".as_bytes();
        assert_eq!(utf8_prefix(&[b'a', s[0]]), "a");
        assert_eq!(utf8_prefix(&[b'a', s[0], s[1]]), "aé");
    }
}
