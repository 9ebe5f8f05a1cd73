//! Continue two prompts at once: one completion that is likely under both
//! " My favorite writer is probably" and " My favorite physicist is probably" (a product of
//! experts, `p(x | a)·p(x | b)`), on SmolLM2.
//!
//! Each particle holds two contexts of the same model, evaluated in the same batched
//! forward passes and sharing the KV cache: the token is sampled in the first context and
//! observed in the second, so the weight gains `log p(x_t | b, x_<t)`.
//!
//! ```text
//! scripts/fetch-model.sh && cargo run --release --example prompt_intersection -- \
//!     [--prompt-a TEXT] [--prompt-b TEXT] [--particles N] [--max-tokens T] [--seed S] \
//!     [--model PATH] [--json]
//! ```

mod support;

use smc_steer::{Flow, Particle, Program, Result, Smc, SmcConfig};

/// Sample in context 0, observe the same token in context 1.
#[derive(Clone)]
struct Intersection;

impl Program for Intersection {
    fn step(&mut self, p: &mut Particle<'_>) -> Result<Flow> {
        let t = p.sample_in(0)?;
        p.observe_tokens_in(1, &[t])?;
        Ok(Flow::Yield)
    }
}

const USAGE: &str =
    "usage: prompt_intersection [--prompt-a TEXT] [--prompt-b TEXT] [--particles N] \
                     [--max-tokens T] [--seed S] [--model PATH] [--json]";

fn main() -> std::process::ExitCode {
    support::main_with(run)
}

fn run() -> std::result::Result<(), String> {
    let args = support::parse(
        USAGE,
        4,
        8,
        &[
            ("prompt-a", " My favorite writer is probably"),
            ("prompt-b", " My favorite physicist is probably"),
        ],
    )?;
    let kernel = support::load(&args, 2)?;
    let a = kernel
        .encode(args.get("prompt-a"))
        .map_err(|e| e.to_string())?;
    let b = kernel
        .encode(args.get("prompt-b"))
        .map_err(|e| e.to_string())?;
    let config = SmcConfig {
        particles: args.particles,
        max_tokens: args.max_tokens,
        seed: args.seed,
        ..SmcConfig::default()
    };
    let result = Smc::with_contexts(kernel, Intersection, &[&a, &b], config)
        .and_then(Smc::run)
        .map_err(|e| e.to_string())?;
    if args.json {
        let extra = serde_json::json!({ "prompts": [args.get("prompt-a"), args.get("prompt-b")] });
        println!("{}", support::json(&result, |p| p.text.clone(), extra));
        return Ok(());
    }
    println!(
        "prompts: {:?} and {:?}",
        args.get("prompt-a"),
        args.get("prompt-b")
    );
    support::print_posterior(&result, |t| t.to_string());
    Ok(())
}
