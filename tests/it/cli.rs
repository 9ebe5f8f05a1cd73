//! The `smc-steer` binary: errors without a model, and short runs on SmolLM2.
#![cfg(feature = "cli")]

use crate::common::real_model;

use std::path::PathBuf;
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_smc-steer"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run smc-steer")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A one-line error message, no panic, the expected exit code.
fn assert_clean_failure(o: &Output, code: i32, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
    assert!(err.contains(needle), "expected {needle:?} in {err:?}");
}

#[test]
fn bad_input_gives_one_line_errors_and_exit_codes() {
    let missing = "/nonexistent/model.gguf";
    assert_clean_failure(
        &run(&["run", "--model", missing, "--prompt", "Hi"]),
        3,
        "scripts/fetch-model.sh",
    );
    assert_clean_failure(
        &run(&[
            "run",
            "--model",
            missing,
            "--prompt",
            "Hi",
            "--particles",
            "0",
        ]),
        2,
        "particles",
    );
    assert_clean_failure(&run(&["run", "--model", missing]), 2, "--prompt");
    assert_clean_failure(
        &run(&["run", "--model", missing, "--prompt", ""]),
        2,
        "empty",
    );
    assert_clean_failure(
        &run(&[
            "run",
            "--model",
            missing,
            "--prompt",
            "x",
            "--resampling",
            "bogus",
        ]),
        2,
        "bogus",
    );
    assert_clean_failure(
        &run(&[
            "run",
            "--model",
            missing,
            "--prompt",
            "x",
            "--ess-threshold",
            "2",
        ]),
        2,
        "ESS threshold",
    );
    assert_clean_failure(
        &run(&[
            "run",
            "--model",
            missing,
            "--prompt",
            "x",
            "--max-word-letters",
            "0",
        ]),
        4,
        "max-word-letters",
    );
    assert_clean_failure(&run(&["run", "--bogus-flag"]), 2, "bogus-flag");
    assert_clean_failure(
        &run(&["batch", "/nonexistent/jobs.jsonl"]),
        2,
        "cannot read",
    );
    assert_clean_failure(
        &run(&["batch", "--shard", "3/2", "/nonexistent/jobs.jsonl"]),
        2,
        "cannot read",
    );
    assert_clean_failure(
        &run(&["inspect", "--model", missing]),
        3,
        "scripts/fetch-model.sh",
    );
    let bad_regex = run(&[
        "run", "--model", missing, "--prompt", "x", "--regex", "([a-",
    ]);
    assert_clean_failure(&bad_regex, 4, "invalid regex");
    assert_eq!(stderr(&bad_regex).trim_end().lines().count(), 1, "one line");
    assert_clean_failure(
        &run(&[
            "run",
            "--model",
            missing,
            "--prompt",
            "x",
            "--json-schema",
            "/nonexistent.json",
        ]),
        4,
        "JSON Schema",
    );
    assert_clean_failure(
        &run(&[
            "run",
            "--model",
            missing,
            "--prompt",
            "x",
            "--regex",
            "a",
            "--proposal",
            "bootstrap",
        ]),
        2,
        "mask",
    );
    let help = run(&["--help"]);
    assert_eq!(help.status.code(), Some(0));
}

fn model() -> Option<PathBuf> {
    real_model()
}

