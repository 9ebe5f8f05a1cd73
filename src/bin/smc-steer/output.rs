//! What the commands print: the JSON schemas of `run` and `batch` (docs/cli.md) and the
//! text form of `run`.

use std::io::Write;

use serde::Serialize;
use smc_steer::replicate::Replicates;
use smc_steer::result::{pool_runs, Distinct};

use crate::args::JobOptions;
use crate::jobs::Spec;

/// One replicate's figures in the JSON output.
#[derive(Serialize)]
pub struct ReplicateSummary {
    pub seed: u64,
    #[serde(with = "smc_steer::record::log_value")]
    pub log_z: f64,
    pub ess: f64,
    pub all_dead: bool,
    pub steps: usize,
    pub tokens_generated: usize,
    pub elapsed_s: f64,
    pub tokens_per_second: f64,
}

/// The JSON output of `run` (and each line of `batch`).
#[derive(Serialize)]
pub struct RunOutput {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<serde_json::Value>,
    pub prompt: String,
    pub constraints: Vec<String>,
    #[serde(serialize_with = "completions_with_finished")]
    pub completions: Vec<Distinct>,
    #[serde(with = "smc_steer::record::log_value")]
    pub log_z: f64,
    #[serde(with = "smc_steer::record::log_value")]
    pub log_z_mean: f64,
    pub log_z_se: f64,
    pub ess: f64,
    pub all_dead: bool,
    pub replicates: Vec<ReplicateSummary>,
    pub timing: Timing,
}

/// Each completion with `finished`: whether it ended with EOS, i.e. is a complete answer
/// (under a grammar, one the grammar accepts) rather than text cut at the token limit.
fn completions_with_finished<S: serde::Serializer>(
    completions: &[Distinct],
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::{Error, SerializeSeq};
    let mut seq = s.serialize_seq(Some(completions.len()))?;
    for c in completions {
        let mut v = serde_json::to_value(c).map_err(S::Error::custom)?;
        if let serde_json::Value::Object(m) = &mut v {
            m.insert("finished".into(), c.eos.into());
        }
        seq.serialize_element(&v)?;
    }
    seq.end()
}

/// A job's output: the run's figures plus warnings about them.
#[derive(Serialize)]
pub struct JobOutput {
    #[serde(flatten)]
    pub run: RunOutput,
    /// Reasons to distrust the completions (truncated grammar matches, say).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Warnings about a run's completions.
pub fn warnings(out: &RunOutput, spec: &Spec, job: &JobOptions) -> Vec<String> {
    let mut w = Vec::new();
    let cut: f64 = out
        .completions
        .iter()
        .filter(|c| !c.eos)
        .map(|c| c.probability)
        .sum();
    if spec.grammar.is_some() && out.completions.iter().any(|c| !c.eos) {
        w.push(format!(
            "{:.1}% of the posterior was cut at --max-tokens {} before the grammar accepted it: \
             those completions (finished: false) are NOT matches; raise --max-tokens or use \
             --truncation force-eos",
            100.0 * cut,
            job.max_tokens
        ));
    }
    w
}

/// Wall-clock figures of a job (loading is shared by the jobs of a batch).
#[derive(Serialize)]
pub struct Timing {
    pub load_s: f64,
    pub run_s: f64,
    pub tokens_per_second: f64,
}

impl RunOutput {
    /// A job's figures from its replicate runs (`seeds[r]` ran `reps.runs[r]`) and their
    /// wall time: the library's pooled posterior and `log Ẑ` estimates, each run's figures.
    pub fn new<P>(
        prompt: &str,
        constraints: Vec<String>,
        seeds: &[u64],
        reps: &Replicates<P>,
        run_s: f64,
    ) -> Self {
        // Each run's posterior weighted by its Ẑ, merged by bytes.
        let (log_mean_z, completions) = pool_runs(&reps.runs);
        let estimate = reps.log_z();
        let tokens: usize = reps.runs.iter().map(|r| r.tokens_generated).sum();
        RunOutput {
            id: None,
            prompt: prompt.to_string(),
            constraints,
            completions,
            log_z: log_mean_z,
            log_z_mean: estimate.mean,
            // A `-inf` run makes the standard error NaN; JSON has no NaN.
            log_z_se: if estimate.se.is_finite() {
                estimate.se
            } else {
                0.0
            },
            ess: reps.runs.first().map_or(0.0, |r| r.ess),
            all_dead: reps.runs.iter().all(|r| r.all_dead),
            replicates: seeds
                .iter()
                .zip(&reps.runs)
                .map(|(&seed, r)| ReplicateSummary {
                    seed,
                    log_z: r.log_z,
                    ess: r.ess,
                    all_dead: r.all_dead,
                    steps: r.steps,
                    tokens_generated: r.tokens_generated,
                    elapsed_s: r.elapsed_s,
                    tokens_per_second: r.tokens_per_second(),
                })
                .collect(),
            timing: Timing {
                load_s: 0.0,
                run_s,
                tokens_per_second: if run_s > 0.0 {
                    tokens as f64 / run_s
                } else {
                    0.0
                },
            },
        }
    }
}

/// Print a run for a person: the posterior's 20 most probable completions and the figures.
pub fn print_text(out: &RunOutput, w: &mut dyn Write) -> std::io::Result<()> {
    // `println!` panics when stdout fails (a full disk); these write to `w` and return the
    // error instead.
    macro_rules! println {
        ($($arg:tt)*) => { writeln!(w, $($arg)*)? };
    }
    macro_rules! print {
        ($($arg:tt)*) => { write!(w, $($arg)*)? };
    }
    println!("prompt: {:?}", out.prompt);
    if !out.constraints.is_empty() {
        println!("constraints: {}", out.constraints.join("; "));
    }
    if out.all_dead {
        println!("every particle died: no completion satisfies the constraints (log Z = -inf)");
        return Ok(());
    }
    println!("{:>8}  {:>5}  completion", "prob", "count");
    for c in out.completions.iter().take(20) {
        println!(
            "{:>8.4}  {:>5}  {:?}{}",
            c.probability,
            c.count,
            c.text,
            if c.eos { " <eos>" } else { "" }
        );
    }
    let lz = |x: f64| {
        if x.is_finite() {
            format!("{x:.3}")
        } else {
            "-inf".into()
        }
    };
    print!("log Z {} | ESS {:.2}", lz(out.log_z), out.ess);
    if out.replicates.len() > 1 {
        print!(
            " | log Z over {} replicates {} ± {:.3}",
            out.replicates.len(),
            lz(out.log_z_mean),
            out.log_z_se
        );
    }
    println!(
        " | {:.1} tokens/s (load {:.2} s, run {:.2} s)",
        out.timing.tokens_per_second, out.timing.load_s, out.timing.run_s
    );
    Ok(())
}
