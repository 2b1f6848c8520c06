//! The paper's MuSiQue flows over flowtune-graph.
//!
//! **Answerable**: query generation → Yes/No relevance scoring of every unused paragraph, the
//! best one retrieved → stop? → loop (at most `max_retrievals`) → verbose answer → concise
//! answer. **Full**: the same with a Yes/No sufficiency node after retrieval.
//!
//! "Yes" means log p(Yes) > −ln 2 among {Yes, No}. Supervision recorded in the trace:
//! relevance labels from gold support, stop labelled Yes once all gold support is retrieved,
//! concise targeted at the gold answer (answerable records), sufficiency labelled by
//! answerability. Rewards reported (and routed by [`credit_config`]): `support_f1` right after
//! retrieval (→ query, relevance, stop), `sufficiency` (Full, → sufficiency) and `answer_f1` /
//! `answer_em` after the concise answer (→ verbose, concise). As in the official metrics, answer
//! and support rewards exist only for answerable records.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use flowtune_graph::{
    join_all, Called, Edge, EpisodeContext, Flow, FlowSpec, NodeKind, NodeSpec, PromptSet,
};
use flowtune_rollout::{CallSelection, CreditConfig, GenerateAlternatives, NodeDeviation};
use serde::{Deserialize, Serialize};

use crate::data::Record;
use crate::error::{Error, Result};
use crate::metrics::{answer_scores, support_scores, token_f1, Prediction};

/// Node ids (also adapter and template names).
pub mod nodes {
    /// Query generation (generate; DPO from diverse-beam deviations).
    pub const QUERY: &str = "query";
    /// Paragraph relevance (Yes/No; supervised by gold support).
    pub const RELEVANCE: &str = "relevance";
    /// Stop retrieving (Yes/No; supervised).
    pub const STOP: &str = "stop";
    /// Verbose answer (generate; DPO over diverse-beam candidates).
    pub const VERBOSE: &str = "verbose";
    /// Concise answer (generate; supervised on the gold answer).
    pub const CONCISE: &str = "concise";
    /// Sufficiency (Full only; Yes/No supervised by answerability).
    pub const SUFFICIENCY: &str = "sufficiency";
}

/// Reward names the flow reports.
pub mod rewards {
    /// Support F1 of the retrieved paragraphs (answerable records).
    pub const SUPPORT_F1: &str = "support_f1";
    /// Answer F1 of the final answer (answerable records).
    pub const ANSWER_F1: &str = "answer_f1";
    /// Answer exact match (answerable records).
    pub const ANSWER_EM: &str = "answer_em";
    /// 1 when the predicted answerability is right (Full).
    pub const SUFFICIENCY: &str = "sufficiency";
}

/// Labels of the Yes/No nodes, in score order.
pub const YES_NO: [&str; 2] = ["Yes", "No"];

/// Which MuSiQue task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    /// MuSiQue-Answerable.
    Answerable,
    /// MuSiQue-Full (with unanswerable twins and the sufficiency node).
    Full,
}

/// Flow settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowOptions {
    /// Answerable or Full.
    pub variant: Variant,
    /// At most this many retrievals (4 in the paper).
    pub max_retrievals: usize,
    /// Map the concise answer to the best-matching span of a retrieved paragraph.
    pub grounded_answers: bool,
    /// Token budgets of the generate nodes: query, verbose, concise.
    pub max_new_tokens: [usize; 3],
}

impl Default for FlowOptions {
    fn default() -> Self {
        FlowOptions {
            variant: Variant::Answerable,
            max_retrievals: 4,
            grounded_answers: true,
            max_new_tokens: [24, 64, 16],
        }
    }
}

/// What one episode predicts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowOutput {
    /// The leaderboard prediction.
    pub prediction: Prediction,
    /// log p(Yes) of the sufficiency node among {Yes, No} (Full), for pairwise inference.
    pub sufficiency_yes_logprob: Option<f64>,
    /// Retrieved paragraph indices, in retrieval order.
    pub retrieved: Vec<usize>,
    /// The generated queries.
    pub queries: Vec<String>,
    /// The verbose answer.
    pub verbose: String,
    /// The concise answer before grounding.
    pub raw_answer: String,
}

/// The MuSiQue flow (Answerable or Full).
#[derive(Debug)]
pub struct MusiqueFlow {
    options: FlowOptions,
    prompts: PromptSet,
}

/// The prompt folder shipped with the workspace: `$FLOWTUNE_ROOT/prompts/musique`.
pub fn default_prompt_dir() -> PathBuf {
    let root = std::env::var_os("FLOWTUNE_ROOT")
        .map(PathBuf::from)
        .or_else(|| option_env!("FLOWTUNE_ROOT").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("."));
    root.join("prompts").join("musique")
}

