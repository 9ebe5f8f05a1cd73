//! The bad-input catalogue (issue 10): bad and extreme inputs to the `smc-steer` binary and
//! the model loaders, each asserted to end cleanly — no panic or abort, one `error:` line
//! naming the bad value, the documented exit code, bounded wall time and peak memory, no
//! half-written output file — plus seeded byte-mutation fuzzing of the GGUF reader and the
//! `config.json` loader (the batch-line parser is fuzzed in the binary's unit tests).
//!
//! Most cases use tiny model files written here; the few that need the real model skip
//! visibly without it (and fail under `CI=true`). `SMC_STEER_FUZZ_CASES` raises the number
//! of fuzz cases.
#![cfg(feature = "cli")]

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;
use smc_steer::lm::hf_name;
use smc_steer::lm::{KernelOptions, LlamaConfig, LlamaModel, LoadOptions, RopeStyle};

/// Wall time allowed to one case.
const CASE_TIMEOUT: Duration = Duration::from_secs(60);
/// Address-space limit of every child (a runaway allocation fails instead of swapping).
const CHILD_ADDRESS_SPACE: u64 = 8 << 30;
/// Peak resident memory allowed to any child.
const CHILD_PEAK_RSS: u64 = 3 << 30;
/// Seed of the GGUF mutation fuzzer.
const GGUF_FUZZ_SEED: u64 = 0x6767_7566;
/// Seed of the `config.json` mutation fuzzer.
const CONFIG_FUZZ_SEED: u64 = 0xc0f1_6a50;
/// Fuzz cases per loader unless `SMC_STEER_FUZZ_CASES` says otherwise.
const DEFAULT_FUZZ_CASES: usize = 1500;
/// Vocabulary of the tiny models.
const VOCAB: usize = 40;

fn fuzz_cases() -> usize {
    std::env::var("SMC_STEER_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_FUZZ_CASES)
}

fn tiny_config(context: usize) -> LlamaConfig {
    LlamaConfig {
        vocab_size: VOCAB,
        hidden_size: 32,
        intermediate_size: 64,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 8,
        rope_theta: 10_000.0,
        rope_style: RopeStyle::Interleaved,
        rms_eps: 1e-5,
        max_seq_len: context,
        tie_embeddings: true,
    }
}

/// Byte-level BPE tokens: 3 control tokens, a..z, "Ġ" (space), "Ċ" (newline), merges, padding.
fn tokens() -> (Vec<String>, Vec<String>) {
    let mut t: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    t.extend(('a'..='z').map(String::from));
    t.extend(
        ["\u{120}", "\u{10a}", "ab", "\u{120}a", "\u{120}ab"]
            .iter()
            .map(|s| s.to_string()),
    );
    let mut i = 0;
    while t.len() < VOCAB {
        t.push(format!("pad{i}"));
        i += 1;
    }
    let merges = ["a b", "\u{120} a", "\u{120}a b"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    (t, merges)
}

/// A tiny GGUF llama: `edit` may change the metadata and the token list before writing.
fn write_gguf(path: &Path, context: u64, edit: impl FnOnce(&mut Vec<(String, Value)>)) {
    let c = tiny_config(64);
    let tensors = LlamaModel::random_tensors(&c, 11).unwrap();
    let (toks, merges) = tokens();
    let s = |x: &str| Value::String(x.to_string());
    let u = |x: usize| Value::U32(x as u32);
    let types: Vec<Value> = (0..toks.len())
        .map(|i| Value::I32(if i < 3 { 3 } else { 1 }))
        .collect();
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), s("llama")),
        ("llama.embedding_length".into(), u(c.hidden_size)),
        ("llama.feed_forward_length".into(), u(c.intermediate_size)),
        ("llama.block_count".into(), u(c.n_layers)),
        ("llama.attention.head_count".into(), u(c.n_heads)),
        ("llama.attention.head_count_kv".into(), u(c.n_kv_heads)),
        ("llama.rope.dimension_count".into(), u(c.head_dim)),
        ("llama.context_length".into(), Value::U64(context)),
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s("smollm")),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(toks.iter().map(|t| s(t)).collect()),
        ),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(merges.iter().map(|t| s(t)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
    ];
    edit(&mut meta);
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let q: Vec<(String, QTensor)> = names
        .iter()
        .map(|n| {
            (
                (*n).clone(),
                QTensor::quantize(&tensors[*n], GgmlDType::F32).unwrap(),
            )
        })
        .collect();
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = q.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta_refs, &tensor_refs).unwrap();
}

fn set(meta: &mut [(String, Value)], key: &str, value: Value) {
    let entry = meta.iter_mut().find(|(k, _)| k == key).expect("key");
    entry.1 = value;
}

fn edit_tokens(meta: &mut [(String, Value)], f: impl FnOnce(&mut Vec<Value>)) {
    let entry = meta
        .iter_mut()
        .find(|(k, _)| k == "tokenizer.ggml.tokens")
        .expect("tokens");
    if let Value::Array(a) = &mut entry.1 {
        f(a);
    }
}

/// A Hugging Face directory: tiny safetensors and the given `config.json` (no tokenizer).
fn write_hf(dir: &Path, config: serde_json::Value) {
    std::fs::create_dir_all(dir).unwrap();
    let c = LlamaConfig {
        rope_style: RopeStyle::Half,
        ..tiny_config(64)
    };
    let tensors = LlamaModel::random_tensors(&c, 12).unwrap();
    let hf: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| (hf_name(k), v.clone()))
        .collect();
    candle_core::safetensors::save(&hf, dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
}

