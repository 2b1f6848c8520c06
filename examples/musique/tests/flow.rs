//! The MuSiQue flows with tensor-free backends: an oracle policy retrieves the gold support and
//! answers with F1 1; retrieval is capped; replay is exact; credit assignment with the paper's
//! routing yields the expected supervision and preferences.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use std::rc::Rc;

mod common;

use common::{Oracle, Refuse};
use flowtune_graph::{
    run_episode, Backend, BoxError, EpisodeSetup, Flow, Message, NodeId, NodeRequest, NodeResponse,
    NodeTable, ReplayPlan,
};
use flowtune_rollout::{EpisodeJob, Feedback, Scheduler};
use musique::data::Record;
use musique::flow::{
    credit_config, default_prompt_dir, ground_answer, nodes, pairwise_sufficiency, rewards,
    FlowOptions, FlowOutput, MusiqueFlow, Variant,
};
use musique::metrics::{evaluate, Prediction};
use musique::synth::{generate, SynthConfig};

fn flow(variant: Variant) -> MusiqueFlow {
    let dir = default_prompt_dir();
    assert!(dir.is_dir(), "prompt folder {} is missing", dir.display());
    MusiqueFlow::from_prompt_dir(
        FlowOptions {
            variant,
            ..FlowOptions::default()
        },
        &dir,
    )
    .unwrap()
}

fn setup(flow: &MusiqueFlow, episode: u64, replay: ReplayPlan) -> EpisodeSetup {
    EpisodeSetup {
        nodes: Rc::new(NodeTable::new(&flow.spec()).unwrap()),
        episode,
        seed: 11,
        replay,
    }
}

fn run_all(
    flow: &MusiqueFlow,
    records: &[Record],
    backend: &mut Oracle,
) -> Vec<(FlowOutput, flowtune_graph::Trace)> {
    records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let out =
                run_episode(flow, r, setup(flow, i as u64, ReplayPlan::live()), backend).unwrap();
            (out.output.unwrap(), out.trace)
        })
        .collect()
}

#[test]
fn oracle_retrieves_the_support_and_answers_exactly() {
    let records = generate(&SynthConfig {
        seed: 21,
        questions: 40,
        ..SynthConfig::default()
    })
    .unwrap();
    let flow = flow(Variant::Answerable);
    let mut oracle = Oracle::new(&records, false);
    let runs = run_all(&flow, &records, &mut oracle);
    let predictions: Vec<Prediction> = runs.iter().map(|(o, _)| o.prediction.clone()).collect();
    let m = evaluate(&records, &predictions).unwrap();
    assert_eq!((m.answer_f1, m.answer_em, m.support_f1), (1.0, 1.0, 1.0));
    for ((out, trace), r) in runs.iter().zip(&records) {
        assert_eq!(
            out.retrieved.len(),
            r.hops().unwrap(),
            "{}: one retrieval per hop",
            r.id
        );
        let rewards = trace.final_rewards();
        assert_eq!(rewards[rewards::SUPPORT_F1], 1.0);
        assert_eq!(rewards[rewards::ANSWER_F1], 1.0);
        // Supervision: a label for every relevance and stop call, the gold answer for concise.
        let calls: Vec<&str> = trace
            .steps
            .iter()
            .filter_map(|s| match &s.event {
                flowtune_graph::Event::Call(c) => Some(c.node.as_str()),
                _ => None,
            })
            .collect();
        let labelled = calls
            .iter()
            .filter(|n| **n == nodes::RELEVANCE || **n == nodes::STOP)
            .count();
        let targets = trace
            .gold
            .iter()
            .filter(|g| matches!(g.gold, flowtune_graph::Gold::Target { .. }))
            .count();
        assert_eq!(trace.gold.len(), labelled + targets);
        assert_eq!(targets, 1);
        // Relevance scores every unused paragraph each round: 6 + 5 (+ 4 + 3).
        let relevance = calls.iter().filter(|n| **n == nodes::RELEVANCE).count();
        let h = r.hops().unwrap();
        assert_eq!(
            relevance,
            (0..h).map(|k| r.paragraphs.len() - k).sum::<usize>()
        );
        assert!(!calls.contains(&nodes::SUFFICIENCY));
    }
    // Relevance calls of a round reach the backend in one batch.
    assert!(oracle
        .calls
        .windows(2)
        .any(|w| w[0].node.as_str() == nodes::RELEVANCE && w[1].node.as_str() == nodes::RELEVANCE));
}

