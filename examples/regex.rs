//! Generate a string matching a regular expression (an ISO date by default) on SmolLM2, with
//! SMC over llguidance's token masks: the result is the model's posterior given the match,
//! not the biased output of masked decoding.
//!
//! ```text
//! scripts/fetch-model.sh && cargo run --release --example regex -- \
//!     [--regex RE] [--prompt TEXT] [--particles N] [--max-tokens T] [--seed S] [--model PATH] [--json]
//! ```

mod support;

use std::sync::Arc;

use smc_steer::grammar::{Grammar, GrammarConstraint};
use smc_steer::potential::Trivial;
use smc_steer::{FeynmanKac, Kernel, ProposalKind, Smc, SmcConfig, Truncation};

const USAGE: &str = "usage: regex [--regex RE] [--prompt TEXT] [--particles N] [--max-tokens T] \
                     [--seed S] [--model PATH] [--json]";

fn main() -> std::process::ExitCode {
    support::main_with(run)
}

fn run() -> Result<(), String> {
    let args = support::parse(
        USAGE,
        4,
        14,
        &[
            ("regex", r"\d{4}-\d{2}-\d{2}"),
            (
                "prompt",
                "The first person walked on the Moon on (YYYY-MM-DD): ",
            ),
        ],
    )?;
    // Check the pattern before loading the model.
    let grammar = Grammar::regex(args.get("regex"));
    grammar.validate().map_err(|e| e.to_string())?;
    let kernel = support::load(&args, 1)?;
    let prompt = kernel
        .encode(args.get("prompt"))
        .map_err(|e| e.to_string())?;
    let constraint = GrammarConstraint::new(kernel.vocab(), grammar).map_err(|e| e.to_string())?;
    let config = SmcConfig {
        particles: args.particles,
        max_tokens: args.max_tokens,
        seed: args.seed,
        // Only complete matches count: a particle still unfinished at the limit ends there.
        truncation: Truncation::ForceEos,
        ..SmcConfig::default()
    };
    // The grammar is the target's constraint and the proposal: draws from the model
    // restricted to its mask, weighted by the mask's mass.
    let model = FeynmanKac::new(Trivial).with_proposal(ProposalKind::Mask(Arc::new(constraint)));
    let result = Smc::new(kernel, model, &prompt, config)
        .and_then(Smc::run)
        .map_err(|e| e.to_string())?;
    if args.json {
        let out = support::json(
            &result,
            |p| p.text.clone(),
            serde_json::json!({ "prompt": args.get("prompt"), "regex": args.get("regex") }),
        );
        println!("{out}");
        return Ok(());
    }
    println!(
        "prompt: {:?} | regex: {}",
        args.get("prompt"),
        args.get("regex")
    );
    support::print_posterior(&result, |t| t.to_string());
    Ok(())
}
