//! Grammar constraints compiled by llguidance over the kernel's token byte strings.

use std::sync::{Arc, Mutex, MutexGuard};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{
    InferenceCapabilities, SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenizerEnv,
};
use llguidance::{Matcher, ParserFactory};

use crate::core::error::SmcError;
use crate::core::vocab::{TokenId, Vocabulary};
use crate::potential::{Potential, SeqView};

/// A grammar: the language a constrained generation must belong to.
///
/// The language is a set of byte strings; a token sequence belongs to it when the
/// concatenation of its tokens' bytes does (any tokenization of a string is allowed).
///
/// # Example
/// ```
/// use smc_steer::grammar::Grammar;
/// let date = Grammar::regex(r"\d{4}-\d{2}-\d{2}");
/// assert!(date.validate().is_ok());
/// assert!(Grammar::regex(r"(unclosed").validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Grammar {
    /// A regular expression matched against the whole output (Rust `regex` syntax, no
    /// look-around or back-references).
    Regex(String),
    /// A Lark grammar in llguidance's dialect (rule `start` is the start symbol).
    Lark(String),
    /// A JSON Schema; the output is JSON that validates, in llguidance's default layout
    /// (`, ` and `: ` separators, no other whitespace).
    JsonSchema(serde_json::Value),
}

impl Grammar {
    /// A regular expression grammar.
    pub fn regex(pattern: impl Into<String>) -> Self {
        Grammar::Regex(pattern.into())
    }

    /// A Lark grammar.
    pub fn lark(source: impl Into<String>) -> Self {
        Grammar::Lark(source.into())
    }

    /// A JSON Schema given as a value.
    pub fn json_schema(schema: serde_json::Value) -> Self {
        Grammar::JsonSchema(schema)
    }

    /// A JSON Schema given as text.
    ///
    /// # Errors
    /// [`GrammarError::InvalidSchema`] when the text is not JSON.
    pub fn json_schema_str(schema: &str) -> Result<Self, GrammarError> {
        serde_json::from_str(schema)
            .map(Grammar::JsonSchema)
            .map_err(|e| GrammarError::InvalidSchema {
                message: format!("not valid JSON: {e}"),
            })
    }

    /// A short name of the grammar's kind (`regex`, `lark` or `json-schema`).
    pub fn kind(&self) -> &'static str {
        match self {
            Grammar::Regex(_) => "regex",
            Grammar::Lark(_) => "lark",
            Grammar::JsonSchema(_) => "json-schema",
        }
    }

    fn to_llg(&self) -> Result<TopLevelGrammar, GrammarError> {
        Ok(match self {
            Grammar::Regex(rx) => {
                // Check the syntax ourselves first: the error then points at the pattern.
                llguidance::derivre::RegexBuilder::new()
                    .mk_regex(rx)
                    .map_err(|e| GrammarError::InvalidRegex {
                        pattern: rx.clone(),
                        message: e.to_string(),
                    })?;
                TopLevelGrammar::from_regex(rx)
            }
            Grammar::Lark(src) => {
                if src.trim().is_empty() {
                    return Err(GrammarError::InvalidLark {
                        message: "the grammar is empty".into(),
                    });
                }
                TopLevelGrammar::from_lark(src.clone())
            }
            Grammar::JsonSchema(v) => {
                if !(v.is_object() || v.is_boolean()) {
                    return Err(GrammarError::InvalidSchema {
                        message: format!("a schema is an object or a boolean, got `{v}`"),
                    });
                }
                TopLevelGrammar::from_json_schema(v.clone())
            }
        })
    }

    fn compile_error(&self, message: String) -> GrammarError {
        match self {
            Grammar::Regex(rx) => GrammarError::InvalidRegex {
                pattern: rx.clone(),
                message,
            },
            Grammar::Lark(_) => GrammarError::InvalidLark { message },
            Grammar::JsonSchema(_) => GrammarError::InvalidSchema { message },
        }
    }

    /// Compile the grammar against a byte-level vocabulary: checks the regex, grammar or
    /// schema without a model (call it before loading one).
    ///
    /// # Errors
    /// [`GrammarError::InvalidRegex`], [`GrammarError::InvalidLark`] or
    /// [`GrammarError::InvalidSchema`], with llguidance's message.
    pub fn validate(&self) -> Result<(), GrammarError> {
        let bytes: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        let vocab = Vocabulary::new(bytes).map_err(|e| GrammarError::Vocabulary(e.to_string()))?;
        GrammarConstraint::new(&vocab, self.clone()).map(|_| ())
    }
}

