//! Fill in the gaps between fixed fragments: "Well, you see, every" … " he" … " to" …
//! " another" … "!", on SmolLM2.
//!
//! The first fragment is the prompt; each gap is `--gap-tokens` tokens sampled from the model
//! (EOS excluded, with the weight `log P(not EOS)`), and each later fragment is *observed*:
//! its tokens are appended and their log-probabilities added to the weight, so the result
//! is the model's posterior given the fragments. `text` is the whole filled-in string.
//!
//! ```text
//! scripts/fetch-model.sh && cargo run --release --example infilling -- \
//!     [--gap-tokens K] [--particles N] [--seed S] [--model PATH] [--json]
//! ```

mod support;

use std::sync::Arc;

use smc_steer::{Flow, Particle, Program, Result, Smc, SmcConfig, TokenId};

const FRAGMENTS: [&str; 5] = ["Well, you see, every", " he", " to", " another", "!"];

/// Generate `gap` tokens, observe the next fragment, repeat; finish after the last one.
#[derive(Clone)]
struct Infill {
    /// Token ids of the fragments after the prompt.
    fragments: Arc<Vec<Vec<TokenId>>>,
    gap: usize,
    next: usize,
    gap_left: usize,
}

impl Program for Infill {
    fn step(&mut self, p: &mut Particle<'_>) -> Result<Flow> {
        let log_p = p.log_probs()?;
        let eos = p.vocab().eos() as usize;
        // Draw a token conditioned on "not EOS" and weight by that event's probability.
        let not_eos = (-log_p[eos].exp()).ln_1p();
        let mut q = log_p.to_vec();
        q[eos] = f64::NEG_INFINITY;
        let t = p.draw(&q)?;
        p.append_to(0, t)?;
        p.score(not_eos)?;
        self.gap_left -= 1;
        if self.gap_left == 0 {
            p.observe_tokens_in(0, &self.fragments[self.next])?;
            self.next += 1;
            if self.next == self.fragments.len() {
                p.finish();
            } else {
                self.gap_left = self.gap;
            }
        }
        Ok(Flow::Yield)
    }
}

const USAGE: &str =
    "usage: infilling [--gap-tokens K] [--particles N] [--seed S] [--model PATH] [--json]";

fn main() -> std::process::ExitCode {
    support::main_with(run)
}

fn run() -> std::result::Result<(), String> {
    let args = support::parse(USAGE, 4, 1, &[("gap-tokens", "2")])?;
    let gap: usize = args
        .get("gap-tokens")
        .parse()
        .map_err(|e| format!("--gap-tokens: {e}"))?;
    if gap == 0 {
        return Err("--gap-tokens must be positive".into());
    }
    let kernel = support::load(&args, 1)?;
    let prompt = kernel.encode(FRAGMENTS[0]).map_err(|e| e.to_string())?;
    let fragments = FRAGMENTS[1..]
        .iter()
        .map(|f| kernel.encode(f))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let max_tokens = fragments.iter().map(Vec::len).sum::<usize>() + gap * fragments.len() + 1;
    let program = Infill {
        gap,
        next: 0,
        gap_left: gap,
        fragments: Arc::new(fragments),
    };
    let config = SmcConfig {
        particles: args.particles,
        max_tokens,
        seed: args.seed,
        ..SmcConfig::default()
    };
    let result = Smc::new(kernel, program, &prompt, config)
        .and_then(Smc::run)
        .map_err(|e| e.to_string())?;
    let full = |t: &str| format!("{}{t}", FRAGMENTS[0]);
    if args.json {
        let extra = serde_json::json!({ "fragments": FRAGMENTS, "gap_tokens": gap });
        println!("{}", support::json(&result, |p| full(&p.text), extra));
        return Ok(());
    }
    println!("fragments: {FRAGMENTS:?}, {gap} generated tokens per gap");
    support::print_posterior(&result, |t| full(t));
    Ok(())
}
