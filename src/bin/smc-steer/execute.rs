//! Running one job on a loaded model: its replicate runs (with a progress bar on a
//! terminal), the record of the first, and the job's output.

use std::time::Instant;

use smc_steer::lm::TransformerKernel;
use smc_steer::replicate::{seeds, Replicates};
use smc_steer::report::RunRecord;
use smc_steer::{Kernel, Smc, SmcConfig};

use crate::args::JobOptions;
use crate::failure::Failure;
use crate::jobs::{build_program, config, prompt_tokens, sequences, spec};
use crate::output::{warnings, JobOutput, RunOutput};

/// Run the replicates of one job on a loaded kernel; the first run is recorded when
/// `want_record`, and `progress` draws a bar on stderr.
pub fn run_job(
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
    let seeds = seeds(job.seed, job.replicates);
    let started = Instant::now();
    let mut runs = Vec::new();
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
        runs.push(result);
    }
    let run_s = started.elapsed().as_secs_f64();
    let reps = Replicates { runs };
    let run = RunOutput::new(prompt, spec.constraints.clone(), &seeds, &reps, run_s);
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
