//! The node learner step: a batch of feedback records for one node becomes a loss on
//! its LoRA adapter and one COCOB step.
//!
//! Per node, adapter `node` is trained and `node.ref` (see [`reference_name`]) is the
//! frozen DPO reference. Records carry token ids (never re-tokenised):
//! [`PreferencePair`] → weighted DPO (sigmoid, β) against the reference;
//! [`TargetRecord`] → weighted supervised NLL on the gold completion;
//! [`LabelRecord`] → weighted label NLL over the record's label set at the next-token
//! position. Records are processed in micro-batches (gradients accumulate), then the
//! gradient is clipped (1.0 by default) and COCOB steps.
//!
//! Completion log-probs, two strategies (same values and gradients, tested):
//! [`PromptSharing::Concatenate`] (default) runs prompt + completion as one sequence per
//! completion and takes the completion part of the full logits;
//! [`PromptSharing::SharedKv`] runs the prompts of a micro-batch once (left-padded,
//! through the model's KV cache, with gradients), repeats the cache rows for each
//! completion (chosen and rejected) and runs only the completion tokens on top (the
//! logits at the last prompt token predict the first completion token; `lm_head` never
//! runs on prompt positions). SharedKv does fewer FLOPs but measured slower in bf16 on
//! CPU (masked SDPA on the cached path, cache copies in backward); see docs/learning.md.
//!
//! Label prompts: with [`LabelSharing::PrefixGroups`] (default) records whose prompts share
//! most of their tokens ([`prefix_groups`]) run the shared prefix once through the KV cache,
//! with gradients, and only each record's remaining tokens on top
//! ([`grouped_next_token_logits`]); same values and gradients as running every prompt whole.
//! Training micro-batches on the CPU take their gradients from the model's hand-written
//! backward pass ([`LearnerConfig::recorded_backward`]) where it applies.
//!
//! Counted tokens: every completion token as given (for chat data: the content tokens
//! plus the end-of-turn token `<|im_end|>`, as TRL counts them); nothing of the prompt.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use flowtune_cocob::{Cocob, CocobConfig};
use flowtune_lm::model::{LinearDelta, LogitsAt, LoraGrads, Model, SiteFactors};
use flowtune_lora::{AdapterBank, AdapterSelection};
use flowtune_loss::{DpoStats, LabelStats, NllStats};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Errors of the learner.
#[derive(Debug, thiserror::Error)]
pub enum LearnerError {
    /// A record cannot be trained on.
    #[error("record {index} of node `{node}`: {reason}")]
    BadRecord {
        /// The node.
        node: String,
        /// Index of the record in the submitted batch.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// A configuration value is out of range.
    #[error("invalid learner config field `{field}`: {reason}")]
    InvalidConfig {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// A saved learner state does not fit.
    #[error("learner state {path}: {reason}")]
    State {
        /// The file or folder.
        path: PathBuf,
        /// What does not fit.
        reason: String,
    },
    /// Reading or writing a file failed.
    #[error("i/o error on {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// JSON (de)serialisation failed.
    #[error("bad JSON in {path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: serde_json::Error,
    },
    /// From the model.
    #[error(transparent)]
    Lm(#[from] flowtune_lm::Error),
    /// From the adapter bank.
    #[error(transparent)]
    Lora(#[from] flowtune_lora::LoraError),
    /// From the losses.
    #[error(transparent)]
    Loss(#[from] flowtune_loss::Error),
    /// From the optimizer.
    #[error(transparent)]
    Cocob(#[from] flowtune_cocob::Error),
    /// A thread running micro-batches side by side ([`MicroBatchThreads`]) failed.
    #[error("micro-batch thread: {0}")]
    MicroBatchThread(String),
    /// The recorded backward found no gradient where the loss must have one.
    #[error("no gradient of {0}")]
    MissingGradient(&'static str),
    /// From libtorch.
    #[error("torch error: {0}")]
    Torch(#[from] tch::TchError),
}

/// Result alias of the learner.
pub type Result<T, E = LearnerError> = std::result::Result<T, E>;

/// A preference between two completions of one prompt (token ids), weighted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreferencePair {
    /// Prompt token ids (chat template applied, generation prompt included).
    pub prompt: Vec<u32>,
    /// The preferred completion's token ids (incl. the end-of-turn token).
    pub chosen: Vec<u32>,
    /// The other completion's token ids.
    pub rejected: Vec<u32>,
    /// Pair weight (e.g. |Δreward|), ≥ 0; zero-weight pairs are dropped.
    pub weight: f64,
}

/// A gold completion for a prompt (supervised NLL), weighted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetRecord {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Gold completion token ids.
    pub completion: Vec<u32>,
    /// Weight ≥ 0; zero-weight records are dropped.
    pub weight: f64,
}

/// A gold label among a label set at the next-token position (label NLL), weighted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelRecord {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// The label set: one token id per label (e.g. `Yes`, `No`).
    pub labels: Vec<u32>,
    /// Index of the gold label in `labels`.
    pub label: usize,
    /// Weight ≥ 0; zero-weight records are dropped.
    pub weight: f64,
}

/// The records of one learner step for one node (one kind per step).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum NodeRecords {
    /// DPO pairs.
    Preferences(Vec<PreferencePair>),
    /// Supervised completions.
    Targets(Vec<TargetRecord>),
    /// Supervised labels.
    Labels(Vec<LabelRecord>),
}

/// How completion log-probs are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum PromptSharing {
    /// Prompt once through the KV cache, completions on top. Fewer FLOPs, but measured
    /// slower in bf16 on CPU (see docs/learning.md), so not the default.
    SharedKv,
    /// Prompt + completion as one sequence per completion, full logits (default).
    #[default]
    Concatenate,
}

/// How label records' prompts share computation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum LabelSharing {
    /// Prompts that share most of their tokens (one paragraph scored under several queries,
    /// a growing scratchpad) form [`PrefixGroup`]s: each group's common prefix runs once
    /// through the KV cache, with gradients, and each record's remaining tokens run on top.
    /// Same values and gradients as [`LabelSharing::Unshared`] (tested), fewer FLOPs.
    #[default]
    PrefixGroups,
    /// Every prompt runs in full (left-padded micro-batches in record order).
    Unshared,
}

/// Learner hyper-parameters (serde).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LearnerConfig {
    /// DPO β (the paper: 1).
    pub beta: f64,
    /// Gradient clipping on the joint L2 norm (the paper: 1.0).
    pub max_grad_norm: f64,
    /// Records per micro-batch (a pair counts once; it runs 2 completions).
    pub micro_batch: usize,
    /// How prompts are shared between completions.
    pub prompt_sharing: PromptSharing,
    /// How label prompts share prefixes (absent in older saved configs: the default).
    #[serde(default)]
    pub label_sharing: LabelSharing,
    /// The optimizer (the paper: COCOB α = 1000).
    pub cocob: CocobConfig,
    /// Whether DPO steps drop LoRA inputs (each adapter's `lora_dropout`). Supervised steps
    /// always do, as PEFT under TRL's `SFTTrainer`; DPO steps do not by default, as TRL's
    /// `DPOConfig.disable_dropout = True`. Absent in older saved configs: false.
    #[serde(default)]
    pub dpo_dropout: bool,
    /// Training micro-batches run at once on the CPU, each on one thread
    /// ([`MicroBatchThreads`]). Absent in older saved configs: the default.
    #[serde(default)]
    pub micro_batch_threads: MicroBatchThreads,
    /// Whether training micro-batches (labels, DPO pairs, supervised targets) take their
    /// gradients from the model's hand-written backward pass ([`Model::forward_recorded`]:
    /// the inference forward's fused kernels, then the layers' backward by hand, no autograd
    /// graph) where the model supports it (CPU, bf16 or float32, no sliding windows, LoRA
    /// without dropout); autograd otherwise, and always when false. Completions then run on
    /// top of their prompt's KV cache (as [`PromptSharing::SharedKv`], whatever
    /// `prompt_sharing` says), the DPO reference the same way. The same gradients to float
    /// rounding (float32) or bf16 rounding (tested against autograd); see docs/learning.md.
    /// Absent in older saved configs: true.
    #[serde(default = "recorded_backward_default")]
    pub recorded_backward: bool,
}

fn recorded_backward_default() -> bool {
    true
}

/// How a training step's micro-batches use the CPU's threads.
///
/// libtorch splits each operation over its intra-op threads; in a training step many of
/// them are small (the LoRA products, elementwise ops, the autograd engine's own work on
/// the calling thread) and the other threads wait. Running micro-batches side by side,
/// each single-threaded, keeps every core busy: on the development VM (2 cores) two
/// single-threaded label steps side by side took 79-84 s each against 50 s for one on
/// both threads, ~19 % more throughput (docs/lm-running.md, session 17).
///
/// Side by side, each micro-batch's gradients are taken on its own (no accumulation
/// into the shared parameters from two threads) and summed in micro-batch order, so the
/// result does not depend on the number of threads or on their timing: it is the result
/// of running the same micro-batches one after another single-threaded, bit for bit
/// (tested). It can differ in the last bits from [`MicroBatchThreads::Serial`] on more
/// threads, whose products split their sums differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum MicroBatchThreads {
    /// As many micro-batches at once as libtorch has intra-op threads, on the CPU; one
    /// after another where that is 1, on CUDA, and where LoRA dropout draws random
    /// numbers (whose order would then depend on timing).
    #[default]
    Auto,
    /// One after another, each on all of libtorch's threads.
    Serial,
    /// This many at once (at least 1), each single-threaded, with the same fallbacks as
    /// `Auto`.
    Threads(usize),
}

