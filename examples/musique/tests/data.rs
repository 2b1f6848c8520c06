//! The loader on every official file, its typed errors on broken input, and subsampling.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use std::path::PathBuf;

use musique::data::{
    hop_distribution, hop_quotas, hops_from_id, load_jsonl, load_questions_jsonl,
    official_data_dir, parse_records, sample_matching_hops, to_jsonl, Record,
};
use musique::Error;
use proptest::prelude::*;

fn official(name: &str) -> PathBuf {
    let path = official_data_dir().join(name);
    assert!(
        path.is_file(),
        "official MuSiQue file {} is missing: these tests need the shared data folder \
         ($FLOWTUNE_ROOT/../shared/data/musique, or set MUSIQUE_DATA)",
        path.display()
    );
    path
}

const WITH_PARAGRAPHS: [&str; 4] = [
    "musique_ans_v1.0_dev.subset200.jsonl",
    "musique_ans_v1.0_train.sample100.jsonl",
    "musique_full_v1.0_dev.sample100.jsonl",
    "musique_full_v1.0_train.first100.jsonl",
];
const QUESTION_ONLY: &str = "musique_ans_v1.0_dev.no_paragraphs.jsonl";

#[test]
fn every_official_file_loads_without_errors_and_round_trips() {
    for name in WITH_PARAGRAPHS {
        let path = official(name);
        let text = std::fs::read_to_string(&path).unwrap();
        let records = load_jsonl(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            records.len(),
            text.lines().filter(|l| !l.trim().is_empty()).count(),
            "{name}"
        );
        assert!(
            records.iter().all(|r| r.paragraphs.len() >= 2),
            "{name}: paragraphs present"
        );
        // Field-for-field: every line re-serialises to the same JSON value it was read from.
        for (line, record) in text.lines().zip(&records) {
            let original: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(
                serde_json::to_value(record).unwrap(),
                original,
                "{name}: {}",
                record.id
            );
        }
        let again = parse_records(&to_jsonl(&records).unwrap(), "roundtrip").unwrap();
        assert_eq!(again, records, "{name}");
    }
}

#[test]
fn question_only_file_loads_with_its_loader_and_is_rejected_by_the_strict_one() {
    let path = official(QUESTION_ONLY);
    let records = load_questions_jsonl(&path).unwrap();
    assert_eq!(records.len(), 2417);
    assert!(records
        .iter()
        .all(|r| r.paragraphs.is_empty() && r.answerable));
    let hops = hop_distribution(&records);
    assert_eq!(hops.values().sum::<usize>(), 2417);
    assert_eq!(hops.keys().copied().collect::<Vec<_>>(), vec![2, 3, 4]);
    match load_jsonl(&path) {
        Err(Error::QuestionOnlyRecord { line, id, .. }) => {
            assert_eq!(line, 1);
            assert_eq!(id, records[0].id);
        }
        other => panic!("expected QuestionOnlyRecord, got {other:?}"),
    }
}

#[test]
fn full_files_have_unanswerable_records_with_null_support() {
    let records = load_jsonl(official("musique_full_v1.0_train.first100.jsonl")).unwrap();
    let unanswerable: Vec<&Record> = records.iter().filter(|r| !r.answerable).collect();
    assert!(!unanswerable.is_empty());
    assert!(unanswerable.iter().all(|r| r
        .question_decomposition
        .iter()
        .any(|s| s.paragraph_support_idx.is_none())));
}

#[test]
fn hop_counts_come_from_the_id_prefix() {
    assert_eq!(hops_from_id("2hop__460946_294723"), Some(2));
    assert_eq!(hops_from_id("3hop1__241001_568433_47686"), Some(3));
    assert_eq!(hops_from_id("4hop3__1_2_3_4"), Some(4));
    assert_eq!(hops_from_id("hop__1_2"), None);
    assert_eq!(hops_from_id("2hop_1_2"), None);
    assert_eq!(hops_from_id("2hopx__1"), None);
    assert_eq!(hops_from_id("2hop__"), None);
}

fn good_line() -> serde_json::Value {
    serde_json::json!({
        "id": "2hop__1_2",
        "paragraphs": [
            {"idx": 0, "title": "A", "paragraph_text": "A was made by B.", "is_supporting": true},
            {"idx": 1, "title": "B", "paragraph_text": "B was founded by C.", "is_supporting": true},
            {"idx": 2, "title": "D", "paragraph_text": "Unrelated.", "is_supporting": false}
        ],
        "question": "Who founded the maker of A?",
        "question_decomposition": [
            {"id": 1, "question": "A >> made by", "answer": "B", "paragraph_support_idx": 0},
            {"id": 2, "question": "#1 >> founded by", "answer": "C", "paragraph_support_idx": 1}
        ],
        "answer": "C", "answer_aliases": ["Mr C"], "answerable": true
    })
}

