//! `smc-steer batch`: one job per line of a JSONL file, one JSON result per line on
//! stdout, in order; a bad line is reported on its own line and the others still run.

use std::io::Write;
use std::time::Instant;

use crate::args::BatchArgs;
use crate::execute::run_job;
use crate::failure::Failure;
use crate::files::read_batch_file;
use crate::jobs::{batch_lines, config, parse_job, ParsedLine};
use crate::kernel::{load, precheck, threads};

/// Run the jobs of a batch file (of one shard of it) on one loaded model.
pub fn batch(a: BatchArgs) -> Result<(), Failure> {
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
        writeln!(lock, "{value}").map_err(Failure::stdout)?;
    }
    Ok(())
}
