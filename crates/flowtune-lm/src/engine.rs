//! The batched engine: many requests at once over one model.
//!
//! - `generate`: greedy and seeded sampling (temperature, top-k, top-p, HF
//!   order) for ragged prompts batched together (left padding, one KV cache);
//!   beam search and diverse (group) beam search with transformers' semantics,
//!   one request at a time; `num_return_sequences`, `max_new_tokens`, EOS and
//!   stop strings.
//! - `score`: summed log-probability of a given completion after a prompt.
//! - `classify`: log-softmax over a set of label tokens at the next position.
//!
//! Requests that share a prompt prefix (e.g. one question followed by 20
//! paragraphs to judge) compute the prefix once: its KV cache is expanded to
//! every row.
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::loader::LoadedModel;
use crate::model::{LinearDelta, LogitsAt, Model};
use crate::prefix_store::PrefixStore;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// How to pick tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Decoding {
    /// Argmax at every step.
    Greedy,
    /// Sampling with HF's warpers in HF's order: temperature, top-k, top-p.
    Sample {
        /// Logits are divided by this (> 0).
        temperature: f64,
        /// Keep the k most likely tokens (0 = off).
        #[serde(default)]
        top_k: usize,
        /// Keep the smallest set with cumulative probability ≥ top_p (1.0 = off).
        #[serde(default = "one")]
        top_p: f64,
        /// Seed; sequence `j` of a request uses `seed + j`, so results do not
        /// depend on batching.
        seed: u64,
    },
    /// Beam search (`num_beam_groups = 1`) or diverse group beam search.
    Beam {
        /// Total beams.
        num_beams: usize,
        /// Groups (diverse beam search when > 1; must divide `num_beams`).
        #[serde(default = "one_usize")]
        num_beam_groups: usize,
        /// Hamming diversity penalty between groups.
        #[serde(default)]
        diversity_penalty: f64,
        /// Length penalty exponent (HF default 1.0).
        #[serde(default = "one")]
        length_penalty: f64,
    },
}

fn one() -> f64 {
    1.0
}
fn one_usize() -> usize {
    1
}

/// Generation parameters of one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationParams {
    /// Maximum new tokens.
    pub max_new_tokens: usize,
    /// Decoding strategy.
    pub decoding: Decoding,
    /// Sequences to return (≤ `num_beams` for beam search).
    #[serde(default = "one_usize")]
    pub num_return_sequences: usize,
    /// Stop once the generated text contains one of these.
    #[serde(default)]
    pub stop: Vec<String>,
    /// Extra end-of-sequence ids (the tokenizer's are always used).
    #[serde(default)]
    pub eos_token_ids: Vec<u32>,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            decoding: Decoding::Greedy,
            num_return_sequences: 1,
            stop: Vec::new(),
            eos_token_ids: Vec::new(),
        }
    }
}

/// A generation request: prompt token ids (already chat-templated).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    /// Prompt ids.
    pub prompt: Vec<u32>,
    /// LoRA adapter (name in the engine's bank); `None` = base model.
    #[serde(default)]
    pub adapter: Option<String>,
    /// Parameters.
    pub params: GenerationParams,
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token (included in `ids`).
    Eos,
    /// A stop string (included in `ids` and `text`).
    Stop,
    /// `max_new_tokens` reached.
    Length,
}

/// One generated sequence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GeneratedSequence {
    /// New token ids (the EOS token included when it ended the sequence).
    pub ids: Vec<u32>,
    /// Decoded text, special tokens skipped.
    pub text: String,
    /// Summed log-probability of `ids` under the model (raw distribution).
    pub logprob: f64,
    /// Beam score (length-normalised, diversity-penalised) for beam search;
    /// equals `logprob` otherwise.
    pub score: f64,
    /// Why it ended.
    pub finish: FinishReason,
}

/// The outputs of one request, best first for beam search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateOutput {
    /// Sequences.
    pub sequences: Vec<GeneratedSequence>,
}

/// Score a completion: summed log p(completion | prompt).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreRequest {
    /// Prompt ids.
    pub prompt: Vec<u32>,
    /// LoRA adapter (name in the engine's bank); `None` = base model.
    #[serde(default)]
    pub adapter: Option<String>,
    /// Completion ids.
    pub completion: Vec<u32>,
}

/// A completion's score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreOutput {
    /// Summed log-probability.
    pub logprob: f64,
    /// Per-token log-probabilities.
    pub token_logprobs: Vec<f64>,
}

/// Choose among label tokens at the next position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifyRequest {
    /// Prompt ids.
    pub prompt: Vec<u32>,
    /// LoRA adapter (name in the engine's bank); `None` = base model.
    #[serde(default)]
    pub adapter: Option<String>,
    /// Label token ids (e.g. the ids of "Yes" and "No").
    pub labels: Vec<u32>,
}

/// Log-softmax over the label tokens (in request order).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifyOutput {
    /// log p(label) renormalised over the labels.
    pub label_logprobs: Vec<f64>,
    /// log p(label) under the full vocabulary distribution.
    pub raw_logprobs: Vec<f64>,
}

/// Engine settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineConfig {
    /// Most rows run together in one forward.
    pub max_batch_rows: usize,
    /// Shortest common prompt prefix worth computing once for many rows.
    pub min_shared_prefix: usize,
    /// Torch intra-op threads (`None` = leave as is).
    pub threads: Option<i32>,
    /// Bytes of keys/values of classified prompts kept for reuse by later prompts that start
    /// with the same tokens under the same adapter (0 turns the store off); see
    /// `Engine::prefix_store_stats`.
    #[serde(default = "default_prefix_store_bytes")]
    pub prefix_store_bytes: usize,
}

