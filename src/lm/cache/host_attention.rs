//! The host back-end's attention arithmetic: the query heads of one token that share one
//! key/value head, against that head's rows of the pool.
//!
//! The heads go through the keys and values together (up to four at a time), so each key
//! and value row is read once per group rather than once per head, the heads' dot products
//! form independent chains, and the outputs accumulate in registers, sixteen lanes of every
//! head at a time. That is what made it fast: one head at a time, each dot product was one
//! chain of dependent adds and each value row a load and a store of the whole output.
//!
//! # Determinism
//! Each output is the same sum of the same terms in the same order whatever the grouping
//! and the build: a score is a dot product over eight lanes (one partial sum per lane, in
//! dimension order) then across the lanes in order; the softmax runs over the visible
//! positions in order; an output lane adds its weighted values in key order, from `+0`.
//! The AVX2 build (chosen at run time) uses separate multiplies and adds, as the portable
//! one does, so both give the same bits (test `grouped_attention_matches_the_definition_on_every_build`).

use super::host::offset;
use super::{CacheLayout, QueryMeta, ScoreOptions};
use crate::lm::exp32::{exp1, exp8};

/// The query heads of one token that share one key/value head, against that head's cache.
#[derive(Clone, Copy)]
pub(super) struct GroupQuery<'a> {
    pub(super) layout: &'a CacheLayout,
    /// One layer's keys, in the pool layout of the module documentation of `cache`.
    pub(super) keys: &'a [f32],
    /// One layer's values, laid out as the keys.
    pub(super) values: &'a [f32],
    /// The heads' queries, `heads × head_dim` floats.
    pub(super) qs: &'a [f32],
    pub(super) meta: QueryMeta<'a>,
    pub(super) kv_head: usize,
    pub(super) opts: ScoreOptions,
}

/// Reusable buffers of one worker thread.
#[derive(Default)]
pub(super) struct Scratch {
    /// Offset in the pool of every visible key/value row, in position order.
    rows: Vec<usize>,
    /// Attention weights, head-major (`G × rows`).
    weights: Vec<f32>,
}

