//! The foundations every layer builds on: vocabularies and the UTF-8 text rule, the kernel
//! interface, log-space arithmetic, categorical sampling and the crate's error type.

pub mod error;
pub(crate) mod exp;
pub mod kernel;
pub mod logspace;
pub mod sampling;
pub mod vocab;
