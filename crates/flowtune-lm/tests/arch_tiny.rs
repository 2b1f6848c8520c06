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
/// One architecture's golden batch: ids and mask `[B, full T]`, the columns compared (`t`) and
/// the logits wanted there.
struct Case {
    ids: Tensor,
    mask: Tensor,
    b: i64,
    t: i64,
    want: Tensor,
    mask_host: Vec<i64>,
}

impl Case {
    fn new(model: &Model, golden: &std::collections::HashMap<String, Tensor>, arch: &str) -> Self {
        let ids = golden[&format!("{arch}.ids")].shallow_clone();
        let mask = golden[&format!("{arch}.mask")].shallow_clone();
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
        let mask_host: Vec<i64> = Vec::try_from(mask.flatten(0, -1)).unwrap();
        Self {
            ids,
            mask,
            b,
            t,
            want,
            mask_host,
        }
    }

    /// Which of columns `c0..c0 + n` hold real tokens, row-major.
    fn valid_at(&self, c0: i64, n: i64) -> Vec<bool> {
        let full_t = self.ids.size()[1];
        (0..self.b)
            .flat_map(|r| (c0..c0 + n).map(move |c| (r, c)))
            .map(|(r, c)| self.mask_host[(r * full_t + c) as usize] != 0)
            .collect()
    }
}

#[test]
fn tiny_architectures_incremental_decode_matches_transformers() {
    let golden = read_golden(&golden_dir().path().join("tiny_golden.safetensors"));
    for arch in ARCHS {
        let model = load_arch(arch, Kind::Float);
        let case = Case::new(&model, &golden, arch);
        let (ids, mask, want) = (&case.ids, &case.mask, &case.want);
        // Start with a small capacity so the cache has to grow.
        let mut cache = model.new_cache(case.b as usize, 4).unwrap();
        let prefill = 10;
        let first = tch::no_grad(|| {
            model.forward_cached(
                &ids.narrow(1, 0, prefill),
                Some(&case.valid_at(0, prefill)),
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
        for c in prefill..case.t {
            let step = tch::no_grad(|| {
                model.forward_cached(
                    &ids.narrow(1, c, 1),
                    Some(&case.valid_at(c, 1)),
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

/// Prompt passes that read their logits at a few positions run the last layer's attention
/// output, output projection and MLP there only, and a pass that reads none stops that layer
/// after its keys and values. Checked against transformers' logits (phi3: the own-forward
/// stand-in above), tolerance 1e-4 as above: a `None` pass over the first 6 columns, then a
/// `PerRow` pass over the rest reading each row's last real token, and a whole-prompt `Last`
/// pass (the last column, on rows where it is real).
#[test]
fn tiny_architectures_prompt_read_positions_match_transformers() {
    let golden = read_golden(&golden_dir().path().join("tiny_golden.safetensors"));
    for arch in ARCHS {
        let model = load_arch(arch, Kind::Float);
        let case = Case::new(&model, &golden, arch);
        let (ids, want, t) = (&case.ids, &case.want, case.t);
        let head = 6;
        let rest = case.valid_at(head, t - head);
        let last: Vec<usize> = (0..case.b as usize)
            .map(|r| {
                let row = &rest[r * (t - head) as usize..][..(t - head) as usize];
                row.iter()
                    .rposition(|&v| v)
                    .expect("a real token after the head")
            })
            .collect();
        let mut cache = model.new_cache(case.b as usize, t as usize).unwrap();
        let picked = tch::no_grad(|| {
            let none = model.forward_cached(
                &ids.narrow(1, 0, head),
                Some(&case.valid_at(0, head)),
                &mut cache,
                &LogitsAt::None,
                None,
            )?;
            assert_eq!(none.numel(), 0);
            model.forward_cached(
                &ids.narrow(1, head, t - head),
                Some(&rest),
                &mut cache,
                &LogitsAt::PerRow(last.clone()),
                None,
            )
        })
        .unwrap();
        let mut cache = model.new_cache(case.b as usize, t as usize).unwrap();
        let at_end = tch::no_grad(|| {
            model.forward_cached(
                &ids.narrow(1, 0, t),
                Some(&case.valid_at(0, t)),
                &mut cache,
                &LogitsAt::Last,
                None,
            )
        })
        .unwrap();
        let mut worst: f64 = 0.0;
        for (r, &c) in last.iter().enumerate() {
            let r = r as i64;
            let d = (picked.get(r) - want.get(r).get(head + c as i64))
                .abs()
                .max()
                .double_value(&[]);
            worst = worst.max(d);
            if case.mask_host[(r * case.ids.size()[1] + t - 1) as usize] != 0 {
                let d = (at_end.get(r) - want.get(r).get(t - 1))
                    .abs()
                    .max()
                    .double_value(&[]);
                worst = worst.max(d);
            }
        }
        println!("{arch}: read-position max |Δlogit| = {worst:.3e}");
        assert!(
            worst <= TOL,
            "{arch}: read positions max |Δlogit| {worst} > {TOL}"
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
