//! Configuration of deviations, credit assignment and the online loop (serde).
use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Which calls of a node get deviations (counted per node, in call order, 0-based).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CallSelection {
    /// Every call.
    All,
    /// The first `n` calls.
    First {
        /// How many.
        n: usize,
    },
    /// The calls with these occurrence indices.
    Occurrences {
        /// Occurrence indices.
        indices: Vec<usize>,
    },
    /// `n` calls drawn uniformly without replacement (seeded by the episode).
    Random {
        /// How many.
        n: usize,
    },
}

/// Where a generate node's alternatives come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GenerateAlternatives {
    /// The other sequences the live call already returned (beam decodings).
    Recorded,
    /// A diverse beam search request on the same prompt.
    DiverseBeam {
        /// Beam count (and sequences returned).
        num_beams: usize,
        /// Beam groups.
        num_beam_groups: usize,
        /// Diversity penalty.
        diversity_penalty: f64,
    },
    /// `n` samples on the same prompt (seed derived from the episode and step).
    Sample {
        /// Samples.
        n: usize,
        /// Temperature.
        temperature: f64,
        /// Nucleus mass.
        top_p: f64,
        /// Top-k (0: off).
        top_k: usize,
    },
}

/// Deviation settings for one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeDeviation {
    /// Whether the node is deviated at all.
    pub enabled: bool,
    /// Alternatives per deviated call: other labels for classify (by score), next-best candidates
    /// for choose, distinct sequences for generate.
    pub max_alternatives: usize,
    /// Which calls.
    pub calls: CallSelection,
    /// Generate nodes only: the alternatives' source.
    pub generate: GenerateAlternatives,
}

impl Default for NodeDeviation {
    fn default() -> Self {
        NodeDeviation {
            enabled: true,
            max_alternatives: 1,
            calls: CallSelection::All,
            generate: GenerateAlternatives::DiverseBeam {
                num_beams: 4,
                num_beam_groups: 4,
                diversity_penalty: 1.0,
            },
        }
    }
}

/// Which pairs a deviated call yields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PairMode {
    /// Each alternative against the original output.
    AgainstOriginal,
    /// All pairs among the original and the alternatives.
    AllPairs,
}

/// Credit-assignment settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreditConfig {
    /// Settings for nodes without their own entry.
    pub default_deviation: NodeDeviation,
    /// Per-node settings, by node id.
    #[serde(default)]
    pub deviations: BTreeMap<String, NodeDeviation>,
    /// The reward a node is judged by when it has no route.
    pub default_reward: String,
    /// Per-node reward routing: node id → reward name.
    #[serde(default)]
    pub reward_routes: BTreeMap<String, String>,
    /// Stop a rollout as soon as its routed reward is known.
    pub early_termination: bool,
    /// Pairs per deviated call.
    pub pairs: PairMode,
    /// |Δ| at or below this is a tie (dropped).
    pub tie_tolerance: f64,
    /// Weight of Target / Label records built from gold.
    pub supervision_weight: f64,
}

impl Default for CreditConfig {
    fn default() -> Self {
        CreditConfig {
            default_deviation: NodeDeviation::default(),
            deviations: BTreeMap::new(),
            default_reward: "reward".into(),
            reward_routes: BTreeMap::new(),
            early_termination: true,
            pairs: PairMode::AgainstOriginal,
            tie_tolerance: 0.0,
            supervision_weight: 1.0,
        }
    }
}

impl CreditConfig {
    /// The deviation settings of `node`.
    pub fn deviation(&self, node: &str) -> &NodeDeviation {
        self.deviations.get(node).unwrap_or(&self.default_deviation)
    }

    /// The reward `node` is judged by.
    pub fn reward_of(&self, node: &str) -> &str {
        self.reward_routes.get(node).unwrap_or(&self.default_reward)
    }

    /// Routes `node` to `reward`.
    pub fn route(mut self, node: &str, reward: &str) -> Self {
        self.reward_routes.insert(node.into(), reward.into());
        self
    }

    /// Sets `node`'s deviation settings.
    pub fn with_deviation(mut self, node: &str, deviation: NodeDeviation) -> Self {
        self.deviations.insert(node.into(), deviation);
        self
    }
}

