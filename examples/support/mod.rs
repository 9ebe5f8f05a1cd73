//! Shared plumbing of the constraint examples: flags, model loading, output.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use smc_steer::lm::{KernelOptions, TransformerKernel};
use smc_steer::SmcResult;

/// Where the command line looks for a model by default, shared so the examples look there
/// too.
#[path = "../../src/bin/smc-steer/model_path.rs"]
pub mod model_path;

/// Flags common to every example, plus the example's own string flags.
pub struct Args {
    pub particles: usize,
    pub max_tokens: usize,
    pub seed: u64,
    pub model: Option<PathBuf>,
    pub json: bool,
    /// Values of the example's own flags (`--name value`), by name without dashes.
    pub extra: HashMap<String, String>,
}

/// Parse `--particles N --max-tokens T --seed S --model PATH --json` and the flags named
/// in `own` (each takes a value; `own` holds their defaults).
pub fn parse(
    usage: &str,
    particles: usize,
    max_tokens: usize,
    own: &[(&str, &str)],
) -> Result<Args, String> {
    let argv: Vec<String> = std::env::args().collect();
    parse_from(&argv, usage, particles, max_tokens, own)
}

/// As [`parse`] on a given argument list (`argv[0]` is the program name).
pub fn parse_from(
    argv: &[String],
    usage: &str,
    particles: usize,
    max_tokens: usize,
    own: &[(&str, &str)],
) -> Result<Args, String> {
    let mut a = Args {
        particles,
        max_tokens,
        seed: 0,
        model: None,
        json: false,
        extra: own
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    let mut it = argv.iter().skip(1).cloned();
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value\n{usage}"));
        let num = |name: &str, v: String| v.parse::<u64>().map_err(|e| format!("{name}: {e}"));
        match flag.as_str() {
            "--particles" => a.particles = num("--particles", value("--particles")?)? as usize,
            "--max-tokens" => a.max_tokens = num("--max-tokens", value("--max-tokens")?)? as usize,
            "--seed" => a.seed = num("--seed", value("--seed")?)?,
            "--model" => a.model = Some(PathBuf::from(value("--model")?)),
            "--json" => a.json = true,
            "--help" | "-h" => return Err(usage.into()),
            other => match other
                .strip_prefix("--")
                .filter(|k| a.extra.contains_key(*k))
            {
                Some(k) => {
                    let k = k.to_string();
                    let v = value(other)?;
                    a.extra.insert(k, v);
                }
                None => return Err(format!("unknown argument `{other}`\n{usage}")),
            },
        }
    }
    if a.particles == 0 || a.max_tokens == 0 {
        return Err("--particles and --max-tokens must be positive".into());
    }
    Ok(a)
}

impl Args {
    /// The value of one of the example's own flags.
    pub fn get(&self, name: &str) -> &str {
        self.extra.get(name).map(String::as_str).unwrap_or("")
    }
}

/// Load SmolLM2 (or `--model`, or `$SMC_STEER_MODEL`) sized for the run; a missing model's
/// error says how to fetch it.
pub fn load(args: &Args, contexts: usize) -> Result<TransformerKernel, String> {
    let opts = KernelOptions {
        particles: args.particles * contexts,
        max_new_tokens: args.max_tokens + 16,
        ..KernelOptions::default()
    };
    let path = model_path::resolve(args.model.as_deref());
    TransformerKernel::load(&path, opts).map_err(|e| model_path::explain(&e))
}

/// The JSON object of the hard-constraint example: `particles` [{text, log_weight}],
/// `log_z`, `ess`, `tokens_per_second`, `all_dead`, plus `extra`'s fields. `text` maps a
/// particle's generated text to the text shown.
pub fn json<P>(
    result: &SmcResult<P>,
    text: impl Fn(&smc_steer::Completion<P>) -> String,
    extra: serde_json::Value,
) -> serde_json::Value {
    let particles: Vec<_> = result
        .particles
        .iter()
        .map(|p| {
            serde_json::json!({
                "text": text(p),
                "eos": p.eos,
                "log_weight": p.log_weight.is_finite().then_some(p.log_weight),
            })
        })
        .collect();
    let mut out = serde_json::json!({
        "particles": particles,
        "log_z": result.log_z.is_finite().then_some(result.log_z),
        "ess": result.ess,
        "tokens_per_second": result.tokens_per_second(),
        "all_dead": result.all_dead,
    });
    if let (Some(o), serde_json::Value::Object(e)) = (out.as_object_mut(), extra) {
        o.extend(e);
    }
    out
}

/// Print the posterior (distinct texts with probabilities) and the run's figures.
pub fn print_posterior<P>(result: &SmcResult<P>, text: impl Fn(&str) -> String) {
    if result.all_dead {
        println!("every particle died: no completion satisfies the constraint (log Z = -inf)");
        return;
    }
    println!("{:>7}  completion", "prob");
    for d in result.posterior_by_bytes().iter().take(10) {
        println!(
            "{:>7.4}  {:?}{}",
            d.probability,
            text(&d.text),
            if d.eos { " <eos>" } else { "" }
        );
    }
    println!(
        "ESS {:.2} of {} | log Z {:.3} | {:.1} tokens/s ({} tokens in {:.2} s)",
        result.ess,
        result.particles.len(),
        result.log_z,
        result.tokens_per_second(),
        result.tokens_generated,
        result.elapsed_s
    );
}

/// Run `main`'s body and turn an error into exit code 1.
pub fn main_with(run: impl FnOnce() -> Result<(), String>) -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
