//! `smc-steer run`: one prompt, its posterior over completions on stdout, optionally the
//! first run's record and HTML report.

use std::io::{IsTerminal, Write};
use std::time::Instant;

use crate::args::{Format, RunArgs};
use crate::execute::run_job;
use crate::failure::Failure;
use crate::files::{canonical, read_text, OutputFile, MAX_PROMPT_BYTES};
use crate::jobs::{config, spec};
use crate::kernel::{load, precheck, threads};
use crate::output::print_text;

/// Run one job: check everything that needs no model, load it, run, print.
pub fn run(a: RunArgs) -> Result<(), Failure> {
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
            let json = serde_json::to_string(&out).map_err(|e| Failure::runtime(e.to_string()))?;
            writeln!(stdout, "{json}").map_err(Failure::stdout)?;
        }
        Format::Text => {
            print_text(&out.run, &mut stdout).map_err(Failure::stdout)?;
            for w in &out.warnings {
                writeln!(stdout, "warning: {w}").map_err(Failure::stdout)?;
            }
        }
    }
    stdout.flush().map_err(Failure::stdout)?;
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
