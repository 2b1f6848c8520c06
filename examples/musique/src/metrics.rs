//! The official MuSiQue metrics (StonyBrookNLP/musique `evaluate_v1.0.py` and `metrics/`),
//! kept at full precision (the official script rounds to 3 decimals), plus the leaderboard
//! prediction file and `metrics.json`.
//!
//! Semantics reproduced from the official code:
//! - answer EM/F1: SQuAD normalisation (lowercase; drop ASCII punctuation; replace the
//!   words a/an/the by a space; collapse whitespace), token-multiset F1, each the max over
//!   the answer and its aliases; an empty side gives F1 1 only when both are empty;
//! - support F1 over sets of paragraph idx; both sets empty gives F1 = EM = 1;
//! - answer and support metrics average over *answerable* gold records only;
//! - Full ("sufficiency") metrics switch on when any gold record is unanswerable. Records are
//!   grouped by id (the answerable and unanswerable twins share it); a group scores the
//!   answerable twin's answer F1 (support F1) when *both* predicted sufficiencies equal the
//!   gold ones, in input order, else 0; the Full F1 is the mean over groups.
//!   The official script refuses (asserts) when an id does not occur exactly twice; here
//!   incomplete groups are left out and counted in `unpaired_records`, and the group metrics
//!   are `null` when there is no complete pair.
//! - `sufficiency_accuracy` (not printed by the official script): the fraction of all
//!   records whose predicted answerability equals the gold one.
use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::data::Record;
use crate::error::{Error, Result};

/// Python's `string.punctuation` (ASCII only, as in the official code).
const PUNCTUATION: &str = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";

