//! A tensor-free tabular softmax policy: a [`Backend`] and a [`Learner`] over shared logits.
//!
//! For tests, examples and benchmarks. A row is keyed by (node, rendered prompt); each option
//! (label, candidate, or one of a generate node's fixed output texts) has a logit. Token ids are
//! the UTF-8 bytes of the text. Learning is exact gradient steps: weighted sigmoid DPO against the
//! reference logits for preferences, NLL for targets and labels.
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;
use std::rc::Rc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use flowtune_graph::io::write_atomic;
use flowtune_graph::{
    Backend, BoxError, CallSpec, Candidate, Decoding, Message, NodeId, NodeRequest, NodeResponse,
};

use crate::feedback::Feedback;
use crate::learner::{LearnStats, Learner};

/// The table.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TabularState {
    /// Trained logits: row key → option text → logit.
    pub logits: BTreeMap<String, BTreeMap<String, f64>>,
    /// Reference logits, same shape.
    pub reference: BTreeMap<String, BTreeMap<String, f64>>,
    /// Fixed output texts of generate nodes.
    pub vocab: BTreeMap<String, Vec<String>>,
    /// Initial logit of an option of a node (`node` → option → logit); default 0.
    pub init: BTreeMap<String, BTreeMap<String, f64>>,
    /// Learning rate.
    pub lr: f64,
    /// DPO beta.
    pub beta: f64,
}

/// A shared handle to a tabular policy; clone it to use one copy as backend, one as learner.
#[derive(Debug, Clone)]
pub struct TabularPolicy {
    /// The shared table.
    pub state: Rc<RefCell<TabularState>>,
    /// Sizes of the batches served, in order.
    pub batch_sizes: Rc<RefCell<Vec<usize>>>,
}

/// The text of a prompt as the toy tokenizes it (bytes of `role: content` lines).
pub fn prompt_text(messages: &[Message]) -> String {
    messages
        .iter()
        .map(|m| format!("{}: {}\n", m.role, m.content))
        .collect()
}

fn ids(text: &str) -> Vec<u32> {
    text.bytes().map(u32::from).collect()
}

fn text(ids: &[u32]) -> Result<String, BoxError> {
    let bytes: Vec<u8> = ids
        .iter()
        .map(|i| u8::try_from(*i))
        .collect::<Result<_, _>>()
        .map_err(|_| "toy token id above 255")?;
    Ok(String::from_utf8(bytes)?)
}

fn row_key(node: &str, prompt: &str) -> String {
    format!("{node}\u{1f}{prompt}")
}

