//! Properties of the transformer kernel on a tiny random-weight model (no download).
//!
//! Every logit produced through the paged cache (batched, forked, resampled, with multi-token
//! appends and releases) must equal a from-scratch recomputation of the whole sequence with
//! plain tensor operations, within 1e-4 (f32).
#![cfg(feature = "lm")]

use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;
use smc_steer::lm::{
    KernelOptions, LlamaConfig, LlamaModel, LmError, LogitRows, PagedKvCache, RopeStyle, SeqTokens,
    TransformerKernel,
};
use smc_steer::{Extend, Kernel, SeqId, SmcError};

const VOCAB: usize = 50;

fn config(style: RopeStyle, max_seq_len: usize) -> LlamaConfig {
    LlamaConfig {
        vocab_size: VOCAB,
        hidden_size: 32,
        intermediate_size: 64,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 8,
        rope_theta: 10_000.0,
        rope_style: style,
        rms_eps: 1e-5,
        max_seq_len,
        tie_embeddings: false,
    }
}

fn tiny_model(seed: u64) -> LlamaModel {
    LlamaModel::random(config(RopeStyle::Interleaved, 256), seed).unwrap()
}

fn kernel(seed: u64, block_size: usize, cache_tokens: usize) -> TransformerKernel {
    let opts = KernelOptions {
        block_size,
        cache_tokens: Some(cache_tokens),
        ..Default::default()
    };
    TransformerKernel::from_parts(tiny_model(seed), None, None, opts).unwrap()
}

/// Log-softmax of a row, with the EOS entry (-inf: no stop tokens without a tokenizer).
fn reference_dist(model: &LlamaModel, tokens: &[u32]) -> Vec<Vec<f64>> {
    let logits = model
        .forward_full(tokens)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    logits
        .iter()
        .map(|row| {
            let max = row
                .iter()
                .fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)));
            let lse = max
                + row
                    .iter()
                    .map(|&x| (f64::from(x) - max).exp())
                    .sum::<f64>()
                    .ln();
            let mut d: Vec<f64> = row.iter().map(|&x| f64::from(x) - lse).collect();
            d.push(f64::NEG_INFINITY);
            d
        })
        .collect()
}

fn assert_close(a: &[f64], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        if x.is_infinite() || y.is_infinite() {
            assert_eq!(x, y, "{what}: entry {i}");
        } else {
            assert!((x - y).abs() <= tol, "{what}: entry {i}: {x} vs {y}");
        }
    }
}

fn check_refcounts(cache: &PagedKvCache) {
    let mut counts = vec![0u32; cache.num_blocks()];
    for s in cache.sequences() {
        for &b in cache.block_table(s).unwrap() {
            counts[b as usize] += 1;
        }
    }
    for (b, &n) in counts.iter().enumerate() {
        assert_eq!(cache.ref_count(b as u32), n, "reference count of block {b}");
    }
    let used = counts.iter().filter(|&&n| n > 0).count();
    assert_eq!(
        used + cache.free_blocks(),
        cache.num_blocks(),
        "leaked or double-freed blocks"
    );
}

#[test]
fn batched_forward_equals_one_sequence_at_a_time() {
    let model = tiny_model(1);
    let seqs: Vec<Vec<u32>> = vec![
        vec![1, 2, 3],
        vec![4],
        vec![5, 6, 7, 8, 9, 10, 11],
        vec![12, 13],
    ];
    let mut batched_cache = model.new_cache(4, 256).unwrap();
    let mut single_cache = model.new_cache(4, 256).unwrap();
    let prefix: Vec<u32> = vec![7, 8, 9, 10, 11];
    let root_b = batched_cache.create();
    let root_s = single_cache.create();
    for (c, r) in [(&mut batched_cache, root_b), (&mut single_cache, root_s)] {
        model
            .forward(
                &[SeqTokens {
                    seq: r,
                    tokens: &prefix,
                }],
                c,
                LogitRows::Last,
            )
            .unwrap();
    }
    let forks_b: Vec<_> = seqs
        .iter()
        .map(|_| batched_cache.fork(root_b).unwrap())
        .collect();
    let entries: Vec<SeqTokens<'_>> = forks_b
        .iter()
        .zip(&seqs)
        .map(|(&seq, t)| SeqTokens { seq, tokens: t })
        .collect();
    let batched = model
        .forward(&entries, &mut batched_cache, LogitRows::All)
        .unwrap();
    let batched = batched.to_vec2::<f32>().unwrap();
    let mut row = 0;
    for t in &seqs {
        let f = single_cache.fork(root_s).unwrap();
        let single = model
            .forward(
                &[SeqTokens { seq: f, tokens: t }],
                &mut single_cache,
                LogitRows::All,
            )
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for s in single {
            let d = s
                .iter()
                .zip(&batched[row])
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(d < 1e-5, "row {row}: {d}");
            row += 1;
        }
    }
    check_refcounts(&batched_cache);
}

