//! Traces: the realized, unrolled computation graph of one episode.
use serde::{Deserialize, Serialize};

use crate::backend::{CallSpec, Candidate, Message};
use crate::node::NodeId;

/// The output a node call produced (or was forced to produce).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Output {
    /// Completion token ids (the label's / candidate's tokens for classify / choose).
    pub ids: Vec<u32>,
    /// The text.
    pub text: String,
    /// The chosen label or candidate index (classify / choose).
    #[serde(default)]
    pub choice: Option<usize>,
    /// Log-probability of the output under the policy that produced it.
    pub logprob: f64,
}

impl Output {
    /// The output a candidate stands for, with its index for classify / choose.
    pub fn from_candidate(candidate: &Candidate, choice: Option<usize>) -> Self {
        Output {
            ids: candidate.ids.clone(),
            text: candidate.text.clone(),
            choice,
            logprob: candidate.logprob,
        }
    }
}

/// One model node call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeCall {
    /// The node.
    pub node: NodeId,
    /// The adapter it ran with.
    pub adapter: Option<String>,
    /// The rendered messages.
    pub messages: Vec<Message>,
    /// The request (labels, candidates, decoding).
    pub call: CallSpec,
    /// Prompt token ids, as the backend saw them.
    pub prompt_ids: Vec<u32>,
    /// The output used by the flow.
    pub output: Output,
    /// Everything the backend returned: all sequences for generate, every label / candidate with
    /// its score for classify / choose.
    pub alternatives: Vec<Candidate>,
    /// Whether the output was substituted by a one-step deviation.
    #[serde(default)]
    pub deviated: bool,
}

/// One tool call, recorded so replay is exact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The tool node.
    pub tool: NodeId,
    /// Its input.
    pub input: serde_json::Value,
    /// Its output.
    pub output: serde_json::Value,
}

/// What happened at one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A model node call.
    Call(NodeCall),
    /// A tool call.
    Tool(ToolCall),
    /// A random draw (64 random bits).
    Random {
        /// The drawn bits.
        value: u64,
    },
}

impl Event {
    /// The node of a call or tool step.
    pub fn node(&self) -> Option<&NodeId> {
        match self {
            Event::Call(c) => Some(&c.node),
            Event::Tool(t) => Some(&t.tool),
            Event::Random { .. } => None,
        }
    }

    /// A short description for divergence messages.
    pub fn describe(&self) -> String {
        match self {
            Event::Call(c) => format!("{} call to node `{}`", c.call.name(), c.node),
            Event::Tool(t) => format!("tool call `{}`", t.tool),
            Event::Random { .. } => "a random draw".into(),
        }
    }
}

/// One step of a trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// Position in the trace (0-based, in call order).
    pub index: usize,
    /// Whether the step was forced from a recorded trace on replay.
    #[serde(default)]
    pub forced: bool,
    /// Wall time of the step in microseconds (request to response for calls; the recorded time for
    /// forced steps).
    pub wall_us: u64,
    /// What happened.
    pub event: Event,
}

/// A reward the flow reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RewardEvent {
    /// The reward's name (e.g. `support`, `answer_f1`).
    pub name: String,
    /// Its value.
    pub value: f64,
    /// Steps started when it was reported (it is known after step `after_steps - 1`).
    pub after_steps: usize,
}

/// Gold supervision for a call, reported by the flow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Gold {
    /// The gold completion text of a generate (or choose) call.
    Target {
        /// The text (tokenized by the backend when feedback is built).
        text: String,
    },
    /// The gold label index of a classify call.
    Label {
        /// The label index.
        index: usize,
    },
}

/// Gold supervision attached to one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GoldEvent {
    /// The call's step index.
    pub step: usize,
    /// The gold.
    pub gold: Gold,
}

/// The trace of one episode (or rollout).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    /// The flow's name.
    pub flow: String,
    /// The episode id.
    pub episode: u64,
    /// Seed of the episode's random draws.
    pub seed: u64,
    /// The steps, in call order.
    pub steps: Vec<Step>,
    /// Rewards, in report order.
    pub rewards: Vec<RewardEvent>,
    /// Gold supervision.
    pub gold: Vec<GoldEvent>,
    /// Whether the run stopped early because its routed reward became known.
    #[serde(default)]
    pub stopped_early: bool,
}

impl Trace {
    /// The first value of reward `name` reported after step `step` completed (i.e. with
    /// `after_steps > step`); `step = None` means any report.
    pub fn reward_after(&self, name: &str, step: Option<usize>) -> Option<f64> {
        self.rewards
            .iter()
            .find(|r| r.name == name && step.is_none_or(|s| r.after_steps > s))
            .map(|r| r.value)
    }

    /// The last reported value of each reward, by name.
    pub fn final_rewards(&self) -> std::collections::BTreeMap<String, f64> {
        self.rewards
            .iter()
            .map(|r| (r.name.clone(), r.value))
            .collect()
    }

    /// The model call at `step`, if that step is one.
    pub fn call(&self, step: usize) -> Option<&NodeCall> {
        match self.steps.get(step).map(|s| &s.event) {
            Some(Event::Call(c)) => Some(c),
            _ => None,
        }
    }

    /// Model calls made live (not forced), with their steps.
    pub fn live_calls(&self) -> impl Iterator<Item = (&Step, &NodeCall)> {
        self.steps.iter().filter_map(|s| match &s.event {
            Event::Call(c) if !s.forced => Some((s, c)),
            _ => None,
        })
    }

    /// This trace with replay marks cleared (forced flags), for comparing realizations.
    pub fn without_replay_marks(&self) -> Trace {
        let mut t = self.clone();
        for s in &mut t.steps {
            s.forced = false;
        }
        t
    }
}