/// Parse `good_line` (line 1) followed by the modified line (line 2).
fn parse_with(edit: impl FnOnce(&mut serde_json::Value)) -> musique::Result<Vec<Record>> {
    let mut bad = good_line();
    bad["id"] = serde_json::json!("2hop__3_4");
    edit(&mut bad);
    let text = format!("{}\n{}\n", good_line(), bad);
    parse_records(&text, "t.jsonl")
}

#[test]
fn good_record_parses() {
    let records = parse_with(|_| {}).unwrap();
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].gold_support(), vec![0, 1]);
    assert_eq!(
        records[0].gold_answers(),
        vec!["C".to_string(), "Mr C".to_string()]
    );
}

#[test]
fn malformed_json_names_the_line() {
    let text = format!("{}\n{{\"id\": oops}}\n", good_line());
    match parse_records(&text, "t.jsonl") {
        Err(e @ Error::MalformedJson { line: 2, .. }) => {
            assert!(e.to_string().starts_with("t.jsonl:2:"))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn missing_fields_are_named() {
    match parse_with(|v| {
        v.as_object_mut().unwrap().remove("answer_aliases");
    }) {
        Err(Error::MissingField { line: 2, field, .. }) => assert_eq!(field, "answer_aliases"),
        other => panic!("{other:?}"),
    }
    match parse_with(|v| {
        v["paragraphs"][1].as_object_mut().unwrap().remove("title");
    }) {
        Err(Error::MissingField { line: 2, field, .. }) => assert_eq!(field, "paragraphs[1].title"),
        other => panic!("{other:?}"),
    }
    match parse_with(|v| {
        v["question_decomposition"][0]
            .as_object_mut()
            .unwrap()
            .remove("paragraph_support_idx");
    }) {
        Err(Error::MissingField { field, .. }) => {
            assert_eq!(field, "question_decomposition[0].paragraph_support_idx")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn wrong_types_are_named() {
    match parse_with(|v| v["paragraphs"][2]["is_supporting"] = serde_json::json!("no")) {
        Err(Error::InvalidField { line: 2, field, .. }) => {
            assert_eq!(field, "paragraphs[2].is_supporting")
        }
        other => panic!("{other:?}"),
    }
    match parse_with(|v| v["answerable"] = serde_json::json!(1)) {
        Err(Error::InvalidField { field, .. }) => assert_eq!(field, "answerable"),
        other => panic!("{other:?}"),
    }
    match parse_with(|v| {
        v["question_decomposition"][1]["paragraph_support_idx"] = serde_json::json!(-1)
    }) {
        Err(Error::InvalidField { field, .. }) => {
            assert_eq!(field, "question_decomposition[1].paragraph_support_idx")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn semantic_errors_are_typed() {
    match parse_with(|v| {
        v["question_decomposition"][1]["paragraph_support_idx"] = serde_json::json!(7)
    }) {
        Err(Error::SupportOutOfRange {
            line: 2,
            step: 1,
            idx: 7,
            paragraphs: 3,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    match parse_with(|v| v["paragraphs"][2]["idx"] = serde_json::json!(5)) {
        Err(Error::ParagraphIndexMismatch {
            line: 2,
            position: 2,
            idx: 5,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    match parse_with(|v| v["paragraphs"][2]["is_supporting"] = serde_json::json!(true)) {
        Err(Error::SupportMismatch {
            flagged,
            decomposition,
            ..
        }) => {
            assert_eq!(flagged, vec![0, 1, 2]);
            assert_eq!(decomposition, vec![0, 1]);
        }
        other => panic!("{other:?}"),
    }
    match parse_with(|v| {
        v["question_decomposition"][1]["paragraph_support_idx"] = serde_json::Value::Null
    }) {
        Err(Error::MissingSupport {
            line: 2, step: 1, ..
        }) => {}
        other => panic!("{other:?}"),
    }
    match parse_with(|v| v["id"] = serde_json::json!("3hop1__1_2")) {
        Err(Error::BadId { line: 2, .. }) => {}
        other => panic!("{other:?}"),
    }
    match parse_with(|v| v["id"] = serde_json::json!("two_hop")) {
        Err(Error::BadId { line: 2, .. }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn duplicate_ids_are_rejected_except_full_twins() {
    match parse_with(|v| v["id"] = serde_json::json!("2hop__1_2")) {
        Err(Error::DuplicateId {
            line: 2,
            first_line: 1,
            id,
            ..
        }) => assert_eq!(id, "2hop__1_2"),
        other => panic!("{other:?}"),
    }
    // The unanswerable twin of a Full pair shares the id: allowed once.
    let twin = |v: &mut serde_json::Value| {
        v["id"] = serde_json::json!("2hop__1_2");
        v["answerable"] = serde_json::json!(false);
        v["paragraphs"][1]["is_supporting"] = serde_json::json!(false);
        v["question_decomposition"][1]["paragraph_support_idx"] = serde_json::Value::Null;
    };
    let records = parse_with(twin).unwrap();
    assert_eq!(records[1].gold_support(), vec![0]);
    let mut third = good_line();
    twin(&mut third);
    let text = format!("{}\n{}\n{}\n", good_line(), third, third);
    assert!(matches!(
        parse_records(&text, "t"),
        Err(Error::DuplicateId { line: 3, .. })
    ));
}

#[test]
fn missing_file_is_an_io_error_naming_it() {
    let err = load_jsonl("/nonexistent/x.jsonl").unwrap_err();
    assert!(matches!(err, Error::Io { .. }));
    assert!(err.to_string().contains("/nonexistent/x.jsonl"));
}

#[test]
fn subsampling_matches_the_target_hop_distribution() {
    let target = load_questions_jsonl(official(QUESTION_ONLY)).unwrap();
    let pool = load_jsonl(official("musique_ans_v1.0_train.sample100.jsonl")).unwrap();
    // Pool hops: 68 two-hop, 27 three-hop, 5 four-hop; target dev: 1252/760/405 of 2417.
    let sample = sample_matching_hops(&pool, &target, 40, 7).unwrap();
    assert_eq!(sample.len(), 40);
    let got = hop_distribution(&sample);
    let t = hop_distribution(&target);
    let total: usize = t.values().sum();
    // Four-hop is capped by the pool (5 < 40*405/2417 = 6.7); the shortfall goes elsewhere.
    assert_eq!(got[&4], 5);
    for h in [2usize, 3] {
        let ideal = 40.0 * t[&h] as f64 / total as f64;
        assert!(
            (got[&h] as f64 - ideal).abs() <= 2.0,
            "hop {h}: {} vs {ideal}",
            got[&h]
        );
    }
    // Seeded and deterministic; no record drawn twice.
    assert_eq!(sample, sample_matching_hops(&pool, &target, 40, 7).unwrap());
    assert_ne!(sample, sample_matching_hops(&pool, &target, 40, 8).unwrap());
    let mut ids: Vec<&str> = sample.iter().map(|r| r.id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 40);
    assert!(matches!(
        sample_matching_hops(&pool, &target, 101, 0),
        Err(Error::SampleTooLarge { .. })
    ));
}

proptest! {
    #[test]
    fn quotas_sum_to_n_respect_the_pool_and_track_the_target(
        target in proptest::collection::btree_map(2usize..5, 1usize..500, 1..4),
        pool in proptest::collection::btree_map(2usize..5, 0usize..60, 1..4),
        frac in 0.0f64..1.0,
    ) {
        let available: usize = pool.values().sum();
        let n = (available as f64 * frac) as usize;
        let quotas = hop_quotas(&target, &pool, n).unwrap();
        prop_assert_eq!(quotas.values().sum::<usize>(), n);
        for (h, q) in &quotas {
            prop_assert!(*q <= pool[h]);
        }
        // Where no hop is capped by the pool, each quota is within 1 of the exact share.
        let tsum: usize = target.iter().filter(|(h, _)| pool.contains_key(h)).map(|(_, c)| c).sum();
        let uncapped = tsum > 0 && target.iter().all(|(h, c)| {
            pool.get(h).is_some_and(|a| (n as f64 * *c as f64 / tsum as f64).ceil() as usize <= *a)
        });
        if uncapped {
            for (h, c) in &target {
                if pool.contains_key(h) {
                    let exact = n as f64 * *c as f64 / tsum as f64;
                    prop_assert!((quotas[h] as f64 - exact).abs() < 1.0, "hop {} {} vs {}", h, quotas[h], exact);
                }
            }
        }
    }
}
