//! The crate's error type: every variant names the file, line, field or record at fault.
use std::path::PathBuf;

/// Errors from loading MuSiQue data, computing metrics, rendering prompts and running flows.
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
    /// A line that is not valid JSON (or not a JSON object).
    #[error("{path}:{line}: malformed JSON: {message}")]
    MalformedJson {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What the parser said.
        message: String,
    },
    /// A required field is absent.
    #[error("{path}:{line}: missing field `{field}`")]
    MissingField {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// Path of the field, e.g. `paragraphs[3].title`.
        field: String,
    },
    /// A field is present but has the wrong type or an invalid value.
    #[error("{path}:{line}: invalid field `{field}`: {reason}")]
    InvalidField {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// Path of the field.
        field: String,
        /// Why it is invalid.
        reason: String,
    },
    /// A record without `paragraphs` (the official `no_paragraphs` question-only variant)
    /// was given to the loader that needs paragraphs.
    #[error(
        "{path}:{line}: record {id} has no `paragraphs` (question-only file): load it with `load_questions_jsonl`"
    )]
    QuestionOnlyRecord {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The record's id.
        id: String,
    },
    /// `paragraphs[position].idx` differs from `position`.
    #[error("{path}:{line}: paragraphs[{position}].idx is {idx}, expected {position}")]
    ParagraphIndexMismatch {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// Position in the list.
        position: usize,
        /// The idx found.
        idx: usize,
    },
    /// A decomposition step points at a paragraph that does not exist.
    #[error("{path}:{line}: question_decomposition[{step}].paragraph_support_idx = {idx} is out of range ({paragraphs} paragraphs)")]
    SupportOutOfRange {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// Decomposition step.
        step: usize,
        /// The support index.
        idx: usize,
        /// Number of paragraphs.
        paragraphs: usize,
    },
    /// An answerable record has a decomposition step without a supporting paragraph.
    #[error("{path}:{line}: answerable record has question_decomposition[{step}].paragraph_support_idx = null")]
    MissingSupport {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// Decomposition step.
        step: usize,
    },
    /// The paragraphs flagged `is_supporting` differ from the decomposition's support indices.
    #[error("{path}:{line}: paragraphs flagged is_supporting {flagged:?} differ from question_decomposition support {decomposition:?}")]
    SupportMismatch {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// Indices flagged `is_supporting`.
        flagged: Vec<usize>,
        /// Indices named by the decomposition.
        decomposition: Vec<usize>,
    },
    /// An id that is neither `<N>hop...__...` nor consistent with the decomposition length.
    #[error("{path}:{line}: id `{id}`: {reason}")]
    BadId {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The id.
        id: String,
        /// What is wrong.
        reason: String,
    },
    /// An id used more often than allowed (once; twice in Full with one answerable twin).
    #[error("{path}:{line}: duplicate id `{id}` (first seen on line {first_line})")]
    DuplicateId {
        /// The file.
        path: PathBuf,
        /// 1-based line number of the repeat.
        line: usize,
        /// The id.
        id: String,
        /// Line where it first occurred.
        first_line: usize,
    },
    /// Subsampling asked for more records than the pool has.
    #[error("cannot sample {requested} records from a pool of {available}")]
    SampleTooLarge {
        /// Records asked for.
        requested: usize,
        /// Records available.
        available: usize,
    },
    /// Predictions and gold records do not line up.
    #[error("prediction {position}: {reason}")]
    PredictionMismatch {
        /// 0-based position in the prediction list.
        position: usize,
        /// What is wrong.
        reason: String,
    },
    /// A prediction file does not line up with its gold records.
    #[error("{path}:{line}: {reason}")]
    PredictionFile {
        /// The prediction file.
        path: std::path::PathBuf,
        /// 1-based line of the offending prediction.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// A synthetic-data generator setting is out of range.
    #[error("synthetic data config: `{field}`: {reason}")]
    SynthConfig {
        /// The offending field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// A prompt template failed to load or render.
    #[error("prompt template `{template}`: {message}")]
    Template {
        /// Template name.
        template: String,
        /// What went wrong.
        message: String,
    },
    /// A JSON (de)serialisation error while writing or reading an output file.
    #[error("{path}: JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// An error from a flow run (graph / rollout / backend).
    #[error("flow: {0}")]
    Flow(String),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wrap an I/O error with the file it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
