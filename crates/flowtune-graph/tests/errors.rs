//! Bad input is a typed error: undeclared nodes, wrong call kinds, bad declarations, malformed
//! backend responses.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::rc::Rc;

use common::HashBackend;
use flowtune_graph::{
    run_episode, Backend, BoxError, EpisodeContext, EpisodeSetup, Error, Flow, FlowSpec, Message,
    NodeId, NodeRequest, NodeResponse, NodeSpec, NodeTable, ReplayPlan, Result,
};

/// Calls whatever node its input names, as a classify call.
struct Caller;

impl Flow for Caller {
    type Input = String;
    type Output = usize;

    fn spec(&self) -> FlowSpec {
        FlowSpec {
            name: "caller".into(),
            nodes: vec![
                NodeSpec::generate("gen", 4),
                NodeSpec::classify("cls", &["a", "b"]),
            ],
            edges: vec![],
        }
    }

    async fn run(&self, cx: &EpisodeContext, node: &String) -> Result<usize> {
        Ok(cx.classify(node, vec![Message::user("x")]).await?.choice())
    }
}

fn run(node: &str, backend: &mut dyn Backend) -> Result<usize> {
    let setup = EpisodeSetup {
        nodes: Rc::new(NodeTable::new(&Caller.spec())?),
        episode: 0,
        seed: 0,
        replay: ReplayPlan::live(),
    };
    Ok(run_episode(&Caller, &node.to_owned(), setup, backend)?
        .output
        .expect("finished"))
}

#[test]
fn undeclared_and_wrong_kind_calls_are_errors() {
    let mut backend = HashBackend::new(0);
    assert!(run("cls", &mut backend).is_ok());
    assert!(
        matches!(run("nope", &mut backend), Err(Error::UnknownNode { node, .. }) if node == "nope")
    );
    assert!(matches!(
        run("gen", &mut backend),
        Err(Error::WrongNodeKind {
            declared: "generate",
            called: "classify",
            ..
        })
    ));
}

#[test]
fn bad_declarations_are_rejected() {
    let dup = FlowSpec {
        name: "f".into(),
        nodes: vec![NodeSpec::choose("x"), NodeSpec::tool("x")],
        edges: vec![],
    };
    assert!(matches!(
        NodeTable::new(&dup),
        Err(Error::InvalidNode { .. })
    ));
    let one_label = FlowSpec {
        name: "f".into(),
        nodes: vec![NodeSpec::classify("c", &["only"])],
        edges: vec![],
    };
    assert!(matches!(
        NodeTable::new(&one_label),
        Err(Error::InvalidNode { .. })
    ));
    let no_tokens = FlowSpec {
        name: "f".into(),
        nodes: vec![NodeSpec::generate("g", 0)],
        edges: vec![],
    };
    assert!(matches!(
        NodeTable::new(&no_tokens),
        Err(Error::InvalidNode { .. })
    ));
}

/// Returns one score for a two-label classify call.
struct OneScore;

impl Backend for OneScore {
    fn run_batch(
        &mut self,
        requests: &[NodeRequest],
    ) -> std::result::Result<Vec<NodeResponse>, BoxError> {
        let mut out = HashBackend::new(0).run_batch(requests)?;
        for r in &mut out {
            r.outputs.truncate(1);
        }
        Ok(out)
    }

    fn tokenize(
        &mut self,
        _node: &NodeId,
        _texts: &[String],
    ) -> std::result::Result<Vec<Vec<u32>>, BoxError> {
        Ok(Vec::new())
    }
}

/// Fails every batch.
struct Broken;

impl Backend for Broken {
    fn run_batch(
        &mut self,
        _requests: &[NodeRequest],
    ) -> std::result::Result<Vec<NodeResponse>, BoxError> {
        Err("device lost".into())
    }

    fn tokenize(
        &mut self,
        _node: &NodeId,
        _texts: &[String],
    ) -> std::result::Result<Vec<Vec<u32>>, BoxError> {
        Err("device lost".into())
    }
}

#[test]
fn malformed_or_failed_backend_responses_are_errors() {
    assert!(
        matches!(run("cls", &mut OneScore), Err(Error::BadResponse { node, .. }) if node == "cls")
    );
    match run("cls", &mut Broken) {
        Err(Error::Backend {
            batch_size: 1,
            source,
        }) => assert_eq!(source.to_string(), "device lost"),
        other => panic!("expected a backend error, got {other:?}"),
    }
}
