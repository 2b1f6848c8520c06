//! The hand-written backward pass (`Model::forward_recorded`, `RecordedPass::backward`)
//! against libtorch's autograd through `Model::forward_cached`, on the shape the label learner
//! uses: prefixes left-padded through a KV cache, their rows repeated, each member's own
//! tokens right-padded on top, hidden states at each member's last token; a loss that is a
//! fixed random linear function of the logits there; LoRA (rank 4, random non-zero `B`) on
//! every projection.
//!
//! Models: the tiny random-weight Llama and Phi-3 (fused projections, partial rotary) of
//! `tests/reference/lm_model_ref.py tiny` in float32, and SmolLM2 (the test model) in float32
//! and bf16. Mistral and Qwen2 have sliding windows, which the recorded pass declines.
//!
//! Tolerances (relative L2 error of each factor's gradient, and max |Δ| of the logits): float32
//! 1e-4 / 1e-4 (both sides compute the same float32 arithmetic in other orders); bf16 5e-2 /
//! 0.25 (autograd keeps every gradient in bf16 and rounds at every op, the recorded pass
//! accumulates the residual gradient in float32; observed values are printed).
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod model_support;

use flowtune_lm::loader::{load, LoadOptions};
use flowtune_lm::model::{LinearDelta, LogitsAt, LoraGrads, Model};
use flowtune_lora::{AdapterBank, AdapterSelection, LoraConfig, Module, Site};
use model_support::*;
use rand::{Rng, SeedableRng};
use tch::{Device, Kind, Tensor};

const ALL: [Module; 7] = [
    Module::QProj,
    Module::KProj,
    Module::VProj,
    Module::OProj,
    Module::GateProj,
    Module::UpProj,
    Module::DownProj,
];

fn tiny(arch: &str, dir: &std::path::Path) -> (Model, flowtune_lm::config::ModelConfig) {
    let loaded = load(
        &dir.join(arch),
        &LoadOptions {
            device: Device::Cpu,
            dtype: Kind::Float,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("loading tiny {arch}: {e}"));
    (
        Model::new(&loaded.config, &loaded.weights).unwrap(),
        loaded.config,
    )
}

/// The modules a model of `arch` names (Phi-3 fuses q/k/v and gate/up).
fn modules(arch: &str) -> &'static [Module] {
    const FUSED: [Module; 4] = [
        Module::QkvProj,
        Module::OProj,
        Module::GateUpProj,
        Module::DownProj,
    ];
    if arch == "phi3" {
        &FUSED
    } else {
        &ALL
    }
}

fn bank_for(config: &flowtune_lm::config::ModelConfig, arch: &str) -> AdapterBank {
    let mut bank = AdapterBank::new(config.lora_base_shapes(), Device::Cpu);
    bank.add("node", &LoraConfig::rslora(4, 8.0, modules(arch)), 3)
        .unwrap();
    tch::manual_seed(11);
    bank.modify("node", |a| {
        let sites: Vec<Site> = a.sites().copied().collect();
        for s in sites {
            let w = a.weights_mut(&s).unwrap();
            w.b.copy_(&(Tensor::randn(w.b.size(), (Kind::Float, Device::Cpu)) * 0.05));
        }
    })
    .unwrap();
    bank.set_trainable("node").unwrap();
    bank
}

/// Prefix groups: (prefix, member suffixes).
fn groups(vocab: usize, seed: u64) -> Vec<(Vec<i64>, Vec<Vec<i64>>)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut toks =
        |n: usize| -> Vec<i64> { (0..n).map(|_| rng.random_range(3..vocab as i64)).collect() };
    vec![
        (toks(9), vec![toks(4), toks(2)]),
        (toks(6), vec![toks(3)]),
        (toks(11), vec![toks(1), toks(5), toks(3)]),
    ]
}