fn hf_config_json() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 64,
        "tie_word_embeddings": true
    })
}

/// Every fixture file, in one temporary directory.
struct Fixtures {
    dir: PathBuf,
}

impl Fixtures {
    fn new(tag: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("smc-steer-bad-input-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let p = |n: &str| dir.join(n);
        write_gguf(&p("tiny.gguf"), 64, |_| {});
        write_gguf(&p("tiny8k.gguf"), 8192, |_| {});
        write_gguf(&p("ctx-huge.gguf"), u32::MAX as u64, |_| {});
        write_gguf(&p("vocab-meta.gguf"), 64, |m| {
            m.push(("llama.vocab_size".into(), Value::U32(VOCAB as u32 + 1)))
        });
        write_gguf(&p("eos-out.gguf"), 64, |m| {
            set(m, "tokenizer.ggml.eos_token_id", Value::U32(999))
        });
        // One flipped byte in the vocabulary: token "b" becomes a second "c".
        write_gguf(&p("dup-token.gguf"), 64, |m| {
            edit_tokens(m, |t| t[4] = Value::String("c".into()))
        });
        // A merge whose result is not a token (a flipped byte in the merges).
        write_gguf(&p("bad-merge.gguf"), 64, |m| {
            set(
                m,
                "tokenizer.ggml.merges",
                Value::Array(vec![Value::String("a c".into())]),
            )
        });
        write_gguf(&p("short-vocab.gguf"), 64, |m| {
            edit_tokens(m, |t| t.truncate(VOCAB - 5));
            set(
                m,
                "tokenizer.ggml.token_type",
                Value::Array(vec![Value::I32(1); VOCAB - 5]),
            )
        });
        write_gguf(&p("layers-huge.gguf"), 64, |m| {
            set(m, "llama.block_count", Value::U64(1_000_000_000_000))
        });
        write_gguf(&p("width-huge.gguf"), 64, |m| {
            set(m, "llama.embedding_length", Value::U64(1 << 40))
        });
        let good = std::fs::read(p("tiny.gguf")).unwrap();
        std::fs::write(p("truncated.gguf"), &good[..good.len() / 2]).unwrap();
        let mut magic = good.clone();
        magic[0] ^= 0xff;
        std::fs::write(p("magic.gguf"), &magic).unwrap();
        std::fs::write(p("empty.gguf"), b"").unwrap();
        std::fs::write(p("text.gguf"), b"this is not a model\n").unwrap();
        let mut rng = Pcg64Mcg::seed_from_u64(GGUF_FUZZ_SEED);
        let noise: Vec<u8> = (0..4096).map(|_| rng.random()).collect();
        std::fs::write(p("noise.gguf"), &noise).unwrap();
        std::fs::create_dir_all(p("empty-dir")).unwrap();

        let mut layers = hf_config_json();
        layers["num_hidden_layers"] = serde_json::json!(1_000_000_000_000u64);
        write_hf(&p("hf-layers"), layers);
        let mut positions = hf_config_json();
        positions["max_position_embeddings"] = serde_json::json!(1u64 << 62);
        write_hf(&p("hf-positions"), positions);
        let mut negative = hf_config_json();
        negative["num_hidden_layers"] = serde_json::json!(-2);
        write_hf(&p("hf-negative"), negative);
        write_hf(
            &p("hf-text-config"),
            serde_json::json!({"model_type": "gemma3", "text_config": "gemma3_text"}),
        );
        write_hf(&p("hf-badjson"), hf_config_json());
        std::fs::write(p("hf-badjson").join("config.json"), b"{\"vocab_size\": 40,").unwrap();

        std::fs::write(p("empty.txt"), b"").unwrap();
        std::fs::write(p("nul.txt"), b"ab\0ab").unwrap();
        std::fs::write(p("latin1.txt"), b"caf\xe9").unwrap();
        std::fs::write(p("long.txt"), "a".repeat(5000)).unwrap();
        std::fs::write(p("over-window.txt"), "a".repeat(200)).unwrap();
        let big = std::fs::File::create(p("huge.txt")).unwrap();
        big.set_len((16 << 20) + 1).unwrap();

        let mut lark = String::from("start: ");
        let words: Vec<String> = (0..2500)
            .map(|i| {
                let l = |k: usize| char::from(b'a' + ((i / 10usize.pow(k as u32)) % 10) as u8);
                [l(3), l(2), l(1), l(0)].iter().collect()
            })
            .collect();
        lark.push_str(
            &words
                .iter()
                .map(|w| format!("\"{w}\""))
                .collect::<Vec<_>>()
                .join(" | "),
        );
        lark.push('\n');
        std::fs::write(p("big.lark"), lark).unwrap();
        std::fs::write(p("bad.lark"), "start: (\n").unwrap();
        std::fs::write(p("empty.lark"), "").unwrap();
        std::fs::write(p("bad-schema.json"), "{\"type\": ").unwrap();
        std::fs::write(
            p("impossible-schema.json"),
            r#"{"type": "string", "minLength": 5, "maxLength": 2}"#,
        )
        .unwrap();

        let mut jobs = Vec::new();
        jobs.extend_from_slice(b"\xef\xbb\xbf{\"id\": \"bom\", \"prompt\": \"ab\"}\n");
        jobs.extend_from_slice(b"{\"id\": \"latin1\", \"prompt\": \"caf\xe9\"}\n");
        jobs.extend_from_slice(b"{\"id\": \"opt\", \"prompt\": \"ab\", \"bogus\": 1}\n");
        jobs.extend_from_slice(
            b"{\"id\": \"huge\", \"prompt\": \"ab\", \"particles\": 18446744073709551615}\n",
        );
        jobs.extend_from_slice(
            b"{\"id\": \"steer\", \"prompt\": \"ab\", \"particles\": 4611686018427387904, \"steer\": 4}\n",
        );
        jobs.extend_from_slice(
            b"{\"id\": \"many\", \"prompt\": \"ab\", \"particles\": 10000000}\n",
        );
        jobs.extend_from_slice(
            b"{\"id\": \"long\", \"prompt\": \"ab\", \"max_tokens\": 1000000}\n",
        );
        jobs.extend_from_slice(b"{\"id\": \"temp\", \"prompt\": \"ab\", \"temperature\": 0}\n");
        jobs.extend_from_slice(b"{\"id\": 7, \"prompt\": 5}\n");
        jobs.extend_from_slice(b"[1, 2]\n");
        jobs.extend_from_slice(b"{not json\n");
        jobs.extend_from_slice(b"{\"id\": \"ok\", \"prompt\": \"ab\"}\r\n");
        std::fs::write(p("jobs.jsonl"), jobs).unwrap();
        std::fs::write(p("empty.jsonl"), b"").unwrap();
        Self { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

impl Drop for Fixtures {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What a case expects.
#[derive(Clone, Copy)]
enum Expect {
    /// Exit code and a fragment of the one-line error.
    Fail(i32, &'static str),
    /// Success, with a fragment of stdout.
    Ok(&'static str),
}

struct Case {
    name: &'static str,
    args: Vec<String>,
    expect: Expect,
    /// Redirect stdout to this file (`/dev/full`).
    stdout_file: Option<&'static str>,
    /// Environment variables set for the run.
    env: &'static [(&'static str, &'static str)],
}

/// Run the binary bounded in time and address space; returns (status, stdout, stderr,
/// wall time).
fn run_bounded(
    args: &[String],
    stdout_file: Option<&str>,
    env: &[(&str, &str)],
) -> (std::process::ExitStatus, String, String, Duration) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_smc-steer"));
    cmd.args(args)
        .env("RUST_BACKTRACE", "1")
        .env_remove("SMC_STEER_MODEL")
        .env_remove("SMC_STEER_CPU_KERNELS")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    match stdout_file {
        Some(f) => {
            let file = std::fs::OpenOptions::new().write(true).open(f).unwrap();
            cmd.stdout(file);
        }
        None => {
            cmd.stdout(Stdio::piped());
        }
    }
    // SAFETY: setrlimit is async-signal-safe and only touches the child.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: CHILD_ADDRESS_SPACE,
                rlim_max: CHILD_ADDRESS_SPACE,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let started = Instant::now();
    let mut child = cmd.spawn().expect("spawn smc-steer");
    let out = child.stdout.take();
    let err = child.stderr.take();
    let read = |r: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut s);
            }
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let out_t = read(out.map(|o| Box::new(o) as Box<dyn std::io::Read + Send>));
    let err_t = read(err.map(|e| Box::new(e) as Box<dyn std::io::Read + Send>));
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > CASE_TIMEOUT {
            let _ = child.kill();
            panic!("{args:?}: still running after {CASE_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let wall = started.elapsed();
    (status, out_t.join().unwrap(), err_t.join().unwrap(), wall)
}

/// Largest resident set of any child so far (bytes).
fn children_peak_rss() -> u64 {
    // SAFETY: getrusage writes into the struct we own.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) };
    u.ru_maxrss as u64 * 1024
}

fn check_case(case: &Case, out_dir: &Path) -> Result<Duration, String> {
    let (status, stdout, stderr, wall) = run_bounded(&case.args, case.stdout_file, case.env);
    let ctx = || {
        format!(
            "case `{}` ({:?}): status {status:?}, stderr {stderr:?}, stdout {:?}",
            case.name,
            case.args,
            stdout.chars().take(300).collect::<String>()
        )
    };
    if let Some(sig) = status.signal() {
        return Err(format!("killed by signal {sig}: {}", ctx()));
    }
    let code = status.code().unwrap_or(-1);
    if code == 101 || stderr.contains("panicked") || stderr.contains("stack backtrace") {
        return Err(format!("panic: {}", ctx()));
    }
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("warning: "))
        .collect();
    match case.expect {
        Expect::Fail(want, needle) => {
            if code != want {
                return Err(format!("exit code {code}, expected {want}: {}", ctx()));
            }
            if errors.len() != 1 || !errors[0].starts_with("error: ") {
                return Err(format!("expected one `error:` line: {}", ctx()));
            }
            if !errors[0].to_lowercase().contains(&needle.to_lowercase()) {
                return Err(format!("expected {needle:?} in the error: {}", ctx()));
            }
            // Nothing half-written: a failed case leaves its output folder empty.
            let left: Vec<_> = std::fs::read_dir(out_dir)
                .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
                .unwrap_or_default();
            if !left.is_empty() {
                return Err(format!("left files {left:?}: {}", ctx()));
            }
        }
        Expect::Ok(needle) => {
            if code != 0 || !errors.is_empty() {
                return Err(format!("expected success: {}", ctx()));
            }
            if !stdout.contains(needle) {
                return Err(format!("expected {needle:?} on stdout: {}", ctx()));
            }
        }
    }
    Ok(wall)
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// The catalogue of cases needing no real model.
fn catalogue(f: &Fixtures, out: &Path) -> Vec<Case> {
    let tiny = f.path("tiny.gguf");
    let o = |n: &str| out.join(n).display().to_string();
    // `run` on the tiny model with a short generation, plus `extra`.
    let run = |extra: &[&str]| {
        let mut a = strings(&["run", "--model", &tiny, "--prompt", "ab"]);
        if !extra.contains(&"--max-tokens") {
            a.extend(strings(&["--max-tokens", "2"]));
        }
        a.extend(strings(extra));
        a
    };
    let model = |m: &str| strings(&["run", "--model", m, "--prompt", "ab", "--max-tokens", "2"]);
    let fail = Expect::Fail;
    let c = |name: &'static str, args: Vec<String>, expect: Expect| Case {
        name,
        args,
        expect,
        stdout_file: None,
        env: &[],
    };
    let full = |name: &'static str, args: Vec<String>, expect: Expect| Case {
        name,
        args,
        expect,
        stdout_file: Some("/dev/full"),
        env: &[],
    };
    let p = |n: &str| f.path(n);
    vec![
        // Model files.
        c(
            "missing model",
            model("/nonexistent/m.gguf"),
            fail(3, "scripts/fetch-model.sh"),
        ),
        c("empty model", model(&p("empty.gguf")), fail(3, "corrupt")),
        c("text model", model(&p("text.gguf")), fail(3, "corrupt")),
        c("noise model", model(&p("noise.gguf")), fail(3, "corrupt")),
        c(
            "truncated model",
            model(&p("truncated.gguf")),
            fail(3, "corrupt"),
        ),
        c("flipped magic", model(&p("magic.gguf")), fail(3, "corrupt")),
        c(
            "directory model",
            model(&p("empty-dir")),
            fail(3, "config.json"),
        ),
        // The environment's cap on the CPU kernels: a mistyped value is a usage error
        // naming it, not silently no cap.
        Case {
            env: &[("SMC_STEER_CPU_KERNELS", "avx-2")],
            ..c(
                "unknown CPU kernel cap",
                run(&[]),
                fail(2, "SMC_STEER_CPU_KERNELS=`avx-2`"),
            )
        },
        Case {
            env: &[("SMC_STEER_CPU_KERNELS", "portable")],
            ..c("portable CPU kernels", run(&[]), Expect::Ok(""))
        },
        c(
            "device model",
            model("/dev/zero"),
            fail(3, "not a regular file"),
        ),
        c(
            "context 2^32-1",
            model(&p("ctx-huge.gguf")),
            Expect::Ok("log Z"),
        ),
        c(
            "vocab_size metadata",
            model(&p("vocab-meta.gguf")),
            fail(3, "vocab_size"),
        ),
        c(
            "eos id out of range",
            model(&p("eos-out.gguf")),
            fail(3, "EOS token id 999"),
        ),
        c(
            "duplicated token",
            model(&p("dup-token.gguf")),
            fail(3, "distinct"),
        ),
        c(
            "merge outside vocab",
            model(&p("bad-merge.gguf")),
            fail(3, "tokenizer metadata"),
        ),
        c(
            "fewer tokens than rows",
            model(&p("short-vocab.gguf")),
            fail(3, "vocabulary mismatch"),
        ),
        c(
            "gguf 10^12 layers",
            model(&p("layers-huge.gguf")),
            fail(3, "layer count"),
        ),
        c(
            "gguf 2^40 width",
            model(&p("width-huge.gguf")),
            fail(3, "hidden size"),
        ),
        c(
            "hf 10^12 layers",
            model(&p("hf-layers")),
            fail(3, "layer count"),
        ),
        c(
            "hf 2^62 positions",
            model(&p("hf-positions")),
            fail(3, "tokenizer.json"),
        ),
        c(
            "hf negative layers",
            model(&p("hf-negative")),
            fail(3, "corrupt"),
        ),
        c(
            "hf truncated config",
            model(&p("hf-badjson")),
            fail(3, "corrupt"),
        ),
        c(
            "hf multimodal text_config not an object",
            model(&p("hf-text-config")),
            fail(3, "text_config"),
        ),
        // Numeric flags.
        c(
            "zero particles",
            run(&["--particles", "0"]),
            fail(2, "particles"),
        ),
        c(
            "negative particles",
            run(&["--particles", "-1"]),
            fail(2, "-1"),
        ),
        c(
            "2^64-1 particles",
            run(&["--particles", "18446744073709551615"]),
            fail(2, "too large"),
        ),
        c(
            "2^64 particles",
            run(&["--particles", "18446744073709551616"]),
            fail(2, "18446744073709551616"),
        ),
        c(
            "2^62 particles x steer 4",
            run(&["--particles", "4611686018427387904", "--steer", "4"]),
            fail(2, "too large"),
        ),
        c(
            "10^7 particles",
            run(&["--particles", "10000000", "--max-memory", "8G"]),
            fail(2, "lower --particles"),
        ),
        c(
            "over --max-memory",
            run(&["--particles", "1000", "--max-memory", "1M"]),
            fail(2, "needs about"),
        ),
        c(
            "zero --max-memory",
            run(&["--max-memory", "0"]),
            fail(2, "positive size"),
        ),
        c(
            "bad --max-memory unit",
            run(&["--max-memory", "12Q"]),
            fail(2, "unit"),
        ),
        c(
            "zero steer",
            run(&["--steer", "0"]),
            fail(2, "K must be at least 1"),
        ),
        c("negative steer", run(&["--steer", "-3"]), fail(2, "-3")),
        c(
            "zero max-tokens",
            run(&["--max-tokens", "0"]),
            fail(2, "max_tokens"),
        ),
        c(
            "negative max-tokens",
            run(&["--max-tokens", "-5"]),
            fail(2, "-5"),
        ),
        c(
            "max-tokens 10^6",
            run(&["--max-tokens", "1000000"]),
            fail(2, "context window"),
        ),
        c(
            "negative ESS threshold",
            run(&["--ess-threshold", "-1"]),
            fail(2, "ESS threshold"),
        ),
        c(
            "NaN ESS threshold",
            run(&["--ess-threshold", "NaN"]),
            fail(2, "ESS threshold"),
        ),
        c(
            "huge ESS threshold",
            run(&["--ess-threshold", "1e308"]),
            fail(2, "ESS threshold"),
        ),
        c(
            "zero temperature",
            run(&["--temperature", "0"]),
            fail(2, "temperature"),
        ),
        c(
            "negative temperature",
            run(&["--temperature", "-1"]),
            fail(2, "temperature"),
        ),
        c(
            "NaN temperature",
            run(&["--temperature", "NaN"]),
            fail(2, "temperature"),
        ),
        c(
            "infinite temperature",
            run(&["--temperature", "inf"]),
            fail(2, "temperature"),
        ),
        c("negative seed", run(&["--seed", "-1"]), fail(2, "-1")),
        c(
            "zero replicates",
            run(&["--replicates", "0"]),
            fail(2, "replicates"),
        ),
        c("zero threads", run(&["--threads", "0"]), fail(2, "threads")),
        c(
            "unknown weight format",
            run(&["--weights", "q9"]),
            fail(2, "q9"),
        ),
        c("unknown device", run(&["--device", "gpu"]), fail(2, "gpu")),
        c(
            "bad device number",
            run(&["--device", "cuda:x"]),
            fail(2, "cuda:x"),
        ),
        // The default build has no CUDA: the message says how to get it.
        c(
            "device not built in",
            run(&["--device", "cuda:0"]),
            fail(2, "--features cuda"),
        ),
        c(
            "metal device",
            run(&["--device", "metal"]),
            fail(2, "Metal"),
        ),
        c(
            "zero max-word-letters",
            run(&["--max-word-letters", "0"]),
            fail(4, "max-word-letters"),
        ),
        c(
            "negative max-word-letters",
            run(&["--max-word-letters", "-2"]),
            fail(2, "-2"),
        ),
        c(
            "zero cache-tokens",
            run(&["--cache-tokens", "0"]),
            fail(2, "cache-tokens"),
        ),
        c(
            "bad resampling",
            run(&["--resampling", "bogus"]),
            fail(2, "bogus"),
        ),
        c(
            "bad truncation",
            run(&["--truncation", "bogus"]),
            fail(2, "bogus"),
        ),
        // Prompts.
        c(
            "empty prompt",
            strings(&["run", "--model", &tiny, "--prompt", ""]),
            fail(2, "empty"),
        ),
        c(
            "prompt file /dev/zero",
            strings(&["run", "--model", &tiny, "--prompt-file", "/dev/zero"]),
            fail(2, "limit"),
        ),
        c(
            "prompt file too large",
            strings(&["run", "--model", &tiny, "--prompt-file", &p("huge.txt")]),
            fail(2, "limit"),
        ),
        c(
            "empty prompt file",
            strings(&["run", "--model", &tiny, "--prompt-file", &p("empty.txt")]),
            fail(2, "empty"),
        ),
        c(
            "invalid UTF-8 prompt",
            strings(&["run", "--model", &tiny, "--prompt-file", &p("latin1.txt")]),
            fail(2, "UTF-8"),
        ),
        c(
            "prompt file is a directory",
            strings(&["run", "--model", &tiny, "--prompt-file", &p("empty-dir")]),
            fail(2, "directory"),
        ),
        c(
            "NUL in prompt",
            strings(&[
                "run",
                "--model",
                &tiny,
                "--prompt-file",
                &p("nul.txt"),
                "--max-tokens",
                "2",
            ]),
            Expect::Ok("log Z"),
        ),
        c(
            "prompt over the window",
            strings(&[
                "run",
                "--model",
                &tiny,
                "--prompt-file",
                &p("over-window.txt"),
                "--max-tokens",
                "2",
            ]),
            fail(2, "context window"),
        ),
        c(
            "5000-token prompt",
            strings(&[
                "run",
                "--model",
                &p("tiny8k.gguf"),
                "--prompt-file",
                &p("long.txt"),
                "--max-tokens",
                "2",
                "-n",
                "4",
            ]),
            Expect::Ok("log Z"),
        ),
        c(
            "long prompt over --max-memory",
            strings(&[
                "run",
                "--model",
                &p("tiny8k.gguf"),
                "--prompt-file",
                &p("long.txt"),
                "--max-tokens",
                "2",
                "-n",
                "4",
                "--max-memory",
                "1M",
            ]),
            fail(2, "shorter prompt"),
        ),
        c(
            "cache too small",
            strings(&[
                "run",
                "--model",
                &p("tiny8k.gguf"),
                "--prompt-file",
                &p("long.txt"),
                "--max-tokens",
                "2",
                "--cache-tokens",
                "64",
            ]),
            fail(1, "--cache-tokens"),
        ),
        // Constraints.
        c(
            "invalid regex",
            run(&["--regex", "([a-"]),
            fail(4, "invalid regex"),
        ),
        c(
            "huge repetition regex",
            run(&["--regex", "(a|b){1000000}"]),
            Expect::Ok("warning: "),
        ),
        c(
            "pathological regex",
            run(&["--regex", "(a*)*(b*)*(a|b|ab)*c{0,1000}"]),
            Expect::Ok("log Z"),
        ),
        c("empty regex", run(&["--regex", ""]), Expect::Ok("<eos>")),
        c(
            "unsatisfiable regex",
            run(&["--regex", "[^\\x00-\\x{10FFFF}]"]),
            Expect::Ok("every particle died"),
        ),
        c(
            "truncated regex match",
            run(&["--regex", "[ab]{6}", "--max-tokens", "1"]),
            Expect::Ok("warning: "),
        ),
        c(
            "regex with bootstrap",
            run(&["--regex", "a", "--proposal", "bootstrap"]),
            fail(2, "mask"),
        ),
        c(
            "missing grammar",
            run(&["--grammar", "/nonexistent.lark"]),
            fail(4, "Lark grammar"),
        ),
        c(
            "grammar /dev/zero",
            run(&["--grammar", "/dev/zero"]),
            fail(4, "limit"),
        ),
        c(
            "empty grammar",
            run(&["--grammar", &p("empty.lark")]),
            fail(4, "lark"),
        ),
        c(
            "invalid grammar",
            run(&["--grammar", &p("bad.lark")]),
            fail(4, "lark"),
        ),
        c(
            "2,500-literal grammar",
            run(&["--grammar", &p("big.lark"), "--max-tokens", "6"]),
            Expect::Ok("<eos>"),
        ),
        c(
            "invalid schema",
            run(&["--json-schema", &p("bad-schema.json")]),
            fail(4, "schema"),
        ),
        c(
            "unsatisfiable schema",
            run(&["--json-schema", &p("impossible-schema.json")]),
            fail(4, "schema"),
        ),
        c(
            "schema /dev/zero",
            run(&["--json-schema", "/dev/zero"]),
            fail(4, "limit"),
        ),
        // Outputs.
        c(
            "record in a missing folder",
            run(&["--record", &o("no/such/r.json")]),
            fail(2, "--record"),
        ),
        c(
            "report is a directory",
            run(&["--report", &out.display().to_string()]),
            fail(2, "directory"),
        ),
        c(
            "record and report on one path",
            run(&["--record", &o("x"), "--report", &o("x")]),
            fail(2, "same file"),
        ),
        c(
            "record and report on one file, two spellings",
            run(&["--record", &o("x"), "--report", &o("../case/x")]),
            fail(2, "same file"),
        ),
        full("run to a full disk", run(&[]), fail(1, "stdout")),
        full(
            "batch to a full disk",
            strings(&[
                "batch",
                "--model",
                &tiny,
                "--max-tokens",
                "2",
                &p("jobs.jsonl"),
            ]),
            fail(1, "stdout"),
        ),
        // Batch files.
        c(
            "batch /dev/zero",
            strings(&["batch", "--model", &tiny, "/dev/zero"]),
            fail(2, "limit"),
        ),
        c(
            "batch directory",
            strings(&["batch", "--model", &tiny, &p("empty-dir")]),
            fail(2, "directory"),
        ),
        c(
            "batch missing",
            strings(&["batch", "--model", &tiny, "/nonexistent.jsonl"]),
            fail(2, "cannot read"),
        ),
        c(
            "shard 2/2",
            strings(&[
                "batch",
                "--model",
                &tiny,
                "--shard",
                "2/2",
                &p("jobs.jsonl"),
            ]),
            fail(2, "--shard"),
        ),
        c(
            "shard 0/0",
            strings(&[
                "batch",
                "--model",
                &tiny,
                "--shard",
                "0/0",
                &p("jobs.jsonl"),
            ]),
            fail(2, "--shard"),
        ),
        c(
            "shard a/b",
            strings(&[
                "batch",
                "--model",
                &tiny,
                "--shard",
                "a/b",
                &p("jobs.jsonl"),
            ]),
            fail(2, "--shard"),
        ),
        c(
            "empty batch",
            strings(&["batch", "--model", &tiny, &p("empty.jsonl")]),
            Expect::Ok(""),
        ),
        c(
            "batch threads 0",
            strings(&[
                "batch",
                "--model",
                &tiny,
                "--threads",
                "0",
                &p("jobs.jsonl"),
            ]),
            fail(2, "threads"),
        ),
        c(
            "batch bad default",
            strings(&[
                "batch",
                "--model",
                &tiny,
                "--temperature",
                "-1",
                &p("jobs.jsonl"),
            ]),
            fail(2, "temperature"),
        ),
    ]
}

#[test]
fn catalogue_of_bad_inputs_ends_cleanly() {
    let f = Fixtures::new("catalogue");
    let out_root = f.dir.join("out");
    let mut failures = Vec::new();
    let mut n = 0;
    let started = Instant::now();
    for (i, case) in catalogue(&f, &out_root.join("case"))
        .into_iter()
        .enumerate()
    {
        // Each case gets an empty output folder (the same path, recreated).
        let out = out_root.join("case");
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out).unwrap();
        n += 1;
        if let Err(e) = check_case(&case, &out) {
            failures.push(format!("{i}: {e}"));
        }
    }
    let peak = children_peak_rss();
    assert!(
        failures.is_empty(),
        "{} of {n} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(n >= 60, "the catalogue has {n} cases");
    assert!(peak < CHILD_PEAK_RSS, "a child peaked at {peak} bytes");
    let _ = writeln!(
        std::io::stderr(),
        "catalogue: {n} cases in {:.1} s, peak child RSS {} MiB",
        started.elapsed().as_secs_f64(),
        peak >> 20
    );
}

#[test]
fn batch_lines_fail_alone_and_keep_their_ids() {
    let f = Fixtures::new("batch");
    let args = strings(&[
        "batch",
        "--model",
        &f.path("tiny.gguf"),
        "--max-tokens",
        "2",
        "--max-memory",
        "8G",
        &f.path("jobs.jsonl"),
    ]);
    let (status, stdout, stderr, _) = run_bounded(&args, None, &[]);
    assert_eq!(status.code(), Some(0), "{stderr}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let by_line: Vec<(serde_json::Value, Option<String>)> = lines
        .iter()
        .map(|v| (v["id"].clone(), v["error"].as_str().map(String::from)))
        .collect();
    let expect: &[(serde_json::Value, Option<&str>)] = &[
        ("bom".into(), None),
        ("latin1".into(), Some("UTF-8")),
        ("opt".into(), Some("bogus")),
        ("huge".into(), Some("too large")),
        ("steer".into(), Some("too large")),
        ("many".into(), Some("lower --particles")),
        ("long".into(), Some("context window")),
        ("temp".into(), Some("temperature")),
        (7.into(), Some("prompt")),
        (serde_json::Value::Null, Some("object")),
        (serde_json::Value::Null, Some("invalid job")),
        ("ok".into(), None),
    ];
    assert_eq!(by_line.len(), expect.len(), "{stdout}");
    for ((id, err), (want_id, want_err)) in by_line.iter().zip(expect) {
        assert_eq!(id, want_id, "{stdout}");
        match (err, want_err) {
            (None, None) => {}
            (Some(e), Some(w)) => assert!(e.contains(w), "{id}: {e:?} lacks {w:?}"),
            _ => panic!("{id}: error {err:?}, expected {want_err:?}"),
        }
    }
    // The ids from the invalid-UTF-8 line on are unknown only when the line is not JSON.
    assert!(lines[0]["completions"].is_array());
    assert!(lines[11]["completions"].is_array());
}

#[test]
fn truncated_grammar_matches_are_flagged() {
    let f = Fixtures::new("truncated");
    let args = strings(&[
        "run",
        "--model",
        &f.path("tiny.gguf"),
        "--prompt",
        "ab",
        "--regex",
        "[ab]{6}",
        "--max-tokens",
        "1",
        "--format",
        "json",
    ]);
    let (status, stdout, stderr, _) = run_bounded(&args, None, &[]);
    assert_eq!(status.code(), Some(0), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let completions = v["completions"].as_array().unwrap();
    assert!(!completions.is_empty());
    for c in completions {
        assert_eq!(c["finished"], false, "{c}");
    }
    assert!(v["warnings"][0].as_str().unwrap().contains("NOT matches"));
    assert!(stderr.contains("warning: "), "{stderr}");
    // --truncation force-eos conditions on ending in time: no truncated completion.
    let mut forced = args.clone();
    forced.extend(strings(&["--truncation", "force-eos"]));
    let (status, stdout, stderr, _) = run_bounded(&forced, None, &[]);
    assert_eq!(status.code(), Some(0), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(v["completions"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["finished"] == true));
}

#[test]
fn record_is_written_whole_after_the_result() {
    let f = Fixtures::new("record");
    let rec = f.dir.join("rec.json");
    let args = strings(&[
        "run",
        "--model",
        &f.path("tiny.gguf"),
        "--prompt",
        "ab",
        "--max-tokens",
        "2",
        "--record",
        &rec.display().to_string(),
    ]);
    let (status, stdout, stderr, _) = run_bounded(&args, None, &[]);
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stdout.contains("log Z"));
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&rec).unwrap()).unwrap();
    assert_eq!(record["version"], 1);
    let stray: Vec<_> = std::fs::read_dir(&f.dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(stray.is_empty(), "temporary files left: {stray:?}");
}

/// The cases that need the real model (skipped, visibly, without it).
#[test]
fn real_model_requests_are_refused_before_running() {
    let Some(model) = crate::common::real_model() else {
        return;
    };
    let m = model.display().to_string();
    let dir = std::env::temp_dir().join(format!("smc-steer-bad-real-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let jobs = dir.join("jobs.jsonl");
    std::fs::write(
        &jobs,
        "{\"id\": \"many\", \"prompt\": \"Hi\", \"particles\": 100000}\n\
         {\"id\": \"steer\", \"prompt\": \"Hi\", \"particles\": 1000, \"steer\": 100000}\n\
         {\"id\": \"ok\", \"prompt\": \"Hi\", \"max_tokens\": 1, \"particles\": 2}\n",
    )
    .unwrap();
    let s = |a: &[&str]| strings(a);
    let cases = vec![
        Case {
            name: "100k particles",
            args: s(&[
                "run",
                "--model",
                &m,
                "--prompt",
                "Hi",
                "--particles",
                "100000",
            ]),
            expect: Expect::Fail(2, "lower --particles"),
            stdout_file: None,
            env: &[],
        },
        Case {
            name: "steer 100k",
            args: s(&["run", "--model", &m, "--prompt", "Hi", "--steer", "100000"]),
            expect: Expect::Fail(2, "needs about"),
            stdout_file: None,
            env: &[],
        },
        Case {
            name: "max-tokens 10^6",
            args: s(&[
                "run",
                "--model",
                &m,
                "--prompt",
                "Hi",
                "--max-tokens",
                "1000000",
            ]),
            expect: Expect::Fail(2, "context window of 8192"),
            stdout_file: None,
            env: &[],
        },
    ];
    let out = dir.join("out");
    for case in &cases {
        std::fs::create_dir_all(&out).unwrap();
        let wall = check_case(case, &out).unwrap_or_else(|e| panic!("{e}"));
        assert!(wall < Duration::from_secs(10), "{}: {wall:?}", case.name);
    }
    let (status, stdout, stderr, _) = run_bounded(
        &s(&["batch", "--model", &m, &jobs.display().to_string()]),
        None,
        &[],
    );
    assert_eq!(status.code(), Some(0), "{stderr}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(lines[0]["error"].as_str().unwrap().contains("needs about"));
    assert!(lines[1]["error"].as_str().unwrap().contains("needs about"));
    assert!(lines[2]["completions"].is_array(), "{}", lines[2]);
    assert!(children_peak_rss() < CHILD_PEAK_RSS);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Flip, overwrite, insert or delete a few bytes of `good` within `range`.
fn mutate(good: &[u8], range: std::ops::Range<usize>, rng: &mut Pcg64Mcg) -> Vec<u8> {
    let mut b = good.to_vec();
    let edits = rng.random_range(1..=4);
    for _ in 0..edits {
        let end = range.end.min(b.len());
        if end <= range.start {
            break;
        }
        let i = rng.random_range(range.start..end);
        match rng.random_range(0..5) {
            0 => b[i] ^= 1 << rng.random_range(0..8),
            1 => b[i] = rng.random(),
            2 => b[i] = [0x00, 0xff, 0x7f, 0x80][rng.random_range(0..4)],
            3 => {
                b.insert(i, rng.random());
            }
            _ => {
                b.remove(i);
            }
        }
    }
    b
}

#[test]
fn gguf_header_mutations_never_panic() {
    let dir = std::env::temp_dir().join(format!("smc-steer-fuzz-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good_path = dir.join("good.gguf");
    write_gguf(&good_path, 64, |_| {});
    let good = std::fs::read(&good_path).unwrap();
    // Header and metadata: everything before the tensor data.
    let header_end = {
        let mut f = std::fs::File::open(&good_path).unwrap();
        gguf_file::Content::read(&mut f).unwrap().tensor_data_offset as usize
    };
    let mut rng = Pcg64Mcg::seed_from_u64(GGUF_FUZZ_SEED);
    let path = dir.join("mutant.gguf");
    let opts = || KernelOptions {
        cache_tokens: Some(64),
        ..Default::default()
    };
    let (mut ok, mut err) = (0, 0);
    for case in 0..fuzz_cases() {
        let bytes = mutate(&good, 0..header_end, &mut rng);
        std::fs::write(&path, &bytes).unwrap();
        let r = std::panic::catch_unwind(|| {
            smc_steer::lm::TransformerKernel::load(&path, opts()).map(|_| ())
        });
        match r {
            Ok(Ok(())) => ok += 1,
            Ok(Err(_)) => err += 1,
            Err(_) => {
                let keep = dir.with_extension(format!("panic-{case}.gguf"));
                let _ = std::fs::copy(&path, &keep);
                panic!("case {case} panicked (kept as {})", keep.display());
            }
        }
    }
    assert!(err > 0, "mutations should break some files ({ok} loaded)");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn config_json_mutations_never_panic() {
    let dir = std::env::temp_dir().join(format!("smc-steer-fuzz-hf-{}", std::process::id()));
    write_hf(&dir, hf_config_json());
    let good = std::fs::read(dir.join("config.json")).unwrap();
    let mut rng = Pcg64Mcg::seed_from_u64(CONFIG_FUZZ_SEED);
    let (mut ok, mut err) = (0, 0);
    for case in 0..fuzz_cases() {
        let bytes = mutate(&good, 0..good.len(), &mut rng);
        std::fs::write(dir.join("config.json"), &bytes).unwrap();
        let r = std::panic::catch_unwind(|| {
            LlamaModel::from_safetensors(&dir, &LoadOptions::default()).map(|_| ())
        });
        match r {
            Ok(Ok(())) => ok += 1,
            Ok(Err(_)) => err += 1,
            Err(_) => panic!(
                "case {case} panicked on config {:?}",
                String::from_utf8_lossy(&bytes)
            ),
        }
    }
    assert!(err > 0 && ok > 0, "{ok} loaded, {err} refused");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn huge_declared_context_windows_load_without_tables() {
    let dir = std::env::temp_dir().join(format!("smc-steer-ctx-{}", std::process::id()));
    let mut cfg = hf_config_json();
    cfg["max_position_embeddings"] = serde_json::json!(1u64 << 62);
    write_hf(&dir, cfg);
    let m = LlamaModel::from_safetensors(&dir, &LoadOptions::default()).unwrap();
    // Capped, and no table sized by the declared window was built (this test runs in
    // the harness's memory).
    assert_eq!(m.config().max_seq_len, smc_steer::lm::limits::MAX_CONTEXT);
    assert!(m.forward_full(&[3, 9, 27]).is_ok());
    let _ = std::fs::remove_dir_all(&dir);
}