impl Default for LearnerConfig {
    fn default() -> Self {
        Self {
            beta: 1.0,
            max_grad_norm: 1.0,
            micro_batch: 4,
            prompt_sharing: PromptSharing::Concatenate,
            label_sharing: LabelSharing::PrefixGroups,
            cocob: CocobConfig::paper(),
            dpo_dropout: false,
            micro_batch_threads: MicroBatchThreads::Auto,
            recorded_backward: true,
        }
    }
}

/// What one learner step did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepStats {
    /// Node trained.
    pub node: String,
    /// Total loss (`Σ wᵢℓᵢ / N` over all micro-batches).
    pub loss: f64,
    /// Records trained on (after dropping zero weights).
    pub records: usize,
    /// Records dropped for zero weight.
    pub dropped: usize,
    /// Joint gradient norm before clipping.
    pub grad_norm: f64,
    /// DPO statistics (pairs), pair-weighted means over micro-batches.
    pub dpo: Option<DpoStats>,
    /// NLL statistics (targets).
    pub nll: Option<NllStats>,
    /// Label statistics (labels).
    pub label: Option<LabelStats>,
}

/// The name of a node's reference adapter.
pub fn reference_name(node: &str) -> String {
    format!("{node}.ref")
}

/// Binds an adapter bank and a selection so the model's linears add the LoRA delta.
pub struct BankDelta<'a> {
    bank: &'a AdapterBank,
    selection: AdapterSelection,
}

impl<'a> BankDelta<'a> {
    /// Every row of the batch uses adapter `name`.
    pub fn all(bank: &'a AdapterBank, name: &str) -> Result<Self> {
        Ok(Self {
            bank,
            selection: AdapterSelection::All(bank.id(name)?),
        })
    }
}

impl LinearDelta for BankDelta<'_> {
    fn delta(&self, layer: usize, module: &str, x: &Tensor) -> flowtune_lm::Result<Option<Tensor>> {
        self.bank
            .delta_at(layer, module, x, &self.selection)
            .map_err(|e| {
                flowtune_lm::Error::ModelInput(format!("LoRA delta at layer {layer} {module}: {e}"))
            })
    }

    fn row_independent(&self) -> bool {
        self.selection.is_uniform()
    }

    fn factors(&self, layer: usize, module: &str) -> flowtune_lm::Result<SiteFactors> {
        LinearDelta::factors(&self.bank.select(&self.selection), layer, module)
    }
}

fn ids_tensor(rows: &[Vec<i64>], device: tch::Device) -> Result<Tensor> {
    let t = rows.first().map(|r| r.len()).unwrap_or(0) as i64;
    let flat: Vec<i64> = rows.iter().flatten().copied().collect();
    Ok(Tensor::f_from_slice(&flat)?
        .f_view([rows.len() as i64, t])?
        .f_to_device(device)?)
}

/// Runs `prompts` left-padded (id 0, masked) through a fresh KV cache with room for `extra`
/// more tokens per row; returns the logits asked for and the cache.
fn prefill(
    model: &Model,
    delta: Option<&dyn LinearDelta>,
    prompts: &[&[u32]],
    extra: usize,
    at: &LogitsAt,
) -> Result<(Tensor, flowtune_lm::kv::KvCache)> {
    let (rows, valid, tp) = left_padded(prompts);
    let mut cache = model.new_cache(prompts.len(), tp + extra)?;
    let logits = model.forward_cached(
        &ids_tensor(&rows, model.device())?,
        Some(&valid),
        &mut cache,
        at,
        delta,
    )?;
    Ok((logits, cache))
}

/// An error naming the first group with an empty prompt or an empty completion.
fn check_completion_groups(groups: &[(&[u32], Vec<&[u32]>)]) -> Result<()> {
    match groups
        .iter()
        .position(|(prompt, comps)| prompt.is_empty() || comps.iter().any(|c| c.is_empty()))
    {
        Some(index) => Err(flowtune_lm::Error::InvalidRequest {
            index,
            message: "empty prompt or completion".into(),
        }
        .into()),
        None => Ok(()),
    }
}

/// The completions of `(prompt, completions)` groups as rows on top of their prompts' cache
/// rows: per completion its prompt (`rows`), its ids right-padded with 0 to the longest
/// completion's length `tc` (`c_rows`), and the validity of every slot (`c_valid`, row-major
/// `[completions, tc]`).
struct CompletionRows {
    rows: Vec<usize>,
    c_rows: Vec<Vec<i64>>,
    c_valid: Vec<bool>,
    tc: usize,
}

impl CompletionRows {
    fn new(groups: &[(&[u32], Vec<&[u32]>)]) -> Self {
        let tc = groups
            .iter()
            .flat_map(|g| g.1.iter().map(|c| c.len()))
            .max()
            .unwrap_or(0);
        let mut out = Self {
            rows: Vec::new(),
            c_rows: Vec::new(),
            c_valid: Vec::new(),
            tc,
        };
        for (g, (_, comps)) in groups.iter().enumerate() {
            for c in comps {
                out.rows.push(g);
                right_padded(c, tc, &mut out.c_rows, &mut out.c_valid);
            }
        }
        out
    }

    /// `rows` as an int64 index tensor on `device` (each completion's prompt row).
    fn index(rows: &[usize], device: tch::Device) -> Result<Tensor> {
        let rows: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
        Ok(Tensor::f_from_slice(&rows)?.f_to_device(device)?)
    }

    /// The validity of the fed slots: each completion but its last column (the last token
    /// predicts nothing).
    fn feed_valid(c_valid: &[bool], tc: usize) -> Vec<bool> {
        c_valid
            .chunks(tc)
            .flat_map(|row| row[..tc - 1].iter().copied())
            .collect()
    }
}

/// Appends `tokens` right-padded with id 0 to `t` columns to `rows`, and its slots' validity
/// to `valid`.
fn right_padded(tokens: &[u32], t: usize, rows: &mut Vec<Vec<i64>>, valid: &mut Vec<bool>) {
    let mut row: Vec<i64> = tokens.iter().map(|&x| x as i64).collect();
    row.resize(t, 0);
    rows.push(row);
    valid.extend(std::iter::repeat_n(true, tokens.len()));
    valid.extend(std::iter::repeat_n(false, t.saturating_sub(tokens.len())));
}

/// `prompts` left-padded with id 0 to their longest: rows, validity (row-major) and length.
fn left_padded(prompts: &[&[u32]]) -> (Vec<Vec<i64>>, Vec<bool>, usize) {
    let tp = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let mut rows = Vec::with_capacity(prompts.len());
    let mut valid = Vec::with_capacity(prompts.len() * tp);
    for p in prompts {
        let pad = tp - p.len();
        let mut row = vec![0i64; pad];
        row.extend(p.iter().map(|&x| x as i64));
        rows.push(row);
        valid.extend(std::iter::repeat_n(false, pad));
        valid.extend(std::iter::repeat_n(true, p.len()));
    }
    (rows, valid, tp)
}

/// Summed completion log-probs `[Σ completions]` for `groups` of (prompt, completions),
/// in group order, completions in their order. Gradients flow through `delta` when
/// enabled. See the module docs for the two strategies.
pub fn completion_logprobs(
    model: &Model,
    delta: Option<&dyn LinearDelta>,
    groups: &[(&[u32], Vec<&[u32]>)],
    sharing: PromptSharing,
) -> Result<Tensor> {
    let _span = tracing::trace_span!("completion_logprobs", groups = groups.len()).entered();
    let device = model.device();
    check_completion_groups(groups)?;
    match sharing {
        PromptSharing::SharedKv => {
            let CompletionRows {
                rows,
                c_rows,
                c_valid,
                tc,
            } = CompletionRows::new(groups);
            let prompts: Vec<&[u32]> = groups.iter().map(|g| g.0).collect();
            let (first, mut cache) = prefill(model, delta, &prompts, tc, &LogitsAt::Last)?; // [P, V]
                                                                                            // Repeat each prompt's cache row once per completion.
            cache.select_rows(&rows)?;
            let targets = ids_tensor(&c_rows, device)?;
            let first = first
                .f_index_select(0, &CompletionRows::index(&rows, device)?)?
                .f_unsqueeze(1)?; // [R, 1, V]
            let logits = if tc > 1 {
                // Only the first tc-1 completion tokens are fed: the last one predicts nothing.
                let feed = targets.f_narrow(1, 0, tc as i64 - 1)?;
                let feed_valid = CompletionRows::feed_valid(&c_valid, tc);
                let rest = model.forward_cached(
                    &feed,
                    Some(&feed_valid),
                    &mut cache,
                    &LogitsAt::All,
                    delta,
                )?;
                Tensor::f_cat(&[first, rest], 1)?
            } else {
                first
            };
            let mask = Tensor::f_from_slice(&c_valid)?
                .f_view([rows.len() as i64, tc as i64])?
                .f_to_device(device)?;
            Ok(flowtune_loss::completion_logprobs(
                &logits, &targets, &mask,
            )?)
        }
        PromptSharing::Concatenate => {
            let seqs: Vec<(&[u32], &[u32])> = groups
                .iter()
                .flat_map(|(p, cs)| cs.iter().map(move |c| (*p, *c)))
                .collect();
            let t = seqs
                .iter()
                .map(|(p, c)| p.len() + c.len())
                .max()
                .unwrap_or(0);
            let mut ids = Vec::new();
            let mut attn = Vec::new();
            let mut targets = Vec::new();
            let mut mask = Vec::new();
            for (p, c) in &seqs {
                let n = p.len() + c.len();
                let mut row: Vec<i64> = p.iter().chain(c.iter()).map(|&x| x as i64).collect();
                row.resize(t, 0);
                // position j predicts row[j + 1]
                let mut tgt: Vec<i64> = row[1..].to_vec();
                tgt.push(0);
                let m: Vec<bool> = (0..t).map(|j| j + 1 >= p.len() && j + 1 < n).collect();
                attn.extend((0..t).map(|j| i64::from(j < n)));
                ids.push(row);
                targets.push(tgt);
                mask.extend(m);
            }
            let ids_t = ids_tensor(&ids, device)?;
            let attn_t = Tensor::f_from_slice(&attn)?.f_view([seqs.len() as i64, t as i64])?;
            let logits = model.forward(&ids_t, &attn_t, delta)?;
            let mask_t = Tensor::f_from_slice(&mask)?
                .f_view([seqs.len() as i64, t as i64])?
                .f_to_device(device)?;
            Ok(flowtune_loss::completion_logprobs(
                &logits,
                &ids_tensor(&targets, device)?,
                &mask_t,
            )?)
        }
    }
}