#[test]
fn kernel_matches_recomputation_after_random_forks_resamples_and_appends() {
    for seed in 0..12u64 {
        let mut rng = Pcg64::seed_from_u64(seed);
        // Small blocks so that sequences span many blocks and partial blocks get shared.
        let block = [1usize, 3, 4, 16][seed as usize % 4];
        let mut k = kernel(seed, block, 4096);
        let prompt: Vec<u32> = (0..rng.random_range(1..12))
            .map(|_| rng.random_range(0..VOCAB as u32))
            .collect();
        let (root, d0) = k.start(&prompt).unwrap();
        assert_close(
            &d0,
            reference_dist(k.model(), &prompt).last().unwrap(),
            1e-4,
            "prompt",
        );
        // Live particles: (handle, full token history).
        let mut live: Vec<(SeqId, Vec<u32>)> = vec![(root, prompt.clone())];
        for _ in 1..rng.random_range(2..8) {
            live.push((k.fork(root).unwrap(), prompt.clone()));
        }
        for step in 0..10 {
            match rng.random_range(0..10) {
                // Resample with an arbitrary ancestor vector.
                0..=2 => {
                    let n = rng.random_range(1..9);
                    let mut next = Vec::with_capacity(n);
                    for _ in 0..n {
                        let a = rng.random_range(0..live.len());
                        next.push((k.fork(live[a].0).unwrap(), live[a].1.clone()));
                    }
                    for (s, _) in live.drain(..) {
                        k.release(s);
                    }
                    live = next;
                }
                // Some particles finish (are released).
                3 if live.len() > 1 => {
                    let i = rng.random_range(0..live.len());
                    let (s, _) = live.swap_remove(i);
                    k.release(s);
                }
                // Extend a random subset, each by 1..4 tokens.
                _ => {
                    let chosen: Vec<usize> =
                        (0..live.len()).filter(|_| rng.random_bool(0.8)).collect();
                    let appends: Vec<Vec<u32>> = chosen
                        .iter()
                        .map(|_| {
                            let n = if rng.random_bool(0.6) {
                                1
                            } else {
                                rng.random_range(2..5)
                            };
                            (0..n).map(|_| rng.random_range(0..VOCAB as u32)).collect()
                        })
                        .collect();
                    let batch: Vec<Extend<'_>> = chosen
                        .iter()
                        .zip(&appends)
                        .map(|(&i, t)| Extend {
                            seq: live[i].0,
                            tokens: t,
                        })
                        .collect();
                    let out = k.extend(&batch).unwrap();
                    for ((&i, t), ext) in chosen.iter().zip(&appends).zip(&out) {
                        let before = live[i].1.len();
                        live[i].1.extend_from_slice(t);
                        let reference = reference_dist(k.model(), &live[i].1);
                        let what = format!("seed {seed} step {step} particle {i}");
                        assert_close(&ext.next_log_probs, reference.last().unwrap(), 1e-4, &what);
                        assert_eq!(ext.inner_log_probs.len(), t.len() - 1);
                        for (j, &lp) in ext.inner_log_probs.iter().enumerate() {
                            let want = reference[before + j][t[j + 1] as usize];
                            assert!(
                                (lp - want).abs() < 1e-4,
                                "{what}: inner {j}: {lp} vs {want}"
                            );
                        }
                        let total: f64 = ext.next_log_probs.iter().map(|x| x.exp()).sum();
                        assert!((total - 1.0).abs() < 1e-9, "{what}: normalised");
                    }
                }
            }
            check_refcounts(k.cache());
        }
        for (s, _) in live {
            k.release(s);
        }
        assert_eq!(
            k.cache().free_blocks(),
            k.cache().num_blocks(),
            "seed {seed}: blocks leaked"
        );
    }
}

#[test]
fn prompt_is_stored_once_and_shared() {
    let mut k = kernel(3, 16, 4096);
    let prompt: Vec<u32> = (0..64).map(|i| i % VOCAB as u32).collect();
    let (root, _) = k.start(&prompt).unwrap();
    let used_prompt = k.cache().used_blocks();
    assert_eq!(used_prompt, 4);
    let forks: Vec<SeqId> = (0..32).map(|_| k.fork(root).unwrap()).collect();
    assert_eq!(
        k.cache().used_blocks(),
        used_prompt,
        "forking copies nothing"
    );
    let toks = [5u32];
    let batch: Vec<Extend<'_>> = forks
        .iter()
        .map(|&s| Extend {
            seq: s,
            tokens: &toks,
        })
        .collect();
    k.extend(&batch).unwrap();
    // One new block per particle; the prompt's four blocks are still shared by all.
    assert_eq!(k.cache().used_blocks(), used_prompt + 32);
}