/// Errors of grammar constraints. Grammar errors are reported when the constraint is
/// built, before any generation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GrammarError {
    /// The regular expression does not parse or is not supported.
    #[error("invalid regex `{pattern}`: {message}")]
    InvalidRegex {
        /// The pattern as given.
        pattern: String,
        /// What is wrong, and where.
        message: String,
    },
    /// The Lark grammar does not compile.
    #[error("invalid Lark grammar: {message}")]
    InvalidLark {
        /// What is wrong, and where.
        message: String,
    },
    /// The JSON Schema is not valid JSON, not a schema, or uses unsupported features.
    #[error("invalid JSON Schema: {message}")]
    InvalidSchema {
        /// What is wrong, and where.
        message: String,
    },
    /// The vocabulary cannot be turned into llguidance's token trie.
    #[error("the vocabulary cannot be used for grammar constraints: {0}")]
    Vocabulary(String),
    /// The matcher failed while generating (parser limits exceeded, internal error).
    #[error("grammar matcher error: {0}")]
    Matcher(String),
}

impl From<GrammarError> for SmcError {
    fn from(e: GrammarError) -> Self {
        match e {
            e @ GrammarError::Matcher(_) => SmcError::Backend {
                context: "grammar constraint",
                source: crate::core::error::SourceError::new(e),
            },
            other => SmcError::InvalidConstraint {
                source: crate::core::error::SourceError::new(other),
            },
        }
    }
}

/// Our vocabulary as llguidance's tokenizer environment: token `i` keeps id `i`, and our
/// EOS (`vocab.len()`) is an extra special token that no grammar text can produce.
///
/// `tokenize_is_canonical` is false, so llguidance never forces tokens or bytes: every mask
/// is the full set of tokens whose bytes keep the output in the language.
struct VocabEnv {
    trie: TokTrie,
}

impl TokenizerEnv for VocabEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        self.trie.greedy_tokenize(s)
    }
    fn tokenize_is_canonical(&self) -> bool {
        false
    }
}

/// Bytes of the EOS entry in llguidance's trie (a special token: it starts with 0xFF).
const EOS_BYTES: &[u8] = b"\xFF<|smc-steer-eos|>";

/// What every matcher of one constraint shares.
struct Shared {
    vocab_len: usize,
    /// Tokens without bytes: they leave the output unchanged, so they are allowed whenever
    /// the prefix is alive (llguidance's trie has no entry for them).
    empty_tokens: Vec<TokenId>,
    /// Clone matchers with their own lexer caches when forked.
    deep_fork: bool,
}

/// The set of allowed next symbols (vocabulary + EOS).
#[derive(Clone)]
pub struct Mask {
    bits: SimpleVob,
    /// Vocabulary size plus one.
    len: usize,
}

impl std::fmt::Debug for Mask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mask")
            .field("len", &self.len)
            .field("allowed", &self.count())
            .finish()
    }
}

impl Mask {
    /// Whether symbol `t` (a token or EOS) is allowed.
    pub fn allows(&self, t: TokenId) -> bool {
        (t as usize) < self.len && self.bits.is_allowed(t)
    }

    /// Number of allowed symbols.
    pub fn count(&self) -> usize {
        self.bits.num_set()
    }

    /// Whether nothing is allowed (the prefix cannot be continued nor ended).
    pub fn is_empty(&self) -> bool {
        self.bits.is_zero()
    }

    /// Number of symbols (vocabulary + EOS).
    pub fn len(&self) -> usize {
        self.len
    }

    /// `log_p` restricted to the mask (`-inf` outside), and `log Σ_{v ∈ mask} p(v)`.
    pub fn restrict(&self, log_p: &[f64]) -> (Vec<f64>, f64) {
        let mut out = vec![f64::NEG_INFINITY; log_p.len()];
        // Only the allowed entries are visited (masks are often sparse).
        let mut kept = Vec::new();
        self.bits.iter_set_entries(|i| {
            if let (Some(o), Some(l)) = (out.get_mut(i), log_p.get(i)) {
                *o = *l;
                kept.push(*l);
            }
        });
        let log_mass = crate::core::logspace::log_sum_exp(&kept);
        (out, log_mass)
    }
}

