//! The Feynman-Kac model `(s0, M_t, G_t)` as a particle program.
//!
//! `s0` is the prompt given to the engine, `M_t` the kernel (optionally replaced by a
//! proposal with importance weights), and `G_t` the increments of a [`Potential`]. This
//! program is written on top of the [`Program`] interface, so both forms run on the same
//! engine.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use unicode_segmentation::UnicodeSegmentation;

use crate::core::error::{Result, SmcError};
use crate::core::logspace::{log_div, log_mul, log_sum_exp};
use crate::core::sampling::restrict;
use crate::core::vocab::Vocabulary;
use crate::model::particle::Particle;
use crate::model::program::{Flow, Program, Truncation};
use crate::potential::{AnyState, DynPotential, Potential, SharedPotential};
use crate::proposal::{PotentialIncrement, ProposalKind, SamplerInput, TokenSampler};

/// A Feynman-Kac model: kernel steps weighted by a potential.
///
/// # Maths
/// The target is `π(x) ∝ p(x)·φ_end(x)` (see [`crate::potential`]); each step multiplies the
/// weight by `p(v)/q(v) · φ(x·v)/φ(x)` for the drawn token `v` (the built-in proposals
/// simplify it, see [`ProposalKind`]).
///
/// # Example
/// ```
/// use smc_steer::{potential::Hard, testing::ToyKernel, FeynmanKac, Smc, SmcConfig};
/// let kernel = ToyKernel::random_bigram(3, 0.3, 1).unwrap();
/// let model = FeynmanKac::new(Hard::on_text("no-c", |t: &str| !t.contains('c')));
/// let config = SmcConfig { particles: 16, max_tokens: 4, ..SmcConfig::default() };
/// let result = Smc::new(kernel, model, &[], config).unwrap().run().unwrap();
/// assert!(result.log_z.is_finite());
/// ```
#[derive(Clone)]
pub struct FeynmanKac {
    /// The potential `G`.
    potential: SharedPotential,
    /// This particle's state of `potential` (made at the first use, from the kernel's
    /// vocabulary).
    state: Option<AnyState>,
    /// `log φ` of the current prefix.
    prefix_score: f64,
    /// The built-in proposal the sampler was made from (`None` for a user sampler).
    proposal: Option<ProposalKind>,
    /// The proposal.
    sampler: Arc<dyn TokenSampler>,
    /// This particle's state of the sampler (its constraint's state), if it keeps one.
    sampler_state: Option<AnyState>,
    unit: StepUnit,
    /// Word steps: what the next draw is conditioned on.
    phase: WordPhase,
    /// Word steps: which tokens continue the current word (built once, shared).
    words: Arc<OnceLock<WordBoundaries>>,
    /// Word steps: tokens drawn in the current SMC step.
    step_tokens: usize,
    /// How the AWRS proposal's weight walk stops.
    awrs_options: crate::proposal::awrs::AwrsOptions,
}

/// The most tokens one word step draws: a longer word ends the SMC step there and the next
/// step continues the same word (a resampling point inside a very long word, instead of an
/// error; the target is unchanged). Below the engine's default
/// [`crate::SmcConfig::max_substeps`].
pub const WORD_STEP_MAX_TOKENS: usize = 16;

/// What one SMC step of a [`FeynmanKac`] model generates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum StepUnit {
    /// One token per step (the default).
    #[default]
    Token,
    /// One word per step: after each token the program samples, with the model's own
    /// probability, whether the next token continues the current word — whether appending
    /// it leaves no Unicode (UAX #29) word boundary at the join, judged on two characters
    /// either side; the step ends when it does not, and the next step's first token is
    /// drawn conditioned on that event. The target is unchanged (the event is a fixed
    /// function of the text and the token, sampled with its exact probability); only the
    /// resampling points move to word boundaries. While the text ends inside an incomplete
    /// UTF-8 character every token continues (no boundary can fall inside a character).
    /// A word longer than [`WORD_STEP_MAX_TOKENS`] tokens ends the step early. Uses
    /// sub-steps ([`Flow::Continue`]) within a step.
    Word,
}

