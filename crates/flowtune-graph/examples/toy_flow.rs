//! A toy research flow with a loop: prompts from `prompts/toy/`, a canned backend, its trace as
//! JSON and the flow and trace as DOT and Mermaid.
//!
//! Run: `cargo run -p flowtune-graph --example toy_flow`
use std::rc::Rc;

use flowtune_graph::{
    flow_to_dot, flow_to_mermaid, join_all, run_episode, trace_to_dot, trace_to_mermaid, Backend,
    BoxError, CallSpec, Candidate, Edge, EpisodeContext, EpisodeSetup, Flow, FlowSpec, NodeId,
    NodeRequest, NodeResponse, NodeSpec, NodeTable, PromptSet, ReplayPlan, Result,
};
use serde_json::json;

struct Research {
    prompts: PromptSet,
}

impl Flow for Research {
    type Input = String;
    type Output = Vec<String>;

    fn spec(&self) -> FlowSpec {
        FlowSpec {
            name: "toy".into(),
            nodes: vec![
                NodeSpec::generate("plan", 16),
                NodeSpec::tool("search"),
                NodeSpec::classify("check", &["Yes", "No"]),
            ],
            edges: vec![
                Edge::new("plan", "search", None),
                Edge::new("search", "check", Some("each passage")),
                Edge::new("check", "plan", Some("< 2 notes")),
            ],
        }
    }

    async fn run(&self, cx: &EpisodeContext, question: &String) -> Result<Vec<String>> {
        let mut notes: Vec<String> = Vec::new();
        for _round in 0..3 {
            let msgs = self
                .prompts
                .render("plan", json!({"question": question, "notes": notes}))?;
            let query = cx.generate("plan", msgs).await?;
            let passages: Vec<String> =
                cx.tool("search", &query.text().to_owned(), |q: &String| {
                    Ok::<_, BoxError>(vec![
                        format!("{q} was built in 1889."),
                        format!("{q} is in Paris."),
                    ])
                })?;
            let checks = join_all(passages.iter().map(|p| {
                let msgs = self
                    .prompts
                    .render("check", json!({"question": question, "passage": p}));
                async move { cx.classify("check", msgs?).await }
            }))
            .await;
            for (p, c) in passages.iter().zip(checks) {
                if c?.choice() == 0 {
                    notes.push(p.clone());
                }
            }
            if notes.len() >= 2 {
                break;
            }
        }
        cx.reward("notes", notes.len() as f64);
        Ok(notes)
    }
}

/// Answers "the Eiffel Tower" to every query; says Yes to passages mentioning 1889.
struct Canned;

impl Backend for Canned {
    fn run_batch(
        &mut self,
        requests: &[NodeRequest],
    ) -> std::result::Result<Vec<NodeResponse>, BoxError> {
        Ok(requests
            .iter()
            .map(|r| {
                let prompt: String = r.messages.iter().map(|m| m.content.as_str()).collect();
                let outputs = match &r.call {
                    CallSpec::Classify { labels } => {
                        let yes = prompt.contains("1889");
                        labels
                            .iter()
                            .enumerate()
                            .map(|(i, l)| Candidate {
                                ids: l.bytes().map(u32::from).collect(),
                                text: l.clone(),
                                logprob: if (i == 0) == yes { -0.1 } else { -2.3 },
                            })
                            .collect()
                    }
                    _ => vec![Candidate {
                        ids: vec![1, 2, 3],
                        text: "the Eiffel Tower".into(),
                        logprob: -0.5,
                    }],
                };
                NodeResponse {
                    prompt_ids: prompt.bytes().map(u32::from).collect(),
                    outputs,
                }
            })
            .collect())
    }

    fn tokenize(
        &mut self,
        _node: &NodeId,
        texts: &[String],
    ) -> std::result::Result<Vec<Vec<u32>>, BoxError> {
        Ok(texts
            .iter()
            .map(|t| t.bytes().map(u32::from).collect())
            .collect())
    }
}

fn main() -> std::result::Result<(), BoxError> {
    let root = std::env::var("FLOWTUNE_ROOT")
        .map_err(|_| "FLOWTUNE_ROOT is not set: run through cargo")?;
    let flow = Research {
        prompts: PromptSet::load_flow(&root, "toy")?,
    };
    let setup = EpisodeSetup {
        nodes: Rc::new(NodeTable::new(&flow.spec())?),
        episode: 0,
        seed: 42,
        replay: ReplayPlan::live(),
    };
    let outcome = run_episode(
        &flow,
        &"When was the Eiffel Tower built?".to_owned(),
        setup,
        &mut Canned,
    )?;
    println!("output: {:?}\n", outcome.output);
    println!(
        "trace (JSON):\n{}\n",
        serde_json::to_string_pretty(&outcome.trace)?
    );
    let spec = flow.spec();
    println!("flow (DOT):\n{}", flow_to_dot(&spec, &spec.edges));
    println!("flow (Mermaid):\n{}", flow_to_mermaid(&spec, &spec.edges));
    println!("trace (DOT):\n{}", trace_to_dot(&outcome.trace));
    println!("trace (Mermaid):\n{}", trace_to_mermaid(&outcome.trace));
    Ok(())
}
