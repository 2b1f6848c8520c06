//! DOT / Mermaid export and JSONL round trips of traces and flow specs.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::rc::Rc;

use common::{HashBackend, LoopFlow};
use flowtune_graph::io::{read_jsonl, write_jsonl};
use flowtune_graph::{
    flow_to_dot, flow_to_mermaid, observed_edges, run_episode, trace_to_dot, trace_to_mermaid,
    EpisodeSetup, Flow, FlowSpec, NodeTable, ReplayPlan, Trace,
};

fn traces(n: u64) -> Vec<Trace> {
    let nodes = Rc::new(NodeTable::new(&LoopFlow.spec()).expect("spec"));
    (0..n)
        .map(|i| {
            let setup = EpisodeSetup {
                nodes: nodes.clone(),
                episode: i,
                seed: i,
                replay: ReplayPlan::live(),
            };
            run_episode(&LoopFlow, &format!("q{i}"), setup, &mut HashBackend::new(i))
                .expect("run")
                .trace
        })
        .collect()
}

#[test]
fn traces_round_trip_through_jsonl() {
    let traces = traces(5);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("traces.jsonl");
    write_jsonl(&path, &traces).expect("write");
    let back: Vec<Trace> = read_jsonl(&path).expect("read");
    assert_eq!(back, traces);
    // No temp file left behind.
    assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 1);
    // A corrupt line is reported with its line number.
    let mut text = std::fs::read_to_string(&path).expect("read");
    text.push_str("{not json}\n");
    std::fs::write(&path, text).expect("write");
    match read_jsonl::<Trace>(&path) {
        Err(flowtune_graph::Error::Json { line, .. }) => assert_eq!(line, 6),
        other => panic!("expected a JSON error, got {other:?}"),
    }
}

#[test]
fn flow_spec_round_trips() {
    let spec = LoopFlow.spec();
    let json = serde_json::to_string(&spec).expect("ser");
    assert_eq!(serde_json::from_str::<FlowSpec>(&json).expect("de"), spec);
}

fn balanced(s: &str) -> bool {
    let mut depth = 0i64;
    for c in s.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            _ => {}
        }
        if depth < 0 {
            return false;
        }
    }
    depth == 0
}

#[test]
fn flow_exports_list_every_node_and_edge() {
    let spec = LoopFlow.spec();
    let dot = flow_to_dot(&spec, &spec.edges);
    assert!(dot.starts_with("digraph \"toy\" {"));
    for n in &spec.nodes {
        assert_eq!(
            dot.matches(&format!("  \"{}\" [shape=", n.id)).count(),
            1,
            "{dot}"
        );
    }
    for e in &spec.edges {
        assert!(
            dot.contains(&format!("\"{}\" -> \"{}\"", e.from, e.to)),
            "{dot}"
        );
    }
    let mermaid = flow_to_mermaid(&spec, &spec.edges);
    assert!(mermaid.starts_with("flowchart TD\n"));
    assert_eq!(
        mermaid.lines().filter(|l| l.contains("-->")).count(),
        spec.edges.len()
    );
    // Observed edges: every consecutive pair of node steps in the traces, with counts.
    let traces = traces(4);
    let observed = observed_edges(&traces);
    let total: usize = observed
        .iter()
        .map(|e| {
            e.label
                .as_deref()
                .and_then(|l| l.strip_prefix('×'))
                .and_then(|n| n.parse::<usize>().ok())
                .expect("count label")
        })
        .sum();
    let expected: usize = traces
        .iter()
        .map(|t| t.steps.iter().filter(|s| s.event.node().is_some()).count() - 1)
        .sum();
    assert_eq!(total, expected);
    assert!(observed
        .iter()
        .any(|e| e.from.as_str() == "plan" && e.to.as_str() == "search"));
}

#[test]
fn trace_exports_have_one_vertex_per_step() {
    let trace = &traces(1)[0];
    let dot = trace_to_dot(trace);
    assert!(balanced(&dot));
    for s in &trace.steps {
        assert!(dot.contains(&format!("  s{} [shape=", s.index)));
    }
    assert_eq!(dot.matches(" -> s").count(), trace.steps.len() - 1);
    assert!(dot.contains("label=\"reward = "));
    let mermaid = trace_to_mermaid(trace);
    assert_eq!(mermaid.matches(" --> s").count(), trace.steps.len() - 1);
    assert!(!mermaid.contains("\"\"\""));
}
