//! A toy flow with a loop, branches, parallel calls, a tool and random draws, and a toy backend
//! whose answers are a seeded hash of the request.
#![allow(dead_code)]
use std::hash::{DefaultHasher, Hash, Hasher};

use flowtune_graph::{
    join_all, Backend, BoxError, CallSpec, Candidate, Edge, EpisodeContext, Flow, FlowSpec,
    Message, NodeId, NodeRequest, NodeResponse, NodeSpec, Result,
};

/// Answers every request with scores hashed from (seed, request); counts batches.
pub struct HashBackend {
    pub seed: u64,
    pub batches: Vec<usize>,
}

impl HashBackend {
    pub fn new(seed: u64) -> Self {
        HashBackend {
            seed,
            batches: Vec::new(),
        }
    }
}

fn hash_of(seed: u64, value: &impl Hash) -> u64 {
    let mut h = DefaultHasher::new();
    seed.hash(&mut h);
    value.hash(&mut h);
    h.finish()
}

fn score(seed: u64, request: &NodeRequest, option: &str) -> f64 {
    let h = hash_of(seed, &(&request.messages, request.node.as_str(), option));
    -((h % 10_000) as f64) / 1000.0
}

pub fn ids(text: &str) -> Vec<u32> {
    text.bytes().map(u32::from).collect()
}

impl Backend for HashBackend {
    fn run_batch(
        &mut self,
        requests: &[NodeRequest],
    ) -> std::result::Result<Vec<NodeResponse>, BoxError> {
        self.batches.push(requests.len());
        Ok(requests
            .iter()
            .map(|r| {
                let prompt: String = r.messages.iter().map(|m| m.content.clone()).collect();
                let outputs = match &r.call {
                    CallSpec::Classify { labels: options }
                    | CallSpec::Choose {
                        candidates: options,
                    } => options
                        .iter()
                        .map(|o| Candidate {
                            ids: ids(o),
                            text: o.clone(),
                            logprob: score(self.seed, r, o),
                        })
                        .collect(),
                    CallSpec::Generate {
                        num_return_sequences,
                        ..
                    } => (0..*num_return_sequences)
                        .map(|i| {
                            let word = ["alpha", "beta", "gamma", "delta", "eps"]
                                [(hash_of(self.seed, &(&r.messages, i)) % 5) as usize];
                            Candidate {
                                ids: ids(word),
                                text: word.to_owned(),
                                logprob: -(i as f64),
                            }
                        })
                        .collect(),
                };
                NodeResponse {
                    prompt_ids: ids(&prompt),
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
        Ok(texts.iter().map(|t| ids(t)).collect())
    }
}

/// Fails every call: proves a fully forced replay never reaches the backend.
pub struct NoBackend;

impl Backend for NoBackend {
    fn run_batch(
        &mut self,
        requests: &[NodeRequest],
    ) -> std::result::Result<Vec<NodeResponse>, BoxError> {
        Err(format!("NoBackend got {} requests", requests.len()).into())
    }

    fn tokenize(
        &mut self,
        _node: &NodeId,
        _texts: &[String],
    ) -> std::result::Result<Vec<Vec<u32>>, BoxError> {
        Err("NoBackend cannot tokenize".into())
    }
}

/// Research-style flow: a random number of rounds of plan → search (tool) → parallel checks →
/// stop check, then a final choice.
pub struct LoopFlow;

impl Flow for LoopFlow {
    type Input = String;
    type Output = String;

    fn spec(&self) -> FlowSpec {
        FlowSpec {
            name: "toy".into(),
            nodes: vec![
                NodeSpec::generate("plan", 16).describe("writes a search query"),
                NodeSpec::tool("search"),
                NodeSpec::classify("check", &["yes", "no"]),
                NodeSpec::choose("pick"),
            ],
            edges: vec![
                Edge::new("plan", "search", None),
                Edge::new("search", "check", None),
                Edge::new("check", "plan", Some("not done")),
                Edge::new("check", "pick", Some("done")),
            ],
        }
    }

    async fn run(&self, cx: &EpisodeContext, question: &String) -> Result<String> {
        let rounds = 1 + cx.random_below(3)?;
        let mut notes: Vec<String> = Vec::new();
        for round in 0..rounds {
            let query = cx
                .generate(
                    "plan",
                    vec![
                        Message::system("plan"),
                        Message::user(format!("{question} {round} {notes:?}")),
                    ],
                )
                .await?;
            let n_docs = 1 + (query.text().len() % 3);
            let docs: Vec<String> = cx.tool("search", &query.text().to_owned(), |q: &String| {
                Ok::<_, BoxError>((0..n_docs).map(|i| format!("doc {i} on {q}")).collect())
            })?;
            let checks = join_all(
                docs.iter()
                    .map(|d| cx.classify("check", vec![Message::user(d.clone())])),
            )
            .await;
            for (doc, check) in docs.iter().zip(checks) {
                let check = check?;
                if check.choice() == 0 {
                    notes.push(doc.clone());
                    cx.gold_label(&check, 0);
                }
            }
            let stop = cx
                .classify("check", vec![Message::user(format!("stop? {notes:?}"))])
                .await?;
            if stop.choice() == 0 && round > 0 {
                break;
            }
        }
        let coin = cx.random_f64()?;
        let candidates = vec!["left".to_owned(), "middle".to_owned(), "right".to_owned()];
        let pick = cx
            .choose(
                "pick",
                vec![Message::user(format!("{notes:?} {coin}"))],
                candidates,
            )
            .await?;
        cx.reward("reward", pick.choice() as f64);
        Ok(pick.text().to_owned())
    }
}
