//! The CLI's pipeline over tensor-free backends: batched prediction, the leaderboard files,
//! online training with metrics.jsonl / SVG / checkpoints, and exact resume.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::Oracle;
use flowtune_graph::{BoxError, NodeId};
use flowtune_rollout::{EpisodeMetrics, Feedback, LearnStats, Learner};
use musique::app::{learning_curve_svg, predict, predictions, train, write_eval, TrainOptions};
use musique::flow::{default_prompt_dir, rewards, FlowOptions, MusiqueFlow, Variant};
use musique::metrics::{read_predictions_jsonl, MetricsReport};
use musique::synth::{generate, SynthConfig};

/// Counts the feedback it is given per node and kind; saves and loads the counts.
#[derive(Default)]
struct CountingLearner {
    counts: BTreeMap<String, [usize; 3]>,
    reference_updates: usize,
}

impl Learner for CountingLearner {
    fn learn(&mut self, node: &NodeId, records: &[Feedback]) -> Result<LearnStats, BoxError> {
        let c = self.counts.entry(node.to_string()).or_default();
        for r in records {
            c[match r {
                Feedback::Preference(_) => 0,
                Feedback::Target(_) => 1,
                Feedback::Label(_) => 2,
            }] += 1;
        }
        Ok(LearnStats {
            records: records.len(),
            loss: 0.0,
            extra: BTreeMap::new(),
        })
    }
    fn update_reference(&mut self, _node: &NodeId, _weight: f64) -> Result<(), BoxError> {
        self.reference_updates += 1;
        Ok(())
    }
    fn save(&self, dir: &Path) -> Result<(), BoxError> {
        std::fs::write(
            dir.join("counts.json"),
            serde_json::to_vec(&(&self.counts, self.reference_updates))?,
        )?;
        Ok(())
    }
    fn load(&mut self, dir: &Path) -> Result<(), BoxError> {
        (self.counts, self.reference_updates) =
            serde_json::from_slice(&std::fs::read(dir.join("counts.json"))?)?;
        Ok(())
    }
}

fn flow(variant: Variant) -> MusiqueFlow {
    MusiqueFlow::from_prompt_dir(
        FlowOptions {
            variant,
            ..FlowOptions::default()
        },
        &default_prompt_dir(),
    )
    .unwrap()
}

#[test]
fn eval_writes_leaderboard_files_in_input_order() {
    let records = generate(&SynthConfig {
        seed: 30,
        questions: 12,
        unanswerable_twins: true,
        ..SynthConfig::default()
    })
    .unwrap();
    let flow = flow(Variant::Full);
    let mut oracle = Oracle::new(&records, false);
    let mut seen = 0;
    let outputs = predict(&flow, &records, &mut oracle, 5, 0, &mut |done, _| {
        seen = done
    })
    .unwrap();
    assert_eq!(seen, records.len());
    let preds = predictions(&outputs, true);
    let dir = tempfile::tempdir().unwrap();
    let report = write_eval(dir.path(), &records, &preds).unwrap();
    let back = read_predictions_jsonl(&dir.path().join("predictions.jsonl")).unwrap();
    assert_eq!(back, preds);
    assert_eq!(
        back.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
        records.iter().map(|r| r.id.as_str()).collect::<Vec<_>>()
    );
    let m: MetricsReport =
        serde_json::from_slice(&std::fs::read(dir.path().join("metrics.json")).unwrap()).unwrap();
    assert_eq!(m, report);
    assert_eq!((m.answer_f1, m.support_f1), (1.0, 1.0));
    assert_eq!(m.full.unwrap().group_answer_sufficiency_f1, Some(1.0));
    // Batching: 5 episodes in flight means multi-request batches.
    assert!(oracle.calls.len() > records.len());
}