#[test]
fn run_json_record_and_report_on_smollm2() {
    let Some(model) = model() else { return };
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cli");
    std::fs::create_dir_all(&dir).unwrap();
    let (record, report) = (dir.join("record.json"), dir.join("report.html"));
    let args = [
        "run",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "The Fed says",
        "--max-word-letters",
        "5",
        "--particles",
        "4",
        "--max-tokens",
        "6",
        "--seed",
        "3",
        "--format",
        "json",
        "--quiet",
        "--record",
        record.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ];
    let out = run(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let completions = v["completions"].as_array().unwrap();
    assert!(!completions.is_empty());
    let total: f64 = completions
        .iter()
        .map(|c| c["probability"].as_f64().unwrap())
        .sum();
    assert!((total - 1.0).abs() < 1e-9);
    for c in completions {
        let text = c["text"].as_str().unwrap();
        assert!(
            text.split(|ch: char| !ch.is_alphabetic())
                .all(|w| w.chars().count() <= 5),
            "{text:?}"
        );
        assert!(c["log_weight"].is_number());
    }
    assert!(v["log_z"].is_number() && v["ess"].as_f64().unwrap() > 0.0);
    assert_eq!(v["replicates"].as_array().unwrap().len(), 1);
    let rec: smc_steer::report::RunRecord =
        serde_json::from_str(&std::fs::read_to_string(&record).unwrap()).unwrap();
    assert_eq!(rec.steps.len(), rec.config.max_tokens.min(rec.steps.len()));
    assert!(rec
        .steps
        .iter()
        .all(|s| s.texts.as_ref().is_some_and(|t| t.len() == 4)));
    let html = std::fs::read_to_string(&report).unwrap();
    assert!(html.contains("id=\"tree\"") && html.contains("The Fed says"));
    // Same seed, other thread count: same answer.
    let again = run(&[&args[..15], &["--threads", "1"]].concat());
    assert!(again.status.success(), "{}", stderr(&again));
    let w: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(v["completions"], w["completions"]);
    assert_eq!(v["log_z"], w["log_z"]);
}

#[test]
fn batch_keeps_order_and_reports_bad_lines() {
    let Some(model) = model() else { return };
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cli-batch");
    std::fs::create_dir_all(&dir).unwrap();
    let jobs = dir.join("jobs.jsonl");
    std::fs::write(
        &jobs,
        "{\"id\": \"fed\", \"prompt\": \"The Fed says\", \"max_word_letters\": 5}\n\
         this is not json\n\
         {\"id\": \"cat\", \"prompt\": \"My cat\", \"particles\": 3, \"seed\": 7}\n\
         {\"id\": \"bad\", \"prompt\": \"x\", \"resampling\": \"bogus\"}\n",
    )
    .unwrap();
    let out = run(&[
        "batch",
        jobs.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--max-tokens",
        "3",
        "--particles",
        "2",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[0]["id"], "fed");
    assert!(lines[1]["error"].as_str().unwrap().contains("invalid job"));
    assert_eq!(lines[1]["line"], 2);
    assert_eq!(lines[2]["id"], "cat");
    assert_eq!(
        lines[2]["replicates"][0]["steps"].as_u64().map(|s| s <= 3),
        Some(true)
    );
    assert!(lines[3]["error"].as_str().unwrap().contains("bogus"));
    // Shards partition the lines.
    let shard = run(&[
        "batch",
        jobs.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--max-tokens",
        "2",
        "--particles",
        "2",
        "--shard",
        "1/2",
    ]);
    let ids: Vec<serde_json::Value> = String::from_utf8_lossy(&shard.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "lines 1 and 3 of 0..4");
}

#[test]
fn regex_constraint_on_smollm2() {
    let Some(model) = model() else { return };
    let out = run(&[
        "run",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "Today's date in ISO format is",
        "--regex",
        "[0-9]{4}-[0-9]{2}-[0-9]{2}",
        "--particles",
        "4",
        "--max-tokens",
        "12",
        "--format",
        "json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let date = |t: &str| {
        t.len() == 10
            && t.chars().enumerate().all(|(i, c)| {
                if i == 4 || i == 7 {
                    c == '-'
                } else {
                    c.is_ascii_digit()
                }
            })
    };
    for c in v["completions"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        if c["eos"].as_bool().unwrap() {
            assert!(date(text), "{text:?}");
        }
    }
}

#[test]
fn inspect_describes_smollm2() {
    let Some(model) = model() else { return };
    let out = run(&[
        "inspect",
        "--model",
        model.to_str().unwrap(),
        "--format",
        "json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["vocab_size"], 49152);
    assert_eq!(v["layers"], 30);
    // The file's Q4_1 matrices (7 per layer; the tied embedding is Q8_0), and how the
    // default f32 holds them.
    assert_eq!(v["file_matrices"]["Q4_1"]["count"], 210);
    assert_eq!(v["file_matrices"]["Q4_1"]["held_as"], "dense f32");
    assert!(v["chat_template_example"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));
}
