//! Tiny random-weight Llama / Mistral (sliding window 7) / Qwen2 (q/k/v bias,
//! sliding window 6 on layer 1) / Phi-3 (fused projections, partial rotary,
//! long-rope switching past 16 positions) / Llama-3 rope scaling: logits of
//! flowtune's model against HF transformers.
//!
//! Golden values: `tests/reference/lm_model_ref.py tiny` (transformers 5.23,
//! eager attention, float32, seeded random weights) run once per test binary
//! into a temp dir; Rust loads the exported HF folders with `loader::load`.
//! Tolerance: max |Δlogit| ≤ 1e-4 over every real (unpadded) position (the
//! logits are O(1); both sides compute in float32).
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod model_support;

use std::sync::OnceLock;

use flowtune_lm::loader::{load, LoadOptions};
use flowtune_lm::model::{LogitsAt, Model};
use model_support::*;
use tch::{Device, Kind, Tensor};

const ARCHS: [&str; 4] = ["llama", "mistral", "qwen2", "phi3"];
const TOL: f64 = 1e-4;

fn golden_dir() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let model = test_model();
        run_reference(&[
            "tiny",
            "--out",
            dir.path().to_str().unwrap(),
            "--tokenizer-from",
            model.to_str().unwrap(),
        ]);
        dir
    })
}

fn load_arch(arch: &str, dtype: Kind) -> Model {
    let loaded = load(
        &golden_dir().path().join(arch),
        &LoadOptions {
            device: Device::Cpu,
            dtype,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("loading tiny {arch}: {e}"));
    Model::new(&loaded.config, &loaded.weights)
        .unwrap_or_else(|e| panic!("building tiny {arch}: {e}"))
}

/// Max |Δ| over positions where mask == 1.
fn masked_diff(ours: &Tensor, theirs: &Tensor, mask: &Tensor) -> f64 {
    let m = mask.to_kind(Kind::Float).unsqueeze(-1);
    let d = (ours.to_kind(Kind::Float) - theirs.to_kind(Kind::Float)).abs() * m;
    d.max().double_value(&[])
}

#[test]
fn tiny_architectures_match_transformers_full_forward() {
    let golden = read_golden(&golden_dir().path().join("tiny_golden.safetensors"));
    for arch in ARCHS {
        let model = load_arch(arch, Kind::Float);
        let ids = &golden[&format!("{arch}.ids")];
        let mask = &golden[&format!("{arch}.mask")];
        let want = &golden[&format!("{arch}.logits")];
        let got = tch::no_grad(|| model.forward(ids, mask, None)).unwrap();
        let d = masked_diff(&got, want, mask);
        println!("{arch}: max |Δlogit| = {d:.3e}");
        assert!(d <= TOL, "{arch}: max |Δlogit| {d} > {TOL}");
    }
}

/// Prefill 10 slots then decode one token at a time with the KV cache: every
/// step's logits equal the full forward's (same golden values).
#[test]
fn tiny_architectures_incremental_decode_matches_transformers() {
    let golden = read_golden(&golden_dir().path().join("tiny_golden.safetensors"));
    for arch in ARCHS {
        let model = load_arch(arch, Kind::Float);
        let ids = &golden[&format!("{arch}.ids")];
        let mask = &golden[&format!("{arch}.mask")];
        let (b, mut t) = (ids.size()[0], ids.size()[1]);
        let mut want = golden[&format!("{arch}.logits")].shallow_clone();
        if arch == "phi3" {
            // LongRoPE picks its factors from the sequence length (like transformers): a cache
            // filled while short keeps short-factor keys. Stay within the original 16 positions and
            // compare with our own full forward there (itself checked against transformers above).
            t = 16;
            want =
                tch::no_grad(|| model.forward(&ids.narrow(1, 0, t), &mask.narrow(1, 0, t), None))
                    .unwrap();
        }
        let want = &want;
        let mask_host: Vec<i64> = Vec::try_from(mask.flatten(0, -1)).unwrap();
        let valid_at = |c0: i64, n: i64| -> Vec<bool> {
            let full_t = ids.size()[1];
            (0..b)
                .flat_map(|r| (c0..c0 + n).map(move |c| (r, c)))
                .map(|(r, c)| mask_host[(r * full_t + c) as usize] != 0)
                .collect()
        };
        // Start with a small capacity so the cache has to grow.
        let mut cache = model.new_cache(b as usize, 4).unwrap();
        let prefill = 10;
        let first = tch::no_grad(|| {
            model.forward_cached(
                &ids.narrow(1, 0, prefill),
                Some(&valid_at(0, prefill)),
                &mut cache,
                &LogitsAt::All,
                None,
            )
        })
        .unwrap();
        let mut worst = masked_diff(
            &first,
            &want.narrow(1, 0, prefill),
            &mask.narrow(1, 0, prefill),
        );
        for c in prefill..t {
            let step = tch::no_grad(|| {
                model.forward_cached(
                    &ids.narrow(1, c, 1),
                    Some(&valid_at(c, 1)),
                    &mut cache,
                    &LogitsAt::Last,
                    None,
                )
            })
            .unwrap();
            let d = masked_diff(
                &step.unsqueeze(1),
                &want.narrow(1, c, 1),
                &mask.narrow(1, c, 1),
            );
            worst = worst.max(d);
        }
        println!("{arch}: incremental max |Δlogit| = {worst:.3e}");
        assert!(
            worst <= TOL,
            "{arch}: incremental decode max |Δlogit| {worst} > {TOL}"
        );
    }
}

/// bf16 on CPU stays close to the f32 reference (loose bound: bf16 has ~3
/// significant digits; logits here are O(1)).
#[test]
fn tiny_architectures_bf16_close_to_f32() {
    let golden = read_golden(&golden_dir().path().join("tiny_golden.safetensors"));
    for arch in ARCHS {
        let model = load_arch(arch, Kind::BFloat16);
        let ids = &golden[&format!("{arch}.ids")];
        let mask = &golden[&format!("{arch}.mask")];
        let want = &golden[&format!("{arch}.logits")];
        let got = tch::no_grad(|| model.forward(ids, mask, None)).unwrap();
        let d = masked_diff(&got, want, mask);
        println!("{arch}: bf16 max |Δlogit| = {d:.3e}");
        assert!(d <= 0.1, "{arch}: bf16 max |Δlogit| {d} > 0.1");
    }
}