/// Next-token logits `[B, V]` after each prompt (left-padded batch).
pub fn next_token_logits(
    model: &Model,
    delta: Option<&dyn LinearDelta>,
    prompts: &[&[u32]],
) -> Result<Tensor> {
    Ok(prefill(model, delta, prompts, 0, &LogitsAt::Last)?.0)
}

/// Prompts that run one shared prefix: `members` index the prompts; each member is longer
/// than `prefix_len`, so at least its last token runs on top of the prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixGroup {
    /// Tokens shared by every member, run once.
    pub prefix_len: usize,
    /// Indices of the member prompts, in lexicographic order of their tokens.
    pub members: Vec<usize>,
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Groups `prompts` by shared prefix. The prompts are sorted by their tokens; a prompt joins
/// the group before it when it shares at least half as much with that group's last member
/// as with the prompt after it (so it does not settle for a short common start when a long
/// one follows), and joining runs fewer tokens than starting a new group
/// (`k·L' > (k−1)·L` for a group of `k` members whose prefix shrinks from `L` to `L'`).
/// Every prompt lands in exactly one group; a group's prefix is the members' common prefix,
/// capped so that each member keeps at least one token of its own (so a one-token prompt
/// forms a group with `prefix_len` 0).
pub fn prefix_groups(prompts: &[&[u32]]) -> Vec<PrefixGroup> {
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by(|&a, &b| prompts[a].cmp(prompts[b]).then(a.cmp(&b)));
    let mut groups: Vec<PrefixGroup> = Vec::new();
    for (pos, &i) in order.iter().enumerate() {
        let own = prompts[i].len().saturating_sub(1);
        let ahead = order
            .get(pos + 1)
            .map(|&j| common_prefix(prompts[i], prompts[j]))
            .unwrap_or(0);
        if let Some(group) = groups.last_mut() {
            if let Some(&last) = group.members.last() {
                let shared = common_prefix(prompts[last], prompts[i]);
                let joined = group.prefix_len.min(shared).min(own);
                let k = group.members.len();
                if 2 * shared >= ahead && joined > 0 && k * joined > (k - 1) * group.prefix_len {
                    group.prefix_len = joined;
                    group.members.push(i);
                    continue;
                }
            }
        }
        groups.push(PrefixGroup {
            prefix_len: own,
            members: vec![i],
        });
    }
    groups
}

