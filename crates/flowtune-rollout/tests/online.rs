//! The online loop: it drives a tabular policy flow to its optimum, resumes exactly, and keeps
//! the backend's batches full.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use common::{two_step_reward, TwoStepFlow, UniformFlow};
use flowtune_graph::Message;
use flowtune_rollout::toy::TabularPolicy;
use flowtune_rollout::{
    CheckpointConfig, CreditConfig, GenerateAlternatives, NodeDeviation, OnlineConfig, OnlineLoop,
    OnlineState, ReferenceUpdateConfig,
};

fn contexts(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("c{}", i % 2)).collect()
}

/// Initially the policy plays (x, p): reward 0 on c0 and 0.5 on c1, both suboptimal. The optimum
/// (y, p) on c0 / (x, q) on c1 is reachable by one-step deviations.
fn two_step_policy() -> TabularPolicy {
    TabularPolicy::new(0.5, 1.0)
        .with_init("first", "x", 0.5)
        .with_init("second", "p", 0.5)
}

fn config(dir: Option<&std::path::Path>) -> OnlineConfig {
    OnlineConfig {
        seed: 11,
        minibatch_episodes: 4,
        episodes_in_flight: 4,
        credit: CreditConfig::default(),
        reference_update: Some(ReferenceUpdateConfig {
            every_episodes: 8,
            weight: 0.5,
            metric: "reward".into(),
        }),
        checkpoint: dir.map(|d| CheckpointConfig {
            every_episodes: 8,
            dir: d.to_owned(),
        }),
        metrics_path: dir.map(|d| d.join("metrics.jsonl")),
        max_episodes: None,
        traces_dir: dir.map(|d| d.join("traces")),
        skip_failed_episodes: false,
    }
}

#[test]
fn online_loop_reaches_the_optimum() {
    let mut policy = two_step_policy();
    let mut run = OnlineLoop::new(&TwoStepFlow, config(None)).expect("loop");
    let state = run
        .run(contexts(160), &mut policy.clone(), &mut policy, None)
        .expect("run")
        .clone();
    // Before learning, both contexts are played suboptimally.
    assert!(
        state.metrics[..2].iter().all(|m| m.rewards["reward"] < 1.0),
        "{:?}",
        &state.metrics[..2]
    );
    // The greedy policy is now optimal in both contexts: (y, p) on c0, (x, q) on c1.
    for (ctx, first, second) in [("c0", "y", "p"), ("c1", "x", "q")] {
        let labels = |a: &str, b: &str| vec![a.to_owned(), b.to_owned()];
        let f = policy.greedy("first", &[Message::user(ctx)], &labels("x", "y"));
        assert_eq!(["x", "y"][f], first, "context {ctx}");
        let s = policy.greedy(
            "second",
            &[Message::user(format!("{ctx} {first}"))],
            &labels("p", "q"),
        );
        assert_eq!(["p", "q"][s], second, "context {ctx}");
        assert_eq!(two_step_reward(ctx, first, second), 1.0);
    }
    // The progressive reward (predictions before learning) of the last 40 episodes is optimal.
    let last: Vec<f64> = state.metrics[120..]
        .iter()
        .map(|m| m.rewards["reward"])
        .collect();
    assert!(last.iter().all(|r| *r == 1.0), "{last:?}");
    assert!(state.gate.updates >= 1 && state.gate.checks == 20);
    assert_eq!(state.episodes_done, 160);
}

