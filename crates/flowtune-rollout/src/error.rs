//! The crate's error type.
use std::path::PathBuf;

pub use flowtune_graph::BoxError;

/// Errors from credit assignment, scheduling and the online loop.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An error from the flow layer (flow code, replay, backend).
    #[error(transparent)]
    Graph(#[from] flowtune_graph::Error),
    /// An episode failed (its flow code, a rollout or its feedback), as reported by
    /// [`Scheduler::run_isolated`](crate::Scheduler::run_isolated).
    #[error("episode {episode} failed: {message}")]
    EpisodeFailed {
        /// The episode id.
        episode: u64,
        /// The episode's error.
        message: String,
    },
    /// A configuration value that cannot be used.
    #[error("config field `{field}`: {reason}")]
    Config {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The learner failed on a node.
    #[error("learner failed on node `{node}` during {operation}: {source}")]
    Learner {
        /// The node (or `*` for whole-learner operations).
        node: String,
        /// `learn`, `update_reference`, `save` or `load`.
        operation: &'static str,
        /// The learner's error.
        #[source]
        source: BoxError,
    },
    /// The evaluator hook failed.
    #[error("evaluator failed on node `{node}` step {step}: {source}")]
    Evaluator {
        /// The deviated node.
        node: String,
        /// The deviated step.
        step: usize,
        /// The evaluator's error.
        #[source]
        source: BoxError,
    },
    /// Tokenizing gold targets failed.
    #[error("backend failed to tokenize gold targets of node `{node}`: {source}")]
    Tokenize {
        /// The node.
        node: String,
        /// The backend's error.
        #[source]
        source: BoxError,
    },
    /// Gold supervision that does not fit its call.
    #[error("episode {episode}: gold for step {step}: {reason}")]
    BadGold {
        /// The episode.
        episode: u64,
        /// The step the gold names.
        step: usize,
        /// What is wrong.
        reason: String,
    },
    /// An I/O error on a named file or directory.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint or state file that does not parse.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// What serde_json reported.
        #[source]
        source: serde_json::Error,
    },
    /// A checkpoint that does not match the run resuming from it.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The checkpoint directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
