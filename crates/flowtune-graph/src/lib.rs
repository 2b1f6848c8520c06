//! The flow DSL: nodes, the episode context, traces, exact replay, DOT/Mermaid export.
//!
//! A flow is plain async Rust over an [`EpisodeContext`]; every node call, tool call and random
//! draw goes through the context, which records the [`Trace`] (the unrolled computation graph).
//! Episodes run on a small deterministic [`Executor`] that sends all node requests in flight to
//! one [`Backend`] as one batch. Replay forces recorded outputs ([`ReplayPlan`]), so resetting to
//! an intermediate point never needs cloneable flow state. No tensors here: the backend is a trait.

pub mod backend;
pub mod context;
pub mod error;
pub mod exec;
pub mod export;
pub mod io;
pub mod node;
pub mod prompt;
pub mod trace;

pub use backend::{Backend, CallSpec, Candidate, Decoding, Message, NodeRequest, NodeResponse};
pub use context::{
    derive_seed, play, run_episode, Called, EpisodeContext, EpisodeOutcome, EpisodeSetup, Flow,
    ReplayPlan,
};
pub use error::{BoxError, Error, Result};
pub use exec::{join_all, BatchStats, Dispatcher, Executor, TaskId};
pub use export::{flow_to_dot, flow_to_mermaid, observed_edges, trace_to_dot, trace_to_mermaid};
pub use node::{Edge, FlowSpec, NodeId, NodeKind, NodeSpec, NodeTable};
pub use prompt::PromptSet;
pub use trace::{Event, Gold, GoldEvent, NodeCall, Output, RewardEvent, Step, ToolCall, Trace};