#[test]
fn relevance_calls_of_a_round_are_batched() {
    let records = generate(&SynthConfig {
        seed: 2,
        questions: 1,
        ..SynthConfig::default()
    })
    .unwrap();
    let flow = flow(Variant::Answerable);
    struct Counting(Oracle, Vec<usize>);
    impl Backend for Counting {
        fn run_batch(&mut self, r: &[NodeRequest]) -> Result<Vec<NodeResponse>, BoxError> {
            self.1.push(r.len());
            self.0.run_batch(r)
        }
        fn tokenize(&mut self, n: &NodeId, t: &[String]) -> Result<Vec<Vec<u32>>, BoxError> {
            self.0.tokenize(n, t)
        }
    }
    let mut b = Counting(Oracle::new(&records, false), Vec::new());
    run_episode(
        &flow,
        &records[0],
        setup(&flow, 0, ReplayPlan::live()),
        &mut b,
    )
    .unwrap();
    // First round: query (1), then all 6 relevance calls at once.
    assert_eq!(&b.1[..2], &[1, 6]);
}

#[test]
fn full_flow_predicts_answerability() {
    let records = generate(&SynthConfig {
        seed: 4,
        questions: 20,
        unanswerable_twins: true,
        ..SynthConfig::default()
    })
    .unwrap();
    let flow = flow(Variant::Full);
    let mut oracle = Oracle::new(&records, false);
    let runs = run_all(&flow, &records, &mut oracle);
    let predictions: Vec<Prediction> = runs.iter().map(|(o, _)| o.prediction.clone()).collect();
    let m = evaluate(&records, &predictions).unwrap();
    let full = m.full.unwrap();
    assert_eq!(full.sufficiency_accuracy, 1.0);
    assert_eq!(full.complete_pairs, 20);
    assert_eq!(full.group_answer_sufficiency_f1, Some(1.0));
    assert_eq!(full.group_support_sufficiency_f1, Some(1.0));
    for ((out, trace), r) in runs.iter().zip(&records) {
        assert_eq!(trace.final_rewards()[rewards::SUFFICIENCY], 1.0);
        assert_eq!(
            out.sufficiency_yes_logprob.unwrap() > -std::f64::consts::LN_2,
            r.answerable
        );
        // Unanswerable records report no answer / support reward (official metrics skip them).
        assert_eq!(
            trace.final_rewards().contains_key(rewards::ANSWER_F1),
            r.answerable
        );
    }
}

#[test]
fn retrieval_stops_after_four() {
    let records = generate(&SynthConfig {
        seed: 8,
        questions: 5,
        paragraphs: 8,
        ..SynthConfig::default()
    })
    .unwrap();
    let flow = flow(Variant::Answerable);
    let mut contrarian = Oracle::new(&records, true);
    for (out, trace) in run_all(&flow, &records, &mut contrarian) {
        assert_eq!(out.retrieved.len(), 4);
        let stops = trace
            .steps
            .iter()
            .filter(|s| matches!(&s.event, flowtune_graph::Event::Call(c) if c.node.as_str() == nodes::STOP))
            .count();
        assert_eq!(stops, 3, "no stop call after the last allowed retrieval");
        // Distractors first: support F1 below 1.
        assert!(trace.final_rewards()[rewards::SUPPORT_F1] < 1.0);
    }
}

#[test]
fn replay_is_exact() {
    let records = generate(&SynthConfig {
        seed: 5,
        questions: 6,
        unanswerable_twins: true,
        ..SynthConfig::default()
    })
    .unwrap();
    let flow = flow(Variant::Full);
    let mut oracle = Oracle::new(&records, false);
    for (i, r) in records.iter().enumerate() {
        let live = run_episode(
            &flow,
            r,
            setup(&flow, i as u64, ReplayPlan::live()),
            &mut oracle,
        )
        .unwrap();
        let trace = Rc::new(live.trace.clone());
        let again = run_episode(
            &flow,
            r,
            setup(&flow, i as u64, ReplayPlan::full(trace)),
            &mut Refuse,
        )
        .unwrap();
        assert_eq!(again.output, live.output);
        assert_eq!(again.trace.without_replay_marks(), live.trace);
        assert!(again.trace.steps.iter().all(|s| s.forced));
    }
}

#[test]
fn a_deviated_stop_changes_retrieval_and_stops_at_the_support_reward() {
    let records = generate(&SynthConfig {
        seed: 6,
        questions: 10,
        ..SynthConfig::default()
    })
    .unwrap();
    let flow = flow(Variant::Answerable);
    let mut oracle = Oracle::new(&records, false);
    let r = records.iter().find(|r| r.hops() == Some(2)).unwrap();
    let live = run_episode(&flow, r, setup(&flow, 0, ReplayPlan::live()), &mut oracle).unwrap();
    // The first stop call said No (one of two hops retrieved); force "Yes" instead.
    let (step, call) = live
        .trace
        .steps
        .iter()
        .find_map(|s| match &s.event {
            flowtune_graph::Event::Call(c) if c.node.as_str() == nodes::STOP => {
                Some((s.index, c.clone()))
            }
            _ => None,
        })
        .unwrap();
    assert_eq!(call.output.text, "No");
    let yes = flowtune_graph::Output::from_candidate(&call.alternatives[0], Some(0));
    let plan = ReplayPlan::deviate(
        Rc::new(live.trace.clone()),
        step,
        yes,
        Some(rewards::SUPPORT_F1.into()),
    );
    let rollout = run_episode(&flow, r, setup(&flow, 0, plan), &mut oracle).unwrap();
    assert!(
        rollout.output.is_none() && rollout.trace.stopped_early,
        "stops once support F1 is known"
    );
    let f1 = rollout
        .trace
        .reward_after(rewards::SUPPORT_F1, Some(step))
        .unwrap();
    assert!(
        (f1 - 2.0 / 3.0).abs() < 1e-12,
        "one of two gold paragraphs: F1 2/3, got {f1}"
    );
    assert_eq!(
        &rollout.trace.without_replay_marks().steps[..step],
        &live.trace.steps[..step]
    );
}

