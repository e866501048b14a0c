//! The crate's error type: every failure names the file or input it is about.

use std::path::{Path, PathBuf};

/// Errors from loading models and adapters and from running the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A model directory or file is malformed or unsupported.
    #[error("model: {0}")]
    Model(String),
    /// A LoRA adapter is malformed, unsupported or does not fit the base model.
    #[error("adapter {path}: {reason}")]
    Adapter {
        /// The adapter directory or file at fault.
        path: PathBuf,
        /// Why it was refused.
        reason: String,
    },
    /// Tokenizer or chat template failure.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A request the engine cannot run (bad token ids, over the context, ...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A command-line setting this machine cannot honour (the message names the flag); the
    /// server exits 2 on it, as on any other bad flag.
    #[error("{0}")]
    Flag(String),
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// An adapter refusal naming `path`.
    pub fn adapter(path: &Path, reason: impl Into<String>) -> Self {
        Error::Adapter {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