/// The micro-batch plan of prefix-grouped label prompts: [`prefix_groups`] split into pieces
/// of at most `mb` members, in the order of their prefixes' tokens, at most `mb` pieces per
/// micro-batch: pieces whose prefixes start alike (one question before its paragraphs) share
/// micro-batches, where the recorded path runs that start once. Prompts with nothing to share
/// (one token, `prefix_len` 0) come back apart, to run whole.
fn grouped_label_batches(prompts: &[&[u32]], mb: usize) -> (Vec<usize>, Vec<Vec<PrefixGroup>>) {
    let mut pieces: Vec<PrefixGroup> = prefix_groups(prompts)
        .into_iter()
        .flat_map(|g| {
            g.members
                .chunks(mb)
                .map(|m| PrefixGroup {
                    prefix_len: g.prefix_len,
                    members: m.to_vec(),
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let head = |g: &PrefixGroup| -> &[u32] {
        g.members
            .first()
            .map_or(&[][..], |&m| &prompts[m][..g.prefix_len])
    };
    pieces.sort_by(|a, b| head(a).cmp(head(b)));
    let (bare, grouped): (Vec<PrefixGroup>, Vec<PrefixGroup>) =
        pieces.into_iter().partition(|g| g.prefix_len == 0);
    let bare = bare.into_iter().flat_map(|g| g.members).collect();
    let batches = grouped.chunks(mb).map(<[PrefixGroup]>::to_vec).collect();
    (bare, batches)
}

/// Next-token logits `[R, V]` after each member prompt of `groups` (members in group order),
/// each group's shared prefix computed once: prefixes left-padded through the KV cache
/// (gradients flow through it), cache rows repeated per member, then each member's own
/// tokens right-padded on top with logits at its last real token. Every group needs
/// `prefix_len ≥ 1`.
pub fn grouped_next_token_logits(
    model: &Model,
    delta: Option<&dyn LinearDelta>,
    prompts: &[&[u32]],
    groups: &[&PrefixGroup],
) -> Result<Tensor> {
    let plan = GroupedRows::new(prompts, groups)?;
    let (_none, mut cache) = prefill(model, delta, &plan.prefixes, plan.ts, &LogitsAt::None)?;
    cache.select_rows(&plan.rows)?;
    Ok(model.forward_cached(
        &ids_tensor(&plan.s_rows, model.device())?,
        Some(&plan.s_valid),
        &mut cache,
        &LogitsAt::PerRow(plan.last),
        delta,
    )?)
}

/// The inputs of prefix-grouped prompts: each group's prefix (to run left-padded), the cache
/// row of each member (its group), each member's own tokens right-padded to `ts`, and the
/// column of each member's last token.
struct GroupedRows<'p> {
    prefixes: Vec<&'p [u32]>,
    rows: Vec<usize>,
    s_rows: Vec<Vec<i64>>,
    s_valid: Vec<bool>,
    last: Vec<usize>,
    ts: usize,
}

impl<'p> GroupedRows<'p> {
    /// Every group needs `prefix_len ≥ 1` and members longer than it.
    fn new(prompts: &[&'p [u32]], groups: &[&PrefixGroup]) -> Result<Self> {
        let mut ts = 0;
        for (g, group) in groups.iter().enumerate() {
            let bad = group.prefix_len == 0
                || group
                    .members
                    .iter()
                    .any(|&m| prompts.get(m).is_none_or(|p| p.len() <= group.prefix_len));
            if bad {
                return Err(flowtune_lm::Error::InvalidRequest {
                    index: g,
                    message: "prefix group: empty prefix, unknown member or a member no longer than the prefix".into(),
                }
                .into());
            }
            for &m in &group.members {
                ts = ts.max(prompts[m].len() - group.prefix_len);
            }
        }
        let mut plan = Self {
            prefixes: Vec::with_capacity(groups.len()),
            rows: Vec::new(),
            s_rows: Vec::new(),
            s_valid: Vec::new(),
            last: Vec::new(),
            ts,
        };
        for (g, group) in groups.iter().enumerate() {
            plan.prefixes
                .push(&prompts[group.members[0]][..group.prefix_len]);
            for &m in &group.members {
                let rest = &prompts[m][group.prefix_len..];
                plan.rows.push(g);
                right_padded(rest, ts, &mut plan.s_rows, &mut plan.s_valid);
                plan.last.push(rest.len() - 1);
            }
        }
        tracing::debug!(
            groups = plan.prefixes.len(),
            prefix_columns = plan.prefixes.iter().map(|p| p.len()).max().unwrap_or(0),
            prefix_tokens = plan.prefixes.iter().map(|p| p.len()).sum::<usize>(),
            rows = plan.rows.len(),
            rest_columns = ts,
            rest_tokens = plan.s_valid.iter().filter(|&&v| v).count(),
            "prefix-grouped prompts"
        );
        Ok(plan)
    }
}

/// The label loss `loss` of the logits after each prompt of one label micro-batch, and the
/// trainable adapter's gradients from the model's recorded backward pass
/// ([`Model::forward_recorded`]): prompts `prompts` whole (left-padded, one pass), or
/// prefix-grouped (a prefix pass, then each member's own tokens on top, as
/// [`grouped_next_token_logits`]).
fn recorded_label_grads<S>(
    model: &Model,
    delta: &BankDelta<'_>,
    prompts: &[&[u32]],
    batch: &LabelBatch,
    loss: impl FnOnce(&Tensor) -> Result<(Tensor, S)>,
) -> Result<(LoraGrads, S)> {
    let mut grads = LoraGrads::new();
    let backward = |hidden: Tensor| -> Result<(Tensor, S)> {
        let leaf = hidden.f_detach()?.f_set_requires_grad(true)?;
        let logits = model.logits_of_hidden(&leaf)?;
        let (l, s) = loss(&logits)?;
        let d_hidden = Tensor::f_run_backward(&[l], &[&leaf], false, false)?
            .pop()
            .ok_or(LearnerError::MissingGradient("the hidden states"))?;
        Ok((d_hidden, s))
    };
    let s = match batch {
        LabelBatch::Whole(members) => {
            let chunk: Vec<&[u32]> = members.iter().map(|&m| prompts[m]).collect();
            chained_passes(
                model,
                delta,
                (&chunk, LogitsAt::Last),
                &[],
                &mut grads,
                backward,
            )?
        }
        LabelBatch::Grouped(groups) => {
            let groups: Vec<&PrefixGroup> = groups.iter().collect();
            let plan = GroupedRows::new(prompts, &groups)?;
            let members = Stage {
                select: &plan.rows,
                rows: &plan.s_rows,
                valid: &plan.s_valid,
                at: LogitsAt::PerRow(plan.last.clone()),
            };
            // Group prefixes that start alike (one question before its paragraphs' groups) run
            // that start once more: heads, then each group's rest, then the members' own tokens.
            let heads = prefix_groups(&plan.prefixes);
            if heads.iter().any(|h| h.members.len() > 1) && heads.iter().all(|h| h.prefix_len > 0) {
                let head_groups: Vec<&PrefixGroup> = heads.iter().collect();
                let outer = GroupedRows::new(&plan.prefixes, &head_groups)?;
                // The cache row of each group after its rest ran: groups in head order.
                let mut row_of_group = vec![0; plan.prefixes.len()];
                for (row, &g) in heads.iter().flat_map(|h| &h.members).enumerate() {
                    row_of_group[g] = row;
                }
                let member_rows: Vec<usize> = plan.rows.iter().map(|&g| row_of_group[g]).collect();
                let group_rests = Stage {
                    select: &outer.rows,
                    rows: &outer.s_rows,
                    valid: &outer.s_valid,
                    at: LogitsAt::None,
                };
                let members = Stage {
                    select: &member_rows,
                    ..members
                };
                chained_passes(
                    model,
                    delta,
                    (&outer.prefixes, LogitsAt::None),
                    &[group_rests, members],
                    &mut grads,
                    backward,
                )?
            } else {
                chained_passes(
                    model,
                    delta,
                    (&plan.prefixes, LogitsAt::None),
                    &[members],
                    &mut grads,
                    backward,
                )?
            }
        }
    };
    Ok((grads, s))
}

/// A recorded pass that continues a chain over one KV cache: its row `i` goes on from cache row
/// `select[i]` of the pass before.
struct Stage<'a> {
    select: &'a [usize],
    rows: &'a [Vec<i64>],
    valid: &'a [bool],
    at: LogitsAt,
}

/// Runs the prompts `first.0` (left-padded, hidden states at `first.1`) and then `stages`
/// through the recorded forward on one KV cache, hands the last pass's hidden states to
/// `backward` (which returns their gradient and the micro-batch's stats), and backpropagates
/// through the passes in reverse, folding the key/value gradients back across each stage's row
/// selection; the LoRA factor gradients land in `grads`.
fn chained_passes<S>(
    model: &Model,
    delta: &BankDelta<'_>,
    (first, first_at): (&[&[u32]], LogitsAt),
    stages: &[Stage<'_>],
    grads: &mut LoraGrads,
    backward: impl FnOnce(Tensor) -> Result<(Tensor, S)>,
) -> Result<S> {
    let device = model.device();
    let (rows, valid, t0) = left_padded(first);
    let columns: usize = stages
        .iter()
        .map(|st| st.rows.first().map_or(0, Vec::len))
        .sum();
    let mut cache = model.new_cache(first.len(), t0 + columns)?;
    let (mut hidden, pass) = model.forward_recorded(
        &ids_tensor(&rows, device)?,
        &valid,
        &mut cache,
        &first_at,
        delta,
    )?;
    // Each pass with the selection before it and the cache rows it selected from.
    let mut passes = vec![(pass, None)];
    for st in stages {
        let before = cache.batch();
        cache.select_rows(st.select)?;
        let (h, pass) = model.forward_recorded(
            &ids_tensor(st.rows, device)?,
            st.valid,
            &mut cache,
            &st.at,
            delta,
        )?;
        hidden = h;
        passes.push((pass, Some((st.select, before))));
    }
    let (d_hidden, s) = backward(hidden)?;
    let mut d_hidden = Some(d_hidden);
    let mut kv = None;
    for (pass, selected) in passes.into_iter().rev() {
        let read = pass.backward(model, delta, d_hidden.take().as_ref(), kv.as_ref(), grads)?;
        kv = match selected {
            Some((select, before)) => read.map(|g| g.fold_rows(select, before)).transpose()?,
            None => read,
        };
    }
    Ok(s)
}

/// Completion log-probs through the model's recorded forward ([`Model::forward_recorded`]),
/// with what their backward needs. The prompts run once, left-padded, with hidden states at
/// their last token; the cache rows are repeated per completion and the completions (minus
/// their last token, right-padded) run on top with hidden states everywhere, as
/// [`PromptSharing::SharedKv`] runs them. Only the norm, the head and the log-softmax run
/// under autograd, from two leaves (the prompts' and the completions' hidden states).
struct RecordedCompletions {
    /// `[Σ completions]`, differentiable with respect to the leaves.
    lp: Tensor,
    first_leaf: Tensor,
    rest_leaf: Option<Tensor>,
    prompt_pass: flowtune_lm::model::RecordedPass,
    rest_pass: Option<flowtune_lm::model::RecordedPass>,
    /// Per completion, its prompt.
    rows: Vec<usize>,
}

impl RecordedCompletions {
    fn new(model: &Model, delta: &BankDelta<'_>, groups: &[(&[u32], Vec<&[u32]>)]) -> Result<Self> {
        let device = model.device();
        check_completion_groups(groups)?;
        let CompletionRows {
            rows,
            c_rows,
            c_valid,
            tc,
        } = CompletionRows::new(groups);
        let prompts: Vec<&[u32]> = groups.iter().map(|g| g.0).collect();
        let (p_rows, p_valid, tp) = left_padded(&prompts);
        let mut cache = model.new_cache(prompts.len(), tp + tc)?;
        let (first, prompt_pass) = model.forward_recorded(
            &ids_tensor(&p_rows, device)?,
            &p_valid,
            &mut cache,
            &LogitsAt::Last,
            delta,
        )?;
        cache.select_rows(&rows)?;
        let targets = ids_tensor(&c_rows, device)?;
        let r = rows.len() as i64;
        let first_leaf = first.f_detach()?.f_set_requires_grad(true)?;
        let first = first_leaf
            .f_index_select(0, &CompletionRows::index(&rows, device)?)?
            .f_unsqueeze(1)?; // [R, 1, H]
        let (hidden, rest_leaf, rest_pass) = if tc > 1 {
            // Only the first tc-1 completion tokens are fed: the last one predicts nothing.
            let feed = targets.f_narrow(1, 0, tc as i64 - 1)?;
            let feed_valid = CompletionRows::feed_valid(&c_valid, tc);
            let (rest, pass) =
                model.forward_recorded(&feed, &feed_valid, &mut cache, &LogitsAt::All, delta)?;
            let leaf = rest.f_detach()?.f_set_requires_grad(true)?;
            let slots: Vec<i64> = feed_valid
                .iter()
                .enumerate()
                .filter_map(|(i, &v)| v.then_some(i as i64))
                .collect();
            let width = leaf.size()[1];
            let full = Tensor::f_zeros([r * (tc as i64 - 1), width], (leaf.kind(), device))?
                .f_index_copy(
                    0,
                    &Tensor::f_from_slice(&slots)?.f_to_device(device)?,
                    &leaf,
                )?
                .f_view([r, tc as i64 - 1, width])?;
            (Tensor::f_cat(&[first, full], 1)?, Some(leaf), Some(pass))
        } else {
            (first, None, None)
        };
        let logits = model.logits_of_hidden(&hidden)?;
        let mask = Tensor::f_from_slice(&c_valid)?
            .f_view([r, tc as i64])?
            .f_to_device(device)?;
        let lp = flowtune_loss::completion_logprobs(&logits, &targets, &mask)?;
        Ok(Self {
            lp,
            first_leaf,
            rest_leaf,
            prompt_pass,
            rest_pass,
            rows,
        })
    }

    /// The trainable adapter's gradients of `loss` (a function of [`Self::lp`]).
    fn backward(self, model: &Model, delta: &BankDelta<'_>, loss: &Tensor) -> Result<LoraGrads> {
        let mut leaves = vec![&self.first_leaf];
        leaves.extend(self.rest_leaf.as_ref());
        let d = Tensor::f_run_backward(&[loss], &leaves, false, false)?;
        let mut grads = LoraGrads::new();
        let kv = match (&self.rest_pass, d.get(1)) {
            (Some(pass), Some(dr)) => pass.backward(model, delta, Some(dr), None, &mut grads)?,
            _ => None,
        };
        let prompts = self.prompt_pass_rows();
        let kv = kv.map(|kv| kv.fold_rows(&self.rows, prompts)).transpose()?;
        let d_first = d
            .first()
            .ok_or(LearnerError::MissingGradient("the prompts' hidden states"))?;
        self.prompt_pass
            .backward(model, delta, Some(d_first), kv.as_ref(), &mut grads)?;
        Ok(grads)
    }

    fn prompt_pass_rows(&self) -> usize {
        self.first_leaf.size().first().copied().unwrap_or(0) as usize
    }
}

/// How one label micro-batch's prompts run (indices into its label set's prompts): each
/// whole, or as prefix groups.
enum LabelBatch {
    Whole(Vec<usize>),
    Grouped(Vec<PrefixGroup>),
}

/// One micro-batch's contribution to a training step: a loss for autograd to differentiate,
/// or the trainable parameters' gradients already taken (the recorded backward pass).
enum MicroLoss {
    Graph(Tensor),
    Grads(LoraGrads),
}

/// `grads` in the order of `params` (an undefined tensor where a parameter got none).
fn aligned(grads: &LoraGrads, params: &[Tensor]) -> Vec<Tensor> {
    params
        .iter()
        .map(|p| grads.get(p).map_or_else(Tensor::new, Tensor::shallow_clone))
        .collect()
}

/// Adds one micro-batch's gradients (in parameter order; undefined = none) into `sums`.
fn add_grads(sums: &mut [Option<Tensor>], grads: Vec<Tensor>) -> Result<()> {
    for (sum, g) in sums.iter_mut().zip(grads) {
        if g.defined() {
            *sum = Some(match sum.take() {
                Some(acc) => acc.f_add(&g)?,
                None => g,
            });
        }
    }
    Ok(())
}

/// Hands summed gradients to autograd's accumulation into the parameters: `Σ_p (p ·
/// g_p).sum()` has gradient exactly `g_p` with respect to `p`.
fn backward_sums(params: &[Tensor], sums: Vec<Option<Tensor>>) -> Result<()> {
    let mut total: Option<Tensor> = None;
    for (p, g) in params.iter().zip(sums) {
        if let Some(g) = g {
            let term = p.f_mul(&g)?.f_sum(None::<Kind>)?;
            total = Some(match total {
                Some(t) => t.f_add(&term)?,
                None => term,
            });
        }
    }
    if let Some(t) = total {
        t.f_backward()?;
    }
    Ok(())
}

/// What one side-by-side thread returns: per micro-batch it ran, its index, its gradients
/// (one per trainable parameter) and its statistics.
type Finished<S> = Vec<(usize, Vec<Tensor>, S)>;

/// A micro-batch closure and the trainable parameters, shared by the threads that run
/// micro-batches side by side ([`MicroBatchThreads`]).
struct SideBySide<'a, S> {
    unit: &'a (dyn Fn(usize) -> Result<(MicroLoss, S)> + 'a),
    params: &'a [Tensor],
}

// SAFETY: the closure and the parameters are only read from the threads: the closure runs
// forwards of the shared model and adapter bank (which hold libtorch tensors, `!Sync` in tch,
// and no Rust-side interior mutability besides a mutex-guarded oneDNN switch), and each
// thread takes gradients into its own graph (`run_backward`, no accumulation into the
// shared parameters). libtorch's operators and autograd engine are safe for concurrent use
// of shared tensors this way (PyTorch trains one module from several threads); the random
// draws of LoRA dropout, whose order would depend on timing, never run here
// (`NodeLearner::threads_for`). The threads are joined before the borrow ends.
unsafe impl<S> Sync for SideBySide<'_, S> {}

/// Saved learner metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LearnerStateMeta {
    /// Format version (1).
    pub format: u32,
    /// The node.
    pub node: String,
    /// Its reference adapter.
    pub reference: String,
    /// The config.
    pub config: LearnerConfig,
    /// Steps taken.
    pub steps: u64,
}

/// Trains one node's adapter: DPO against `node.ref`, NLL, label NLL; COCOB.
#[derive(Debug)]
pub struct NodeLearner {
    node: String,
    reference: String,
    config: LearnerConfig,
    optimizer: Cocob,
    steps: u64,
}

impl NodeLearner {
    /// Sets up learning for adapter `node` in `bank`: creates the reference `node.ref` as
    /// a copy when missing, makes `node` the trainable adapter, and builds COCOB over its
    /// tensors (PEFT key names).
    pub fn new(bank: &mut AdapterBank, node: &str, config: LearnerConfig) -> Result<Self> {
        if !(config.beta.is_finite() && config.beta > 0.0) {
            return Err(LearnerError::InvalidConfig {
                field: "beta",
                reason: format!("must be > 0, got {}", config.beta),
            });
        }
        if config.max_grad_norm.is_nan() || config.max_grad_norm <= 0.0 {
            return Err(LearnerError::InvalidConfig {
                field: "max_grad_norm",
                reason: format!("must be > 0, got {}", config.max_grad_norm),
            });
        }
        if config.micro_batch == 0 {
            return Err(LearnerError::InvalidConfig {
                field: "micro_batch",
                reason: "must be >= 1".into(),
            });
        }
        if config.micro_batch_threads == MicroBatchThreads::Threads(0) {
            return Err(LearnerError::InvalidConfig {
                field: "micro_batch_threads",
                reason: "must be >= 1".into(),
            });
        }
        let reference = reference_name(node);
        if bank.id(&reference).is_err() {
            bank.copy(node, &reference)?;
        }
        bank.set_trainable(node)?;
        let optimizer = Cocob::new(bank.get(node)?.named_tensors(), config.cocob)?;
        // Frozen between steps: inference then takes the fused no-gradient kernels.
        bank.freeze_all()?;
        Ok(Self {
            node: node.to_string(),
            reference,
            config,
            optimizer,
            steps: 0,
        })
    }

    /// The node trained.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The reference adapter's name.
    pub fn reference(&self) -> &str {
        &self.reference
    }

    /// The config.
    pub fn config(&self) -> &LearnerConfig {
        &self.config
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// One learner step on `records`: micro-batched loss and backward, clip, COCOB step,
    /// adapter version bump. An empty batch (after dropping zero weights) does nothing.
    pub fn step(
        &mut self,
        model: &Model,
        bank: &mut AdapterBank,
        records: &NodeRecords,
    ) -> Result<StepStats> {
        let _span =
            tracing::info_span!("learner_step", node = %self.node, step = self.steps).entered();
        // Re-assert trainability: another node's learner may have switched it.
        if bank.trainable() != Some(self.node.as_str()) {
            bank.set_trainable(&self.node)?;
        }
        self.optimizer.zero_grad();
        let mut stats = StepStats {
            node: self.node.clone(),
            ..StepStats::default()
        };
        // Training mode (LoRA dropout) for this step's forward passes only.
        bank.set_training(match records {
            NodeRecords::Preferences(_) => self.config.dpo_dropout,
            NodeRecords::Targets(_) | NodeRecords::Labels(_) => true,
        });
        let ran = self.run(model, bank, records, true, &mut stats);
        bank.set_training(false);
        ran?;
        if stats.records == 0 {
            bank.freeze_all()?;
            return Ok(stats);
        }
        stats.grad_norm = self.optimizer.clip_grad_norm(self.config.max_grad_norm)?;
        self.optimizer.step()?;
        self.optimizer.zero_grad();
        bank.mark_updated(&self.node)?;
        // Frozen again until the next step (rollouts between steps need no gradients).
        bank.freeze_all()?;
        self.steps += 1;
        tracing::debug!(
            loss = stats.loss,
            grad_norm = stats.grad_norm,
            records = stats.records,
            "learner step"
        );
        Ok(stats)
    }

    /// The loss and statistics `step` would see on `records`, without gradients and
    /// without changing anything (progressive validation, monitoring).
    pub fn evaluate(
        &self,
        model: &Model,
        bank: &AdapterBank,
        records: &NodeRecords,
    ) -> Result<StepStats> {
        let _span = tracing::debug_span!("learner_evaluate", node = %self.node).entered();
        let mut stats = StepStats {
            node: self.node.clone(),
            ..StepStats::default()
        };
        tch::no_grad(|| self.run(model, bank, records, false, &mut stats))?;
        Ok(stats)
    }

    fn run(
        &self,
        model: &Model,
        bank: &AdapterBank,
        records: &NodeRecords,
        train: bool,
        stats: &mut StepStats,
    ) -> Result<()> {
        match records {
            NodeRecords::Preferences(pairs) => self.dpo(model, bank, pairs, train, stats),
            NodeRecords::Targets(targets) => self.nll(model, bank, targets, train, stats),
            NodeRecords::Labels(labels) => self.labels(model, bank, labels, train, stats),
        }
    }

    fn check_weight(&self, index: usize, w: f64) -> Result<bool> {
        if !w.is_finite() || w < 0.0 {
            return Err(LearnerError::BadRecord {
                node: self.node.clone(),
                index,
                reason: format!("weight {w} must be finite and >= 0"),
            });
        }
        Ok(w > 0.0)
    }

    /// The records with nonzero weight (zero-weight ones are dropped; a negative or
    /// non-finite weight is an error), with the counts recorded in `stats`.
    fn kept<'r, R>(
        &self,
        records: &'r [R],
        weight: impl Fn(&R) -> f64,
        stats: &mut StepStats,
    ) -> Result<Vec<&'r R>> {
        let mut kept = Vec::new();
        for (i, r) in records.iter().enumerate() {
            if self.check_weight(i, weight(r))? {
                kept.push(r);
            }
        }
        Self::count_kept(records.len(), kept.len(), stats);
        Ok(kept)
    }

    fn count_kept(total: usize, kept: usize, stats: &mut StepStats) {
        stats.dropped = total - kept;
        stats.records = kept;
    }

    fn dpo(
        &self,
        model: &Model,
        bank: &AdapterBank,
        pairs: &[PreferencePair],
        train: bool,
        stats: &mut StepStats,
    ) -> Result<()> {
        let kept = self.kept(pairs, |p| p.weight, stats)?;
        let n = kept.len();
        if n == 0 {
            return Ok(());
        }
        let policy = BankDelta::all(bank, &self.node)?;
        let reference = BankDelta::all(bank, &self.reference)?;
        let chunks: Vec<&[&PreferencePair]> = kept.chunks(self.config.micro_batch).collect();
        let recorded = train
            && self.config.recorded_backward
            && model.recorded_backward_supported(&policy)?
            && model.recorded_backward_supported(&reference)?;
        let unit = |c: usize| -> Result<(MicroLoss, DpoStats)> {
            let chunk = chunks[c];
            let _mb = tracing::trace_span!("micro_batch", pairs = chunk.len()).entered();
            let groups: Vec<(&[u32], Vec<&[u32]>)> = chunk
                .iter()
                .map(|p| {
                    (
                        p.prompt.as_slice(),
                        vec![p.chosen.as_slice(), p.rejected.as_slice()],
                    )
                })
                .collect();
            let frac = chunk.len() as f64 / n as f64;
            let weights = |like: &Tensor| -> Result<Tensor> {
                Ok(
                    Tensor::f_from_slice(&chunk.iter().map(|p| p.weight).collect::<Vec<_>>())?
                        .f_to_device(like.device())?
                        .f_to_kind(like.kind())?,
                )
            };
            // Recorded: the reference the same way as the policy (so they are equal bit for
            // bit while their adapters are), without gradients.
            let (ref_lp, pol_lp, pass) = if recorded {
                let ref_lp = tch::no_grad(|| {
                    RecordedCompletions::new(model, &reference, &groups).map(|c| c.lp)
                })?;
                let pol = RecordedCompletions::new(model, &policy, &groups)?;
                (ref_lp, pol.lp.shallow_clone(), Some(pol))
            } else {
                let sharing = self.config.prompt_sharing;
                let ref_lp = tch::no_grad(|| {
                    completion_logprobs(model, Some(&reference), &groups, sharing)
                })?;
                let pol_lp = completion_logprobs(model, Some(&policy), &groups, sharing)?;
                (ref_lp, pol_lp, None)
            };
            let (ref_lp, pol_lp) = (ref_lp.f_view([-1, 2])?, pol_lp.f_view([-1, 2])?);
            let (loss, s) = flowtune_loss::dpo_loss(
                &pol_lp.f_select(1, 0)?,
                &pol_lp.f_select(1, 1)?,
                &ref_lp.f_select(1, 0)?,
                &ref_lp.f_select(1, 1)?,
                &weights(&pol_lp)?,
                self.config.beta,
            )?;
            let loss = loss.f_mul_scalar(frac)?;
            Ok(match pass {
                Some(pol) => (MicroLoss::Grads(pol.backward(model, &policy, &loss)?), s),
                None => (MicroLoss::Graph(loss), s),
            })
        };
        let adapters = [self.node.as_str(), self.reference.as_str()];
        let costs: Vec<usize> = chunks.iter().map(|c| c.len()).collect();
        let per_chunk = self.micro_batches(model, bank, &adapters, &costs, train, &unit)?;
        let mut agg = DpoStats::default();
        for (chunk, s) in chunks.iter().zip(per_chunk) {
            let frac = chunk.len() as f64 / n as f64;
            agg.loss += s.loss * frac;
            agg.pairs += s.pairs;
            agg.weight_sum += s.weight_sum;
            agg.reward_chosen += s.reward_chosen * frac;
            agg.reward_rejected += s.reward_rejected * frac;
            agg.reward_margin += s.reward_margin * frac;
            agg.accuracy += s.accuracy * frac;
        }
        stats.loss = agg.loss;
        stats.dpo = Some(agg);
        Ok(())
    }

    fn nll(
        &self,
        model: &Model,
        bank: &AdapterBank,
        records: &[TargetRecord],
        train: bool,
        stats: &mut StepStats,
    ) -> Result<()> {
        let kept = self.kept(records, |r| r.weight, stats)?;
        let n = kept.len();
        if n == 0 {
            return Ok(());
        }
        let policy = BankDelta::all(bank, &self.node)?;
        let chunks: Vec<&[&TargetRecord]> = kept.chunks(self.config.micro_batch).collect();
        let recorded =
            train && self.config.recorded_backward && model.recorded_backward_supported(&policy)?;
        // Each chunk's loss, and its loss and summed NLL as numbers.
        let unit = |c: usize| -> Result<(MicroLoss, (f64, f64))> {
            let chunk = chunks[c];
            let groups: Vec<(&[u32], Vec<&[u32]>)> = chunk
                .iter()
                .map(|r| (r.prompt.as_slice(), vec![r.completion.as_slice()]))
                .collect();
            let pass = if recorded {
                Some(RecordedCompletions::new(model, &policy, &groups)?)
            } else {
                None
            };
            let lp = match &pass {
                Some(p) => p.lp.shallow_clone(),
                None => {
                    completion_logprobs(model, Some(&policy), &groups, self.config.prompt_sharing)?
                }
            };
            let w = Tensor::f_from_slice(&chunk.iter().map(|r| r.weight).collect::<Vec<_>>())?
                .f_to_device(lp.device())?
                .f_to_kind(lp.kind())?;
            let loss = lp
                .f_neg()?
                .f_mul(&w)?
                .f_sum(None::<Kind>)?
                .f_div_scalar(n as f64)?;
            let nll = -lp.f_sum(Kind::Double)?.f_double_value(&[])?;
            let value = loss.f_double_value(&[])?;
            Ok(match pass {
                Some(p) => (
                    MicroLoss::Grads(p.backward(model, &policy, &loss)?),
                    (value, nll),
                ),
                None => (MicroLoss::Graph(loss), (value, nll)),
            })
        };
        let adapters = [self.node.as_str()];
        let costs: Vec<usize> = chunks.iter().map(|c| c.len()).collect();
        let per_chunk = self.micro_batches(model, bank, &adapters, &costs, train, &unit)?;
        let mut agg = NllStats::default();
        let mut total_nll = 0.0;
        for (chunk, (loss, nll)) in chunks.iter().zip(per_chunk) {
            agg.loss += loss;
            agg.sequences += chunk.len();
            agg.tokens += chunk.iter().map(|r| r.completion.len()).sum::<usize>();
            total_nll += nll;
        }
        agg.mean_token_nll = total_nll / agg.tokens.max(1) as f64;
        stats.loss = agg.loss;
        stats.nll = Some(agg);
        Ok(())
    }

    fn labels(
        &self,
        model: &Model,
        bank: &AdapterBank,
        records: &[LabelRecord],
        train: bool,
        stats: &mut StepStats,
    ) -> Result<()> {
        let mut kept = Vec::new();
        for (i, r) in records.iter().enumerate() {
            if r.label >= r.labels.len() {
                return Err(LearnerError::BadRecord {
                    node: self.node.clone(),
                    index: i,
                    reason: format!(
                        "label index {} outside a set of {}",
                        r.label,
                        r.labels.len()
                    ),
                });
            }
            if self.check_weight(i, r.weight)? {
                kept.push(r);
            }
        }
        Self::count_kept(records.len(), kept.len(), stats);
        let n = kept.len();
        if n == 0 {
            return Ok(());
        }
        // Records with the same label set batch together.
        let mut by_set: BTreeMap<&[u32], Vec<&LabelRecord>> = BTreeMap::new();
        for r in kept {
            by_set.entry(r.labels.as_slice()).or_default().push(r);
        }
        let policy = BankDelta::all(bank, &self.node)?;
        let mb = self.config.micro_batch;
        // Per label set its ids and its records' prompts; the micro-batches: their set, their
        // records, and how their prompts run.
        let sets: Vec<(Vec<i64>, Vec<&[u32]>)> = by_set
            .iter()
            .map(|(set, recs)| {
                let ids = set.iter().map(|&x| x as i64).collect();
                (ids, recs.iter().map(|r| r.prompt.as_slice()).collect())
            })
            .collect();
        let mut units: Vec<(usize, Vec<&LabelRecord>, LabelBatch)> = Vec::new();
        for (si, ((_, prompts), recs)) in sets.iter().zip(by_set.values()).enumerate() {
            match self.config.label_sharing {
                LabelSharing::Unshared => {
                    for (m, chunk) in recs.chunks(mb).enumerate() {
                        let members = (m * mb..m * mb + chunk.len()).collect();
                        units.push((si, chunk.to_vec(), LabelBatch::Whole(members)));
                    }
                }
                LabelSharing::PrefixGroups => {
                    let (bare, grouped) = grouped_label_batches(prompts, mb);
                    for chunk in bare.chunks(mb) {
                        let chunk_recs = chunk.iter().map(|&m| recs[m]).collect();
                        units.push((si, chunk_recs, LabelBatch::Whole(chunk.to_vec())));
                    }
                    for batch in grouped {
                        let chunk_recs = batch
                            .iter()
                            .flat_map(|g| g.members.iter().map(|&m| recs[m]))
                            .collect();
                        units.push((si, chunk_recs, LabelBatch::Grouped(batch)));
                    }
                }
            }
        }
        let recorded =
            train && self.config.recorded_backward && model.recorded_backward_supported(&policy)?;
        let unit = |u: usize| -> Result<(MicroLoss, LabelStats)> {
            let (si, chunk, batch) = &units[u];
            let (ids, prompts) = &sets[*si];
            if recorded {
                let (grads, s) = recorded_label_grads(model, &policy, prompts, batch, |logits| {
                    Self::label_loss(logits, chunk, ids, n)
                })?;
                return Ok((MicroLoss::Grads(grads), s));
            }
            let logits = match batch {
                LabelBatch::Whole(members) => {
                    let chunk_prompts: Vec<&[u32]> = members.iter().map(|&m| prompts[m]).collect();
                    next_token_logits(model, Some(&policy), &chunk_prompts)?
                }
                LabelBatch::Grouped(groups) => {
                    let groups: Vec<&PrefixGroup> = groups.iter().collect();
                    grouped_next_token_logits(model, Some(&policy), prompts, &groups)?
                }
            };
            let (loss, s) = Self::label_loss(&logits, chunk, ids, n)?;
            Ok((MicroLoss::Graph(loss), s))
        };
        let adapters = [self.node.as_str()];
        // Tokens each micro-batch runs, to schedule the costliest first.
        let costs: Vec<usize> = units
            .iter()
            .map(|(si, _, batch)| {
                let prompts = &sets[*si].1;
                match batch {
                    LabelBatch::Whole(members) => members.iter().map(|&m| prompts[m].len()).sum(),
                    LabelBatch::Grouped(groups) => groups
                        .iter()
                        .map(|g| {
                            let rest: usize = g
                                .members
                                .iter()
                                .map(|&m| prompts[m].len().saturating_sub(g.prefix_len))
                                .sum();
                            g.prefix_len + rest
                        })
                        .sum(),
                }
            })
            .collect();
        let per_unit = self.micro_batches(model, bank, &adapters, &costs, train, &unit)?;
        let mut agg = LabelStats::default();
        for ((_, chunk, _), s) in units.iter().zip(per_unit) {
            let frac = chunk.len() as f64 / n as f64;
            agg.loss += s.loss * frac;
            agg.records += s.records;
            agg.mean_target_prob += s.mean_target_prob * frac;
            agg.accuracy += s.accuracy * frac;
        }
        stats.loss = agg.loss;
        stats.label = Some(agg);
        Ok(())
    }

    /// Label NLL of one micro-batch (`logits` row i for `chunk[i]`), weighted by its share
    /// of the `n` records, with its statistics.
    fn label_loss(
        logits: &Tensor,
        chunk: &[&LabelRecord],
        ids: &[i64],
        n: usize,
    ) -> Result<(Tensor, LabelStats)> {
        let targets =
            Tensor::f_from_slice(&chunk.iter().map(|r| r.label as i64).collect::<Vec<_>>())?
                .f_to_device(logits.device())?;
        let w = Tensor::f_from_slice(&chunk.iter().map(|r| r.weight as f32).collect::<Vec<_>>())?
            .f_to_device(logits.device())?;
        let (loss, s) = flowtune_loss::label_nll(logits, ids, &targets, &w)?;
        Ok((loss.f_mul_scalar(chunk.len() as f64 / n as f64)?, s))
    }

    /// Threads for `count` training micro-batches over `adapters` (see [`MicroBatchThreads`]).
    fn threads_for(
        &self,
        model: &Model,
        bank: &AdapterBank,
        adapters: &[&str],
        count: usize,
    ) -> usize {
        let wanted = match self.config.micro_batch_threads {
            MicroBatchThreads::Serial => return 1,
            MicroBatchThreads::Auto => tch::get_num_threads().max(1) as usize,
            MicroBatchThreads::Threads(t) => t,
        };
        let dropout = bank.is_training()
            && adapters
                .iter()
                .any(|a| bank.get(a).is_ok_and(|a| a.config().lora_dropout > 0.0));
        if model.device() != tch::Device::Cpu || dropout {
            1
        } else {
            wanted.min(count).max(1)
        }
    }

    /// Runs micro-batches `0..costs.len()` (with these relative costs, for scheduling)
    /// through `unit` (each: its loss, scaled to its share of
    /// the step, and its statistics) and, when training, backpropagates every loss into the
    /// trainable adapter's gradients; returns the statistics in micro-batch order. Side by
    /// side where [`MicroBatchThreads`] says so (training only).
    fn micro_batches<S: Send>(
        &self,
        model: &Model,
        bank: &AdapterBank,
        adapters: &[&str],
        costs: &[usize],
        train: bool,
        unit: &(dyn Fn(usize) -> Result<(MicroLoss, S)> + '_),
    ) -> Result<Vec<S>> {
        let count = costs.len();
        let threads = if train {
            self.threads_for(model, bank, adapters, count)
        } else {
            1
        };
        let params = self.optimizer.params();
        // Per parameter, the sum of the gradients taken apart (side by side, or by the
        // recorded backward), in micro-batch order.
        let mut sums: Vec<Option<Tensor>> = params.iter().map(|_| None).collect();
        let mut out = Vec::with_capacity(count);
        if threads <= 1 {
            for u in 0..count {
                let (loss, s) = unit(u)?;
                if train {
                    match loss {
                        MicroLoss::Graph(loss) => loss.f_backward()?,
                        MicroLoss::Grads(g) => add_grads(&mut sums, aligned(&g, params))?,
                    }
                }
                out.push(s);
            }
            backward_sums(params, sums)?;
            return Ok(out);
        }
        let shared = SideBySide { unit, params };
        // Costliest first, so that the threads finish close together; the results do not
        // depend on the order (they are summed in micro-batch order below).
        let mut order: Vec<usize> = (0..count).collect();
        order.sort_by_key(|&u| std::cmp::Reverse(costs[u]));
        let order = &order;
        let next = std::sync::atomic::AtomicUsize::new(0);
        let intra = tch::get_num_threads();
        let results: Vec<Result<Finished<S>>> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    let (shared, next) = (&shared, &next);
                    scope.spawn(move || -> Result<Finished<S>> {
                        let _span = tracing::trace_span!("micro_batch_worker").entered();
                        tch::set_num_threads(1);
                        let mut done = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(&u) = order.get(i) else {
                                return Ok(done);
                            };
                            let (loss, s) = (shared.unit)(u)?;
                            let grads = match loss {
                                MicroLoss::Graph(loss) => {
                                    Tensor::f_run_backward(&[loss], shared.params, false, false)?
                                }
                                MicroLoss::Grads(g) => aligned(&g, shared.params),
                            };
                            done.push((u, grads, s));
                        }
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| {
                    w.join().unwrap_or_else(|_| {
                        Err(LearnerError::MicroBatchThread("a thread panicked".into()))
                    })
                })
                .collect()
        });
        tch::set_num_threads(intra);
        let mut slots: Vec<Option<(Vec<Tensor>, S)>> = (0..count).map(|_| None).collect();
        for r in results {
            for (u, grads, s) in r? {
                slots[u] = Some((grads, s));
            }
        }
        for slot in slots {
            let Some((grads, s)) = slot else {
                return Err(LearnerError::MicroBatchThread(
                    "a micro-batch did not run".into(),
                ));
            };
            add_grads(&mut sums, grads)?;
            out.push(s);
        }
        backward_sums(params, sums)?;
        Ok(out)
    }

    /// Saves the learner into `dir`: `adapter/` and `reference/` (PEFT folders, from the
    /// LoRA crate, atomic), `optimizer/` (COCOB state, atomic) and `learner.json`.
    pub fn save(&self, bank: &AdapterBank, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|source| LearnerError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        bank.save_peft(&self.node, dir.join("adapter"))?;
        bank.save_peft(&self.reference, dir.join("reference"))?;
        self.optimizer.save(&dir.join("optimizer"))?;
        let meta = LearnerStateMeta {
            format: 1,
            node: self.node.clone(),
            reference: self.reference.clone(),
            config: self.config,
            steps: self.steps,
        };
        let path = dir.join("learner.json");
        let json = serde_json::to_vec_pretty(&meta).map_err(|source| LearnerError::Json {
            path: path.clone(),
            source,
        })?;
        flowtune_lora::write_atomic(&path, &json)?;
        Ok(())
    }

    /// Restores a learner saved by [`NodeLearner::save`] into `bank`: the node and its
    /// reference get the saved weights (in place when they exist, so the optimizer's
    /// tensors stay valid), the optimizer its state. Exact resume.
    pub fn load(bank: &mut AdapterBank, dir: &Path) -> Result<Self> {
        let path = dir.join("learner.json");
        let bytes = std::fs::read(&path).map_err(|source| LearnerError::Io {
            path: path.clone(),
            source,
        })?;
        let meta: LearnerStateMeta =
            serde_json::from_slice(&bytes).map_err(|source| LearnerError::Json {
                path: path.clone(),
                source,
            })?;
        for (name, sub) in [(&meta.node, "adapter"), (&meta.reference, "reference")] {
            let tmp = format!("{name}.__loading");
            if bank.id(&tmp).is_ok() {
                bank.remove(&tmp)?;
            }
            bank.load_peft(&tmp, dir.join(sub))?;
            // Overwrites in place when `name` exists, else creates it.
            bank.copy(&tmp, name)?;
            bank.remove(&tmp)?;
        }
        let mut learner = Self::new(bank, &meta.node, meta.config)?;
        if learner.reference != meta.reference {
            return Err(LearnerError::State {
                path,
                reason: format!(
                    "reference `{}` is not `{}`",
                    meta.reference, learner.reference
                ),
            });
        }
        learner.optimizer.load(&dir.join("optimizer"))?;
        learner.steps = meta.steps;
        Ok(learner)
    }
}

