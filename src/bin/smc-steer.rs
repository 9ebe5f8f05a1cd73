//! The `smc-steer` command line: run SMC on a language model, batch jobs, inspect models.
//!
//! See `docs/cli.md` for the reference and the JSON schemas.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};
use smc_steer::constraints::MaxWordLetters;
use smc_steer::feynman_kac::StepUnit;
use smc_steer::grammar::{Constrained, Grammar, GrammarConstraint};
use smc_steer::lm::{ChatMessage, KernelOptions, LmError, TransformerKernel};
use smc_steer::potential::{DynPotential, Product, SharedPotential, Trivial};
use smc_steer::report::RunRecord;
use smc_steer::{
    Algorithm, FeynmanKac, Flow, Kernel, Particle, Program, ProposalKind, Resampling, Smc,
    SmcConfig, SmcError, Truncation,
};

/// Exit codes (documented in docs/cli.md).
mod exit {
    pub const RUNTIME: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const MODEL: u8 = 3;
    pub const CONSTRAINT: u8 = 4;
}

#[derive(Parser, Debug)]
#[command(
    name = "smc-steer",
    version,
    about = "Steer language models with Sequential Monte Carlo"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run SMC on one prompt and print the posterior over completions.
    Run(RunArgs),
    /// Run one job per line of a JSONL file; one JSON result per line on stdout, in order.
    Batch(BatchArgs),
    /// Show a model's architecture, sizes, vocabulary, special tokens and chat template.
    Inspect(InspectArgs),
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Format {
    Text,
    Json,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum ProposalArg {
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
struct JobOptions {
    /// Number of particles.
    #[arg(long, short = 'n', default_value_t = 8, allow_negative_numbers = true)]
    particles: usize,
    /// Maximum generated tokens per particle.
    #[arg(long, default_value_t = 32, allow_negative_numbers = true)]
    max_tokens: usize,
    /// Resample when ESS < R·N (0: importance sampling; 1: every step).
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true)]
    ess_threshold: f64,
    /// Resampling scheme: multinomial, stratified, systematic, residual, ssp.
    #[arg(long, default_value = "stratified")]
    resampling: String,
    /// SMC-steer with K extensions per particle (instead of standard SMC).
    #[arg(long, allow_negative_numbers = true)]
    steer: Option<usize>,
    /// Sampling temperature of the model.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    temperature: f64,
    /// Master seed.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    seed: u64,
    /// Independent replicate runs (seeds drawn from the master seed).
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    replicates: usize,
    /// At the token limit: truncate (default) or force EOS (conditions on ending in time).
    #[arg(long, default_value = "truncate")]
    truncation: String,
    /// Proposal: auto, bootstrap, mask, locally-optimal, awrs.
    #[arg(long, value_enum, default_value_t = ProposalArg::Auto)]
    proposal: ProposalArg,
    /// Apply the model's chat template (the prompt becomes the user's message).
    #[arg(long)]
    chat: bool,
    /// A system message for --chat.
    #[arg(long)]
    system: Option<String>,
    /// Hard constraint: every word has at most K letters.
    #[arg(long, allow_negative_numbers = true)]
    max_word_letters: Option<usize>,
    /// Resample at word boundaries (one word per SMC step) instead of every token.
    #[arg(long)]
    word_steps: bool,
    /// Grammar constraint: the completion matches this regular expression.
    #[arg(long, conflicts_with_all = ["grammar", "json_schema"])]
    regex: Option<String>,
    /// Grammar constraint: the completion is in the language of this Lark grammar file.
    #[arg(long, value_name = "F.lark", conflicts_with = "json_schema")]
    grammar: Option<PathBuf>,
    /// Grammar constraint: the completion is JSON valid under this JSON Schema file.
    #[arg(long, value_name = "F.json")]
    json_schema: Option<PathBuf>,
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
struct ModelArgs {
    /// Model file (GGUF) or Hugging Face directory; default: $SMC_STEER_MODEL, then
    /// models/SmolLM2-135M-Instruct.Q4_1.gguf.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Worker threads, at least 1 (default: all cores).
    #[arg(long, allow_negative_numbers = true)]
    threads: Option<usize>,
    /// KV-cache capacity in tokens, fixed (default: sized from each prompt and request).
    #[arg(long, allow_negative_numbers = true)]
    cache_tokens: Option<usize>,
    /// Memory the run may plan for, e.g. 4G or 512M (default: the memory available).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_memory: Option<u64>,
    /// Run requests even when their memory estimate exceeds the available memory.
    #[arg(long)]
    ignore_memory_check: bool,
}

/// `123`, `512K`, `64M`, `4G`, `1T` (powers of 1024) as bytes.
fn parse_size(s: &str) -> Result<u64, String> {
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
struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt.
    #[arg(long, conflicts_with = "prompt_file")]
    prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    #[command(flatten)]
    job: JobOptions,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Write the per-step record of the (first) run as JSON.
    #[arg(long)]
    record: Option<PathBuf>,
    /// Write a self-contained HTML report of the (first) run.
    #[arg(long)]
    report: Option<PathBuf>,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Args, Debug)]
