//! Setting up the model for a command: worker threads, the kernel's options from the flags
//! and a job, the header check before loading, and loading.

use smc_steer::lm::{parse_device, KernelOptions, TransformerKernel};

use crate::args::{JobOptions, ModelArgs};
use crate::failure::Failure;
use crate::jobs::sequences;
use crate::model_path;

/// Size the global worker pool (`--threads`); left out, rayon uses every core.
pub fn threads(n: Option<usize>) -> Result<(), Failure> {
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

pub fn kernel_options(model: &ModelArgs, job: &JobOptions) -> Result<KernelOptions, Failure> {
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
        weights: model.weights,
        device: parse_device(&model.device)?,
        ..KernelOptions::default()
    })
}

/// Check a job against the model's header (sizes, memory) without loading the weights.
pub fn precheck(model: &ModelArgs, job: &JobOptions) -> Result<(), Failure> {
    let opts = kernel_options(model, job)?;
    let config = smc_steer::lm::read_config(&model_path::resolve(model.model.as_deref()))?;
    Ok(opts.check(&config)?)
}

/// Load the model sized for a job.
pub fn load(model: &ModelArgs, job: &JobOptions) -> Result<TransformerKernel, Failure> {
    let opts = kernel_options(model, job)?;
    let path = model_path::resolve(model.model.as_deref());
    Ok(TransformerKernel::load(&path, opts)?)
}
