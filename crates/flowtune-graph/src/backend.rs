//! The tensor-free backend interface: messages, node requests and responses.
use serde::{Deserialize, Serialize};

use crate::error::BoxError;
use crate::node::NodeId;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message with the given role.
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Message {
            role: role.to_owned(),
            content: content.into(),
        }
    }

    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
}

/// How a generate call decodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Decoding {
    /// Argmax at each position.
    Greedy,
    /// Ancestral sampling with a fixed seed (so replays and resumes are exact).
    Sample {
        /// Softmax temperature.
        temperature: f64,
        /// Nucleus mass (1.0: off).
        top_p: f64,
        /// Top-k cut (0: off).
        top_k: usize,
        /// The sampling seed.
        seed: u64,
    },
    /// Beam search.
    Beam {
        /// Beam count.
        num_beams: usize,
    },
    /// Diverse (group) beam search.
    DiverseBeam {
        /// Beam count.
        num_beams: usize,
        /// Beam groups.
        num_beam_groups: usize,
        /// Hamming diversity penalty between groups.
        diversity_penalty: f64,
    },
}

/// What one node request asks the backend to do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CallSpec {
    /// Generate text.
    Generate {
        /// Token budget.
        max_new_tokens: usize,
        /// Decoding.
        decoding: Decoding,
        /// Sequences to return, best first.
        num_return_sequences: usize,
        /// Stop strings.
        stop: Vec<String>,
    },
    /// Log-softmax over the labels' tokens at the next position; one candidate per label, in order.
    Classify {
        /// The labels.
        labels: Vec<String>,
    },
    /// Summed completion log-probs of each candidate; one candidate per input, in order.
    Choose {
        /// The candidates.
        candidates: Vec<String>,
    },
}

impl CallSpec {
    /// A short name for messages.
    pub fn name(&self) -> &'static str {
        match self {
            CallSpec::Generate { .. } => "generate",
            CallSpec::Classify { .. } => "classify",
            CallSpec::Choose { .. } => "choose",
        }
    }
}

/// One node call sent to the backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRequest {
    /// The node called.
    pub node: NodeId,
    /// The adapter to run it with (`None`: the base policy).
    pub adapter: Option<String>,
    /// The rendered messages.
    pub messages: Vec<Message>,
    /// What to compute.
    pub call: CallSpec,
}

/// One output sequence (or scored label / candidate).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// Completion token ids.
    pub ids: Vec<u32>,
    /// Decoded text (the label / candidate itself for classify / choose).
    pub text: String,
    /// Its log-probability (sum over tokens, or the label's log-softmax).
    pub logprob: f64,
}

/// The backend's answer to one node request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeResponse {
    /// Token ids of the rendered prompt (chat template applied).
    pub prompt_ids: Vec<u32>,
    /// Outputs: best first for generate; in label / candidate order for classify / choose.
    pub outputs: Vec<Candidate>,
}

/// A batched policy: the language-model engine in the facade, toy tables in tests.
pub trait Backend {
    /// Runs all requests as one batch; returns one response per request, in order.
    fn run_batch(&mut self, requests: &[NodeRequest]) -> Result<Vec<NodeResponse>, BoxError>;

    /// Tokenizes completion texts (gold targets) for `node`, as the node's outputs would be.
    fn tokenize(&mut self, node: &NodeId, texts: &[String]) -> Result<Vec<Vec<u32>>, BoxError>;
}

impl<B: Backend + ?Sized> Backend for &mut B {
    fn run_batch(&mut self, requests: &[NodeRequest]) -> Result<Vec<NodeResponse>, BoxError> {
        (**self).run_batch(requests)
    }

    fn tokenize(&mut self, node: &NodeId, texts: &[String]) -> Result<Vec<Vec<u32>>, BoxError> {
        (**self).tokenize(node, texts)
    }
}
