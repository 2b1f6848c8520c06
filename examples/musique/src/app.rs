//! What the `musique` CLI does, over any [`Backend`] and [`Learner`]: batched prediction and
//! evaluation (leaderboard `predictions.jsonl` + `metrics.json`), online training with
//! progressive validation (`metrics.jsonl`), checkpoints and resume, and the learning-curve SVG.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use flowtune_graph::{
    derive_seed, play, Backend, EpisodeSetup, Executor, Flow, NodeTable, ReplayPlan,
};
use flowtune_rollout::{
    CheckpointConfig, EpisodeMetrics, Learner, OnlineConfig, OnlineLoop, ReferenceUpdateConfig,
};
use serde::{Deserialize, Serialize};

use crate::data::Record;
use crate::error::{Error, Result};
use crate::flow::{
    credit_config_with_alternatives, pairwise_sufficiency, rewards, FlowOutput, MusiqueFlow,
    Variant,
};
use crate::metrics::{
    evaluate, write_metrics_json, write_predictions_jsonl, MetricsReport, Prediction,
};

fn flow_error(e: impl std::fmt::Display) -> Error {
    Error::Flow(e.to_string())
}

type Finished = (
    usize,
    flowtune_graph::Result<flowtune_graph::EpisodeOutcome<FlowOutput>>,
);

/// Run the flow live (no learning) on every record, `in_flight` episodes at a time so their node
/// calls reach the backend batched. `progress(done, output)` is called as episodes finish.
/// Outputs come back in record order.
pub fn predict<'a>(
    flow: &'a MusiqueFlow,
    records: &'a [Record],
    backend: &mut dyn Backend,
    in_flight: usize,
    seed: u64,
    progress: &mut dyn FnMut(usize, &FlowOutput),
) -> Result<Vec<FlowOutput>> {
    let _span = tracing::info_span!("predict", records = records.len()).entered();
    let nodes = Rc::new(NodeTable::new(&flow.spec()).map_err(flow_error)?);
    let mut outputs: Vec<Option<FlowOutput>> = vec![None; records.len()];
    let mut executor: Executor<'a, Finished> = Executor::new();
    let mut next = 0usize;
    let mut done = 0usize;
    let spawn = |executor: &mut Executor<'a, Finished>, i: usize| {
        let setup = EpisodeSetup {
            nodes: nodes.clone(),
            episode: i as u64,
            seed: derive_seed(seed, &[i as u64]),
            replay: ReplayPlan::live(),
        };
        let fut = play(flow, &records[i], setup, executor.dispatcher());
        executor.spawn(async move { (i, fut.await) });
    };
    while next < records.len() && next < in_flight.max(1) {
        spawn(&mut executor, next);
        next += 1;
    }
    while !executor.is_empty() {
        for (_, (i, outcome)) in executor.step(backend).map_err(flow_error)? {
            let outcome = outcome.map_err(flow_error)?;
            let output = outcome
                .output
                .ok_or_else(|| Error::Flow(format!("episode {i} stopped without an output")))?;
            done += 1;
            progress(done, &output);
            outputs[i] = Some(output);
            if next < records.len() {
                spawn(&mut executor, next);
                next += 1;
            }
        }
    }
    outputs
        .into_iter()
        .enumerate()
        .map(|(i, o)| o.ok_or_else(|| Error::Flow(format!("episode {i} never finished"))))
        .collect()
}

/// Leaderboard predictions from flow outputs; with `pairwise` (Full), exactly one twin of each
/// id pair is answerable (the one with the higher p(sufficient)).
pub fn predictions(outputs: &[FlowOutput], pairwise: bool) -> Vec<Prediction> {
    let mut preds: Vec<Prediction> = outputs.iter().map(|o| o.prediction.clone()).collect();
    if pairwise {
        let scores: Vec<Option<f64>> = outputs.iter().map(|o| o.sufficiency_yes_logprob).collect();
        pairwise_sufficiency(&mut preds, &scores);
    }
    preds
}

/// Evaluate and write `dir/predictions.jsonl` and `dir/metrics.json` (atomically).
pub fn write_eval(
    dir: &Path,
    records: &[Record],
    predictions: &[Prediction],
) -> Result<MetricsReport> {
    let report = evaluate(records, predictions)?;
    write_predictions_jsonl(&dir.join("predictions.jsonl"), predictions)?;
    write_metrics_json(&dir.join("metrics.json"), &report)?;
    Ok(report)
}

