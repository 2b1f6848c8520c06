//! The LM runtime: one engine (model + tokenizer + adapter bank) shared by the
//! flow backend ([`LmBackend`], node calls from many episodes in one batch) and the
//! learner ([`AdapterLearner`], one LoRA adapter per node, trained online).
//!
//! Both handles share the engine through `Rc<RefCell<_>>`: the online loop is
//! single-threaded and alternates between running episodes and learning, so the
//! adapters a learner step changes serve the very next batch.
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;
use std::rc::Rc;

use flowtune_graph::{Backend, CallSpec, Candidate, Decoding, NodeId, NodeRequest, NodeResponse};
use flowtune_lm::engine::{
    ClassifyRequest, Decoding as LmDecoding, Engine, GenerateRequest, GenerationParams,
    ScoreRequest,
};
use flowtune_lm::tokenizer::ChatMessage;
use flowtune_lora::LoraConfig;
use flowtune_rollout::{Feedback, LearnStats, Learner};

use crate::learner::{
    LabelRecord, LearnerConfig, NodeLearner, NodeRecords, PreferencePair, StepStats, TargetRecord,
};

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors of the runtime glue.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A label or candidate that encodes to no token.
    #[error("node {node}: {what} {text:?} encodes to no token")]
    EmptyEncoding {
        /// The node.
        node: String,
        /// `label` or `candidate`.
        what: &'static str,
        /// The text.
        text: String,
    },
    /// A node the runtime has no adapter/learner for.
    #[error("node {node}: no learner (declare it trainable when building the runtime)")]
    UnknownNode {
        /// The node.
        node: String,
    },
    /// The engine's adapter bank is missing.
    #[error("the engine has no adapter bank")]
    NoBank,
    /// An error from the LM crate.
    #[error(transparent)]
    Lm(#[from] flowtune_lm::Error),
    /// An error from the LoRA crate.
    #[error(transparent)]
    Lora(#[from] flowtune_lora::LoraError),
    /// An error from the learner.
    #[error(transparent)]
    Learner(#[from] crate::learner::LearnerError),
    /// I/O on a named path.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: std::path::PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// The runtime's result type.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

/// Builds the shared engine handle, its adapters and the two views on it.
pub struct LmRuntime {
    engine: Rc<RefCell<Engine>>,
}

impl LmRuntime {
    /// Wraps `engine`, creating (when missing) one LoRA adapter per trainable node,
    /// named after the node, seeded from `seed` and the node's position.
    pub fn new(
        mut engine: Engine,
        trainable: &[NodeId],
        lora: &LoraConfig,
        seed: u64,
    ) -> Result<Self> {
        if engine.adapter_bank().is_none() {
            let bank = engine.new_adapter_bank();
            engine.set_adapter_bank(Some(bank));
        }
        {
            let bank = engine.adapter_bank_mut().ok_or(RuntimeError::NoBank)?;
            for (i, node) in trainable.iter().enumerate() {
                if bank.id(node.as_str()).is_err() {
                    bank.add(node.as_str(), lora, seed.wrapping_add(i as u64))?;
                }
            }
        }
        Ok(Self {
            engine: Rc::new(RefCell::new(engine)),
        })
    }

    /// The shared engine.
    pub fn engine(&self) -> Rc<RefCell<Engine>> {
        Rc::clone(&self.engine)
    }

    /// A flow backend over the engine.
    pub fn backend(&self) -> LmBackend {
        LmBackend {
            engine: Rc::clone(&self.engine),
            label_ids: BTreeMap::new(),
        }
    }

    /// A learner over the engine's adapters: node `n` trains adapter `n` against
    /// `n.ref` (created as a copy on first use).
    pub fn learner(&self, config: LearnerConfig) -> AdapterLearner {
        AdapterLearner {
            engine: Rc::clone(&self.engine),
            config,
            learners: BTreeMap::new(),
        }
    }
}

/// The flow backend: renders chat prompts to token ids once and runs all node
/// calls of a batch through the engine (generate, classify, choose).
pub struct LmBackend {
    engine: Rc<RefCell<Engine>>,
    label_ids: BTreeMap<String, u32>,
}

fn to_chat(messages: &[flowtune_graph::Message]) -> Vec<ChatMessage> {
    messages
        .iter()
        .map(|m| ChatMessage::new(m.role.clone(), m.content.clone()))
        .collect()
}

fn to_lm_decoding(d: &Decoding) -> LmDecoding {
    match d {
        Decoding::Greedy => LmDecoding::Greedy,
        Decoding::Sample {
            temperature,
            top_p,
            top_k,
            seed,
        } => LmDecoding::Sample {
            temperature: *temperature,
            top_k: *top_k,
            top_p: *top_p,
            seed: *seed,
        },
        Decoding::Beam { num_beams } => LmDecoding::Beam {
            num_beams: *num_beams,
            num_beam_groups: 1,
            diversity_penalty: 0.0,
            length_penalty: 1.0,
        },
        Decoding::DiverseBeam {
            num_beams,
            num_beam_groups,
            diversity_penalty,
        } => LmDecoding::Beam {
            num_beams: *num_beams,
            num_beam_groups: *num_beam_groups,
            diversity_penalty: *diversity_penalty,
            length_penalty: 1.0,
        },
    }
}

impl LmBackend {
    /// The first token of `label` (label choice happens at the next position).
    fn label_id(&mut self, engine: &Engine, node: &NodeId, label: &str) -> Result<u32> {
        if let Some(id) = self.label_ids.get(label) {
            return Ok(*id);
        }
        let ids = engine.tokenizer().encode(label)?;
        let id = *ids.first().ok_or_else(|| RuntimeError::EmptyEncoding {
            node: node.to_string(),
            what: "label",
            text: label.to_string(),
        })?;
        self.label_ids.insert(label.to_string(), id);
        Ok(id)
    }

    fn run(&mut self, requests: &[NodeRequest]) -> Result<Vec<NodeResponse>> {
        let engine_rc = Rc::clone(&self.engine);
        let engine = engine_rc.borrow();
        let _span = tracing::debug_span!("engine_step", requests = requests.len()).entered();
        let mut prompts = Vec::with_capacity(requests.len());
        for r in requests {
            prompts.push(
                engine
                    .tokenizer()
                    .encode_chat(&to_chat(&r.messages), true)?,
            );
        }
        let mut responses: Vec<Option<NodeResponse>> = vec![None; requests.len()];

        // Generate: all rows at once.
        let mut gen_idx = Vec::new();
        let mut gen = Vec::new();
        // Classify: all rows at once.
        let mut cls_idx = Vec::new();
        let mut cls = Vec::new();
        let mut cls_labels = Vec::new();
        // Choose: one score row per candidate.
        let mut score_owner = Vec::new();
        let mut scores = Vec::new();
        let mut choose_cands: BTreeMap<usize, Vec<(String, Vec<u32>)>> = BTreeMap::new();
        for (i, r) in requests.iter().enumerate() {
            match &r.call {
                CallSpec::Generate {
                    max_new_tokens,
                    decoding,
                    num_return_sequences,
                    stop,
                } => {
                    gen_idx.push(i);
                    gen.push(GenerateRequest {
                        prompt: prompts[i].clone(),
                        adapter: r.adapter.clone(),
                        params: GenerationParams {
                            max_new_tokens: *max_new_tokens,
                            decoding: to_lm_decoding(decoding),
                            num_return_sequences: *num_return_sequences,
                            stop: stop.clone(),
                            eos_token_ids: Vec::new(),
                        },
                    });
                }
                CallSpec::Classify { labels } => {
                    let mut ids = Vec::with_capacity(labels.len());
                    for l in labels {
                        ids.push(self.label_id(&engine, &r.node, l)?);
                    }
                    cls_idx.push(i);
                    cls.push(ClassifyRequest {
                        prompt: prompts[i].clone(),
                        adapter: r.adapter.clone(),
                        labels: ids,
                    });
                    cls_labels.push(labels.clone());
                }
                CallSpec::Choose { candidates } => {
                    let mut cands = Vec::with_capacity(candidates.len());
                    for c in candidates {
                        let ids = engine.tokenizer().encode(c)?;
                        if ids.is_empty() {
                            return Err(RuntimeError::EmptyEncoding {
                                node: r.node.to_string(),
                                what: "candidate",
                                text: c.clone(),
                            });
                        }
                        score_owner.push(i);
                        scores.push(ScoreRequest {
                            prompt: prompts[i].clone(),
                            adapter: r.adapter.clone(),
                            completion: ids.clone(),
                        });
                        cands.push((c.clone(), ids));
                    }
                    choose_cands.insert(i, cands);
                }
            }
        }
        if !gen.is_empty() {
            let outs = engine.generate(&gen)?;
            for (&i, out) in gen_idx.iter().zip(outs) {
                let outputs = out
                    .sequences
                    .into_iter()
                    .map(|s| Candidate {
                        ids: s.ids,
                        text: s.text,
                        logprob: s.logprob,
                    })
                    .collect();
                responses[i] = Some(NodeResponse {
                    prompt_ids: prompts[i].clone(),
                    outputs,
                });
            }
        }
        if !cls.is_empty() {
            let outs = engine.classify(&cls)?;
            for ((&i, out), (labels, req)) in
                cls_idx.iter().zip(outs).zip(cls_labels.iter().zip(&cls))
            {
                let outputs = labels
                    .iter()
                    .zip(&req.labels)
                    .zip(&out.label_logprobs)
                    .map(|((l, id), lp)| Candidate {
                        ids: vec![*id],
                        text: l.clone(),
                        logprob: *lp,
                    })
                    .collect();
                responses[i] = Some(NodeResponse {
                    prompt_ids: prompts[i].clone(),
                    outputs,
                });
            }
        }
        if !scores.is_empty() {
            let outs = engine.score(&scores)?;
            let mut by_owner: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
            for (&i, out) in score_owner.iter().zip(outs) {
                by_owner.entry(i).or_default().push(out.logprob);
            }
            for (i, cands) in choose_cands {
                let lps = by_owner.remove(&i).unwrap_or_default();
                let outputs = cands
                    .into_iter()
                    .zip(lps)
                    .map(|((text, ids), logprob)| Candidate { ids, text, logprob })
                    .collect();
                responses[i] = Some(NodeResponse {
                    prompt_ids: prompts[i].clone(),
                    outputs,
                });
            }
        }
        // Every request matched exactly one arm above, so every slot is filled.
        Ok(responses
            .into_iter()
            .map(|r| {
                r.unwrap_or(NodeResponse {
                    prompt_ids: Vec::new(),
                    outputs: Vec::new(),
                })
            })
            .collect())
    }
}

impl Backend for LmBackend {
    fn run_batch(
        &mut self,
        requests: &[NodeRequest],
    ) -> std::result::Result<Vec<NodeResponse>, BoxError> {
        Ok(self.run(requests)?)
    }

    /// Gold completions as the node would emit them: the text's tokens followed by
    /// the end-of-turn token (as TRL counts a completion).
    fn tokenize(
        &mut self,
        _node: &NodeId,
        texts: &[String],
    ) -> std::result::Result<Vec<Vec<u32>>, BoxError> {
        let engine = self.engine.borrow();
        let eot = engine.eos_token_ids().first().copied();
        let mut out = Vec::with_capacity(texts.len());
        for t in texts {
            let mut ids = engine.tokenizer().encode(t)?;
            ids.extend(eot);
            out.push(ids);
        }
        Ok(out)
    }
}

/// The node learner over the engine's adapters (rollout's [`Learner`]): per node
/// a [`NodeLearner`] (DPO against `node.ref`, NLL, label NLL; COCOB).
pub struct AdapterLearner {
    engine: Rc<RefCell<Engine>>,
    config: LearnerConfig,
    learners: BTreeMap<String, NodeLearner>,
}

impl AdapterLearner {
    fn learner_for(&mut self, engine: &mut Engine, node: &str) -> Result<&mut NodeLearner> {
        if !self.learners.contains_key(node) {
            let bank = engine.adapter_bank_mut().ok_or(RuntimeError::NoBank)?;
            if bank.id(node).is_err() {
                return Err(RuntimeError::UnknownNode {
                    node: node.to_string(),
                });
            }
            let l = NodeLearner::new(bank, node, self.config)?;
            self.learners.insert(node.to_string(), l);
        }
        self.learners
            .get_mut(node)
            .ok_or_else(|| RuntimeError::UnknownNode {
                node: node.to_string(),
            })
    }

    fn step(&mut self, node: &NodeId, batch: NodeRecords) -> Result<StepStats> {
        let engine_rc = Rc::clone(&self.engine);
        let mut engine = engine_rc.borrow_mut();
        let learner = self.learner_for(&mut engine, node.as_str())?;
        let (model, bank) = engine.model_and_bank_mut();
        let bank = bank.ok_or(RuntimeError::NoBank)?;
        Ok(learner.step(model, bank, &batch)?)
    }

    fn learn_records(&mut self, node: &NodeId, records: &[Feedback]) -> Result<LearnStats> {
        let mut prefs = Vec::new();
        let mut targets = Vec::new();
        let mut labels = Vec::new();
        for r in records {
            match r {
                Feedback::Preference(p) => prefs.push(PreferencePair {
                    prompt: p.prompt_ids.clone(),
                    chosen: p.chosen.clone(),
                    rejected: p.rejected.clone(),
                    weight: p.weight,
                }),
                Feedback::Target(t) => targets.push(TargetRecord {
                    prompt: t.prompt_ids.clone(),
                    completion: t.target.clone(),
                    weight: t.weight,
                }),
                Feedback::Label(l) => {
                    let mut ids = Vec::with_capacity(l.label_ids.len());
                    for (text, lid) in l.labels.iter().zip(&l.label_ids) {
                        ids.push(*lid.first().ok_or_else(|| RuntimeError::EmptyEncoding {
                            node: node.to_string(),
                            what: "label",
                            text: text.clone(),
                        })?);
                    }
                    labels.push(LabelRecord {
                        prompt: l.prompt_ids.clone(),
                        labels: ids,
                        label: l.label,
                        weight: l.weight,
                    })
                }
            }
        }
        let mut total = LearnStats::default();
        let mut n = 0usize;
        for batch in [
            (!prefs.is_empty()).then_some(NodeRecords::Preferences(prefs)),
            (!targets.is_empty()).then_some(NodeRecords::Targets(targets)),
            (!labels.is_empty()).then_some(NodeRecords::Labels(labels)),
        ]
        .into_iter()
        .flatten()
        {
            let kind = match &batch {
                NodeRecords::Preferences(_) => "dpo",
                NodeRecords::Targets(_) => "nll",
                NodeRecords::Labels(_) => "label",
            };
            let s = self.step(node, batch)?;
            total.records += s.records;
            total.loss += s.loss;
            n += 1;
            total.extra.insert(format!("{kind}_loss"), s.loss);
            total.extra.insert(format!("{kind}_grad_norm"), s.grad_norm);
            if let Some(d) = &s.dpo {
                total.extra.insert("dpo_pair_accuracy".into(), d.accuracy);
                total
                    .extra
                    .insert("dpo_reward_margin".into(), d.reward_margin);
            }
        }
        if n > 0 {
            total.loss /= n as f64;
        }
        Ok(total)
    }
}

impl Learner for AdapterLearner {
    fn learn(
        &mut self,
        node: &NodeId,
        records: &[Feedback],
    ) -> std::result::Result<LearnStats, BoxError> {
        Ok(self.learn_records(node, records)?)
    }

    fn update_reference(
        &mut self,
        node: &NodeId,
        weight: f64,
    ) -> std::result::Result<(), BoxError> {
        let mut engine = self.engine.borrow_mut();
        let bank = engine.adapter_bank_mut().ok_or(RuntimeError::NoBank)?;
        let reference = crate::learner::reference_name(node.as_str());
        if bank.id(&reference).is_err() {
            // No learning step yet: the reference is created (as a copy) on first use.
            return Ok(());
        }
        bank.lerp(&reference, node.as_str(), weight)
            .map_err(RuntimeError::from)?;
        Ok(())
    }

    fn save(&self, dir: &Path) -> std::result::Result<(), BoxError> {
        let engine = self.engine.borrow();
        let bank = engine.adapter_bank().ok_or(RuntimeError::NoBank)?;
        for (node, l) in &self.learners {
            l.save(bank, &dir.join(node)).map_err(RuntimeError::from)?;
        }
        Ok(())
    }

    fn load(&mut self, dir: &Path) -> std::result::Result<(), BoxError> {
        let mut engine = self.engine.borrow_mut();
        let bank = engine.adapter_bank_mut().ok_or(RuntimeError::NoBank)?;
        self.learners.clear();
        let entries = std::fs::read_dir(dir).map_err(|source| RuntimeError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut dirs: Vec<_> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.join("learner.json").is_file())
            .collect();
        dirs.sort();
        for d in dirs {
            let l = NodeLearner::load(bank, &d).map_err(RuntimeError::from)?;
            self.learners.insert(l.node().to_string(), l);
        }
        Ok(())
    }
}