#[derive(Serialize)]
struct Shown<'a> {
    title: &'a str,
    text: &'a str,
}

/// log p(Yes) among {Yes, No} from a Yes/No call's label log-probabilities.
pub fn yes_logprob(call: &Called) -> f64 {
    match call.scores.as_slice() {
        [yes, no] => {
            let m = yes.max(*no);
            yes - (m + ((yes - m).exp() + (no - m).exp()).ln())
        }
        _ => f64::NEG_INFINITY,
    }
}

/// Whether a Yes/No call answered "Yes". Live, the context picks the higher-scored label, which
/// for two labels is exactly log p(Yes) > −ln 2 among {Yes, No}; reading the chosen output (not
/// the scores) makes forced and deviated outputs count as what they say.
pub fn is_yes(call: &Called) -> bool {
    call.choice() == 0
}

/// The first non-empty line of a generation, trimmed.
fn first_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
        .to_string()
}

impl MusiqueFlow {
    /// A flow over the given prompt set, which must hold every node's template.
    pub fn new(options: FlowOptions, prompts: PromptSet) -> Result<Self> {
        let flow = MusiqueFlow { options, prompts };
        let have: BTreeSet<&str> = flow.prompts.names().collect();
        for node in flow.spec().nodes {
            if let Some(t) = &node.template {
                if !have.contains(t.as_str()) {
                    return Err(Error::Template {
                        template: t.clone(),
                        message: "no such template in the prompt folder".into(),
                    });
                }
            }
        }
        if flow.options.max_retrievals == 0 {
            return Err(Error::Flow("max_retrievals must be at least 1".into()));
        }
        Ok(flow)
    }

    /// A flow with the templates of `dir` (e.g. [`default_prompt_dir`]).
    pub fn from_prompt_dir(options: FlowOptions, dir: &Path) -> Result<Self> {
        let prompts = PromptSet::load_dir(dir).map_err(|e| Error::Template {
            template: dir.display().to_string(),
            message: e.to_string(),
        })?;
        Self::new(options, prompts)
    }

    /// The options.
    pub fn options(&self) -> &FlowOptions {
        &self.options
    }

    fn shown(record: &Record, idxs: &[usize]) -> Vec<serde_json::Value> {
        idxs.iter()
            .filter_map(|i| record.paragraphs.get(*i))
            .map(|p| {
                serde_json::json!(Shown {
                    title: &p.title,
                    text: &p.paragraph_text
                })
            })
            .collect()
    }
}

fn generate_spec(id: &str, max_new_tokens: usize, stop: &[&str], description: &str) -> NodeSpec {
    let mut spec = NodeSpec::generate(id, max_new_tokens).describe(description);
    if let NodeKind::Generate { stop: s, .. } = &mut spec.kind {
        *s = stop.iter().map(|x| (*x).to_string()).collect();
    }
    spec
}

impl Flow for MusiqueFlow {
    type Input = Record;
    type Output = FlowOutput;

    fn spec(&self) -> FlowSpec {
        let [q, v, c] = self.options.max_new_tokens;
        let mut nodes = vec![
            generate_spec(nodes::QUERY, q, &["\n"], "search query for the next fact"),
            NodeSpec::classify(nodes::RELEVANCE, &YES_NO)
                .describe("is this paragraph needed? (each unused one)"),
            NodeSpec::classify(nodes::STOP, &YES_NO).describe("all facts retrieved?"),
            generate_spec(nodes::VERBOSE, v, &[], "step-by-step answer"),
            generate_spec(nodes::CONCISE, c, &["\n"], "final short answer"),
        ];
        let mut edges = vec![
            Edge::new(
                nodes::QUERY,
                nodes::RELEVANCE,
                Some("each unused paragraph"),
            ),
            Edge::new(nodes::RELEVANCE, nodes::STOP, Some("retrieve best")),
            Edge::new(nodes::STOP, nodes::QUERY, Some("No, < max retrievals")),
            Edge::new(nodes::VERBOSE, nodes::CONCISE, None),
        ];
        match self.options.variant {
            Variant::Answerable => edges.push(Edge::new(nodes::STOP, nodes::VERBOSE, Some("Yes"))),
            Variant::Full => {
                nodes.push(
                    NodeSpec::classify(nodes::SUFFICIENCY, &YES_NO)
                        .describe("answerable from the retrieved paragraphs?"),
                );
                edges.push(Edge::new(nodes::STOP, nodes::SUFFICIENCY, Some("Yes")));
                edges.push(Edge::new(nodes::SUFFICIENCY, nodes::VERBOSE, None));
            }
        }
        let name = match self.options.variant {
            Variant::Answerable => "musique_ans",
            Variant::Full => "musique_full",
        };
        FlowSpec {
            name: name.into(),
            nodes,
            edges,
        }
    }

