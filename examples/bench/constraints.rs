//! Constraint figures: llguidance mask time per SMC step (JSON Schema, SmolLM2 vocabulary),
//! matcher forks, and constraint evaluations per generated token for AWRS vs full masking
//! on the character-level example's constraint.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use smc_steer::awrs::AwrsOptions;
use smc_steer::grammar::charlevel::{ByteRecognizer, CharPotential};
use smc_steer::potential::{Potential, SeqView};
use smc_steer::{FeynmanKac, Kernel, ProposalKind, Smc, SmcConfig, TokenId, Vocabulary};

use super::{load, median, ms, Args, Report};

/// The constraint of `examples/char_potential.rs`: no `e`, at most 7 letters per word.
struct Lipogram;

impl ByteRecognizer for Lipogram {
    type State = u8;
    fn name(&self) -> &str {
        "lipogram"
    }
    fn initial(&self) -> u8 {
        0
    }
    fn step(&self, run: &u8, byte: u8) -> Option<u8> {
        match byte {
            b'e' | b'E' => None,
            b if b.is_ascii_alphabetic() => (*run < 7).then_some(run + 1),
            _ => Some(0),
        }
    }
}

/// The lipogram with counters: one-token evaluations (what AWRS asks), full next-token
/// weight calls (what the mask asks) and the trie walk's recognizer steps.
struct Counted {
    inner: CharPotential<Lipogram>,
    evals: AtomicUsize,
    calls: AtomicUsize,
    steps: AtomicUsize,
}

impl Counted {
    fn new(inner: CharPotential<Lipogram>) -> Self {
        Self {
            inner,
            evals: AtomicUsize::new(0),
            calls: AtomicUsize::new(0),
            steps: AtomicUsize::new(0),
        }
    }
}

impl Potential for Counted {
    type State = <CharPotential<Lipogram> as Potential>::State;
    fn name(&self) -> &str {
        "lipogram"
    }
    fn start(&self, vocab: &Vocabulary) -> Self::State {
        self.inner.start(vocab)
    }
    fn advance(
        &self,
        state: &mut Self::State,
        seq: &SeqView<'_>,
        token: TokenId,
    ) -> smc_steer::Result<()> {
        self.inner.advance(state, seq, token)
    }
    fn prefix(&self, state: &Self::State, seq: &SeqView<'_>) -> f64 {
        self.inner.prefix(state, seq)
    }
    fn complete(&self, state: &Self::State, seq: &SeqView<'_>) -> f64 {
        self.inner.complete(state, seq)
    }
    fn log_weight_next(
        &self,
        state: &Self::State,
        seq: &SeqView<'_>,
        out: &mut [f64],
    ) -> smc_steer::Result<()> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let stats = self.inner.log_weight_next_stats(state, seq, out);
        self.steps.fetch_add(stats.steps, Ordering::Relaxed);
        Ok(())
    }
    fn log_weight_of(
        &self,
        state: &Self::State,
        seq: &SeqView<'_>,
        token: TokenId,
    ) -> smc_steer::Result<f64> {
        self.evals.fetch_add(1, Ordering::Relaxed);
        self.inner.log_weight_of(state, seq, token)
    }
}

/// All constraint figures; derived ratios use `decode_step_ms` at n = 32 when measured.
pub fn run(report: &mut Report, args: &Args, vocab: &Vocabulary) -> Result<(), String> {
    #[cfg(feature = "grammar")]
    grammar_mask(report, vocab, args.steps)?;
    #[cfg(not(feature = "grammar"))]
    let _ = vocab;
    awrs_vs_mask(report, args)?;
    Ok(())
}

