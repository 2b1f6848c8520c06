//! DOT (Graphviz) and Mermaid export of flows and traces.
use std::collections::BTreeMap;
use std::fmt::Write;

use crate::node::{Edge, FlowSpec, NodeKind};
use crate::trace::{Event, Trace};

fn dot_escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn mermaid_escape(s: &str) -> String {
    s.replace('"', "#quot;").replace('\n', " ")
}

/// A mermaid-safe identifier for a node id (non-alphanumerics become `_`, plus a stable suffix
/// index so distinct ids never collide).
fn mermaid_id(prefix: &str, index: usize) -> String {
    format!("{prefix}{index}")
}

fn shorten(s: &str, max: usize) -> String {
    let s = s.trim();
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(max).collect();
        t.push('…');
        t
    }
}

fn dot_shape(kind: &NodeKind) -> &'static str {
    match kind {
        NodeKind::Generate { .. } => "box",
        NodeKind::Classify { .. } => "diamond",
        NodeKind::Choose => "hexagon",
        NodeKind::Tool => "cylinder",
    }
}

fn node_label(kind: &NodeKind, id: &str) -> String {
    match kind {
        NodeKind::Classify { labels } => format!("{id}\nclassify: {}", labels.join(" | ")),
        k => format!("{id}\n{}", k.name()),
    }
}

/// Transitions observed in traces (consecutive node and tool steps), labelled with their counts.
pub fn observed_edges(traces: &[Trace]) -> Vec<Edge> {
    let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
    for trace in traces {
        let nodes: Vec<&str> = trace
            .steps
            .iter()
            .filter_map(|s| s.event.node())
            .map(|n| n.as_str())
            .collect();
        for pair in nodes.windows(2) {
            *counts
                .entry((pair[0].to_owned(), pair[1].to_owned()))
                .or_default() += 1;
        }
    }
    counts
        .into_iter()
        .map(|((from, to), n)| Edge::new(&from, &to, Some(&format!("×{n}"))))
        .collect()
}

/// The flow's declared nodes and `edges` (declared ones, or [`observed_edges`]) as DOT.
pub fn flow_to_dot(spec: &FlowSpec, edges: &[Edge]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "digraph \"{}\" {{", dot_escape(&spec.name));
    let _ = writeln!(out, "  rankdir=TB;");
    for node in &spec.nodes {
        let _ = writeln!(
            out,
            "  \"{}\" [shape={}, label=\"{}\"];",
            dot_escape(node.id.as_str()),
            dot_shape(&node.kind),
            dot_escape(&node_label(&node.kind, node.id.as_str()))
        );
    }
    for e in edges {
        let label = e
            .label
            .as_deref()
            .map(|l| format!(" [label=\"{}\"]", dot_escape(l)))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  \"{}\" -> \"{}\"{};",
            dot_escape(e.from.as_str()),
            dot_escape(e.to.as_str()),
            label
        );
    }
    out.push_str("}\n");
    out
}

/// The flow's declared nodes and `edges` as a Mermaid flowchart.
pub fn flow_to_mermaid(spec: &FlowSpec, edges: &[Edge]) -> String {
    let mut out = String::from("flowchart TD\n");
    let mut ids: BTreeMap<&str, String> = BTreeMap::new();
    for (i, node) in spec.nodes.iter().enumerate() {
        let id = mermaid_id("n", i);
        let label = mermaid_escape(&node_label(&node.kind, node.id.as_str()).replace('\n', ": "));
        let shape = match node.kind {
            NodeKind::Generate { .. } => format!("{id}[\"{label}\"]"),
            NodeKind::Classify { .. } => format!("{id}{{\"{label}\"}}"),
            NodeKind::Choose => format!("{id}{{{{\"{label}\"}}}}"),
            NodeKind::Tool => format!("{id}[(\"{label}\")]"),
        };
        let _ = writeln!(out, "  {shape}");
        ids.insert(node.id.as_str(), id);
    }
    for e in edges {
        let (Some(from), Some(to)) = (ids.get(e.from.as_str()), ids.get(e.to.as_str())) else {
            continue;
        };
        match &e.label {
            Some(l) => {
                let _ = writeln!(out, "  {from} -->|\"{}\"| {to}", mermaid_escape(l));
            }
            None => {
                let _ = writeln!(out, "  {from} --> {to}");
            }
        }
    }
    out
}

fn step_label(event: &Event, index: usize) -> String {
    match event {
        Event::Call(c) => format!(
            "#{index} {}{}\n→ {}",
            c.node,
            if c.deviated { " (deviated)" } else { "" },
            shorten(&c.output.text, 40)
        ),
        Event::Tool(t) => format!(
            "#{index} tool {}\n→ {}",
            t.tool,
            shorten(&t.output.to_string(), 40)
        ),
        Event::Random { value } => format!("#{index} random\n{value:#018x}"),
    }
}

/// One trace as DOT: a chain of steps, rewards as notes after the step they follow.
pub fn trace_to_dot(trace: &Trace) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "digraph \"{} episode {}\" {{",
        dot_escape(&trace.flow),
        trace.episode
    );
    for step in &trace.steps {
        let style = match (&step.event, step.forced) {
            (Event::Call(c), _) if c.deviated => ", style=bold, color=red",
            (_, true) => ", style=dashed",
            _ => "",
        };
        let shape = match step.event {
            Event::Call(_) => "box",
            Event::Tool(_) => "cylinder",
            Event::Random { .. } => "ellipse",
        };
        let _ = writeln!(
            out,
            "  s{} [shape={shape}{style}, label=\"{}\"];",
            step.index,
            dot_escape(&step_label(&step.event, step.index))
        );
    }
    for pair in trace.steps.windows(2) {
        let _ = writeln!(out, "  s{} -> s{};", pair[0].index, pair[1].index);
    }
    for (i, r) in trace.rewards.iter().enumerate() {
        let _ = writeln!(
            out,
            "  r{i} [shape=note, label=\"{} = {}\"];",
            dot_escape(&r.name),
            r.value
        );
        if let Some(step) = r
            .after_steps
            .checked_sub(1)
            .and_then(|s| trace.steps.get(s))
        {
            let _ = writeln!(out, "  s{} -> r{i} [style=dotted];", step.index);
        }
    }
    out.push_str("}\n");
    out
}

/// One trace as a Mermaid flowchart.
pub fn trace_to_mermaid(trace: &Trace) -> String {
    let mut out = String::from("flowchart TD\n");
    for step in &trace.steps {
        let label = mermaid_escape(&step_label(&step.event, step.index).replace('\n', " "));
        let _ = writeln!(out, "  s{}[\"{label}\"]", step.index);
    }
    for pair in trace.steps.windows(2) {
        let _ = writeln!(out, "  s{} --> s{}", pair[0].index, pair[1].index);
    }
    for (i, r) in trace.rewards.iter().enumerate() {
        let _ = writeln!(out, "  r{i}>\"{} = {}\"]", mermaid_escape(&r.name), r.value);
        if let Some(step) = r
            .after_steps
            .checked_sub(1)
            .and_then(|s| trace.steps.get(s))
        {
            let _ = writeln!(out, "  s{} -.-> r{i}", step.index);
        }
    }
    out
}