/// Rows, validity and per-row last columns of `seqs` padded to one length, left or right.
fn padded(seqs: &[&Vec<i64>], left: bool) -> (Tensor, Vec<bool>, Vec<usize>) {
    let t = seqs.iter().map(|s| s.len()).max().unwrap();
    let (mut ids, mut valid, mut last) = (Vec::new(), Vec::new(), Vec::new());
    for s in seqs {
        let pad = t - s.len();
        let (mut row, mut v) = (Vec::new(), Vec::new());
        if left {
            row.extend(std::iter::repeat_n(0, pad));
            v.extend(std::iter::repeat_n(false, pad));
        }
        row.extend(s.iter().copied());
        v.extend(std::iter::repeat_n(true, s.len()));
        if !left {
            row.extend(std::iter::repeat_n(0, pad));
            v.extend(std::iter::repeat_n(false, pad));
        }
        last.push(if left { t - 1 } else { s.len() - 1 });
        ids.extend(row);
        valid.extend(v);
    }
    (
        Tensor::from_slice(&ids).view([seqs.len() as i64, t as i64]),
        valid,
        last,
    )
}

struct Batch {
    prefix_ids: Tensor,
    prefix_valid: Vec<bool>,
    rows: Vec<usize>,
    suffix_ids: Tensor,
    suffix_valid: Vec<bool>,
    last: Vec<usize>,
    capacity: usize,
}

fn batch(gs: &[(Vec<i64>, Vec<Vec<i64>>)]) -> Batch {
    let prefixes: Vec<&Vec<i64>> = gs.iter().map(|g| &g.0).collect();
    let (prefix_ids, prefix_valid, _) = padded(&prefixes, true);
    let mut rows = Vec::new();
    let mut suffixes = Vec::new();
    for (g, (_, members)) in gs.iter().enumerate() {
        for m in members {
            rows.push(g);
            suffixes.push(m);
        }
    }
    let (suffix_ids, suffix_valid, last) = padded(&suffixes, false);
    let capacity = (prefix_ids.size()[1] + suffix_ids.size()[1]) as usize;
    Batch {
        prefix_ids,
        prefix_valid,
        rows,
        suffix_ids,
        suffix_valid,
        last,
        capacity,
    }
}

/// The loss: a fixed random linear function of the float32 logits.
fn loss_of(logits: &Tensor, probe: &Tensor) -> Tensor {
    (logits.to_kind(Kind::Float) * probe).sum(Kind::Float)
}

