//! One error type for the library. Every variant that comes from a user's input names the file,
//! so the CLI prints a single line; underlying errors (I/O, JSON, candle) are kept as sources.
//! Exit codes (README, `lorascope --help`): 0 ok, 1 a finding (`--fail-on`, `verify`), 2 bad
//! input or usage, 3 an internal error of lorascope.

use std::path::{Path, PathBuf};

/// An underlying error kept as the source of ours.
pub(crate) type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The input file is unreadable, malformed or inconsistent.
    #[error("{}: {reason}", path.display())]
    Input { path: PathBuf, reason: String },
    /// An input file could not be read or parsed by the library that reads it (I/O, JSON,
    /// GGUF); `what` says what was being done.
    #[error("{}: {what}: {source}", path.display())]
    Read {
        path: PathBuf,
        what: String,
        #[source]
        source: Source,
    },
    /// A file lorascope would not open (load::fsguard): a symbolic link leading outside the tree
    /// the user named, or not a regular file (FIFO, socket, device). Nothing of it was read.
    #[error("{}: {reason}", path.display())]
    Refused { path: PathBuf, reason: String },
    /// The adapter and the base model do not fit together.
    #[error("{}: {reason}", path.display())]
    Mismatch { path: PathBuf, reason: String },
    /// The input's values cannot be analysed: NaN/Inf, magnitudes beyond the analysis limit,
    /// or an overflow in the arithmetic on them. An input error; `scan` flags it.
    #[error("{}: {reason}", path.display())]
    Values { path: PathBuf, reason: String },
    /// A command-line value or combination that cannot work (a usage error).
    #[error("{0}")]
    Usage(String),
    /// A numerical routine failed (should not happen on valid input).
    #[error("numerical failure: {0}")]
    Numeric(String),
    /// The model runtime failed while running a valid model.
    #[error("{what}: {source}")]
    Runtime {
        what: String,
        #[source]
        source: Source,
    },
    /// A failure of lorascope itself.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub(crate) fn input(path: impl AsRef<Path>, reason: impl Into<String>) -> Self {
        Error::Input { path: path.as_ref().to_path_buf(), reason: reason.into() }
    }
    pub(crate) fn refused(path: impl AsRef<Path>, reason: impl Into<String>) -> Self {
        Error::Refused { path: path.as_ref().to_path_buf(), reason: reason.into() }
    }
    pub(crate) fn mismatch(path: impl AsRef<Path>, reason: impl Into<String>) -> Self {
        Error::Mismatch { path: path.as_ref().to_path_buf(), reason: reason.into() }
    }
    /// Reading or parsing `path` failed with `source` while doing `what` ("cannot open").
    pub(crate) fn read(path: impl AsRef<Path>, what: impl Into<String>, source: impl Into<Source>) -> Self {
        Error::Read { path: path.as_ref().to_path_buf(), what: what.into(), source: source.into() }
    }
    /// Whether the error is the user's input or usage (exit code 2) rather than a failure of
    /// lorascope (exit code 3).
    pub(crate) fn is_input(&self) -> bool {
        matches!(
            self,
            Error::Input { .. }
                | Error::Read { .. }
                | Error::Refused { .. }
                | Error::Mismatch { .. }
                | Error::Values { .. }
                | Error::Usage(_)
        )
    }
    /// The process exit code for this error: 2 bad input or usage, 3 internal.
    pub fn exit_code(&self) -> u8 {
        if self.is_input() {
            2
        } else {
            3
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// The text a panic carried (`panic!` with a literal or a formatted message), for the one line
/// that reports it.
pub fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown cause".into())
}

/// A fault injected at a named stage when `LORASCOPE_FAULT` names it: the tests use it to check
/// that an internal failure in the middle of a command exits with code 3 and a clear line,
/// and becomes an `internal` error record in a scan; `LORASCOPE_FAULT=panic` panics at the
/// first stage instead (a panic must also become exit code 3, or an error record). Costs one
/// environment lookup per stage.
pub(crate) fn injected_fault(stage: &str) -> Result<()> {
    match std::env::var("LORASCOPE_FAULT") {
        Ok(s) if s == "panic" => panic!("fault injected at stage {stage} (LORASCOPE_FAULT=panic)"),
        Ok(s) if s == stage => Err(Error::Internal(format!("fault injected at stage {stage} (LORASCOPE_FAULT)"))),
        _ => Ok(()),
    }
}