/// Python `str.split()` whitespace: Unicode White_Space plus the ASCII separators 0x1C–0x1F.
fn is_python_whitespace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's regex `\w` (Unicode): alphanumerics and the underscore.
fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// SQuAD answer normalisation as the official evaluator applies it.
pub fn normalize_answer(text: &str) -> String {
    let lowered = text.to_lowercase();
    let no_punct: String = lowered
        .chars()
        .filter(|c| !PUNCTUATION.contains(*c))
        .collect();
    // `\b(a|an|the)\b` -> " ": a maximal run of word characters equal to an article.
    let mut no_articles = String::with_capacity(no_punct.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if matches!(run.as_str(), "a" | "an" | "the") {
            out.push(' ');
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in no_punct.chars() {
        if is_word_char(c) {
            run.push(c);
        } else {
            flush(&mut run, &mut no_articles);
            no_articles.push(c);
        }
    }
    flush(&mut run, &mut no_articles);
    no_articles
        .split(is_python_whitespace)
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The normalised tokens of an answer (none for the empty string).
pub fn answer_tokens(text: &str) -> Vec<String> {
    if text.is_empty() {
        return Vec::new();
    }
    normalize_answer(text)
        .split(' ')
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

/// Exact match after normalisation.
pub fn exact_match(prediction: &str, gold: &str) -> bool {
    normalize_answer(prediction) == normalize_answer(gold)
}

/// Token-multiset F1 between a prediction and one gold answer.
pub fn token_f1(prediction: &str, gold: &str) -> f64 {
    let pred = answer_tokens(prediction);
    let gold = answer_tokens(gold);
    if pred.is_empty() || gold.is_empty() {
        return if pred == gold { 1.0 } else { 0.0 };
    }
    let mut counts: HashMap<&str, i64> = HashMap::new();
    for t in &gold {
        *counts.entry(t).or_insert(0) += 1;
    }
    let mut same = 0usize;
    for t in &pred {
        if let Some(c) = counts.get_mut(t.as_str()) {
            if *c > 0 {
                *c -= 1;
                same += 1;
            }
        }
    }
    if same == 0 {
        return 0.0;
    }
    let precision = same as f64 / pred.len() as f64;
    let recall = same as f64 / gold.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// Answer EM and F1 of one prediction, each the max over the gold answers (answer + aliases).
/// With no gold answers both are 0.
pub fn answer_scores(prediction: &str, golds: &[String]) -> (f64, f64) {
    let em = golds
        .iter()
        .map(|g| if exact_match(prediction, g) { 1.0 } else { 0.0 })
        .fold(0.0, f64::max);
    let f1 = golds
        .iter()
        .map(|g| token_f1(prediction, g))
        .fold(0.0, f64::max);
    (em, f1)
}

/// Support EM and F1 over paragraph index sets (duplicates ignored).
pub fn support_scores(predicted: &[usize], gold: &[usize]) -> (f64, f64) {
    let pred: std::collections::BTreeSet<usize> = predicted.iter().copied().collect();
    let gold: std::collections::BTreeSet<usize> = gold.iter().copied().collect();
    if pred.is_empty() && gold.is_empty() {
        return (1.0, 1.0);
    }
    let tp = pred.intersection(&gold).count() as f64;
    let fp = pred.len() as f64 - tp;
    let fn_ = gold.len() as f64 - tp;
    let precision = if tp + fp > 0.0 { tp / (tp + fp) } else { 0.0 };
    let recall = if tp + fn_ > 0.0 { tp / (tp + fn_) } else { 0.0 };
    let f1 = if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    };
    let em = if fp + fn_ == 0.0 { 1.0 } else { 0.0 };
    (em, f1)
}

/// One line of the leaderboard prediction file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prediction {
    /// The record's id.
    pub id: String,
    /// The predicted answer.
    pub predicted_answer: String,
    /// Indices of the paragraphs predicted to support the answer.
    pub predicted_support_idxs: Vec<usize>,
    /// Whether the record was predicted answerable.
    pub predicted_answerable: bool,
}

/// Per-record scores (what progressive validation and reward routing use).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RecordScores {
    /// Answer F1 (max over aliases).
    pub answer_f1: f64,
    /// Answer exact match (max over aliases).
    pub answer_em: f64,
    /// Support F1.
    pub support_f1: f64,
    /// Predicted answerability equals the gold one.
    pub sufficiency_correct: bool,
}

/// Score one prediction against its gold record.
pub fn score_record(gold: &Record, prediction: &Prediction) -> RecordScores {
    let (answer_em, answer_f1) = answer_scores(&prediction.predicted_answer, &gold.gold_answers());
    let (_, support_f1) = support_scores(&prediction.predicted_support_idxs, &gold.gold_support());
    RecordScores {
        answer_f1,
        answer_em,
        support_f1,
        sufficiency_correct: prediction.predicted_answerable == gold.answerable,
    }
}

/// The Full (sufficiency) metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FullMetrics {
    /// Fraction of all records whose predicted answerability is right.
    pub sufficiency_accuracy: f64,
    /// Ans+Suff F1 over complete pairs (`None` without any).
    pub group_answer_sufficiency_f1: Option<f64>,
    /// Supp+Suff F1 over complete pairs (`None` without any).
    pub group_support_sufficiency_f1: Option<f64>,
    /// Ids with exactly one answerable and one unanswerable record.
    pub complete_pairs: usize,
    /// Records whose id has no twin (the official script would refuse these files).
    pub unpaired_records: usize,
}

/// The contents of `metrics.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsReport {
    /// Mean answer F1 over answerable records.
    pub answer_f1: f64,
    /// Mean answer EM over answerable records.
    pub answer_em: f64,
    /// Mean support F1 over answerable records.
    pub support_f1: f64,
    /// Number of records scored.
    pub records: usize,
    /// Number of answerable records (the answer/support denominators).
    pub answerable_records: usize,
    /// Present when any gold record is unanswerable (the Full variant).
    #[serde(flatten, skip_serializing_if = "Option::is_none", default)]
    pub full: Option<FullMetrics>,
}

