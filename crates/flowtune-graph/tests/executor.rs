//! The executor sends all requests in flight as one batch and fails loudly instead of hanging.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::rc::Rc;

use common::{HashBackend, LoopFlow};
use flowtune_graph::{
    play, Backend, BoxError, EpisodeSetup, Error, Executor, Flow, NodeId, NodeRequest,
    NodeResponse, NodeTable, ReplayPlan,
};

#[test]
fn concurrent_episodes_share_batches() {
    let nodes = Rc::new(NodeTable::new(&LoopFlow.spec()).expect("spec"));
    let inputs: Vec<String> = (0..16).map(|i| format!("q{i}")).collect();
    let mut exec = Executor::new();
    for (i, q) in inputs.iter().enumerate() {
        let setup = EpisodeSetup {
            nodes: nodes.clone(),
            episode: i as u64,
            seed: i as u64,
            replay: ReplayPlan::live(),
        };
        exec.spawn(play(&LoopFlow, q, setup, exec.dispatcher()));
    }
    let mut backend = HashBackend::new(5);
    let done = exec.run(&mut backend).expect("run");
    assert_eq!(done.len(), 16);
    let calls: usize = done
        .iter()
        .map(|(_, o)| o.as_ref().expect("ok").trace.live_calls().count())
        .sum();
    let stats = exec.stats();
    assert_eq!(stats.requests as usize, calls);
    assert_eq!(backend.batches.iter().sum::<usize>(), calls);
    // The first batch is every episode's first call.
    assert_eq!(backend.batches[0], 16);
    // Each episode run alone gives the same trace (batching changes nothing).
    for (i, q) in inputs.iter().enumerate() {
        let setup = EpisodeSetup {
            nodes: nodes.clone(),
            episode: i as u64,
            seed: i as u64,
            replay: ReplayPlan::live(),
        };
        let alone = flowtune_graph::run_episode(&LoopFlow, q, setup, &mut HashBackend::new(5))
            .expect("alone");
        let together = done
            .iter()
            .find(|(id, _)| *id == i as u64)
            .expect("task")
            .1
            .as_ref()
            .expect("ok");
        assert_eq!(
            alone.trace.without_replay_marks().steps.len(),
            together.trace.steps.len()
        );
        let strip = |t: &flowtune_graph::Trace| {
            let mut t = t.clone();
            for s in &mut t.steps {
                s.wall_us = 0;
            }
            t
        };
        assert_eq!(strip(&alone.trace), strip(&together.trace));
    }
}

struct ShortBackend;
impl Backend for ShortBackend {
    fn run_batch(&mut self, _r: &[NodeRequest]) -> Result<Vec<NodeResponse>, BoxError> {
        Ok(Vec::new())
    }
    fn tokenize(&mut self, _n: &NodeId, _t: &[String]) -> Result<Vec<Vec<u32>>, BoxError> {
        Ok(Vec::new())
    }
}

#[test]
fn wrong_response_count_is_an_error() {
    let nodes = Rc::new(NodeTable::new(&LoopFlow.spec()).expect("spec"));
    let setup = EpisodeSetup {
        nodes,
        episode: 0,
        seed: 0,
        replay: ReplayPlan::live(),
    };
    let err = flowtune_graph::run_episode(&LoopFlow, &"q".to_owned(), setup, &mut ShortBackend)
        .expect_err("short");
    assert!(
        matches!(
            err,
            Error::BackendResponseCount {
                expected: 1,
                got: 0
            }
        ),
        "{err}"
    );
}

#[test]
fn a_task_waiting_on_nothing_is_reported_as_stalled() {
    let mut exec: Executor<'_, ()> = Executor::new();
    exec.spawn(std::future::pending::<()>());
    let err = exec.step(&mut HashBackend::new(0)).expect_err("stall");
    assert!(matches!(err, Error::Stalled { tasks: 1 }), "{err}");
}
