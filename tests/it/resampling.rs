//! Statistical invariants of the resampling schemes.

use crate::common::{rng, seeded};
use rand::Rng;
use smc_steer::resampling::{fearnhead_clifford, Resampling};

const SEED: u64 = 0xA11CE;
const REPS: usize = 4000;

fn weights() -> Vec<f64> {
    let raw = [0.31, 0.02, 0.0, 0.17, 0.255, 0.045, 0.2];
    let s: f64 = raw.iter().sum();
    raw.iter().map(|w| w / s).collect()
}

fn counts(ancestors: &[usize], n: usize) -> Vec<f64> {
    let mut c = vec![0.0; n];
    for &a in ancestors {
        c[a] += 1.0;
    }
    c
}

#[test]
fn expected_counts_are_m_times_weights() {
    let w = weights();
    let m = 10;
    for scheme in Resampling::ALL {
        let mut r = rng(seeded(SEED));
        let mut sum = vec![0.0; w.len()];
        for _ in 0..REPS {
            let a = scheme.resample(&w, m, &mut r).unwrap();
            assert_eq!(a.len(), m, "{scheme:?}");
            for (s, c) in sum.iter_mut().zip(counts(&a, w.len())) {
                *s += c;
            }
        }
        for (i, wi) in w.iter().enumerate() {
            let mean = sum[i] / REPS as f64;
            // Multinomial variance bounds every scheme's variance.
            let se = (m as f64 * wi * (1.0 - wi) / REPS as f64).sqrt();
            assert!(
                (mean - m as f64 * wi).abs() <= 5.0 * se + 1e-12,
                "{scheme:?} index {i}: {mean} vs {}",
                m as f64 * wi
            );
        }
    }
}

#[test]
fn systematic_and_ssp_counts_are_floor_or_ceil_and_residual_at_least_floor() {
    let mut r = rng(seeded(SEED));
    for _ in 0..500 {
        // Random weights, some zero.
        let raw: Vec<f64> = (0..9)
            .map(|_| {
                if r.random::<f64>() < 0.2 {
                    0.0
                } else {
                    r.random::<f64>()
                }
            })
            .collect();
        let s: f64 = raw.iter().sum();
        if s == 0.0 {
            continue;
        }
        let w: Vec<f64> = raw.iter().map(|x| x / s).collect();
        let m = r.random_range(1..40);
        for scheme in [Resampling::Systematic, Resampling::Ssp] {
            let c = counts(&scheme.resample(&w, m, &mut r).unwrap(), w.len());
            for (ci, wi) in c.iter().zip(&w) {
                let x = m as f64 * wi;
                assert!(
                    *ci >= (x - 1e-9).floor() && *ci <= (x + 1e-9).ceil(),
                    "{scheme:?}: count {ci} for m·w = {x}"
                );
            }
        }
        let c = counts(
            &Resampling::Residual.resample(&w, m, &mut r).unwrap(),
            w.len(),
        );
        for (ci, wi) in c.iter().zip(&w) {
            assert!(
                *ci >= (m as f64 * wi + 1e-9).floor() - 0.0,
                "residual count {ci} below floor of {}",
                m as f64 * wi
            );
        }
        for scheme in Resampling::ALL {
            let c = counts(&scheme.resample(&w, m, &mut r).unwrap(), w.len());
            for (ci, wi) in c.iter().zip(&w) {
                assert!(
                    *wi > 0.0 || *ci == 0.0,
                    "{scheme:?} copied a zero-weight particle"
                );
            }
        }
    }
}

#[test]
fn no_scheme_has_more_variance_than_multinomial() {
    let w = weights();
    let m = 10;
    let variance = |scheme: Resampling| -> Vec<f64> {
        let mut r = rng(seeded(SEED) ^ 7);
        let draws: Vec<Vec<f64>> = (0..REPS)
            .map(|_| counts(&scheme.resample(&w, m, &mut r).unwrap(), w.len()))
            .collect();
        (0..w.len())
            .map(|i| {
                let mean = draws.iter().map(|d| d[i]).sum::<f64>() / REPS as f64;
                draws.iter().map(|d| (d[i] - mean).powi(2)).sum::<f64>() / (REPS - 1) as f64
            })
            .collect()
    };
    let multinomial: Vec<f64> = w.iter().map(|wi| m as f64 * wi * (1.0 - wi)).collect();
    for scheme in Resampling::ALL {
        let v = variance(scheme);
        for i in 0..w.len() {
            // 10% slack for the sampling error of a variance over REPS draws.
            assert!(
                v[i] <= multinomial[i] * 1.1 + 1e-12,
                "{scheme:?} index {i}: {} > {}",
                v[i],
                multinomial[i]
            );
        }
    }
}

#[test]
fn invalid_weights_are_typed_errors() {
    let mut r = rng(seeded(SEED));
    for scheme in Resampling::ALL {
        assert!(scheme.resample(&[], 3, &mut r).is_err());
        assert!(scheme.resample(&[0.5, 0.6], 3, &mut r).is_err());
        assert!(scheme.resample(&[f64::NAN, 1.0], 3, &mut r).is_err());
    }
    assert!("bogus".parse::<Resampling>().is_err());
    assert_eq!("SSP".parse::<Resampling>().unwrap(), Resampling::Ssp);
}

#[test]
fn fearnhead_clifford_keeps_expected_weights() {
    let lw: Vec<f64> = [5.0, 0.2, 0.1, 0.1, 0.05, 0.3, 2.0, 0.0]
        .iter()
        .map(|w: &f64| w.ln())
        .collect();
    let n = 4;
    let mut r = rng(seeded(SEED));
    let mut sum = vec![0.0; lw.len()];
    let mut sum_sq = vec![0.0; lw.len()];
    for _ in 0..REPS {
        let s = fearnhead_clifford(&lw, n, &mut r).unwrap();
        assert_eq!(s.indices.len(), n);
        let mut dedup = s.indices.clone();
        dedup.dedup();
        assert_eq!(dedup.len(), n, "indices must be distinct");
        assert!(!s.indices.contains(&7), "zero weight selected");
        // The heavy ones are kept with their own weight.
        assert!(s.indices.contains(&0) && s.indices.contains(&6));
        for (i, w) in s.indices.iter().zip(&s.log_weights) {
            sum[*i] += w.exp();
            sum_sq[*i] += w.exp().powi(2);
        }
    }
    for (i, l) in lw.iter().enumerate() {
        let mean = sum[i] / REPS as f64;
        let w = l.exp();
        let var = sum_sq[i] / REPS as f64 - mean * mean;
        let se = (var.max(0.0) / REPS as f64).sqrt();
        assert!(
            (mean - w).abs() <= 5.0 * se + 1e-12,
            "candidate {i}: E[new weight] {mean} ± {se} vs {w}"
        );
    }
    // At most n positive candidates: all kept unchanged.
    let few = fearnhead_clifford(&[0.0, f64::NEG_INFINITY, -1.0], 2, &mut r).unwrap();
    assert_eq!(few.indices, vec![0, 2]);
    assert_eq!(few.log_weights, vec![0.0, -1.0]);
}