#[test]
fn resume_continues_exactly() {
    let stream = contexts(40);
    // Uninterrupted.
    let full_dir = tempfile::tempdir().expect("tempdir");
    let mut policy = two_step_policy();
    let mut run = OnlineLoop::new(&TwoStepFlow, config(Some(full_dir.path()))).expect("loop");
    let full: OnlineState = run
        .run(stream.clone(), &mut policy.clone(), &mut policy, None)
        .expect("run")
        .clone();
    let full_table = policy.state.borrow().clone();

    // 16 episodes, then a "crash" (everything dropped), then resume from the checkpoint.
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut policy = two_step_policy();
        let cfg = OnlineConfig {
            max_episodes: Some(16),
            ..config(Some(dir.path()))
        };
        let mut run = OnlineLoop::new(&TwoStepFlow, cfg).expect("loop");
        run.run(stream.clone(), &mut policy.clone(), &mut policy, None)
            .expect("first part");
    }
    let mut policy = TabularPolicy::new(99.0, 99.0); // overwritten by the checkpoint
    let mut run =
        OnlineLoop::resume(&TwoStepFlow, config(Some(dir.path())), &mut policy).expect("resume");
    assert_eq!(run.state().episodes_done, 16);
    let resumed = run
        .run(stream, &mut policy.clone(), &mut policy, None)
        .expect("rest")
        .clone();

    assert_eq!(resumed.metrics, full.metrics);
    assert_eq!(resumed.learn_log, full.learn_log);
    assert_eq!(resumed.gate, full.gate);
    assert_eq!(resumed, full);
    assert_eq!(*policy.state.borrow(), full_table);
    // Metrics file and checkpoints on disk.
    let metrics: Vec<flowtune_rollout::EpisodeMetrics> =
        flowtune_graph::io::read_jsonl(&dir.path().join("metrics.jsonl")).expect("metrics");
    assert_eq!(metrics, full.metrics);
    let traces: Vec<flowtune_rollout::EpisodeTraces> = flowtune_graph::io::read_jsonl(
        &dir.path()
            .join("traces/episodes-0000000036-0000000039.jsonl"),
    )
    .expect("traces");
    assert_eq!(
        traces.iter().map(|t| t.episode).collect::<Vec<_>>(),
        vec![36, 37, 38, 39]
    );
    assert!(traces
        .iter()
        .all(|t| t.rollouts.len() == 2 && t.trace.steps.len() == 2));
    let latest = std::fs::read_to_string(dir.path().join("latest")).expect("latest");
    assert_eq!(latest, "episode-0000000040");
    assert!(dir
        .path()
        .join("episode-0000000016/learner/tabular.json")
        .is_file());
    assert!(!std::fs::read_dir(dir.path()).expect("ls").any(|e| e
        .expect("entry")
        .file_name()
        .to_string_lossy()
        .starts_with(".tmp")));
}

/// A stream that ends between checkpoint intervals (20 episodes, every 8) gets a final
/// checkpoint holding all 20; one that ends on an interval gets none beyond the periodic one.
#[test]
fn final_checkpoint_covers_a_stream_ending_between_intervals() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut policy = two_step_policy();
    let mut run = OnlineLoop::new(&TwoStepFlow, config(Some(dir.path()))).expect("loop");
    run.run(contexts(20), &mut policy.clone(), &mut policy, None)
        .expect("run");
    let latest = || std::fs::read_to_string(dir.path().join("latest")).expect("latest");
    assert_eq!(latest(), "episode-0000000016");
    let written = run
        .checkpoint_final(&policy)
        .expect("final")
        .expect("written");
    assert_eq!(written, dir.path().join("episode-0000000020"));
    assert_eq!(latest(), "episode-0000000020");
    let saved: OnlineState =
        serde_json::from_slice(&std::fs::read(written.join("state.json")).expect("state"))
            .expect("state json");
    assert_eq!(saved, *run.state());
    // On an interval: nothing more to write.
    let dir2 = tempfile::tempdir().expect("tempdir");
    let mut run = OnlineLoop::new(&TwoStepFlow, config(Some(dir2.path()))).expect("loop");
    run.run(contexts(16), &mut policy.clone(), &mut policy, None)
        .expect("run");
    assert_eq!(run.checkpoint_final(&policy).expect("final"), None);
}

#[test]
fn resume_with_another_seed_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut policy = two_step_policy();
    let mut run = OnlineLoop::new(&TwoStepFlow, config(Some(dir.path()))).expect("loop");
    run.run(contexts(8), &mut policy.clone(), &mut policy, None)
        .expect("run");
    let cfg = OnlineConfig {
        seed: 12,
        ..config(Some(dir.path()))
    };
    let err = OnlineLoop::resume(&TwoStepFlow, cfg, &mut policy)
        .err()
        .expect("seed mismatch");
    assert!(
        matches!(err, flowtune_rollout::Error::Checkpoint { .. }),
        "{err}"
    );
}

#[test]
fn config_and_state_round_trip_and_validate() {
    let cfg = config(Some(std::path::Path::new("/tmp/x")));
    let json = serde_json::to_string_pretty(&cfg).expect("ser");
    assert_eq!(
        serde_json::from_str::<OnlineConfig>(&json).expect("de"),
        cfg
    );
    let bad = OnlineConfig {
        reference_update: Some(ReferenceUpdateConfig {
            every_episodes: 6,
            weight: 0.5,
            metric: "reward".into(),
        }),
        ..cfg.clone()
    };
    assert!(matches!(
        bad.validate(),
        Err(flowtune_rollout::Error::Config {
            field: "reference_update.every_episodes",
            ..
        })
    ));
    let bad = OnlineConfig {
        minibatch_episodes: 0,
        ..cfg
    };
    assert!(bad.validate().is_err());
}

