//! Runs each constraint example once on the real model (SmolLM2-135M-Instruct) with `--json`
//! and checks its output: every returned JSON completion validates against the schema,
//! every date matches the regex, the lipogram has no `e`, the infilled text keeps its
//! fragments. Skips with a message when the model file is missing, unless `CI=true`.
//!
//! The example binaries are built on demand (same profile as this test).
#![cfg(all(feature = "lm", feature = "grammar"))]

use crate::common::real_model;

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn model_available() -> bool {
    real_model().is_some()
}

const EXAMPLES: [&str; 5] = [
    "regex",
    "json_schema",
    "char_potential",
    "prompt_intersection",
    "infilling",
];

/// The example binary; the first call builds all of them (one cargo call, same profile).
fn example(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>
    let profile_dir = exe
        .parent()
        .and_then(|p| p.parent())
        .expect("target profile directory")
        .to_path_buf();
    let ok = BUILT.get_or_init(|| {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "--quiet"]);
        for e in EXAMPLES {
            cmd.args(["--example", e]);
        }
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        if let Some(target) = profile_dir.parent() {
            cmd.env("CARGO_TARGET_DIR", target);
        }
        cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .is_ok_and(|s| s.success())
    });
    assert!(*ok, "building the examples failed");
    profile_dir.join("examples").join(name)
}

fn run_json(name: &str, args: &[&str]) -> Value {
    let out = Command::new(example(name))
        .args(args)
        .arg("--json")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run example");
    assert!(
        out.status.success(),
        "{name} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8 output");
    let v: Value = serde_json::from_str(text.trim()).expect("one JSON object");
    for key in ["particles", "log_z", "ess", "tokens_per_second"] {
        assert!(v.get(key).is_some(), "{name}: `{key}` missing in {v}");
    }
    v
}

/// Texts of the particles with positive weight.
fn alive(v: &Value) -> Vec<String> {
    let ps = v["particles"].as_array().expect("particles array");
    assert!(!ps.is_empty());
    ps.iter()
        .filter(|p| p["log_weight"].is_number())
        .map(|p| p["text"].as_str().expect("text").to_string())
        .collect()
}

/// A small JSON Schema validator: `type`, `properties`, `required`,
/// `additionalProperties: false`, `minimum`/`maximum`, `minLength`/`maxLength`, `enum`.
fn validates(x: &Value, schema: &Value) -> Result<(), String> {
    if let Some(options) = schema.get("enum").and_then(Value::as_array) {
        if !options.contains(x) {
            return Err(format!("{x} not in enum"));
        }
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("object") => {
            let o = x.as_object().ok_or(format!("{x} is not an object"))?;
            let props = schema.get("properties").and_then(Value::as_object);
            for r in schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let r = r.as_str().unwrap_or("");
                if !o.contains_key(r) {
                    return Err(format!("required `{r}` missing"));
                }
            }
            for (k, val) in o {
                match props.and_then(|p| p.get(k)) {
                    Some(s) => validates(val, s)?,
                    None if schema.get("additionalProperties") == Some(&Value::Bool(false)) => {
                        return Err(format!("additional property `{k}`"))
                    }
                    None => {}
                }
            }
        }
        Some("string") => {
            let s = x.as_str().ok_or(format!("{x} is not a string"))?;
            let n = s.chars().count() as u64;
            if schema["maxLength"].as_u64().is_some_and(|m| n > m)
                || schema["minLength"].as_u64().is_some_and(|m| n < m)
            {
                return Err(format!("string length {n} out of bounds"));
            }
        }
        Some("integer") | Some("number") => {
            let f = x.as_f64().ok_or(format!("{x} is not a number"))?;
            if schema["type"] == "integer" && !(x.is_i64() || x.is_u64()) {
                return Err(format!("{x} is not an integer"));
            }
            if schema["minimum"].as_f64().is_some_and(|m| f < m)
                || schema["maximum"].as_f64().is_some_and(|m| f > m)
            {
                return Err(format!("{x} out of range"));
            }
        }
        Some("boolean") if !x.is_boolean() => return Err(format!("{x} is not a boolean")),
        _ => {}
    }
    Ok(())
}

