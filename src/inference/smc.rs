//! The particle filter: SMC with ESS-adaptive resampling, and SMC-steer.
//!
//! [`Smc`] holds the population and steps it one iteration at a time; its state
//! (particles, ancestors, log-weights, `log Z`) is public for inspection. Every step makes
//! one batched kernel call for all live particles (more only when a program asks for
//! sub-steps with [`Flow::Continue`]).
//!
//! # The `log Z` estimate
//! Weights are kept unnormalised so that `Ẑ = (1/N) Σ_i w_i` at all times. Resampling
//! gives every child the mean weight (standard SMC) or proper Fearnhead–Clifford weights
//! (SMC-steer), both of which keep `E[Σ w]` unchanged, so `Ẑ` is unbiased for `Z` and
//! `log Ẑ` is the running estimate.

use std::time::Instant;

use rand::{RngCore, SeedableRng};
use rand_pcg::Pcg64Mcg;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::core::error::{Result, SmcError};
use crate::core::kernel::{Extend, Kernel, SeqId};
use crate::core::logspace::log_sum_exp;
use crate::core::vocab::{TokenId, Vocabulary};
use crate::inference::record::StepRecord;
use crate::inference::resampling::{fearnhead_clifford, Resampling};
use crate::inference::result::{Completion, SmcResult};
use crate::inference::weights::Weights;
use crate::model::particle::{Context, Particle, ParticleState};
use crate::model::program::{Flow, Program, Truncation};

/// Which particle algorithm to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Algorithm {
    /// Sequential importance resampling with ESS-adaptive resampling.
    #[default]
    Standard,
    /// SMC-steer (Lew et al. 2023): each live particle is extended `beam` times, then the
    /// population is cut back to `N` by Fearnhead–Clifford resampling without replacement.
    Steer {
        /// Extensions per live particle (`K ≥ 1`).
        beam: usize,
    },
}

/// Configuration of a run. Construct with struct update syntax over `default()`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SmcConfig {
    /// Number of particles `N` (default 16).
    pub particles: usize,
    /// Resample when `ESS < ratio · N` (default 0.5). `0` never resamples (importance
    /// sampling); `1` resamples at every step. Ignored by SMC-steer, which always resamples.
    pub ess_threshold: f64,
    /// Resampling scheme (default stratified).
    pub resampling: Resampling,
    /// The algorithm (default standard SMC).
    pub algorithm: Algorithm,
    /// Maximum number of generated tokens per particle (default 32).
    pub max_tokens: usize,
    /// What happens at the token limit (default truncation; see [`Truncation`]).
    pub truncation: Truncation,
    /// Seed of the master RNG (default 0).
    pub seed: u64,
    /// Keep a [`StepRecord`] per step (default false).
    pub record: bool,
    /// Include each particle's text in the records (default false).
    pub record_text: bool,
    /// Most sub-steps a single SMC step may take before it is an error (default 64).
    pub max_substeps: usize,
}

impl Default for SmcConfig {
    fn default() -> Self {
        Self {
            particles: 16,
            ess_threshold: 0.5,
            resampling: Resampling::Stratified,
            algorithm: Algorithm::Standard,
            max_tokens: 32,
            truncation: Truncation::Truncate,
            seed: 0,
            record: false,
            record_text: false,
            max_substeps: 64,
        }
    }
}