    async fn run(
        &self,
        cx: &EpisodeContext,
        record: &Record,
    ) -> flowtune_graph::Result<FlowOutput> {
        let gold: BTreeSet<usize> = record.gold_support().into_iter().collect();
        let mut retrieved: Vec<usize> = Vec::new();
        let mut queries = Vec::new();
        for round in 0..self.options.max_retrievals {
            let unused: Vec<usize> = (0..record.paragraphs.len())
                .filter(|i| !retrieved.contains(i))
                .collect();
            if unused.is_empty() {
                break;
            }
            let shown = Self::shown(record, &retrieved);
            let messages = self.prompts.render(
                nodes::QUERY,
                serde_json::json!({"question": record.question, "retrieved": shown}),
            )?;
            let query = first_line(cx.generate(nodes::QUERY, messages).await?.text());
            let mut calls = Vec::with_capacity(unused.len());
            for i in &unused {
                let p = &record.paragraphs[*i];
                let vars = serde_json::json!({
                    "question": record.question,
                    "query": query,
                    "paragraph": Shown { title: &p.title, text: &p.paragraph_text },
                });
                calls.push(cx.classify(
                    nodes::RELEVANCE,
                    self.prompts.render(nodes::RELEVANCE, vars)?,
                ));
            }
            let scored = join_all(calls).await;
            let mut best: Option<(usize, f64)> = None;
            for (i, call) in unused.iter().zip(scored) {
                let call = call?;
                cx.gold_label(&call, if gold.contains(i) { 0 } else { 1 });
                let s = yes_logprob(&call);
                if best.is_none_or(|(_, b)| s > b) {
                    best = Some((*i, s));
                }
            }
            let Some((pick, _)) = best else { break };
            retrieved.push(pick);
            queries.push(query);
            if round + 1 == self.options.max_retrievals || unused.len() == 1 {
                break;
            }
            let shown = Self::shown(record, &retrieved);
            let messages = self.prompts.render(
                nodes::STOP,
                serde_json::json!({"question": record.question, "retrieved": shown}),
            )?;
            let stop = cx.classify(nodes::STOP, messages).await?;
            let complete = gold.iter().all(|g| retrieved.contains(g));
            cx.gold_label(&stop, if complete { 0 } else { 1 });
            if is_yes(&stop) {
                break;
            }
        }
        let mut support = retrieved.clone();
        support.sort_unstable();
        if record.answerable {
            cx.reward(
                rewards::SUPPORT_F1,
                support_scores(&support, &record.gold_support()).1,
            );
        }
        let shown = Self::shown(record, &retrieved);

        let mut sufficiency_yes_logprob = None;
        let mut predicted_answerable = true;
        if self.options.variant == Variant::Full {
            let messages = self.prompts.render(
                nodes::SUFFICIENCY,
                serde_json::json!({"question": record.question, "retrieved": shown}),
            )?;
            let call = cx.classify(nodes::SUFFICIENCY, messages).await?;
            cx.gold_label(&call, if record.answerable { 0 } else { 1 });
            predicted_answerable = is_yes(&call);
            sufficiency_yes_logprob = Some(yes_logprob(&call));
            cx.reward(
                rewards::SUFFICIENCY,
                if predicted_answerable == record.answerable {
                    1.0
                } else {
                    0.0
                },
            );
        }

        let messages = self.prompts.render(
            nodes::VERBOSE,
            serde_json::json!({"question": record.question, "retrieved": shown}),
        )?;
        let verbose = cx
            .generate(nodes::VERBOSE, messages)
            .await?
            .text()
            .trim()
            .to_string();
        let messages = self.prompts.render(
            nodes::CONCISE,
            serde_json::json!({"question": record.question, "reasoning": verbose}),
        )?;
        let concise = cx.generate(nodes::CONCISE, messages).await?;
        if record.answerable {
            cx.gold_target(&concise, record.answer.clone());
        }
        let raw_answer = first_line(concise.text());
        let answer = if self.options.grounded_answers {
            let texts: Vec<&str> = retrieved
                .iter()
                .map(|i| record.paragraphs[*i].paragraph_text.as_str())
                .collect();
            ground_answer(&raw_answer, &texts).unwrap_or_else(|| raw_answer.clone())
        } else {
            raw_answer.clone()
        };
        if record.answerable {
            let (em, f1) = answer_scores(&answer, &record.gold_answers());
            cx.reward(rewards::ANSWER_F1, f1);
            cx.reward(rewards::ANSWER_EM, em);
        }
        Ok(FlowOutput {
            prediction: Prediction {
                id: record.id.clone(),
                predicted_answer: answer,
                predicted_support_idxs: support,
                predicted_answerable,
            },
            sufficiency_yes_logprob,
            retrieved,
            queries,
            verbose,
            raw_answer,
        })
    }
}