/// One particle's matcher: the grammar's state after the tokens generated so far.
///
/// Cloning a matcher forks it (the copy advances independently). By default the copy also
/// gets its own copy of llguidance's lexer cache ([`Matcher::deep_clone`]); see
/// [`GrammarConstraint::with_shared_lexer_cache`].
pub struct GrammarMatcher {
    /// Behind a mutex because llguidance computes masks and acceptance through `&mut`
    /// (they fill its caches without changing the language state): the potential's scores,
    /// which get `&` to the state, then need no fork of the matcher. Never contended: each
    /// particle owns its matcher.
    inner: Mutex<Matcher>,
    shared: Arc<Shared>,
    /// EOS was consumed.
    ended: bool,
    /// A token outside the language was consumed: every continuation has weight zero.
    dead: bool,
}

impl Clone for GrammarMatcher {
    fn clone(&self) -> Self {
        let inner = self.lock();
        Self {
            inner: Mutex::new(if self.shared.deep_fork {
                inner.deep_clone()
            } else {
                inner.clone()
            }),
            shared: Arc::clone(&self.shared),
            ended: self.ended,
            dead: self.dead,
        }
    }
}

impl std::fmt::Debug for GrammarMatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarMatcher")
            .field("ended", &self.ended)
            .field("dead", &self.dead)
            .finish()
    }
}

impl GrammarMatcher {
    fn new(inner: Matcher, shared: Arc<Shared>) -> Self {
        Self {
            inner: Mutex::new(inner),
            shared,
            ended: false,
            dead: false,
        }
    }

    /// The llguidance matcher. A panic inside llguidance while it was held cannot be
    /// recovered from here, but it already unwinds the run; the lock is then only read.
    fn lock(&self) -> MutexGuard<'_, Matcher> {
        match self.inner.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Advance by one symbol. Returns whether the output is still in (a prefix of) the
    /// language; after `false` the matcher is dead. EOS is accepted only where the
    /// language accepts the output.
    ///
    /// A failure of llguidance itself (a parser limit) also kills the matcher here; use
    /// [`GrammarMatcher::try_consume`] to tell it apart from a token outside the language.
    pub fn consume(&mut self, token: TokenId) -> bool {
        match self.try_consume(token) {
            Ok(ok) => ok,
            Err(_) => {
                self.dead = true;
                false
            }
        }
    }

    /// As [`GrammarMatcher::consume`], but a failure of the matcher (a parser or lexer
    /// limit, an internal error) is an error carrying llguidance's message, not a death.
    ///
    /// # Errors
    /// [`GrammarError::Matcher`].
    pub fn try_consume(&mut self, token: TokenId) -> Result<bool, GrammarError> {
        if self.dead || self.ended {
            self.dead = true;
            return Ok(false);
        }
        let eos = self.shared.vocab_len as TokenId;
        if token == eos {
            self.ended = true;
            if !self.accepts_eos() {
                self.dead = true;
            }
            return Ok(!self.dead);
        }
        if token > eos {
            self.dead = true;
            return Ok(false);
        }
        if self.shared.empty_tokens.binary_search(&token).is_ok() {
            return Ok(true);
        }
        let inner = self.inner.get_mut().unwrap_or_else(|p| p.into_inner());
        if inner.is_stopped() {
            // The output is complete and cannot be extended.
            self.dead = true;
            return Ok(false);
        }
        let consumed = inner.try_consume_tokens(&[token]);
        let result = match consumed {
            Ok(1) => return Ok(true),
            Ok(_) if !inner.is_error() => Ok(false),
            Ok(_) => Err(GrammarError::Matcher(inner.get_error().unwrap_or_default())),
            Err(e) => Err(GrammarError::Matcher(e.to_string())),
        };
        self.dead = true;
        result
    }

    /// Whether the live matcher would accept the ordinary token `token` next, without
    /// consuming it (what one next-token weight asks).
    ///
    /// # Errors
    /// [`GrammarError::Matcher`] when llguidance fails.
    fn allows_next(&self, token: TokenId) -> Result<bool, GrammarError> {
        if self.dead || self.ended || token as usize >= self.shared.vocab_len {
            return Ok(false);
        }
        if self.shared.empty_tokens.binary_search(&token).is_ok() {
            return Ok(true);
        }
        let mut inner = self.lock();
        if inner.is_stopped() {
            return Ok(false);
        }
        match inner.validate_tokens(&[token]) {
            Ok(n) if !inner.is_error() => Ok(n == 1),
            Ok(_) => Err(GrammarError::Matcher(inner.get_error().unwrap_or_default())),
            Err(e) => Err(GrammarError::Matcher(e.to_string())),
        }
    }