fn default_prefix_store_bytes() -> usize {
    2 << 30
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch_rows: 16,
            min_shared_prefix: 16,
            threads: None,
            prefix_store_bytes: default_prefix_store_bytes(),
        }
    }
}

/// The engine: a model, its tokenizer and an optional bank of LoRA adapters
/// (requests name their adapter; rows of one batch may use different ones).
pub struct Engine {
    model: Model,
    tokenizer: Tokenizer,
    config: EngineConfig,
    eos: Vec<u32>,
    bank: Option<flowtune_lora::AdapterBank>,
    prefixes: std::sync::Mutex<PrefixStore>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.config)
            .field("eos", &self.eos)
            .finish()
    }
}

/// One greedy/sampling row during generation.
struct Row {
    request: usize,
    seq_index: usize,
    ids: Vec<u32>,
    logprob: f64,
    done: Option<FinishReason>,
    rng: Option<rand_chacha::ChaCha8Rng>,
}

impl Engine {
    /// An engine over a loaded model (weights are moved into the model).
    pub fn new(loaded: LoadedModel, config: EngineConfig) -> Result<Self> {
        let model = Model::new(&loaded.config, &loaded.weights)?;
        Ok(Self::from_parts(model, loaded.tokenizer, config))
    }

    /// An engine from a built model and tokenizer.
    pub fn from_parts(model: Model, tokenizer: Tokenizer, config: EngineConfig) -> Self {
        if let Some(n) = config.threads {
            tch::set_num_threads(n);
        }
        let mut eos: Vec<u32> = tokenizer.eos_token_ids().to_vec();
        for e in model.config().eos_token_ids() {
            if !eos.contains(&e) {
                eos.push(e);
            }
        }
        let prefixes = std::sync::Mutex::new(PrefixStore::new(config.prefix_store_bytes));
        Self {
            model,
            tokenizer,
            config,
            eos,
            bank: None,
            prefixes,
        }
    }

    /// Prompt tokens served from the prefix store, and prompt tokens looked up in it, since
    /// the engine was built. A flow re-asks about the same text (the MuSiQue relevance node
    /// scores each unused paragraph again every retrieval round; the stop node's prompt grows
    /// by one paragraph per round): classified prompts are kept (up to
    /// `EngineConfig::prefix_store_bytes` of keys and values, least recently used first out)
    /// and a later prompt under the same adapter that starts with the same tokens computes
    /// only the rest. Any mutable access to the adapter bank empties the store.
    pub fn prefix_store_stats(&self) -> (usize, usize) {
        let s = self.prefixes.lock().unwrap_or_else(|p| p.into_inner());
        (s.hits_tokens, s.lookup_tokens)
    }