#[cfg(test)]
mod tests {
    //! The learner's recorded paths (label micro-batches, completion log-probs) against
    //! autograd through the same public functions, on the test model (SmolLM2 GGUF) in
    //! float32, LoRA rank 8 on q/k/v/o/MLP with random non-zero `B`. Tolerance: 1e-4
    //! relative L2 per factor gradient, 1e-4 absolute on the values (float32 both ways, the
    //! same arithmetic in other orders; observed values printed).
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use flowtune_lm::loader::{load, LoadOptions};
    use flowtune_lora::{LoraConfig, Module, Site};
    use tch::Device;

    fn setup() -> (Model, AdapterBank) {
        let path = flowtune_lm::locate_test_model().unwrap_or_else(|e| panic!("{e}"));
        let loaded = load(
            &path,
            &LoadOptions {
                dtype: Kind::Float,
                ..Default::default()
            },
        )
        .unwrap();
        let model = Model::new(&loaded.config, &loaded.weights).unwrap();
        let mut bank = AdapterBank::new(loaded.config.lora_base_shapes(), Device::Cpu);
        let modules = [
            Module::QProj,
            Module::KProj,
            Module::VProj,
            Module::OProj,
            Module::GateProj,
            Module::UpProj,
            Module::DownProj,
        ];
        bank.add("node", &LoraConfig::rslora(8, 16.0, &modules), 2)
            .unwrap();
        tch::manual_seed(3);
        bank.modify("node", |a| {
            let sites: Vec<Site> = a.sites().copied().collect();
            for s in sites {
                let w = a.weights_mut(&s).unwrap();
                w.b.copy_(&(Tensor::randn(w.b.size(), (Kind::Float, Device::Cpu)) * 0.02));
            }
        })
        .unwrap();
        bank.set_trainable("node").unwrap();
        (model, bank)
    }

