//! The `flowtune-lm` binary's contract: `logits` (safetensors `ids.{i}`,
//! `logits.{i}` in input order), `generate` and `score` (JSONL), on the
//! SmolLM2 GGUF; bad input gives a non-zero exit naming the file and line.
//! The values are checked against the library (itself checked against
//! transformers in `parity_gguf`): ids exactly, logits to 1e-4.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod model_support;

use std::process::Command;

use flowtune_lm::loader::{load, LoadOptions};
use flowtune_lm::tokenizer::ChatMessage;
use model_support::*;
use tch::{Device, Kind, Tensor};

/// The binary: `CARGO_BIN_EXE_flowtune-lm` when cargo provides it, else next to
/// this test executable's `deps/` folder (cargo builds the crate's binaries for
/// integration tests).
fn bin() -> Command {
    let path = option_env!("CARGO_BIN_EXE_flowtune-lm")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().unwrap();
            exe.parent().unwrap().parent().unwrap().join("flowtune-lm")
        });
    assert!(
        path.exists(),
        "flowtune-lm binary not found at {}",
        path.display()
    );
    Command::new(path)
}

#[test]
fn cli_logits_generate_score() {
    let model = test_model();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let msgs = [
        vec![ChatMessage::new("user", "Hello there")],
        vec![
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Is water wet? Answer Yes or No."),
        ],
    ];
    let lines: Vec<String> = msgs
        .iter()
        .enumerate()
        .map(|(i, m)| {
            serde_json::json!({"id": format!("q{i}"), "messages": m, "completion": "Yes.", "labels": ["Yes", "No"]}).to_string()
        })
        .collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();

    // logits
    let out = dir.path().join("out.safetensors");
    let st = bin()
        .args([
            "logits",
            "--model",
            model.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let got = read_golden(&out);
    let loaded = load(
        &model,
        &LoadOptions {
            device: Device::Cpu,
            dtype: Kind::Float,
            ..Default::default()
        },
    )
    .unwrap();
    let m = flowtune_lm::model::Model::new(&loaded.config, &loaded.weights).unwrap();
    for (i, msg) in msgs.iter().enumerate() {
        let ids: Vec<i64> = loaded
            .tokenizer
            .encode_chat(msg, true)
            .unwrap()
            .iter()
            .map(|&x| x as i64)
            .collect();
        assert_eq!(
            Vec::<i64>::try_from(&got[&format!("ids.{i}")]).unwrap(),
            ids
        );
        let t = Tensor::from_slice(&ids).view([1, -1]);
        let full = tch::no_grad(|| m.forward(&t, &t.ones_like(), None)).unwrap();
        let last = full.get(0).get(ids.len() as i64 - 1);
        let lg = &got[&format!("logits.{i}")];
        assert_eq!(lg.kind(), Kind::Float);
        assert_eq!(lg.size(), vec![loaded.config.vocab_size as i64]);
        // Different attention kernels (causal flag vs explicit mask): float noise only.
        let d = max_abs_diff(lg, &last);
        assert!(
            d < 1e-4,
            "line {i}: CLI logits differ from the library's full forward by {d}"
        );
    }

    // generate
    let out = dir.path().join("gen.jsonl");
    let st = bin()
        .args([
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--max-new-tokens",
            "6",
            "--num-beams",
            "4",
            "--num-beam-groups",
            "2",
            "--diversity-penalty",
            "1.0",
            "--num-return-sequences",
            "2",
        ])
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let text = std::fs::read_to_string(&out).unwrap();
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r["id"], format!("q{i}"));
        let outs = r["outputs"].as_array().unwrap();
        assert_eq!(outs.len(), 2);
        for o in outs {
            let ids = o["ids"].as_array().unwrap();
            assert!(!ids.is_empty() && ids.len() <= 6);
            let ids: Vec<u32> = ids.iter().map(|x| x.as_u64().unwrap() as u32).collect();
            assert_eq!(
                o["text"].as_str().unwrap(),
                loaded.tokenizer.decode(&ids, true).unwrap()
            );
        }
    }

    // score: completion and labels lines
    let sin = dir.path().join("score_in.jsonl");
    let l0 = serde_json::json!({"id": 0, "messages": msgs[1], "completion": "Yes."}).to_string();
    let l1 = serde_json::json!({"id": 1, "messages": msgs[1], "labels": ["Yes", "No"]}).to_string();
    std::fs::write(&sin, format!("{l0}\n{l1}\n")).unwrap();
    let out = dir.path().join("score.jsonl");
    let st = bin()
        .args([
            "score",
            "--model",
            model.to_str().unwrap(),
            "--input",
            sin.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let lp = rows[0]["logprob"].as_f64().unwrap();
    let toks: f64 = rows[0]["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .sum();
    assert!(lp < 0.0 && (lp - toks).abs() < 1e-9);
    let labs: Vec<f64> = rows[1]["label_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(labs.len(), 2);
    assert!((labs.iter().map(|x| x.exp()).sum::<f64>() - 1.0).abs() < 1e-6);

    // bad input: malformed line 2 is named
    std::fs::write(&sin, format!("{l0}\n{{not json\n")).unwrap();
    let st = bin()
        .args([
            "score",
            "--model",
            model.to_str().unwrap(),
            "--input",
            sin.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!st.status.success());
    let err = String::from_utf8_lossy(&st.stderr);
    assert!(err.contains("score_in.jsonl line 2"), "{err}");
}
