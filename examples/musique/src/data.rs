//! Official MuSiQue JSONL records: serde types, a validating loader whose errors carry
//! file:line and the field, hop counts from ids, and hop-distribution subsampling.
//!
//! Two loaders: [`load_jsonl`] needs `paragraphs` (the reading-comprehension files,
//! Answerable and Full) and rejects a question-only record with
//! [`Error::QuestionOnlyRecord`]; [`load_questions_jsonl`] accepts the question-only
//! variant (`*.no_paragraphs.jsonl`), whose records then have an empty `paragraphs`
//! list — useful as a hop-distribution target for [`sample_matching_hops`].
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// One context paragraph of a record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Paragraph {
    /// Position of the paragraph in the record (equals its list index).
    pub idx: usize,
    /// Wikipedia-style title.
    pub title: String,
    /// The paragraph's text.
    pub paragraph_text: String,
    /// Whether the paragraph supports one of the decomposition steps.
    pub is_supporting: bool,
}

/// One single-hop step of the question's decomposition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecompositionStep {
    /// The single-hop question's id (the id's numeric parts).
    pub id: u64,
    /// The single-hop question (`#1` refers to the previous step's answer).
    pub question: String,
    /// The step's answer.
    pub answer: String,
    /// The supporting paragraph; `null` for the removed step of an unanswerable Full record.
    pub paragraph_support_idx: Option<usize>,
}

/// One MuSiQue record (official v1.0 JSONL schema).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// `<N>hop<k>__<id>_<id>...`; in Full, the answerable and unanswerable twins share it.
    pub id: String,
    /// The context paragraphs (empty for question-only records).
    #[serde(default)]
    pub paragraphs: Vec<Paragraph>,
    /// The multi-hop question.
    pub question: String,
    /// The single-hop decomposition.
    pub question_decomposition: Vec<DecompositionStep>,
    /// The gold answer.
    pub answer: String,
    /// Other acceptable answers.
    pub answer_aliases: Vec<String>,
    /// Whether the paragraphs suffice to answer (always true in Answerable).
    pub answerable: bool,
}

impl Record {
    /// Number of hops, from the id prefix (`2hop`, `3hop1`, ...).
    pub fn hops(&self) -> Option<usize> {
        hops_from_id(&self.id)
    }

    /// Indices of the paragraphs flagged `is_supporting`, ascending.
    pub fn gold_support(&self) -> Vec<usize> {
        self.paragraphs
            .iter()
            .filter(|p| p.is_supporting)
            .map(|p| p.idx)
            .collect()
    }

    /// The gold answer followed by its aliases.
    pub fn gold_answers(&self) -> Vec<String> {
        std::iter::once(self.answer.clone())
            .chain(self.answer_aliases.iter().cloned())
            .collect()
    }
}

/// The hop count encoded in a MuSiQue id: the digit before `hop` (`3hop1__..` → 3).
pub fn hops_from_id(id: &str) -> Option<usize> {
    let (prefix, rest) = id.split_once("__")?;
    if rest.is_empty() {
        return None;
    }
    let digits: String = prefix.chars().take_while(|c| c.is_ascii_digit()).collect();
    let tail = &prefix[digits.len()..];
    let kind = tail.strip_prefix("hop")?;
    if !kind.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|h| *h >= 1)
}

/// Which records a loader accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ParagraphPolicy {
    Required,
    QuestionOnly,
}

/// Load and validate an official MuSiQue JSONL file with paragraphs (Answerable or Full).
pub fn load_jsonl(path: impl AsRef<Path>) -> Result<Vec<Record>> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_jsonl(&text, path, ParagraphPolicy::Required)
}

/// Load and validate a question-only MuSiQue JSONL file (`*.no_paragraphs.jsonl`); records
/// that do carry paragraphs are validated as usual.
pub fn load_questions_jsonl(path: impl AsRef<Path>) -> Result<Vec<Record>> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_jsonl(&text, path, ParagraphPolicy::QuestionOnly)
}

/// Parse and validate JSONL text that needs paragraphs; `path` only labels errors.
pub fn parse_records(text: &str, path: impl AsRef<Path>) -> Result<Vec<Record>> {
    parse_jsonl(text, path.as_ref(), ParagraphPolicy::Required)
}

