//! LoRA through the engine on the real SmolLM2 GGUF (f32): requests name their
//! adapter; rows of one batch may use different adapters (or none); prefix
//! reuse never mixes adapters; the CLI loads a PEFT folder with `--adapter`.
//!
//! Reference: `Model::forward` with the bank's delta for the whole sequence
//! (the LoRA crate checks the delta itself against PEFT); tolerance 1e-4 on
//! summed log-probs.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod model_support;

use flowtune_lm::engine::*;
use flowtune_lm::loader::{load, LoadOptions};
use flowtune_lm::tokenizer::ChatMessage;
use flowtune_lora::{AdapterSelection, LoraConfig, Module, Site};
use model_support::*;
use tch::{Device, Kind, Tensor};

fn engine_with_adapter() -> Engine {
    let loaded = load(
        &test_model(),
        &LoadOptions {
            device: Device::Cpu,
            dtype: Kind::Float,
            ..Default::default()
        },
    )
    .unwrap();
    let mut e = Engine::new(
        loaded,
        EngineConfig {
            min_shared_prefix: 8,
            ..Default::default()
        },
    )
    .unwrap();
    let mut bank = e.new_adapter_bank();
    let all = [
        Module::QProj,
        Module::KProj,
        Module::VProj,
        Module::OProj,
        Module::GateProj,
        Module::UpProj,
        Module::DownProj,
    ];
    bank.add("node", &LoraConfig::rslora(8, 16.0, &all), 1)
        .unwrap();
    // PEFT initialises B to zero; make the adapter do something.
    bank.modify("node", |a| {
        let sites: Vec<Site> = a.sites().copied().collect();
        tch::no_grad(|| {
            for s in sites {
                let w = a.weights_mut(&s).unwrap();
                w.b.copy_(&(Tensor::randn(w.b.size(), (Kind::Float, Device::Cpu)) * 0.05));
            }
        })
    })
    .unwrap();
    e.set_adapter_bank(Some(bank));
    e
}

fn reference_logprob(e: &Engine, prompt: &[u32], completion: &[u32], adapter: Option<&str>) -> f64 {
    let all: Vec<i64> = prompt.iter().chain(completion).map(|&x| x as i64).collect();
    let ids = Tensor::from_slice(&all).view([1, -1]);
    let bank = e.adapter_bank().unwrap();
    let sel = match adapter {
        Some(n) => AdapterSelection::All(bank.id(n).unwrap()),
        None => AdapterSelection::None,
    };
    let selected = bank.select(&sel);
    let logits =
        tch::no_grad(|| e.model().forward(&ids, &ids.ones_like(), Some(&selected))).unwrap();
    let logp = logits.log_softmax(-1, Kind::Float);
    completion
        .iter()
        .enumerate()
        .map(|(j, &t)| logp.double_value(&[0, (prompt.len() + j - 1) as i64, t as i64]))
        .sum()
}

#[test]
fn mixed_adapter_batch_scores_match_per_adapter_full_forward() {
    let e = engine_with_adapter();
    let prompt = e
        .tokenizer()
        .encode_chat(
            &[
                ChatMessage::new("system", "Answer with one word."),
                ChatMessage::new("user", "What colour is the sky on a clear day?"),
            ],
            true,
        )
        .unwrap();
    let completion = e.tokenizer().encode("Blue.").unwrap();
    let adapters = [Some("node"), None, Some("node"), None];
    let reqs: Vec<ScoreRequest> = adapters
        .iter()
        .map(|a| ScoreRequest {
            prompt: prompt.clone(),
            completion: completion.clone(),
            adapter: a.map(String::from),
        })
        .collect();
    let out = e.score(&reqs).unwrap();
    let with = reference_logprob(&e, &prompt, &completion, Some("node"));
    let without = reference_logprob(&e, &prompt, &completion, None);
    assert!(
        (with - without).abs() > 1e-2,
        "the adapter changes nothing ({with} vs {without})"
    );
    for (a, o) in adapters.iter().zip(&out) {
        let want = if a.is_some() { with } else { without };
        assert!(
            (o.logprob - want).abs() < 1e-4,
            "adapter {a:?}: {} vs full forward {want}",
            o.logprob
        );
    }
    // Same requests one at a time (prefix sharing within a single adapter) agree.
    let single = e.score(&reqs[..1]).unwrap();
    assert!((single[0].logprob - with).abs() < 1e-4);
    // Unknown adapter: typed error.
    let bad = ScoreRequest {
        prompt,
        completion,
        adapter: Some("nope".into()),
    };
    assert!(e.score(&[bad]).is_err());
}

#[test]
fn mixed_adapter_generation_equals_unbatched_and_cli_loads_peft() {
    let e = engine_with_adapter();
    let prompt = e
        .tokenizer()
        .encode_chat(&[ChatMessage::new("user", "Name a fruit.")], true)
        .unwrap();
    let req = |a: Option<&str>| GenerateRequest {
        prompt: prompt.clone(),
        adapter: a.map(String::from),
        params: GenerationParams {
            max_new_tokens: 8,
            ..Default::default()
        },
    };
    let reqs = [req(Some("node")), req(None)];
    let both = e.generate(&reqs).unwrap();
    for (r, b) in reqs.iter().zip(&both) {
        assert_eq!(
            e.generate(std::slice::from_ref(r)).unwrap()[0].sequences[0].ids,
            b.sequences[0].ids
        );
    }
    // CLI --adapter: logits of a PEFT folder saved by the bank equal the engine's.
    let dir = tempfile::tempdir().unwrap();
    let peft = dir.path().join("peft");
    e.adapter_bank().unwrap().save_peft("node", &peft).unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        serde_json::json!({"id": 0, "messages": [{"role": "user", "content": "Name a fruit."}]})
            .to_string()
            + "\n",
    )
    .unwrap();
    let out = dir.path().join("out.safetensors");
    let exe = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("flowtune-lm");
    let exe = option_env!("CARGO_BIN_EXE_flowtune-lm")
        .map(std::path::PathBuf::from)
        .unwrap_or(exe);
    let exe_path = exe.clone();
    let st = std::process::Command::new(exe)
        .args([
            "logits",
            "--model",
            test_model().to_str().unwrap(),
            "--adapter",
            peft.to_str().unwrap(),
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
    let want = e.last_logits(&prompt, Some("node")).unwrap();
    let d = max_abs_diff(&got["logits.0"], &want);
    assert!(d < 1e-4, "CLI --adapter logits differ by {d}");

    // CLI --adapters NAME=DIR: each input line picks its adapter by name (or none).
    std::fs::write(
        &input,
        serde_json::json!({"id": 0, "messages": [{"role": "user", "content": "Name a fruit."}], "adapter": "fruit"})
            .to_string()
            + "\n"
            + &serde_json::json!({"id": 1, "messages": [{"role": "user", "content": "Name a fruit."}]}).to_string()
            + "\n",
    )
    .unwrap();
    let named = format!("fruit={}", peft.display());
    let st = std::process::Command::new(&exe_path)
        .args([
            "logits",
            "--model",
            test_model().to_str().unwrap(),
            "--adapters",
            named.as_str(),
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
    let d = max_abs_diff(&got["logits.0"], &want);
    assert!(d < 1e-4, "CLI --adapters (named) logits differ by {d}");
    let base = e.last_logits(&prompt, None).unwrap();
    let d = max_abs_diff(&got["logits.1"], &base);
    assert!(
        d < 1e-4,
        "CLI line without adapter differs from the base by {d}"
    );
    assert!(
        max_abs_diff(&base, &want) > 1e-2,
        "the adapter does not change the logits"
    );
}
