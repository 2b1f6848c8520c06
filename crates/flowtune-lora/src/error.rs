//! The crate's error type: every variant names the file, key, field or adapter at fault.

use std::path::PathBuf;

/// Result alias used throughout `flowtune-lora`.
pub type Result<T> = std::result::Result<T, LoraError>;

/// Everything that can go wrong in the adapter bank.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// Reading or writing a file failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// File or directory involved.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// `adapter_config.json` is not valid JSON or does not fit the schema.
    #[error("invalid adapter config {path}: {source}")]
    ConfigJson {
        /// The config file.
        path: PathBuf,
        /// Underlying serde error (names line and column).
        source: serde_json::Error,
    },
    /// A config field has a value this crate does not support or that is invalid.
    #[error("adapter config field `{field}`: {reason}")]
    ConfigField {
        /// The offending field (PEFT name).
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The safetensors file is corrupted (bad header, truncated data, ...).
    #[error("corrupted safetensors file {path}: {reason}")]
    SafeTensors {
        /// The file.
        path: PathBuf,
        /// Parser message.
        reason: String,
    },
    /// A tensor in the adapter file has a dtype we cannot read.
    #[error("tensor `{key}` in {path} has unsupported dtype {dtype}")]
    UnsupportedDtype {
        /// The file.
        path: PathBuf,
        /// The tensor key.
        key: String,
        /// The dtype as written in the file.
        dtype: String,
    },
    /// A key in the adapter file is not a LoRA weight of a site the base has, or is not targeted.
    #[error("unexpected key `{key}` in {path}: {reason}")]
    UnexpectedKey {
        /// The file.
        path: PathBuf,
        /// The tensor key.
        key: String,
        /// Why it does not fit.
        reason: String,
    },
    /// A key the config implies (targeted site of the base) is absent from the adapter file.
    #[error("missing key `{key}` in {path}")]
    MissingKey {
        /// The file.
        path: PathBuf,
        /// The absent tensor key.
        key: String,
    },
    /// A tensor does not have the shape the base model and config imply.
    #[error(
        "tensor `{key}` has shape {found:?}, expected {expected:?} (from the base model and rank)"
    )]
    ShapeMismatch {
        /// Tensor key (PEFT format) or site name.
        key: String,
        /// Shape implied by base and config.
        expected: Vec<i64>,
        /// Shape found.
        found: Vec<i64>,
    },
    /// No adapter of that name exists in the bank.
    #[error("no adapter named `{name}` in the bank")]
    UnknownAdapter {
        /// The name asked for.
        name: String,
    },
    /// An adapter id does not (or no longer) refer to an adapter of the bank.
    #[error("adapter id {id} does not refer to an adapter in the bank (removed?)")]
    UnknownAdapterId {
        /// The raw id.
        id: u32,
    },
    /// An adapter of that name already exists.
    #[error("an adapter named `{name}` already exists in the bank")]
    AdapterExists {
        /// The name.
        name: String,
    },
    /// The target modules of an adapter match no site of the base model.
    #[error("adapter `{name}`: target_modules match no site of the base model")]
    NoTargetSites {
        /// The adapter.
        name: String,
    },
    /// Two adapters cannot be combined (copy into existing / lerp) because they differ in structure.
    #[error("adapters `{left}` and `{right}` are incompatible: {reason}")]
    Incompatible {
        /// First adapter.
        left: String,
        /// Second adapter.
        right: String,
        /// The difference.
        reason: String,
    },
    /// A per-row selection does not have one entry per batch row.
    #[error("per-row adapter selection has {found} entries but the batch has {expected} rows")]
    SelectionRows {
        /// Rows of the input.
        expected: i64,
        /// Entries of the selection.
        found: usize,
    },
    /// The input of `delta` does not have the site's input width.
    #[error("input to site {site} has last dimension {found}, expected {expected}")]
    InputShape {
        /// The site.
        site: String,
        /// in_features of the site.
        expected: i64,
        /// Last dim of the input.
        found: i64,
    },
    /// The base model does not expose the weight of a site an adapter targets (merge/unmerge).
    #[error("base model has no weight for site {site}: {reason}")]
    BaseWeight {
        /// The site.
        site: String,
        /// Why.
        reason: String,
    },
    /// A libtorch operation failed.
    #[error("torch error: {0}")]
    Torch(#[from] tch::TchError),
}