/// Where a word step stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WordPhase {
    /// Draw the next token, conditioned on continuing the word (`Some(true)`), on not
    /// continuing it (`Some(false)`) or on nothing.
    Draw(Option<bool>),
    /// A token was just appended: sample whether the next one continues the word.
    Decide,
}

impl std::fmt::Debug for FeynmanKac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeynmanKac")
            .field("potential", &self.potential.name())
            .field("sampler", &self.sampler.name())
            .finish()
    }
}

impl FeynmanKac {
    /// A bootstrap model: sample from the kernel, weight by the potential.
    pub fn new(potential: impl Potential + 'static) -> Self {
        Self::from_arc(Arc::new(potential))
    }

    /// As [`FeynmanKac::new`] with a shared potential.
    pub fn from_arc(potential: Arc<dyn DynPotential>) -> Self {
        Self {
            potential: SharedPotential::from_arc(potential),
            state: None,
            prefix_score: 0.0,
            proposal: Some(ProposalKind::Bootstrap),
            sampler: Arc::new(crate::proposal::Bootstrap),
            sampler_state: None,
            unit: StepUnit::Token,
            phase: WordPhase::Draw(None),
            words: Arc::new(OnceLock::new()),
            step_tokens: 0,
            awrs_options: crate::proposal::awrs::AwrsOptions::default(),
        }
    }

    /// Generate one token (default) or one word per SMC step.
    pub fn with_step_unit(mut self, unit: StepUnit) -> Self {
        self.unit = unit;
        self
    }

    /// Options of the [`ProposalKind::Awrs`] weight (evaluations against variance; see
    /// [`crate::proposal::awrs::AwrsOptions`]).
    pub fn with_awrs_options(mut self, options: crate::proposal::awrs::AwrsOptions) -> Self {
        self.awrs_options = options;
        if let Some(kind) = &self.proposal {
            self.sampler = kind.sampler(options);
        }
        self
    }

    /// Use a built-in proposal.
    pub fn with_proposal(mut self, proposal: ProposalKind) -> Self {
        self.sampler = proposal.sampler(self.awrs_options);
        self.proposal = Some(proposal);
        self
    }

    /// Use any [`TokenSampler`] as the proposal.
    pub fn with_sampler(mut self, sampler: impl TokenSampler + 'static) -> Self {
        self.sampler = Arc::new(sampler);
        self.proposal = None;
        self
    }

    /// The potential.
    pub fn potential(&self) -> &SharedPotential {
        &self.potential
    }

    /// `log φ` of the particle's current prefix.
    pub fn prefix_score(&self) -> f64 {
        self.prefix_score
    }

    /// Draw one token from `log_p` (the kernel's distribution, possibly conditioned on a
    /// word-boundary event) with the sampler, append it and update the weight. Returns
    /// `None` when the particle died.
    fn draw_token(&mut self, p: &mut Particle<'_>, log_p: &[f64]) -> Result<Option<u32>> {
        let vocab = p.vocab();
        self.state_mut(vocab);
        if self.sampler_state.is_none() {
            self.sampler_state = self.sampler.start(vocab);
        }
        let (Some(potential_state), sampler) = (self.state.as_ref(), Arc::clone(&self.sampler))
        else {
            return Err(SmcError::Program(
                "potential state missing (internal)".into(),
            ));
        };
        // The sampler draws with the particle's own RNG stream.
        let mut rng = p.take_rng();
        let draw = sampler.sample(&mut SamplerInput {
            log_p,
            seq: p.view(),
            potential: &self.potential,
            potential_state,
            state: self.sampler_state.as_ref(),
            rng: &mut rng,
        });
        p.put_rng(rng);
        let draw = draw?;
        let Some(draw) = draw else {
            p.condition(false);
            return Ok(None);
        };
        let t = draw.token;
        match draw.potential {
            PotentialIncrement::Pending => {
                let inc = self.append(p, t)?;
                p.score(draw.log_weight)?;
                p.score(inc)?;
            }
            PotentialIncrement::Included(g) => {
                if t != vocab.eos() {
                    self.advance_states(p, t)?;
                    p.append_to(0, t)?;
                    self.prefix_score = log_mul(self.prefix_score, g);
                } else {
                    p.append_to(0, t)?;
                }
                p.score(draw.log_weight)?;
            }
        }
        Ok(if p.is_finished() && p.log_weight() == f64::NEG_INFINITY {
            None
        } else {
            Some(t)
        })
    }

