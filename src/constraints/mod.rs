//! Ready-made constraints: word-length limits ([`MaxWordLetters`]), character-level
//! potentials from byte recognizers ([`charlevel`]), and (feature `grammar`) regular
//! expressions, Lark grammars and JSON Schemas through llguidance (the crate's `grammar`
//! namespace).

pub mod charlevel;
pub(crate) mod grammar;
mod words;

pub use words::{MaxWordLetters, WordState};
