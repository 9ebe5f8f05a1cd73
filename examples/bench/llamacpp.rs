//! llama.cpp beside us, in the same run: its `llama-batched-bench` on the same GGUF,
//! requantized by its `llama-quantize` to each format we measure, with the same prompt
//! length, steps and batch sizes (prompt shared by the batch, as our forks share it).
//!
//! The build is found through `SMC_BENCH_LLAMA_CPP`, a directory holding both programs
//! (`scripts/build-llama-cpp.sh` builds them into `target/llama.cpp/build/bin`); without
//! it the bench says so and skips these figures.

use std::path::{Path, PathBuf};
use std::process::Command;

use smc_steer::lm::WeightFormat;

/// Environment variable naming the directory of the llama.cpp programs.
pub const ENV: &str = "SMC_BENCH_LLAMA_CPP";

/// The llama.cpp programs, when `SMC_BENCH_LLAMA_CPP` names a directory holding them.
pub fn find() -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os(ENV)?);
    let ok = ["llama-batched-bench", "llama-quantize"]
        .iter()
        .all(|p| dir.join(p).is_file());
    ok.then_some(dir)
}

/// llama.cpp's name for a weight format (`None`: no counterpart; `native` is the file as
/// it is).
fn ggml_type(format: WeightFormat) -> Option<&'static str> {
    match format {
        WeightFormat::F32 => Some("F32"),
        WeightFormat::Q8_0 => Some("Q8_0"),
        WeightFormat::Q4_0 => Some("Q4_0"),
        WeightFormat::Q4_1 => Some("Q4_1"),
        WeightFormat::Native => Some("native"),
        _ => None,
    }
}

/// The model in `format` for llama.cpp: requantized once into `target/bench-models/`.
fn model_in(bin: &Path, model: &Path, ty: &str) -> Result<PathBuf, String> {
    if ty == "native" {
        return Ok(model.to_path_buf());
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-models/llama.cpp");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let stem = model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let out = dir.join(format!("{stem}.{ty}.gguf"));
    if out.is_file() {
        return Ok(out);
    }
    let status = Command::new(bin.join("llama-quantize"))
        .arg("--allow-requantize")
        .arg(model)
        .arg(&out)
        .arg(ty)
        .output()
        .map_err(|e| format!("llama-quantize: {e}"))?;
    if !status.status.success() {
        let _ = std::fs::remove_file(&out);
        return Err(format!(
            "llama-quantize {ty} failed: {}",
            String::from_utf8_lossy(&status.stderr)
        ));
    }
    Ok(out)
}

/// Milliseconds per decode step (all `n` sequences one token) for each `n`, from
/// llama.cpp's own timing of `steps` generated tokens after a shared `prompt`-token
/// prompt, on `threads` threads. `None` when the format has no llama.cpp counterpart.
pub fn decode_step_ms(
    bin: &Path,
    model: &Path,
    format: WeightFormat,
    prompt: usize,
    steps: usize,
    ns: &[usize],
    threads: usize,
) -> Result<Option<Vec<(usize, f64)>>, String> {
    let Some(ty) = ggml_type(format) else {
        return Ok(None);
    };
    let file = model_in(bin, model, ty)?;
    let max_n = ns.iter().copied().max().unwrap_or(1);
    let list = |v: &[usize]| {
        v.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let out = Command::new(bin.join("llama-batched-bench"))
        .arg("-m")
        .arg(&file)
        .args(["-c", &(max_n * (prompt + steps) + 64).to_string()])
        .args(["-b", "2048", "-ub", "512"])
        .args(["-npp", &prompt.to_string(), "-ntg", &steps.to_string()])
        .args(["-npl", &list(ns), "-pps"])
        .args(["-t", &threads.to_string(), "--output-format", "jsonl"])
        .output()
        .map_err(|e| format!("llama-batched-bench: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "llama-batched-bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    // One JSON object per batch size (on stdout or stderr, depending on the version).
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut rows = Vec::new();
    for line in text.lines().filter(|l| l.starts_with('{')) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if let (Some(n), Some(t), Some(tg)) =
            (v["pl"].as_u64(), v["t_tg"].as_f64(), v["tg"].as_u64())
        {
            rows.push((n as usize, 1e3 * t / tg.max(1) as f64));
        }
    }
    if rows.is_empty() {
        return Err("llama-batched-bench printed no results".into());
    }
    Ok(Some(rows))
}