    /// This particle's state of the potential (started on first use).
    fn state_mut(&mut self, vocab: &Vocabulary) -> &mut AnyState {
        let potential = &self.potential;
        self.state.get_or_insert_with(|| potential.start(vocab))
    }

    /// Advance the potential's (and the constraint's) state past the ordinary token `t`,
    /// before it is appended. A failure (a grammar matcher's) is an error of the run.
    fn advance_states(&mut self, p: &Particle<'_>, t: u32) -> Result<()> {
        let view = p.view();
        let vocab = p.vocab();
        let potential = self.potential.clone();
        potential.advance(self.state_mut(vocab), &view, t)?;
        if self.sampler_state.is_none() {
            self.sampler_state = self.sampler.start(vocab);
        }
        if let Some(state) = self.sampler_state.as_mut() {
            self.sampler.advance(state, &view, t)?;
        }
        Ok(())
    }

    /// Append `t` and return its potential increment `log φ(x·t) − log φ(x)` (on EOS:
    /// `log φ_end(x) − log φ(x)`), advancing the states.
    fn append(&mut self, p: &mut Particle<'_>, t: u32) -> Result<f64> {
        if t == p.vocab().eos() {
            let inc = self.end_increment(p)?;
            p.append_to(0, t)?;
            return Ok(inc);
        }
        self.advance_states(p, t)?;
        p.append_to(0, t)?;
        let vocab = p.vocab();
        let potential = self.potential.clone();
        let score = checked(
            &potential,
            potential.prefix(self.state_mut(vocab), &p.view()),
        )?;
        let inc = log_div(score, self.prefix_score);
        self.prefix_score = score;
        Ok(inc)
    }

    /// `log φ_end(x) − log φ(x)` for ending the current sequence.
    fn end_increment(&mut self, p: &Particle<'_>) -> Result<f64> {
        let potential = self.potential.clone();
        let end = checked(
            &potential,
            potential.complete(self.state_mut(p.vocab()), &p.view()),
        )?;
        Ok(log_div(end, self.prefix_score))
    }
}

/// `x`, or [`SmcError::NanPotential`] naming `potential` when `x` is NaN.
fn checked(potential: &SharedPotential, x: f64) -> Result<f64> {
    crate::potential::checked(potential.name(), x)
}

impl Program for FeynmanKac {
    fn check(&self, vocab: &Vocabulary) -> Result<()> {
        let check = |what: &str, n: Option<usize>| match n {
            Some(found) if found != vocab.len() => Err(SmcError::VocabularyMismatch {
                what: what.to_string(),
                expected: vocab.len(),
                found,
            }),
            _ => Ok(()),
        };
        check(
            &format!("potential `{}`", self.potential.name()),
            self.potential.vocab_size(),
        )?;
        check(
            &format!("proposal `{}`", self.sampler.name()),
            self.sampler.vocab_size(),
        )?;
        Ok(())
    }

    fn start(&mut self, p: &mut Particle<'_>) -> Result<()> {
        let vocab = p.vocab();
        let potential = self.potential.clone();
        let state = potential.start(vocab);
        let initial = checked(&potential, potential.prefix(&state, &p.view()))?;
        self.state = Some(state);
        self.sampler_state = self.sampler.start(vocab);
        self.prefix_score = initial;
        p.score(initial)
    }

