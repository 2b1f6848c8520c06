//! Tensor-free backends shared by the flow and app tests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(dead_code)]
use std::collections::HashMap;

use flowtune_graph::{Backend, BoxError, CallSpec, Candidate, NodeId, NodeRequest, NodeResponse};
use musique::data::Record;
use musique::flow::nodes;

pub fn ids(text: &str) -> Vec<u32> {
    text.bytes().map(u32::from).collect()
}

fn candidate(text: &str, logprob: f64) -> Candidate {
    Candidate {
        ids: ids(text),
        text: text.to_string(),
        logprob,
    }
}

/// An oracle that knows the records (looked up by question): relevance Yes exactly for
/// supporting paragraphs, stop Yes once all support is shown, sufficiency Yes when the
/// answerable twin's support is all shown, verbose "The answer is X.", concise copies X.
/// With `contrarian`, stop always says No and relevance prefers distractors.
pub struct Oracle {
    pub by_question: HashMap<String, Vec<Record>>,
    pub contrarian: bool,
    pub calls: Vec<NodeRequest>,
}

impl Oracle {
    pub fn new(records: &[Record], contrarian: bool) -> Self {
        let mut by_question: HashMap<String, Vec<Record>> = HashMap::new();
        for r in records {
            by_question
                .entry(r.question.clone())
                .or_default()
                .push(r.clone());
        }
        Oracle {
            by_question,
            contrarian,
            calls: Vec::new(),
        }
    }

    fn respond(&self, request: &NodeRequest) -> Result<NodeResponse, BoxError> {
        let text: String = request
            .messages
            .iter()
            .map(|m| m.content.clone())
            .collect::<Vec<_>>()
            .join("\n");
        let question = text
            .lines()
            .find_map(|l| l.strip_prefix("Question: "))
            .ok_or("oracle: prompt has no `Question:` line")?
            .to_string();
        let records = self
            .by_question
            .get(&question)
            .ok_or("oracle: unknown question")?;
        let answerable = records
            .iter()
            .find(|r| r.answerable)
            .ok_or("oracle: no answerable twin")?;
        let support: Vec<&str> = answerable
            .paragraphs
            .iter()
            .filter(|p| p.is_supporting)
            .map(|p| p.paragraph_text.as_str())
            .collect();
        let yes_no = |yes: bool| {
            let (y, n) = if yes {
                (0.9f64.ln(), 0.1f64.ln())
            } else {
                (0.1f64.ln(), 0.9f64.ln())
            };
            vec![candidate("Yes", y), candidate("No", n)]
        };
        let outputs = match (request.node.as_str(), &request.call) {
            (nodes::RELEVANCE, CallSpec::Classify { .. }) => {
                let para = text
                    .lines()
                    .find_map(|l| l.strip_prefix("Paragraph: "))
                    .ok_or("no paragraph")?;
                let relevant = support.iter().any(|s| para.ends_with(s));
                yes_no(relevant != self.contrarian)
            }
            (nodes::STOP, CallSpec::Classify { .. }) => {
                yes_no(!self.contrarian && support.iter().all(|s| text.contains(s)))
            }
            (nodes::SUFFICIENCY, CallSpec::Classify { .. }) => {
                yes_no(support.iter().all(|s| text.contains(s)))
            }
            (
                nodes::QUERY,
                CallSpec::Generate {
                    num_return_sequences,
                    ..
                },
            ) => (0..*num_return_sequences)
                .map(|k| candidate(&format!("query {k}"), -(k as f64) - 1.0))
                .collect(),
            (
                nodes::VERBOSE,
                CallSpec::Generate {
                    num_return_sequences,
                    ..
                },
            ) => {
                let options = [
                    format!("The answer is {}.", answerable.answer),
                    "The answer is unknown.".to_string(),
                ];
                (0..*num_return_sequences)
                    .map(|k| candidate(&options[k.min(1)], -(k as f64) - 1.0))
                    .collect()
            }
            (nodes::CONCISE, CallSpec::Generate { .. }) => {
                let reasoning = text
                    .lines()
                    .find_map(|l| l.strip_prefix("Reasoning: "))
                    .ok_or("no reasoning")?;
                let answer = reasoning
                    .strip_prefix("The answer is ")
                    .and_then(|a| a.strip_suffix('.'))
                    .unwrap_or("?");
                vec![candidate(&format!("{answer}\n"), -0.5)]
            }
            (node, call) => {
                return Err(format!("oracle: unexpected {} call to {node}", call.name()).into())
            }
        };
        Ok(NodeResponse {
            prompt_ids: ids(&text),
            outputs,
        })
    }
}

impl Backend for Oracle {
    fn run_batch(&mut self, requests: &[NodeRequest]) -> Result<Vec<NodeResponse>, BoxError> {
        self.calls.extend(requests.iter().cloned());
        requests.iter().map(|r| self.respond(r)).collect()
    }
    fn tokenize(&mut self, _node: &NodeId, texts: &[String]) -> Result<Vec<Vec<u32>>, BoxError> {
        Ok(texts.iter().map(|t| ids(t)).collect())
    }
}

/// A backend that must never be called (full replays).
pub struct Refuse;
impl Backend for Refuse {
    fn run_batch(&mut self, _: &[NodeRequest]) -> Result<Vec<NodeResponse>, BoxError> {
        Err("a forced replay called the backend".into())
    }
    fn tokenize(&mut self, _: &NodeId, _: &[String]) -> Result<Vec<Vec<u32>>, BoxError> {
        Err("a forced replay tokenized".into())
    }
}