/// (logits, gradient per factor) through autograd.
fn autograd(
    model: &Model,
    bank: &AdapterBank,
    b: &Batch,
    probe: &Tensor,
) -> (Tensor, Vec<(String, Tensor)>) {
    let sel = AdapterSelection::All(bank.id("node").unwrap());
    let delta = bank.select(&sel);
    let groups = b.prefix_ids.size()[0] as usize;
    let mut cache = model.new_cache(groups, b.capacity).unwrap();
    let _ = model
        .forward_cached(
            &b.prefix_ids,
            Some(&b.prefix_valid),
            &mut cache,
            &LogitsAt::None,
            Some(&delta),
        )
        .unwrap();
    cache.select_rows(&b.rows).unwrap();
    let logits = model
        .forward_cached(
            &b.suffix_ids,
            Some(&b.suffix_valid),
            &mut cache,
            &LogitsAt::PerRow(b.last.clone()),
            Some(&delta),
        )
        .unwrap();
    let adapter = bank.get("node").unwrap();
    let named = adapter.named_tensors();
    for (_, p) in &named {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    loss_of(&logits, probe).backward();
    let grads = named
        .into_iter()
        .map(|(n, p)| (n, p.grad().copy()))
        .collect();
    (logits.detach(), grads)
}

/// (logits, gradient per factor) through the recorded pass.
fn recorded(
    model: &Model,
    bank: &AdapterBank,
    b: &Batch,
    probe: &Tensor,
) -> (Tensor, Vec<(String, Tensor)>) {
    let sel = AdapterSelection::All(bank.id("node").unwrap());
    let delta = bank.select(&sel);
    assert!(model.recorded_backward_supported(&delta).unwrap());
    let groups = b.prefix_ids.size()[0] as usize;
    let mut cache = model.new_cache(groups, b.capacity).unwrap();
    let (_, prefix) = model
        .forward_recorded(
            &b.prefix_ids,
            &b.prefix_valid,
            &mut cache,
            &LogitsAt::None,
            &delta,
        )
        .unwrap();
    cache.select_rows(&b.rows).unwrap();
    let (hidden, suffix) = model
        .forward_recorded(
            &b.suffix_ids,
            &b.suffix_valid,
            &mut cache,
            &LogitsAt::PerRow(b.last.clone()),
            &delta,
        )
        .unwrap();
    let leaf = hidden.detach().set_requires_grad(true);
    let logits = model.logits_of_hidden(&leaf).unwrap();
    let d_hidden = Tensor::run_backward(&[loss_of(&logits, probe)], &[&leaf], false, false)
        .pop()
        .unwrap();
    let mut grads = LoraGrads::new();
    let kv = suffix
        .backward(model, &delta, Some(&d_hidden), None, &mut grads)
        .unwrap()
        .expect("the suffix pass read the prefix's keys");
    let kv = kv.fold_rows(&b.rows, groups).unwrap();
    assert!(prefix
        .backward(model, &delta, None, Some(&kv), &mut grads)
        .unwrap()
        .is_none());
    let named = bank.get("node").unwrap().named_tensors();
    assert_eq!(grads.len(), named.len(), "every factor gets a gradient");
    let out = named
        .into_iter()
        .map(|(n, p)| (n, grads.get(&p).expect("gradient of a factor").copy()))
        .collect();
    (logits.detach(), out)
}

/// Relative L2 error of `got` against `want`: the worst factor (with its name) and over all
/// factors together.
fn errors(want: &[(String, Tensor)], got: &[(String, Tensor)]) -> ((f64, String), f64) {
    let (mut worst, mut diff2, mut norm2) = ((0.0f64, String::new()), 0.0, 0.0);
    for ((n, w), (m, g)) in want.iter().zip(got) {
        assert_eq!(n, m);
        let (d, r) = ((w - g).norm().double_value(&[]), w.norm().double_value(&[]));
        let rel = d / r.max(1e-30);
        if rel > worst.0 {
            worst = (rel, n.clone());
        }
        diff2 += d * d;
        norm2 += r * r;
    }
    (worst, (diff2 / norm2.max(1e-60)).sqrt())
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Float) - b.to_kind(Kind::Float))
        .abs()
        .max()
        .double_value(&[])
}

fn compare(
    label: &str,
    arch: &str,
    model: &Model,
    config: &flowtune_lm::config::ModelConfig,
    tol: f64,
) {
    let bank = bank_for(config, arch);
    let b = batch(&groups(config.vocab_size, 5));
    let probe = Tensor::randn(
        [b.rows.len() as i64, config.vocab_size as i64],
        (Kind::Float, Device::Cpu),
    );
    let (l_ag, g_ag) = autograd(model, &bank, &b, &probe);
    let (l_rec, g_rec) = recorded(model, &bank, &b, &probe);
    let dl = max_diff(&l_ag, &l_rec);
    let (worst, all) = errors(&g_ag, &g_rec);
    println!(
        "{label}: max |Δlogit| {dl:.3e}; gradient relative error {all:.3e} overall, worst {:.3e} ({}); {} factors",
        worst.0,
        worst.1,
        g_ag.len()
    );
    assert!(dl <= tol, "{label}: max |Δlogit| {dl} > {tol}");
    assert!(
        worst.0 <= tol,
        "{label}: {} relative error {} > {tol}",
        worst.1,
        worst.0
    );
}

#[test]
fn recorded_backward_matches_autograd_on_tiny_architectures_in_float32() {
    let dir = tempfile::tempdir().unwrap();
    let model = test_model();
    run_reference(&[
        "tiny",
        "--out",
        dir.path().to_str().unwrap(),
        "--tokenizer-from",
        model.to_str().unwrap(),
    ]);
    for arch in ["llama", "phi3"] {
        let (m, c) = tiny(arch, dir.path());
        compare(arch, arch, &m, &c, 1e-4);
    }
    // Sliding windows are declined (autograd stays in charge there).
    for arch in ["mistral", "qwen2"] {
        let (m, c) = tiny(arch, dir.path());
        let bank = bank_for(&c, arch);
        let sel = AdapterSelection::All(bank.id("node").unwrap());
        assert!(
            !m.recorded_backward_supported(&bank.select(&sel)).unwrap(),
            "{arch}"
        );
    }
}

