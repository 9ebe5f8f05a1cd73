//! The HTML report in a real browser: headless Chromium renders it, runs its script, and
//! the expected elements are in the resulting DOM; a screenshot is saved.
//!
//! Needs Debian's `chromium` (installed by .ci/run). Without it the tests skip with a
//! message, except under CI (`CI=true`), where they fail.

use std::path::{Path, PathBuf};
use std::process::Command;

use smc_steer::potential::{Hard, Soft};
use smc_steer::report::RunRecord;
use smc_steer::testing::ToyKernel;
use smc_steer::{FeynmanKac, Smc, SmcConfig};

const KERNEL_SEED: u64 = 99;

fn chromium() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("SMC_STEER_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            let ok = Command::new("which")
                .arg(name)
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            ok.then(|| PathBuf::from(name))
        })
}

fn browser_or_skip() -> Option<PathBuf> {
    match chromium() {
        Some(b) => Some(b),
        None if crate::common::under_ci() => {
            panic!("chromium is required under CI (apt-get install chromium)")
        }
        None => {
            crate::common::skip(
                "chromium not found (apt-get install chromium, or set SMC_STEER_CHROMIUM)",
            );
            None
        }
    }
}

fn artifacts() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("report");
    std::fs::create_dir_all(&dir).expect("create the artifacts directory");
    dir
}

fn chrome(browser: &Path, profile: &Path, extra: &[String]) -> String {
    let mut args: Vec<String> = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(format!("--user-data-dir={}", profile.display()));
    args.extend_from_slice(extra);
    let out = Command::new("timeout")
        .arg("120")
        .arg(browser)
        .args(&args)
        .output()
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn toy_record(potential: impl smc_steer::Potential + 'static) -> RunRecord {
    let config = SmcConfig {
        particles: 12,
        max_tokens: 6,
        record: true,
        record_text: true,
        ess_threshold: 0.8,
        ..SmcConfig::default()
    };
    let kernel = ToyKernel::random_bigram(3, 0.2, KERNEL_SEED).unwrap();
    let result = Smc::new(kernel, FeynmanKac::new(potential), &[], config.clone())
        .unwrap()
        .run()
        .unwrap();
    RunRecord::from_result("toy: ", vec!["test potential".into()], &config, &result)
}

#[test]
fn report_renders_in_chromium_with_a_working_particle_view() {
    let Some(browser) = browser_or_skip() else {
        return;
    };
    let record = toy_record(Soft::on_text("likes-a", |t: &str| {
        1.5 * t.matches('a').count() as f64
    }));
    assert!(
        record.steps.iter().any(|s| s.resampled),
        "the toy run should resample at least once"
    );
    let dir = artifacts();
    let html = dir.join("report.html");
    std::fs::write(&html, record.to_html()).unwrap();
    // Select particle 1 of step 2 through the page's own click handler (via the URL hash).
    let url = format!("file://{}#select=2,1", html.display());
    let dom = chrome(
        &browser,
        &dir.join("profile-a"),
        &["--dump-dom".into(), url.clone()],
    );
    assert!(dom.contains("data-ready=\"1\""), "the report's script ran");
    for needle in [
        "id=\"ess-chart\"",
        "id=\"logz-chart\"",
        "class=\"resample-mark\"",
        "class=\"resample-band\"",
        "class=\"bar\"",
        "id=\"detail-history\"",
    ] {
        assert!(dom.contains(needle), "missing {needle}");
    }
    let nodes = dom.matches("class=\"node").count();
    let expected: usize = record.steps.iter().map(|s| s.log_weights.len()).sum();
    assert_eq!(nodes, expected, "one dot per particle per step");
    let text = &record.steps[2].texts.as_ref().unwrap()[1];
    assert!(
        dom.contains(&format!("toy: {text}</pre>")),
        "the selected particle's text is shown"
    );
    assert!(dom.contains("class=\"node selected\""));
    let shot = dir.join("report.png");
    chrome(
        &browser,
        &dir.join("profile-b"),
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1200,1800".into(),
            url,
        ],
    );
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 10_000,
        "screenshot saved at {} ({size} bytes)",
        shot.display()
    );
    eprintln!("screenshot: {}", shot.display());
}

#[test]
fn all_dead_report_renders_in_chromium() {
    let Some(browser) = browser_or_skip() else {
        return;
    };
    let record = toy_record(Hard::on_tokens("never", |_| false));
    assert!(record.all_dead);
    let dir = artifacts();
    let html = dir.join("dead.html");
    std::fs::write(&html, record.to_html()).unwrap();
    let dom = chrome(
        &browser,
        &dir.join("profile-c"),
        &["--dump-dom".into(), format!("file://{}", html.display())],
    );
    assert!(dom.contains("data-ready=\"1\""));
    assert!(dom.contains("id=\"all-dead\""));
    assert!(dom.contains("No completion has positive weight."));
}
