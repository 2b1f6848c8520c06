//! Int4 linear weights (`LinearWeights::Int4`) on the real SmolLM2 GGUF (Q4_1 linears).
//!
//! References and tolerances:
//! - The GGUF's own blocks: `Int4Blocks::dequantize` must equal the dense float32 dequantisation
//!   of the same file bit for bit (both compute `scale * q + min` in float32), for permuted
//!   (q/k) and unpermuted projections alike.
//! - Quantising a dense weight: every element within half a step (`scale / 2`, plus 1e-6 for
//!   float rounding) of the original; Q4_1-representable weights come back within 1e-6.
//! - The model: int4 bf16 decode logits must be about as close to the float32 dense model as
//!   dense bf16 is (mean |Δ| at most 1.5x dense bf16's + 0.02, max |Δ| at most 2x + 0.1), with
//!   the same argmax at every step.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod model_support;

use flowtune_lm::int4::Int4Blocks;
use flowtune_lm::loader::{load, LinearWeights, LoadOptions};
use flowtune_lm::model::Model;
use flowtune_lm::tokenizer::ChatMessage;
use flowtune_lm::{Error, LoadedModel};
use model_support::*;
use tch::{Device, Kind, Tensor};

fn load_as(dtype: Kind, linear_weights: LinearWeights) -> LoadedModel {
    load(
        &test_model(),
        &LoadOptions {
            device: Device::Cpu,
            dtype,
            linear_weights,
        },
    )
    .unwrap()
}

#[test]
fn gguf_q4_blocks_reproduce_the_files_dequantisation_exactly() {
    let dense = load_as(Kind::Float, LinearWeights::Dense);
    let int4 = load_as(Kind::BFloat16, LinearWeights::Int4);
    let mut checked = 0;
    for name in dense.weights.names() {
        if !flowtune_lm::int4::is_int4_target(name) {
            assert!(
                int4.weights.int4(name).is_none(),
                "{name} should stay dense"
            );
            continue;
        }
        let blocks = int4
            .weights
            .int4(name)
            .unwrap_or_else(|| panic!("{name}: no int4 blocks"));
        let w = dense.weights.get(name).unwrap();
        let d = blocks.dequantize().unwrap();
        assert_eq!(d.size(), w.size(), "{name}");
        let diff = d.f_sub(&w).unwrap().abs().max().double_value(&[]);
        assert_eq!(diff, 0.0, "{name}: max |Δ| {diff}");
        checked += 1;
    }
    // 30 layers x 7 projections.
    assert_eq!(checked, 210);
}

/// In int4 mode the test GGUF's Q8_0 head (its tied `token_embd.weight`) keeps the file's own
/// 8-bit blocks: `scale * q` equals the dense load's dequantised embeddings exactly, and the
/// model runs its head from them; dense loads have none.
/// Whether float32 int4 loads are possible here (flowtune's kernel needs AVX-512F). Where
/// they are not, the load must fail with the typed `Unsupported` error naming int4, and the
/// test that needs them ends there (AVX2-only CPUs, such as session 20's Zen 3 VM).
fn float32_int4_loads() -> bool {
    if flowtune_lm::cpu_kernels::int4_f32_available() {
        return true;
    }
    let opts = LoadOptions {
        device: Device::Cpu,
        dtype: Kind::Float,
        linear_weights: LinearWeights::Int4,
    };
    match load(&test_model(), &opts) {
        Err(e @ Error::Unsupported { .. }) => {
            assert!(e.to_string().contains("int4"), "{e}");
            eprintln!("no AVX-512F: float32 int4 loads are refused, as they must be ({e})");
            false
        }
        Err(e) => panic!("float32 int4 load without AVX-512F: {e}"),
        Ok(_) => panic!("float32 int4 load accepted on a CPU without AVX-512F"),
    }
}

#[test]
fn gguf_q8_0_head_reproduces_the_files_dequantisation_exactly() {
    if !float32_int4_loads() {
        return;
    }
    let dense = load_as(Kind::Float, LinearWeights::Dense);
    let int4 = load_as(Kind::Float, LinearWeights::Int4);
    assert!(dense.weights.int8("lm_head.weight").is_none());
    let head = int4
        .weights
        .int8("lm_head.weight")
        .expect("the test model's Q8_0 head is kept in int4 mode");
    let w = dense.weights.get("model.embed_tokens.weight").unwrap();
    let d = head.dequantize().unwrap();
    assert_eq!(d.size(), w.size());
    assert_eq!(d.f_sub(&w).unwrap().abs().max().double_value(&[]), 0.0);
    let model = Model::new(&int4.config, &int4.weights).unwrap();
    assert!(model.int8_head());
    assert!(!Model::new(&dense.config, &dense.weights)
        .unwrap()
        .int8_head());
}