/// The attention outputs of `group`'s heads into `out` (`heads × head_dim`, head after
/// head), with the AVX2 build where the CPU has it.
pub(super) fn attend_group(group: &GroupQuery<'_>, scratch: &mut Scratch, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { attend_group_avx2(group, scratch, out) };
    }
    attend_group_with::<Portable>(group, scratch, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn attend_group_avx2(group: &GroupQuery<'_>, scratch: &mut Scratch, out: &mut [f32]) {
    attend_group_with::<x86::Avx2>(group, scratch, out)
}

/// [`attend_group`] with the lane arithmetic of `L`.
#[inline(always)]
fn attend_group_with<L: Lanes>(group: &GroupQuery<'_>, scratch: &mut Scratch, out: &mut [f32]) {
    let hd = group.layout.head_dim;
    let heads = group.qs.len() / hd;
    visible_rows(group, &mut scratch.rows);
    let mut h = 0;
    while h < heads {
        // At most three heads at a time (four would need more than sixteen registers of
        // partial sums); four go as two and two.
        let take = match heads - h {
            4 => 2,
            rest => rest.min(3),
        };
        let (qs, o) = (
            &group.qs[h * hd..(h + take) * hd],
            &mut out[h * hd..(h + take) * hd],
        );
        match take {
            1 => attend_heads::<L, 1>(group, qs, scratch, o),
            2 => attend_heads::<L, 2>(group, qs, scratch, o),
            _ => attend_heads::<L, 3>(group, qs, scratch, o),
        }
        h += take;
    }
}

/// The pool offsets of the rows `group`'s token sees, in position order. With a sliding
/// window, blocks wholly before the window are skipped (never read); they stay allocated
/// because forks, truncation and global layers may need them.
fn visible_rows(group: &GroupQuery<'_>, rows: &mut Vec<usize>) {
    let (layout, meta) = (group.layout, group.meta);
    let (bs, hd) = (layout.block_size, layout.head_dim);
    let n = meta.pos + 1;
    let lo = group.opts.first_visible(meta.pos);
    rows.clear();
    for (bi, &block) in meta
        .blocks
        .iter()
        .enumerate()
        .take(n.div_ceil(bs))
        .skip(lo / bs)
    {
        let from = lo.saturating_sub(bi * bs);
        let to = (n - bi * bs).min(bs);
        let base = offset(layout, block, group.kv_head, 0);
        rows.extend((from..to).map(|s| base + s * hd));
    }
}

/// `G` heads of a group (`qs` and `out` hold `G × head_dim` floats).
#[inline(always)]
fn attend_heads<L: Lanes, const G: usize>(
    group: &GroupQuery<'_>,
    qs: &[f32],
    scratch: &mut Scratch,
    out: &mut [f32],
) {
    let hd = group.layout.head_dim;
    let Scratch { rows, weights } = scratch;
    let m = rows.len();
    // The pool is sized by the cache, which also checked every position against the
    // block tables: every row lies inside it. Checked once here because the lane
    // arithmetic reads rows without bounds checks.
    let inside = |pool: &[f32]| rows.iter().all(|&r| r + hd <= pool.len());
    assert!(inside(group.keys) && inside(group.values) && qs.len() == G * hd);
    let mut q: [&[f32]; G] = [&[]; G];
    for (g, q) in q.iter_mut().enumerate() {
        *q = &qs[g * hd..(g + 1) * hd];
    }
    weights.clear();
    weights.resize(G * m, 0.0);
    let (keys, values, opts) = (group.keys, group.values, group.opts);
    let quads = m / 4 * 4;
    for j in (0..quads).step_by(4) {
        let row = |i: usize| &keys[rows[j + i]..rows[j + i] + hd];
        let k: [&[f32]; 4] = [row(0), row(1), row(2), row(3)];
        let d = L::dots4::<G>(&q, &k);
        for (g, d) in d.into_iter().enumerate() {
            for (i, d) in d.into_iter().enumerate() {
                weights[g * m + j + i] = opts.score(d);
            }
        }
    }
    for j in quads..m {
        let d = L::dots::<G>(&q, &keys[rows[j]..rows[j] + hd]);
        for (g, d) in d.into_iter().enumerate() {
            weights[g * m + j] = opts.score(d);
        }
    }
    if m > 0 {
        for w in weights.chunks_exact_mut(m) {
            let max = w.iter().fold(f32::NEG_INFINITY, |a, &s| a.max(s));
            let inv = 1.0 / L::exp_shifted(w, max);
            for s in w.iter_mut() {
                *s *= inv;
            }
        }
    }
    L::weighted_rows::<G>(values, rows, weights, hd, out);
}

/// The operations of the attention inner loops, on lanes of eight floats.
///
/// A dot product is summed per lane (in dimension order), then across the lanes as the
/// tree `((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))` (what two horizontal adds and
/// one add of halves give on AVX2, four keys at once), then the elements beyond the last
/// whole group of eight, in order.
trait Lanes {
    /// The dot products of `G` queries with four keys (all as long as the first key).
    fn dots4<const G: usize>(q: &[&[f32]; G], k: &[&[f32]; 4]) -> [[f32; 4]; G];

    /// The dot products of `G` queries with one key: the bits of [`Lanes::dots4`].
    fn dots<const G: usize>(q: &[&[f32]; G], k: &[f32]) -> [f32; G];

    /// `xs[i] = exp(xs[i] − shift)` by `exp32::exp8`'s formula; returns their sum (per lane in
    /// order, across the lanes in order, then the elements beyond the last whole group of
    /// eight, in order).
    fn exp_shifted(xs: &mut [f32], shift: f32) -> f32;

    /// `out[g·hd + i] = Σ_j weights[g·m + j] · values[rows[j] + i]`, each sum in `j`
    /// order from `+0` (`m = rows.len()`; every `rows[j] + hd ≤ values.len()`).
    fn weighted_rows<const G: usize>(
        values: &[f32],
        rows: &[usize],
        weights: &[f32],
        hd: usize,
        out: &mut [f32],
    );
}

/// The tree sum of eight lanes (see [`Lanes`]).
#[inline(always)]
fn tree(a: &[f32; 8]) -> f32 {
    ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))
}