fn uniform_run(in_flight: usize, minibatch: usize, deviate: bool) -> (f64, usize, f64) {
    let deviation = NodeDeviation {
        enabled: deviate,
        max_alternatives: 2,
        calls: flowtune_rollout::CallSelection::First { n: 1 },
        generate: GenerateAlternatives::DiverseBeam {
            num_beams: 3,
            num_beam_groups: 3,
            diversity_penalty: 1.0,
        },
    };
    let cfg = OnlineConfig {
        seed: 1,
        minibatch_episodes: minibatch,
        episodes_in_flight: in_flight,
        credit: CreditConfig {
            default_deviation: deviation,
            early_termination: false,
            ..CreditConfig::default()
        },
        ..OnlineConfig::default()
    };
    let mut policy = TabularPolicy::new(0.1, 1.0).with_vocab("step", &["w0", "w1", "w2"]);
    let mut run = OnlineLoop::new(&UniformFlow, cfg).expect("loop");
    let stream: Vec<String> = (0..64).map(|i| format!("s{i}")).collect();
    let state = run
        .run(stream, &mut policy.clone(), &mut policy, None)
        .expect("run")
        .clone();
    let sizes = policy.batch_sizes.borrow();
    assert_eq!(sizes.iter().sum::<usize>() as u64, state.batch.requests);
    assert_eq!(state.totals.node_calls(), state.batch.requests);
    (
        state.batch.mean_batch_size(),
        in_flight,
        state.totals.rollouts as f64,
    )
}

#[test]
fn scheduler_keeps_batches_full_on_uniform_flows() {
    for (in_flight, minibatch, deviate) in
        [(8, 8, false), (8, 8, true), (4, 16, true), (16, 16, true)]
    {
        let (mean, in_flight, rollouts) = uniform_run(in_flight, minibatch, deviate);
        eprintln!("in flight {in_flight}, minibatch {minibatch}, deviations {deviate}: mean batch {mean:.2}");
        assert!(
            mean >= 0.8 * in_flight as f64,
            "mean batch {mean} with {in_flight} in flight (deviate {deviate})"
        );
        assert_eq!(rollouts > 0.0, deviate);
    }
}

/// Reward = the record itself; one classify node and one tool node.
struct Scripted;

impl flowtune_graph::Flow for Scripted {
    type Input = f64;
    type Output = ();

    fn spec(&self) -> flowtune_graph::FlowSpec {
        flowtune_graph::FlowSpec {
            name: "scripted".into(),
            nodes: vec![
                flowtune_graph::NodeSpec::classify("c", &["a", "b"]),
                flowtune_graph::NodeSpec::tool("t"),
            ],
            edges: vec![],
        }
    }

    async fn run(
        &self,
        cx: &flowtune_graph::EpisodeContext,
        r: &f64,
    ) -> flowtune_graph::Result<()> {
        cx.classify("c", vec![Message::user("x")]).await?;
        let r: f64 = cx.tool("t", r, |r: &f64| Ok::<_, flowtune_graph::BoxError>(*r))?;
        cx.reward("score", r);
        Ok(())
    }
}

/// Records reference updates (episodes done, node, weight).
struct Recorder {
    updates: Vec<(String, f64)>,
}

impl flowtune_rollout::Learner for Recorder {
    fn learn(
        &mut self,
        _node: &flowtune_graph::NodeId,
        records: &[flowtune_rollout::Feedback],
    ) -> Result<flowtune_rollout::LearnStats, flowtune_graph::BoxError> {
        Ok(flowtune_rollout::LearnStats {
            records: records.len(),
            ..Default::default()
        })
    }
    fn update_reference(
        &mut self,
        node: &flowtune_graph::NodeId,
        weight: f64,
    ) -> Result<(), flowtune_graph::BoxError> {
        self.updates.push((node.to_string(), weight));
        Ok(())
    }
    fn save(&self, _dir: &std::path::Path) -> Result<(), flowtune_graph::BoxError> {
        Ok(())
    }
    fn load(&mut self, _dir: &std::path::Path) -> Result<(), flowtune_graph::BoxError> {
        Ok(())
    }
}