/// Strip ASCII punctuation from both ends of a word.
fn trim_punctuation(word: &str) -> &str {
    word.trim_matches(|c: char| c.is_ascii_punctuation())
}

/// The span (consecutive words) of `paragraphs` with the highest answer F1 against `answer`
/// (ties: the shorter, then the earlier); `None` when nothing overlaps. Spans are at most
/// the answer's length + 2 words.
pub fn ground_answer(answer: &str, paragraphs: &[&str]) -> Option<String> {
    let n = crate::metrics::answer_tokens(answer).len();
    if n == 0 {
        return None;
    }
    let mut best: Option<(f64, usize, String)> = None;
    for text in paragraphs {
        let words: Vec<&str> = text.split_whitespace().collect();
        for start in 0..words.len() {
            for len in 1..=(n + 2).min(words.len() - start) {
                let span = &words[start..start + len];
                let first = trim_punctuation(span[0]);
                let last = trim_punctuation(span[len - 1]);
                if first.is_empty() || last.is_empty() {
                    continue;
                }
                let mut s = span.join(" ");
                // Drop edge punctuation ("Viko." → "Viko") but keep inner text.
                s = s
                    .trim_matches(|c: char| c.is_ascii_punctuation())
                    .to_string();
                let f1 = token_f1(&s, answer);
                let better = match &best {
                    None => f1 > 0.0,
                    Some((bf, bl, _)) => f1 > *bf || (f1 == *bf && len < *bl),
                };
                if better {
                    best = Some((f1, len, s));
                }
            }
        }
    }
    best.map(|(_, _, s)| s)
}

/// Pairwise inference for Full: for every id with exactly two predictions, the one with the
/// higher log p(sufficient) is answerable and the other not (ties: the first). Predictions
/// without a twin or without a score keep their own decision.
pub fn pairwise_sufficiency(predictions: &mut [Prediction], yes_logprobs: &[Option<f64>]) {
    let mut by_id: std::collections::HashMap<String, Vec<usize>> = std::collections::HashMap::new();
    for (i, p) in predictions.iter().enumerate() {
        by_id.entry(p.id.clone()).or_default().push(i);
    }
    for members in by_id.values() {
        if let [a, b] = members.as_slice() {
            if let (Some(Some(sa)), Some(Some(sb))) = (yes_logprobs.get(*a), yes_logprobs.get(*b)) {
                let a_wins = sa >= sb;
                predictions[*a].predicted_answerable = a_wins;
                predictions[*b].predicted_answerable = !a_wins;
            }
        }
    }
}

/// The paper's credit assignment for the MuSiQue flows: retrieval nodes judged by support F1,
/// answer nodes by answer F1, sufficiency by accuracy, with early termination; deviations by
/// diverse beam (4) for query and verbose; relevance, stop, concise and sufficiency learn from
/// gold supervision only.
pub fn credit_config(variant: Variant) -> CreditConfig {
    credit_config_with_alternatives(variant, 3, 3)
}

/// [`credit_config`] with `query` and `answer` diverse-beam deviations per call of the
/// query and verbose-answer nodes (diverse beam search with `n + 1` beams in as many
/// groups; 0 turns that node's deviations off; the paper: 3 and 3).
pub fn credit_config_with_alternatives(
    variant: Variant,
    query: usize,
    answer: usize,
) -> CreditConfig {
    let diverse = |n: usize| NodeDeviation {
        enabled: n > 0,
        max_alternatives: n.max(1),
        calls: CallSelection::All,
        generate: GenerateAlternatives::DiverseBeam {
            num_beams: n.max(1) + 1,
            num_beam_groups: n.max(1) + 1,
            diversity_penalty: 1.0,
        },
    };
    let off = NodeDeviation {
        enabled: false,
        ..NodeDeviation::default()
    };
    let mut config = CreditConfig {
        default_reward: rewards::ANSWER_F1.into(),
        early_termination: true,
        ..CreditConfig::default()
    }
    .route(nodes::QUERY, rewards::SUPPORT_F1)
    .route(nodes::RELEVANCE, rewards::SUPPORT_F1)
    .route(nodes::STOP, rewards::SUPPORT_F1)
    .route(nodes::VERBOSE, rewards::ANSWER_F1)
    .route(nodes::CONCISE, rewards::ANSWER_F1)
    .with_deviation(nodes::QUERY, diverse(query))
    .with_deviation(nodes::VERBOSE, diverse(answer))
    .with_deviation(nodes::RELEVANCE, off.clone())
    .with_deviation(nodes::STOP, off.clone())
    .with_deviation(nodes::CONCISE, off.clone());
    if variant == Variant::Full {
        config = config
            .route(nodes::SUFFICIENCY, rewards::SUFFICIENCY)
            .with_deviation(nodes::SUFFICIENCY, off);
    }
    config
}
