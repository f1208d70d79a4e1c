//! One error type for the library. Every variant that comes from a user's input names the file,
//! so the CLI can print a single line and exit with code 2.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The input file is unreadable, malformed or inconsistent.
    #[error("{}: {reason}", path.display())]
    Input { path: PathBuf, reason: String },
    /// The adapter and the base model do not fit together.
    #[error("{}: {reason}", path.display())]
    Mismatch { path: PathBuf, reason: String },
    /// A numerical routine failed (should not happen on valid input).
    #[error("numerical failure: {0}")]
    Numeric(String),
    #[error("{0}")]
    Other(String),
}

impl Error {
    pub fn input(path: impl AsRef<Path>, reason: impl Into<String>) -> Self {
        Error::Input { path: path.as_ref().to_path_buf(), reason: reason.into() }
    }
    pub fn mismatch(path: impl AsRef<Path>, reason: impl Into<String>) -> Self {
        Error::Mismatch { path: path.as_ref().to_path_buf(), reason: reason.into() }
    }
    /// Whether the error is the user's input (exit code 2) rather than a bug.
    pub fn is_input(&self) -> bool {
        matches!(self, Error::Input { .. } | Error::Mismatch { .. })
    }
}

pub type Result<T> = std::result::Result<T, Error>;
