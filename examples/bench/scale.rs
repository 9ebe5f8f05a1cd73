//! Large populations: decode and SMC step times at n = 256 and 512 and the CPU utilisation
//! of the SMC steps (process CPU time over wall time, 200% = both cores of a 2-core
//! machine busy all the time), to find serial stages.
//!
//! `SMC_BENCH_ONLY=scale cargo run --release --example bench -- --json [--ns 256,512]`

use std::time::Instant;

use smc_steer::potential::Trivial;
use smc_steer::{FeynmanKac, Smc, SmcConfig, TokenId};

use super::{decode_ours, median, ms, Args, Report};

/// User plus system CPU seconds of this process so far (Linux `/proc/self/stat`, in clock
/// ticks of 1/100 s, the value of `getconf CLK_TCK` on Linux x86-64).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after ')'.
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

pub fn run(report: &mut Report, args: &Args, prompt: &[TokenId]) -> Result<(), String> {
    for &n in &args.ns {
        let mut kernel = super::load(args, n, args.steps + 4)?;
        let (times, _) = decode_ours(&mut kernel, prompt, n, args.steps)?;
        let decode = median(times);
        report.emit("decode_step_ms", "smc-steer", n, decode, "ms");
        let config = SmcConfig {
            particles: n,
            max_tokens: args.steps + 2,
            ..SmcConfig::default()
        };
        let mut smc = Smc::new(kernel, FeynmanKac::new(Trivial), prompt, config)
            .map_err(|e| e.to_string())?;
        smc.step().map_err(|e| e.to_string())?; // warm-up
        let (cpu0, wall0) = (cpu_seconds(), Instant::now());
        let mut times = Vec::new();
        for _ in 0..args.steps {
            let t0 = Instant::now();
            smc.step().map_err(|e| e.to_string())?;
            times.push(ms(t0));
        }
        let wall = wall0.elapsed().as_secs_f64();
        let step = median(times);
        report.emit("smc_step_ms", "smc-steer", n, step, "ms");
        report.emit("smc_overhead", "smc-steer", n, step / decode, "ratio");
        if let (Some(a), Some(b)) = (cpu0, cpu_seconds()) {
            report.emit(
                "cpu_utilisation",
                "smc-steer",
                n,
                100.0 * (b - a) / wall,
                "%",
            );
        }
    }
    Ok(())
}
