//! A toy kernel whose every sequence can be enumerated: the test bed for exactness.
//!
//! [`ToyKernel`] computes next-token distributions with a plain Rust function of the whole
//! history (prompt included). Constructors cover the usual cases: unigram, bigram tables
//! and random bigrams with a few tokens.

use std::collections::HashMap;
use std::sync::Arc;

use rand::SeedableRng;
use rand_distr::{Distribution, Gamma};

use crate::core::error::{Result, SmcError};
use crate::core::kernel::{Extend, Extension, Kernel, SeqId};
use crate::core::vocab::{TokenId, Vocabulary};

type DistFn = dyn Fn(&[TokenId]) -> Vec<f64> + Send + Sync;

/// A kernel defined by a function from history to next-token log-probabilities.
///
/// It also counts its batched calls, so tests can check that the engine makes one
/// [`Kernel::extend`] call per step.
#[derive(Clone)]
pub struct ToyKernel {
    vocab: Vocabulary,
    dist: Arc<DistFn>,
    seqs: HashMap<u64, Vec<TokenId>>,
    next_id: u64,
    /// Number of [`Kernel::extend`] calls made so far.
    pub extend_calls: usize,
    /// Number of tokens appended through [`Kernel::extend`] so far.
    pub tokens_processed: usize,
}

impl std::fmt::Debug for ToyKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToyKernel")
            .field("vocab", &self.vocab)
            .field("live_sequences", &self.seqs.len())
            .finish()
    }
}

fn check_probs(row: &[f64], dist_len: usize) -> Result<Vec<f64>> {
    if row.len() != dist_len {
        return Err(SmcError::InvalidDistribution(format!(
            "expected {dist_len} probabilities (vocabulary + EOS), got {}",
            row.len()
        )));
    }
    let total: f64 = row.iter().sum();
    if row.iter().any(|p| p.is_nan() || *p < 0.0) || (total - 1.0).abs() > 1e-9 {
        return Err(SmcError::InvalidDistribution(format!(
            "probabilities must be non-negative and sum to 1 (sum = {total})"
        )));
    }
    Ok(row.iter().map(|p| p.ln()).collect())
}

impl ToyKernel {
    /// A kernel from any function of the history (prompt included) returning
    /// log-probabilities over `vocab.len() + 1` symbols.
    pub fn from_fn(
        vocab: Vocabulary,
        dist: impl Fn(&[TokenId]) -> Vec<f64> + Send + Sync + 'static,
    ) -> Self {
        Self {
            vocab,
            dist: Arc::new(dist),
            seqs: HashMap::new(),
            next_id: 0,
            extend_calls: 0,
            tokens_processed: 0,
        }
    }

    /// A unigram kernel: every step draws from `probs` (vocabulary + EOS, summing to 1).
    ///
    /// # Errors
    /// [`SmcError::InvalidDistribution`] if `probs` has the wrong length or does not sum to 1.
    ///
    /// # Example
    /// ```
    /// use smc_steer::{testing::ToyKernel, Vocabulary};
    /// let k = ToyKernel::unigram(Vocabulary::from_strs(&["a", "b"]).unwrap(), &[0.5, 0.3, 0.2]);
    /// assert!(k.is_ok());
    /// ```
    pub fn unigram(vocab: Vocabulary, probs: &[f64]) -> Result<Self> {
        let row = check_probs(probs, vocab.dist_len())?;
        Ok(Self::from_fn(vocab, move |_| row.clone()))
    }

    /// A bigram kernel: `initial` is used after an empty history, `transition[t]` after
    /// token `t`. Rows are probabilities over vocabulary + EOS.
    ///
    /// # Errors
    /// [`SmcError::InvalidDistribution`] for a malformed row or a wrong number of rows.
    pub fn bigram(vocab: Vocabulary, initial: &[f64], transition: &[Vec<f64>]) -> Result<Self> {
        let n = vocab.dist_len();
        let initial = check_probs(initial, n)?;
        if transition.len() != vocab.len() {
            return Err(SmcError::InvalidDistribution(format!(
                "a bigram table needs {} rows, got {}",
                vocab.len(),
                transition.len()
            )));
        }
        let rows = transition
            .iter()
            .map(|r| check_probs(r, n))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::from_fn(vocab, move |hist| match hist.last() {
            None => initial.clone(),
            Some(&t) => rows[t as usize].clone(),
        }))
    }

    /// A random bigram kernel over `tokens` single-letter tokens (`a`, `b`, ...), rows drawn
    /// from a symmetric Dirichlet(1) and then mixed so that EOS has probability `eos_prob`.
    ///
    /// # Errors
    /// [`SmcError::InvalidConfig`] for `tokens` outside `1..=26` or `eos_prob` outside (0, 1).
    pub fn random_bigram(tokens: usize, eos_prob: f64, seed: u64) -> Result<Self> {
        if !(1..=26).contains(&tokens) {
            return Err(SmcError::InvalidConfig(format!(
                "tokens must be in 1..=26, got {tokens}"
            )));
        }
        if !(eos_prob > 0.0 && eos_prob < 1.0) {
            return Err(SmcError::InvalidConfig(format!(
                "eos_prob must be in (0, 1), got {eos_prob}"
            )));
        }
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(seed);
        let gamma = Gamma::new(1.0, 1.0).map_err(|e| SmcError::InvalidConfig(e.to_string()))?;
        let mut row = || {
            let g: Vec<f64> = (0..tokens).map(|_| gamma.sample(&mut rng) + 1e-3).collect();
            let s: f64 = g.iter().sum();
            let mut r: Vec<f64> = g.iter().map(|x| x / s * (1.0 - eos_prob)).collect();
            r.push(eos_prob);
            r
        };
        let initial = row();
        let transition: Vec<Vec<f64>> = (0..tokens).map(|_| row()).collect();
        let names: Vec<String> = (0..tokens)
            .map(|i| ((b'a' + i as u8) as char).to_string())
            .collect();
        let vocab = Vocabulary::new(names.into_iter().map(String::into_bytes).collect())?;
        Self::bigram(vocab, &initial, &transition)
    }

    /// The next-token log-probabilities after `history` (for enumeration and tests).
    pub fn log_probs(&self, history: &[TokenId]) -> Vec<f64> {
        (self.dist)(history)
    }

    /// The vocabulary (also available through [`Kernel::vocab`]).
    pub fn vocab_ref(&self) -> &Vocabulary {
        &self.vocab
    }

    /// Number of sequences currently held.
    pub fn live_sequences(&self) -> usize {
        self.seqs.len()
    }

    fn checked_dist(&self, history: &[TokenId]) -> Result<Vec<f64>> {
        let d = (self.dist)(history);
        if d.len() != self.vocab.dist_len() || d.iter().any(|x| x.is_nan()) {
            return Err(SmcError::InvalidDistribution(format!(
                "toy kernel function returned {} entries (expected {}) or NaN",
                d.len(),
                self.vocab.dist_len()
            )));
        }
        Ok(d)
    }

    fn get(&self, seq: SeqId) -> Result<&Vec<TokenId>> {
        self.seqs
            .get(&seq.0)
            .ok_or_else(|| SmcError::Kernel(format!("unknown sequence {seq:?}")))
    }
}