/// `mask_ms`: wall time of one SMC step's masks for `n = 32` particles (computed in
/// parallel as the engine does) under the JSON Schema of `examples/json_schema.rs`, each
/// particle following its own valid path (uniformly random allowed tokens; a particle that
/// completes a document starts a new one). Also the cost of forking 32 matchers.
#[cfg(feature = "grammar")]
fn grammar_mask(report: &mut Report, vocab: &Vocabulary, steps: usize) -> Result<(), String> {
    use rand::{Rng, SeedableRng};
    use rayon::prelude::*;
    use smc_steer::grammar::{Grammar, GrammarConstraint};

    let n = 32;
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120}
        },
        "required": ["name", "age"],
        "additionalProperties": false
    });
    let t0 = Instant::now();
    let constraint =
        GrammarConstraint::new(vocab, Grammar::json_schema(schema)).map_err(|e| e.to_string())?;
    report.emit("grammar_compile_ms", "llguidance", 1, ms(t0), "ms");
    let eos = vocab.eos();
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(7);
    let mut matchers: Vec<_> = (0..n).map(|_| constraint.matcher()).collect();
    let mut times = Vec::new();
    let steps = steps.max(8) * 2;
    for step in 0..=steps {
        let t0 = Instant::now();
        let masks: Vec<_> = matchers
            .par_iter_mut()
            .map(|m| m.mask())
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        if step > 0 {
            times.push(ms(t0));
        }
        for (m, mask) in matchers.iter_mut().zip(&masks) {
            let allowed: Vec<TokenId> = (0..eos).filter(|&t| mask.allows(t)).collect();
            if allowed.is_empty() {
                *m = constraint.matcher();
                continue;
            }
            let t = allowed[rng.random_range(0..allowed.len())];
            if !m.consume(t) {
                return Err(format!("token {t} from the mask was rejected"));
            }
        }
    }
    let mask_ms = median(times);
    report.emit("mask_ms", "llguidance", n, mask_ms, "ms");
    for (label, share) in [("deep", false), ("shared", true)] {
        let c = constraint.clone().with_shared_lexer_cache(share);
        let base: Vec<_> = (0..n).map(|_| c.matcher()).collect();
        let t0 = Instant::now();
        let forks: Vec<_> = base.to_vec();
        report.emit("matcher_fork_ms", label, n, ms(t0), "ms");
        drop(forks);
    }
    if let Some(dec) = report.get("decode_step_ms", "smc-steer", n) {
        report.emit("mask_overhead", "llguidance", n, mask_ms / dec, "ratio");
    }
    Ok(())
}

/// Constraint evaluations per generated token on the character-level example's task
/// (prompt "My favorite food is", 8 particles, 16 tokens): AWRS evaluates tokens lazily;
/// the mask proposal evaluates every token (one trie walk: `trie_steps_per_token` counts
/// its recognizer steps).
fn awrs_vs_mask(report: &mut Report, args: &Args) -> Result<(), String> {
    let n = 8;
    let max_tokens = 16;
    let config = SmcConfig {
        particles: n,
        max_tokens,
        seed: 3,
        ..SmcConfig::default()
    };

    let mut prompt = Vec::new();
    // The default adaptive weight walk and the paper's recursive estimator (one draw past
    // the first acceptance): more evaluations buy a lower-variance weight.
    for (label, options) in [
        ("awrs", AwrsOptions::default()),
        ("awrs-recursive", AwrsOptions::recursive()),
    ] {
        let kernel = load(args, n, max_tokens)?;
        prompt = kernel
            .encode("My favorite food is")
            .map_err(|e| e.to_string())?;
        let counted = Arc::new(Counted::new(CharPotential::new(Lipogram)));
        let model = FeynmanKac::new(CharPotential::new(Lipogram))
            .with_proposal(ProposalKind::Awrs(counted.clone()))
            .with_awrs_options(options);
        let r = Smc::new(kernel, model, &prompt, config.clone())
            .and_then(Smc::run)
            .map_err(|e| e.to_string())?;
        let per_token =
            counted.evals.load(Ordering::Relaxed) as f64 / r.tokens_generated.max(1) as f64;
        report.emit("constraint_evals_per_token", label, n, per_token, "evals");
    }

    let kernel = load(args, n, max_tokens)?;
    let dist_len = kernel.vocab().dist_len();
    let counted = Arc::new(Counted::new(CharPotential::for_vocab(
        Lipogram,
        kernel.vocab(),
    )));
    let model = FeynmanKac::new(CharPotential::new(Lipogram))
        .with_proposal(ProposalKind::Mask(counted.clone()));
    let r = Smc::new(kernel, model, &prompt, config)
        .and_then(Smc::run)
        .map_err(|e| e.to_string())?;
    let tokens = r.tokens_generated.max(1) as f64;
    let calls = counted.calls.load(Ordering::Relaxed) as f64;
    report.emit(
        "constraint_evals_per_token",
        "mask",
        n,
        calls * dist_len as f64 / tokens,
        "evals",
    );
    report.emit(
        "trie_steps_per_token",
        "mask",
        n,
        counted.steps.load(Ordering::Relaxed) as f64 / tokens,
        "steps",
    );
    Ok(())
}
