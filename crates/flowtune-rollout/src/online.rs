//! The online loop: episodes from a stream, progressive validation, learning per minibatch,
//! gated soft reference updates, checkpoints and exact resume.
//!
//! Episodes are processed in minibatches; all episodes of a minibatch run with the same policy
//! (up to `episodes_in_flight` at once), then every node's feedback goes to its learner. So
//! checkpoints fall between minibatches and a resumed run is identical to an uninterrupted one.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use flowtune_graph::io::{write_atomic, write_jsonl};
use flowtune_graph::{derive_seed, Backend, BatchStats, Flow, NodeId, NodeKind, Trace};

use crate::config::OnlineConfig;
use crate::credit::{Accounting, EpisodeJudge, Rollout};
use crate::error::{Error, Result};
use crate::feedback::Feedback;
use crate::learner::{LearnStats, Learner};
use crate::scheduler::{EpisodeFailure, EpisodeJob, Scheduler};

/// Metrics of one episode: its rewards (the prediction made before learning on the record) and
/// the progressive (running) means after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpisodeMetrics {
    /// Episode index.
    pub episode: u64,
    /// Position of its record in the stream.
    pub position: u64,
    /// Last reported value of each reward in the live episode.
    pub rewards: BTreeMap<String, f64>,
    /// Running mean of each reward over all episodes so far.
    pub progressive: BTreeMap<String, f64>,
    /// Work done.
    pub accounting: Accounting,
}

/// One episode's trace and its rollouts' traces, as written to `traces_dir`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpisodeTraces {
    /// Episode index.
    pub episode: u64,
    /// The live episode.
    pub trace: Trace,
    /// Its rollouts (deviated step, alternative index, trace).
    pub rollouts: Vec<Rollout>,
}

/// State of the gated reference update.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GateState {
    /// The progressive (running-mean) metric at the previous check (None before the first).
    pub previous: Option<f64>,
    /// Checks made.
    pub checks: u64,
    /// Reference updates made.
    pub updates: u64,
}

/// A learning step's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LearnLog {
    /// Episodes done when the step ran.
    pub episodes_done: u64,
    /// The node.
    pub node: NodeId,
    /// Records per kind: preferences, targets, labels.
    pub counts: [usize; 3],
    /// What the learner reported.
    pub stats: LearnStats,
}

/// Everything needed to continue a run exactly (the learner saves its own state).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OnlineState {
    /// The run seed (episode seeds derive from it and the episode index: that is the RNG state).
    pub seed: u64,
    /// Episodes completed.
    pub episodes_done: u64,
    /// Records consumed from the stream.
    pub stream_position: u64,
    /// Per-episode metrics so far.
    pub metrics: Vec<EpisodeMetrics>,
    /// Running sums and counts per reward (for the progressive means).
    pub reward_sums: BTreeMap<String, (f64, u64)>,
    /// The reference gate.
    pub gate: GateState,
    /// Accounting over all episodes.
    pub totals: Accounting,
    /// Backend usage over all episodes.
    pub batch: BatchStats,
    /// Learning steps.
    pub learn_log: Vec<LearnLog>,
    /// Episodes that failed and were skipped ([`OnlineConfig::skip_failed_episodes`]).
    #[serde(default)]
    pub failures: Vec<EpisodeFailure>,
}

/// The online learning loop over one flow.
pub struct OnlineLoop<'f, F: Flow> {
    config: OnlineConfig,
    scheduler: Scheduler<'f, F>,
    state: OnlineState,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

fn learner_error<'a>(
    node: &'a str,
    operation: &'static str,
) -> impl FnOnce(crate::error::BoxError) -> Error + 'a {
    move |source| Error::Learner {
        node: node.to_owned(),
        operation,
        source,
    }
}

/// Reborrows an optional judge for a shorter time.
pub(crate) fn reborrow<'a>(
    judge: &'a mut Option<&mut dyn EpisodeJudge>,
) -> Option<&'a mut dyn EpisodeJudge> {
    match judge {
        Some(j) => Some(&mut **j),
        None => None,
    }
}

const STATE_FILE: &str = "state.json";
const LATEST_FILE: &str = "latest";

impl<'f, F: Flow> OnlineLoop<'f, F> {
    /// A fresh run.
    pub fn new(flow: &'f F, config: OnlineConfig) -> Result<Self> {
        config.validate()?;
        let scheduler = Scheduler::new(
            flow,
            config.credit.clone(),
            config.episodes_in_flight.min(config.minibatch_episodes),
        )?;
        let state = OnlineState {
            seed: config.seed,
            episodes_done: 0,
            stream_position: 0,
            metrics: Vec::new(),
            reward_sums: BTreeMap::new(),
            gate: GateState::default(),
            totals: Accounting::default(),
            batch: BatchStats::default(),
            learn_log: Vec::new(),
            failures: Vec::new(),
        };
        Ok(OnlineLoop {
            config,
            scheduler,
            state,
        })
    }