    fn tokens(seed: u64, n: usize) -> Vec<u32> {
        (0..n as u64)
            .map(|i| (100 + (seed * 7919 + i * 104_729) % 40_000) as u32)
            .collect()
    }

    /// Autograd's gradients of `loss` for every factor of `node`, in `named_tensors` order.
    fn autograd_grads(bank: &AdapterBank, loss: &Tensor) -> Vec<Tensor> {
        let params: Vec<Tensor> = bank
            .get("node")
            .unwrap()
            .named_tensors()
            .into_iter()
            .map(|(_, t)| t)
            .collect();
        Tensor::run_backward(&[loss], &params, false, false)
    }

    fn compare(label: &str, bank: &AdapterBank, want: &[Tensor], got: &LoraGrads) {
        let named = bank.get("node").unwrap().named_tensors();
        let mut worst = 0f64;
        for ((name, p), w) in named.iter().zip(want) {
            let g = got
                .get(p)
                .unwrap_or_else(|| panic!("{label}: no gradient for {name}"));
            let rel = (w - g).norm().double_value(&[]) / w.norm().double_value(&[]).max(1e-30);
            worst = worst.max(rel);
            assert!(rel <= 1e-4, "{label}: {name} relative error {rel}");
        }
        println!("{label}: worst factor gradient relative error {worst:.3e}");
    }

