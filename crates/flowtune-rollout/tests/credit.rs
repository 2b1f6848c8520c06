//! Credit assignment on toy flows: preferences only where the reward depends on the node, in the
//! right direction with weight |Δr|; gold records; early termination; the evaluator hook.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use common::{AbcFlow, RetrieveThenAnswer, B_REWARD};
use flowtune_graph::{NodeId, Trace};
use flowtune_rollout::toy::TabularPolicy;
use flowtune_rollout::{
    BoxError, CreditConfig, EpisodeJob, EpisodeJudge, Feedback, NodeDeviation, PairMode, Scheduler,
};

fn abc_policy() -> TabularPolicy {
    // Live policy picks a0, b0 (worst reward) and c0.
    TabularPolicy::new(0.5, 1.0)
        .with_init("A", "a0", 1.0)
        .with_init("B", "b0", 1.0)
        .with_init("B", "b1", 0.5)
}

fn all_alternatives() -> NodeDeviation {
    NodeDeviation {
        max_alternatives: 5,
        ..NodeDeviation::default()
    }
}

fn run_abc(pairs: PairMode) -> Vec<Feedback> {
    let credit = CreditConfig {
        pairs,
        default_deviation: all_alternatives(),
        ..CreditConfig::default()
    };
    let mut scheduler = Scheduler::new(&AbcFlow, credit, 4).expect("scheduler");
    let input = "x".to_owned();
    let jobs = [EpisodeJob {
        episode: 0,
        seed: 1,
        input: &input,
    }];
    let mut backend = abc_policy();
    let (results, _) = scheduler.run(&jobs, &mut backend, None).expect("run");
    let r = &results[0];
    // Deviations: A (1 other label), B (2), C (1 next-best candidate).
    assert_eq!(r.accounting.deviation_points, 3);
    assert_eq!(r.accounting.rollouts, 4);
    r.feedback.clone()
}

#[test]
fn reward_depending_only_on_b_gives_preferences_only_for_b() {
    let feedback = run_abc(PairMode::AgainstOriginal);
    let prefs: Vec<_> = feedback
        .iter()
        .filter_map(|f| match f {
            Feedback::Preference(p) => Some(p),
            _ => None,
        })
        .collect();
    assert!(prefs.iter().all(|p| p.node.as_str() == "B"), "{prefs:#?}");
    let mut got: Vec<(String, String, f64)> = prefs
        .iter()
        .map(|p| (p.chosen_text.clone(), p.rejected_text.clone(), p.weight))
        .collect();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    // Golden values: the flow's reward table (same f64 arithmetic; exact comparison).
    assert_eq!(
        got,
        vec![
            ("b1".into(), "b0".into(), B_REWARD[1] - B_REWARD[0]),
            ("b2".into(), "b0".into(), B_REWARD[2] - B_REWARD[0]),
        ]
    );
    for p in &prefs {
        assert_eq!(
            p.chosen,
            p.chosen_text.bytes().map(u32::from).collect::<Vec<_>>()
        );
        assert_eq!(
            p.prompt_ids,
            "user: after a0\n"
                .bytes()
                .map(u32::from)
                .collect::<Vec<_>>()
        );
    }
}

#[test]
fn all_pairs_adds_pairs_between_alternatives_and_drops_ties() {
    let feedback = run_abc(PairMode::AllPairs);
    let mut got: Vec<(String, String, f64)> = feedback
        .iter()
        .filter_map(|f| match f {
            Feedback::Preference(p) => {
                Some((p.chosen_text.clone(), p.rejected_text.clone(), p.weight))
            }
            _ => None,
        })
        .collect();
    got.sort_by_key(|a| (a.0.clone(), a.1.clone()));
    assert_eq!(
        got,
        vec![
            ("b1".into(), "b0".into(), B_REWARD[1] - B_REWARD[0]),
            ("b2".into(), "b0".into(), B_REWARD[2] - B_REWARD[0]),
            ("b2".into(), "b1".into(), B_REWARD[2] - B_REWARD[1]),
        ]
    );
}

