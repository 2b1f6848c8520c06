//! One-step-deviation credit assignment, the episode scheduler and the online learning loop.
//!
//! - [`credit`]: per-node deviations (other label, next-best candidate, diverse beam, samples),
//!   replayed rollouts with per-node reward routing and early termination, preferences from
//!   rewards or an evaluator hook, Target / Label records from gold.
//! - [`scheduler`]: many episodes and all their rollouts in flight against one [`Backend`], so
//!   node calls arrive batched.
//! - [`online`]: progressive validation, learning per minibatch through a [`Learner`], gated soft
//!   reference updates, checkpoints and exact resume.
//! - [`toy`]: a tabular softmax policy (backend + learner) for tests and examples.
//!
//! [`Backend`]: flowtune_graph::Backend

pub mod config;
pub mod credit;
pub mod error;
pub mod feedback;
pub mod learner;
pub mod online;
pub mod scheduler;
pub mod toy;

pub use config::{
    CallSelection, CheckpointConfig, CreditConfig, GenerateAlternatives, NodeDeviation,
    OnlineConfig, PairMode, ReferenceUpdateConfig,
};
pub use credit::{Accounting, DeviationPoint, EpisodeJudge, EpisodeRun, Rollout};
pub use error::{BoxError, Error, Result};
pub use feedback::{Feedback, Label, Preference, Target};
pub use learner::{LearnStats, Learner};
pub use online::{EpisodeMetrics, EpisodeTraces, GateState, LearnLog, OnlineLoop, OnlineState};
pub use scheduler::{EpisodeFailure, EpisodeJob, EpisodeOutcome, EpisodeResult, Scheduler};
