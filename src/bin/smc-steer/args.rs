//! The command line's argument types: flags of `run`, `batch` and `inspect`, and the job
//! options that a batch line may also set (as JSON fields).

use std::path::PathBuf;

use clap::{Args, Parser, ValueEnum};
use serde::{Deserialize, Serialize};
use smc_steer::lm::WeightFormat;

use crate::{Cli, Command};

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    Text,
    Json,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProposalArg {
    /// The mask of the hard constraints when there are any, else bootstrap.
    Auto,
    Bootstrap,
    Mask,
    LocallyOptimal,
    Awrs,
}

/// Options shared by `run` and the jobs of `batch` (a job's fields override them).
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobOptions {
    /// Number of particles.
    #[arg(long, short = 'n', default_value_t = 8, allow_negative_numbers = true)]
    pub particles: usize,
    /// Maximum generated tokens per particle.
    #[arg(long, default_value_t = 32, allow_negative_numbers = true)]
    pub max_tokens: usize,
    /// Resample when ESS < R·N (0: importance sampling; 1: every step).
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true)]
    pub ess_threshold: f64,
    /// Resampling scheme: multinomial, stratified, systematic, residual, ssp.
    #[arg(long, default_value = "stratified")]
    pub resampling: String,
    /// SMC-steer with K extensions per particle (instead of standard SMC).
    #[arg(long, allow_negative_numbers = true)]
    pub steer: Option<usize>,
    /// Sampling temperature of the model.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub temperature: f64,
    /// Master seed.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub seed: u64,
    /// Independent replicate runs (seeds drawn from the master seed).
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    pub replicates: usize,
    /// At the token limit: truncate (default) or force EOS (conditions on ending in time).
    #[arg(long, default_value = "truncate")]
    pub truncation: String,
    /// Proposal: auto, bootstrap, mask, locally-optimal, awrs.
    #[arg(long, value_enum, default_value_t = ProposalArg::Auto)]
    pub proposal: ProposalArg,
    /// Apply the model's chat template (the prompt becomes the user's message).
    #[arg(long)]
    pub chat: bool,
    /// A system message for --chat.
    #[arg(long)]
    pub system: Option<String>,
    /// Hard constraint: every word has at most K letters.
    #[arg(long, allow_negative_numbers = true)]
    pub max_word_letters: Option<usize>,
    /// Resample at word boundaries (one word per SMC step) instead of every token.
    #[arg(long)]
    pub word_steps: bool,
    /// Grammar constraint: the completion matches this regular expression.
    #[arg(long, conflicts_with_all = ["grammar", "json_schema"])]
    pub regex: Option<String>,
    /// Grammar constraint: the completion is in the language of this Lark grammar file.
    #[arg(long, value_name = "F.lark", conflicts_with = "json_schema")]
    pub grammar: Option<PathBuf>,
    /// Grammar constraint: the completion is JSON valid under this JSON Schema file.
    #[arg(long, value_name = "F.json")]
    pub json_schema: Option<PathBuf>,
}

impl Default for JobOptions {
    fn default() -> Self {
        // The clap defaults, so that JSONL jobs and flags agree.
        let cli = Cli::parse_from(["smc-steer", "run", "--prompt", "x"]);
        match cli.command {
            Command::Run(r) => r.job,
            _ => unreachable!("parsed a run command"),
        }
    }
}

#[derive(Args, Debug)]
pub struct ModelArgs {
    /// Model file (GGUF) or Hugging Face directory; default: $SMC_STEER_MODEL, then
    /// models/SmolLM2-135M-Instruct.Q4_1.gguf.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Worker threads, at least 1 (default: all cores).
    #[arg(long, allow_negative_numbers = true)]
    pub threads: Option<usize>,
    /// KV-cache capacity in tokens, fixed (default: sized from each prompt and request).
    #[arg(long, allow_negative_numbers = true)]
    pub cache_tokens: Option<usize>,
    /// Memory the run may plan for, e.g. 4G or 512M (default: the memory available).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_memory: Option<u64>,
    /// Run requests even when their memory estimate exceeds the available memory.
    #[arg(long)]
    pub ignore_memory_check: bool,
    /// Where the model runs: cpu or cuda[:N] (build with --features cuda).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weight format: f32 (the reference), bf16 (half the memory, mean KL to f32 ~5e-5
    /// nats), q8_0 (a quarter of the memory, fastest at small batches, mean KL ~0.005),
    /// q4_0, q4_1, native (as stored in the GGUF file), candle-quantized.
    #[arg(long, default_value = "f32", value_parser = parse_weights)]
    pub weights: WeightFormat,
}

/// A weight format by its name ([`WeightFormat::name`]).
fn parse_weights(s: &str) -> Result<WeightFormat, String> {
    WeightFormat::from_name(s).ok_or_else(|| {
        let names: Vec<&str> = WeightFormat::ALL.iter().map(|f| f.name()).collect();
        format!(
            "unknown weight format `{s}` (expected one of {})",
            names.join(", ")
        )
    })
}

/// `123`, `512K`, `64M`, `4G`, `1T` (powers of 1024) as bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size unit `{c}` (use K, M, G or T)")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("`{s}` is not a positive size such as 4G or 512M"))
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt.
    #[arg(long, conflicts_with = "prompt_file")]
    pub prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
    #[command(flatten)]
    pub job: JobOptions,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Write the per-step record of the (first) run as JSON.
    #[arg(long)]
    pub record: Option<PathBuf>,
    /// Write a self-contained HTML report of the (first) run.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct BatchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The jobs: one JSON object per line with `prompt`, optional `id` and any run option.
    pub jobs: PathBuf,
    /// Process only the jobs of shard I out of K (0-based; job lines i with i mod K = I),
    /// to split one file across the tasks of a scheduler's job array.
    #[arg(long, value_name = "I/K")]
    pub shard: Option<String>,
    #[command(flatten)]
    pub defaults: JobOptions,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert!(parse_size("0").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert!(parse_size("-1K").is_err());
    }
}
