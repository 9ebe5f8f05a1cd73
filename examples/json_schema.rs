//! Generate JSON that validates against a small JSON Schema, on SmolLM2, and compare the
//! posterior with locally constrained decoding.
//!
//! The constraint is compiled by llguidance over the model's token byte strings; each
//! particle keeps its own matcher. SMC weights every step by the model's mass inside the
//! mask, so the posterior is `p(x | x validates)`. Locally constrained decoding (sampling
//! from the renormalised mask, no weights) is what the *unweighted* particles of a run
//! without resampling are; the same particles *with* their weights estimate the posterior,
//! and the example prints both.
//!
//! ```text
//! scripts/fetch-model.sh && cargo run --release --example json_schema -- \
//!     [--schema JSON] [--prompt TEXT] [--particles N] [--max-tokens T] [--seed S] \
//!     [--model PATH] [--json]
//! ```

mod support;

use std::collections::BTreeMap;

use std::sync::Arc;

use smc_steer::grammar::{Grammar, GrammarConstraint};
use smc_steer::potential::Trivial;
use smc_steer::{FeynmanKac, Kernel, ProposalKind, Smc, SmcConfig, SmcResult, Truncation};

const SCHEMA: &str = r#"{"type":"object","properties":{"name":{"type":"string","maxLength":12},"age":{"type":"integer","minimum":0,"maximum":120}},"required":["name","age"],"additionalProperties":false}"#;

const USAGE: &str = "usage: json_schema [--schema JSON] [--prompt TEXT] [--particles N] \
                     [--max-tokens T] [--seed S] [--model PATH] [--json]";

fn main() -> std::process::ExitCode {
    support::main_with(run)
}

/// Distinct texts with (unweighted frequency, posterior probability), most frequent first.
fn compare<P>(r: &SmcResult<P>) -> Vec<(String, f64, f64)> {
    let w = r.normalised_weights();
    let n = r.particles.len() as f64;
    let mut m: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for (p, w) in r.particles.iter().zip(w) {
        let e = m.entry(p.text.clone()).or_default();
        e.0 += 1.0 / n;
        e.1 += w;
    }
    let mut v: Vec<_> = m.into_iter().map(|(t, (f, w))| (t, f, w)).collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1).then(b.2.total_cmp(&a.2)));
    v
}

fn run() -> Result<(), String> {
    let args = support::parse(
        USAGE,
        4,
        24,
        &[
            ("schema", SCHEMA),
            ("prompt", "A JSON record of a fictional person: "),
        ],
    )?;
    // Check the schema before loading the model.
    let grammar = Grammar::json_schema_str(args.get("schema")).map_err(|e| e.to_string())?;
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
        // Only complete documents count.
        truncation: Truncation::ForceEos,
        ..SmcConfig::default()
    };
    // The schema's mask is the proposal (weight: the model's mass inside it).
    let program = FeynmanKac::new(Trivial).with_proposal(ProposalKind::Mask(Arc::new(constraint)));
    let mut smc =
        Smc::new(kernel, program.clone(), &prompt, config.clone()).map_err(|e| e.to_string())?;
    while smc.step().map_err(|e| e.to_string())? {}
    let result = smc.finish();

    // The same proposal without resampling: unweighted = locally constrained decoding.
    let kernel = support::load(&args, 1)?;
    let local_config = SmcConfig {
        ess_threshold: 0.0,
        seed: args.seed.wrapping_add(1),
        ..config
    };
    let local = Smc::new(kernel, program, &prompt, local_config)
        .and_then(Smc::run)
        .map_err(|e| e.to_string())?;
    let comparison = compare(&local);

    if args.json {
        let rows: Vec<_> = comparison
            .iter()
            .map(|(t, f, w)| serde_json::json!({ "text": t, "unweighted": f, "weighted": w }))
            .collect();
        let extra = serde_json::json!({
            "prompt": args.get("prompt"),
            "schema": serde_json::from_str::<serde_json::Value>(args.get("schema")).ok(),
            "locally_constrained_vs_posterior": rows,
        });
        println!("{}", support::json(&result, |p| p.text.clone(), extra));
        return Ok(());
    }
    println!(
        "prompt: {:?}\nschema: {}",
        args.get("prompt"),
        args.get("schema")
    );
    println!("\nSMC posterior:");
    support::print_posterior(&result, |t| t.to_string());
    println!("\nlocally constrained decoding (unweighted) vs the same samples weighted:");
    println!("{:>10} {:>10}  completion", "unweighted", "weighted");
    for (t, f, w) in comparison.iter().take(10) {
        println!("{f:>10.3} {w:>10.3}  {t}");
    }
    Ok(())
}