fn log_softmax(xs: &[f64]) -> Vec<f64> {
    let max = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = max + xs.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
    xs.iter().map(|x| x - lse).collect()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

impl TabularPolicy {
    /// An empty table with learning rate `lr` and DPO `beta`.
    pub fn new(lr: f64, beta: f64) -> Self {
        TabularPolicy {
            state: Rc::new(RefCell::new(TabularState {
                lr,
                beta,
                ..TabularState::default()
            })),
            batch_sizes: Rc::new(RefCell::new(Vec::new())),
        }
    }

    /// Declares the output texts of generate node `node`.
    pub fn with_vocab(self, node: &str, outputs: &[&str]) -> Self {
        self.state.borrow_mut().vocab.insert(
            node.into(),
            outputs.iter().map(|s| (*s).to_owned()).collect(),
        );
        self
    }

    /// Sets the initial logit of `option` at every prompt of `node`.
    pub fn with_init(self, node: &str, option: &str, logit: f64) -> Self {
        self.state
            .borrow_mut()
            .init
            .entry(node.into())
            .or_default()
            .insert(option.into(), logit);
        self
    }

    /// Log-probabilities of `options` at (node, prompt), creating the row if needed.
    fn scores(&self, node: &str, prompt: &str, options: &[String]) -> Vec<f64> {
        let mut guard = self.state.borrow_mut();
        let st = &mut *guard;
        let key = row_key(node, prompt);
        let init: Vec<f64> = options
            .iter()
            .map(|o| {
                st.init
                    .get(node)
                    .and_then(|m| m.get(o))
                    .copied()
                    .unwrap_or(0.0)
            })
            .collect();
        for table in [&mut st.logits, &mut st.reference] {
            let row = table.entry(key.clone()).or_default();
            for (o, v) in options.iter().zip(&init) {
                row.entry(o.clone()).or_insert(*v);
            }
        }
        let row = &st.logits[&key];
        log_softmax(&options.iter().map(|o| row[o]).collect::<Vec<_>>())
    }

    /// The greedy option of `node` at `messages` (for checking what was learned).
    pub fn greedy(&self, node: &str, messages: &[Message], options: &[String]) -> usize {
        let s = self.scores(node, &prompt_text(messages), options);
        (0..s.len()).fold(0, |b, i| if s[i] > s[b] { i } else { b })
    }

    fn answer(&self, request: &NodeRequest) -> Result<NodeResponse, BoxError> {
        let prompt = prompt_text(&request.messages);
        let node = request.node.as_str();
        let cand = |o: &String, lp: f64| Candidate {
            ids: ids(o),
            text: o.clone(),
            logprob: lp,
        };
        let outputs = match &request.call {
            CallSpec::Classify { labels: options }
            | CallSpec::Choose {
                candidates: options,
            } => {
                let s = self.scores(node, &prompt, options);
                options.iter().zip(s).map(|(o, lp)| cand(o, lp)).collect()
            }
            CallSpec::Generate {
                decoding,
                num_return_sequences,
                ..
            } => {
                let vocab = self
                    .state
                    .borrow()
                    .vocab
                    .get(node)
                    .cloned()
                    .ok_or_else(|| {
                        format!("toy policy has no vocabulary for generate node `{node}`")
                    })?;
                let s = self.scores(node, &prompt, &vocab);
                let mut order: Vec<usize> = (0..vocab.len()).collect();
                order.sort_by(|a, b| s[*b].total_cmp(&s[*a]).then(a.cmp(b)));
                match decoding {
                    Decoding::Greedy => vec![cand(&vocab[order[0]], s[order[0]])],
                    Decoding::Beam { .. } | Decoding::DiverseBeam { .. } => order
                        .iter()
                        .take((*num_return_sequences).max(1))
                        .map(|i| cand(&vocab[*i], s[*i]))
                        .collect(),
                    Decoding::Sample {
                        temperature, seed, ..
                    } => {
                        let t = temperature.max(1e-6);
                        let p: Vec<f64> = log_softmax(&s.iter().map(|x| x / t).collect::<Vec<_>>())
                            .into_iter()
                            .map(f64::exp)
                            .collect();
                        let mut rng = ChaCha8Rng::seed_from_u64(*seed);
                        (0..(*num_return_sequences).max(1))
                            .map(|_| {
                                let u: f64 = rng.random();
                                let mut acc = 0.0;
                                let mut pick = p.len() - 1;
                                for (i, pi) in p.iter().enumerate() {
                                    acc += pi;
                                    if u < acc {
                                        pick = i;
                                        break;
                                    }
                                }
                                cand(&vocab[pick], s[pick])
                            })
                            .collect()
                    }
                }
            }
        };
        Ok(NodeResponse {
            prompt_ids: ids(&prompt),
            outputs,
        })
    }

    fn row_probs(row: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
        let keys: Vec<&String> = row.keys().collect();
        let lp = log_softmax(&keys.iter().map(|k| row[*k]).collect::<Vec<_>>());
        keys.into_iter()
            .cloned()
            .zip(lp.into_iter().map(f64::exp))
            .collect()
    }
}

impl Backend for TabularPolicy {
    fn run_batch(&mut self, requests: &[NodeRequest]) -> Result<Vec<NodeResponse>, BoxError> {
        self.batch_sizes.borrow_mut().push(requests.len());
        requests.iter().map(|r| self.answer(r)).collect()
    }

    fn tokenize(&mut self, _node: &NodeId, texts: &[String]) -> Result<Vec<Vec<u32>>, BoxError> {
        Ok(texts.iter().map(|t| ids(t)).collect())
    }
}

impl Learner for TabularPolicy {
    fn learn(&mut self, node: &NodeId, records: &[Feedback]) -> Result<LearnStats, BoxError> {
        let mut st = self.state.borrow_mut();
        let (lr, beta) = (st.lr, st.beta);
        let mut loss = 0.0;
        for record in records {
            match record {
                Feedback::Preference(p) => {
                    let key = row_key(node.as_str(), &text(&p.prompt_ids)?);
                    let (c, r) = (text(&p.chosen)?, text(&p.rejected)?);
                    let get = |t: &BTreeMap<String, BTreeMap<String, f64>>, o: &str| {
                        t.get(&key)
                            .and_then(|row| row.get(o))
                            .copied()
                            .unwrap_or(0.0)
                    };
                    let margin = beta
                        * ((get(&st.logits, &c) - get(&st.logits, &r))
                            - (get(&st.reference, &c) - get(&st.reference, &r)));
                    loss += -p.weight * sigmoid(margin).ln();
                    let g = lr * p.weight * beta * sigmoid(-margin);
                    let row = st.logits.entry(key).or_default();
                    *row.entry(c).or_insert(0.0) += g;
                    *row.entry(r).or_insert(0.0) -= g;
                }
                Feedback::Target(t) => {
                    let key = row_key(node.as_str(), &text(&t.prompt_ids)?);
                    let gold = text(&t.target)?;
                    let row = st.logits.entry(key).or_default();
                    row.entry(gold.clone()).or_insert(0.0);
                    let probs = Self::row_probs(row);
                    loss += -t.weight * probs[&gold].ln();
                    for (o, p) in probs {
                        let y = if o == gold { 1.0 } else { 0.0 };
                        *row.entry(o).or_insert(0.0) += lr * t.weight * (y - p);
                    }
                }
                Feedback::Label(l) => {
                    let key = row_key(node.as_str(), &text(&l.prompt_ids)?);
                    let row = st.logits.entry(key).or_default();
                    for o in &l.labels {
                        row.entry(o.clone()).or_insert(0.0);
                    }
                    let lp = log_softmax(&l.labels.iter().map(|o| row[o]).collect::<Vec<_>>());
                    loss += -l.weight * lp[l.label];
                    for (i, o) in l.labels.iter().enumerate() {
                        let y = if i == l.label { 1.0 } else { 0.0 };
                        *row.entry(o.clone()).or_insert(0.0) += lr * l.weight * (y - lp[i].exp());
                    }
                }
            }
        }
        Ok(LearnStats {
            records: records.len(),
            loss: if records.is_empty() {
                0.0
            } else {
                loss / records.len() as f64
            },
            extra: BTreeMap::new(),
        })
    }

    fn update_reference(&mut self, node: &NodeId, weight: f64) -> Result<(), BoxError> {
        let mut st = self.state.borrow_mut();
        let prefix = format!("{node}\u{1f}");
        let trained: Vec<(String, BTreeMap<String, f64>)> = st
            .logits
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (key, row) in trained {
            let reference = st.reference.entry(key).or_default();
            for (o, v) in row {
                let r = reference.entry(o).or_insert(0.0);
                *r += weight * (v - *r);
            }
        }
        Ok(())
    }

    fn save(&self, dir: &Path) -> Result<(), BoxError> {
        let bytes = serde_json::to_vec(&*self.state.borrow())?;
        write_atomic(&dir.join("tabular.json"), &bytes)?;
        Ok(())
    }

    fn load(&mut self, dir: &Path) -> Result<(), BoxError> {
        let path = dir.join("tabular.json");
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        *self.state.borrow_mut() = serde_json::from_slice(&bytes)?;
        Ok(())
    }
}