#[test]
fn reference_update_is_gated_on_progressive_improvement() {
    let cfg = OnlineConfig {
        minibatch_episodes: 2,
        episodes_in_flight: 2,
        reference_update: Some(ReferenceUpdateConfig {
            every_episodes: 4,
            weight: 0.5,
            metric: "score".into(),
        }),
        ..OnlineConfig::default()
    };
    // Progressive score at the checks: 1.0 (first: update), 0.5 (worse: none), 2/3 (better: update),
    // 0.5 (worse: none).
    let stream = [[1.0; 4], [0.0; 4], [1.0; 4], [0.0; 4]].concat();
    let mut run = OnlineLoop::new(&Scripted, cfg).expect("loop");
    let mut recorder = Recorder {
        updates: Vec::new(),
    };
    let state = run
        .run(
            stream,
            &mut TabularPolicy::new(0.1, 1.0),
            &mut recorder,
            None,
        )
        .expect("run")
        .clone();
    assert_eq!(state.gate.checks, 4);
    assert_eq!(state.gate.updates, 2);
    // Only the model node, never the tool; weight as configured.
    assert_eq!(
        recorder.updates,
        vec![("c".to_owned(), 0.5), ("c".to_owned(), 0.5)]
    );
    assert_eq!(state.gate.previous, Some(0.5));
}

/// [`TwoStepFlow`], except that its code fails on context `boom`, and on `c1` whenever the first
/// node answers `y` (which only a rollout deviating from the greedy `x` does; on `c1` exactly
/// the episodes that start with `y` get reward 0).
struct FlakyFlow;

impl flowtune_graph::Flow for FlakyFlow {
    type Input = String;
    type Output = f64;

    fn spec(&self) -> flowtune_graph::FlowSpec {
        TwoStepFlow.spec()
    }

    async fn run(
        &self,
        cx: &flowtune_graph::EpisodeContext,
        context: &String,
    ) -> flowtune_graph::Result<f64> {
        let fail = |message: &str| flowtune_graph::Error::Flow {
            flow: "flaky".into(),
            message: message.into(),
        };
        if context == "boom" {
            return Err(fail("boom"));
        }
        let r = TwoStepFlow.run(cx, context).await?;
        if context == "c1" && r == 0.0 {
            return Err(fail("c1 then y"));
        }
        Ok(r)
    }
}

#[test]
fn failed_episodes_are_skipped_and_recorded_when_asked() {
    // Episodes 2 and 5 fail in their own code; every c1 episode fails in a rollout (the
    // deviation to `y`). c0 episodes 0, 3, 7 are the only ones left.
    let stream: Vec<String> = ["c0", "c1", "boom", "c0", "c1", "boom", "c1", "c0"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let cfg = OnlineConfig {
        reference_update: None,
        skip_failed_episodes: true,
        ..config(None)
    };
    let mut policy = two_step_policy();
    let mut run = OnlineLoop::new(&FlakyFlow, cfg.clone()).expect("loop");
    let state = run
        .run(stream.clone(), &mut policy.clone(), &mut policy, None)
        .expect("run goes on past failures")
        .clone();
    let failed: Vec<u64> = state.failures.iter().map(|f| f.episode).collect();
    assert_eq!(failed, vec![1, 2, 4, 5, 6]);
    assert!(
        state.failures[1].error.contains("boom"),
        "{:?}",
        state.failures
    );
    assert!(
        state.failures[0].error.contains("c1 then y"),
        "{:?}",
        state.failures
    );
    let kept: Vec<(u64, u64)> = state
        .metrics
        .iter()
        .map(|m| (m.episode, m.position))
        .collect();
    assert_eq!(kept, vec![(0, 0), (3, 3), (7, 7)]);
    assert_eq!(state.episodes_done, 8);
    assert_eq!(state.stream_position, 8);
    // The state (with its failures) round-trips through serde, as checkpoints store it.
    let json = serde_json::to_string(&state).expect("ser");
    assert_eq!(
        serde_json::from_str::<OnlineState>(&json).expect("de"),
        state
    );

    // Without the option the first failure ends the run.
    let cfg = OnlineConfig {
        skip_failed_episodes: false,
        ..cfg
    };
    let mut policy = two_step_policy();
    let mut run = OnlineLoop::new(&FlakyFlow, cfg).expect("loop");
    let err = run
        .run(stream, &mut policy.clone(), &mut policy, None)
        .expect_err("a failure ends the run");
    assert!(err.to_string().contains("flaky"), "{err}");
}