    #[test]
    fn recorded_completions_match_autograd() {
        let (model, bank) = setup();
        let delta = BankDelta::all(&bank, "node").unwrap();
        let (p0, p1) = (tokens(1, 40), tokens(2, 25));
        let (c0, c1, c2) = (tokens(3, 6), tokens(4, 1), tokens(5, 9));
        let groups: Vec<(&[u32], Vec<&[u32]>)> = vec![(&p0, vec![&c0, &c1]), (&p1, vec![&c2])];
        let weights = Tensor::from_slice(&[1.0f32, 0.5, 2.0]);
        let want_lp =
            completion_logprobs(&model, Some(&delta), &groups, PromptSharing::Concatenate).unwrap();
        let want = autograd_grads(&bank, &(&want_lp * &weights).sum(Kind::Float));
        let rec = RecordedCompletions::new(&model, &delta, &groups).unwrap();
        let dl = (&rec.lp - &want_lp).abs().max().double_value(&[]);
        println!("recorded completions: max |Δ log-prob| {dl:.3e}");
        assert!(dl <= 1e-4, "log-probs differ by {dl}");
        let loss = (&rec.lp * &weights).sum(Kind::Float);
        let got = rec.backward(&model, &delta, &loss).unwrap();
        compare("recorded completions", &bank, &want, &got);
    }