    /// Forget every stored prompt prefix (their keys and values depend on the adapters).
    fn clear_prefixes(&mut self) {
        self.prefixes
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Install the LoRA adapter bank requests refer to by name.
    pub fn set_adapter_bank(&mut self, bank: Option<flowtune_lora::AdapterBank>) {
        self.clear_prefixes();
        self.bank = bank;
    }

    /// The adapter bank, if any.
    pub fn adapter_bank(&self) -> Option<&flowtune_lora::AdapterBank> {
        self.bank.as_ref()
    }

    /// The adapter bank for updates (training steps, new adapters).
    pub fn adapter_bank_mut(&mut self) -> Option<&mut flowtune_lora::AdapterBank> {
        self.clear_prefixes();
        self.bank.as_mut()
    }

    /// The model and the adapter bank at once (a learner step reads the model and
    /// updates the bank).
    pub fn model_and_bank_mut(&mut self) -> (&Model, Option<&mut flowtune_lora::AdapterBank>) {
        self.clear_prefixes();
        (&self.model, self.bank.as_mut())
    }

    /// An empty bank shaped for this model's linears.
    pub fn new_adapter_bank(&self) -> flowtune_lora::AdapterBank {
        flowtune_lora::AdapterBank::new(self.model.config().lora_base_shapes(), self.model.device())
    }

    /// Load a PEFT adapter folder into the bank (created on first use) under `name`.
    pub fn load_adapter(&mut self, name: &str, dir: &std::path::Path) -> Result<()> {
        self.clear_prefixes();
        if self.bank.is_none() {
            self.bank = Some(self.new_adapter_bank());
        }
        if let Some(bank) = self.bank.as_mut() {
            bank.load_peft(name, dir)?;
        }
        Ok(())
    }

    /// Run `f` with the LoRA delta for rows using `adapters` (one name per row).
    fn with_adapters<T>(
        &self,
        adapters: &[Option<&str>],
        f: impl FnOnce(Option<&dyn LinearDelta>) -> Result<T>,
    ) -> Result<T> {
        if adapters.iter().all(|a| a.is_none()) {
            return f(None);
        }
        let bank = self.bank.as_ref().ok_or_else(|| Error::InvalidRequest {
            index: 0,
            message: format!(
                "adapter {:?} requested but the engine has no adapter bank",
                adapters.iter().flatten().next()
            ),
        })?;
        let first = adapters[0];
        let selection = if adapters.iter().all(|a| *a == first) {
            match first {
                Some(n) => flowtune_lora::AdapterSelection::All(bank.id(n)?),
                None => flowtune_lora::AdapterSelection::None,
            }
        } else {
            bank.selection(adapters)?
        };
        let selected = bank.select(&selection);
        f(Some(&selected))
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// End-of-sequence ids used by default.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos
    }

    fn ids_tensor(&self, ids: &[i64], b: usize, t: usize) -> Result<Tensor> {
        Ok(Tensor::f_from_slice(ids)?
            .f_view([b as i64, t as i64])?
            .f_to(self.model.device())?)
    }

    /// Generate for every request; outputs in request order.
    pub fn generate(&self, requests: &[GenerateRequest]) -> Result<Vec<GenerateOutput>> {
        let _span = tracing::info_span!("engine_generate", requests = requests.len()).entered();
        for (i, r) in requests.iter().enumerate() {
            validate_generate(i, r, self.model.config().vocab_size)?;
        }
        let mut outputs: Vec<Option<GenerateOutput>> = vec![None; requests.len()];
        let mut simple = Vec::new();
        for (i, r) in requests.iter().enumerate() {
            match &r.params.decoding {
                Decoding::Beam { .. } => outputs[i] = Some(tch::no_grad(|| self.beam_search(r))?),
                _ => simple.push(i),
            }
        }
        // Rows of greedy/sampling requests, batched in chunks.
        let mut rows: Vec<Row> = Vec::new();
        for &i in &simple {
            let r = &requests[i];
            for j in 0..r.params.num_return_sequences {
                let rng = match &r.params.decoding {
                    Decoding::Sample { seed, .. } => Some(
                        <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(
                            seed.wrapping_add(j as u64),
                        ),
                    ),
                    _ => None,
                };
                rows.push(Row {
                    request: i,
                    seq_index: j,
                    ids: Vec::new(),
                    logprob: 0.0,
                    done: None,
                    rng,
                });
            }
        }
        let mut finished: Vec<Row> = Vec::new();
        let chunk = self.config.max_batch_rows.max(1);
        while !rows.is_empty() {
            let rest = if rows.len() > chunk {
                rows.split_off(chunk)
            } else {
                Vec::new()
            };
            let batch = std::mem::replace(&mut rows, rest);
            finished.extend(tch::no_grad(|| self.run_rows(requests, batch))?);
        }
        finished.sort_by_key(|r| (r.request, r.seq_index));
        for row in finished {
            let text = self.tokenizer.decode(&row.ids, true)?;
            let out = outputs[row.request].get_or_insert_with(|| GenerateOutput {
                sequences: Vec::new(),
            });
            out.sequences.push(GeneratedSequence {
                ids: row.ids,
                text,
                logprob: row.logprob,
                score: row.logprob,
                finish: row.done.unwrap_or(FinishReason::Length),
            });
        }
        Ok(outputs
            .into_iter()
            .map(|o| {
                o.unwrap_or(GenerateOutput {
                    sequences: Vec::new(),
                })
            })
            .collect())
    }

    fn is_eos(&self, params: &GenerationParams, tok: u32) -> bool {
        self.eos.contains(&tok) || params.eos_token_ids.contains(&tok)
    }

    fn hits_stop(&self, params: &GenerationParams, ids: &[u32]) -> Result<bool> {
        if params.stop.is_empty() {
            return Ok(false);
        }
        let text = self.tokenizer.decode(ids, true)?;
        Ok(params
            .stop
            .iter()
            .any(|s| !s.is_empty() && text.contains(s.as_str())))
    }

    /// Greedy/sampling rows, left-padded into one cache.
    fn run_rows(&self, requests: &[GenerateRequest], mut rows: Vec<Row>) -> Result<Vec<Row>> {
        let _span = tracing::debug_span!("engine_rollout_batch", rows = rows.len()).entered();
        let b = rows.len();
        let prompts: Vec<&[u32]> = rows
            .iter()
            .map(|r| requests[r.request].prompt.as_slice())
            .collect();
        let max_new = rows
            .iter()
            .map(|r| requests[r.request].params.max_new_tokens)
            .max()
            .unwrap_or(0);
        let names: Vec<Option<&str>> = rows
            .iter()
            .map(|r| requests[r.request].adapter.as_deref())
            .collect();
        // Each row's prompt starts from the longest stored prefix when the store has one (a
        // flow's next-round prompt extends this round's), else from the rows' common prefix.
        let (mut cache, mut logits) = self.prefill_prompts(&prompts, &names, max_new, false)?;
        for step in 0..max_new {
            let logp = logits
                .f_to_kind(Kind::Float)?
                .f_log_softmax(-1, Kind::Float)?;
            let greedy: Vec<i64> = Vec::try_from(logp.f_argmax(-1, false)?)?;
            let mut next = vec![0i64; b];
            let mut step_valid = vec![true; b];
            for (r, row) in rows.iter_mut().enumerate() {
                let params = &requests[row.request].params;
                if row.done.is_some() || step >= params.max_new_tokens {
                    row.done.get_or_insert(FinishReason::Length);
                    step_valid[r] = false;
                    continue;
                }
                let tok = match (&params.decoding, row.rng.as_mut()) {
                    (
                        Decoding::Sample {
                            temperature,
                            top_k,
                            top_p,
                            ..
                        },
                        Some(rng),
                    ) => {
                        let l: Vec<f32> =
                            Vec::try_from(logits.f_get(r as i64)?.f_to_kind(Kind::Float)?)?;
                        sample_hf(&l, *temperature, *top_k, *top_p, rng)
                    }
                    _ => greedy[r] as u32,
                };
                row.logprob += logp.f_double_value(&[r as i64, tok as i64])?;
                row.ids.push(tok);
                next[r] = tok as i64;
                if self.is_eos(params, tok) {
                    row.done = Some(FinishReason::Eos);
                } else if self.hits_stop(params, &row.ids)? {
                    row.done = Some(FinishReason::Stop);
                } else if row.ids.len() >= params.max_new_tokens {
                    row.done = Some(FinishReason::Length);
                }
            }
            if rows.iter().all(|r| r.done.is_some()) {
                break;
            }
            logits = self.with_adapters(&names, |d| {
                self.model.forward_cached(
                    &self.ids_tensor(&next, b, 1)?,
                    Some(&step_valid),
                    &mut cache,
                    &LogitsAt::Last,
                    d,
                )
            })?;
        }
        Ok(rows)
    }

    /// Prompts through the prefix store, as generation and classification start: each row
    /// begins at its longest stored prefix (else at the rows' common prefix, computed once),
    /// the rest of each prompt runs on top, and every prompt is stored for later calls. The
    /// rests go right-padded with logits picked per row when `right_pad` or when rows start
    /// at different slots, left-padded otherwise. Returns the cache (with `extra` free slots)
    /// and the logits `[B, V]` after each prompt.
    fn prefill_prompts(
        &self,
        prompts: &[&[u32]],
        names: &[Option<&str>],
        extra: usize,
        right_pad: bool,
    ) -> Result<(crate::kv::KvCache, Tensor)> {
        let (cache, logits, _) = self.run_from_store(prompts, None, names, extra, right_pad)?;
        Ok((cache, logits))
    }

    /// [`Self::prefill_prompts`], optionally with `continuations`: tokens that run right after
    /// each prompt in the same forward (a scored completion), never stored. With them the rests
    /// are right-padded and the logits are at every column, `[B, t, V]`. Also returns where
    /// each row's rest starts in its prompt (the tokens served by the store or shared).
    fn run_from_store(
        &self,
        prompts: &[&[u32]],
        continuations: Option<&[&[u32]]>,
        names: &[Option<&str>],
        extra: usize,
        right_pad: bool,
    ) -> Result<(crate::kv::KvCache, Tensor, Vec<usize>)> {
        let b = prompts.len();
        let tails = continuations.map_or(0, |c| c.iter().map(|t| t.len()).max().unwrap_or(0));
        let mut store = self.prefixes.lock().unwrap_or_else(|p| p.into_inner());
        let (mut cache, starts) =
            self.prefill_from_store(&mut store, prompts, names, extra + tails)?;
        let base = cache.len();
        let ragged = right_pad || continuations.is_some() || starts.iter().any(|&s| s != base);
        // What runs: each prompt, followed by its continuation when there are any.
        let sequences: Option<Vec<Vec<u32>>> = continuations.map(|c| {
            prompts
                .iter()
                .zip(c)
                .map(|(p, t)| [*p, *t].concat())
                .collect()
        });
        let runs: Vec<&[u32]> = match &sequences {
            Some(s) => s.iter().map(Vec::as_slice).collect(),
            None => prompts.to_vec(),
        };
        let PromptRests {
            t,
            ids,
            valid,
            last,
            rest_at,
        } = PromptRests::new(&runs, &starts, base, ragged);
        tracing::debug!(
            rows = b,
            columns = t,
            tokens = valid.iter().filter(|&&v| v).count(),
            cached = base,
            "prompt batch"
        );
        let at = if continuations.is_some() {
            LogitsAt::All
        } else if ragged {
            LogitsAt::PerRow(last)
        } else {
            LogitsAt::Last
        };
        let logits = self.with_adapters(names, |d| {
            self.model.forward_cached(
                &self.ids_tensor(&ids, b, t)?,
                Some(&valid),
                &mut cache,
                &at,
                d,
            )
        })?;
        // Row r's prompt sits at slots 0..starts[r], then from rest_at[r] on.
        self.store_prompts(&mut store, &cache, prompts, names, &starts, &rest_at)?;
        Ok((cache, logits, starts))
    }

    /// A cache for `prompts.len()` rows holding their longest common prefix
    /// (computed once, then expanded) when it is long enough; else empty.
    fn prefill_shared(
        &self,
        prompts: &[&[u32]],
        adapters: &[Option<&str>],
        extra: usize,
    ) -> Result<crate::kv::KvCache> {
        let b = prompts.len();
        let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let mut common = prompts.first().map(|p| p.len()).unwrap_or(0);
        for p in prompts.iter().skip(1) {
            common = common.min(
                p.iter()
                    .zip(prompts[0].iter())
                    .take_while(|(a, c)| a == c)
                    .count(),
            );
        }
        // Leave at least one token of every prompt for the batched step (its logits are needed).
        let shortest = prompts.iter().map(|p| p.len()).min().unwrap_or(0);
        common = common.min(shortest.saturating_sub(1));
        // Keys and values depend on the adapter: share only when every row uses the same one.
        let same_adapter = adapters.iter().all(|a| *a == adapters[0]);
        if b > 1 && same_adapter && common >= self.config.min_shared_prefix {
            let _span =
                tracing::debug_span!("engine_shared_prefix", tokens = common, rows = b).entered();
            let mut cache = self.model.new_cache(1, longest + extra + 1)?;
            let ids: Vec<i64> = prompts[0][..common].iter().map(|&x| x as i64).collect();
            let _ = self.with_adapters(&adapters[..1], |d| {
                self.model.forward_cached(
                    &self.ids_tensor(&ids, 1, common)?,
                    None,
                    &mut cache,
                    &LogitsAt::None,
                    d,
                )
            })?;
            cache.select_rows(&vec![0; b])?;
            Ok(cache)
        } else {
            self.model.new_cache(b, longest + extra + 1)
        }
    }

    /// Logits `[V]` (model dtype) at the last position of `prompt` under `adapter`.
    pub fn last_logits(&self, prompt: &[u32], adapter: Option<&str>) -> Result<Tensor> {
        check_ids(0, prompt, self.model.config().vocab_size)?;
        if prompt.is_empty() {
            return Err(Error::InvalidRequest {
                index: 0,
                message: "empty prompt".into(),
            });
        }
        let ids: Vec<i64> = prompt.iter().map(|&x| x as i64).collect();
        let mut cache = self.model.new_cache(1, ids.len())?;
        let logits = tch::no_grad(|| {
            self.with_adapters(&[adapter], |d| {
                self.model.forward_cached(
                    &self.ids_tensor(&ids, 1, ids.len())?,
                    None,
                    &mut cache,
                    &LogitsAt::Last,
                    d,
                )
            })
        })?;
        Ok(logits.f_squeeze_dim(0)?)
    }

    /// Summed completion log-probabilities; outputs in request order.
    pub fn score(&self, requests: &[ScoreRequest]) -> Result<Vec<ScoreOutput>> {
        let _span = tracing::info_span!("engine_score", requests = requests.len()).entered();
        let vocab = self.model.config().vocab_size;
        for (i, r) in requests.iter().enumerate() {
            if r.prompt.is_empty() || r.completion.is_empty() {
                return Err(Error::InvalidRequest {
                    index: i,
                    message: "prompt and completion must be non-empty".into(),
                });
            }
            check_ids(i, &r.prompt, vocab)?;
            check_ids(i, &r.completion, vocab)?;
        }
        let mut out = Vec::with_capacity(requests.len());
        for chunk in requests.chunks(self.config.max_batch_rows.max(1)) {
            out.extend(tch::no_grad(|| self.score_chunk(chunk))?);
        }
        Ok(out)
    }

    fn score_chunk(&self, reqs: &[ScoreRequest]) -> Result<Vec<ScoreOutput>> {
        let b = reqs.len();
        let prompts: Vec<&[u32]> = reqs.iter().map(|r| r.prompt.as_slice()).collect();
        let completions: Vec<&[u32]> = reqs.iter().map(|r| r.completion.as_slice()).collect();
        let names: Vec<Option<&str>> = reqs.iter().map(|r| r.adapter.as_deref()).collect();
        // Each prompt from the store (or the chunk's common prefix), its completion on top;
        // row r's token at column c predicts column c + 1.
        let (_cache, logits, starts) =
            self.run_from_store(&prompts, Some(&completions), &names, 0, true)?;
        let logp = logits
            .f_to_kind(Kind::Float)?
            .f_log_softmax(-1, Kind::Float)?;
        let mut out = Vec::with_capacity(b);
        for (r, req) in reqs.iter().enumerate() {
            let start = req.prompt.len() - starts[r] - 1;
            let n = req.completion.len();
            let cols = Tensor::f_arange_start(
                start as i64,
                (start + n) as i64,
                (Kind::Int64, self.model.device()),
            )?;
            let target: Vec<i64> = req.completion.iter().map(|&x| x as i64).collect();
            let target = Tensor::f_from_slice(&target)?
                .f_to(self.model.device())?
                .f_unsqueeze(-1)?;
            let picked = logp
                .f_get(r as i64)?
                .f_index_select(0, &cols)?
                .f_gather(1, &target, false)?;
            let v: Vec<f64> = Vec::try_from(picked.f_flatten(0, -1)?.f_to_kind(Kind::Double)?)?;
            out.push(ScoreOutput {
                logprob: v.iter().sum(),
                token_logprobs: v,
            });
        }
        Ok(out)
    }

    /// Log-softmax over label tokens at the next position; outputs in request order.
    pub fn classify(&self, requests: &[ClassifyRequest]) -> Result<Vec<ClassifyOutput>> {
        let _span = tracing::info_span!("engine_classify", requests = requests.len()).entered();
        let vocab = self.model.config().vocab_size;
        for (i, r) in requests.iter().enumerate() {
            if r.prompt.is_empty() || r.labels.is_empty() {
                return Err(Error::InvalidRequest {
                    index: i,
                    message: "prompt and labels must be non-empty".into(),
                });
            }
            check_ids(i, &r.prompt, vocab)?;
            check_ids(i, &r.labels, vocab)?;
        }
        // Padding is wasted compute: within each run of requests that share an adapter and a
        // prompt prefix (e.g. one question's paragraphs), rows go by prompt length, so a chunk's
        // rows have similar lengths while still sharing their prefix. Outputs keep input order.
        let order = self.length_order(requests);
        let mut out: Vec<Option<ClassifyOutput>> = vec![None; requests.len()];
        for chunk in order.chunks(self.config.max_batch_rows.max(1)) {
            let reqs: Vec<ClassifyRequest> = chunk.iter().map(|&i| requests[i].clone()).collect();
            let res = tch::no_grad(|| self.classify_chunk(&reqs))?;
            for (&i, o) in chunk.iter().zip(res) {
                out[i] = Some(o);
            }
        }
        out.into_iter()
            .enumerate()
            .map(|(i, o)| {
                o.ok_or_else(|| Error::InvalidRequest {
                    index: i,
                    message: "no output was produced for this request".into(),
                })
            })
            .collect()
    }

    /// Request indices grouped into runs of consecutive requests with the same adapter and a
    /// common prompt prefix of at least `min_shared_prefix` tokens, each run sorted by prompt
    /// length (stable), runs in input order.
    fn length_order(&self, requests: &[ClassifyRequest]) -> Vec<usize> {
        let mut order = Vec::with_capacity(requests.len());
        let mut run: Vec<usize> = Vec::new();
        let flush = |run: &mut Vec<usize>, order: &mut Vec<usize>| {
            run.sort_by_key(|&i| requests[i].prompt.len());
            order.append(run);
        };
        for (i, r) in requests.iter().enumerate() {
            if let Some(&first) = run.first() {
                let head = &requests[first];
                let common = head
                    .prompt
                    .iter()
                    .zip(&r.prompt)
                    .take_while(|(a, b)| a == b)
                    .count();
                if head.adapter != r.adapter || common < self.config.min_shared_prefix.max(1) {
                    flush(&mut run, &mut order);
                }
            }
            run.push(i);
        }
        flush(&mut run, &mut order);
        order
    }

    /// A cache holding each row's reusable prefix, and how many leading tokens of each prompt
    /// it holds: stored prefixes when at least one row has one worth using, otherwise the
    /// rows' common prefix computed once ([`Self::prefill_shared`]).
    /// `extra` more slots are left free after the prompts (for generated tokens).
    fn prefill_from_store(
        &self,
        store: &mut PrefixStore,
        prompts: &[&[u32]],
        names: &[Option<&str>],
        extra: usize,
    ) -> Result<(crate::kv::KvCache, Vec<usize>)> {
        let min = self.config.min_shared_prefix.max(1);
        if store.enabled() {
            let hits: Vec<Option<(usize, usize)>> = prompts
                .iter()
                .zip(names)
                .map(|(p, a)| store.lookup(*a, p, p.len() - 1).filter(|h| h.1 >= min))
                .collect();
            if hits.iter().any(Option::is_some) {
                let mut parts: Vec<(&[Tensor], &[Tensor], usize)> = Vec::with_capacity(hits.len());
                for h in &hits {
                    parts.push(match h.and_then(|(i, c)| store.entry(i).map(|e| (e, c))) {
                        Some((e, c)) => (&e.keys[..], &e.values[..], c),
                        None => (&[][..], &[][..], 0),
                    });
                }
                let c = self.model.config();
                let cache = crate::kv::KvCache::from_prefixes(
                    &parts,
                    c.num_key_value_heads(),
                    c.head_dim(),
                    prompts.iter().map(|p| p.len()).max().unwrap_or(0) + extra + 1,
                    self.model.device(),
                    self.model.kind(),
                    c.num_hidden_layers,
                )?;
                let starts: Vec<usize> = parts.iter().map(|p| p.2).collect();
                drop(parts);
                store.hits_tokens += starts.iter().sum::<usize>();
                return Ok((cache, starts));
            }
        }
        let cache = self.prefill_shared(prompts, names, extra)?;
        let shared = cache.len();
        Ok((cache, vec![shared; prompts.len()]))
    }

    /// Keep every row's prompt keys and values in the store: row `r`'s prompt sits at cache
    /// slots `0..starts[r]` followed by `rest[r]..rest[r] + (len - starts[r])`.
    fn store_prompts(
        &self,
        store: &mut PrefixStore,
        cache: &crate::kv::KvCache,
        prompts: &[&[u32]],
        names: &[Option<&str>],
        starts: &[usize],
        rest: &[usize],
    ) -> Result<()> {
        if !store.enabled() {
            return Ok(());
        }
        for (r, p) in prompts.iter().enumerate() {
            // Copying a row's keys and values costs a pass over its cache; skip known prompts.
            if store.covers(names[r], p) {
                continue;
            }
            let slots: Vec<i64> = (0..starts[r] as i64)
                .chain(rest[r] as i64..(rest[r] + p.len() - starts[r]) as i64)
                .collect();
            let (k, v) = cache.row_slots(r, &slots)?;
            store.insert(names[r], p, k, v)?;
        }
        tracing::debug!(
            reused_tokens = store.hits_tokens,
            looked_up_tokens = store.lookup_tokens,
            "prefix store"
        );
        Ok(())
    }

    fn classify_chunk(&self, reqs: &[ClassifyRequest]) -> Result<Vec<ClassifyOutput>> {
        let b = reqs.len();
        let prompts: Vec<&[u32]> = reqs.iter().map(|r| r.prompt.as_slice()).collect();
        let names: Vec<Option<&str>> = reqs.iter().map(|r| r.adapter.as_deref()).collect();
        let (_cache, logits) = self.prefill_prompts(&prompts, &names, 0, true)?;
        let logp = logits
            .f_to_kind(Kind::Float)?
            .f_log_softmax(-1, Kind::Float)?;
        let mut out = Vec::with_capacity(b);
        for (r, req) in reqs.iter().enumerate() {
            let raw: Vec<f64> = req
                .labels
                .iter()
                .map(|&l| logp.f_double_value(&[r as i64, l as i64]))
                .collect::<std::result::Result<_, _>>()?;
            let m = raw.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + raw.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            out.push(ClassifyOutput {
                label_logprobs: raw.iter().map(|x| x - lse).collect(),
                raw_logprobs: raw,
            });
        }
        Ok(out)
    }

    /// Beam search / diverse group beam search for one request (transformers'
    /// semantics: per-group hypotheses, Hamming diversity penalty folded into
    /// the beam scores, finished score = sum / generated_len^length_penalty with
    /// the EOS token counted, `early_stopping = false` heuristic).
    fn beam_search(&self, req: &GenerateRequest) -> Result<GenerateOutput> {
        let _span = tracing::debug_span!("engine_beam_search").entered();
        let (num_beams, groups, diversity, lp) = match &req.params.decoding {
            Decoding::Beam {
                num_beams,
                num_beam_groups,
                diversity_penalty,
                length_penalty,
            } => (
                *num_beams,
                *num_beam_groups,
                *diversity_penalty,
                *length_penalty,
            ),
            _ => {
                return Err(Error::InvalidRequest {
                    index: 0,
                    message: "not a beam request".into(),
                })
            }
        };
        let gs = num_beams / groups;
        let params = &req.params;
        let names: Vec<Option<&str>> = vec![req.adapter.as_deref(); num_beams];
        // The prompt starts from its longest stored prefix (a flow's alternative for a node
        // call re-asks that call's prompt), and is stored for later calls.
        let (mut cache, first) = self.prefill_prompts(
            &[req.prompt.as_slice()],
            &names[..1],
            params.max_new_tokens,
            false,
        )?;
        cache.select_rows(&vec![0; num_beams])?;
        let mut logits = first.f_expand([num_beams as i64, -1], false)?;
        // Running beams: tokens, beam score (processed), raw logprob.
        let mut seqs: Vec<Vec<u32>> = vec![Vec::new(); num_beams];
        let mut scores: Vec<f64> = (0..num_beams)
            .map(|i| if i % gs == 0 { 0.0 } else { -1e9 })
            .collect();
        let mut raw: Vec<f64> = vec![0.0; num_beams];
        // Finished hypotheses per group: (score, ids, raw logprob, reason).
        let mut hyps: Vec<Vec<Hypothesis>> = vec![Vec::new(); groups];
        let mut group_done = vec![false; groups];
        let vocab = self.model.config().vocab_size as i64;
        for step in 0..params.max_new_tokens {
            let cur = step + 1; // generated length including this step's token
            let logp_all = logits
                .f_to_kind(Kind::Float)?
                .f_log_softmax(-1, Kind::Float)?;
            let mut next_rows = vec![0usize; num_beams];
            let mut next_tok = vec![0u32; num_beams];
            let mut next_scores = scores.clone();
            let mut next_raw = raw.clone();
            let mut step_tokens: Vec<u32> = Vec::new();
            for g in 0..groups {
                let rows: Vec<usize> = (g * gs..(g + 1) * gs).collect();
                if group_done[g] {
                    for &r in &rows {
                        next_rows[r] = r;
                        next_tok[r] = self.eos.first().copied().unwrap_or(0);
                    }
                    continue;
                }
                let idx =
                    Tensor::f_from_slice(&rows.iter().map(|&r| r as i64).collect::<Vec<_>>())?
                        .f_to(self.model.device())?;
                let lp_g = logp_all.f_index_select(0, &idx)?;
                let mut processed = lp_g.shallow_clone();
                if diversity != 0.0 && !step_tokens.is_empty() {
                    let mut freq = vec![0f32; vocab as usize];
                    for &t in &step_tokens {
                        freq[t as usize] += 1.0;
                    }
                    let freq = Tensor::f_from_slice(&freq)?.f_to(self.model.device())?;
                    processed = processed.f_sub(&freq.f_mul_scalar(diversity)?.f_unsqueeze(0)?)?;
                }
                let s = Tensor::f_from_slice(
                    &rows.iter().map(|&r| scores[r] as f32).collect::<Vec<_>>(),
                )?
                .f_to(self.model.device())?;
                let total = processed.f_add(&s.f_unsqueeze(-1)?)?.f_flatten(0, -1)?;
                let k = (2 * gs) as i64;
                let (top_v, top_i) = total.f_topk(k, -1, true, true)?;
                let top_v: Vec<f64> = Vec::try_from(top_v.f_to_kind(Kind::Double)?)?;
                let top_i: Vec<i64> = Vec::try_from(top_i)?;
                let mut chosen = 0;
                for (rank, (&v, &flat)) in top_v.iter().zip(&top_i).enumerate() {
                    let beam = (flat / vocab) as usize;
                    let tok = (flat % vocab) as u32;
                    let src = rows[beam];
                    let tok_raw = raw[src] + lp_g.f_double_value(&[beam as i64, tok as i64])?;
                    let mut cand = seqs[src].clone();
                    cand.push(tok);
                    let eos = self.is_eos(params, tok);
                    let stop = !eos && self.hits_stop(params, &cand)?;
                    if eos || stop {
                        if rank >= gs {
                            continue;
                        }
                        let score = v / (cur as f64).powf(lp);
                        let reason = if eos {
                            FinishReason::Eos
                        } else {
                            FinishReason::Stop
                        };
                        add_hyp(&mut hyps[g], gs, (score, cand, tok_raw, reason));
                    } else {
                        let dst = rows[chosen];
                        next_rows[dst] = src;
                        next_tok[dst] = tok;
                        next_scores[dst] = v;
                        next_raw[dst] = tok_raw;
                        chosen += 1;
                    }
                    if chosen == gs {
                        break;
                    }
                }
                // Done when full and no running beam can beat the worst finished one. Plain beam
                // search (transformers 5) bounds with the best running beam; group beam search
                // (transformers 4.x, `BeamHypotheses.is_done`) with the best candidate score.
                let best = if groups == 1 {
                    rows.iter()
                        .map(|&r| next_scores[r])
                        .fold(f64::NEG_INFINITY, f64::max)
                } else {
                    top_v.first().copied().unwrap_or(f64::NEG_INFINITY)
                };
                if hyps[g].len() >= gs {
                    let worst = hyps[g].iter().map(|h| h.0).fold(f64::INFINITY, f64::min);
                    if worst >= best / (cur as f64).powf(lp) {
                        group_done[g] = true;
                    }
                }
                for &r in &rows {
                    step_tokens.push(next_tok[r]);
                }
            }
            let new_seqs: Vec<Vec<u32>> = (0..num_beams)
                .map(|r| {
                    let mut s = seqs[next_rows[r]].clone();
                    s.push(next_tok[r]);
                    s
                })
                .collect();
            seqs = new_seqs;
            scores = next_scores;
            raw = next_raw;
            if group_done.iter().all(|&d| d) || step + 1 == params.max_new_tokens {
                break;
            }
            cache.select_rows(&next_rows)?;
            let ids: Vec<i64> = next_tok.iter().map(|&t| t as i64).collect();
            logits = self.with_adapters(&names, |d| {
                self.model.forward_cached(
                    &self.ids_tensor(&ids, num_beams, 1)?,
                    None,
                    &mut cache,
                    &LogitsAt::Last,
                    d,
                )
            })?;
        }
        // Finalise: running beams of unfinished groups become hypotheses.
        for g in 0..groups {
            if group_done[g] {
                continue;
            }
            for r in g * gs..(g + 1) * gs {
                let len = seqs[r].len().max(1) as f64;
                add_hyp(
                    &mut hyps[g],
                    gs,
                    (
                        scores[r] / len.powf(lp),
                        seqs[r].clone(),
                        raw[r],
                        FinishReason::Length,
                    ),
                );
            }
        }
        let mut all: Vec<_> = hyps.into_iter().flatten().collect();
        all.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap_or(std::cmp::Ordering::Equal));
        let mut sequences = Vec::new();
        for (score, ids, logprob, finish) in all.into_iter().take(params.num_return_sequences) {
            let text = self.tokenizer.decode(&ids, true)?;
            sequences.push(GeneratedSequence {
                ids,
                text,
                logprob,
                score,
                finish,
            });
        }
        Ok(GenerateOutput { sequences })
    }
}

