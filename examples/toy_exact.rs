//! SMC on a toy kernel beside the exact answer.
//!
//! A random bigram kernel over `a`, `b`, `c` (+ EOS), a hard constraint (no `cc`) and a soft
//! potential (+0.7 per `a`): every sequence up to `--max-tokens` is enumerated for the exact
//! posterior and `log Z`, and `--replicates` independent SMC runs are compared with them.
//!
//! ```text
//! cargo run --release --example toy_exact -- [--particles N] [--replicates R] [--max-tokens T]
//!     [--seed S] [--ess-threshold X] [--resampling SCHEME] [--steer K] [--json]
//! ```

use std::collections::HashMap;
use std::process::ExitCode;

use smc_steer::potential::{Hard, Product, Soft};
use smc_steer::replicate::run_replicates;
use smc_steer::testing::enumerate;
use smc_steer::testing::ToyKernel;
use smc_steer::{Algorithm, FeynmanKac, Resampling, Smc, SmcConfig, Truncation};

const KERNEL_SEED: u64 = 20261127;

struct Args {
    particles: usize,
    replicates: usize,
    max_tokens: usize,
    seed: u64,
    ess_threshold: f64,
    resampling: Resampling,
    steer: Option<usize>,
    json: bool,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        particles: 256,
        replicates: 100,
        max_tokens: 5,
        seed: 1,
        ess_threshold: 0.5,
        resampling: Resampling::Stratified,
        steer: None,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match flag.as_str() {
            "--particles" => {
                a.particles = value("--particles")?
                    .parse()
                    .map_err(|e| format!("--particles: {e}"))?
            }
            "--replicates" => {
                a.replicates = value("--replicates")?
                    .parse()
                    .map_err(|e| format!("--replicates: {e}"))?
            }
            "--max-tokens" => {
                a.max_tokens = value("--max-tokens")?
                    .parse()
                    .map_err(|e| format!("--max-tokens: {e}"))?
            }
            "--seed" => {
                a.seed = value("--seed")?
                    .parse()
                    .map_err(|e| format!("--seed: {e}"))?
            }
            "--ess-threshold" => {
                a.ess_threshold = value("--ess-threshold")?
                    .parse()
                    .map_err(|e| format!("--ess-threshold: {e}"))?
            }
            "--resampling" => {
                a.resampling = value("--resampling")?.parse().map_err(|e| format!("{e}"))?
            }
            "--steer" => {
                a.steer = Some(
                    value("--steer")?
                        .parse()
                        .map_err(|e| format!("--steer: {e}"))?,
                )
            }
            "--json" => a.json = true,
            "--help" | "-h" => return Err(
                "usage: toy_exact [--particles N] [--replicates R] [--max-tokens T] [--seed S] \
                            [--ess-threshold X] [--resampling SCHEME] [--steer K] [--json]"
                    .into(),
            ),
            other => return Err(format!("unknown argument `{other}` (try --help)")),
        }
    }
    if a.replicates == 0 {
        return Err("--replicates must be at least 1".into());
    }
    if a.max_tokens > 9 {
        return Err("--max-tokens above 9 makes the enumeration too large".into());
    }
    Ok(a)
}

fn potential() -> Product {
    Product::new("no-cc-likes-a")
        .with(Hard::on_text("no-cc", |t: &str| !t.contains("cc")))
        .with(Soft::on_text("likes-a", |t: &str| {
            0.7 * t.matches('a').count() as f64
        }))
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let args = parse()?;
    let kernel = ToyKernel::random_bigram(3, 0.3, KERNEL_SEED).map_err(|e| e.to_string())?;
    let truncation = Truncation::Truncate;
    let exact = enumerate(&kernel, &potential(), &[], args.max_tokens, truncation)
        .map_err(|e| e.to_string())?;
    let config = SmcConfig {
        particles: args.particles,
        max_tokens: args.max_tokens,
        ess_threshold: args.ess_threshold,
        resampling: args.resampling,
        algorithm: args
            .steer
            .map_or(Algorithm::Standard, |beam| Algorithm::Steer { beam }),
        truncation,
        ..SmcConfig::default()
    };
    config.validate().map_err(|e| e.to_string())?;
    let reps = run_replicates(args.seed, args.replicates, |seed| {
        Smc::new(
            kernel.clone(),
            FeynmanKac::new(potential()),
            &[],
            SmcConfig {
                seed,
                ..config.clone()
            },
        )?
        .run()
    })
    .map_err(|e| e.to_string())?;

    let ratio = reps.z_ratio(exact.log_z);
    let log_z = reps.log_z();
    let target = exact.posterior();
    let pooled: HashMap<_, _> = reps
        .pooled_posterior()
        .into_iter()
        .map(|d| ((d.tokens, d.eos), d.probability))
        .collect();
    let tv: f64 = 0.5
        * target
            .keys()
            .chain(pooled.keys().filter(|k| !target.contains_key(*k)))
            .map(|k| {
                (target.get(k).copied().unwrap_or(0.0) - pooled.get(k).copied().unwrap_or(0.0))
                    .abs()
            })
            .sum::<f64>();
    let vocab = kernel.vocab_ref();
    let mut top: Vec<_> = target.iter().collect();
    top.sort_by(|a, b| b.1.total_cmp(a.1));

    if args.json {
        let rows: Vec<_> = top
            .iter()
            .take(10)
            .map(|((t, eos), p)| {
                serde_json::json!({
                    "text": vocab.decode(t), "eos": eos, "exact": p,
                    "smc": pooled.get(&(t.clone(), *eos)).copied().unwrap_or(0.0),
                })
            })
            .collect();
        let out = serde_json::json!({
            "log_z_exact": exact.log_z,
            "log_z_mean": log_z.mean,
            "log_z_se": log_z.se,
            "z_ratio": ratio.mean,
            "z_rel_se": ratio.se / ratio.mean,
            "tv_distance": tv,
            "replicates": args.replicates,
            "particles": args.particles,
            "max_tokens": args.max_tokens,
            "algorithm": config.algorithm,
            "resampling": args.resampling,
            "top": rows,
        });
        println!("{out}");
    } else {
        println!("toy kernel: bigram over a, b, c (+EOS); potential: no `cc` (hard) × exp(0.7·#a) (soft)");
        println!(
            "{} replicates × {} particles, max {} tokens, {:?}, {}",
            args.replicates,
            args.particles,
            args.max_tokens,
            config.algorithm,
            args.resampling.name()
        );
        println!("log Z exact      {:>10.5}", exact.log_z);
        println!("log Ẑ mean ± se  {:>10.5} ± {:.5}", log_z.mean, log_z.se);
        println!("mean Ẑ / Z       {:>10.5} ± {:.5}", ratio.mean, ratio.se);
        println!("TV(pooled SMC, exact) = {tv:.4}");
        println!(
            "\n{:<12} {:>5} {:>9} {:>9}",
            "completion", "eos", "exact", "smc"
        );
        for ((t, eos), p) in top.iter().take(10) {
            let smc = pooled.get(&(t.clone(), *eos)).copied().unwrap_or(0.0);
            println!(
                "{:<12} {:>5} {:>9.4} {:>9.4}",
                format!("{:?}", vocab.decode(t)),
                eos,
                p,
                smc
            );
        }
    }
    Ok(())
}