/// Online-training settings (what the CLI exposes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    /// Output folder: `metrics.jsonl`, `learning_curve.svg`, `checkpoints/`, `summary.json`.
    pub out_dir: PathBuf,
    /// Run seed.
    pub seed: u64,
    /// Episodes per learning step.
    pub minibatch_episodes: usize,
    /// Episodes in flight at once (≤ minibatch).
    pub episodes_in_flight: usize,
    /// Checkpoint every this many episodes (a multiple of the minibatch; 0: never).
    pub checkpoint_every: u64,
    /// Gated soft reference update every this many episodes (paper: 100; 0: never).
    pub reference_every: u64,
    /// Continue from `out_dir/checkpoints/latest`.
    pub resume: bool,
    /// Write every minibatch's traces (episodes and rollouts) under `out_dir/traces/`.
    pub save_traces: bool,
    /// Skip (and record in the checkpoint state) episodes whose flow code, rollouts or feedback
    /// fail, instead of ending the run.
    pub skip_failed_episodes: bool,
    /// Diverse-beam alternatives per query-node call (the paper: 3; 0: no query DPO).
    pub query_alternatives: usize,
    /// Diverse-beam alternatives per verbose-answer call (the paper: 3, i.e. 4 candidates).
    pub answer_alternatives: usize,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            out_dir: PathBuf::from("runs/musique"),
            seed: 0,
            minibatch_episodes: 8,
            episodes_in_flight: 8,
            checkpoint_every: 40,
            reference_every: 96,
            resume: false,
            save_traces: false,
            skip_failed_episodes: false,
            query_alternatives: 3,
            answer_alternatives: 3,
        }
    }
}

/// The online loop's configuration for `variant` with `options` (the paper's credit routing,
/// lerp-0.5 reference updates gated on progressive answer F1).
pub fn online_config(variant: Variant, options: &TrainOptions) -> OnlineConfig {
    let mb = options.minibatch_episodes.max(1) as u64;
    let round = |every: u64| every.div_ceil(mb) * mb;
    OnlineConfig {
        seed: options.seed,
        minibatch_episodes: mb as usize,
        episodes_in_flight: options.episodes_in_flight.clamp(1, mb as usize),
        credit: credit_config_with_alternatives(
            variant,
            options.query_alternatives,
            options.answer_alternatives,
        ),
        reference_update: (options.reference_every > 0).then(|| ReferenceUpdateConfig {
            every_episodes: round(options.reference_every),
            weight: 0.5,
            metric: rewards::ANSWER_F1.into(),
        }),
        checkpoint: (options.checkpoint_every > 0).then(|| CheckpointConfig {
            every_episodes: round(options.checkpoint_every),
            dir: options.out_dir.join("checkpoints"),
        }),
        metrics_path: Some(options.out_dir.join("metrics.jsonl")),
        traces_dir: options.save_traces.then(|| options.out_dir.join("traces")),
        skip_failed_episodes: options.skip_failed_episodes,
        ..OnlineConfig::default()
    }
}

/// Means of each reward over a window of episodes.
pub fn window_means(metrics: &[EpisodeMetrics]) -> BTreeMap<String, f64> {
    let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for m in metrics {
        for (k, v) in &m.rewards {
            let e = sums.entry(k.clone()).or_insert((0.0, 0));
            e.0 += v;
            e.1 += 1;
        }
    }
    sums.into_iter()
        .map(|(k, (s, n))| (k, s / n as f64))
        .collect()
}

/// What an `eval` or `predict` run ends with (`summary.json` beside its outputs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictSummary {
    /// Records predicted.
    pub records: usize,
    /// Wall seconds of the predictions, from after the model (and any checkpoint) loaded to
    /// the last prediction: what a per-episode figure divides.
    pub wall_seconds: f64,
}

/// What a training run ends with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    /// Episodes done.
    pub episodes: u64,
    /// Reward means over the first 20% of episodes (the untrained end of progressive validation).
    pub first_window: BTreeMap<String, f64>,
    /// Reward means over the last 20% of episodes.
    pub last_window: BTreeMap<String, f64>,
    /// Progressive (running) means at the end.
    pub progressive: BTreeMap<String, f64>,
    /// `metrics.jsonl`.
    pub metrics_path: PathBuf,
    /// `learning_curve.svg`.
    pub plot_path: PathBuf,
    /// Wall seconds of this invocation.
    pub wall_seconds: f64,
    /// Episodes skipped because they failed (`skip_failed_episodes`), with their errors.
    #[serde(default)]
    pub failures: Vec<flowtune_rollout::EpisodeFailure>,
}

