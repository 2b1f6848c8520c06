//! Helpers shared by flowtune-lm's running-side tests: the Python reference
//! (`tests/reference/lm_model_ref.py` in the workspace venv), the test model,
//! golden files. Missing prerequisites fail loudly, never skip.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use flowtune_lm::kv::KvCache;
use flowtune_lm::model::{LogitsAt, Model};
use tch::{Kind, Tensor};

/// The workspace root.
pub fn root() -> PathBuf {
    let r = std::env::var_os("FLOWTUNE_ROOT")
        .map(PathBuf::from)
        .or_else(|| option_env!("FLOWTUNE_ROOT").map(PathBuf::from))
        .expect("FLOWTUNE_ROOT is not set: run the tests through cargo in the workspace (.cargo/config.toml sets it)");
    r.canonicalize().unwrap_or(r)
}

/// The venv's Python; panics with a clear message when missing.
pub fn python() -> PathBuf {
    let p = root().join(".venv/bin/python");
    assert!(
        p.exists(),
        "Python reference interpreter missing at {} (run scripts/setup.sh)",
        p.display()
    );
    p
}

/// Run the reference script with `args`; panics with its stderr on failure.
pub fn run_reference(args: &[&str]) {
    let script = root().join("tests/reference/lm_model_ref.py");
    let out = Command::new(python())
        .arg(&script)
        .args(args)
        .output()
        .expect("cannot start the Python reference");
    assert!(
        out.status.success(),
        "reference script {} {:?} failed:\n{}",
        script.display(),
        args,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The SmolLM2 GGUF test model; panics with a clear message when missing.
pub fn test_model() -> PathBuf {
    flowtune_lm::locate_test_model().unwrap_or_else(|e| panic!("{e}"))
}

/// All tensors of a safetensors file by name.
pub fn read_golden(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("cannot read golden file {}: {e}", path.display()))
        .into_iter()
        .collect()
}

/// max |a - b| as f64 (both converted to f32 on CPU).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_kind(tch::Kind::Float).to_device(tch::Device::Cpu);
    let b = b.to_kind(tch::Kind::Float).to_device(tch::Device::Cpu);
    assert_eq!(a.size(), b.size(), "shape mismatch");
    (a - b).abs().max().double_value(&[])
}

/// Last-position logits of `steps` teacher-forced decode steps (one token per step after a
/// prefill), float32.
pub fn decode_logits(model: &Model, prompt: &[u32], steps: &[i64]) -> Vec<Tensor> {
    let _g = tch::no_grad_guard();
    let ids: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
    let mut cache: KvCache = model.new_cache(1, ids.len() + steps.len()).unwrap();
    let x = Tensor::from_slice(&ids).view([1, -1]);
    let mut out = vec![model
        .forward_cached(&x, None, &mut cache, &LogitsAt::Last, None)
        .unwrap()
        .to_kind(Kind::Float)];
    for &t in steps {
        let x = Tensor::from_slice(&[t]).view([1, 1]);
        out.push(
            model
                .forward_cached(&x, None, &mut cache, &LogitsAt::Last, None)
                .unwrap()
                .to_kind(Kind::Float),
        );
    }
    out
}

/// `n` greedy next tokens of `model` after `prompt` (to teacher-force other models with).
pub fn greedy_steps(model: &Model, prompt: &[u32], n: usize) -> Vec<i64> {
    let _g = tch::no_grad_guard();
    let ids: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
    let mut cache = model.new_cache(1, ids.len() + n + 1).unwrap();
    let mut x = Tensor::from_slice(&ids).view([1, -1]);
    let mut steps = Vec::with_capacity(n);
    for _ in 0..n {
        let l = model
            .forward_cached(&x, None, &mut cache, &LogitsAt::Last, None)
            .unwrap();
        let next = l.argmax(-1, false).int64_value(&[0]);
        steps.push(next);
        x = Tensor::from_slice(&[next]).view([1, 1]);
    }
    steps
}

/// Per-step last-position logits of `reference` and `other` (index 0: the prefill) over `n`
/// greedy steps of `reference` after a one-line chat prompt about the river through Paris.
pub fn river_prompt_decode(
    reference: &Model,
    other: &Model,
    tokenizer: &flowtune_lm::tokenizer::Tokenizer,
    n: usize,
) -> (Vec<Tensor>, Vec<Tensor>) {
    let prompt = tokenizer
        .encode_chat(
            &[flowtune_lm::tokenizer::ChatMessage::new(
                "user",
                "Which river flows through Paris? Answer in one sentence.",
            )],
            true,
        )
        .unwrap();
    let steps = greedy_steps(reference, &prompt, n);
    (
        decode_logits(reference, &prompt, &steps),
        decode_logits(other, &prompt, &steps),
    )
}

/// [`river_prompt_decode`] over `n` greedy steps, asserting that after the prefill every
/// step's logits of `other` lie within `tol` (max |Δ|) of `reference`'s and pick the same token.
pub fn assert_river_decode_alike(
    reference: &Model,
    other: &Model,
    tokenizer: &flowtune_lm::tokenizer::Tokenizer,
    n: usize,
    tol: f64,
    what: &str,
) {
    let (a, b) = river_prompt_decode(reference, other, tokenizer, n);
    for (i, (x, y)) in a.iter().zip(&b).enumerate().skip(1) {
        let d = max_abs_diff(x, y);
        eprintln!("step {i}: {what}: max |Δ logit| {d:.2e}");
        assert!(d <= tol, "step {i}: {what}: max |Δ logit| {d}");
    }
    assert_same_argmax(&a, &b, 1, what);
}

/// Assert that two runs of per-step logits pick the same token at every step from `from` on.
pub fn assert_same_argmax(a: &[Tensor], b: &[Tensor], from: usize, what: &str) {
    for (i, (x, y)) in a.iter().zip(b).enumerate().skip(from) {
        assert_eq!(
            x.argmax(-1, false).int64_value(&[0]),
            y.argmax(-1, false).int64_value(&[0]),
            "step {i}: argmax differs ({what})"
        );
    }
}