impl SmcConfig {
    /// Check every field.
    ///
    /// # Errors
    /// [`SmcError::ZeroParticles`], [`SmcError::InvalidEssThreshold`], [`SmcError::ZeroBeam`]
    /// or [`SmcError::InvalidConfig`].
    pub fn validate(&self) -> Result<()> {
        if self.particles == 0 {
            return Err(SmcError::ZeroParticles);
        }
        if !(0.0..=1.0).contains(&self.ess_threshold) {
            return Err(SmcError::InvalidEssThreshold(self.ess_threshold));
        }
        if let Algorithm::Steer { beam: 0 } = self.algorithm {
            return Err(SmcError::ZeroBeam);
        }
        if self.max_tokens == 0 {
            return Err(SmcError::InvalidConfig(
                "max_tokens must be at least 1".into(),
            ));
        }
        if self.max_substeps == 0 {
            return Err(SmcError::InvalidConfig(
                "max_substeps must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// A particle filter over a [`Kernel`] running a [`Program`] in every particle.
///
/// # Example
/// ```
/// use smc_steer::{potential::Soft, testing::ToyKernel, FeynmanKac, Smc, SmcConfig};
/// let kernel = ToyKernel::random_bigram(3, 0.25, 7).unwrap();
/// let model = FeynmanKac::new(Soft::on_text("likes-a", |t: &str| t.matches('a').count() as f64));
/// let mut smc = Smc::new(kernel, model, &[], SmcConfig { particles: 32, ..Default::default() }).unwrap();
/// while smc.step().unwrap() {
///     assert!(smc.ess() <= 32.0 + 1e-9);
/// }
/// let result = smc.finish();
/// println!("log Z ≈ {}", result.log_z);
/// ```
pub struct Smc<K: Kernel, P: Program> {
    kernel: K,
    config: SmcConfig,
    rng: Pcg64Mcg,
    /// The current population.
    pub particles: Vec<ParticleState<P>>,
    /// The last step's selection: particle `j` now is a copy of particle `ancestors[j]` of
    /// that step's population before resampling (the identity when it did not resample).
    pub ancestors: Vec<usize>,
    /// Steps taken so far.
    pub steps: usize,
    /// Per-step records (when [`SmcConfig::record`] is set).
    pub records: Vec<StepRecord>,
    tokens_generated: usize,
    started: Instant,
}

impl<K: Kernel, P: Program> std::fmt::Debug for Smc<K, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Smc")
            .field("config", &self.config)
            .field("steps", &self.steps)
            .finish()
    }
}

impl<K: Kernel, P: Program> Smc<K, P> {
    /// Start `config.particles` copies of `program` on one context holding `prompt`.
    ///
    /// The prompt is processed once by the kernel and shared by all particles.
    ///
    /// # Errors
    /// An invalid configuration, a program that does not match the kernel's vocabulary, or
    /// a kernel error on the prompt.
    pub fn new(kernel: K, program: P, prompt: &[TokenId], config: SmcConfig) -> Result<Self> {
        Self::with_contexts(kernel, program, &[prompt], config)
    }

    /// As [`Smc::new`] with several contexts per particle, one per prompt (all evaluated in
    /// the same batched kernel calls).
    ///
    /// # Errors
    /// As [`Smc::new`]; also [`SmcError::InvalidConfig`] for no prompts.
    pub fn with_contexts(
        mut kernel: K,
        program: P,
        prompts: &[&[TokenId]],
        config: SmcConfig,
    ) -> Result<Self> {
        config.validate()?;
        program.check(kernel.vocab())?;
        if prompts.is_empty() {
            return Err(SmcError::InvalidConfig(
                "a particle needs at least one context".into(),
            ));
        }
        let n = config.particles;
        // The particle count comes from the user: allocate fallibly.
        let mut per_particle: Vec<Vec<Context>> = Vec::new();
        per_particle
            .try_reserve_exact(n)
            .map_err(|_| SmcError::CapacityExceeded(format!("cannot allocate {n} particles")))?;
        per_particle.extend((0..n).map(|_| Vec::with_capacity(prompts.len())));
        for prompt in prompts {
            let (root, dist) = kernel.start(prompt)?;
            check_dist::<K>(&dist, kernel.vocab(), kernel.normalised_by_construction())?;
            let root_ctx = Context::new(root, dist);
            for (i, ctxs) in per_particle.iter_mut().enumerate() {
                let mut c = root_ctx.clone();
                if i > 0 {
                    c.seq = Some(kernel.fork(root)?);
                }
                ctxs.push(c);
            }
        }
        let particles = per_particle
            .into_iter()
            .map(|contexts| ParticleState {
                program: program.clone(),
                contexts,
                log_weight: 0.0,
                twist: 0.0,
                finished: false,
            })
            .collect();
        let mut smc = Self {
            kernel,
            rng: Pcg64Mcg::seed_from_u64(config.seed),
            config,
            particles,
            ancestors: (0..n).collect(),
            steps: 0,
            records: Vec::new(),
            tokens_generated: 0,
            started: Instant::now(),
        };
        let all: Vec<usize> = (0..n).collect();
        smc.run_parallel(&all, |prog, p| prog.start(p).map(|_| Flow::Yield))?;
        smc.flush()?;
        Ok(smc)
    }

    /// The configuration.
    pub fn config(&self) -> &SmcConfig {
        &self.config
    }

    /// The kernel (for statistics such as call counts).
    pub fn kernel(&self) -> &K {
        &self.kernel
    }

    /// Current unnormalised log-weights (twists included).
    pub fn log_weights(&self) -> Vec<f64> {
        self.particles.iter().map(|p| p.log_weight).collect()
    }

    /// Current weights as an immutable [`Weights`] object.
    pub fn weights(&self) -> Weights {
        Weights::new(self.log_weights())
    }

    /// ESS of the current weights.
    pub fn ess(&self) -> f64 {
        self.weights().ess()
    }

    /// Running estimate of `log Z`, twists excluded: `log((1/N) Σ_i w_i / ψ_i)`.
    pub fn log_z(&self) -> f64 {
        let lw: Vec<f64> = self
            .particles
            .iter()
            .map(|p| p.log_weight - p.twist)
            .collect();
        log_sum_exp(&lw) - (self.config.particles as f64).ln()
    }

    /// Tokens generated so far over all particles (as in [`SmcResult::tokens_generated`]).
    pub fn tokens_generated(&self) -> usize {
        self.tokens_generated
    }

    /// True when no particle is still stepping.
    pub fn is_done(&self) -> bool {
        self.particles.iter().all(|p| p.finished)
    }

    /// Run one SMC step. Returns `false` (and does nothing) when every particle has
    /// finished.
    ///
    /// # Errors
    /// Errors of programs, potentials, proposals or the kernel; the run cannot continue.
    pub fn step(&mut self) -> Result<bool> {
        if self.is_done() {
            return Ok(false);
        }
        for p in &mut self.particles {
            untwist(p);
        }
        let log_z_before = self.log_z();
        // Particle i of this step descends from `self.ancestors[expansion[i]]` of the last step.
        let expansion = match self.config.algorithm {
            Algorithm::Standard => {
                let live = self.live_indices();
                self.advance(live)?;
                None
            }
            Algorithm::Steer { beam } => Some(self.expand(beam)?),
        };
        let parents: Vec<usize> = match &expansion {
            None => self.ancestors.clone(),
            Some(e) => e.iter().map(|&k| self.ancestors[k]).collect(),
        };
        let log_weights = self.log_weights();
        if log_weights.iter().any(|w| w.is_nan()) {
            return Err(SmcError::InvalidWeights(
                "a particle's log-weight became NaN".into(),
            ));
        }
        let weights = Weights::new(log_weights.clone());
        let texts = self.config.record_text.then(|| {
            self.particles
                .iter()
                .map(|p| self.kernel.vocab().decode(p.tokens()))
                .collect()
        });
        let (resampled, ancestors) = match expansion {
            None => self.resample_standard(&weights)?,
            Some(_) => (true, self.resample_steer()?),
        };
        self.ancestors = ancestors;
        let log_z = self.log_z();
        if self.config.record {
            self.records.push(StepRecord {
                step: self.steps,
                live: self.particles.iter().filter(|p| !p.finished).count(),
                ess: weights.ess(),
                resampled,
                parents,
                ancestors: self.ancestors.clone(),
                log_weights,
                log_z,
                log_z_increment: crate::core::logspace::log_div(log_z, log_z_before),
                texts,
            });
        }
        self.steps += 1;
        Ok(true)
    }

    /// Step until every particle has finished and return the result.
    ///
    /// # Errors
    /// As [`Smc::step`].
    pub fn run(mut self) -> Result<SmcResult<P>> {
        while self.step()? {}
        Ok(self.finish())
    }

    /// End the run now (particles still stepping are kept as they are) and return the
    /// result. Twists are removed and every kernel sequence is released.
    pub fn finish(mut self) -> SmcResult<P> {
        for p in &mut self.particles {
            untwist(p);
        }
        let log_z = self.log_z();
        let weights = self.weights();
        for p in &mut self.particles {
            release(&mut self.kernel, p);
        }
        let vocab = self.kernel.vocab().clone();
        let particles = std::mem::take(&mut self.particles)
            .into_iter()
            .map(|p| Completion {
                bytes: vocab.decode_bytes(p.tokens()),
                text: vocab.decode(p.tokens()),
                tokens: p.tokens().to_vec(),
                eos: p.ended_with_eos(),
                log_weight: p.log_weight,
                program: p.program,
            })
            .collect();
        SmcResult {
            particles,
            log_z,
            ess: weights.ess(),
            all_dead: weights.all_dead(),
            steps: self.steps,
            tokens_generated: self.tokens_generated,
            elapsed_s: self.started.elapsed().as_secs_f64(),
            records: std::mem::take(&mut self.records),
        }
    }

    fn live_indices(&self) -> Vec<usize> {
        (0..self.particles.len())
            .filter(|&i| !self.particles[i].finished)
            .collect()
    }

    /// Step the particles at `active` through sub-steps until each yields, then apply the
    /// token limit.
    fn advance(&mut self, mut active: Vec<usize>) -> Result<()> {
        let mut substeps = 0;
        while !active.is_empty() {
            substeps += 1;
            if substeps > self.config.max_substeps {
                return Err(SmcError::Program(format!(
                    "a step did not yield after {} sub-steps (Flow::Continue without progress?)",
                    self.config.max_substeps
                )));
            }
            let flows = self.run_parallel(&active, |prog, p| prog.step(p))?;
            self.flush()?;
            active = active
                .into_iter()
                .zip(flows)
                .filter(|(i, f)| *f == Flow::Continue && !self.particles[*i].finished)
                .map(|(i, _)| i)
                .collect();
        }
        let limit = self.config.max_tokens;
        let at_limit: Vec<usize> = (0..self.particles.len())
            .filter(|&i| !self.particles[i].finished && self.particles[i].tokens().len() >= limit)
            .collect();
        if !at_limit.is_empty() {
            let policy = self.config.truncation;
            self.run_parallel(&at_limit, |prog, p| {
                prog.at_token_limit(p, policy).map(|_| Flow::Yield)
            })?;
            for &i in &at_limit {
                self.particles[i].finished = true;
            }
            self.flush()?;
        }
        Ok(())
    }

    /// Run `f` on the particles at `indices` in parallel, each with an RNG seeded from the
    /// master RNG (drawn in index order first, so results do not depend on thread count).
    fn run_parallel(
        &mut self,
        indices: &[usize],
        f: impl Fn(&mut P, &mut Particle<'_>) -> Result<Flow> + Sync,
    ) -> Result<Vec<Flow>> {
        let mut seeds: Vec<Option<u64>> = vec![None; self.particles.len()];
        for &i in indices {
            seeds[i] = Some(self.rng.next_u64());
        }
        let vocab = self.kernel.vocab();
        let limit = self.config.max_tokens;
        let results: Vec<Option<Result<Flow>>> = self
            .particles
            .par_iter_mut()
            .zip(seeds.par_iter())
            .map(|(st, seed)| {
                seed.map(|seed| {
                    let tokens_left = limit.saturating_sub(st.contexts[0].tokens.len());
                    let mut handle = Particle {
                        contexts: &mut st.contexts,
                        log_weight: &mut st.log_weight,
                        twist: &mut st.twist,
                        finished: &mut st.finished,
                        vocab,
                        rng: Pcg64Mcg::seed_from_u64(seed),
                        tokens_left,
                    };
                    f(&mut st.program, &mut handle)
                })
            })
            .collect();
        results.into_iter().flatten().collect()
    }

    /// Send every pending token to the kernel in one batched call, apply the scores of
    /// observed tokens, refresh distributions, and release finished particles' sequences.
    fn flush(&mut self) -> Result<()> {
        let mut owners: Vec<(usize, usize, SeqId)> = Vec::new();
        let mut pending: Vec<Vec<TokenId>> = Vec::new();
        let mut stale: Vec<Vec<f64>> = Vec::new();
        for (i, p) in self.particles.iter_mut().enumerate() {
            for (j, c) in p.contexts.iter_mut().enumerate() {
                if c.pending.is_empty() {
                    continue;
                }
                // A dead particle's weight can no longer change: drop its tokens.
                let Some(seq) = c.seq.filter(|_| p.log_weight > f64::NEG_INFINITY) else {
                    c.pending.clear();
                    c.pending_scored.clear();
                    continue;
                };
                owners.push((i, j, seq));
                pending.push(std::mem::take(&mut c.pending));
                // The distribution is stale (tokens are pending; `log_probs` refuses it):
                // handed back to the kernel before it makes the next ones, so that their
                // memory is filled again instead of freshly mapped (a vocabulary of f64 per
                // particle: 200 MB at 512 particles). A copy made by resampling shares it
                // until the last holder gives it back.
                let old = std::mem::replace(&mut c.log_probs, std::sync::Arc::new(Vec::new()));
                if let Ok(v) = std::sync::Arc::try_unwrap(old) {
                    if v.capacity() > 0 {
                        stale.push(v);
                    }
                }
            }
        }
        // Generated tokens are those sent to the kernel (EOS never is).
        self.tokens_generated += pending.iter().map(Vec::len).sum::<usize>();
        if !stale.is_empty() {
            self.kernel.recycle(stale);
        }
        if !owners.is_empty() {
            let batch: Vec<Extend<'_>> = owners
                .iter()
                .zip(&pending)
                .map(|(&(_, _, seq), toks)| Extend { seq, tokens: toks })
                .collect();
            let out = self.kernel.extend(&batch)?;
            if out.len() != owners.len() {
                return Err(SmcError::Kernel(format!(
                    "kernel returned {} results for {} requests",
                    out.len(),
                    owners.len()
                )));
            }
            let vocab = self.kernel.vocab();
            let trusted = self.kernel.normalised_by_construction();
            // A log-sum-exp over the vocabulary per particle: in parallel (serial, it was
            // a large part of an SMC step's overhead over the forward pass at n = 512).
            // The first failure in batch order is reported, whatever the thread count.
            let checks: Vec<Result<()>> = out
                .par_iter()
                .map(|ext| check_dist::<K>(&ext.next_log_probs, vocab, trusted))
                .collect();
            checks.into_iter().collect::<Result<()>>()?;
            for ((&(i, j, _), ext), toks) in owners.iter().zip(out).zip(&pending) {
                let p = &mut self.particles[i];
                let scored = std::mem::take(&mut p.contexts[j].pending_scored);
                for (k, lp) in ext.inner_log_probs.iter().enumerate() {
                    if scored.get(k + 1).copied().unwrap_or(false) {
                        p.log_weight += lp;
                    }
                }
                if ext.inner_log_probs.len() + 1 != toks.len() {
                    return Err(SmcError::Kernel(
                        "kernel returned the wrong number of inner scores".into(),
                    ));
                }
                p.contexts[j].log_probs = std::sync::Arc::new(ext.next_log_probs);
                if p.log_weight == f64::NEG_INFINITY {
                    p.finished = true;
                }
            }
        }
        for p in &mut self.particles {
            if p.finished {
                release(&mut self.kernel, p);
            }
        }
        Ok(())
    }

    /// Standard ESS-adaptive resampling; returns (resampled, ancestors).
    fn resample_standard(&mut self, weights: &Weights) -> Result<(bool, Vec<usize>)> {
        let n = self.particles.len();
        let identity: Vec<usize> = (0..n).collect();
        let threshold = self.config.ess_threshold;
        let due = threshold >= 1.0 || (threshold > 0.0 && weights.ess() < threshold * n as f64);
        if !due || weights.all_dead() || self.is_done() {
            return Ok((false, identity));
        }
        let ancestors = self
            .config
            .resampling
            .resample(weights.normalised(), n, &mut self.rng)?;
        self.reindex(&ancestors)?;
        let mean = weights.log_mean();
        for p in &mut self.particles {
            p.log_weight = mean;
        }
        Ok((true, ancestors))
    }

    /// Replace the population by copies of `ancestors`, forking kernel sequences for
    /// second and later copies and releasing sequences of particles left without copies.
    fn reindex(&mut self, ancestors: &[usize]) -> Result<()> {
        let mut old: Vec<Option<ParticleState<P>>> = std::mem::take(&mut self.particles)
            .into_iter()
            .map(Some)
            .collect();
        let mut first_copy: Vec<Option<usize>> = vec![None; old.len()];
        let mut new: Vec<ParticleState<P>> = Vec::with_capacity(ancestors.len());
        for &a in ancestors {
            match first_copy[a] {
                None => {
                    let st = old[a]
                        .take()
                        .ok_or_else(|| SmcError::InvalidWeights("ancestor out of range".into()))?;
                    first_copy[a] = Some(new.len());
                    new.push(st);
                }
                Some(k) => {
                    let mut st = new[k].clone();
                    for c in &mut st.contexts {
                        if let Some(seq) = c.seq {
                            c.seq = Some(self.kernel.fork(seq)?);
                        }
                    }
                    new.push(st);
                }
            }
        }
        for st in old.iter_mut().flatten() {
            release(&mut self.kernel, st);
        }
        self.particles = new;
        Ok(())
    }

    /// SMC-steer's extension: `beam` copies of each live particle, each with `1/beam` of its
    /// weight, then one step for all of them. Returns each candidate's parent index.
    fn expand(&mut self, beam: usize) -> Result<Vec<usize>> {
        let mut parents = Vec::new();
        for (i, p) in self.particles.iter().enumerate() {
            let copies = if p.finished { 1 } else { beam };
            parents.extend(std::iter::repeat_n(i, copies));
        }
        self.reindex(&parents)?;
        let split = (beam as f64).ln();
        for p in self.particles.iter_mut().filter(|p| !p.finished) {
            p.log_weight -= split;
        }
        let live = self.live_indices();
        self.advance(live)?;
        Ok(parents)
    }

    /// Fearnhead–Clifford reduction of the candidates back to `N`; returns the selected
    /// candidates' indices.
    fn resample_steer(&mut self) -> Result<Vec<usize>> {
        let n = self.config.particles;
        let log_weights = self.log_weights();
        let selection = fearnhead_clifford(&log_weights, n, &mut self.rng)?;
        let mut keep = selection.indices.clone();
        // Fewer than N candidates with positive weight: fill with dead ones.
        let missing = n.saturating_sub(keep.len());
        let mut selected = vec![false; log_weights.len()];
        for &i in &selection.indices {
            selected[i] = true;
        }
        let filler: Vec<usize> = (0..log_weights.len())
            .filter(|&i| !selected[i])
            .take(missing)
            .collect();
        keep.extend(filler);
        self.reindex(&keep)?;
        for (k, p) in self.particles.iter_mut().enumerate() {
            match selection.log_weights.get(k) {
                Some(&lw) => p.log_weight = lw,
                None => {
                    p.log_weight = f64::NEG_INFINITY;
                    p.finished = true;
                }
            }
        }
        for p in &mut self.particles {
            if p.finished {
                release(&mut self.kernel, p);
            }
        }
        Ok(keep)
    }
}

/// A run dropped early (after an error, say) still returns its sequences to the kernel, so
/// a borrowed kernel's cache stays usable.
impl<K: Kernel, P: Program> Drop for Smc<K, P> {
    fn drop(&mut self) {
        for p in &mut self.particles {
            release(&mut self.kernel, p);
        }
    }
}

fn untwist<P>(p: &mut ParticleState<P>) {
    if p.twist != 0.0 {
        p.log_weight -= p.twist;
        p.twist = 0.0;
    }
}

fn release<K: Kernel, P>(kernel: &mut K, p: &mut ParticleState<P>) {
    for c in &mut p.contexts {
        if let Some(seq) = c.seq.take() {
            kernel.release(seq);
        }
        c.pending.clear();
        c.pending_scored.clear();
    }
}

/// How far from 0 a kernel distribution's `log Σ exp` may be (rounding of f32 logits and
/// of a log-softmax in f64 stays far below it; a missing normalisation does not).
pub const NORMALISATION_TOLERANCE: f64 = 1e-6;

fn check_dist<K: ?Sized>(d: &[f64], vocab: &Vocabulary, trusted: bool) -> Result<()> {
    if d.len() != vocab.dist_len() {
        return Err(SmcError::InvalidDistribution(format!(
            "expected {} entries (vocabulary + EOS), got {}",
            vocab.dist_len(),
            d.len()
        )));
    }
    if d.iter().any(|x| x.is_nan()) {
        return Err(SmcError::InvalidDistribution("NaN log-probability".into()));
    }
    if trusted {
        return Ok(());
    }
    let log_mass = log_sum_exp(d);
    if log_mass.is_nan() || log_mass.abs() > NORMALISATION_TOLERANCE {
        return Err(SmcError::UnnormalisedDistribution {
            kernel: std::any::type_name::<K>().to_string(),
            log_mass,
        });
    }
    Ok(())
}
