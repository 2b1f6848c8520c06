//! Node and flow declarations.
use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::backend::Decoding;
use crate::error::{Error, Result};

/// The name of a node, unique within a flow.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub String);

impl NodeId {
    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Borrow<str> for NodeId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<&str> for NodeId {
    fn from(s: &str) -> Self {
        NodeId(s.to_owned())
    }
}

impl From<String> for NodeId {
    fn from(s: String) -> Self {
        NodeId(s)
    }
}

/// What a node does when called.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NodeKind {
    /// Free text generation.
    Generate {
        /// Token budget per call.
        max_new_tokens: usize,
        /// Decoding of the live policy.
        decoding: Decoding,
        /// Stop strings.
        #[serde(default)]
        stop: Vec<String>,
    },
    /// Classification over a fixed label set (log-softmax over the label tokens).
    Classify {
        /// The labels, in the order scores are reported.
        labels: Vec<String>,
    },
    /// Choice among candidates given at call time (summed completion log-probs).
    Choose,
    /// A function or tool; its outputs are recorded and forced on replay, never deviated.
    Tool,
}

impl NodeKind {
    /// A short name for messages and exports.
    pub fn name(&self) -> &'static str {
        match self {
            NodeKind::Generate { .. } => "generate",
            NodeKind::Classify { .. } => "classify",
            NodeKind::Choose => "choose",
            NodeKind::Tool => "tool",
        }
    }
}

/// A declared node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeSpec {
    /// The node's id.
    pub id: NodeId,
    /// Its kind.
    pub kind: NodeKind,
    /// The adapter the backend should use for it (the facade maps this to a LoRA adapter).
    #[serde(default)]
    pub adapter: Option<String>,
    /// The prompt template name (e.g. `query` for `prompts/<flow>/query.j2`), if any.
    #[serde(default)]
    pub template: Option<String>,
    /// A one-line description for exports.
    #[serde(default)]
    pub description: String,
}

impl NodeSpec {
    fn new(id: &str, kind: NodeKind) -> Self {
        NodeSpec {
            id: NodeId::from(id),
            kind,
            adapter: Some(id.to_owned()),
            template: Some(id.to_owned()),
            description: String::new(),
        }
    }

    /// A greedy generation node with adapter and template named after it.
    pub fn generate(id: &str, max_new_tokens: usize) -> Self {
        Self::new(
            id,
            NodeKind::Generate {
                max_new_tokens,
                decoding: Decoding::Greedy,
                stop: Vec::new(),
            },
        )
    }

    /// A classification node over `labels`.
    pub fn classify(id: &str, labels: &[&str]) -> Self {
        Self::new(
            id,
            NodeKind::Classify {
                labels: labels.iter().map(|l| (*l).to_owned()).collect(),
            },
        )
    }

    /// A node choosing among candidates supplied at call time.
    pub fn choose(id: &str) -> Self {
        Self::new(id, NodeKind::Choose)
    }

    /// A tool node (no adapter, no template).
    pub fn tool(id: &str) -> Self {
        NodeSpec {
            adapter: None,
            template: None,
            ..Self::new(id, NodeKind::Tool)
        }
    }

    /// Sets the description.
    pub fn describe(mut self, description: &str) -> Self {
        self.description = description.to_owned();
        self
    }

    /// Sets the adapter name (`None`: the backend's base policy).
    pub fn with_adapter(mut self, adapter: Option<&str>) -> Self {
        self.adapter = adapter.map(str::to_owned);
        self
    }
}

/// A declared transition between nodes (for exports).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Edge {
    /// Source node.
    pub from: NodeId,
    /// Target node.
    pub to: NodeId,
    /// Optional label (a condition, a loop, a count).
    #[serde(default)]
    pub label: Option<String>,
}

impl Edge {
    /// An edge with an optional label.
    pub fn new(from: &str, to: &str, label: Option<&str>) -> Self {
        Edge {
            from: from.into(),
            to: to.into(),
            label: label.map(str::to_owned),
        }
    }
}

/// A flow's declaration: its name, nodes and declared transitions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowSpec {
    /// The flow's name (also its prompt directory under `prompts/`).
    pub name: String,
    /// The declared nodes.
    pub nodes: Vec<NodeSpec>,
    /// Declared transitions (may be empty; traces give observed ones).
    #[serde(default)]
    pub edges: Vec<Edge>,
}

/// The declared nodes of a flow, by id, checked for consistency.
#[derive(Debug, Clone)]
pub struct NodeTable {
    flow: String,
    nodes: BTreeMap<NodeId, NodeSpec>,
}

impl NodeTable {
    /// Builds the table, rejecting duplicate ids and empty label sets.
    pub fn new(spec: &FlowSpec) -> Result<Self> {
        let mut nodes = BTreeMap::new();
        for node in &spec.nodes {
            match &node.kind {
                NodeKind::Classify { labels } if labels.len() < 2 => {
                    return Err(Error::InvalidNode {
                        node: node.id.0.clone(),
                        reason: format!(
                            "a classify node needs at least 2 labels, got {}",
                            labels.len()
                        ),
                    })
                }
                NodeKind::Generate {
                    max_new_tokens: 0, ..
                } => {
                    return Err(Error::InvalidNode {
                        node: node.id.0.clone(),
                        reason: "max_new_tokens is 0".into(),
                    })
                }
                _ => {}
            }
            if nodes.insert(node.id.clone(), node.clone()).is_some() {
                return Err(Error::InvalidNode {
                    node: node.id.0.clone(),
                    reason: "declared twice".into(),
                });
            }
        }
        Ok(NodeTable {
            flow: spec.name.clone(),
            nodes,
        })
    }

    /// The flow's name.
    pub fn flow(&self) -> &str {
        &self.flow
    }

    /// The spec of `node`, or `UnknownNode`.
    pub fn get(&self, node: &str) -> Result<&NodeSpec> {
        self.nodes.get(node).ok_or_else(|| Error::UnknownNode {
            flow: self.flow.clone(),
            node: node.to_owned(),
        })
    }

    /// All nodes, ordered by id.
    pub fn iter(&self) -> impl Iterator<Item = &NodeSpec> {
        self.nodes.values()
    }
}