fn metrics_lines(dir: &Path) -> Vec<EpisodeMetrics> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn train_writes_metrics_curve_checkpoints_and_resumes_exactly() {
    let records = generate(&SynthConfig {
        seed: 31,
        questions: 16,
        ..SynthConfig::default()
    })
    .unwrap();
    let flow = flow(Variant::Answerable);
    let options = |dir: &Path, resume: bool| TrainOptions {
        out_dir: dir.to_path_buf(),
        seed: 3,
        minibatch_episodes: 4,
        episodes_in_flight: 4,
        checkpoint_every: 4,
        reference_every: 8,
        resume,
        save_traces: !resume,
        skip_failed_episodes: false,
        query_alternatives: 3,
        answer_alternatives: 3,
    };

    // Uninterrupted run.
    let full_dir = tempfile::tempdir().unwrap();
    let mut learner = CountingLearner::default();
    let mut ticks = Vec::new();
    let summary = train(
        &flow,
        &records,
        &mut Oracle::new(&records, false),
        &mut learner,
        &options(full_dir.path(), false),
        &mut |d, _| ticks.push(d),
    )
    .unwrap();
    assert_eq!(summary.episodes, 16);
    assert_eq!(ticks, vec![0, 4, 8, 12, 16]);
    let metrics = metrics_lines(full_dir.path());
    assert_eq!(metrics.len(), 16);
    assert!(metrics
        .iter()
        .all(|m| m.rewards[rewards::ANSWER_F1] == 1.0 && m.rewards[rewards::SUPPORT_F1] == 1.0));
    assert_eq!(summary.first_window[rewards::ANSWER_F1], 1.0);
    assert!(
        learner.counts["relevance"][2] > 0
            && learner.counts["concise"][1] == 16
            && learner.counts["verbose"][0] > 0
    );
    assert!(learner.reference_updates > 0);
    let svg = std::fs::read_to_string(&summary.plot_path).unwrap();
    assert!(svg.starts_with("<svg") && svg.matches("<polyline").count() == 4);
    assert!(full_dir.path().join("checkpoints/latest").is_file());
    assert!(full_dir.path().join("summary.json").is_file());
    assert!(
        std::fs::read_dir(full_dir.path().join("traces"))
            .unwrap()
            .count()
            >= 4,
        "one trace file per minibatch"
    );

    // Interrupted after 8 records, then resumed over all 16: identical metrics and learner state.
    let split_dir = tempfile::tempdir().unwrap();
    let mut first = CountingLearner::default();
    train(
        &flow,
        &records[..8],
        &mut Oracle::new(&records, false),
        &mut first,
        &options(split_dir.path(), false),
        &mut |_, _| {},
    )
    .unwrap();
    let mut resumed = CountingLearner::default();
    train(
        &flow,
        &records,
        &mut Oracle::new(&records, false),
        &mut resumed,
        &options(split_dir.path(), true),
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(resumed.counts, learner.counts);
    let a = metrics_lines(full_dir.path());
    let b = metrics_lines(split_dir.path());
    assert_eq!(a, b);
}

#[test]
fn learning_curve_has_one_point_per_episode() {
    let m = |e: u64, v: f64| EpisodeMetrics {
        episode: e,
        position: e,
        rewards: BTreeMap::from([(rewards::ANSWER_F1.to_string(), v)]),
        progressive: BTreeMap::from([(rewards::ANSWER_F1.to_string(), v)]),
        accounting: Default::default(),
    };
    let svg = learning_curve_svg(&[m(0, 0.0), m(1, 0.5), m(2, 1.0)], &[rewards::ANSWER_F1]);
    let line = svg.lines().find(|l| l.starts_with("<polyline")).unwrap();
    let points = line
        .split("points=\"")
        .nth(1)
        .unwrap()
        .trim_end_matches("\"/>");
    assert_eq!(points.split(' ').count(), 3);
    // y runs from the bottom (0) to the top (1) of the plot area.
    assert_eq!(points, "48.0,312.0 360.0,180.0 672.0,48.0");
}
