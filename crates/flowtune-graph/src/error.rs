//! The crate's error type.
use std::path::PathBuf;

/// A boxed error from a backend, tool or other code outside this crate.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors from declaring, running, replaying and exporting flows.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flow called a node it did not declare.
    #[error("node `{node}` is not declared by flow `{flow}`")]
    UnknownNode {
        /// The flow.
        flow: String,
        /// The undeclared node.
        node: String,
    },
    /// A flow called a node through the wrong kind of call.
    #[error("node `{node}` is declared as {declared} but was called as {called}")]
    WrongNodeKind {
        /// The node.
        node: String,
        /// Its declared kind.
        declared: &'static str,
        /// The kind of call the flow made.
        called: &'static str,
    },
    /// A node declaration that cannot be used.
    #[error("node `{node}`: invalid declaration: {reason}")]
    InvalidNode {
        /// The node.
        node: String,
        /// What is wrong.
        reason: String,
    },
    /// A replayed flow did something other than what the recorded trace says.
    #[error(
        "replay diverged at step {index}: the trace recorded {expected}, the flow did {found}"
    )]
    ReplayDivergence {
        /// The step index.
        index: usize,
        /// What the trace recorded.
        expected: String,
        /// What the flow did instead.
        found: String,
    },
    /// A replay plan that does not fit its trace.
    #[error("invalid replay plan at step {index}: {reason}")]
    InvalidReplay {
        /// The step index.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// The backend failed on a batch.
    #[error("backend failed on a batch of {batch_size} requests: {source}")]
    Backend {
        /// Requests in the failed batch.
        batch_size: usize,
        /// The backend's error.
        #[source]
        source: BoxError,
    },
    /// The backend returned the wrong number of responses.
    #[error("backend returned {got} responses for a batch of {expected} requests")]
    BackendResponseCount {
        /// Requests sent.
        expected: usize,
        /// Responses received.
        got: usize,
    },
    /// A backend response that does not fit its request.
    #[error("backend response for node `{node}` is malformed: {reason}")]
    BadResponse {
        /// The node called.
        node: String,
        /// What is wrong.
        reason: String,
    },
    /// Tasks are waiting but none of them submitted a request.
    #[error("executor stalled: {tasks} task(s) pending without a node request (a flow awaited something that is not an episode-context call)")]
    Stalled {
        /// The stalled task count.
        tasks: usize,
    },
    /// A prompt template that does not compile or render.
    #[error("{file}:{line}: template error: {message}", line = line.map(|l| l.to_string()).unwrap_or_else(|| "?".into()))]
    Template {
        /// The template file.
        file: PathBuf,
        /// The line in the template, where known.
        line: Option<usize>,
        /// What minijinja or the message splitter reported.
        message: String,
    },
    /// No template for a node.
    #[error("no prompt template `{name}` in {dir}")]
    MissingTemplate {
        /// The template name asked for.
        name: String,
        /// The prompt directory.
        dir: PathBuf,
    },
    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON line that does not parse (or a value that does not serialize).
    #[error("{path}:{line}: JSON error: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The 1-based line.
        line: usize,
        /// What serde_json reported.
        #[source]
        source: serde_json::Error,
    },
    /// A tool input or output that does not (de)serialize.
    #[error("tool `{tool}`: value does not (de)serialize: {source}")]
    ToolValue {
        /// The tool node.
        tool: String,
        /// What serde_json reported.
        #[source]
        source: serde_json::Error,
    },
    /// A tool that failed.
    #[error("tool `{tool}` failed: {source}")]
    Tool {
        /// The tool node.
        tool: String,
        /// The tool's error.
        #[source]
        source: BoxError,
    },
    /// An error raised by flow code itself.
    #[error("flow `{flow}`: {message}")]
    Flow {
        /// The flow.
        flow: String,
        /// What went wrong.
        message: String,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