/// The gated soft reference update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReferenceUpdateConfig {
    /// Check every this many episodes (a multiple of the minibatch size).
    pub every_episodes: u64,
    /// Interpolation weight toward the trained adapter (0.5 in the paper).
    pub weight: f64,
    /// The progressive metric (a reward name) whose running mean must have improved since the
    /// previous check.
    pub metric: String,
}

/// Checkpointing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointConfig {
    /// Save every this many episodes (a multiple of the minibatch size).
    pub every_episodes: u64,
    /// Directory holding `episode-NNNNNNNNNN/` checkpoints and the `latest` pointer.
    pub dir: PathBuf,
}

/// The online loop's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OnlineConfig {
    /// Run seed (episode seeds derive from it and the episode index).
    pub seed: u64,
    /// Episodes per learning step.
    pub minibatch_episodes: usize,
    /// Episodes (with their rollouts) in flight at once, at most the minibatch size.
    pub episodes_in_flight: usize,
    /// Credit assignment.
    pub credit: CreditConfig,
    /// Gated reference updates.
    #[serde(default)]
    pub reference_update: Option<ReferenceUpdateConfig>,
    /// Checkpoints.
    #[serde(default)]
    pub checkpoint: Option<CheckpointConfig>,
    /// Where per-episode metrics go (JSONL, rewritten atomically at checkpoints and at the end).
    #[serde(default)]
    pub metrics_path: Option<PathBuf>,
    /// Stop after this many episodes in total (None: the whole stream).
    #[serde(default)]
    pub max_episodes: Option<u64>,
    /// If set, each minibatch's traces (episodes and their rollouts) are written atomically to
    /// `episodes-FIRST-LAST.jsonl` in this directory, one [`EpisodeTraces`](crate::online::EpisodeTraces) per line.
    #[serde(default)]
    pub traces_dir: Option<PathBuf>,
    /// Keep going when an episode fails (its flow code, a rollout's replay or its feedback): the
    /// episode is recorded in [`OnlineState::failures`](crate::OnlineState::failures), counted as
    /// consumed, and left out of metrics and learning. Off by default: the first failure ends
    /// the run. Backend errors end the run either way.
    #[serde(default)]
    pub skip_failed_episodes: bool,
}

impl Default for OnlineConfig {
    fn default() -> Self {
        OnlineConfig {
            seed: 0,
            minibatch_episodes: 8,
            episodes_in_flight: 8,
            credit: CreditConfig::default(),
            reference_update: None,
            checkpoint: None,
            metrics_path: None,
            max_episodes: None,
            traces_dir: None,
            skip_failed_episodes: false,
        }
    }
}

impl OnlineConfig {
    /// Checks the values that would make a run meaningless.
    pub fn validate(&self) -> Result<()> {
        let mb = self.minibatch_episodes as u64;
        if mb == 0 {
            return Err(Error::Config {
                field: "minibatch_episodes",
                reason: "must be at least 1".into(),
            });
        }
        if self.episodes_in_flight == 0 {
            return Err(Error::Config {
                field: "episodes_in_flight",
                reason: "must be at least 1".into(),
            });
        }
        if let Some(r) = &self.reference_update {
            if r.every_episodes == 0 || r.every_episodes % mb != 0 {
                return Err(Error::Config {
                    field: "reference_update.every_episodes",
                    reason: format!(
                        "{} is not a positive multiple of minibatch_episodes {mb}",
                        r.every_episodes
                    ),
                });
            }
            if !(0.0..=1.0).contains(&r.weight) {
                return Err(Error::Config {
                    field: "reference_update.weight",
                    reason: format!("{} is outside [0, 1]", r.weight),
                });
            }
        }
        if let Some(c) = &self.checkpoint {
            if c.every_episodes == 0 || c.every_episodes % mb != 0 {
                return Err(Error::Config {
                    field: "checkpoint.every_episodes",
                    reason: format!(
                        "{} is not a positive multiple of minibatch_episodes {mb}",
                        c.every_episodes
                    ),
                });
            }
        }
        if self.credit.tie_tolerance.is_nan() || self.credit.tie_tolerance < 0.0 {
            return Err(Error::Config {
                field: "credit.tie_tolerance",
                reason: "must be >= 0".into(),
            });
        }
        Ok(())
    }
}