#[test]
fn quantize_is_within_half_a_step_and_exact_on_representable_weights() {
    tch::manual_seed(7);
    let w = Tensor::randn([48, 96], (Kind::Float, Device::Cpu));
    let b = Int4Blocks::quantize("w", &w).unwrap();
    let d = b.dequantize().unwrap();
    let g = w.reshape([48, 3, 32]);
    let half_step = (g.amax([-1i64].as_slice(), true) - g.amin([-1i64].as_slice(), true)) / 30.0;
    let err = (d.reshape([48, 3, 32]) - &g).abs();
    let excess = (err - half_step - 1e-6).max().double_value(&[]);
    assert!(
        excess <= 0.0,
        "an element is more than half a step off ({excess})"
    );

    // Weights already on a Q4_1 grid (f16 scale and minimum, codes 0..=15 with 0 and 15 in
    // every group, as llama.cpp's quantiser produces) come back to within float rounding.
    let q = Tensor::randint_low(0, 16, [16, 64], (Kind::Int64, Device::Cpu));
    let _ = q.narrow(1, 0, 1).fill_(0);
    let _ = q.narrow(1, 32, 1).fill_(0);
    let _ = q.narrow(1, 1, 1).fill_(15);
    let _ = q.narrow(1, 33, 1).fill_(15);
    let scale = (Tensor::rand([16, 2], (Kind::Float, Device::Cpu)) * 0.1 + 0.01)
        .to_kind(Kind::Half)
        .to_kind(Kind::Float);
    let min = (Tensor::randn([16, 2], (Kind::Float, Device::Cpu)) * 0.1)
        .to_kind(Kind::Half)
        .to_kind(Kind::Float);
    let exact = Int4Blocks::new("grid", q.to_kind(Kind::Uint8), scale, min).unwrap();
    let w = exact.dequantize().unwrap();
    let again = Int4Blocks::quantize("grid", &w)
        .unwrap()
        .dequantize()
        .unwrap();
    let diff = (again - &w).abs().max().double_value(&[]);
    assert!(diff <= 1e-6, "re-quantised grid weights moved by {diff}");
}

#[test]
fn bad_block_shapes_are_typed_errors() {
    let w = Tensor::zeros([4, 40], (Kind::Float, Device::Cpu));
    let e = Int4Blocks::quantize("layers.0.q_proj", &w).unwrap_err();
    assert!(
        matches!(e, Error::TensorShape { ref tensor, .. } if tensor == "layers.0.q_proj"),
        "{e}"
    );
    let q = Tensor::zeros([4, 64], (Kind::Uint8, Device::Cpu));
    let s = Tensor::zeros([4, 3], (Kind::Float, Device::Cpu));
    let e = Int4Blocks::new("x", q, s.shallow_clone(), s).unwrap_err();
    assert!(matches!(e, Error::TensorShape { .. }), "{e}");
}

#[test]
fn int4_needs_the_cpu() {
    // The check comes before any tensor is made, so no GPU is needed to see the error.
    let e = load(
        &test_model(),
        &LoadOptions {
            device: Device::Cuda(0),
            dtype: Kind::BFloat16,
            linear_weights: LinearWeights::Int4,
        },
    )
    .unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    assert!(e.to_string().contains("int4"), "{e}");
}

/// Float32 activations with int4 weights (flowtune's own kernel): the GGUF's Q4_1 blocks are
/// the very weights the dense float32 model dequantises, so teacher-forced decode logits must
/// equal the dense model's up to float32 summation order: max |Δ logit| ≤ 2e-3 over 12 steps
/// (logits are O(10); observed about 1e-4), same argmax at every step.
#[test]
fn int4_f32_decode_equals_dense_f32() {
    if !float32_int4_loads() {
        return;
    }
    let d = load_as(Kind::Float, LinearWeights::Dense);
    let dense = Model::new(&d.config, &d.weights).unwrap();
    let q = load_as(Kind::Float, LinearWeights::Int4);
    let int4 = Model::new(&q.config, &q.weights).unwrap();
    assert_eq!(int4.int4_linears(), 30 * 4);
    model_support::assert_river_decode_alike(
        &dense,
        &int4,
        &d.tokenizer,
        12,
        2e-3,
        "f32 int4 vs dense",
    );
}