    /// Continues from the latest checkpoint in `config.checkpoint.dir`, restoring `learner`.
    pub fn resume(flow: &'f F, config: OnlineConfig, learner: &mut dyn Learner) -> Result<Self> {
        let Some(ckpt) = &config.checkpoint else {
            return Err(Error::Config {
                field: "checkpoint",
                reason: "resume needs a checkpoint directory".into(),
            });
        };
        let latest_path = ckpt.dir.join(LATEST_FILE);
        let name = std::fs::read_to_string(&latest_path).map_err(io_error(&latest_path))?;
        let dir = ckpt.dir.join(name.trim());
        Self::resume_from(flow, config, learner, &dir)
    }

    /// Continues from checkpoint directory `dir`.
    pub fn resume_from(
        flow: &'f F,
        config: OnlineConfig,
        learner: &mut dyn Learner,
        dir: &Path,
    ) -> Result<Self> {
        let mut this = Self::new(flow, config)?;
        let state_path = dir.join(STATE_FILE);
        let bytes = std::fs::read(&state_path).map_err(io_error(&state_path))?;
        let state: OnlineState = serde_json::from_slice(&bytes).map_err(|source| Error::Json {
            path: state_path.clone(),
            source,
        })?;
        if state.seed != this.config.seed {
            return Err(Error::Checkpoint {
                path: dir.to_owned(),
                reason: format!(
                    "saved with seed {}, resumed with seed {}",
                    state.seed, this.config.seed
                ),
            });
        }
        if !state
            .episodes_done
            .is_multiple_of(this.config.minibatch_episodes as u64)
        {
            return Err(Error::Checkpoint {
                path: dir.to_owned(),
                reason: format!(
                    "{} episodes done is not a multiple of minibatch_episodes {}",
                    state.episodes_done, this.config.minibatch_episodes
                ),
            });
        }
        learner
            .load(&dir.join("learner"))
            .map_err(learner_error("*", "load"))?;
        this.state = state;
        Ok(this)
    }

    /// The run's state so far.
    pub fn state(&self) -> &OnlineState {
        &self.state
    }

    /// Runs over `stream` (from the start; records before the saved position are skipped) until it
    /// ends or `max_episodes` are done.
    pub fn run(
        &mut self,
        stream: impl IntoIterator<Item = F::Input>,
        backend: &mut dyn Backend,
        learner: &mut dyn Learner,
        mut judge: Option<&mut dyn EpisodeJudge>,
    ) -> Result<&OnlineState> {
        let mut stream = stream.into_iter().skip(self.state.stream_position as usize);
        let minibatch = self.config.minibatch_episodes as u64;
        loop {
            let budget = match self.config.max_episodes {
                Some(max) => max.saturating_sub(self.state.episodes_done).min(minibatch),
                None => minibatch,
            };
            let records: Vec<F::Input> = stream.by_ref().take(budget as usize).collect();
            if records.is_empty() {
                break;
            }
            self.minibatch(&records, backend, learner, reborrow(&mut judge))?;
        }
        self.write_metrics()?;
        Ok(&self.state)
    }

    fn minibatch(
        &mut self,
        records: &[F::Input],
        backend: &mut dyn Backend,
        learner: &mut dyn Learner,
        judge: Option<&mut dyn EpisodeJudge>,
    ) -> Result<()> {
        let first = self.state.episodes_done;
        let jobs: Vec<EpisodeJob<'_, F::Input>> = records
            .iter()
            .enumerate()
            .map(|(i, input)| EpisodeJob {
                episode: first + i as u64,
                seed: derive_seed(self.config.seed, &[first + i as u64]),
                input,
            })
            .collect();
        let (results, batch) = if self.config.skip_failed_episodes {
            let (outcomes, batch) = self.scheduler.run_isolated(&jobs, backend, judge)?;
            let mut results = Vec::with_capacity(outcomes.len());
            for outcome in outcomes {
                match outcome {
                    Ok(r) => results.push(r),
                    Err(f) => self.state.failures.push(f),
                }
            }
            (results, batch)
        } else {
            self.scheduler.run(&jobs, backend, judge)?
        };
        self.state.batch.merge(&batch);

        if let Some(dir) = &self.config.traces_dir {
            std::fs::create_dir_all(dir).map_err(io_error(dir))?;
            let traces: Vec<EpisodeTraces> = results
                .iter()
                .map(|r| EpisodeTraces {
                    episode: r.episode,
                    trace: (*r.trace).clone(),
                    rollouts: r.rollouts.clone(),
                })
                .collect();
            let last = first + records.len() as u64 - 1;
            write_jsonl(
                &dir.join(format!("episodes-{first:010}-{last:010}.jsonl")),
                &traces,
            )?;
        }
        let mut by_node: BTreeMap<NodeId, Vec<Feedback>> = BTreeMap::new();
        for result in results {
            let rewards = result.trace.final_rewards();
            for (name, value) in &rewards {
                let entry = self
                    .state
                    .reward_sums
                    .entry(name.clone())
                    .or_insert((0.0, 0));
                entry.0 += value;
                entry.1 += 1;
            }
            let progressive = self
                .state
                .reward_sums
                .iter()
                .map(|(k, (sum, n))| (k.clone(), sum / *n as f64))
                .collect();
            self.state.totals.add(&result.accounting);
            self.state.metrics.push(EpisodeMetrics {
                episode: result.episode,
                position: self.state.stream_position + (result.episode - first),
                rewards,
                progressive,
                accounting: result.accounting,
            });
            for f in result.feedback {
                by_node.entry(f.node().clone()).or_default().push(f);
            }
        }
        self.state.episodes_done += records.len() as u64;
        self.state.stream_position += records.len() as u64;

        for (node, feedback) in by_node {
            let _span = tracing::info_span!(
                "learner_step",
                node = node.as_str(),
                records = feedback.len()
            )
            .entered();
            let stats = learner
                .learn(&node, &feedback)
                .map_err(learner_error(node.as_str(), "learn"))?;
            let mut counts = [0usize; 3];
            for f in &feedback {
                counts[match f {
                    Feedback::Preference(_) => 0,
                    Feedback::Target(_) => 1,
                    Feedback::Label(_) => 2,
                }] += 1;
            }
            self.state.learn_log.push(LearnLog {
                episodes_done: self.state.episodes_done,
                node,
                counts,
                stats,
            });
        }

        let done = self.state.episodes_done;
        if let Some(r) = self.config.reference_update.clone() {
            if done.is_multiple_of(r.every_episodes) {
                self.reference_gate(&r.metric, r.weight, learner)?;
            }
        }
        if let Some(c) = self.config.checkpoint.clone() {
            if done.is_multiple_of(c.every_episodes) {
                self.checkpoint(&c.dir, learner)?;
            }
        }
        Ok(())
    }