fn parse_jsonl(text: &str, path: &Path, policy: ParagraphPolicy) -> Result<Vec<Record>> {
    let mut records = Vec::new();
    // id -> (first line, answerable flags seen)
    let mut seen: HashMap<String, (usize, Vec<bool>)> = HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let record = parse_line(raw, path, line, policy)?;
        let entry = seen.entry(record.id.clone()).or_insert((line, Vec::new()));
        // Full pairs an answerable and an unanswerable twin under one id; nothing else repeats.
        let allowed = match entry.1.as_slice() {
            [] => true,
            [first] => *first != record.answerable,
            _ => false,
        };
        if !allowed {
            return Err(Error::DuplicateId {
                path: path.to_path_buf(),
                line,
                id: record.id.clone(),
                first_line: entry.0,
            });
        }
        entry.1.push(record.answerable);
        records.push(record);
    }
    Ok(records)
}

fn require<'a>(
    obj: &'a serde_json::Map<String, Value>,
    key: &str,
    prefix: &str,
    path: &Path,
    line: usize,
) -> Result<&'a Value> {
    obj.get(key).ok_or_else(|| Error::MissingField {
        path: path.to_path_buf(),
        line,
        field: format!("{prefix}{key}"),
    })
}

fn array_of_objects(
    value: &Value,
    field: &str,
    keys: &[&str],
    path: &Path,
    line: usize,
) -> Result<()> {
    let items = value.as_array().ok_or_else(|| Error::InvalidField {
        path: path.to_path_buf(),
        line,
        field: field.to_string(),
        reason: "expected a list".into(),
    })?;
    for (k, item) in items.iter().enumerate() {
        let obj = item.as_object().ok_or_else(|| Error::InvalidField {
            path: path.to_path_buf(),
            line,
            field: format!("{field}[{k}]"),
            reason: "expected an object".into(),
        })?;
        for key in keys {
            require(obj, key, &format!("{field}[{k}]."), path, line)?;
        }
    }
    Ok(())
}

/// Parse and validate one JSONL line.
fn parse_line(raw: &str, path: &Path, line: usize, policy: ParagraphPolicy) -> Result<Record> {
    let value: Value = serde_json::from_str(raw).map_err(|e| Error::MalformedJson {
        path: path.to_path_buf(),
        line,
        message: e.to_string(),
    })?;
    let obj = value.as_object().ok_or_else(|| Error::MalformedJson {
        path: path.to_path_buf(),
        line,
        message: "a record must be a JSON object".into(),
    })?;
    for key in [
        "id",
        "question",
        "question_decomposition",
        "answer",
        "answer_aliases",
        "answerable",
    ] {
        require(obj, key, "", path, line)?;
    }
    let id_text = obj
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    match obj.get("paragraphs") {
        None if policy == ParagraphPolicy::Required => {
            return Err(Error::QuestionOnlyRecord {
                path: path.to_path_buf(),
                line,
                id: id_text,
            });
        }
        None => {}
        Some(p) => array_of_objects(
            p,
            "paragraphs",
            &["idx", "title", "paragraph_text", "is_supporting"],
            path,
            line,
        )?,
    }
    array_of_objects(
        require(obj, "question_decomposition", "", path, line)?,
        "question_decomposition",
        &["id", "question", "answer", "paragraph_support_idx"],
        path,
        line,
    )?;
    let record: Record =
        serde_json::from_value(value.clone()).map_err(|e| Error::InvalidField {
            path: path.to_path_buf(),
            line,
            field: locate_bad_field(&value),
            reason: e.to_string(),
        })?;
    validate(&record, path, line)?;
    Ok(record)
}

