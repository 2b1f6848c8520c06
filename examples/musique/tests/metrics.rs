//! Official-metric semantics: hand-made cases, and agreement with the Python reference
//! (`tests/reference/musique_metrics.py`, one invocation) on real answers, random strings
//! and whole evaluations. Tolerance for floats: 1e-12 absolute (both sides compute in f64
//! with the same operation order; golden values come from the Python reference).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use std::path::PathBuf;
use std::process::Command;

use musique::data::{load_jsonl, official_data_dir, write_jsonl, Record};
use musique::metrics::{
    answer_scores, evaluate, normalize_answer, read_predictions_jsonl, support_scores, token_f1,
    write_metrics_json, write_predictions_jsonl, MetricsReport, Prediction,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const TOL: f64 = 1e-12;

#[test]
fn normalisation_matches_squad() {
    assert_eq!(normalize_answer("The  Beatles!"), "beatles");
    assert_eq!(normalize_answer("An apple, a day."), "apple day");
    assert_eq!(
        normalize_answer("Theatre of the Absurd"),
        "theatre of absurd"
    );
    // Punctuation goes first, so "a-n" becomes the article "an" and is dropped.
    assert_eq!(normalize_answer("a-n b"), "b");
    assert_eq!(normalize_answer("U.S.A."), "usa");
    assert_eq!(
        normalize_answer("\tMiquette\u{a0}Giraudy \n"),
        "miquette giraudy"
    );
    assert_eq!(normalize_answer("Éclair Ñ"), "éclair ñ");
    // Non-ASCII punctuation is kept, as in Python's string.punctuation.
    assert_eq!(normalize_answer("“quoted”"), "“quoted”");
    assert_eq!(normalize_answer(""), "");
    assert_eq!(normalize_answer("the"), "");
}

#[test]
fn answer_f1_and_em_take_the_best_alias() {
    let golds = vec!["Orion Pictures".to_string(), "Orion".to_string()];
    assert_eq!(answer_scores("orion", &golds), (1.0, 1.0));
    let (em, f1) = answer_scores("Orion Pictures Corp", &golds);
    assert_eq!(em, 0.0);
    assert!((f1 - 0.8).abs() < TOL, "{f1}"); // P 2/3, R 1 against the first gold
    assert_eq!(answer_scores("Mike Medavoy", &golds), (0.0, 0.0));
    // Repeated tokens count as a multiset.
    assert!((token_f1("new new york", "new york") - 0.8).abs() < TOL);
}

#[test]
fn empty_answers() {
    let golds = vec!["Tamaulipas".to_string()];
    assert_eq!(answer_scores("", &golds), (0.0, 0.0));
    // Both sides normalise to nothing: F1 1 and EM 1 (SQuAD's no-answer agreement).
    assert_eq!(answer_scores("the", &["".to_string()]), (1.0, 1.0));
    assert_eq!(token_f1("", ""), 1.0);
    assert_eq!(answer_scores("x", &[]), (0.0, 0.0));
}

#[test]
fn support_sets() {
    assert_eq!(support_scores(&[1, 5], &[5, 1]), (1.0, 1.0));
    let (em, f1) = support_scores(&[1, 2, 3], &[1, 5]);
    assert_eq!(em, 0.0);
    assert!((f1 - 0.4).abs() < TOL); // P 1/3, R 1/2
    assert_eq!(support_scores(&[], &[1]), (0.0, 0.0));
    assert_eq!(support_scores(&[], &[]), (1.0, 1.0));
    assert_eq!(support_scores(&[2, 2, 2], &[2]), (1.0, 1.0));
}

fn record(id: &str, answerable: bool, answer: &str, support: &[usize]) -> Record {
    let paragraphs = (0..4)
        .map(|i| musique::data::Paragraph {
            idx: i,
            title: format!("T{i}"),
            paragraph_text: format!("text {i}"),
            is_supporting: support.contains(&i),
        })
        .collect();
    Record {
        id: id.into(),
        paragraphs,
        question: "q?".into(),
        question_decomposition: vec![],
        answer: answer.into(),
        answer_aliases: vec![],
        answerable,
    }
}

fn pred(id: &str, answer: &str, support: &[usize], answerable: bool) -> Prediction {
    Prediction {
        id: id.into(),
        predicted_answer: answer.into(),
        predicted_support_idxs: support.to_vec(),
        predicted_answerable: answerable,
    }
}

#[test]
fn full_pairs_score_only_when_both_sufficiencies_are_right() {
    let gold = vec![
        record("2hop__1_2", true, "Paris", &[0, 1]),
        record("2hop__1_2", false, "Paris", &[0]),
        record("2hop__3_4", false, "Rome", &[2]),
        record("2hop__3_4", true, "Rome", &[2, 3]),
    ];
    let preds = vec![
        pred("2hop__1_2", "Paris", &[0, 1], true),
        pred("2hop__1_2", "Paris", &[0], false), // pair 1: both right -> F1 1, SuppF1 1
        pred("2hop__3_4", "", &[], true),        // pair 2: first twin wrong -> 0
        pred("2hop__3_4", "Rome", &[2], true),
    ];
    let m = evaluate(&gold, &preds).unwrap();
    // Answer/support over the 2 answerable records only.
    assert!((m.answer_f1 - 1.0).abs() < TOL);
    assert!((m.support_f1 - (1.0 + 2.0 / 3.0) / 2.0).abs() < TOL);
    let full = m.full.clone().unwrap();
    assert!((full.sufficiency_accuracy - 0.75).abs() < TOL);
    assert_eq!(full.group_answer_sufficiency_f1, Some(0.5));
    assert_eq!(full.group_support_sufficiency_f1, Some(0.5));
    assert_eq!((full.complete_pairs, full.unpaired_records), (2, 0));
}

#[test]
fn unpaired_full_records_are_counted_not_scored() {
    let gold = vec![
        record("2hop__1_2", false, "x", &[0]),
        record("2hop__5_6", true, "y", &[1, 2]),
    ];
    let preds = vec![
        pred("2hop__1_2", "", &[], false),
        pred("2hop__5_6", "y", &[1, 2], true),
    ];
    let full = evaluate(&gold, &preds).unwrap().full.unwrap();
    assert_eq!(full.group_answer_sufficiency_f1, None);
    assert_eq!((full.complete_pairs, full.unpaired_records), (0, 2));
    assert_eq!(full.sufficiency_accuracy, 1.0);
}

#[test]
fn answerable_only_data_has_no_full_metrics_and_mismatches_are_errors() {
    let gold = vec![record("2hop__1_2", true, "x", &[0])];
    let m = evaluate(&gold, &[pred("2hop__1_2", "x", &[0], true)]).unwrap();
    assert!(m.full.is_none());
    let json = serde_json::to_value(&m).unwrap();
    assert!(json.get("group_answer_sufficiency_f1").is_none());
    assert!(evaluate(&gold, &[]).is_err());
    assert!(evaluate(&gold, &[pred("other", "x", &[0], true)]).is_err());
}

#[test]
fn prediction_and_metrics_files_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let preds = vec![
        pred("2hop__1_2", "Paris", &[0, 1], true),
        pred("2hop__1_2", "", &[], false),
    ];
    let path = dir.path().join("predictions.jsonl");
    write_predictions_jsonl(&path, &preds).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let mut keys: Vec<&String> = first.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "id",
            "predicted_answer",
            "predicted_answerable",
            "predicted_support_idxs"
        ]
    );
    assert_eq!(read_predictions_jsonl(&path).unwrap(), preds);
    let gold = vec![
        record("2hop__1_2", true, "Paris", &[0, 1]),
        record("2hop__1_2", false, "Paris", &[0]),
    ];
    let m = evaluate(&gold, &preds).unwrap();
    let mpath = dir.path().join("metrics.json");
    write_metrics_json(&mpath, &m).unwrap();
    let back: MetricsReport =
        serde_json::from_str(&std::fs::read_to_string(&mpath).unwrap()).unwrap();
    assert_eq!(back, m);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&mpath).unwrap()).unwrap();
    for key in [
        "answer_f1",
        "answer_em",
        "support_f1",
        "sufficiency_accuracy",
        "group_answer_sufficiency_f1",
        "group_support_sufficiency_f1",
    ] {
        assert!(v.get(key).is_some(), "metrics.json lacks {key}");
    }
    // Only the two output files: the temp files were renamed away.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3 - 1);
}