impl Kernel for ToyKernel {
    fn vocab(&self) -> &Vocabulary {
        &self.vocab
    }

    fn start(&mut self, prompt: &[TokenId]) -> Result<(SeqId, Vec<f64>)> {
        for &t in prompt {
            if t >= self.vocab.eos() {
                return Err(SmcError::TokenOutOfRange {
                    token: t,
                    vocab_size: self.vocab.len(),
                });
            }
        }
        let dist = self.checked_dist(prompt)?;
        let id = self.next_id;
        self.next_id += 1;
        self.seqs.insert(id, prompt.to_vec());
        Ok((SeqId(id), dist))
    }

    fn fork(&mut self, seq: SeqId) -> Result<SeqId> {
        let tokens = self.get(seq)?.clone();
        let id = self.next_id;
        self.next_id += 1;
        self.seqs.insert(id, tokens);
        Ok(SeqId(id))
    }

    fn release(&mut self, seq: SeqId) {
        self.seqs.remove(&seq.0);
    }

    fn extend(&mut self, batch: &[Extend<'_>]) -> Result<Vec<Extension>> {
        self.extend_calls += 1;
        let mut out = Vec::with_capacity(batch.len());
        for req in batch {
            for &t in req.tokens {
                if t >= self.vocab.eos() {
                    return Err(SmcError::TokenOutOfRange {
                        token: t,
                        vocab_size: self.vocab.len(),
                    });
                }
            }
            let mut hist = self.get(req.seq)?.clone();
            let mut inner = Vec::with_capacity(req.tokens.len().saturating_sub(1));
            for (i, &t) in req.tokens.iter().enumerate() {
                if i > 0 {
                    inner.push(self.checked_dist(&hist)?[t as usize]);
                }
                hist.push(t);
            }
            let next = self.checked_dist(&hist)?;
            self.tokens_processed += req.tokens.len();
            self.seqs.insert(req.seq.0, hist);
            out.push(Extension {
                inner_log_probs: inner,
                next_log_probs: next,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::logspace::log_sum_exp;

    #[test]
    fn random_bigram_rows_are_normalised() {
        let k = ToyKernel::random_bigram(3, 0.25, 7).unwrap();
        for h in [vec![], vec![0], vec![1, 2]] {
            let d = k.log_probs(&h);
            assert_eq!(d.len(), 4);
            assert!(log_sum_exp(&d).abs() < 1e-12);
            assert!((d[3] - 0.25f64.ln()).abs() < 1e-12);
        }
    }

    #[test]
    fn extend_reports_inner_scores() {
        let mut k = ToyKernel::random_bigram(3, 0.2, 1).unwrap();
        let (s, _) = k.start(&[]).unwrap();
        let ext = k
            .extend(&[Extend {
                seq: s,
                tokens: &[0, 1, 2],
            }])
            .unwrap();
        assert_eq!(
            ext[0].inner_log_probs,
            vec![k.log_probs(&[0])[1], k.log_probs(&[0, 1])[2]]
        );
        assert_eq!(ext[0].next_log_probs, k.log_probs(&[0, 1, 2]));
        assert!(k
            .extend(&[Extend {
                seq: s,
                tokens: &[3]
            }])
            .is_err());
        assert!(k.fork(SeqId(99)).is_err());
    }

    #[test]
    fn malformed_tables_are_rejected() {
        let v = Vocabulary::from_strs(&["a"]).unwrap();
        assert!(ToyKernel::unigram(v.clone(), &[0.5, 0.6]).is_err());
        assert!(ToyKernel::unigram(v.clone(), &[1.0]).is_err());
        assert!(ToyKernel::bigram(v, &[0.5, 0.5], &[]).is_err());
    }
}