#[test]
fn gold_becomes_label_and_target_records() {
    let feedback = run_abc(PairMode::AgainstOriginal);
    let labels: Vec<_> = feedback
        .iter()
        .filter_map(|f| {
            if let Feedback::Label(l) = f {
                Some(l)
            } else {
                None
            }
        })
        .collect();
    let targets: Vec<_> = feedback
        .iter()
        .filter_map(|f| {
            if let Feedback::Target(t) = f {
                Some(t)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(labels.len(), 1);
    assert_eq!(labels[0].node, NodeId::from("B"));
    assert_eq!(labels[0].label, 2);
    assert_eq!(
        labels[0].label_ids,
        vec![vec![98, 48], vec![98, 49], vec![98, 50]]
    );
    assert_eq!(targets.len(), 1);
    assert_eq!(targets[0].node, NodeId::from("C"));
    assert_eq!(targets[0].target, vec![99, 49]);
    // Records round-trip through JSON.
    let json = serde_json::to_string(&feedback).expect("ser");
    assert_eq!(
        serde_json::from_str::<Vec<Feedback>>(&json).expect("de"),
        feedback
    );
}

fn run_retrieval(early: bool) -> (flowtune_rollout::EpisodeResult<String>, Vec<usize>) {
    let credit = CreditConfig {
        early_termination: early,
        default_reward: "answer".into(),
        ..CreditConfig::default()
    }
    .route("R", "support")
    .with_deviation(
        "G",
        NodeDeviation {
            enabled: false,
            ..NodeDeviation::default()
        },
    );
    let mut scheduler = Scheduler::new(&RetrieveThenAnswer, credit, 1).expect("scheduler");
    let input = "q".to_owned();
    let jobs = [EpisodeJob {
        episode: 0,
        seed: 1,
        input: &input,
    }];
    let mut backend = TabularPolicy::new(0.5, 1.0).with_vocab("G", &["g", "gg"]);
    let (mut results, _) = scheduler.run(&jobs, &mut backend, None).expect("run");
    let batches = backend.batch_sizes.borrow().clone();
    (results.remove(0), batches)
}

#[test]
fn early_termination_stops_when_the_routed_reward_is_known() {
    let (r, batches) = run_retrieval(true);
    assert_eq!(r.rollouts.len(), 1);
    let rollout = &r.rollouts[0].trace;
    assert!(rollout.stopped_early);
    // Only the deviated step: no call after the support reward reached the backend.
    assert_eq!(rollout.steps.len(), 1);
    assert_eq!(r.accounting.rollout_calls, 0);
    assert_eq!(r.accounting.stopped_early, 1);
    assert_eq!(
        batches.iter().sum::<usize>(),
        4,
        "main episode only: R + 3 × G"
    );
    // R live picks r0 (tie → first label), deviation r1 has support 1.0: preferred with weight 1.
    let prefs: Vec<_> = r
        .feedback
        .iter()
        .filter_map(|f| {
            if let Feedback::Preference(p) = f {
                Some(p)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(prefs.len(), 1);
    assert_eq!(
        (
            prefs[0].chosen_text.as_str(),
            prefs[0].rejected_text.as_str(),
            prefs[0].weight
        ),
        ("r1", "r0", 1.0)
    );

    let (full, batches) = run_retrieval(false);
    assert!(!full.rollouts[0].trace.stopped_early);
    assert_eq!(full.accounting.rollout_calls, 3);
    assert_eq!(batches.iter().sum::<usize>(), 7);
    assert_eq!(full.feedback.len(), r.feedback.len());
}

/// Prefers the run whose B label is `b1` (a stand-in for an LM judge).
struct LikesB1 {
    calls: usize,
}

impl EpisodeJudge for LikesB1 {
    fn compare(
        &mut self,
        node: &NodeId,
        step: usize,
        a: &Trace,
        b: &Trace,
    ) -> Result<f64, BoxError> {
        self.calls += 1;
        assert_eq!(node.as_str(), "B");
        let label = |t: &Trace| {
            t.steps.iter().find_map(|s| match &s.event {
                flowtune_graph::Event::Call(c) if c.node.as_str() == "B" => {
                    Some(c.output.text.clone())
                }
                _ => None,
            })
        };
        assert!(step < a.steps.len() && step < b.steps.len());
        let score = |t: &Trace| {
            if label(t).as_deref() == Some("b1") {
                1.0
            } else {
                0.0
            }
        };
        Ok(score(b) - score(a))
    }
}

#[test]
fn evaluator_hook_replaces_rewards() {
    let credit = CreditConfig {
        default_deviation: all_alternatives(),
        ..CreditConfig::default()
    }
    .with_deviation(
        "A",
        NodeDeviation {
            enabled: false,
            ..NodeDeviation::default()
        },
    )
    .with_deviation(
        "C",
        NodeDeviation {
            enabled: false,
            ..NodeDeviation::default()
        },
    );
    let mut scheduler = Scheduler::new(&AbcFlow, credit, 1).expect("scheduler");
    let input = "x".to_owned();
    let jobs = [EpisodeJob {
        episode: 0,
        seed: 1,
        input: &input,
    }];
    let mut judge = LikesB1 { calls: 0 };
    let (results, _) = scheduler
        .run(&jobs, &mut abc_policy(), Some(&mut judge))
        .expect("run");
    assert_eq!(judge.calls, 2);
    let prefs: Vec<_> = results[0]
        .feedback
        .iter()
        .filter_map(|f| {
            if let Feedback::Preference(p) = f {
                Some((p.chosen_text.clone(), p.rejected_text.clone(), p.weight))
            } else {
                None
            }
        })
        .collect();
    assert_eq!(prefs, vec![("b1".to_owned(), "b0".to_owned(), 1.0)]);
    // Judged rollouts run to the end (no routed reward to stop on).
    assert!(results[0]
        .rollouts
        .iter()
        .all(|r| !r.trace.stopped_early && r.trace.steps.len() == 3));
}