// ---------------------------------------------------------------------------------------
// Python reference

fn python() -> PathBuf {
    let root = std::env::var("FLOWTUNE_ROOT")
        .expect("FLOWTUNE_ROOT must be set (the workspace's .cargo/config.toml sets it)");
    let py = PathBuf::from(root).join(".venv/bin/python");
    assert!(
        py.is_file(),
        "Python reference interpreter {} is missing: run scripts/setup.sh",
        py.display()
    );
    py
}

fn random_text(rng: &mut ChaCha8Rng) -> String {
    const PIECES: &[&str] = &[
        "a",
        "an",
        "the",
        "The",
        "A",
        "AN",
        "theatre",
        "ana",
        "x",
        "New",
        "York",
        "1991",
        "5.1",
        "U.S.",
        "-",
        "'",
        "\"",
        ",",
        ".",
        "(",
        ")",
        "_",
        "_a",
        "a_",
        "é",
        "ß",
        "İstanbul",
        "ΣΟΦΟΣ",
        "ǅ",
        "“",
        "”",
        "–",
        " ",
        "  ",
        "\t",
        "\n",
        "\u{a0}",
        "\u{2003}",
        "\u{1c}",
        "\u{85}",
        "Ⅻ",
        "٣",
        "ﬁ",
        "café",
        "an's",
        "a.n",
    ];
    let n = rng.random_range(0..8);
    (0..n)
        .map(|_| PIECES[rng.random_range(0..PIECES.len())])
        .collect::<Vec<_>>()
        .join(if rng.random_bool(0.5) { " " } else { "" })
}