/// Best-effort name of the field that failed to deserialize (the first whose type is wrong).
fn locate_bad_field(value: &Value) -> String {
    type Check = fn(&Value) -> bool;
    let fields: [(&str, Check); 6] = [
        ("id", Value::is_string),
        ("question", Value::is_string),
        ("answer", Value::is_string),
        ("answerable", Value::is_boolean),
        ("answer_aliases", |v| {
            v.as_array().is_some_and(|a| a.iter().all(Value::is_string))
        }),
        ("paragraphs", |v| v.is_array()),
    ];
    for (name, ok) in fields {
        if let Some(v) = value.get(name) {
            if !ok(v) {
                return name.to_string();
            }
        }
    }
    let nonneg = |v: &Value| v.as_u64().is_some();
    if let Some(ps) = value.get("paragraphs").and_then(Value::as_array) {
        for (k, p) in ps.iter().enumerate() {
            let checks: [(&str, bool); 4] = [
                ("idx", p.get("idx").is_some_and(nonneg)),
                ("title", p.get("title").is_some_and(Value::is_string)),
                (
                    "paragraph_text",
                    p.get("paragraph_text").is_some_and(Value::is_string),
                ),
                (
                    "is_supporting",
                    p.get("is_supporting").is_some_and(Value::is_boolean),
                ),
            ];
            if let Some((name, _)) = checks.iter().find(|(_, ok)| !ok) {
                return format!("paragraphs[{k}].{name}");
            }
        }
    }
    if let Some(steps) = value
        .get("question_decomposition")
        .and_then(Value::as_array)
    {
        for (k, s) in steps.iter().enumerate() {
            let checks: [(&str, bool); 4] = [
                ("id", s.get("id").is_some_and(nonneg)),
                ("question", s.get("question").is_some_and(Value::is_string)),
                ("answer", s.get("answer").is_some_and(Value::is_string)),
                (
                    "paragraph_support_idx",
                    s.get("paragraph_support_idx")
                        .is_some_and(|v| v.is_null() || nonneg(v)),
                ),
            ];
            if let Some((name, _)) = checks.iter().find(|(_, ok)| !ok) {
                return format!("question_decomposition[{k}].{name}");
            }
        }
    }
    "(record)".to_string()
}

/// Semantic checks on a deserialized record.
fn validate(record: &Record, path: &Path, line: usize) -> Result<()> {
    let p = || path.to_path_buf();
    let hops = hops_from_id(&record.id).ok_or_else(|| Error::BadId {
        path: p(),
        line,
        id: record.id.clone(),
        reason: "expected `<N>hop[<k>]__<ids>`".into(),
    })?;
    if hops != record.question_decomposition.len() {
        return Err(Error::BadId {
            path: p(),
            line,
            id: record.id.clone(),
            reason: format!(
                "{hops} hops but {} decomposition steps",
                record.question_decomposition.len()
            ),
        });
    }
    for (position, para) in record.paragraphs.iter().enumerate() {
        if para.idx != position {
            return Err(Error::ParagraphIndexMismatch {
                path: p(),
                line,
                position,
                idx: para.idx,
            });
        }
    }
    let has_paragraphs = !record.paragraphs.is_empty();
    let mut decomposition = BTreeSet::new();
    for (step, s) in record.question_decomposition.iter().enumerate() {
        match s.paragraph_support_idx {
            Some(idx) => {
                if has_paragraphs && idx >= record.paragraphs.len() {
                    return Err(Error::SupportOutOfRange {
                        path: p(),
                        line,
                        step,
                        idx,
                        paragraphs: record.paragraphs.len(),
                    });
                }
                decomposition.insert(idx);
            }
            None if record.answerable => {
                return Err(Error::MissingSupport {
                    path: p(),
                    line,
                    step,
                })
            }
            None => {}
        }
    }
    if has_paragraphs {
        let flagged: BTreeSet<usize> = record.gold_support().into_iter().collect();
        if flagged != decomposition {
            return Err(Error::SupportMismatch {
                path: p(),
                line,
                flagged: flagged.into_iter().collect(),
                decomposition: decomposition.into_iter().collect(),
            });
        }
    }
    if record.answerable && record.answer.trim().is_empty() {
        return Err(Error::InvalidField {
            path: p(),
            line,
            field: "answer".into(),
            reason: "empty answer on an answerable record".into(),
        });
    }
    Ok(())
}

/// Serialise records as JSONL (one compact object a line).
pub fn to_jsonl(records: &[Record]) -> Result<String> {
    let mut out = String::new();
    for r in records {
        let line = serde_json::to_string(r).map_err(|source| Error::Json {
            path: PathBuf::from("<memory>"),
            source,
        })?;
        out.push_str(&line);
        out.push('\n');
    }
    Ok(out)
}

/// Write records as JSONL, atomically.
pub fn write_jsonl(path: impl AsRef<Path>, records: &[Record]) -> Result<()> {
    crate::io::write_atomic(path.as_ref(), to_jsonl(records)?.as_bytes())
}

/// Count of records per hop count (records whose id carries no hop count are skipped).
pub fn hop_distribution(records: &[Record]) -> BTreeMap<usize, usize> {
    let mut counts = BTreeMap::new();
    for r in records {
        if let Some(h) = r.hops() {
            *counts.entry(h).or_insert(0) += 1;
        }
    }
    counts
}