    /// Paragraph-first label prompts (`[system][paragraph][question][query]`, paragraphs
    /// shared by pairs) and question-first ones (`[system][question][paragraph][query]`: two
    /// questions, two paragraphs each, two queries per paragraph), whose groups' prefixes share
    /// their questions, so the recorded path runs heads, group rests and members nested.
    #[test]
    fn recorded_label_batches_match_autograd() {
        let (system, q) = (tokens(6, 30), tokens(7, 8));
        let paragraph_first: Vec<Vec<u32>> = (0..5)
            .map(|i| {
                [
                    system.clone(),
                    tokens(10 + i / 2, 20 + 3 * i as usize),
                    q.clone(),
                    tokens(20 + i, 4 + i as usize),
                ]
                .concat()
            })
            .collect();
        let question_first: Vec<Vec<u32>> = (0..8u64)
            .map(|i| {
                [
                    system.clone(),
                    tokens(30 + i / 4, 40 + (i / 4) as usize),
                    tokens(40 + i / 2, 100 + 2 * (i / 2) as usize),
                    tokens(50 + i, 3 + (i % 3) as usize),
                ]
                .concat()
            })
            .collect();
        let refs: Vec<&[u32]> = question_first.iter().map(Vec::as_slice).collect();
        let groups = prefix_groups(&refs);
        assert_eq!(groups.len(), 4, "one group per paragraph: {groups:?}");
        let plan = GroupedRows::new(&refs, &groups.iter().collect::<Vec<_>>()).unwrap();
        let heads = prefix_groups(&plan.prefixes);
        assert!(
            heads.len() == 2 && heads.iter().all(|h| h.members.len() == 2),
            "one head per question: {heads:?}"
        );
        label_batches_match_autograd(&paragraph_first, "paragraph-first");
        label_batches_match_autograd(&question_first, "question-first");
    }

    fn label_batches_match_autograd(prompts: &[Vec<u32>], name: &str) {
        let (model, bank) = setup();
        let delta = BankDelta::all(&bank, "node").unwrap();
        let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let n = refs.len();
        let probe = Tensor::randn([n as i64, 2], (Kind::Float, Device::Cpu));
        let label_loss = |logits: &Tensor| -> Result<(Tensor, ())> {
            let pair = logits.f_index_select(1, &Tensor::from_slice(&[9i64, 11]))?;
            Ok((
                pair.f_log_softmax(-1, Kind::Float)?
                    .f_mul(&probe)?
                    .f_sum(Kind::Float)?,
                (),
            ))
        };
        for batch in [
            LabelBatch::Whole((0..n).collect()),
            LabelBatch::Grouped(prefix_groups(&refs)),
        ] {
            let logits = match &batch {
                LabelBatch::Whole(m) => next_token_logits(
                    &model,
                    Some(&delta),
                    &m.iter().map(|&i| refs[i]).collect::<Vec<_>>(),
                )
                .unwrap(),
                LabelBatch::Grouped(g) => grouped_next_token_logits(
                    &model,
                    Some(&delta),
                    &refs,
                    &g.iter().collect::<Vec<_>>(),
                )
                .unwrap(),
            };
            let want = autograd_grads(&bank, &label_loss(&logits).unwrap().0);
            let (got, ()) =
                recorded_label_grads(&model, &delta, &refs, &batch, label_loss).unwrap();
            let label = match batch {
                LabelBatch::Whole(_) => format!("{name}: whole label prompts"),
                LabelBatch::Grouped(_) => format!("{name}: prefix-grouped label prompts"),
            };
            compare(&label, &bank, &want, &got);
        }
    }
}