#[test]
fn credit_assignment_prefers_the_correct_verbose_answer() {
    let records = generate(&SynthConfig {
        seed: 7,
        questions: 4,
        ..SynthConfig::default()
    })
    .unwrap();
    let flow = flow(Variant::Answerable);
    let mut oracle = Oracle::new(&records, false);
    let mut scheduler = Scheduler::new(&flow, credit_config(Variant::Answerable), 4).unwrap();
    let jobs: Vec<EpisodeJob<'_, Record>> = records
        .iter()
        .enumerate()
        .map(|(i, r)| EpisodeJob {
            episode: i as u64,
            seed: i as u64,
            input: r,
        })
        .collect();
    let (results, _) = scheduler.run(&jobs, &mut oracle, None).unwrap();
    for (res, r) in results.iter().zip(&records) {
        let mut prefs = Vec::new();
        let (mut labels, mut targets) = (0, 0);
        for f in &res.feedback {
            match f {
                Feedback::Preference(p) => prefs.push(p),
                Feedback::Label(l) => {
                    labels += 1;
                    assert!(l.node.as_str() == nodes::RELEVANCE || l.node.as_str() == nodes::STOP);
                }
                Feedback::Target(t) => {
                    targets += 1;
                    assert_eq!(
                        (t.node.as_str(), t.target_text.as_str()),
                        (nodes::CONCISE, r.answer.as_str())
                    );
                }
            }
        }
        assert!(labels > 0);
        assert_eq!(targets, 1);
        // Queries never change what the oracle retrieves: ties, dropped. Verbose: the correct
        // answer beats "unknown" by answer F1 1.
        assert!(
            prefs.iter().all(|p| p.node.as_str() == nodes::VERBOSE),
            "{:?}",
            prefs.iter().map(|p| &p.node).collect::<Vec<_>>()
        );
        assert!(!prefs.is_empty());
        for p in prefs {
            assert_eq!(p.chosen_text, format!("The answer is {}.", r.answer));
            assert_eq!(p.rejected_text, "The answer is unknown.");
            assert_eq!(p.weight, 1.0);
        }
    }
}

#[test]
fn grounding_maps_answers_to_paragraph_spans() {
    let paras = [
        "The capital of Routhairia is Viko. It has a mild climate.",
        "Dramim Studios is a company founded by Baizoul Puzim.",
    ];
    assert_eq!(ground_answer("viko", &paras).as_deref(), Some("Viko"));
    assert_eq!(
        ground_answer("It was Baizoul Puzim", &paras).as_deref(),
        Some("Baizoul Puzim")
    );
    assert_eq!(ground_answer("Puzim", &paras).as_deref(), Some("Puzim"));
    assert_eq!(ground_answer("Nowhere", &paras), None);
    assert_eq!(ground_answer("", &paras), None);
}

#[test]
fn pairwise_inference_makes_exactly_one_twin_answerable() {
    let p = |id: &str, a: bool| Prediction {
        id: id.into(),
        predicted_answer: String::new(),
        predicted_support_idxs: vec![],
        predicted_answerable: a,
    };
    let mut preds = vec![
        p("x", true),
        p("y", true),
        p("x", true),
        p("z", false),
        p("y", true),
    ];
    pairwise_sufficiency(
        &mut preds,
        &[Some(-0.1), Some(-3.0), Some(-0.5), Some(-0.2), Some(-1.0)],
    );
    let got: Vec<bool> = preds.iter().map(|p| p.predicted_answerable).collect();
    assert_eq!(got, vec![true, false, false, false, true]);
}

#[test]
fn flow_spec_and_missing_templates() {
    let full = flow(Variant::Full).spec();
    let ids: Vec<&str> = full.nodes.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            nodes::QUERY,
            nodes::RELEVANCE,
            nodes::STOP,
            nodes::VERBOSE,
            nodes::CONCISE,
            nodes::SUFFICIENCY
        ]
    );
    assert_eq!(flow(Variant::Answerable).spec().nodes.len(), 5);
    let empty = tempfile::tempdir().unwrap();
    assert!(MusiqueFlow::from_prompt_dir(FlowOptions::default(), empty.path()).is_err());
    let _ = Message::user("x");
}
