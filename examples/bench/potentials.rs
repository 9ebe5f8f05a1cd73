//! Cost of one potential step (advance the state by a token, then read the prefix score)
//! at 16 and at 512 generated tokens, for every built-in potential, on SmolLM2's
//! vocabulary and real text. A stateful potential costs the same at any length (ratio near
//! 1); a text predicate (`Hard::on_text`) re-reads the text and grows with it.
//!
//! `SMC_BENCH_ONLY=potentials cargo run --release --example bench -- --json`

use std::time::Instant;

use smc_steer::constraints::MaxWordLetters;
use smc_steer::grammar::charlevel::{ByteRecognizer, CharPotential};
use smc_steer::potential::{replay, Hard, Potential, Product, SeqView, TokenWeights};
use smc_steer::{TokenId, Vocabulary};

use super::{median, Report};

/// Positions at which one more token is scored.
const AT: [usize; 2] = [16, 512];
/// Token steps timed per batch, and batches (the median is reported).
const REPS: usize = 400;
const BATCHES: usize = 7;

/// Words of at most 20 ASCII letters (accepts ordinary prose).
struct Words;
impl ByteRecognizer for Words {
    type State = u8;
    fn name(&self) -> &str {
        "words"
    }
    fn initial(&self) -> u8 {
        0
    }
    fn step(&self, run: &u8, b: u8) -> Option<u8> {
        if b.is_ascii_alphabetic() {
            (*run < 20).then_some(run + 1)
        } else {
            Some(0)
        }
    }
}

/// Microseconds of `advance` + `prefix` for the token after position `n` of `tokens`, on
/// fresh clones of the state after `n - settle` tokens that first advance, untimed, by the
/// `settle` tokens before it (`settle = 0`: the timed token is the first after the fork,
/// as after resampling).
fn step_us<P: Potential>(
    p: &P,
    vocab: &Vocabulary,
    tokens: &[TokenId],
    n: usize,
    settle: usize,
) -> Result<f64, String> {
    let bytes = vocab.decode_bytes(&tokens[..n + 1]);
    let byte_len = |k: usize| vocab.decode_bytes(&tokens[..k]).len();
    let fork = n - settle;
    let (state, _) =
        replay(p, vocab, &tokens[..fork], &bytes[..byte_len(fork)]).map_err(|e| e.to_string())?;
    let view = SeqView {
        tokens: &tokens[..n],
        bytes: &bytes[..byte_len(n)],
        vocab,
    };
    let after = SeqView {
        tokens: &tokens[..n + 1],
        bytes: &bytes,
        vocab,
    };
    let mut per_batch = Vec::with_capacity(BATCHES);
    let mut sink = 0.0;
    for _ in 0..BATCHES {
        // Clones are made outside the timed loop: resampling pays for them, not the step.
        let mut states: Vec<P::State> = (0..REPS).map(|_| state.clone()).collect();
        for s in &mut states {
            for k in fork..n {
                let before = SeqView {
                    tokens: &tokens[..k],
                    bytes: &bytes[..byte_len(k)],
                    vocab,
                };
                p.advance(s, &before, tokens[k])
                    .map_err(|e| e.to_string())?;
            }
        }
        let start = Instant::now();
        for s in &mut states {
            p.advance(s, &view, tokens[n]).map_err(|e| e.to_string())?;
            sink += p.prefix(s, &after);
        }
        per_batch.push(start.elapsed().as_secs_f64() * 1e6 / REPS as f64);
    }
    std::hint::black_box(sink);
    Ok(median(per_batch))
}

fn measure<P: Potential>(
    report: &mut Report,
    label: &str,
    p: &P,
    vocab: &Vocabulary,
    tokens: &[TokenId],
) -> Result<(), String> {
    measure_after(report, label, p, vocab, tokens, 0, "")
}

/// As [`measure`], but the timed token is the second after the fork: what llguidance's
/// matcher costs once the first token after a clone has grown its copied buffers.
#[cfg(feature = "grammar")]
fn measure_settled<P: Potential>(
    report: &mut Report,
    label: &str,
    p: &P,
    vocab: &Vocabulary,
    tokens: &[TokenId],
) -> Result<(), String> {
    measure_after(report, label, p, vocab, tokens, 1, "_settled")
}

/// Time the token `skip` tokens after the fork at each length of [`AT`]; the metrics'
/// names end in `suffix`.
fn measure_after<P: Potential>(
    report: &mut Report,
    label: &str,
    p: &P,
    vocab: &Vocabulary,
    tokens: &[TokenId],
    skip: usize,
    suffix: &str,
) -> Result<(), String> {
    let us = AT
        .iter()
        .map(|&n| step_us(p, vocab, tokens, n, skip))
        .collect::<Result<Vec<f64>, _>>()?;
    for (n, v) in AT.iter().zip(&us) {
        report.emit(
            &format!("potential_us_per_token{suffix}"),
            label,
            *n,
            *v,
            "us",
        );
    }
    report.emit(
        &format!("potential_growth{suffix}"),
        label,
        AT[1],
        us[1] / us[0].max(1e-9),
        "ratio",
    );
    Ok(())
}

/// Every built-in potential at 16 and 512 tokens of `tokens` (at least 513 tokens of text).
pub fn run(report: &mut Report, vocab: &Vocabulary, tokens: &[TokenId]) -> Result<(), String> {
    if tokens.len() <= AT[1] {
        return Err(format!(
            "need {} tokens of text, got {}",
            AT[1] + 1,
            tokens.len()
        ));
    }
    let weights = {
        let mut w: Vec<f64> = (0..vocab.dist_len())
            .map(|i| -((i % 7) as f64) * 0.1)
            .collect();
        w[vocab.len()] = 0.0;
        TokenWeights::new("token-weights", w).map_err(|e| e.to_string())?
    };
    measure(
        report,
        "max-word-letters",
        &MaxWordLetters::new(30),
        vocab,
        tokens,
    )?;
    measure(report, "token-weights", &weights, vocab, tokens)?;
    measure(
        report,
        "char-potential",
        &CharPotential::new(Words),
        vocab,
        tokens,
    )?;
    let product = Product::new("product")
        .with(MaxWordLetters::new(30))
        .with(weights.clone());
    measure(report, "product", &product, vocab, tokens)?;
    #[cfg(feature = "grammar")]
    {
        use smc_steer::grammar::{Grammar, GrammarConstraint};
        let g =
            GrammarConstraint::new(vocab, Grammar::regex(r"(?s:.)*")).map_err(|e| e.to_string())?;
        measure(report, "grammar", &g, vocab, tokens)?;
        // Forks that share llguidance's lexer cache: smaller states.
        let shared = g.clone().with_shared_lexer_cache(true);
        measure(report, "grammar-shared-cache", &shared, vocab, tokens)?;
        measure_settled(report, "grammar", &g, vocab, tokens)?;
        measure_settled(report, "grammar-shared-cache", &shared, vocab, tokens)?;
    }
    // A stateless text predicate re-reads the whole text: the reference that grows.
    let on_text = Hard::on_text("on-text", |t: &str| !t.contains("zzz"));
    measure(report, "hard-on-text", &on_text, vocab, tokens)?;
    Ok(())
}
