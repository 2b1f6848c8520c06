//! Deviation strategies per node kind and call selection.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use common::UniformFlow;
use flowtune_graph::{CallSpec, Event};
use flowtune_rollout::toy::TabularPolicy;
use flowtune_rollout::{
    CallSelection, CreditConfig, EpisodeJob, EpisodeResult, GenerateAlternatives, NodeDeviation,
    Scheduler,
};

fn run(deviation: NodeDeviation, seed: u64) -> (EpisodeResult<()>, Vec<usize>) {
    let credit = CreditConfig {
        default_deviation: deviation,
        early_termination: false,
        ..CreditConfig::default()
    };
    let mut scheduler = Scheduler::new(&UniformFlow, credit, 1).expect("scheduler");
    let input = "s".to_owned();
    let jobs = [EpisodeJob {
        episode: 0,
        seed,
        input: &input,
    }];
    // Logits w0 > w1 > w2 > w3: greedy is w0, beams return them in this order.
    let mut policy = TabularPolicy::new(0.1, 1.0)
        .with_vocab("step", &["w0", "w1", "w2", "w3"])
        .with_init("step", "w0", 3.0)
        .with_init("step", "w1", 2.0)
        .with_init("step", "w2", 1.0);
    let (mut results, _) = scheduler.run(&jobs, &mut policy, None).expect("run");
    let sizes = policy.batch_sizes.borrow().clone();
    (results.remove(0), sizes)
}

fn deviated_steps(r: &EpisodeResult<()>) -> Vec<usize> {
    let mut steps: Vec<usize> = r.rollouts.iter().map(|r| r.step).collect();
    steps.dedup();
    steps
}

fn dev(
    calls: CallSelection,
    generate: GenerateAlternatives,
    max_alternatives: usize,
) -> NodeDeviation {
    NodeDeviation {
        enabled: true,
        max_alternatives,
        calls,
        generate,
    }
}

const BEAM: GenerateAlternatives = GenerateAlternatives::DiverseBeam {
    num_beams: 3,
    num_beam_groups: 3,
    diversity_penalty: 1.0,
};

#[test]
fn diverse_beam_alternatives_are_the_distinct_other_beams() {
    let (r, _) = run(dev(CallSelection::All, BEAM, 5), 1);
    assert_eq!(deviated_steps(&r), vec![0, 1, 2, 3, 4]);
    assert_eq!(r.accounting.alternative_calls, 5);
    for rollout in &r.rollouts {
        let call = rollout.trace.call(rollout.step).expect("deviated call");
        assert!(call.deviated);
    }
    // 3 beams: the original (w0) and two others, best first.
    let texts: Vec<String> = r
        .rollouts
        .iter()
        .filter(|x| x.step == 0)
        .map(|x| x.trace.call(0).expect("call").output.text.clone())
        .collect();
    assert_eq!(texts, vec!["w1", "w2"]);
}

#[test]
fn call_selection_picks_the_configured_occurrences() {
    let (first, _) = run(dev(CallSelection::First { n: 2 }, BEAM, 1), 1);
    assert_eq!(deviated_steps(&first), vec![0, 1]);
    let (occ, _) = run(
        dev(
            CallSelection::Occurrences {
                indices: vec![1, 3],
            },
            BEAM,
            1,
        ),
        1,
    );
    assert_eq!(deviated_steps(&occ), vec![1, 3]);
    let (rand_a, _) = run(dev(CallSelection::Random { n: 2 }, BEAM, 1), 5);
    let (rand_b, _) = run(dev(CallSelection::Random { n: 2 }, BEAM, 1), 5);
    assert_eq!(deviated_steps(&rand_a).len(), 2);
    assert_eq!(
        deviated_steps(&rand_a),
        deviated_steps(&rand_b),
        "same seed, same draw"
    );
    // Over several seeds the random selection is not always the same pair.
    let pairs: std::collections::BTreeSet<Vec<usize>> = (0..8)
        .map(|s| deviated_steps(&run(dev(CallSelection::Random { n: 2 }, BEAM, 1), s).0))
        .collect();
    assert!(pairs.len() > 1, "{pairs:?}");
    let (off, _) = run(
        NodeDeviation {
            enabled: false,
            ..NodeDeviation::default()
        },
        1,
    );
    assert!(off.rollouts.is_empty() && off.accounting.alternative_calls == 0);
}

#[test]
fn sampled_alternatives_are_seeded_and_exclude_the_original() {
    let sample = GenerateAlternatives::Sample {
        n: 6,
        temperature: 2.0,
        top_p: 1.0,
        top_k: 0,
    };
    let (a, _) = run(dev(CallSelection::All, sample.clone(), 3), 9);
    let (b, _) = run(dev(CallSelection::All, sample, 3), 9);
    let outs = |r: &EpisodeResult<()>| -> Vec<(usize, String)> {
        r.rollouts
            .iter()
            .map(|x| {
                (
                    x.step,
                    x.trace.call(x.step).expect("call").output.text.clone(),
                )
            })
            .collect()
    };
    assert_eq!(outs(&a), outs(&b));
    for (step, text) in outs(&a) {
        let original = &a.trace.call(step).expect("call").output.text;
        assert_ne!(&text, original);
    }
}

#[test]
fn rollouts_force_the_prefix_and_run_live_after() {
    let (r, sizes) = run(dev(CallSelection::All, BEAM, 1), 1);
    for rollout in &r.rollouts {
        let t = &rollout.trace;
        assert_eq!(t.steps.len(), 5);
        for s in &t.steps[..rollout.step] {
            assert!(s.forced);
            assert_eq!(s.event, r.trace.steps[s.index].event);
        }
        assert!(t.steps[rollout.step + 1..].iter().all(|s| !s.forced));
        assert!(t.steps.iter().all(
            |s| matches!(&s.event, Event::Call(c) if matches!(c.call, CallSpec::Generate { .. }))
        ));
    }
    // main 5 calls + 5 alternative requests + rollouts' live calls 4+3+2+1+0.
    assert_eq!(sizes.iter().sum::<usize>(), 5 + 5 + 10);
    assert_eq!(r.accounting.node_calls(), 20);
    assert_eq!(r.accounting.forced_steps, 1 + 2 + 3 + 4);
}