    /// Advance by several tokens; `false` as soon as one leaves the language.
    pub fn consume_all(&mut self, tokens: &[TokenId]) -> bool {
        tokens.iter().all(|&t| self.consume(t))
    }

    /// The allowed next symbols: the tokens whose bytes keep the output a prefix of the
    /// language, and EOS when the output is in the language. Empty for a dead or ended
    /// matcher.
    ///
    /// # Errors
    /// [`GrammarError::Matcher`] when llguidance fails (for example, a parser limit).
    pub fn mask(&self) -> Result<Mask, GrammarError> {
        let len = self.shared.vocab_len + 1;
        let mut bits = SimpleVob::alloc(len);
        if self.dead || self.ended {
            return Ok(Mask { bits, len });
        }
        let mut inner = self.lock();
        match inner.compute_mask_or_eos() {
            Ok(m) => bits.or(&m),
            Err(e) => {
                // llguidance stops with "no extension" when no token can follow; that is
                // an empty mask (the particle dies), not an error.
                if inner.stop_reason().is_ok() || is_no_extension(&e.to_string()) {
                    for &t in &self.shared.empty_tokens {
                        bits.allow_token(t);
                    }
                    return Ok(Mask { bits, len });
                }
                return Err(GrammarError::Matcher(e.to_string()));
            }
        }
        // Tokens without bytes leave the output unchanged: they continue any live prefix.
        for &t in &self.shared.empty_tokens {
            bits.allow_token(t);
        }
        Ok(Mask { bits, len })
    }

    /// Whether the output so far is in the language (EOS allowed now).
    pub fn accepts_eos(&self) -> bool {
        if self.dead {
            return false;
        }
        let mut inner = self.lock();
        if inner.is_stopped() {
            return inner.stop_reason().is_ok() && !inner.is_error();
        }
        inner.is_accepting().unwrap_or(false)
    }

    /// Whether a token outside the language was consumed.
    pub fn is_dead(&self) -> bool {
        self.dead
    }

    /// Whether EOS was consumed.
    pub fn is_ended(&self) -> bool {
        self.ended
    }
}

fn is_no_extension(msg: &str) -> bool {
    msg.contains("no_extension") || msg.contains("NoExtension") || msg.is_empty()
}

/// A grammar compiled for one vocabulary: a Boolean [`Potential`] and a source of
/// per-particle matchers ([`GrammarConstraint::matcher`]).
///
/// As a potential, `prefix(x)` is 0 while the bytes of `x` are a prefix of a string of the
/// language and `-inf` otherwise; `complete(x)` is 0 when they are in the language. Its
/// per-particle state is a matcher that consumes each token once. Use it as the target's
/// constraint through a sampler: [`crate::ProposalKind::Mask`] (the mask as a proposal
/// with its exact weight `log P(next ∈ mask)`) or [`crate::ProposalKind::Awrs`]. A failure
/// of llguidance itself (a parser limit) while advancing or computing a mask is
/// [`SmcError::Backend`] carrying llguidance's message.
///
/// # Example
/// ```
/// use smc_steer::grammar::{Grammar, GrammarConstraint};
/// use smc_steer::potential::{replay, Potential};
/// use smc_steer::Vocabulary;
/// let v = Vocabulary::from_strs(&["1", "2", "-", "12"]).unwrap();
/// let c = GrammarConstraint::new(&v, Grammar::regex(r"\d+-\d")).unwrap();
/// let (matcher, view) = replay(&c, &v, &[3, 2], b"12-").unwrap();
/// assert_eq!(c.prefix(&matcher, &view), 0.0);
/// assert_eq!(c.complete(&matcher, &view), f64::NEG_INFINITY);
/// let mut w = vec![0.0; v.dist_len()];
/// c.log_weight_next(&matcher, &view, &mut w).unwrap();
/// assert_eq!(w, vec![0.0, 0.0, f64::NEG_INFINITY, f64::NEG_INFINITY, f64::NEG_INFINITY]);
/// ```
pub struct GrammarConstraint {
    name: String,
    grammar: Grammar,
    factory: Arc<ParserFactory>,
    template: GrammarMatcher,
}