    /// Updates every model node's reference when the progressive (running-mean) `metric` improved
    /// since the previous check (always on the first check that has the metric).
    fn reference_gate(
        &mut self,
        metric: &str,
        weight: f64,
        learner: &mut dyn Learner,
    ) -> Result<()> {
        let mean = self
            .state
            .reward_sums
            .get(metric)
            .filter(|(_, n)| *n > 0)
            .map(|(sum, n)| sum / *n as f64);
        let gate = &mut self.state.gate;
        gate.checks += 1;
        let Some(mean) = mean else { return Ok(()) };
        let improved = gate.previous.is_none_or(|p| mean > p);
        gate.previous = Some(mean);
        if !improved {
            return Ok(());
        }
        gate.updates += 1;
        let nodes: Vec<NodeId> = self
            .scheduler
            .nodes()
            .iter()
            .filter(|n| !matches!(n.kind, NodeKind::Tool))
            .map(|n| n.id.clone())
            .collect();
        let _span = tracing::info_span!("reference_update", weight, mean).entered();
        for node in nodes {
            learner
                .update_reference(&node, weight)
                .map_err(learner_error(node.as_str(), "update_reference"))?;
        }
        Ok(())
    }

    /// Writes a checkpoint of the current state unless the last periodic one already holds it,
    /// so that a stream ending between checkpoint intervals leaves its final adapters on disk.
    /// Returns the folder written (`None`: nothing to write, or no checkpoint config).
    pub fn checkpoint_final(&self, learner: &dyn Learner) -> Result<Option<PathBuf>> {
        let Some(c) = &self.config.checkpoint else {
            return Ok(None);
        };
        let done = self.state.episodes_done;
        if done == 0 || done.is_multiple_of(c.every_episodes) {
            return Ok(None);
        }
        self.checkpoint(&c.dir, learner).map(Some)
    }

    /// Writes a checkpoint `dir/episode-NNNNNNNNNN/` atomically and points `dir/latest` at it.
    fn checkpoint(&self, dir: &Path, learner: &dyn Learner) -> Result<PathBuf> {
        let _span =
            tracing::info_span!("checkpoint", episodes = self.state.episodes_done).entered();
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        let name = format!("episode-{:010}", self.state.episodes_done);
        let tmp = dir.join(format!(".tmp-{name}"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io_error(&tmp))?;
        }
        let learner_dir = tmp.join("learner");
        std::fs::create_dir_all(&learner_dir).map_err(io_error(&learner_dir))?;
        learner
            .save(&learner_dir)
            .map_err(learner_error("*", "save"))?;
        let state_path = tmp.join(STATE_FILE);
        let state = serde_json::to_vec(&self.state).map_err(|source| Error::Json {
            path: state_path.clone(),
            source,
        })?;
        write_atomic(&state_path, &state)?;
        let config_path = tmp.join("config.json");
        let config = serde_json::to_vec_pretty(&self.config).map_err(|source| Error::Json {
            path: config_path.clone(),
            source,
        })?;
        write_atomic(&config_path, &config)?;
        let final_dir = dir.join(&name);
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir).map_err(io_error(&final_dir))?;
        }
        std::fs::rename(&tmp, &final_dir).map_err(io_error(&final_dir))?;
        write_atomic(&dir.join(LATEST_FILE), name.as_bytes())?;
        self.write_metrics()?;
        Ok(final_dir)
    }

    fn write_metrics(&self) -> Result<()> {
        if let Some(path) = &self.config.metrics_path {
            write_jsonl(path, &self.state.metrics)?;
        }
        Ok(())
    }
}
