//! The `musique` binary: its interface, and typed errors on bad data before any model loads.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use std::process::Command;

use musique::data::official_data_dir;

fn musique(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_musique"))
        .args(args)
        .output()
        .expect("running musique");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_lists_the_subcommands_and_options() {
    let (ok, stdout, _) = musique(&["--help"]);
    assert!(ok);
    for word in ["train", "eval", "predict"] {
        assert!(stdout.contains(word), "{stdout}");
    }
    let (ok, stdout, _) = musique(&["train", "--help"]);
    assert!(ok);
    for opt in [
        "--model",
        "--data",
        "--variant",
        "--out",
        "--seed",
        "--limit",
        "--resume",
        "--match-hops",
    ] {
        assert!(stdout.contains(opt), "train --help lacks {opt}");
    }
}

#[test]
fn bad_data_fails_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"id\": \"2hop__1_2\"}\n").unwrap();
    let out = dir.path().join("out");
    let (ok, _, stderr) = musique(&[
        "eval",
        "--data",
        bad.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("bad.jsonl:1: missing field `question`"),
        "{stderr}"
    );

    let question_only = official_data_dir().join("musique_ans_v1.0_dev.no_paragraphs.jsonl");
    assert!(
        question_only.is_file(),
        "official file {} is missing (shared data folder)",
        question_only.display()
    );
    let (ok, _, stderr) = musique(&[
        "eval",
        "--data",
        question_only.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(stderr.contains("has no `paragraphs`"), "{stderr}");
    assert!(!out.join("metrics.json").exists());
}

/// `train --heldout 2` writes held-out metrics before and after training; `eval --checkpoint`
/// starts from a `train` run's adapters (the `checkpoints` folder resolves
/// to its `latest`), and a missing checkpoint is an error naming the folder, with no outputs.
#[cfg(feature = "lm")]
#[test]
fn eval_starts_from_a_train_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let run_s = run.to_str().unwrap();
    let (ok, _, stderr) = musique(&[
        "train",
        "--limit",
        "1",
        "--minibatch",
        "1",
        "--checkpoint-every",
        "1",
        "--max-new-tokens",
        "4,4,4",
        "--device",
        "cpu",
        "--heldout",
        "2",
        "--out",
        run_s,
    ]);
    assert!(ok, "{stderr}");
    // The held-out synthetic questions, scored before and after training.
    let heldout: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("heldout.json")).unwrap()).unwrap();
    for when in ["untrained", "trained"] {
        assert_eq!(heldout[when]["records"], 2, "{heldout}");
        let f1 = heldout[when]["support_f1"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&f1), "{heldout}");
    }
    let checkpoints = run.join("checkpoints");
    let latest = std::fs::read_to_string(checkpoints.join("latest")).unwrap();
    let out = dir.path().join("eval");
    let (ok, _, stderr) = musique(&[
        "eval",
        "--limit",
        "1",
        "--max-new-tokens",
        "4,4,4",
        "--device",
        "cpu",
        "--checkpoint",
        checkpoints.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let expected = checkpoints.join(latest.trim()).join("learner");
    assert!(
        stderr.contains(&format!("adapters from {}", expected.display())),
        "{stderr}"
    );
    assert!(out.join("metrics.json").is_file());
    // The timing summary (what scripts/bench-musique.sh divides by the record count).
    let summary: musique::app::PredictSummary =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary.records, 1);
    assert!(summary.wall_seconds > 0.0, "{summary:?}");
    let again: musique::app::PredictSummary =
        serde_json::from_str(&serde_json::to_string(&summary).unwrap()).unwrap();
    assert_eq!(again, summary);

    let (ok, _, stderr) = musique(&[
        "eval",
        "--max-new-tokens",
        "4,4",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("--max-new-tokens needs 3 values"),
        "{stderr}"
    );

    let missing = dir.path().join("no-such-run");
    let out2 = dir.path().join("eval2");
    let (ok, _, stderr) = musique(&[
        "eval",
        "--limit",
        "1",
        "--device",
        "cpu",
        "--checkpoint",
        missing.to_str().unwrap(),
        "--out",
        out2.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(stderr.contains("no-such-run"), "{stderr}");
    assert!(!out2.join("metrics.json").exists());
}

/// `score` recomputes the official metrics of a prediction file, here hand-made against the
/// first two real dev records: a perfect first prediction and an empty second one give
/// answer F1 0.5, EM 0.5, support F1 0.5. A prediction out of order names the file and line.
#[test]
fn score_recomputes_metrics_of_a_prediction_file() {
    let data = official_data_dir().join("musique_ans_v1.0_dev.subset200.jsonl");
    assert!(
        data.is_file(),
        "official file {} is missing (shared data folder)",
        data.display()
    );
    let gold = musique::data::load_jsonl(&data).unwrap();
    let perfect = musique::metrics::Prediction {
        id: gold[0].id.clone(),
        predicted_answer: gold[0].gold_answers()[0].clone(),
        predicted_support_idxs: gold[0].gold_support(),
        predicted_answerable: true,
    };
    let empty = musique::metrics::Prediction {
        id: gold[1].id.clone(),
        predicted_answer: String::new(),
        predicted_support_idxs: vec![],
        predicted_answerable: true,
    };
    let dir = tempfile::tempdir().unwrap();
    let preds = dir.path().join("p.jsonl");
    musique::metrics::write_predictions_jsonl(&preds, &[perfect.clone(), empty.clone()]).unwrap();
    let metrics = dir.path().join("m.json");
    let (ok, stdout, stderr) = musique(&[
        "score",
        "--data",
        data.to_str().unwrap(),
        "--predictions",
        preds.to_str().unwrap(),
        "--limit",
        "2",
        "--out",
        metrics.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let printed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap()).unwrap();
    assert_eq!(printed, written);
    for key in ["answer_f1", "answer_em", "support_f1"] {
        let v = printed[key].as_f64().unwrap();
        assert!((v - 0.5).abs() < 1e-12, "{key} = {v}");
    }
    musique::metrics::write_predictions_jsonl(&preds, &[empty, perfect]).unwrap();
    let (ok, _, stderr) = musique(&[
        "score",
        "--data",
        data.to_str().unwrap(),
        "--predictions",
        preds.to_str().unwrap(),
        "--limit",
        "2",
    ]);
    assert!(!ok);
    assert!(stderr.contains("p.jsonl:1: id"), "{stderr}");
}