impl Clone for GrammarConstraint {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            grammar: self.grammar.clone(),
            factory: Arc::clone(&self.factory),
            template: self.template.clone(),
        }
    }
}

impl std::fmt::Debug for GrammarConstraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarConstraint")
            .field("name", &self.name)
            .field("grammar", &self.grammar)
            .field("vocab_len", &self.template.shared.vocab_len)
            .finish()
    }
}

impl GrammarConstraint {
    /// Compile `grammar` for `vocab` (token byte strings as the kernel reports them; EOS is
    /// the kernel's extra symbol).
    ///
    /// # Errors
    /// [`GrammarError::InvalidRegex`], [`GrammarError::InvalidLark`] or
    /// [`GrammarError::InvalidSchema`] for a bad grammar; [`GrammarError::Vocabulary`] for a
    /// vocabulary llguidance cannot index (more than 2^24 tokens, or a token longer than
    /// 1024 bytes).
    pub fn new(vocab: &Vocabulary, grammar: Grammar) -> Result<Self, GrammarError> {
        let factory = Arc::new(build_factory(vocab)?);
        let empty_tokens: Vec<TokenId> = vocab
            .tokens()
            .iter()
            .enumerate()
            .filter(|(_, b)| b.is_empty())
            .map(|(i, _)| i as TokenId)
            .collect();
        let shared = Arc::new(Shared {
            vocab_len: vocab.len(),
            empty_tokens,
            deep_fork: true,
        });
        Self::compile(factory, shared, grammar)
    }

    fn compile(
        factory: Arc<ParserFactory>,
        shared: Arc<Shared>,
        grammar: Grammar,
    ) -> Result<Self, GrammarError> {
        let top = grammar.to_llg()?;
        let parser = factory
            .create_parser(top)
            .map_err(|e| grammar.compile_error(e.to_string()))?;
        let inner = Matcher::new(Ok(parser));
        if let Some(e) = inner.get_error() {
            return Err(grammar.compile_error(e));
        }
        let name = format!("grammar:{}", grammar.kind());
        Ok(Self {
            name,
            grammar,
            factory,
            template: GrammarMatcher::new(inner, shared),
        })
    }

    /// Compile another grammar for the same vocabulary, reusing the token trie.
    ///
    /// # Errors
    /// As [`GrammarConstraint::new`].
    pub fn with_grammar(&self, grammar: Grammar) -> Result<Self, GrammarError> {
        Self::compile(
            Arc::clone(&self.factory),
            Arc::clone(&self.template.shared),
            grammar,
        )
    }

    /// Fork matchers without copying llguidance's lexer cache (`share = true`): forks then
    /// share one cache behind a mutex. The cache only memoises the lexer's automaton, so
    /// the forks still advance independently; sharing saves the copy on every resampling
    /// and lets all particles warm one cache. The default (`false`) deep-clones.
    pub fn with_shared_lexer_cache(mut self, share: bool) -> Self {
        let s = &self.template.shared;
        self.template.shared = Arc::new(Shared {
            vocab_len: s.vocab_len,
            empty_tokens: s.empty_tokens.clone(),
            deep_fork: !share,
        });
        self
    }

    /// Use another name in error messages.
    pub fn named(mut self, name: &str) -> Self {
        self.name = name.into();
        self
    }

    /// The grammar.
    pub fn grammar(&self) -> &Grammar {
        &self.grammar
    }

    /// A fresh matcher at the start of the output.
    pub fn matcher(&self) -> GrammarMatcher {
        self.template.clone()
    }

    /// Number of ordinary tokens of the vocabulary it was built for.
    pub fn vocab_len(&self) -> usize {
        self.template.shared.vocab_len
    }

    /// A matcher that has consumed `tokens` (dead if they leave the language).
    ///
    /// # Errors
    /// [`GrammarError::Matcher`] when llguidance itself fails on the way (a parser or lexer
    /// limit), which is not the same as the tokens leaving the language.
    pub fn matcher_after(&self, tokens: &[TokenId]) -> Result<GrammarMatcher, GrammarError> {
        let mut m = self.matcher();
        for &t in tokens {
            if !m.try_consume(t)? {
                break;
            }
        }
        Ok(m)
    }
}

/// Earley items allowed in one parser row (llguidance's `max_items_in_row`).
pub const MAX_ITEMS_IN_ROW: usize = 40_000;