    fn step(&mut self, p: &mut Particle<'_>) -> Result<Flow> {
        let log_p = p.log_probs()?;
        if self.unit == StepUnit::Token {
            self.draw_token(p, &log_p)?;
            return Ok(Flow::Yield);
        }
        let words = self.words.get_or_init(|| WordBoundaries::new(p.vocab()));
        let continues = words.continuing(p.view().bytes);
        let in_word = |v: usize| continues.get(v).copied().unwrap_or(false);
        let mut restriction = match self.phase {
            WordPhase::Draw(r) => r,
            WordPhase::Decide => {
                // The event "next token continues the word", drawn with its model probability.
                let cont: Vec<f64> = log_p
                    .iter()
                    .enumerate()
                    .filter(|(v, _)| in_word(*v))
                    .map(|(_, l)| *l)
                    .collect();
                let p_cont = log_sum_exp(&cont).exp();
                let u: f64 = rand::Rng::random(p.rng());
                if u < p_cont && p.tokens_left() > 0 {
                    Some(true)
                } else {
                    self.phase = WordPhase::Draw(Some(false));
                    self.step_tokens = 0;
                    return Ok(Flow::Yield);
                }
            }
        };
        if p.tokens().is_empty() {
            restriction = None;
        }
        // Condition the kernel's distribution on the event: p(v | event) = p(v)·1[v ∈ E] / P(E).
        let conditioned: std::borrow::Cow<'_, [f64]> = match restriction {
            None => std::borrow::Cow::Borrowed(&log_p[..]),
            Some(want) => {
                let (mut masked, mass) = restrict(&log_p, |v| in_word(v) == want);
                if mass == f64::NEG_INFINITY {
                    return Err(SmcError::Program(
                        "a word-boundary event of probability zero was drawn".into(),
                    ));
                }
                // Normalised in place: the conditional distribution p(v | event).
                for l in &mut masked {
                    *l = log_div(*l, mass);
                }
                std::borrow::Cow::Owned(masked)
            }
        };
        let drawn = self.draw_token(p, &conditioned)?;
        match drawn {
            Some(t) if t != p.vocab().eos() && !p.is_finished() => {
                self.phase = WordPhase::Decide;
                self.step_tokens += 1;
                if self.step_tokens >= WORD_STEP_MAX_TOKENS {
                    // A very long word: resample here; the next step decides (Decide phase)
                    // whether the word goes on.
                    self.step_tokens = 0;
                    return Ok(Flow::Yield);
                }
                Ok(Flow::Continue)
            }
            _ => {
                self.phase = WordPhase::Draw(None);
                self.step_tokens = 0;
                Ok(Flow::Yield)
            }
        }
    }

    fn at_token_limit(&mut self, p: &mut Particle<'_>, policy: Truncation) -> Result<()> {
        self.phase = WordPhase::Draw(None);
        self.step_tokens = 0;
        match policy {
            Truncation::Truncate => p.finish(),
            Truncation::ForceEos => {
                // The proposal's constraint is part of the target: EOS forced at the limit
                // must be allowed by it, exactly as a drawn EOS would have to be.
                let eos = p.vocab().eos();
                if self.sampler_state.is_none() {
                    self.sampler_state = self.sampler.start(p.vocab());
                }
                let allowed = self
                    .sampler
                    .allows_end(self.sampler_state.as_ref(), &p.view())?;
                if !allowed {
                    p.condition(false);
                    return Ok(());
                }
                let inc = self.end_increment(p)?;
                p.observe(eos)?;
                p.score(inc)?;
            }
        }
        Ok(())
    }
}

/// Which tokens continue the current word, by Unicode word boundaries (UAX #29).
///
/// Whether a boundary falls at the join of the text and a token is judged on the last two
/// characters of the text and the first two of the token, so tokens are grouped by their
/// first two characters and the answer for every token is computed once per distinct
/// left context and shared by all particles.
struct WordBoundaries {
    /// For each ordinary token, its group (the first two characters of its text).
    group_of: Vec<u32>,
    /// The first two characters of each group's tokens (empty for a token with no bytes).
    groups: Vec<String>,
    /// Answers by left context: `out[v]` for every token and EOS (EOS ends a word).
    cache: Mutex<HashMap<LeftContext, Arc<Vec<bool>>>>,
}

/// The last two characters of the text, oldest first (`None` where the text is shorter):
/// the left side of a join, a key that needs no allocation.
type LeftContext = [Option<char>; 2];

