//! The learner interface: one implementation per model family (tch-backed in the facade, a
//! tabular toy here).
use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use flowtune_graph::NodeId;

use crate::error::BoxError;
use crate::feedback::Feedback;

/// What one learning step on one node reports.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LearnStats {
    /// Records used.
    pub records: usize,
    /// Mean loss before the step.
    pub loss: f64,
    /// Anything else worth logging (gradient norm, learning rate, ...).
    #[serde(default)]
    pub extra: BTreeMap<String, f64>,
}

/// Trains each node's policy from its feedback records.
pub trait Learner {
    /// One learning step on `node` with a minibatch of its records.
    fn learn(&mut self, node: &NodeId, records: &[Feedback]) -> Result<LearnStats, BoxError>;
    /// Moves `node`'s reference policy toward its trained one by `weight` (lerp).
    fn update_reference(&mut self, node: &NodeId, weight: f64) -> Result<(), BoxError>;
    /// Saves all learner state (adapters, optimizer state) under `dir` (which exists, empty).
    fn save(&self, dir: &Path) -> Result<(), BoxError>;
    /// Restores what [`save`](Learner::save) wrote.
    fn load(&mut self, dir: &Path) -> Result<(), BoxError>;
}