fn build_factory(vocab: &Vocabulary) -> Result<ParserFactory, GrammarError> {
    let n = vocab.len();
    if n + 1 >= 0xff_ffff {
        return Err(GrammarError::Vocabulary(format!(
            "{n} tokens: llguidance's trie holds fewer than 2^24"
        )));
    }
    if let Some((i, t)) = vocab
        .tokens()
        .iter()
        .enumerate()
        .find(|(_, t)| t.len() > 1000)
    {
        return Err(GrammarError::Vocabulary(format!(
            "token {i} has {} bytes (at most 1000)",
            t.len()
        )));
    }
    let mut words: Vec<Vec<u8>> = vocab.tokens().to_vec();
    words.push(EOS_BYTES.to_vec());
    let info = TokRxInfo::new(words.len() as u32, n as u32);
    let trie = std::panic::catch_unwind(|| TokTrie::from(&info, &words)).map_err(|_| {
        GrammarError::Vocabulary("llguidance could not build its token trie".into())
    })?;
    let env: TokEnv = Arc::new(VocabEnv { trie });
    let caps = InferenceCapabilities {
        ff_tokens: false,
        conditional_ff_tokens: false,
        backtrack: false,
        fork: false,
    };
    let slices = llguidance::earley::SlicedBiasComputer::general_slices();
    let mut factory = ParserFactory::new(&env, caps, &slices)
        .map_err(|e| GrammarError::Vocabulary(e.to_string()))?;
    factory.quiet();
    let limits = factory.limits_mut();
    // llguidance's default (2,000 Earley items in one row) makes an alternation of 2,000
    // literals fail after its first token; rows stay far below the per-mask item budget
    // (`step_max_items`) with this bound.
    limits.max_items_in_row = MAX_ITEMS_IN_ROW;
    // One-line errors: no parser-state dump in the message.
    limits.verbose_errors = false;
    Ok(factory)
}

/// The state is the particle's own matcher: each token is consumed once, and cloning the
/// state forks the matcher (see [`GrammarConstraint::with_shared_lexer_cache`]).
impl Potential for GrammarConstraint {
    type State = GrammarMatcher;

    fn name(&self) -> &str {
        &self.name
    }

    fn start(&self, _: &Vocabulary) -> GrammarMatcher {
        self.matcher()
    }

    /// A token outside the language kills the matcher (`prefix` is then `-inf`); a failure
    /// of llguidance itself is [`SmcError::Backend`] with its message.
    fn advance(
        &self,
        matcher: &mut GrammarMatcher,
        _: &SeqView<'_>,
        token: TokenId,
    ) -> crate::Result<()> {
        matcher.try_consume(token)?;
        Ok(())
    }

    fn prefix(&self, matcher: &GrammarMatcher, _: &SeqView<'_>) -> f64 {
        if matcher.is_dead() {
            f64::NEG_INFINITY
        } else {
            0.0
        }
    }

    fn complete(&self, matcher: &GrammarMatcher, _: &SeqView<'_>) -> f64 {
        if matcher.accepts_eos() {
            0.0
        } else {
            f64::NEG_INFINITY
        }
    }

    /// The matcher's mask, computed in place (no fork); a failure of llguidance is
    /// [`SmcError::Backend`].
    fn log_weight_next(
        &self,
        matcher: &GrammarMatcher,
        _: &SeqView<'_>,
        out: &mut [f64],
    ) -> crate::Result<()> {
        if matcher.is_dead() {
            out.fill(f64::NEG_INFINITY);
            return Ok(());
        }
        let mask = matcher.mask()?;
        for (v, o) in out.iter_mut().enumerate() {
            *o = if mask.allows(v as TokenId) {
                0.0
            } else {
                f64::NEG_INFINITY
            };
        }
        Ok(())
    }

    /// Checks the one token without consuming it (no fork).
    fn log_weight_of(
        &self,
        matcher: &GrammarMatcher,
        _: &SeqView<'_>,
        token: TokenId,
    ) -> crate::Result<f64> {
        let ok = if token == matcher.shared.vocab_len as TokenId {
            matcher.accepts_eos()
        } else {
            matcher.allows_next(token)?
        };
        Ok(if ok { 0.0 } else { f64::NEG_INFINITY })
    }

    fn vocab_size(&self) -> Option<usize> {
        Some(self.vocab_len())
    }
}