/// The part of a dot product beyond the whole groups of eight: `s + Σ q[i]·k[i]` for `i`
/// from `from` on, in order.
#[inline(always)]
fn tail(mut s: f32, q: &[f32], k: &[f32], from: usize) -> f32 {
    for (x, y) in q[from..k.len()].iter().zip(&k[from..]) {
        s += x * y;
    }
    s
}

/// The end of [`Lanes::exp_shifted`]: the elements beyond the last whole group of eight,
/// exponentiated in place and added to `sum` in order.
#[inline(always)]
fn exp_rest(rest: &mut [f32], shift: f32, mut sum: f32) -> f32 {
    for x in rest {
        *x = exp1(*x - shift);
        sum += *x;
    }
    sum
}

/// Plain Rust: arrays of eight lanes (what the compiler makes of them on any CPU).
struct Portable;

impl Lanes for Portable {
    #[inline(always)]
    fn dots4<const G: usize>(q: &[&[f32]; G], k: &[&[f32]; 4]) -> [[f32; 4]; G] {
        let mut out = [[0f32; 4]; G];
        for (i, k) in k.iter().enumerate() {
            for (o, d) in out.iter_mut().zip(Self::dots::<G>(q, k)) {
                o[i] = d;
            }
        }
        out
    }

    #[inline(always)]
    fn dots<const G: usize>(q: &[&[f32]; G], k: &[f32]) -> [f32; G] {
        let lanes = k.len() / 8 * 8;
        let mut acc = [[0f32; 8]; G];
        for c in (0..lanes).step_by(8) {
            let kc = &k[c..c + 8];
            for (a, q) in acc.iter_mut().zip(q) {
                let q = &q[c..c + 8];
                for i in 0..8 {
                    a[i] += q[i] * kc[i];
                }
            }
        }
        let mut out = [0f32; G];
        for ((o, a), q) in out.iter_mut().zip(&acc).zip(q) {
            *o = tail(tree(a), q, k, lanes);
        }
        out
    }

    #[inline(always)]
    fn exp_shifted(xs: &mut [f32], shift: f32) -> f32 {
        let mut chunks = xs.chunks_exact_mut(8);
        let mut acc = [0f32; 8];
        for c in &mut chunks {
            let mut x = [0f32; 8];
            for (x, c) in x.iter_mut().zip(c.iter()) {
                *x = c - shift;
            }
            c.copy_from_slice(&exp8(x));
            for (a, e) in acc.iter_mut().zip(c.iter()) {
                *a += e;
            }
        }
        exp_rest(chunks.into_remainder(), shift, acc.iter().sum())
    }