fn official(name: &str) -> Vec<Record> {
    let path = official_data_dir().join(name);
    assert!(
        path.is_file(),
        "official MuSiQue file {} is missing (shared data folder)",
        path.display()
    );
    load_jsonl(path).unwrap()
}

/// Random predictions drawn from a record's own answers, other records' answers and noise.
fn random_predictions(gold: &[Record], rng: &mut ChaCha8Rng) -> Vec<Prediction> {
    gold.iter()
        .map(|g| {
            let answer = match rng.random_range(0..5) {
                0 => g.answer.clone(),
                1 => g.gold_answers()[rng.random_range(0..g.gold_answers().len())].to_uppercase(),
                2 => format!("the {} of {}", g.answer, random_text(rng)),
                3 => gold[rng.random_range(0..gold.len())].answer.clone(),
                _ => random_text(rng),
            };
            let support = (0..g.paragraphs.len())
                .filter(|_| rng.random_bool(0.15))
                .collect::<Vec<_>>();
            let support = if rng.random_bool(0.3) {
                g.gold_support()
            } else {
                support
            };
            Prediction {
                id: g.id.clone(),
                predicted_answer: answer,
                predicted_support_idxs: support,
                predicted_answerable: rng.random_bool(0.6),
            }
        })
        .collect()
}

/// Full pairs from the (unpaired) Full sample: each record plus its twin with answerability flipped.
fn paired_full(records: &[Record]) -> Vec<Record> {
    let mut out = Vec::new();
    for r in records {
        let mut twin = r.clone();
        twin.answerable = !r.answerable;
        out.push(r.clone());
        out.push(twin);
    }
    out
}