#[test]
fn cache_exhaustion_is_a_typed_error_and_the_kernel_stays_usable() {
    let mut k = kernel(4, 4, 16); // 4 blocks of 4 tokens
    let (root, _) = k.start(&[1, 2, 3, 4, 5, 6]).unwrap(); // 2 blocks
    let a = k.fork(root).unwrap();
    let b = k.fork(root).unwrap();
    let c = k.fork(root).unwrap();
    let t = [7u32];
    // Each fork needs a copy of the shared partial block: 3 > 2 free blocks.
    let err = k
        .extend(&[
            Extend { seq: a, tokens: &t },
            Extend { seq: b, tokens: &t },
            Extend { seq: c, tokens: &t },
        ])
        .unwrap_err();
    match &err {
        SmcError::CapacityExceeded(msg) => assert!(msg.contains("KV cache exhausted"), "{msg}"),
        other => panic!("unexpected error {other:?}"),
    }
    // Nothing changed: the same request on fewer sequences works and matches recomputation.
    let out = k
        .extend(&[Extend { seq: a, tokens: &t }, Extend { seq: b, tokens: &t }])
        .unwrap();
    let want = reference_dist(k.model(), &[1, 2, 3, 4, 5, 6, 7]);
    assert_close(
        &out[1].next_log_probs,
        want.last().unwrap(),
        1e-4,
        "after exhaustion",
    );
    k.release(c);
    k.release(a);
    k.release(b);
    k.release(root);
    assert_eq!(k.cache().free_blocks(), 4);
}

#[test]
fn bad_inputs_are_typed_errors() {
    let opts = KernelOptions {
        cache_tokens: Some(256),
        max_seq_len: None,
        ..Default::default()
    };
    let model = LlamaModel::random(config(RopeStyle::Interleaved, 8), 5).unwrap();
    let mut k = TransformerKernel::from_parts(model, None, None, opts).unwrap();
    // Kernel failures keep the language model's error as their source.
    let kernel_error = |r: smc_steer::Result<_>, needle: &str| match r {
        Err(e @ SmcError::Backend { .. }) => {
            let source = std::error::Error::source(&e).map(|s| s.to_string());
            assert!(source.is_some_and(|s| s.contains(needle)), "{e}");
        }
        other => panic!("expected a kernel error with `{needle}`, got {other:?}"),
    };
    kernel_error(k.start(&[]).map(|_| ()), "empty");
    kernel_error(k.start(&[0; 9]).map(|_| ()), "context window");
    assert!(matches!(
        k.start(&[VOCAB as u32]),
        Err(SmcError::TokenOutOfRange { .. })
    ));
    let (s, _) = k.start(&[1; 7]).unwrap();
    let e = k
        .extend(&[Extend {
            seq: s,
            tokens: &[1, 2],
        }])
        .unwrap_err();
    kernel_error(Err(e), "context window");
    assert!(k
        .extend(&[Extend {
            seq: s,
            tokens: &[]
        }])
        .is_err());
    assert!(k
        .extend(&[Extend {
            seq: SeqId(999),
            tokens: &[1]
        }])
        .is_err());
    assert!(k.fork(SeqId(999)).is_err());
    let e = k.extend(&[
        Extend {
            seq: s,
            tokens: &[1],
        },
        Extend {
            seq: s,
            tokens: &[2],
        },
    ]);
    assert!(e.is_err(), "duplicate sequence in one batch");
    // The failed calls left the sequence intact.
    let out = k
        .extend(&[Extend {
            seq: s,
            tokens: &[3],
        }])
        .unwrap();
    let want = reference_dist(k.model(), &[1, 1, 1, 1, 1, 1, 1, 3]);
    assert_close(
        &out[0].next_log_probs,
        want.last().unwrap(),
        1e-4,
        "after errors",
    );
    let bad_t = KernelOptions {
        temperature: 0.0,
        ..Default::default()
    };
    assert!(matches!(
        TransformerKernel::from_parts(tiny_model(1), None, None, bad_t),
        Err(LmError::InvalidConfig(_))
    ));
}

#[test]
fn temperature_rescales_logits() {
    let mut k1 = kernel(6, 16, 256);
    let mut k2 = kernel(6, 16, 256);
    k2.set_temperature(2.0).unwrap();
    let (_, d1) = k1.start(&[1, 2, 3]).unwrap();
    let (_, d2) = k2.start(&[1, 2, 3]).unwrap();
    // log p_T(x) = l(x)/T - logsumexp(l/T) = log p_1(x)/T + const.
    let c = d2[0] - d1[0] / 2.0;
    for i in 0..VOCAB {
        assert!((d2[i] - d1[i] / 2.0 - c).abs() < 1e-9);
    }
    let total: f64 = d2.iter().map(|x| x.exp()).sum();
    assert!((total - 1.0).abs() < 1e-9);
}

#[test]
fn half_rope_cache_matches_full() {
    let model = LlamaModel::random(config(RopeStyle::Half, 64), 9).unwrap();
    let toks: Vec<u32> = (0..30).map(|i| (i * 13 % VOCAB) as u32).collect();
    let mut cache = model.new_cache(8, 64).unwrap();
    let s = cache.create();
    let got = model
        .forward(
            &[SeqTokens {
                seq: s,
                tokens: &toks,
            }],
            &mut cache,
            LogitRows::All,
        )
        .unwrap();
    let want = model.forward_full(&toks).unwrap();
    assert!(smc_steer::testing::max_abs_diff(&got, &want).unwrap() < 1e-4);
}