/// The [`LeftContext`] of `bytes` read as [`crate::core::vocab::prefix_text`] reads them.
///
/// Only a tail is decoded, so the cost does not grow with the text: a byte that is not a
/// UTF-8 continuation byte starts a character (or a U+FFFD) in the decoding of the whole
/// text and of any tail starting there alike, and a tail of at least 8 bytes holds at
/// least two characters.
fn left_context(bytes: &[u8]) -> LeftContext {
    let is_continuation = |b: u8| b & 0xC0 == 0x80;
    let mut start = bytes.len().saturating_sub(8);
    while start > 0 && bytes.get(start).is_some_and(|b| is_continuation(*b)) {
        start -= 1;
    }
    let text = crate::core::vocab::prefix_text(&bytes[start..]);
    let mut last = text.chars().rev();
    let (b, a) = (last.next(), last.next());
    [a, b]
}

impl WordBoundaries {
    fn new(vocab: &Vocabulary) -> Self {
        let mut index: HashMap<String, u32> = HashMap::new();
        let mut groups = Vec::new();
        let group_of = vocab
            .tokens()
            .iter()
            .map(|t| {
                let key: String = String::from_utf8_lossy(t).chars().take(2).collect();
                *index.entry(key.clone()).or_insert_with(|| {
                    groups.push(key);
                    (groups.len() - 1) as u32
                })
            })
            .collect();
        Self {
            group_of,
            groups,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// `out[v]`: whether token `v` continues the word that `bytes` (the text so far) ends in.
    fn continuing(&self, bytes: &[u8]) -> Arc<Vec<bool>> {
        let n = self.group_of.len();
        if crate::core::vocab::incomplete_tail_start(bytes) < bytes.len() {
            // Inside an incomplete character: no boundary can fall here.
            let mut all = vec![true; n + 1];
            all[n] = false;
            return Arc::new(all);
        }
        let key = left_context(bytes);
        let mut cache = match self.cache.lock() {
            Ok(c) => c,
            // A panic elsewhere cannot leave the map half-written: reuse it.
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(hit) = cache.get(&key) {
            return Arc::clone(hit);
        }
        let left: String = key.iter().flatten().collect();
        let by_group: Vec<bool> = self
            .groups
            .iter()
            .map(|g| {
                if g.is_empty() {
                    return true; // a token with no bytes adds no boundary
                }
                if left.is_empty() {
                    return false;
                }
                let joined = format!("{left}{g}");
                !joined
                    .split_word_bound_indices()
                    .any(|(i, _)| i == left.len())
            })
            .collect();
        let mut out: Vec<bool> = self
            .group_of
            .iter()
            .map(|&g| by_group[g as usize])
            .collect();
        out.push(false); // EOS ends the word
        let out = Arc::new(out);
        cache.insert(key, Arc::clone(&out));
        out
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    /// Seed of the random byte strings.
    const LEFT_CONTEXT_SEED: u64 = 0x1ef7_c0de;

    #[test]
    fn left_context_of_a_tail_is_that_of_the_whole_text() {
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(LEFT_CONTEXT_SEED);
        // Bytes drawn to mix ASCII, continuation bytes, lead bytes and invalid bytes.
        let pool: [u8; 10] = [b'a', b' ', 0x80, 0xBF, 0xC3, 0xA9, 0xE2, 0x82, 0xF0, 0xFF];
        for _ in 0..20_000 {
            let n = rng.random_range(0..24);
            let bytes: Vec<u8> = (0..n)
                .map(|_| pool[rng.random_range(0..pool.len())])
                .collect();
            let whole: Vec<char> = crate::core::vocab::prefix_text(&bytes).chars().collect();
            let mut expected = [None, None];
            if let Some(c) = whole.last() {
                expected[1] = Some(*c);
            }
            if whole.len() >= 2 {
                expected[0] = Some(whole[whole.len() - 2]);
            }
            assert_eq!(left_context(&bytes), expected, "{bytes:?}");
        }
    }
}
