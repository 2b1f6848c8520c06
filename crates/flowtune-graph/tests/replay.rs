//! Replay exactness: replaying a trace with every output forced reproduces it bit for bit (without
//! touching the backend), and a one-step deviation keeps the prefix and changes only step k.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::rc::Rc;

use common::{HashBackend, LoopFlow, NoBackend};
use flowtune_graph::{run_episode, EpisodeSetup, Event, Flow, NodeTable, Output, ReplayPlan};
use proptest::prelude::*;

fn setup(seed: u64, replay: ReplayPlan) -> EpisodeSetup {
    EpisodeSetup {
        nodes: Rc::new(NodeTable::new(&LoopFlow.spec()).expect("valid spec")),
        episode: 7,
        seed,
        replay,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn full_replay_reproduces_trace(backend_seed in any::<u64>(), seed in any::<u64>(), q in "[a-z]{1,12}") {
        let live = run_episode(&LoopFlow, &q, setup(seed, ReplayPlan::live()), &mut HashBackend::new(backend_seed)).expect("live run");
        let trace = Rc::new(live.trace.clone());
        let replayed = run_episode(&LoopFlow, &q, setup(seed ^ 1, ReplayPlan::full(trace.clone())), &mut NoBackend).expect("replay");
        prop_assert!(replayed.trace.steps.iter().all(|s| s.forced));
        // The replay ran with another RNG seed on purpose: its draws must come from the record.
        let mut realized = replayed.trace.without_replay_marks();
        prop_assert_eq!(realized.seed, seed ^ 1);
        realized.seed = seed;
        prop_assert_eq!(&realized, &live.trace);
        prop_assert_eq!(replayed.output, live.output);
        // The JSON form is identical too (bit for bit, floats included).
        let a = serde_json::to_string(&realized).expect("json");
        let b = serde_json::to_string(&live.trace).expect("json");
        prop_assert_eq!(a, b);
    }

    #[test]
    fn deviation_keeps_prefix_and_replays_exactly(backend_seed in any::<u64>(), seed in any::<u64>(), pick in any::<prop::sample::Index>()) {
        let q = "question".to_owned();
        let live = run_episode(&LoopFlow, &q, setup(seed, ReplayPlan::live()), &mut HashBackend::new(backend_seed)).expect("live run");
        let calls: Vec<usize> = live.trace.steps.iter().filter(|s| matches!(s.event, Event::Call(_))).map(|s| s.index).collect();
        let k = calls[pick.index(calls.len())];
        let call = live.trace.call(k).expect("a call").clone();
        // Any other option (or a made-up sequence for generate calls).
        let alt = match call.output.choice {
            Some(c) => { let j = (c + 1) % call.alternatives.len(); Output::from_candidate(&call.alternatives[j], Some(j)) }
            None => Output { ids: common::ids("zeta"), text: "zeta".into(), choice: None, logprob: -9.0 },
        };
        let trace = Rc::new(live.trace.clone());
        let dev = run_episode(&LoopFlow, &q, setup(seed, ReplayPlan::deviate(trace, k, alt.clone(), None)), &mut HashBackend::new(backend_seed)).expect("deviated run");
        for i in 0..k {
            prop_assert!(dev.trace.steps[i].forced);
            prop_assert_eq!(&dev.trace.steps[i].event, &live.trace.steps[i].event);
        }
        let dcall = dev.trace.call(k).expect("deviated call");
        prop_assert!(dcall.deviated);
        prop_assert_eq!(&dcall.output, &alt);
        prop_assert_eq!(&dcall.prompt_ids, &call.prompt_ids);
        prop_assert!(dev.trace.steps[k + 1..].iter().all(|s| !s.forced));
        // The deviated trace itself replays exactly.
        let again = run_episode(&LoopFlow, &q, setup(seed, ReplayPlan::full(Rc::new(dev.trace.clone()))), &mut NoBackend).expect("replay of deviation");
        prop_assert_eq!(again.trace.without_replay_marks(), dev.trace.without_replay_marks());
    }
}

#[test]
fn divergent_flow_is_a_typed_error() {
    let q = "question".to_owned();
    let live = run_episode(
        &LoopFlow,
        &q,
        setup(3, ReplayPlan::live()),
        &mut HashBackend::new(1),
    )
    .expect("live run");
    // Replaying on another input changes the first prompt: the replay must refuse, not guess.
    let err = run_episode(
        &LoopFlow,
        &"other".to_owned(),
        setup(3, ReplayPlan::full(Rc::new(live.trace))),
        &mut NoBackend,
    )
    .expect_err("divergence");
    assert!(
        matches!(
            err,
            flowtune_graph::Error::ReplayDivergence { index: 1, .. }
        ),
        "{err}"
    );
}

#[test]
fn deviation_at_a_tool_step_is_rejected() {
    let q = "question".to_owned();
    let live = run_episode(
        &LoopFlow,
        &q,
        setup(3, ReplayPlan::live()),
        &mut HashBackend::new(1),
    )
    .expect("live run");
    let tool_step = live
        .trace
        .steps
        .iter()
        .position(|s| matches!(s.event, Event::Tool(_)))
        .expect("a tool step");
    let alt = Output {
        ids: vec![],
        text: String::new(),
        choice: None,
        logprob: 0.0,
    };
    let err = run_episode(
        &LoopFlow,
        &q,
        setup(
            3,
            ReplayPlan::deviate(Rc::new(live.trace), tool_step, alt, None),
        ),
        &mut NoBackend,
    )
    .expect_err("tool deviation");
    assert!(
        matches!(
            err,
            flowtune_graph::Error::ReplayDivergence { .. }
                | flowtune_graph::Error::InvalidReplay { .. }
        ),
        "{err}"
    );
}