#[test]
fn int4_decode_is_as_close_to_f32_as_dense_bf16() {
    let f32m = load_as(Kind::Float, LinearWeights::Dense);
    let reference = Model::new(&f32m.config, &f32m.weights).unwrap();
    let b = load_as(Kind::BFloat16, LinearWeights::Dense);
    let bf16 = Model::new(&b.config, &b.weights).unwrap();
    drop(b);
    let q = load_as(Kind::BFloat16, LinearWeights::Int4);
    let int4 = Model::new(&q.config, &q.weights).unwrap();
    drop(q);
    assert_eq!(int4.int4_linears(), 30 * 4);
    assert_eq!(bf16.int4_linears(), 0);

    let prompt = f32m
        .tokenizer
        .encode_chat(
            &[ChatMessage::new(
                "user",
                "Name the capital of France and one river that flows through it.",
            )],
            true,
        )
        .unwrap();
    let steps = greedy_steps(&reference, &prompt, 12);
    let r = decode_logits(&reference, &prompt, &steps);
    let d = decode_logits(&bf16, &prompt, &steps);
    let q = decode_logits(&int4, &prompt, &steps);
    let max_diff = |a: &[Tensor], b: &[Tensor], from: usize| -> f64 {
        a.iter()
            .zip(b)
            .skip(from)
            .map(|(x, y)| (x - y).abs().max().double_value(&[]))
            .fold(0.0, f64::max)
    };
    // Position 0 is the prefill (dense in both bf16 models); decode steps start at 1.
    let dense_err = max_diff(&r, &d, 1);
    let int4_err = max_diff(&r, &q, 1);
    let mean_diff = |a: &[Tensor], b: &[Tensor]| -> f64 {
        let v: Vec<f64> = a
            .iter()
            .zip(b)
            .skip(1)
            .map(|(x, y)| (x - y).abs().mean(Kind::Float).double_value(&[]))
            .collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    eprintln!(
        "decode |Δ logit| vs f32: max dense bf16 {dense_err:.4}, int4 {int4_err:.4}; mean dense {:.4}, int4 {:.4}",
        mean_diff(&r, &d),
        mean_diff(&r, &q)
    );
    let (dense_mean, int4_mean) = (mean_diff(&r, &d), mean_diff(&r, &q));
    // The statistics are those of 12 steps of one prompt: bounds leave room for chance, while
    // a wrong scale, zero point or permutation gives errors of several logits.
    assert!(
        int4_mean <= 1.5 * dense_mean + 0.02 && int4_err <= 2.0 * dense_err + 0.1,
        "int4 decode logits are off by {int4_mean} on average (max {int4_err}) where dense bf16 \
         is off by {dense_mean} (max {dense_err})"
    );
    assert_same_argmax(&r, &q, 1, "bf16 int4 vs f32");

    // libtorch's int4 kernel for bf16 activations (opt-in at load; flowtune's is the default):
    // the same bound. Other tests of this binary loading a bf16 int4 model meanwhile may pick
    // it up too; both kernels are correct, so that only changes which one they exercise.
    std::env::set_var("FLOWTUNE_INT4_BF16", "libtorch");
    let o = load_as(Kind::BFloat16, LinearWeights::Int4);
    let lt = Model::new(&o.config, &o.weights).unwrap();
    std::env::remove_var("FLOWTUNE_INT4_BF16");
    drop(o);
    assert_eq!(lt.int4_linears(), 30 * 4);
    let lw = decode_logits(&lt, &prompt, &steps);
    let (lt_err, lt_mean) = (max_diff(&r, &lw, 1), mean_diff(&r, &lw));
    eprintln!("libtorch bf16 int4 kernel: max |Δ logit| {lt_err:.4}, mean {lt_mean:.4}");
    assert!(
        lt_mean <= 1.5 * dense_mean + 0.02 && lt_err <= 2.0 * dense_err + 0.1,
        "libtorch-kernel int4 decode logits are off by {lt_mean} on average (max {lt_err})"
    );
    assert_same_argmax(&r, &lw, 1, "bf16 int4 (libtorch kernel) vs f32");
}
