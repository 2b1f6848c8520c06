//! Errors of the COCOB optimizer.

use std::path::PathBuf;

/// Everything that can go wrong in `flowtune-cocob`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is out of range.
    #[error("invalid COCOB config field `{field}`: {reason}")]
    InvalidConfig {
        /// The offending field.
        field: &'static str,
        /// Why it is invalid.
        reason: String,
    },
    /// A parameter tensor cannot be optimised (sparse, non-float, undefined, ...).
    #[error("parameter `{name}` cannot be optimised: {reason}")]
    InvalidParameter {
        /// Name of the parameter.
        name: String,
        /// Why.
        reason: String,
    },
    /// Two parameters share a name.
    #[error("duplicate parameter name `{name}`")]
    DuplicateParameter {
        /// The repeated name.
        name: String,
    },
    /// A saved state does not fit the optimizer's parameters.
    #[error("optimizer state in {path} does not fit: {what}")]
    StateMismatch {
        /// The state file.
        path: PathBuf,
        /// What does not fit (names the parameter / tensor key).
        what: String,
    },
    /// A tensor named in the state metadata is missing from the safetensors file.
    #[error("optimizer state {path} lacks tensor `{key}`")]
    MissingStateTensor {
        /// The safetensors file.
        path: PathBuf,
        /// The missing key.
        key: String,
    },
    /// Reading or writing a file failed.
    #[error("i/o error on {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The JSON metadata could not be (de)serialised.
    #[error("bad JSON in {path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: serde_json::Error,
    },
    /// A libtorch operation failed.
    #[error("torch error: {0}")]
    Torch(#[from] tch::TchError),
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