/// The part of each prompt not served from a cache (row `r` from token `starts[r]` on), laid out
/// as one `[B, t]` batch: right-padded, or left-padded so that every row ends in the last column.
struct PromptRests {
    t: usize,
    ids: Vec<i64>,
    valid: Vec<bool>,
    /// Column of each row's last prompt token.
    last: Vec<usize>,
    /// Cache slot of each row's first rest token (`base` plus its left padding).
    rest_at: Vec<usize>,
}

impl PromptRests {
    fn new(prompts: &[&[u32]], starts: &[usize], base: usize, right_pad: bool) -> Self {
        let b = prompts.len();
        let t = prompts
            .iter()
            .zip(starts)
            .map(|(p, s)| p.len() - s)
            .max()
            .unwrap_or(0);
        let mut out = Self {
            t,
            ids: vec![0; b * t],
            valid: vec![false; b * t],
            last: Vec::with_capacity(b),
            rest_at: Vec::with_capacity(b),
        };
        for (r, p) in prompts.iter().enumerate() {
            let rest = &p[starts[r]..];
            let pad = if right_pad { 0 } else { t - rest.len() };
            for (c, &tok) in rest.iter().enumerate() {
                out.ids[r * t + pad + c] = tok as i64;
                out.valid[r * t + pad + c] = true;
            }
            out.last.push(pad + rest.len() - 1);
            out.rest_at.push(base + pad);
        }
        out
    }
}