/// Evaluate predictions against gold records (same length, same order, same ids).
pub fn evaluate(gold: &[Record], predictions: &[Prediction]) -> Result<MetricsReport> {
    if gold.len() != predictions.len() {
        return Err(Error::PredictionMismatch {
            position: gold.len().min(predictions.len()),
            reason: format!(
                "{} predictions for {} gold records",
                predictions.len(),
                gold.len()
            ),
        });
    }
    let (mut f1_sum, mut em_sum, mut sp_sum, mut answerable) = (0.0, 0.0, 0.0, 0usize);
    let mut suff_right = 0usize;
    // id -> (first-seen order, [(gold answerable, scores)])
    let mut groups: Vec<(String, Vec<(bool, RecordScores)>)> = Vec::new();
    let mut group_of: HashMap<&str, usize> = HashMap::new();
    for (position, (g, p)) in gold.iter().zip(predictions).enumerate() {
        if g.id != p.id {
            return Err(Error::PredictionMismatch {
                position,
                reason: format!("id `{}` where gold has `{}`", p.id, g.id),
            });
        }
        let s = score_record(g, p);
        if g.answerable {
            f1_sum += s.answer_f1;
            em_sum += s.answer_em;
            sp_sum += s.support_f1;
            answerable += 1;
        }
        suff_right += usize::from(s.sufficiency_correct);
        let k = *group_of.entry(g.id.as_str()).or_insert_with(|| {
            groups.push((g.id.clone(), Vec::new()));
            groups.len() - 1
        });
        groups[k].1.push((g.answerable, s));
    }
    let mean = |sum: f64, n: usize| if n > 0 { sum / n as f64 } else { 0.0 };
    let is_full = gold.iter().any(|g| !g.answerable);
    let full = is_full.then(|| {
        let (mut ga, mut gs, mut pairs, mut unpaired) = (0.0, 0.0, 0usize, 0usize);
        for (_, members) in &groups {
            let complete = members.len() == 2 && members.iter().filter(|m| m.0).count() == 1;
            if !complete {
                unpaired += members.len();
                continue;
            }
            pairs += 1;
            let both_right = members.iter().all(|m| m.1.sufficiency_correct);
            if both_right {
                // Proven invariant: a complete pair has exactly one answerable member.
                if let Some((_, s)) = members.iter().find(|m| m.0) {
                    ga += s.answer_f1;
                    gs += s.support_f1;
                }
            }
        }
        FullMetrics {
            sufficiency_accuracy: mean(suff_right as f64, gold.len()),
            group_answer_sufficiency_f1: (pairs > 0).then(|| ga / pairs as f64),
            group_support_sufficiency_f1: (pairs > 0).then(|| gs / pairs as f64),
            complete_pairs: pairs,
            unpaired_records: unpaired,
        }
    });
    Ok(MetricsReport {
        answer_f1: mean(f1_sum, answerable),
        answer_em: mean(em_sum, answerable),
        support_f1: mean(sp_sum, answerable),
        records: gold.len(),
        answerable_records: answerable,
        full,
    })
}

/// Write predictions in the leaderboard JSONL format (input order), atomically.
pub fn write_predictions_jsonl(path: &Path, predictions: &[Prediction]) -> Result<()> {
    let mut text = String::new();
    for p in predictions {
        text.push_str(&serde_json::to_string(p).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?);
        text.push('\n');
    }
    crate::io::write_atomic(path, text.as_bytes())
}

/// Read a leaderboard prediction file.
pub fn read_predictions_jsonl(path: &Path) -> Result<Vec<Prediction>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            serde_json::from_str(line).map_err(|e| Error::MalformedJson {
                path: path.to_path_buf(),
                line: i + 1,
                message: e.to_string(),
            })?,
        );
    }
    Ok(out)
}

/// Write `metrics.json` atomically.
pub fn write_metrics_json(path: &Path, report: &MetricsReport) -> Result<()> {
    crate::io::write_json_atomic(path, report)
}
