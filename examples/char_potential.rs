//! A character-level constraint written in a few lines of Rust: a lipogram (no letter `e`)
//! whose words have at most `--max-letters` letters, on SmolLM2.
//!
//! The recognizer below reads the output byte by byte; the library turns it into
//! next-token weights with one walk over the vocabulary's byte trie per step (the mask
//! proposal), or evaluates it lazily token by token with `--awrs` (adaptive weighted
//! rejection sampling). Both target the same posterior.
//!
//! ```text
//! scripts/fetch-model.sh && cargo run --release --example char_potential -- \
//!     [--prompt TEXT] [--max-letters K] [--awrs] [--particles N] [--max-tokens T] [--seed S] \
//!     [--model PATH] [--json]
//! ```

mod support;

use std::sync::Arc;

use smc_steer::grammar::charlevel::{ByteRecognizer, CharPotential};
use smc_steer::{FeynmanKac, ProposalKind, Smc, SmcConfig};

/// No `e` or `E`, and at most `self.0` letters per word. The state is the current word's
/// length.
struct Lipogram(u8);

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
            b if b.is_ascii_alphabetic() => (*run < self.0).then_some(run + 1),
            _ => Some(0),
        }
    }
}

const USAGE: &str = "usage: char_potential [--prompt TEXT] [--max-letters K] [--awrs] \
                     [--particles N] [--max-tokens T] [--seed S] [--model PATH] [--json]";

fn main() -> std::process::ExitCode {
    support::main_with(run)
}

fn run() -> Result<(), String> {
    // `--awrs` takes no value: turn it into `--awrs 1` for the shared parser.
    let awrs = std::env::args().any(|a| a == "--awrs");
    let args = {
        let filtered: Vec<String> = std::env::args().filter(|a| a != "--awrs").collect();
        support::parse_from(
            &filtered,
            USAGE,
            4,
            12,
            &[("prompt", "My favorite food is"), ("max-letters", "7")],
        )?
    };
    let max_letters: u8 = args
        .get("max-letters")
        .parse()
        .map_err(|e| format!("--max-letters: {e}"))?;
    let kernel = support::load(&args, 1)?;
    let prompt = kernel
        .encode(args.get("prompt"))
        .map_err(|e| e.to_string())?;
    let potential = Arc::new(CharPotential::new(Lipogram(max_letters)));
    let proposal = if awrs {
        ProposalKind::Awrs(potential.clone())
    } else {
        ProposalKind::Mask(potential.clone())
    };
    let model = FeynmanKac::from_arc(potential).with_proposal(proposal);
    let config = SmcConfig {
        particles: args.particles,
        max_tokens: args.max_tokens,
        seed: args.seed,
        ..SmcConfig::default()
    };
    let result = Smc::new(kernel, model, &prompt, config)
        .and_then(Smc::run)
        .map_err(|e| e.to_string())?;
    if args.json {
        let extra = serde_json::json!({
            "prompt": args.get("prompt"),
            "max_letters": max_letters,
            "proposal": if awrs { "awrs" } else { "mask" },
        });
        println!("{}", support::json(&result, |p| p.text.clone(), extra));
        return Ok(());
    }
    println!(
        "prompt: {:?} (no `e`, words of at most {max_letters} letters; {} proposal)",
        args.get("prompt"),
        if awrs { "AWRS" } else { "mask" }
    );
    support::print_posterior(&result, |t| t.to_string());
    Ok(())
}
