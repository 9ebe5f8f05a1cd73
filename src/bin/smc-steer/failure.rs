//! Failures of a command: an exit code (documented in docs/cli.md) and a one-line message.

use smc_steer::lm::LmError;
use smc_steer::SmcError;

use crate::model_path;

/// Exit codes (documented in docs/cli.md).
pub mod exit {
    pub const RUNTIME: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const MODEL: u8 = 3;
    pub const CONSTRAINT: u8 = 4;
}

/// A failure with its exit code and one-line message.
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    /// A usage error (exit 2).
    pub fn usage(m: impl Into<String>) -> Self {
        Self {
            code: exit::USAGE,
            message: m.into(),
        }
    }

    /// An invalid constraint (exit 4).
    pub fn constraint(m: impl Into<String>) -> Self {
        Self {
            code: exit::CONSTRAINT,
            message: m.into(),
        }
    }

    /// A failure while running (exit 1).
    pub fn runtime(m: impl Into<String>) -> Self {
        Self {
            code: exit::RUNTIME,
            message: m.into(),
        }
    }

    /// Writing the results to stdout failed (a full disk, a closed pipe).
    pub fn stdout(e: std::io::Error) -> Self {
        Self::runtime(format!("cannot write to stdout: {e}"))
    }
}

impl From<SmcError> for Failure {
    fn from(e: SmcError) -> Self {
        let code = match e {
            SmcError::ZeroParticles
            | SmcError::InvalidEssThreshold(_)
            | SmcError::ZeroBeam
            | SmcError::InvalidConfig(_) => exit::USAGE,
            SmcError::InvalidConstraint { .. } => exit::CONSTRAINT,
            _ => exit::RUNTIME,
        };
        Self {
            code,
            message: e.to_string(),
        }
    }
}

impl From<LmError> for Failure {
    fn from(e: LmError) -> Self {
        let code = match e {
            LmError::EmptyPrompt
            | LmError::ContextOverflow { .. }
            | LmError::RequestTooLong { .. }
            | LmError::InsufficientMemory { .. }
            | LmError::InvalidConfig(_)
            | LmError::DeviceUnavailable { .. } => exit::USAGE,
            LmError::ChatTemplate(_)
            | LmError::Tokenizer(_)
            | LmError::OutOfMemory { .. }
            | LmError::CacheExhausted { .. } => exit::RUNTIME,
            _ => exit::MODEL,
        };
        Self {
            code,
            // The library names the missing file; the command line adds how to get one.
            message: model_path::explain(&e),
        }
    }
}