    #[inline(always)]
    fn weighted_rows<const G: usize>(
        values: &[f32],
        rows: &[usize],
        weights: &[f32],
        hd: usize,
        out: &mut [f32],
    ) {
        let m = rows.len();
        out.fill(0.0);
        for (j, &r) in rows.iter().enumerate() {
            let v = &values[r..r + hd];
            for (g, o) in out.chunks_exact_mut(hd).enumerate().take(G) {
                let p = weights[g * m + j];
                for (o, &v) in o.iter_mut().zip(v) {
                    *o += p * v;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{tail, tree, Lanes};
    use crate::lm::exp32::x86::exp8;

    /// AVX2 registers; only called from code compiled with AVX2 enabled on a CPU that has
    /// it (`attend_group_avx2`).
    pub(super) struct Avx2;

    /// The tree sums of four registers' lanes (see `Lanes`): `[Σa, Σb, Σc, Σd]`.
    ///
    /// # Safety
    /// AVX2 must be enabled.
    #[inline(always)]
    unsafe fn tree4(a: __m256, b: __m256, c: __m256, d: __m256) -> [f32; 4] {
        // [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7], likewise c, d; then
        // [(a0+a1)+(a2+a3), …b, …c, …d | (a4+a5)+(a6+a7), …]; then the halves added.
        let abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
        let sum = _mm_add_ps(
            _mm256_castps256_ps128(abcd),
            _mm256_extractf128_ps::<1>(abcd),
        );
        let mut out = [0f32; 4];
        _mm_storeu_ps(out.as_mut_ptr(), sum);
        out
    }

    impl Lanes for Avx2 {
        #[inline(always)]
        fn dots4<const G: usize>(q: &[&[f32]; G], k: &[&[f32]; 4]) -> [[f32; 4]; G] {
            let len = k[0].len();
            let lanes = len / 8 * 8;
            assert!(q.iter().all(|q| q.len() >= len) && k.iter().all(|k| k.len() == len));
            let mut out = [[0f32; 4]; G];
            // SAFETY: AVX2 is enabled in every caller; every load reads eight floats at
            // `c < lanes ≤ len` of a slice of at least `len` floats.
            unsafe {
                let mut acc = [[_mm256_setzero_ps(); 4]; G];
                let mut c = 0;
                while c < lanes {
                    for (a, q) in acc.iter_mut().zip(q) {
                        let qv = _mm256_loadu_ps(q.as_ptr().add(c));
                        for (a, k) in a.iter_mut().zip(k) {
                            let kv = _mm256_loadu_ps(k.as_ptr().add(c));
                            *a = _mm256_add_ps(*a, _mm256_mul_ps(qv, kv));
                        }
                    }
                    c += 8;
                }
                for ((o, a), q) in out.iter_mut().zip(&acc).zip(q) {
                    *o = tree4(a[0], a[1], a[2], a[3]);
                    for (o, k) in o.iter_mut().zip(k) {
                        *o = tail(*o, q, k, lanes);
                    }
                }
            }
            out
        }

        #[inline(always)]
        fn dots<const G: usize>(q: &[&[f32]; G], k: &[f32]) -> [f32; G] {
            let lanes = k.len() / 8 * 8;
            assert!(q.iter().all(|q| q.len() >= k.len()));
            let mut out = [0f32; G];
            // SAFETY: AVX2 is enabled in every caller; every load reads eight floats at
            // `c < lanes ≤ k.len()` of a slice of at least `k.len()` floats.
            unsafe {
                let mut acc = [_mm256_setzero_ps(); G];
                let mut c = 0;
                while c < lanes {
                    let kv = _mm256_loadu_ps(k.as_ptr().add(c));
                    for (a, q) in acc.iter_mut().zip(q) {
                        *a = _mm256_add_ps(
                            *a,
                            _mm256_mul_ps(_mm256_loadu_ps(q.as_ptr().add(c)), kv),
                        );
                    }
                    c += 8;
                }
                // One key: the lanes summed by `tree`, the order `tree4`'s horizontal adds use.
                for ((o, a), q) in out.iter_mut().zip(&acc).zip(q) {
                    let mut l = [0f32; 8];
                    _mm256_storeu_ps(l.as_mut_ptr(), *a);
                    *o = tail(tree(&l), q, k, lanes);
                }
            }
            out
        }

        #[inline(always)]
        fn exp_shifted(xs: &mut [f32], shift: f32) -> f32 {
            let mut chunks = xs.chunks_exact_mut(8);
            // SAFETY: AVX2 is enabled in every caller; each load and store is one whole
            // chunk of eight floats.
            let sum = unsafe {
                let s = _mm256_set1_ps(shift);
                let mut acc = _mm256_setzero_ps();
                for c in &mut chunks {
                    let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), s));
                    _mm256_storeu_ps(c.as_mut_ptr(), e);
                    acc = _mm256_add_ps(acc, e);
                }
                let mut a = [0f32; 8];
                _mm256_storeu_ps(a.as_mut_ptr(), acc);
                a.iter().sum::<f32>()
            };
            super::exp_rest(chunks.into_remainder(), shift, sum)
        }

        #[inline(always)]
        fn weighted_rows<const G: usize>(
            values: &[f32],
            rows: &[usize],
            weights: &[f32],
            hd: usize,
            out: &mut [f32],
        ) {
            let m = rows.len();
            assert!(weights.len() >= G * m && out.len() >= G * hd);
            let (w, v) = (weights.as_ptr(), values.as_ptr());
            let mut c = 0;
            // SAFETY: AVX2 is enabled in every caller; value reads stay below
            // `rows[j] + hd ≤ values.len()` (checked by the caller), weight reads below
            // `G·m`, output writes below `G·hd`.
            unsafe {
                // Sixteen lanes per head: 2·G independent chains of adds.
                while c + 16 <= hd {
                    let (mut a0, mut a1) = ([_mm256_setzero_ps(); G], [_mm256_setzero_ps(); G]);
                    for (j, &r) in rows.iter().enumerate() {
                        let v0 = _mm256_loadu_ps(v.add(r + c));
                        let v1 = _mm256_loadu_ps(v.add(r + c + 8));
                        for g in 0..G {
                            let p = _mm256_set1_ps(*w.add(g * m + j));
                            a0[g] = _mm256_add_ps(a0[g], _mm256_mul_ps(p, v0));
                            a1[g] = _mm256_add_ps(a1[g], _mm256_mul_ps(p, v1));
                        }
                    }
                    for g in 0..G {
                        _mm256_storeu_ps(out.as_mut_ptr().add(g * hd + c), a0[g]);
                        _mm256_storeu_ps(out.as_mut_ptr().add(g * hd + c + 8), a1[g]);
                    }
                    c += 16;
                }
                if c + 8 <= hd {
                    let mut a = [_mm256_setzero_ps(); G];
                    for (j, &r) in rows.iter().enumerate() {
                        let v0 = _mm256_loadu_ps(v.add(r + c));
                        for (g, a) in a.iter_mut().enumerate() {
                            let p = _mm256_set1_ps(*w.add(g * m + j));
                            *a = _mm256_add_ps(*a, _mm256_mul_ps(p, v0));
                        }
                    }
                    for (g, a) in a.iter().enumerate() {
                        _mm256_storeu_ps(out.as_mut_ptr().add(g * hd + c), *a);
                    }
                    c += 8;
                }
            }
            for i in c..hd {
                for g in 0..G {
                    let mut s = 0f32;
                    for (j, &r) in rows.iter().enumerate() {
                        s += weights[g * m + j] * values[r + i];
                    }
                    out[g * hd + i] = s;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every head of a group of seven (a group of four, then three) against the definition
    /// in f64; the AVX2 build (where the CPU has it) and the portable one agree bit for
    /// bit, and each head alone gives the bits it gives in its group. Uneven head
    /// dimension (20: one sixteen-lane pass, no eight-lane one, four single lanes), partial
    /// last block, a window, a soft cap.
    #[test]
    fn grouped_attention_matches_the_definition_on_every_build() {
        for hd in [20, 24, 64] {
            check_against_definition(hd);
        }
    }

    fn check_against_definition(hd: usize) {
        let layout = CacheLayout {
            n_layers: 1,
            n_kv_heads: 2,
            head_dim: hd,
            block_size: 4,
            num_blocks: 5,
        };
        let heads = 7;
        let floats = layout.n_kv_heads * layout.block_size * hd * layout.num_blocks;
        let val = |i: usize, k: f32| ((i * 2_654_435_761) % 1000) as f32 / 500.0 - 1.0 + k;
        let keys: Vec<f32> = (0..floats).map(|i| val(i, 0.0)).collect();
        let values: Vec<f32> = (0..floats).map(|i| val(i + 7, 0.1)).collect();
        let qs: Vec<f32> = (0..heads * hd).map(|i| val(i + 3, -0.2) / 4.0).collect();
        let blocks = [3u32, 0, 4, 1];
        for (pos, opts) in [
            (
                13,
                ScoreOptions {
                    scale: 0.22,
                    softcap: None,
                    window: None,
                },
            ),
            (
                14,
                ScoreOptions {
                    scale: 0.5,
                    softcap: Some(5.0),
                    window: Some(6),
                },
            ),
        ] {
            let meta = QueryMeta {
                blocks: &blocks,
                pos,
            };
            let query = |qs| GroupQuery {
                layout: &layout,
                keys: &keys,
                values: &values,
                qs,
                meta,
                kv_head: 1,
                opts,
            };
            let mut scratch = Scratch::default();
            let (mut o1, mut o2) = (vec![0f32; heads * hd], vec![0f32; heads * hd]);
            attend_group_with::<Portable>(&query(&qs), &mut scratch, &mut o1);
            attend_group(&query(&qs), &mut scratch, &mut o2);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&o1), bits(&o2), "head_dim {hd}");
            for h in 0..heads {
                let q = &qs[h * hd..(h + 1) * hd];
                let mut alone = vec![0f32; hd];
                attend_group(&query(q), &mut scratch, &mut alone);
                assert_eq!(bits(&alone), bits(&o1[h * hd..(h + 1) * hd]));
                // The definition: softmax over the visible positions of the scaled (capped)
                // scores, then the weighted sum of the values, in f64.
                let row = |p: usize| {
                    let (b, s) = (blocks[p / layout.block_size], p % layout.block_size);
                    offset(&layout, b, 1, s)
                };
                let visible = opts.first_visible(pos)..pos + 1;
                let score = |p: usize| {
                    let d: f64 = (0..hd).map(|i| q[i] as f64 * keys[row(p) + i] as f64).sum();
                    let s = d * opts.scale as f64;
                    match opts.softcap {
                        Some(c) => c as f64 * (s / c as f64).tanh(),
                        None => s,
                    }
                };
                let max = visible.clone().map(score).fold(f64::MIN, f64::max);
                let z: f64 = visible.clone().map(|p| (score(p) - max).exp()).sum();
                for i in 0..hd {
                    let want: f64 = visible
                        .clone()
                        .map(|p| (score(p) - max).exp() / z * values[row(p) + i] as f64)
                        .sum();
                    let got = o1[h * hd + i] as f64;
                    // f32 sums of at most 64 products of magnitude ≤ 1.1 (the scores) and
                    // 15 weighted values ≤ 1.1: a few ulps of 1, far inside 1e-5.
                    assert!(
                        (got - want).abs() < 1e-5,
                        "head_dim {hd}, head {h}, lane {i}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn dots_match_naive() {
        let a: Vec<f32> = (0..19).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..19).map(|i| 1.0 - i as f32).collect();
        let k: Vec<f32> = (0..19).map(|i| 0.25 * i as f32 - 2.0).collect();
        let naive = |q: &[f32]| q.iter().zip(&k).map(|(x, y)| x * y).sum::<f32>();
        let [da, db] = Portable::dots::<2>(&[&a, &b], &k);
        assert!((da - naive(&a)).abs() < 1e-3 && (db - naive(&b)).abs() < 1e-3);
        assert_eq!(Portable::dots::<1>(&[&a], &k)[0].to_bits(), da.to_bits());
    }
}