/// A finished beam hypothesis: (score, ids, raw log-prob, finish reason).
type Hypothesis = (f64, Vec<u32>, f64, FinishReason);

/// Keep the `cap` best hypotheses.
fn add_hyp(list: &mut Vec<Hypothesis>, cap: usize, h: Hypothesis) {
    // A full list only admits a strictly better hypothesis, as in HF's BeamHypotheses.add.
    let worst = list.iter().map(|x| x.0).fold(f64::INFINITY, f64::min);
    if list.len() >= cap && h.0 <= worst {
        return;
    }
    list.push(h);
    if list.len() > cap {
        let worst = list
            .iter()
            .enumerate()
            .min_by(|a, b| {
                a.1 .0
                    .partial_cmp(&b.1 .0)
                    .unwrap_or(std::cmp::Ordering::Equal)
            })
            .map(|(i, _)| i);
        if let Some(i) = worst {
            list.remove(i);
        }
    }
}

fn check_ids(index: usize, ids: &[u32], vocab: usize) -> Result<()> {
    if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::InvalidRequest {
            index,
            message: format!("token id {bad} >= vocab size {vocab}"),
        });
    }
    Ok(())
}

fn validate_generate(index: usize, r: &GenerateRequest, vocab: usize) -> Result<()> {
    let bad = |m: String| Error::InvalidRequest { index, message: m };
    if r.prompt.is_empty() {
        return Err(bad("empty prompt".into()));
    }
    check_ids(index, &r.prompt, vocab)?;
    if r.params.num_return_sequences == 0 {
        return Err(bad("num_return_sequences must be positive".into()));
    }
    match &r.params.decoding {
        Decoding::Greedy => {}
        Decoding::Sample {
            temperature, top_p, ..
        } => {
            // NaN fails both checks.
            if temperature.is_nan()
                || *temperature <= 0.0
                || top_p.is_nan()
                || *top_p <= 0.0
                || *top_p > 1.0
            {
                return Err(bad(format!(
                    "temperature {temperature} must be > 0 and top_p {top_p} in (0, 1]"
                )));
            }
        }
        Decoding::Beam {
            num_beams,
            num_beam_groups,
            ..
        } => {
            if *num_beams == 0 || *num_beam_groups == 0 || num_beams % num_beam_groups != 0 {
                return Err(bad(format!(
                    "num_beam_groups {num_beam_groups} must divide num_beams {num_beams}"
                )));
            }
            if r.params.num_return_sequences > *num_beams {
                return Err(bad("num_return_sequences exceeds num_beams".into()));
            }
        }
    }
    Ok(())
}