struct BatchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The jobs: one JSON object per line with `prompt`, optional `id` and any run option.
    jobs: PathBuf,
    /// Process only the jobs of shard I out of K (0-based; job lines i with i mod K = I),
    /// to split one file across the tasks of a scheduler's job array.
    #[arg(long, value_name = "I/K")]
    shard: Option<String>,
    #[command(flatten)]
    defaults: JobOptions,
}

#[derive(Args, Debug)]
struct InspectArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

/// A failure with its exit code and one-line message.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn usage(m: impl Into<String>) -> Self {
        Self {
            code: exit::USAGE,
            message: m.into(),
        }
    }
}

impl From<SmcError> for Failure {
    fn from(e: SmcError) -> Self {
        let code = match e {
            SmcError::ZeroParticles
            | SmcError::InvalidEssThreshold(_)
            | SmcError::ZeroBeam
            | SmcError::InvalidConfig(_) => exit::USAGE,
            SmcError::InvalidConstraint { .. } => exit::CONSTRAINT,
            _ => exit::RUNTIME,
        };
        Self {
            code,
            message: e.to_string(),
        }
    }
}

impl From<LmError> for Failure {
    fn from(e: LmError) -> Self {
        let code = match e {
            LmError::EmptyPrompt
            | LmError::ContextOverflow { .. }
            | LmError::RequestTooLong { .. }
            | LmError::InsufficientMemory { .. }
            | LmError::InvalidConfig(_) => exit::USAGE,
            LmError::ChatTemplate(_)
            | LmError::Tokenizer(_)
            | LmError::OutOfMemory { .. }
            | LmError::CacheExhausted { .. } => exit::RUNTIME,
            _ => exit::MODEL,
        };
        Self {
            code,
            message: e.to_string(),
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // Help and version go to stdout with success; errors are one clear line.
            if !e.use_stderr() {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            let text = e.render().to_string();
            let first = text
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .unwrap_or("error: invalid arguments");
            eprintln!("{first} (see --help)");
            return ExitCode::from(exit::USAGE);
        }
    };
    let result = match cli.command {
        Command::Run(a) => run(a),
        Command::Batch(a) => batch(a),
        Command::Inspect(a) => inspect(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            // One line: multi-line messages (a regex parser's caret, say) are joined.
            // A backtrace (RUST_BACKTRACE set) never reaches the user's message.
            let message: Vec<&str> = f
                .message
                .lines()
                .take_while(|l| !l.trim_start().starts_with("stack backtrace:"))
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            eprintln!("error: {}", message.join(" "));
            ExitCode::from(f.code)
        }
    }
}

fn threads(n: Option<usize>) -> Result<(), Failure> {
    if n == Some(0) {
        return Err(Failure::usage(
            "--threads must be at least 1 (leave it out to use all cores)",
        ));
    }
    if let Some(n) = n {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .map_err(|e| Failure::usage(format!("--threads: {e}")))?;
    }
    Ok(())
}

/// Sequences a job keeps in the cache at once: particles, times K under SMC-steer.
fn sequences(job: &JobOptions) -> Result<usize, Failure> {
    job.particles
        .checked_mul(job.steer.unwrap_or(1))
        .ok_or_else(|| {
            Failure::usage(format!(
                "--particles {} x --steer {} is too large",
                job.particles,
                job.steer.unwrap_or(1)
            ))
        })
}

fn kernel_options(model: &ModelArgs, job: &JobOptions) -> Result<KernelOptions, Failure> {
    if model.cache_tokens == Some(0) {
        return Err(Failure::usage("--cache-tokens must be at least 1"));
    }
    Ok(KernelOptions {
        particles: sequences(job)?,
        max_new_tokens: job.max_tokens,
        temperature: job.temperature,
        cache_tokens: model.cache_tokens,
        check_memory: !model.ignore_memory_check,
        memory_limit: model.max_memory,
        ..KernelOptions::default()
    })
}

/// Check a job against the model's header (sizes, memory) without loading the weights.
fn precheck(model: &ModelArgs, job: &JobOptions) -> Result<(), Failure> {
    let opts = kernel_options(model, job)?;
    let config = smc_steer::lm::read_config(model.model.as_deref())?;
    Ok(opts.check(&config)?)
}

fn load(model: &ModelArgs, job: &JobOptions) -> Result<TransformerKernel, Failure> {
    let opts = kernel_options(model, job)?;
    Ok(TransformerKernel::load(model.model.as_deref(), opts)?)
}

/// The program a job runs: a Feynman-Kac model, or generation under a grammar.
#[derive(Clone)]
enum JobProgram {
    Plain(FeynmanKac),
    Grammar(Box<Constrained>),
}

impl Program for JobProgram {
    fn check(&self, vocab: &smc_steer::Vocabulary) -> smc_steer::Result<()> {
        match self {
            JobProgram::Plain(p) => p.check(vocab),
            JobProgram::Grammar(p) => p.check(vocab),
        }
    }
    fn start(&mut self, p: &mut Particle<'_>) -> smc_steer::Result<()> {
        match self {
            JobProgram::Plain(m) => m.start(p),
            JobProgram::Grammar(m) => m.start(p),
        }
    }
    fn step(&mut self, p: &mut Particle<'_>) -> smc_steer::Result<Flow> {
        match self {
            JobProgram::Plain(m) => m.step(p),
            JobProgram::Grammar(m) => m.step(p),
        }
    }
    fn at_token_limit(
        &mut self,
        p: &mut Particle<'_>,
        policy: Truncation,
    ) -> smc_steer::Result<()> {
        match self {
            JobProgram::Plain(m) => m.at_token_limit(p, policy),
            JobProgram::Grammar(m) => m.at_token_limit(p, policy),
        }
    }
}

/// A job's constraints, checked without the model.
struct Spec {
    potential: Arc<dyn DynPotential>,
    has_hard: bool,
    grammar: Option<Grammar>,
    constraints: Vec<String>,
}

fn constraint_error(message: impl Into<String>) -> Failure {
    Failure {
        code: exit::CONSTRAINT,
        message: message.into(),
    }
}

/// Largest prompt file (`--prompt-file`) read, in bytes.
const MAX_PROMPT_BYTES: u64 = 16 << 20;
/// Largest grammar or schema file read, in bytes.
const MAX_CONSTRAINT_BYTES: u64 = 16 << 20;
/// Largest batch file read, in bytes.
const MAX_BATCH_BYTES: u64 = 1 << 30;
/// Largest batch line (a job: its prompt and options), in bytes.
const MAX_BATCH_LINE_BYTES: u64 = MAX_PROMPT_BYTES + (1 << 20);

/// Read a batch file: at most [`MAX_BATCH_BYTES`] in all and [`MAX_BATCH_LINE_BYTES`] per
/// line, so an endless stream without newlines (`/dev/zero`) is refused after one line's
/// worth of bytes.
fn read_batch_file(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::{BufRead, Read};
    if path.is_dir() {
        return Err("is a directory".into());
    }
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut reader = std::io::BufReader::new(file.take(MAX_BATCH_BYTES + 1));
    let mut bytes = Vec::new();
    let mut line_no = 0usize;
    loop {
        line_no += 1;
        let start = bytes.len();
        let n = (&mut reader)
            .take(MAX_BATCH_LINE_BYTES + 1)
            .read_until(b'\n', &mut bytes)
            .map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        let line_len = bytes.len() - start - usize::from(bytes.last() == Some(&b'\n'));
        if line_len as u64 > MAX_BATCH_LINE_BYTES {
            return Err(format!(
                "line {line_no} is larger than the limit of {MAX_BATCH_LINE_BYTES} bytes"
            ));
        }
        if bytes.len() as u64 > MAX_BATCH_BYTES {
            return Err(format!("larger than the limit of {MAX_BATCH_BYTES} bytes"));
        }
    }
    Ok(bytes)
}

/// Read at most `max` bytes of a file; a longer file (or an endless one such as
/// `/dev/zero`) is an error naming the bound, not an unbounded read.
fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, String> {
    use std::io::Read;
    if path.is_dir() {
        return Err("is a directory".into());
    }
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > max {
        return Err(format!("larger than the limit of {max} bytes"));
    }
    Ok(bytes)
}

/// A bounded text file as UTF-8 (a leading byte-order mark is dropped).
fn read_text(path: &Path, max: u64) -> Result<String, String> {
    let bytes = read_bounded(path, max)?;
    let text = String::from_utf8(bytes)
        .map_err(|e| format!("not valid UTF-8 (at byte {})", e.utf8_error().valid_up_to()))?;
    Ok(match text.strip_prefix('\u{feff}') {
        Some(t) => t.to_string(),
        None => text,
    })
}

fn read_constraint_file(path: &Path, what: &str) -> Result<String, Failure> {
    read_text(path, MAX_CONSTRAINT_BYTES)
        .map_err(|e| constraint_error(format!("cannot read the {what} {}: {e}", path.display())))
}

/// Parse and validate every constraint of a job (before any model work).
fn spec(job: &JobOptions) -> Result<Spec, Failure> {
    let mut hard: Vec<Arc<dyn DynPotential>> = Vec::new();
    let mut constraints = Vec::new();
    if let Some(k) = job.max_word_letters {
        if k == 0 {
            return Err(constraint_error("--max-word-letters must be at least 1"));
        }
        hard.push(Arc::new(MaxWordLetters::new(k)));
        constraints.push(format!("every word has at most {k} letters"));
    }
    let grammar = match (&job.regex, &job.grammar, &job.json_schema) {
        (Some(re), None, None) => {
            constraints.push(format!("matches the regex {re}"));
            Some(Grammar::regex(re.clone()))
        }
        (None, Some(f), None) => {
            constraints.push(format!("in the Lark grammar {}", f.display()));
            Some(Grammar::lark(read_constraint_file(f, "Lark grammar")?))
        }
        (None, None, Some(f)) => {
            constraints.push(format!("valid under the JSON Schema {}", f.display()));
            let text = read_constraint_file(f, "JSON Schema")?;
            Some(Grammar::json_schema_str(&text).map_err(|e| constraint_error(e.to_string()))?)
        }
        (None, None, None) => None,
        _ => {
            return Err(constraint_error(
                "give at most one of --regex, --grammar and --json-schema",
            ))
        }
    };
    if let Some(g) = &grammar {
        g.validate().map_err(|e| constraint_error(e.to_string()))?;
        if !matches!(job.proposal, ProposalArg::Auto | ProposalArg::Mask) {
            return Err(Failure::usage(
                "grammar constraints use their mask as the proposal (--proposal auto or mask)",
            ));
        }
        if job.word_steps {
            return Err(Failure::usage(
                "--word-steps cannot be combined with a grammar constraint",
            ));
        }
    }
    let potential: Arc<dyn DynPotential> = match hard.len() {
        0 => Arc::new(Trivial),
        1 => hard[0].clone(),
        _ => Arc::new(
            hard.iter()
                .fold(Product::new("constraints"), |p, h| p.with_arc(h.clone())),
        ),
    };
    Ok(Spec {
        potential,
        has_hard: !hard.is_empty(),
        grammar,
        constraints,
    })
}

/// Build the program of a job for a loaded model.
fn build_program(
    spec: &Spec,
    job: &JobOptions,
    vocab: &smc_steer::Vocabulary,
) -> Result<JobProgram, Failure> {
    if let Some(g) = &spec.grammar {
        let c = GrammarConstraint::new(vocab, g.clone())
            .map_err(|e| constraint_error(e.to_string()))?;
        let mut program = Constrained::new(c);
        if spec.has_hard {
            program = program.with_potential(SharedPotential::from_arc(spec.potential.clone()));
        }
        return Ok(JobProgram::Grammar(Box::new(program)));
    }
    let potential = spec.potential.clone();
    let proposal = match (job.proposal, spec.has_hard) {
        (ProposalArg::Auto, false) | (ProposalArg::Bootstrap, _) => ProposalKind::Bootstrap,
        (ProposalArg::Auto, true) | (ProposalArg::Mask, _) => ProposalKind::Mask(potential.clone()),
        (ProposalArg::LocallyOptimal, _) => ProposalKind::LocallyOptimal,
        (ProposalArg::Awrs, _) => ProposalKind::Awrs(potential.clone()),
    };
    let unit = if job.word_steps {
        StepUnit::Word
    } else {
        StepUnit::Token
    };
    Ok(JobProgram::Plain(
        FeynmanKac::from_arc(potential)
            .with_proposal(proposal)
            .with_step_unit(unit),
    ))
}

fn config(job: &JobOptions) -> Result<SmcConfig, Failure> {
    let resampling: Resampling = job.resampling.parse()?;
    let truncation = match job.truncation.as_str() {
        "truncate" => Truncation::Truncate,
        "force-eos" => Truncation::ForceEos,
        other => {
            return Err(Failure::usage(format!(
                "--truncation must be truncate or force-eos (got `{other}`)"
            )))
        }
    };
    if !(job.temperature.is_finite() && job.temperature > 0.0) {
        return Err(Failure::usage(format!(
            "--temperature must be positive and finite (got {})",
            job.temperature
        )));
    }
    sequences(job)?;
    if job.replicates == 0 {
        return Err(Failure::usage("--replicates must be at least 1"));
    }
    let config = SmcConfig {
        particles: job.particles,
        max_tokens: job.max_tokens,
        ess_threshold: job.ess_threshold,
        resampling,
        algorithm: job
            .steer
            .map_or(Algorithm::Standard, |beam| Algorithm::Steer { beam }),
        truncation,
        seed: job.seed,
        ..SmcConfig::default()
    };
    config.validate()?;
    Ok(config)
}

fn prompt_tokens(
    kernel: &TransformerKernel,
    prompt: &str,
    job: &JobOptions,
) -> Result<Vec<u32>, Failure> {
    if prompt.is_empty() {
        return Err(Failure::usage("the prompt is empty"));
    }
    if job.chat {
        let mut messages = Vec::new();
        if let Some(s) = &job.system {
            messages.push(ChatMessage::system(s.clone()));
        }
        messages.push(ChatMessage::user(prompt.to_string()));
        Ok(kernel.chat_prompt(&messages)?)
    } else {
        Ok(kernel.encode(prompt)?)
    }
}

/// One replicate's figures in the JSON output.
#[derive(Serialize)]
struct ReplicateSummary {
    seed: u64,
    #[serde(with = "smc_steer::record::log_value")]
    log_z: f64,
    ess: f64,
    all_dead: bool,
    steps: usize,
    tokens_generated: usize,
    elapsed_s: f64,
    tokens_per_second: f64,
}

/// The JSON output of `run` (and each line of `batch`).
#[derive(Serialize)]
struct RunOutput {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<serde_json::Value>,
    prompt: String,
    constraints: Vec<String>,
    #[serde(serialize_with = "completions_with_finished")]
    completions: Vec<smc_steer::result::Distinct>,
    #[serde(with = "smc_steer::record::log_value")]
    log_z: f64,
    #[serde(with = "smc_steer::record::log_value")]
    log_z_mean: f64,
    log_z_se: f64,
    ess: f64,
    all_dead: bool,
    replicates: Vec<ReplicateSummary>,
    timing: Timing,
}

/// Each completion with `finished`: whether it ended with EOS, i.e. is a complete answer
/// (under a grammar, one the grammar accepts) rather than text cut at the token limit.
fn completions_with_finished<S: serde::Serializer>(
    completions: &[smc_steer::result::Distinct],
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
struct JobOutput {
    #[serde(flatten)]
    run: RunOutput,
    /// Reasons to distrust the completions (truncated grammar matches, say).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    warnings: Vec<String>,
}

/// Warnings about a run's completions.
fn warnings(out: &RunOutput, spec: &Spec, job: &JobOptions) -> Vec<String> {
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

#[derive(Serialize)]
struct Timing {
    load_s: f64,
    run_s: f64,
    tokens_per_second: f64,
}

/// Run the replicates of one job on a loaded kernel.
fn run_job(
    kernel: &mut TransformerKernel,
    prompt: &str,
    job: &JobOptions,
    want_record: bool,
    progress: bool,
) -> Result<(JobOutput, Option<RunRecord>), Failure> {
    let config = config(job)?;
    let spec = spec(job)?;
    kernel.set_request(sequences(job)?, job.max_tokens)?;
    let program = build_program(&spec, job, kernel.vocab())?;
    kernel.set_temperature(job.temperature)?;
    let tokens = prompt_tokens(kernel, prompt, job)?;
    // Refused before the model runs: a request that cannot fit the context window.
    kernel.check_fits(tokens.len())?;
    let seeds = smc_steer::replicate::seeds(job.seed, job.replicates);
    let started = Instant::now();
    let mut results = Vec::new();
    let mut record = None;
    for (r, &seed) in seeds.iter().enumerate() {
        let cfg = SmcConfig {
            seed,
            record: want_record && r == 0,
            record_text: want_record && r == 0,
            ..config.clone()
        };
        let run_started = Instant::now();
        let mut smc = Smc::new(&mut *kernel, program.clone(), &tokens, cfg.clone())?;
        let bar = progress.then(|| progress_bar(job.max_tokens, r, job.replicates));
        while smc.step()? {
            if let Some(b) = &bar {
                let live = smc.particles.iter().filter(|p| !p.finished).count();
                let secs = run_started.elapsed().as_secs_f64().max(1e-9);
                b.set_position(smc.steps as u64);
                b.set_message(format!(
                    "live {live} · ESS {:.1} · log Z {:.2} · {:.1} tokens/s",
                    smc.ess(),
                    smc.log_z(),
                    smc.tokens_generated() as f64 / secs
                ));
            }
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        let result = smc.finish();
        if r == 0 && want_record {
            record = Some(RunRecord::from_result(
                prompt,
                spec.constraints.clone(),
                &cfg,
                &result,
            ));
        }
        results.push((seed, result));
    }
    let run_s = started.elapsed().as_secs_f64();
    let constraints = spec.constraints.clone();
    let run = summarise(None, prompt, constraints, &results, run_s);
    let warnings = warnings(&run, &spec, job);
    Ok((JobOutput { run, warnings }, record))
}

fn progress_bar(max_tokens: usize, replicate: usize, replicates: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(max_tokens as u64);
    let style = indicatif::ProgressStyle::with_template("{prefix} step {pos}/{len} {bar:30} {msg}")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_prefix(format!("run {}/{}", replicate + 1, replicates));
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    bar
}

/// Pool replicates: each run's posterior weighted by its Ẑ, merged by bytes (the library's
/// [`smc_steer::result::pool_runs`]).
fn summarise<P>(
    id: Option<serde_json::Value>,
    prompt: &str,
    constraints: Vec<String>,
    results: &[(u64, smc_steer::SmcResult<P>)],
    run_s: f64,
) -> RunOutput {
    let log_zs: Vec<f64> = results.iter().map(|(_, r)| r.log_z).collect();
    let (log_mean_z, completions) = smc_steer::result::pool_runs(results.iter().map(|(_, r)| r));
    let estimate = smc_steer::replicate::Estimate::from_values(&log_zs);
    let tokens: usize = results.iter().map(|(_, r)| r.tokens_generated).sum();
    RunOutput {
        id,
        prompt: prompt.to_string(),
        constraints,
        completions,
        log_z: log_mean_z,
        log_z_mean: estimate.mean,
        log_z_se: if estimate.se.is_finite() {
            estimate.se
        } else {
            0.0
        },
        ess: results.first().map_or(0.0, |(_, r)| r.ess),
        all_dead: results.iter().all(|(_, r)| r.all_dead),
        replicates: results
            .iter()
            .map(|(seed, r)| ReplicateSummary {
                seed: *seed,
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

/// An output file (`--record`, `--report`) written whole or not at all: the contents go to
/// a temporary file next to it, renamed into place once complete.
struct OutputFile {
    path: PathBuf,
    tmp: PathBuf,
}

impl OutputFile {
    /// Check, before any model work, that the file can be written (by creating the
    /// temporary file).
    fn prepare(path: &Path, flag: &str) -> Result<Self, Failure> {
        let bad = |m: String| Failure::usage(format!("{flag} {}: {m}", path.display()));
        if path.is_dir() {
            return Err(bad("is a directory".into()));
        }
        let name = path
            .file_name()
            .ok_or_else(|| bad("not a file name".into()))?
            .to_string_lossy()
            .into_owned();
        let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
        std::fs::File::create(&tmp).map_err(|e| bad(e.to_string()))?;
        Ok(Self {
            path: path.to_path_buf(),
            tmp,
        })
    }

    fn commit(self, contents: &str) -> Result<(), Failure> {
        let result = std::fs::write(&self.tmp, contents)
            .and_then(|()| std::fs::rename(&self.tmp, &self.path));
        result.map_err(|e| Failure {
            code: exit::RUNTIME,
            message: format!("cannot write {}: {e}", self.path.display()),
        })
    }
}

impl Drop for OutputFile {
    fn drop(&mut self) {
        // Gone after a rename; otherwise nothing half-written is left behind.
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// The absolute path a file has or would have (its folder resolved), to compare two paths.
fn canonical(p: &Path) -> Option<PathBuf> {
    if let Ok(c) = p.canonicalize() {
        return Some(c);
    }
    let parent = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.canonicalize().ok()?,
        _ => std::env::current_dir().ok()?,
    };
    Some(parent.join(p.file_name()?))
}

fn stdout_failure(e: std::io::Error) -> Failure {
    Failure {
        code: exit::RUNTIME,
        message: format!("cannot write to stdout: {e}"),
    }
}

fn run(a: RunArgs) -> Result<(), Failure> {
    threads(a.model.threads)?;
    let prompt = match (&a.prompt, &a.prompt_file) {
        (Some(p), None) => p.clone(),
        (None, Some(f)) => read_text(f, MAX_PROMPT_BYTES).map_err(|e| {
            Failure::usage(format!("cannot read --prompt-file {}: {e}", f.display()))
        })?,
        _ => return Err(Failure::usage("give --prompt TEXT or --prompt-file F")),
    };
    // Check everything that needs no model before loading it.
    if prompt.is_empty() {
        return Err(Failure::usage("the prompt is empty"));
    }
    config(&a.job)?;
    spec(&a.job)?;
    if let (Some(r), Some(h)) = (&a.record, &a.report) {
        let same = r == h || matches!((canonical(r), canonical(h)), (Some(x), Some(y)) if x == y);
        if same {
            return Err(Failure::usage(format!(
                "--record and --report name the same file {}",
                r.display()
            )));
        }
    }
    let record_file = a
        .record
        .as_deref()
        .map(|p| OutputFile::prepare(p, "--record"))
        .transpose()?;
    let report_file = a
        .report
        .as_deref()
        .map(|p| OutputFile::prepare(p, "--report"))
        .transpose()?;
    precheck(&a.model, &a.job)?;
    let t0 = Instant::now();
    let mut kernel = load(&a.model, &a.job)?;
    let load_s = t0.elapsed().as_secs_f64();
    let progress = !a.quiet && std::io::stderr().is_terminal();
    let want_record = a.record.is_some() || a.report.is_some();
    let (mut out, record) = run_job(&mut kernel, &prompt, &a.job, want_record, progress)?;
    out.run.timing.load_s = load_s;
    // The result first: a failing record or report must not lose it.
    let mut stdout = std::io::stdout().lock();
    match a.format {
        Format::Json => {
            let json = serde_json::to_string(&out).map_err(|e| Failure {
                code: exit::RUNTIME,
                message: e.to_string(),
            })?;
            writeln!(stdout, "{json}").map_err(stdout_failure)?;
        }
        Format::Text => {
            print_text(&out.run, &mut stdout).map_err(stdout_failure)?;
            for w in &out.warnings {
                writeln!(stdout, "warning: {w}").map_err(stdout_failure)?;
            }
        }
    }
    stdout.flush().map_err(stdout_failure)?;
    for w in &out.warnings {
        eprintln!("warning: {w}");
    }
    if let Some(rec) = &record {
        if let Some(f) = record_file {
            f.commit(&rec.to_json()?)?;
        }
        if let Some(f) = report_file {
            f.commit(&rec.to_html())?;
        }
    }
    Ok(())
}

fn print_text(out: &RunOutput, w: &mut dyn Write) -> std::io::Result<()> {
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

/// A parsed batch line: its `id` (kept even when the rest is invalid) and its job.
struct ParsedLine {
    id: Option<serde_json::Value>,
    job: Result<(String, JobOptions), String>,
}

/// Parse one batch line (invalid UTF-8, bad JSON, unknown or bad options are errors of that
/// line only; its `id` is recovered whenever the line is a JSON object).
fn parse_job(line: &[u8], defaults: &JobOptions) -> ParsedLine {
    let text = match std::str::from_utf8(line) {
        Ok(t) => t,
        Err(e) => {
            // The line is refused, but its id is still reported when it can be read.
            let lossy = String::from_utf8_lossy(line);
            let id = serde_json::from_str::<serde_json::Value>(&lossy)
                .ok()
                .and_then(|mut v| v.get_mut("id").map(serde_json::Value::take));
            return ParsedLine {
                id,
                job: Err(format!(
                    "invalid job: not valid UTF-8 (at byte {})",
                    e.valid_up_to()
                )),
            };
        }
    };
    let value: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            return ParsedLine {
                id: None,
                job: Err(format!("invalid job: {e}")),
            }
        }
    };
    let serde_json::Value::Object(mut fields) = value else {
        return ParsedLine {
            id: None,
            job: Err("invalid job: expected a JSON object".into()),
        };
    };
    let id = fields.remove("id");
    let job = (|| {
        let prompt = match fields.remove("prompt") {
            Some(serde_json::Value::String(p)) => p,
            Some(other) => {
                return Err(format!(
                    "invalid job: `prompt` must be a string, got {other}"
                ))
            }
            None => return Err("invalid job: missing field `prompt`".to_string()),
        };
        let mut merged = serde_json::to_value(defaults).map_err(|e| e.to_string())?;
        if let serde_json::Value::Object(m) = &mut merged {
            for (k, v) in fields {
                m.insert(k.replace('-', "_"), v);
            }
        }
        let options: JobOptions =
            serde_json::from_value(merged).map_err(|e| format!("invalid job options: {e}"))?;
        Ok((prompt, options))
    })();
    ParsedLine { id, job }
}

/// The lines of a batch file (a leading byte-order mark dropped; `\r\n` accepted).
fn batch_lines(bytes: &[u8]) -> Vec<&[u8]> {
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    let mut lines: Vec<&[u8]> = bytes
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .collect();
    if lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    lines
}

fn batch(a: BatchArgs) -> Result<(), Failure> {
    threads(a.model.threads)?;
    let bytes = read_batch_file(&a.jobs)
        .map_err(|e| Failure::usage(format!("cannot read {}: {e}", a.jobs.display())))?;
    let lines = batch_lines(&bytes);
    let (shard, shards) = match &a.shard {
        None => (0, 1),
        Some(s) => {
            let parsed = s.split_once('/').and_then(|(i, k)| {
                Some((
                    i.trim().parse::<usize>().ok()?,
                    k.trim().parse::<usize>().ok()?,
                ))
            });
            match parsed {
                Some((i, k)) if k > 0 && i < k => (i, k),
                _ => {
                    return Err(Failure::usage(format!(
                        "--shard must be I/K with 0 <= I < K (got `{s}`)"
                    )))
                }
            }
        }
    };
    // Build the default options without touching the model, so bad defaults fail early.
    config(&a.defaults)?;
    let parsed: Vec<Option<ParsedLine>> = lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            (!l.trim_ascii().is_empty() && i % shards == shard).then(|| parse_job(l, &a.defaults))
        })
        .collect();
    // The kernel is sized per job (each job's request is checked on its own line).
    precheck(&a.model, &a.defaults)?;
    let t0 = Instant::now();
    let mut kernel = load(&a.model, &a.defaults)?;
    let load_s = t0.elapsed().as_secs_f64();
    let stdout = std::io::stdout();
    for (line_no, line) in parsed.into_iter().enumerate() {
        let Some(ParsedLine { id, job }) = line else {
            continue;
        };
        let error = |e: String| serde_json::json!({ "line": line_no + 1, "id": id, "error": e });
        let value = match job {
            Err(e) => error(e),
            Ok((prompt, options)) => match run_job(&mut kernel, &prompt, &options, false, false) {
                Ok((mut out, _)) => {
                    out.run.id = id.clone();
                    out.run.timing.load_s = load_s;
                    serde_json::to_value(&out).unwrap_or_else(|e| error(e.to_string()))
                }
                Err(f) => error(f.message),
            },
        };
        let mut lock = stdout.lock();
        writeln!(lock, "{value}").map_err(stdout_failure)?;
    }
    Ok(())
}

fn inspect(a: InspectArgs) -> Result<(), Failure> {
    let kernel = TransformerKernel::load(
        a.model.model.as_deref(),
        KernelOptions {
            particles: 1,
            max_new_tokens: 1,
            ..Default::default()
        },
    )?;
    let c = kernel.model().config();
    let path = smc_steer::lm::resolve_model_path(a.model.model.as_deref())?;
    let tok = kernel.tokenizer();
    let special =
        |id: Option<u32>| id.map(|i| serde_json::json!({ "id": i, "text": kernel.decode(&[i]) }));
    let stops: Vec<_> = kernel
        .stop_tokens()
        .iter()
        .map(|&i| serde_json::json!({ "id": i, "text": kernel.decode(&[i]) }))
        .collect();
    let template = kernel
        .apply_chat_template(&[ChatMessage::system("S"), ChatMessage::user("U")], true)
        .ok();
    let info = serde_json::json!({
        "path": path.display().to_string(),
        "architecture": kernel.model().arch().model_type.name(),
        "sliding_window": kernel.model().arch().sliding_window,
        "vocab_size": c.vocab_size,
        "tokenizer_tokens": tok.map(|t| t.vocab_size()),
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "layers": c.n_layers,
        "heads": c.n_heads,
        "kv_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "context_window": c.max_seq_len,
        "rope_theta": c.rope_theta,
        "tied_embeddings": c.tie_embeddings,
        "bos": special(tok.and_then(|t| t.bos_id())),
        "eos": special(tok.and_then(|t| t.eos_id())),
        "stop_tokens": stops,
        "chat_template_example": template,
    });
    match a.format {
        Format::Json => println!("{info}"),
        Format::Text => {
            if let serde_json::Value::Object(m) = &info {
                for (k, v) in m {
                    match v {
                        serde_json::Value::String(s) if k == "chat_template_example" => {
                            println!("{k}:\n{s}")
                        }
                        _ => println!("{k}: {v}"),
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Seed of the batch-line mutation fuzzer.
    const BATCH_FUZZ_SEED: u64 = 0xba7c_41e5;
    /// Cases unless `SMC_STEER_FUZZ_CASES` says otherwise.
    const DEFAULT_CASES: usize = 4000;

    #[test]
    fn batch_line_mutations_never_panic() {
        let cases = std::env::var("SMC_STEER_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_CASES);
        let defaults = JobOptions::default();
        let seeds: &[&[u8]] = &[
            br#"{"id": "a", "prompt": "The Fed says", "max_word_letters": 5}"#,
            br#"{"id": 7, "prompt": "x", "particles": 16, "seed": 7, "steer": 2, "temperature": 0.5}"#,
            br#"{"prompt": "y", "regex": "\\d{4}", "max-tokens": 3, "ess_threshold": 1e308}"#,
            b"\xef\xbb\xbf{\"id\": null, \"prompt\": \"z\", \"chat\": true, \"system\": \"s\"}",
        ];
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(BATCH_FUZZ_SEED);
        let mut valid = 0;
        for _ in 0..cases {
            let mut line = seeds[rng.random_range(0..seeds.len())].to_vec();
            for _ in 0..rng.random_range(1..=4) {
                if line.is_empty() {
                    break;
                }
                let i = rng.random_range(0..line.len());
                match rng.random_range(0..4) {
                    0 => line[i] ^= 1 << rng.random_range(0..8),
                    1 => line[i] = rng.random(),
                    2 => line.insert(i, b"0123456789-e.\"{}[],:\\"[rng.random_range(0..21)]),
                    _ => {
                        line.remove(i);
                    }
                }
            }
            // Parse, split and validate as `batch` does; none of it may panic.
            for l in batch_lines(&line) {
                let parsed = parse_job(l, &defaults);
                if let Ok((_, options)) = &parsed.job {
                    if config(options).is_ok() && spec(options).is_ok() {
                        valid += 1;
                    }
                }
            }
        }
        assert!(
            valid > 0,
            "no mutant stayed valid: the fuzzer explores nothing"
        );
    }

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