#[test]
fn the_validator_rejects_what_it_should() {
    let schema: Value = serde_json::json!({
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 3}, "age": {"type": "integer", "minimum": 0}},
        "required": ["name", "age"],
        "additionalProperties": false
    });
    assert!(validates(&serde_json::json!({"name": "Bo", "age": 3}), &schema).is_ok());
    for bad in [
        serde_json::json!({"name": "Bobby", "age": 3}),
        serde_json::json!({"name": "Bo"}),
        serde_json::json!({"name": "Bo", "age": -1}),
        serde_json::json!({"name": "Bo", "age": 1.5}),
        serde_json::json!({"name": "Bo", "age": 1, "x": 0}),
        serde_json::json!([1]),
    ] {
        assert!(validates(&bad, &schema).is_err(), "{bad}");
    }
}

#[test]
fn invalid_regex_fails_before_loading_the_model() {
    let out = Command::new(example("regex"))
        .args(["--regex", "(unclosed", "--model", "/nonexistent/model.gguf"])
        .output()
        .expect("run example");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid regex `(unclosed`"), "{err}");
    let out = Command::new(example("json_schema"))
        .args([
            "--schema",
            "{\"type\": 7}",
            "--model",
            "/nonexistent/model.gguf",
        ])
        .output()
        .expect("run example");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid JSON Schema"), "{err}");
}

#[test]
fn json_schema_completions_validate() {
    if !model_available() {
        return;
    }
    let v = run_json("json_schema", &[]);
    let schema = v["schema"].clone();
    let texts = alive(&v);
    assert!(!texts.is_empty(), "every particle died: {v}");
    for t in texts {
        let x: Value = serde_json::from_str(&t).unwrap_or_else(|e| panic!("{t:?}: {e}"));
        validates(&x, &schema).unwrap_or_else(|e| panic!("{t:?}: {e}"));
    }
    let rows = v["locally_constrained_vs_posterior"].as_array().unwrap();
    assert!(!rows.is_empty());
    for r in rows {
        let x: Value = serde_json::from_str(r["text"].as_str().unwrap()).unwrap();
        validates(&x, &schema).unwrap();
    }
}

#[test]
fn regex_completions_match() {
    if !model_available() {
        return;
    }
    let v = run_json("regex", &[]);
    let texts = alive(&v);
    assert!(!texts.is_empty(), "every particle died: {v}");
    for t in texts {
        let b = t.as_bytes();
        let ok = b.len() == 10
            && b.iter().enumerate().all(|(i, c)| {
                if i == 4 || i == 7 {
                    *c == b'-'
                } else {
                    c.is_ascii_digit()
                }
            });
        assert!(ok, "{t:?} is not an ISO date");
    }
    let v = run_json("regex", &["--regex", "(yes|no)", "--max-tokens", "4"]);
    for t in alive(&v) {
        assert!(t == "yes" || t == "no", "{t:?}");
    }
}

#[test]
fn char_potential_outputs_have_no_e() {
    if !model_available() {
        return;
    }
    for extra in [&[][..], &["--awrs"][..]] {
        let v = run_json("char_potential", extra);
        let texts = alive(&v);
        assert!(!texts.is_empty(), "every particle died: {v}");
        for t in texts {
            assert!(!t.contains(['e', 'E']), "{t:?}");
            assert!(
                t.split(|c: char| !c.is_ascii_alphabetic())
                    .all(|w| w.len() <= 7),
                "{t:?}"
            );
        }
    }
}

#[test]
fn infilling_keeps_the_fragments() {
    if !model_available() {
        return;
    }
    let v = run_json("infilling", &[]);
    let texts = alive(&v);
    assert!(!texts.is_empty());
    for t in texts {
        assert!(t.starts_with("Well, you see, every"), "{t:?}");
        assert!(t.ends_with('!'), "{t:?}");
        let mut rest = &t[..];
        for f in [" he", " to", " another"] {
            let i = rest
                .find(f)
                .unwrap_or_else(|| panic!("{f:?} missing in {t:?}"));
            rest = &rest[i + f.len()..];
        }
    }
}

#[test]
fn prompt_intersection_runs() {
    if !model_available() {
        return;
    }
    let v = run_json("prompt_intersection", &[]);
    assert_eq!(v["prompts"].as_array().map(Vec::len), Some(2));
    assert!(!alive(&v).is_empty());
    assert!(v["log_z"].is_number());
}
