//! Node feedback records: what the learner of each node trains on.
use serde::{Deserialize, Serialize};

use flowtune_graph::NodeId;

/// A preference between two outputs of a node for the same prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preference {
    /// The node.
    pub node: NodeId,
    /// The episode the pair came from.
    pub episode: u64,
    /// The deviated step.
    pub step: usize,
    /// Prompt token ids.
    pub prompt_ids: Vec<u32>,
    /// Token ids of the preferred output.
    pub chosen: Vec<u32>,
    /// Token ids of the other output.
    pub rejected: Vec<u32>,
    /// Text of the preferred output.
    pub chosen_text: String,
    /// Text of the other output.
    pub rejected_text: String,
    /// |Δ reward| (or the evaluator's strength); never 0.
    pub weight: f64,
}

/// A gold completion for a node's prompt (supervised NLL).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Target {
    /// The node.
    pub node: NodeId,
    /// The episode.
    pub episode: u64,
    /// The call's step.
    pub step: usize,
    /// Prompt token ids.
    pub prompt_ids: Vec<u32>,
    /// Gold completion token ids.
    pub target: Vec<u32>,
    /// Gold completion text.
    pub target_text: String,
    /// Loss weight.
    pub weight: f64,
}

/// A gold label for a classify node's prompt (label NLL).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Label {
    /// The node.
    pub node: NodeId,
    /// The episode.
    pub episode: u64,
    /// The call's step.
    pub step: usize,
    /// Prompt token ids.
    pub prompt_ids: Vec<u32>,
    /// The label set.
    pub labels: Vec<String>,
    /// Token ids of each label, in order.
    pub label_ids: Vec<Vec<u32>>,
    /// The gold label's index.
    pub label: usize,
    /// Loss weight.
    pub weight: f64,
}

/// One feedback record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Feedback {
    /// A preference pair.
    Preference(Preference),
    /// A gold completion.
    Target(Target),
    /// A gold label.
    Label(Label),
}

impl Feedback {
    /// The node the record is for.
    pub fn node(&self) -> &NodeId {
        match self {
            Feedback::Preference(p) => &p.node,
            Feedback::Target(t) => &t.node,
            Feedback::Label(l) => &l.node,
        }
    }

    /// The record's weight.
    pub fn weight(&self) -> f64 {
        match self {
            Feedback::Preference(p) => p.weight,
            Feedback::Target(t) => t.weight,
            Feedback::Label(l) => l.weight,
        }
    }
}
