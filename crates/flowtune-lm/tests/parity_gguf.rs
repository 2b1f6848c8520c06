//! SmolLM2-135M-Instruct (Q4_1 GGUF) against HF transformers loading the same
//! GGUF (dequantised, float32), on 6 varied chat prompts.
//!
//! Golden values: `tests/reference/lm_model_ref.py gguf` (one invocation for
//! all prompts). Checks: prompt ids identical (chat template + tokenizer);
//! last-position logits max |Δ| ≤ 1e-3 (f32); greedy 32-token continuations
//! identical up to the first near-tie (top-2 logit gap < 1e-2 in the reference).
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod model_support;

use flowtune_lm::engine::{Engine, EngineConfig, GenerateRequest, GenerationParams};
use flowtune_lm::loader::{load, LoadOptions};
use flowtune_lm::model::LogitsAt;
use flowtune_lm::tokenizer::ChatMessage;
use model_support::*;
use tch::{Device, Kind, Tensor};

const LOGIT_TOL: f64 = 1e-3;
const NEAR_TIE: f32 = 1e-2;

fn prompts() -> Vec<Vec<ChatMessage>> {
    let doc: String = (0..20)
        .map(|i| format!("Paragraph {i}: the river Lys flows through Ghent, and in year {} the mill produced {} sacks of flour. ", 1800 + i, i * 37 % 101))
        .collect();
    vec![
        vec![ChatMessage::new("user", "Hi!")],
        vec![ChatMessage::new("user", format!("Summarise this document in one sentence.\n\n{doc}"))],
        vec![ChatMessage::new("user", "Ünïcödé: 東京は日本の首都です。Привет, как дела? 🙂 Ça va très bien — naïve café.")],
        vec![
            ChatMessage::new("system", "You are a helpful assistant that answers multi-hop questions using the given paragraphs. Answer concisely."),
            ChatMessage::new("user", "Paragraph: The Eiffel Tower is located in Paris, the capital of France.\nParagraph: Gustave Eiffel's company designed and built the tower.\n\nQuestion: Who built the landmark in the capital of France?\nIs the paragraph relevant? Answer Yes or No."),
        ],
        vec![
            ChatMessage::new("user", "What is 17 times 3?"),
            ChatMessage::new("assistant", "17 times 3 is 51."),
            ChatMessage::new("user", "And divided by 3 again?"),
        ],
        vec![ChatMessage::new("user", "Write a Python function that returns the n-th Fibonacci number.")],
    ]
}

#[test]
fn gguf_parity_with_transformers() {
    let model_path = test_model();
    let dir = tempfile::tempdir().unwrap();
    let prompts = prompts();
    let pj = dir.path().join("prompts.json");
    std::fs::write(&pj, serde_json::to_string(&prompts).unwrap()).unwrap();
    run_reference(&[
        "gguf",
        "--out",
        dir.path().to_str().unwrap(),
        "--model",
        model_path.to_str().unwrap(),
        "--prompts",
        pj.to_str().unwrap(),
    ]);
    let golden = read_golden(&dir.path().join("gguf_golden.safetensors"));
    let loaded = load(
        &model_path,
        &LoadOptions {
            device: Device::Cpu,
            dtype: Kind::Float,
            ..Default::default()
        },
    )
    .unwrap();
    let engine = Engine::new(loaded, EngineConfig::default()).unwrap();
    let mut worst = 0f64;
    for (i, p) in prompts.iter().enumerate() {
        let ids = engine.tokenizer().encode_chat(p, true).unwrap();
        let want_ids: Vec<i64> = Vec::try_from(&golden[&format!("ids.{i}")]).unwrap();
        let ids_i64: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
        assert_eq!(
            ids_i64, want_ids,
            "prompt {i}: token ids differ from transformers"
        );
        let mut cache = engine.model().new_cache(1, ids.len()).unwrap();
        let logits = tch::no_grad(|| {
            engine.model().forward_cached(
                &Tensor::from_slice(&ids_i64).view([1, -1]),
                None,
                &mut cache,
                &LogitsAt::Last,
                None,
            )
        })
        .unwrap();
        let d = max_abs_diff(&logits.squeeze_dim(0), &golden[&format!("logits.{i}")]);
        println!("prompt {i} ({} tokens): max |Δlogit| = {d:.3e}", ids.len());
        worst = worst.max(d);
        assert!(d <= LOGIT_TOL, "prompt {i}: max |Δlogit| {d} > {LOGIT_TOL}");

        // Greedy continuation, no EOS stop on our side beyond what the reference saw.
        let want: Vec<i64> = Vec::try_from(&golden[&format!("greedy.{i}")]).unwrap();
        let gaps: Vec<f32> = Vec::try_from(&golden[&format!("gap.{i}")]).unwrap();
        let out = engine
            .generate(&[GenerateRequest {
                adapter: None,
                prompt: ids.clone(),
                params: GenerationParams {
                    max_new_tokens: want.len(),
                    ..Default::default()
                },
            }])
            .unwrap();
        let got: Vec<i64> = out[0].sequences[0].ids.iter().map(|&x| x as i64).collect();
        let tie = gaps
            .iter()
            .position(|&g| g < NEAR_TIE)
            .unwrap_or(gaps.len());
        let n = got.len().min(tie);
        assert_eq!(
            &got[..n],
            &want[..n],
            "prompt {i}: greedy continuation differs before the first near-tie ({tie})"
        );
        // If we stopped early it must be at an EOS that the reference also produced.
        if got.len() < want.len() && got.len() <= tie {
            assert!(engine
                .eos_token_ids()
                .contains(&(want[got.len() - 1] as u32)));
        }
        println!(
            "prompt {i}: greedy identical on {n} tokens (first near-tie at {tie}): {:?}",
            out[0].sequences[0].text
        );
    }
    println!("worst max |Δlogit| = {worst:.3e}");
}