/// Per-hop quotas summing to `n`, proportional to `target` (largest remainder), capped by
/// what `available` holds per hop, the shortfall redistributed over the other hops.
pub fn hop_quotas(
    target: &BTreeMap<usize, usize>,
    available: &BTreeMap<usize, usize>,
    n: usize,
) -> Result<BTreeMap<usize, usize>> {
    let total_available: usize = available.values().sum();
    if n > total_available {
        return Err(Error::SampleTooLarge {
            requested: n,
            available: total_available,
        });
    }
    let mut quotas: BTreeMap<usize, usize> = available.keys().map(|h| (*h, 0)).collect();
    let mut remaining = n;
    // Weights: the target's counts over hops the pool still has room for; hops the target
    // lacks get weight only once the target's hops are exhausted.
    while remaining > 0 {
        let open: Vec<usize> = available
            .iter()
            .filter(|(h, a)| quotas[h] < **a)
            .map(|(h, _)| *h)
            .collect();
        let mut weights: Vec<(usize, f64)> = open
            .iter()
            .map(|h| (*h, *target.get(h).unwrap_or(&0) as f64))
            .filter(|(_, w)| *w > 0.0)
            .collect();
        if weights.is_empty() {
            weights = open.iter().map(|h| (*h, available[h] as f64)).collect();
        }
        let wsum: f64 = weights.iter().map(|(_, w)| w).sum();
        let mut shares: Vec<(usize, usize, f64)> = weights
            .iter()
            .map(|(h, w)| {
                let exact = remaining as f64 * w / wsum;
                (*h, exact.floor() as usize, exact - exact.floor())
            })
            .collect();
        let floor_sum: usize = shares.iter().map(|s| s.1).sum();
        let mut extra = remaining - floor_sum;
        let mut order: Vec<usize> = (0..shares.len()).collect();
        order.sort_by(|a, b| {
            shares[*b]
                .2
                .total_cmp(&shares[*a].2)
                .then(shares[*a].0.cmp(&shares[*b].0))
        });
        for k in order {
            if extra == 0 {
                break;
            }
            shares[k].1 += 1;
            extra -= 1;
        }
        let mut placed = 0;
        for (h, want, _) in shares {
            let room = available[&h] - quotas[&h];
            let take = want.min(room);
            if let Some(q) = quotas.get_mut(&h) {
                *q += take;
            }
            placed += take;
        }
        remaining -= placed;
        if placed == 0 {
            // Cannot happen while n <= total_available (some open hop has room and positive
            // weight gets at least one slot); guard against an infinite loop anyway.
            return Err(Error::SampleTooLarge {
                requested: n,
                available: total_available,
            });
        }
    }
    Ok(quotas)
}

/// Sample `n` records from `pool` whose hop distribution matches `target`'s (seeded,
/// deterministic; the result is shuffled). Records without a hop count are never drawn.
pub fn sample_matching_hops(
    pool: &[Record],
    target: &[Record],
    n: usize,
    seed: u64,
) -> Result<Vec<Record>> {
    let quotas = hop_quotas(&hop_distribution(target), &hop_distribution(pool), n)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut chosen = Vec::with_capacity(n);
    for (hops, quota) in quotas {
        let mut bucket: Vec<&Record> = pool.iter().filter(|r| r.hops() == Some(hops)).collect();
        bucket.shuffle(&mut rng);
        chosen.extend(bucket.into_iter().take(quota).cloned());
    }
    chosen.shuffle(&mut rng);
    Ok(chosen)
}

/// Environment variable that overrides where the official MuSiQue files live.
pub const DATA_DIR_ENV: &str = "MUSIQUE_DATA";

/// The shared official MuSiQue folder: `$MUSIQUE_DATA`, else `$FLOWTUNE_ROOT/../shared/data/musique`
/// (`FLOWTUNE_ROOT` from the environment at run time, or as set by the workspace's cargo config
/// at build time).
pub fn official_data_dir() -> PathBuf {
    if let Some(p) = std::env::var_os(DATA_DIR_ENV) {
        return PathBuf::from(p);
    }
    let root = std::env::var_os("FLOWTUNE_ROOT")
        .map(PathBuf::from)
        .or_else(|| option_env!("FLOWTUNE_ROOT").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("."));
    root.join("..").join("shared").join("data").join("musique")
}
