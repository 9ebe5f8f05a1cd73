//! Where the command line, the examples and the tests look for a model when none is named:
//! `--model`, else `$SMC_STEER_MODEL`, else the repository's `models/` folder. This is an
//! application's default, not the library's: the library's loaders take an explicit path and
//! their errors name that path only.
//!
//! One file for all three: examples/support, examples/bench, examples/hard_constraints.rs
//! and tests/it/common.rs include it with `#[path]`, so the default lives in one place.

use std::path::{Path, PathBuf};

use smc_steer::lm::LmError;

/// File name of the default model (fetched by `scripts/fetch-model.sh`).
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Environment variable naming the model file.
pub const MODEL_ENV: &str = "SMC_STEER_MODEL";

/// The model to load: `explicit`, else `$SMC_STEER_MODEL`, else
/// `models/SmolLM2-135M-Instruct.Q4_1.gguf` relative to the working directory, or, when that
/// is missing and this checkout's copy exists, relative to the repository this program was
/// built from (so `cargo run` works from any folder). The file may not exist; loading it
/// reports that.
pub fn resolve(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    if let Some(p) = std::env::var_os(MODEL_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let local = Path::new("models").join(DEFAULT_MODEL_FILE);
    let checkout = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(DEFAULT_MODEL_FILE);
    if !local.exists() && checkout.exists() {
        checkout
    } else {
        local
    }
}

/// A model error's message for a person: a missing model says how to get one.
pub fn explain(e: &LmError) -> String {
    match e {
        LmError::ModelNotFound { .. } => format!(
            "{e} (run scripts/fetch-model.sh to download SmolLM2-135M-Instruct, or set \
             {MODEL_ENV} to a GGUF file)"
        ),
        _ => e.to_string(),
    }
}