/// Train online over `records` (one pass), reporting after every minibatch through
/// `progress(episodes_done, last metrics)`; writes `metrics.jsonl`, the SVG curve, checkpoints
/// and `summary.json` under `options.out_dir`.
pub fn train(
    flow: &MusiqueFlow,
    records: &[Record],
    backend: &mut dyn Backend,
    learner: &mut dyn Learner,
    options: &TrainOptions,
    progress: &mut dyn FnMut(u64, Option<&EpisodeMetrics>),
) -> Result<TrainSummary> {
    let _span = tracing::info_span!("train", records = records.len()).entered();
    let started = std::time::Instant::now();
    std::fs::create_dir_all(&options.out_dir).map_err(|e| Error::io(&options.out_dir, e))?;
    let config = online_config(flow.options().variant, options);
    let mb = config.minibatch_episodes;
    let mut online = if options.resume {
        OnlineLoop::resume(flow, config, learner).map_err(flow_error)?
    } else {
        OnlineLoop::new(flow, config).map_err(flow_error)?
    };
    progress(online.state().episodes_done, online.state().metrics.last());
    loop {
        let done = online.state().episodes_done as usize;
        if done >= records.len() {
            break;
        }
        let upto = (done + mb).min(records.len());
        online
            .run(records[..upto].iter().cloned(), backend, learner, None)
            .map_err(flow_error)?;
        progress(online.state().episodes_done, online.state().metrics.last());
    }
    online.checkpoint_final(learner).map_err(flow_error)?;
    let state = online.state();
    let n = state.metrics.len();
    let k = (n / 5).max(1).min(n);
    let plot_path = options.out_dir.join("learning_curve.svg");
    crate::io::write_atomic(
        &plot_path,
        learning_curve_svg(&state.metrics, &[rewards::ANSWER_F1, rewards::SUPPORT_F1]).as_bytes(),
    )?;
    let summary = TrainSummary {
        episodes: state.episodes_done,
        first_window: window_means(&state.metrics[..k]),
        last_window: window_means(&state.metrics[n - k..]),
        progressive: state
            .metrics
            .last()
            .map(|m| m.progressive.clone())
            .unwrap_or_default(),
        metrics_path: options.out_dir.join("metrics.jsonl"),
        plot_path,
        wall_seconds: started.elapsed().as_secs_f64(),
        failures: state.failures.clone(),
    };
    crate::io::write_json_atomic(&options.out_dir.join("summary.json"), &summary)?;
    Ok(summary)
}

/// A hand-written SVG learning curve: for each reward key, the progressive (running) mean and
/// a trailing 20-episode window mean over episodes.
pub fn learning_curve_svg(metrics: &[EpisodeMetrics], keys: &[&str]) -> String {
    const W: f64 = 720.0;
    const H: f64 = 360.0;
    const PAD: f64 = 48.0;
    const COLORS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
    let n = metrics.len().max(2);
    let x = |i: usize| PAD + (W - 2.0 * PAD) * i as f64 / (n - 1) as f64;
    let y = |v: f64| H - PAD - (H - 2.0 * PAD) * v.clamp(0.0, 1.0);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <line x1=\"{PAD}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"black\"/>\n<line x1=\"{PAD}\" y1=\"{PAD}\" x2=\"{PAD}\" y2=\"{b}\" stroke=\"black\"/>\n",
        b = H - PAD,
        r = W - PAD
    );
    for t in 0..=4 {
        let v = t as f64 / 4.0;
        svg.push_str(&format!(
            "<line x1=\"{PAD}\" y1=\"{yv:.1}\" x2=\"{r}\" y2=\"{yv:.1}\" stroke=\"#ddd\"/><text x=\"{tx}\" y=\"{ty:.1}\" text-anchor=\"end\">{v:.2}</text>\n",
            yv = y(v),
            r = W - PAD,
            tx = PAD - 6.0,
            ty = y(v) + 4.0
        ));
    }
    svg.push_str(&format!(
        "<text x=\"{cx}\" y=\"{by}\" text-anchor=\"middle\">episode (1..{m})</text>\n",
        cx = W / 2.0,
        by = H - 12.0,
        m = metrics.len()
    ));
    for (k, key) in keys.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let mut running = Vec::new();
        let mut window = Vec::new();
        let mut recent: Vec<f64> = Vec::new();
        for (i, m) in metrics.iter().enumerate() {
            if let Some(v) = m.progressive.get(*key) {
                running.push(format!("{:.1},{:.1}", x(i), y(*v)));
            }
            if let Some(v) = m.rewards.get(*key) {
                recent.push(*v);
                let tail = &recent[recent.len().saturating_sub(20)..];
                window.push(format!(
                    "{:.1},{:.1}",
                    x(i),
                    y(tail.iter().sum::<f64>() / tail.len() as f64)
                ));
            }
        }
        svg.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n",
            running.join(" ")
        ));
        svg.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1\" stroke-dasharray=\"4 3\" opacity=\"0.7\" points=\"{}\"/>\n",
            window.join(" ")
        ));
        svg.push_str(&format!(
            "<text x=\"{lx}\" y=\"{ly}\" fill=\"{color}\">{key}: progressive (solid), last-20 window (dashed)</text>\n",
            lx = PAD + 8.0,
            ly = PAD - 20.0 + 14.0 * k as f64
        ));
    }
    svg.push_str("</svg>\n");
    svg
}