#[test]
fn agrees_with_the_python_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(2024);
    let ans = official("musique_ans_v1.0_dev.subset200.jsonl");
    let full = official("musique_full_v1.0_dev.sample100.jsonl");
    let mut strings: Vec<String> = Vec::new();
    for r in ans.iter().chain(&full) {
        strings.extend(r.gold_answers());
        strings.push(r.question.clone());
        strings.extend(r.question_decomposition.iter().map(|s| s.answer.clone()));
    }
    strings.extend((0..3000).map(|_| random_text(&mut rng)));
    let pairs: Vec<(String, String)> = (0..4000)
        .map(|_| {
            (
                strings[rng.random_range(0..strings.len())].clone(),
                strings[rng.random_range(0..strings.len())].clone(),
            )
        })
        .collect();
    let pairs: Vec<(String, String)> = pairs
        .into_iter()
        .chain((0..2000).map(|_| (random_text(&mut rng), random_text(&mut rng))))
        .collect();

    let dir = tempfile::tempdir().unwrap();
    let mut evaluations = Vec::new();
    let mut ours = Vec::new();
    let full_paired = paired_full(&full);
    for (k, gold) in [ans.clone(), full.clone(), full_paired]
        .into_iter()
        .enumerate()
    {
        let preds = random_predictions(&gold, &mut rng);
        let gpath = dir.path().join(format!("gold{k}.jsonl"));
        let ppath = dir.path().join(format!("pred{k}.jsonl"));
        write_jsonl(&gpath, &gold).unwrap();
        write_predictions_jsonl(&ppath, &preds).unwrap();
        evaluations.push(serde_json::json!({"gold": gpath, "predictions": ppath}));
        ours.push(evaluate(&gold, &preds).unwrap());
    }
    let job = serde_json::json!({"strings": strings, "pairs": pairs, "evaluations": evaluations});
    let input = dir.path().join("in.json");
    let output = dir.path().join("out.json");
    std::fs::write(&input, serde_json::to_vec(&job).unwrap()).unwrap();
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference/musique_metrics.py");
    let status = Command::new(python())
        .arg(&script)
        .arg(&input)
        .arg(&output)
        .status()
        .expect("running the Python reference");
    assert!(status.success(), "Python reference failed: {status}");
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&output).unwrap()).unwrap();

    for (s, want) in strings
        .iter()
        .zip(reference["normalized"].as_array().unwrap())
    {
        assert_eq!(
            normalize_answer(s),
            want.as_str().unwrap(),
            "normalising {s:?}"
        );
    }
    for (k, (p, g)) in pairs.iter().enumerate() {
        let (em, _) = answer_scores(p, std::slice::from_ref(g));
        let f1 = token_f1(p, g);
        assert!(
            (f1 - reference["f1"][k].as_f64().unwrap()).abs() < TOL,
            "F1 {p:?} vs {g:?}"
        );
        assert_eq!(
            em,
            reference["em"][k].as_f64().unwrap(),
            "EM {p:?} vs {g:?}"
        );
    }
    for (m, want) in ours
        .iter()
        .zip(reference["evaluations"].as_array().unwrap())
    {
        let close = |a: f64, key: &str| {
            assert!(
                (a - want[key].as_f64().unwrap()).abs() < TOL,
                "{key}: {a} vs {}",
                want[key]
            )
        };
        close(m.answer_f1, "answer_f1");
        close(m.answer_em, "answer_em");
        close(m.support_f1, "support_f1");
        match &m.full {
            Some(f) => {
                close(f.sufficiency_accuracy, "sufficiency_accuracy");
                assert_eq!(
                    f.complete_pairs as u64,
                    want["complete_pairs"].as_u64().unwrap()
                );
                match (
                    f.group_answer_sufficiency_f1,
                    f.group_support_sufficiency_f1,
                ) {
                    (Some(a), Some(s)) => {
                        close(a, "group_answer_sufficiency_f1");
                        close(s, "group_support_sufficiency_f1");
                    }
                    _ => assert!(want["group_answer_sufficiency_f1"].is_null()),
                }
            }
            None => assert!(want.get("sufficiency_accuracy").is_none()),
        }
    }
    // The paired evaluation really exercised the group metrics.
    assert_eq!(ours[2].full.as_ref().unwrap().complete_pairs, 100);
}
