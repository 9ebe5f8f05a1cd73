//! A job: its options checked and turned into the library's types (the SMC
//! configuration, the potential of its constraints, the program), its prompt tokens, and a
//! job read from one line of a batch file.

use std::path::Path;
use std::sync::Arc;

use smc_steer::constraints::MaxWordLetters;
use smc_steer::feynman_kac::StepUnit;
use smc_steer::grammar::{Grammar, GrammarConstraint};
use smc_steer::lm::{ChatMessage, TransformerKernel};
use smc_steer::potential::{DynPotential, Product, Trivial};
use smc_steer::{Algorithm, FeynmanKac, ProposalKind, Resampling, SmcConfig, Truncation};

use crate::args::{JobOptions, ProposalArg};
use crate::failure::Failure;
use crate::files::{read_text, MAX_CONSTRAINT_BYTES};

/// A job's constraints, checked without the model.
pub struct Spec {
    pub potential: Arc<dyn DynPotential>,
    pub has_hard: bool,
    pub grammar: Option<Grammar>,
    pub constraints: Vec<String>,
}

/// A grammar or schema file: a bad one is a constraint error (exit 4).
fn read_constraint_file(path: &Path, what: &str) -> Result<String, Failure> {
    read_text(path, MAX_CONSTRAINT_BYTES)
        .map_err(|e| Failure::constraint(format!("cannot read the {what} {}: {e}", path.display())))
}

/// Parse and validate every constraint of a job (before any model work).
pub fn spec(job: &JobOptions) -> Result<Spec, Failure> {
    let mut hard: Vec<Arc<dyn DynPotential>> = Vec::new();
    let mut constraints = Vec::new();
    if let Some(k) = job.max_word_letters {
        if k == 0 {
            return Err(Failure::constraint("--max-word-letters must be at least 1"));
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
            Some(Grammar::json_schema_str(&text).map_err(|e| Failure::constraint(e.to_string()))?)
        }
        (None, None, None) => None,
        _ => {
            return Err(Failure::constraint(
                "give at most one of --regex, --grammar and --json-schema",
            ))
        }
    };
    if let Some(g) = &grammar {
        g.validate()
            .map_err(|e| Failure::constraint(e.to_string()))?;
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
pub fn build_program(
    spec: &Spec,
    job: &JobOptions,
    vocab: &smc_steer::Vocabulary,
) -> Result<FeynmanKac, Failure> {
    if let Some(g) = &spec.grammar {
        // The grammar conditions the proposal (the mask sampler); the job's other hard
        // constraints, if any, are the potential.
        let c = GrammarConstraint::new(vocab, g.clone())
            .map_err(|e| Failure::constraint(e.to_string()))?;
        let potential: Arc<dyn DynPotential> = if spec.has_hard {
            spec.potential.clone()
        } else {
            Arc::new(Trivial)
        };
        return Ok(FeynmanKac::from_arc(potential).with_proposal(ProposalKind::Mask(Arc::new(c))));
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
    Ok(FeynmanKac::from_arc(potential)
        .with_proposal(proposal)
        .with_step_unit(unit))
}

/// Sequences a job keeps in the cache at once: particles, times K under SMC-steer.
pub fn sequences(job: &JobOptions) -> Result<usize, Failure> {
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

/// The SMC configuration of a job, its options checked.
pub fn config(job: &JobOptions) -> Result<SmcConfig, Failure> {
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

/// The prompt's tokens: the text encoded, or under `chat` the model's chat template applied
/// to it as the user's message.
pub fn prompt_tokens(
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

/// A parsed batch line: its `id` (kept even when the rest is invalid) and its job.
pub struct ParsedLine {
    pub id: Option<serde_json::Value>,
    pub job: Result<(String, JobOptions), String>,
}

/// Parse one batch line (invalid UTF-8, bad JSON, unknown or bad options are errors of that
/// line only; its `id` is recovered whenever the line is a JSON object).
pub fn parse_job(line: &[u8], defaults: &JobOptions) -> ParsedLine {
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
pub fn batch_lines(bytes: &[u8]) -> Vec<&[u8]> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::JobOptions;
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
}