#[test]
fn recorded_backward_matches_autograd_on_the_test_model() {
    let path = flowtune_lm::locate_test_model().unwrap_or_else(|e| panic!("{e}"));
    let model_of = |kind: Kind| {
        let loaded = load(
            &path,
            &LoadOptions {
                device: Device::Cpu,
                dtype: kind,
                ..Default::default()
            },
        )
        .unwrap();
        (
            Model::new(&loaded.config, &loaded.weights).unwrap(),
            loaded.config,
        )
    };
    let (f32_model, config) = model_of(Kind::Float);
    compare("SmolLM2 float32", "llama", &f32_model, &config, 1e-3);

    // bf16: both ways against float32 autograd (the float32 gradients the two bf16 ways
    // approximate): the recorded pass must be about as close as autograd in bf16, within 1.5x.
    // Both err by bf16 rounding (~7 % overall); which of two rounding sequences lands closer
    // moves with the CPU's kernels. Observed recorded/autograd ratios, overall and worst of
    // 420 factors: 1.01 overall on the Zen 4 VM (oneDNN bf16 products); 1.26 / 1.38 on a Zen 3
    // VM with libtorch's bf16 fallback products, 1.00 / 1.29 there with the products through
    // float32 (`Bf16Gemm::ViaF32`). The float32 comparison above checks the terms.
    let bank = bank_for(&config, "llama");
    let b = batch(&groups(config.vocab_size, 5));
    let probe = Tensor::randn(
        [b.rows.len() as i64, config.vocab_size as i64],
        (Kind::Float, Device::Cpu),
    );
    let (l_ref, g_ref) = autograd(&f32_model, &bank, &b, &probe);
    let (bf16_model, _) = model_of(Kind::BFloat16);
    let (l_ag, g_ag) = autograd(&bf16_model, &bank, &b, &probe);
    let (l_rec, g_rec) = recorded(&bf16_model, &bank, &b, &probe);
    let ((worst_ag, _), all_ag) = errors(&g_ref, &g_ag);
    let ((worst_rec, name), all_rec) = errors(&g_ref, &g_rec);
    let (dl_ag, dl_rec) = (max_diff(&l_ref, &l_ag), max_diff(&l_ref, &l_rec));
    println!(
        "SmolLM2 bf16 against float32: autograd max |Δlogit| {dl_ag:.3e}, gradient error {all_ag:.3e} overall, worst {worst_ag:.3e}; \
         recorded {dl_rec:.3e}, {all_rec:.3e}, worst {worst_rec:.3e} ({name})"
    );
    assert!(
        all_rec <= 1.5 * all_ag,
        "recorded bf16 gradients {all_rec} against autograd's {all_ag}"
    );
    assert!(
        worst_rec <= 1.5 * worst_ag,
        "recorded bf16 worst factor {worst_rec} against autograd's {worst_ag}"
    );
    assert!(
        dl_rec <= 1.5 * dl_ag.max(0.1),
        "recorded bf16 logits {dl_rec} against autograd's {dl_ag}"
    );
}

/// A delta that is not plain LoRA keeps the default `factors` (`Opaque`): declined.
#[test]
fn opaque_deltas_are_declined() {
    struct Shift;
    impl LinearDelta for Shift {
        fn delta(&self, _: usize, _: &str, x: &Tensor) -> flowtune_lm::Result<Option<Tensor>> {
            Ok(Some(x.zeros_like()))
        }
        fn row_independent(&self) -> bool {
            true
        }
    }
    let path = flowtune_lm::locate_test_model().unwrap_or_else(|e| panic!("{e}"));
    let loaded = load(&path, &LoadOptions::default()).unwrap();
    let model = Model::new(&loaded.config, &loaded.weights).unwrap();
    assert!(!model.recorded_backward_supported(&Shift).unwrap());
    let mut cache = model.new_cache(1, 4).unwrap();
    let ids = Tensor::from_slice(&[5i64, 6]).view([1, 2]);
    assert!(model
        .forward_recorded(&ids, &[true, true], &mut cache, &LogitsAt::Last, &Shift)
        .is_err());
}