/// HF's sampling warpers (temperature, top-k, top-p with at least one token
/// kept) then a draw from the renormalised distribution.
pub fn sample_hf(
    logits: &[f32],
    temperature: f64,
    top_k: usize,
    top_p: f64,
    rng: &mut impl rand::Rng,
) -> u32 {
    let mut scaled: Vec<(f64, usize)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (l as f64 / temperature, i))
        .collect();
    scaled.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap_or(std::cmp::Ordering::Equal));
    if top_k > 0 && top_k < scaled.len() {
        scaled.truncate(top_k);
    }
    let m = scaled.first().map(|x| x.0).unwrap_or(0.0);
    let z: f64 = scaled.iter().map(|x| (x.0 - m).exp()).sum();
    if top_p < 1.0 {
        // Keep the smallest prefix (by descending probability) whose mass reaches top_p.
        let mut cum = 0.0;
        let mut keep = scaled.len();
        for (i, x) in scaled.iter().enumerate() {
            cum += (x.0 - m).exp() / z;
            if cum >= top_p {
                keep = i + 1;
                break;
            }
        }
        scaled.truncate(keep.max(1));
    }
    let z: f64 = scaled.iter().map(|x| (x.0 - m).exp()).sum();
    let mut u: f64 = rng.random::<f64>() * z;
    for x in &scaled {
        u -= (x.0 - m).exp();
        if u <= 0.0 {
            return x.1 as u32;
        }
    }
    scaled.last().map(|x| x.1 as u32).unwrap_or(0)
}
