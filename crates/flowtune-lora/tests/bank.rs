//! Adapter bank behaviour on plain linear layers: delta vs hand computation, init, scaling,
//! per-row selection, training isolation, lerp/copy/reset, merge/unmerge.
//!
//! Tolerances: f32 comparisons use |a-b| <= 1e-5 (two matmul associations differ by rounding
//! only); "bit-identical" checks use exact tensor equality.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use flowtune_lora::{
    llama_base_shapes, AdapterBank, AdapterSelection, BaseShapes, LoraConfig, LoraError, Module,
    Site, TargetModules,
};
use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use tch::{Device, Kind, Tensor};

/// libtorch's global random generator, taken by every test here: the tests run on parallel
/// threads, and one that seeds the generator and then replays its draws (the dropout test)
/// fails when another draws in between.
static RNG: Mutex<()> = Mutex::new(());

fn rng() -> MutexGuard<'static, ()> {
    RNG.lock().unwrap_or_else(|p| p.into_inner())
}

fn shapes() -> BaseShapes {
    // 2 layers, hidden 16, 4 heads of 4, 2 kv heads, intermediate 24.
    llama_base_shapes(2, 16, 4, 2, 4, 24)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Gives every B of `name` random values (fresh adapters have B = 0, hence delta 0).
fn randomize_b(bank: &mut AdapterBank, name: &str, seed: i64) {
    tch::manual_seed(seed);
    bank.modify(name, |a| {
        let sites: Vec<Site> = a.sites().copied().collect();
        for s in sites {
            let w = a.weights_mut(&s).unwrap();
            let r = Tensor::randn(w.b.size(), (Kind::Float, Device::Cpu)) * 0.1;
            w.b.copy_(&r);
        }
    })
    .unwrap();
}

#[test]
fn delta_matches_hand_computed_linear_with_lora() {
    let _rng = rng();
    let mut bank = AdapterBank::new(shapes(), Device::Cpu);
    let cfg = LoraConfig::rslora(4, 16.0, &[Module::QProj, Module::VProj]);
    let id = bank.add("q", &cfg, 7).unwrap();
    randomize_b(&mut bank, "q", 1);
    let site = Site::new(1, Module::QProj);
    tch::manual_seed(3);
    let x = Tensor::randn([3, 5, 16], (Kind::Float, Device::Cpu));
    let w = Tensor::randn([16, 16], (Kind::Float, Device::Cpu));
    let d = bank
        .delta(&site, &x, &AdapterSelection::All(id))
        .unwrap()
        .unwrap();
    let y = x.matmul(&w.tr()) + &d;
    let ad = bank.get("q").unwrap();
    let lw = ad.weights(&site).unwrap();
    // Hand computation with the other association: x·(W + s·B·A)ᵀ.
    let s = 16.0 / 2.0; // rsLoRA: alpha/sqrt(r), r=4
    assert_eq!(ad.scale(), s);
    let expected = x.matmul(&(&w + lw.b.matmul(&lw.a) * s).tr());
    assert!(max_abs_diff(&y, &expected) < 1e-5);
    // Untargeted site: no delta.
    assert!(bank
        .delta(&Site::new(0, Module::KProj), &x, &AdapterSelection::All(id))
        .unwrap()
        .is_none());
}

/// `SelectedAdapters::uniform_weights` hands out exactly the factors and scale `delta` uses,
/// and only for a one-adapter selection at a site that adapter adapts. Tolerance 1e-6 (f32,
/// the same products in the same association).
#[test]
fn uniform_weights_are_the_factors_the_delta_uses() {
    let _rng = rng();
    let mut bank = AdapterBank::new(shapes(), Device::Cpu);
    let cfg = LoraConfig::rslora(4, 16.0, &[Module::QProj, Module::VProj]);
    let id = bank.add("q", &cfg, 7).unwrap();
    randomize_b(&mut bank, "q", 2);
    tch::manual_seed(4);
    let x = Tensor::randn([2, 3, 16], (Kind::Float, Device::Cpu));
    let all = AdapterSelection::All(id);
    let selected = bank.select(&all);
    let (w, scale) = selected.uniform_weights(1, "q_proj").unwrap().unwrap();
    assert_eq!(scale, 8.0);
    let by_hand = x.matmul(&w.a.tr()).matmul(&w.b.tr()) * scale;
    let delta = selected.delta(1, "q_proj", &x).unwrap().unwrap();
    assert!(max_abs_diff(&delta, &by_hand) < 1e-6);
    // Not adapted, not a PEFT module name, or rows that may differ: none.
    assert!(selected.uniform_weights(1, "k_proj").unwrap().is_none());
    assert!(selected
        .uniform_weights(1, "no_such_proj")
        .unwrap()
        .is_none());
    let per_row = AdapterSelection::PerRow(vec![Some(id), Some(id)]);
    assert!(bank
        .select(&per_row)
        .uniform_weights(1, "q_proj")
        .unwrap()
        .is_none());
    assert!(bank
        .select(&AdapterSelection::None)
        .uniform_weights(1, "q_proj")
        .unwrap()
        .is_none());
}

/// `lora_dropout` in training mode is PEFT's `lora_B(lora_A(dropout(x))) · scale` with
/// libtorch's inverted dropout (reproduced here from the same seed: exact equality); in
/// inference mode, or at probability 0, the delta is the plain one. The fused-kernel
/// accessor declines while dropout applies, and `validate` names a bad probability.
#[test]
fn lora_dropout_applies_in_training_mode_only() {
    let _rng = rng();
    let mut bank = AdapterBank::new(shapes(), Device::Cpu);
    let mut cfg = LoraConfig::rslora(4, 16.0, &[Module::QProj]);
    cfg.lora_dropout = 0.5;
    let id = bank.add("q", &cfg, 7).unwrap();
    let plain_id = bank
        .add("plain", &LoraConfig::rslora(4, 16.0, &[Module::QProj]), 8)
        .unwrap();
    randomize_b(&mut bank, "q", 5);
    randomize_b(&mut bank, "plain", 6);
    let site = Site::new(0, Module::QProj);
    tch::manual_seed(9);
    let x = Tensor::randn([2, 6, 16], (Kind::Float, Device::Cpu));
    let all = AdapterSelection::All(id);
    let eval = bank.delta(&site, &x, &all).unwrap().unwrap();
    assert!(!bank.is_training());

    bank.set_training(true);
    tch::manual_seed(21);
    let train = bank.delta(&site, &x, &all).unwrap().unwrap();
    tch::manual_seed(21);
    let dropped = x.dropout(0.5, true);
    let w = bank.get("q").unwrap().weights(&site).unwrap();
    let by_hand = dropped.matmul(&w.a.tr()).matmul(&w.b.tr()) * 8.0;
    assert!(max_abs_diff(&train, &by_hand) < 1e-6);
    assert!(
        max_abs_diff(&train, &eval) > 1e-3,
        "dropout changed nothing"
    );
    assert!(bank
        .select(&all)
        .uniform_weights(0, "q_proj")
        .unwrap()
        .is_none());
    // Probability 0 drops nothing, also in training mode; per-row rows of such an adapter
    // are untouched next to rows whose adapter drops.
    let plain = AdapterSelection::All(plain_id);
    let plain_eval = {
        bank.set_training(false);
        bank.delta(&site, &x, &plain).unwrap().unwrap()
    };
    bank.set_training(true);
    assert!(
        max_abs_diff(
            &bank.delta(&site, &x, &plain).unwrap().unwrap(),
            &plain_eval
        ) == 0.0
    );
    let rows = AdapterSelection::PerRow(vec![Some(plain_id), Some(id)]);
    let mixed = bank.delta(&site, &x, &rows).unwrap().unwrap();
    assert!(max_abs_diff(&mixed.get(0), &plain_eval.get(0)) < 1e-6);
    assert!(max_abs_diff(&mixed.get(1), &eval.get(1)) > 1e-3);

    bank.set_training(false);
    assert!(max_abs_diff(&bank.delta(&site, &x, &all).unwrap().unwrap(), &eval) == 0.0);

    for bad in [1.0, -0.1, f64::NAN] {
        let mut c = cfg.clone();
        c.lora_dropout = bad;
        match c.validate() {
            Err(LoraError::ConfigField { field, .. }) => assert_eq!(field, "lora_dropout"),
            other => panic!("lora_dropout {bad}: {other:?}"),
        }
    }
}

#[test]
fn plain_scale_is_alpha_over_r_and_rslora_alpha_over_sqrt_r() {
    let _rng = rng();
    let mut cfg = LoraConfig::rslora(16, 32.0, &[Module::QProj]);
    assert_eq!(cfg.scale(), 8.0);
    cfg.use_rslora = false;
    assert_eq!(cfg.scale(), 2.0);
}

#[test]
fn init_is_seeded_kaiming_uniform_and_b_zero() {
    let _rng = rng();
    let mut bank = AdapterBank::new(shapes(), Device::Cpu);
    let cfg = LoraConfig::rslora(8, 16.0, &[Module::QProj, Module::DownProj]);
    bank.add("a", &cfg, 42).unwrap();
    bank.add("b", &cfg, 42).unwrap();
    bank.add("c", &cfg, 43).unwrap();
    let (a, b, c) = (
        bank.get("a").unwrap(),
        bank.get("b").unwrap(),
        bank.get("c").unwrap(),
    );
    assert_eq!(a.sites().count(), 4);
    for site in a.sites() {
        let (wa, wb, wc) = (
            a.weights(site).unwrap(),
            b.weights(site).unwrap(),
            c.weights(site).unwrap(),
        );
        assert!(wa.a.equal(&wb.a), "same seed, same A");
        assert!(!wa.a.equal(&wc.a), "different seed, different A");
        assert_eq!(wa.b.abs().max().double_value(&[]), 0.0);
        let fan_in = bank.base_shapes()[site].in_features as f64;
        let bound = 1.0 / fan_in.sqrt();
        let max = wa.a.abs().max().double_value(&[]);
        assert!(max < bound && max > 0.8 * bound, "max {max} bound {bound}");
        // Uniform(-b, b) has variance b²/3; with ≥128 samples the estimate is within 35%.
        let var = wa.a.var(true).double_value(&[]);
        assert!(
            (var / (bound * bound / 3.0) - 1.0).abs() < 0.35,
            "var {var}"
        );
    }
}

#[test]
fn per_row_selection_checks_length_and_ids() {
    let _rng = rng();
    let mut bank = AdapterBank::new(shapes(), Device::Cpu);
    let cfg = LoraConfig::rslora(2, 4.0, &[Module::QProj]);
    let id = bank.add("q", &cfg, 0).unwrap();
    let x = Tensor::randn([3, 2, 16], (Kind::Float, Device::Cpu));
    let site = Site::new(0, Module::QProj);
    let err = bank
        .delta(&site, &x, &AdapterSelection::PerRow(vec![Some(id)]))
        .unwrap_err();
    assert!(matches!(
        err,
        LoraError::SelectionRows {
            expected: 3,
            found: 1
        }
    ));
    bank.remove("q").unwrap();
    let err = bank
        .delta(&site, &x, &AdapterSelection::All(id))
        .unwrap_err();
    assert!(matches!(err, LoraError::UnknownAdapterId { .. }));
    let id2 = bank.add("q", &cfg, 0).unwrap();
    assert_ne!(id, id2, "ids are not reused");
    let bad = Tensor::randn([3, 2, 15], (Kind::Float, Device::Cpu));
    let err = bank
        .delta(&site, &bad, &AdapterSelection::All(id2))
        .unwrap_err();
    assert!(matches!(
        err,
        LoraError::InputShape {
            expected: 16,
            found: 15,
            ..
        }
    ));
    assert!(bank.selection(&[Some("nope")]).is_err());
}

#[test]
fn bf16_input_gets_delta_in_bf16_computed_in_f32() {
    let _rng = rng();
    let mut bank = AdapterBank::new(shapes(), Device::Cpu);
    let cfg = LoraConfig::rslora(4, 8.0, &[Module::UpProj]);
    let id = bank.add("u", &cfg, 5).unwrap();
    randomize_b(&mut bank, "u", 2);
    let site = Site::new(0, Module::UpProj);
    let x = Tensor::randn([2, 3, 16], (Kind::Float, Device::Cpu));
    let d32 = bank
        .delta(&site, &x, &AdapterSelection::All(id))
        .unwrap()
        .unwrap();
    let d16 = bank
        .delta(
            &site,
            &x.to_kind(Kind::BFloat16),
            &AdapterSelection::All(id),
        )
        .unwrap()
        .unwrap();
    assert_eq!(d16.kind(), Kind::BFloat16);
    // Input rounding to bf16 (rel 2^-8) dominates: tolerance 3% of the delta's scale.
    let tol = 0.03 * d32.abs().max().double_value(&[]);
    assert!(max_abs_diff(&d16.to_kind(Kind::Float), &d32) < tol);
}

#[test]
fn only_the_trainable_adapter_changes_after_backward_and_step() {
    let _rng = rng();
    let mut bank = AdapterBank::new(shapes(), Device::Cpu);
    let cfg = LoraConfig::rslora(4, 8.0, &[Module::QProj, Module::VProj]);
    let trained = bank.add("node", &cfg, 1).unwrap();
    bank.add("node.ref", &cfg, 1).unwrap();
    let other = bank.add("other", &cfg, 2).unwrap();
    randomize_b(&mut bank, "other", 9);
    bank.set_trainable("node").unwrap();
    assert_eq!(bank.trainable(), Some("node"));
    // Base weights of a little two-layer stack.
    let base: BTreeMap<Site, Tensor> = [Site::new(0, Module::QProj), Site::new(1, Module::QProj)]
        .into_iter()
        .map(|s| (s, Tensor::randn([16, 16], (Kind::Float, Device::Cpu))))
        .collect();
    let snapshot = |bank: &AdapterBank| -> Vec<(String, Tensor)> {
        let mut v = vec![];
        for n in bank.names() {
            for (k, t) in bank.get(n).unwrap().named_tensors() {
                v.push((format!("{n}/{k}"), t.detach().copy()));
            }
        }
        v
    };
    let before = snapshot(&bank);
    let base_before: Vec<Tensor> = base.values().map(|t| t.copy()).collect();
    let version_before = bank.version("node").unwrap();
    let x = Tensor::randn([4, 3, 16], (Kind::Float, Device::Cpu));
    let sel = AdapterSelection::PerRow(vec![Some(trained), Some(other), None, Some(trained)]);
    let mut h = x.shallow_clone();
    for (site, w) in &base {
        let d = bank.delta(site, &h, &sel).unwrap().unwrap();
        h = (h.matmul(&w.tr()) + d).tanh();
    }
    let loss = h.pow_tensor_scalar(2).sum(Kind::Float);
    loss.backward();
    // Plain SGD step on the trainable adapter's parameters.
    let params = bank.get("node").unwrap().named_tensors();
    tch::no_grad(|| {
        for (key, p) in &params {
            let g = p.grad();
            // v_proj is not used by this stack: no gradient there.
            assert_eq!(g.defined(), key.contains("q_proj"), "{key}");
            if !g.defined() {
                continue;
            }
            let mut p = p.shallow_clone();
            let _ = p.g_sub_(&(g * 0.1));
        }
    });
    bank.mark_updated("node").unwrap();
    assert!(bank.version("node").unwrap() > version_before);
    let after = snapshot(&bank);
    let mut changed_a = false;
    for ((k, b), (_, a)) in before.iter().zip(&after) {
        if k.starts_with("node/") {
            // B was zero and gets a gradient; A's gradient is zero since B was zero.
            changed_a |= !a.equal(b);
        } else {
            assert!(a.equal(b), "{k} changed");
        }
    }
    assert!(changed_a, "the trained adapter changed");
    for (w, b) in base.values().zip(&base_before) {
        assert!(w.equal(b), "base weight changed");
        assert!(!w.grad().defined(), "base weight got no grad");
    }
    for n in ["node.ref", "other"] {
        for p in bank.get(n).unwrap().parameters() {
            assert!(!p.requires_grad() && !p.grad().defined(), "{n} frozen");
        }
    }
}

#[test]
fn lerp_copy_reset_and_versions() {
    let _rng = rng();
    let mut bank = AdapterBank::new(shapes(), Device::Cpu);
    let cfg = LoraConfig::rslora(4, 8.0, &[Module::KProj]);
    bank.add("t", &cfg, 1).unwrap();
    randomize_b(&mut bank, "t", 4);
    let v0 = bank.version("t").unwrap();
    bank.copy("t", "t.ref").unwrap();
    let site = Site::new(0, Module::KProj);
    let w = |bank: &AdapterBank, n: &str| {
        let l = bank.get(n).unwrap().weights(&site).unwrap();
        (l.a.copy(), l.b.copy())
    };
    assert!(w(&bank, "t").1.equal(&w(&bank, "t.ref").1));
    // Copies are deep: changing t does not change t.ref.
    randomize_b(&mut bank, "t", 5);
    assert!(bank.version("t").unwrap() > v0);
    assert!(!w(&bank, "t").1.equal(&w(&bank, "t.ref").1));
    let (ra, rb) = w(&bank, "t.ref");
    let (ta, tb) = w(&bank, "t");
    let vr = bank.version("t.ref").unwrap();
    bank.lerp("t.ref", "t", 0.5).unwrap();
    assert!(bank.version("t.ref").unwrap() > vr);
    let (na, nb) = w(&bank, "t.ref");
    assert!(max_abs_diff(&nb, &((&rb + &tb) * 0.5)) < 1e-6);
    assert!(max_abs_diff(&na, &((&ra + &ta) * 0.5)) < 1e-6);
    // lerp with w=1 makes them equal; copy into existing overwrites in place.
    let ptr_before = bank
        .get("t.ref")
        .unwrap()
        .weights(&site)
        .unwrap()
        .b
        .data_ptr();
    bank.copy("t", "t.ref").unwrap();
    assert!(w(&bank, "t").1.equal(&w(&bank, "t.ref").1));
    assert_eq!(
        ptr_before,
        bank.get("t.ref")
            .unwrap()
            .weights(&site)
            .unwrap()
            .b
            .data_ptr()
    );
    // reset == freshly added from the same seed.
    bank.reset("t").unwrap();
    bank.add("fresh", &cfg, 1).unwrap();
    let (fa, fb) = w(&bank, "fresh");
    let (ta, tb) = w(&bank, "t");
    assert!(fa.equal(&ta) && fb.equal(&tb));
    // Incompatible adapters are refused.
    bank.add("r8", &LoraConfig::rslora(8, 8.0, &[Module::KProj]), 0)
        .unwrap();
    assert!(matches!(
        bank.lerp("r8", "t", 0.5),
        Err(LoraError::Incompatible { .. })
    ));
    assert!(matches!(
        bank.copy("r8", "t"),
        Err(LoraError::Incompatible { .. })
    ));
    assert!(matches!(
        bank.add("t", &cfg, 0),
        Err(LoraError::AdapterExists { .. })
    ));
    assert_eq!(bank.names(), vec!["fresh", "r8", "t", "t.ref"]);
}

#[test]
fn merge_then_unmerge_restores_base_and_merged_equals_delta() {
    let _rng = rng();
    let mut bank = AdapterBank::new(shapes(), Device::Cpu);
    let cfg = LoraConfig::rslora(4, 8.0, &[Module::QProj, Module::DownProj]);
    let id = bank.add("m", &cfg, 3).unwrap();
    randomize_b(&mut bank, "m", 6);
    let mut base: BTreeMap<Site, Tensor> = bank
        .base_shapes()
        .iter()
        .map(|(s, sh)| {
            let t = Tensor::randn(
                [sh.out_features as i64, sh.in_features as i64],
                (Kind::Float, Device::Cpu),
            );
            (*s, t)
        })
        .collect();
    let original: BTreeMap<Site, Tensor> = base.iter().map(|(s, t)| (*s, t.copy())).collect();
    bank.merge_into("m", &mut base).unwrap();
    let site = Site::new(1, Module::DownProj);
    let x = Tensor::randn([2, 3, 24], (Kind::Float, Device::Cpu));
    let merged = x.matmul(&base[&site].tr());
    let unmerged = x.matmul(&original[&site].tr())
        + bank
            .delta(&site, &x, &AdapterSelection::All(id))
            .unwrap()
            .unwrap();
    assert!(max_abs_diff(&merged, &unmerged) < 1e-4);
    bank.unmerge_from("m", &mut base).unwrap();
    for (s, t) in &base {
        assert!(max_abs_diff(t, &original[s]) < 1e-6, "{s} restored");
    }
    // A base missing a site fails before touching anything.
    base.remove(&Site::new(1, Module::QProj));
    let snapshot: Vec<Tensor> = base.values().map(|t| t.copy()).collect();
    assert!(matches!(
        bank.merge_into("m", &mut base),
        Err(LoraError::BaseWeight { .. })
    ));
    for (t, s) in base.values().zip(&snapshot) {
        assert!(t.equal(s));
    }
}

#[test]
fn target_modules_match_like_peft() {
    let _rng = rng();
    let base = shapes();
    let list = |v: &[&str]| LoraConfig {
        target_modules: Some(TargetModules::List(
            v.iter().map(|s| s.to_string()).collect(),
        )),
        ..LoraConfig::default()
    };
    let mods = |c: &LoraConfig| -> Vec<String> {
        c.target_sites(&base)
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    // Order of the list does not matter.
    assert_eq!(
        mods(&list(&["v_proj", "q_proj"])),
        mods(&list(&["q_proj", "v_proj"]))
    );
    assert_eq!(mods(&list(&["q_proj", "v_proj"])).len(), 4);
    // Suffix match on a dotted path; partial names do not match.
    assert_eq!(mods(&list(&["self_attn.q_proj"])).len(), 2);
    assert_eq!(
        mods(&list(&["model.layers.1.mlp.up_proj"])),
        vec!["model.layers.1.mlp.up_proj"]
    );
    assert!(mods(&list(&["proj"])).is_empty());
    // Default (None): q_proj and v_proj, like PEFT for Llama.
    assert_eq!(
        mods(&LoraConfig::default()),
        mods(&list(&["q_proj", "v_proj"]))
    );
    let all = LoraConfig {
        target_modules: Some(TargetModules::Pattern("all-linear".into())),
        ..LoraConfig::default()
    };
    assert_eq!(mods(&all).len(), 14);
    let regex = LoraConfig {
        target_modules: Some(TargetModules::Pattern(r".*\.(q|v)_proj".into())),
        ..LoraConfig::default()
    };
    assert_eq!(mods(&regex), mods(&list(&["q_proj", "v_proj"])));
    let mut layers = list(&["q_proj"]);
    layers.layers_to_transform = Some(flowtune_lora::LayersToTransform::One(1));
    assert_eq!(mods(&layers), vec!["model.layers.1.self_attn.q_proj"]);
    let mut bank = AdapterBank::new(base.clone(), Device::Cpu);
    assert!(matches!(
        bank.add("x", &list(&["lm_head"]), 0),
        Err(LoraError::NoTargetSites { .. })
    ));
}

#[test]
fn peft_keys_parse_and_print() {
    let _rng = rng();
    let s = Site::new(12, Module::GateUpProj);
    let k = s.peft_key(flowtune_lora::Factor::B);
    assert_eq!(
        k,
        "base_model.model.model.layers.12.mlp.gate_up_proj.lora_B.weight"
    );
    assert_eq!(
        Site::parse_peft_key(&k),
        Some((s, flowtune_lora::Factor::B))
    );
    assert_eq!(
        Site::parse_peft_key(
            "base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight"
        ),
        Some((Site::new(3, Module::QProj), flowtune_lora::Factor::A))
    );
    for bad in [
        "base_model.model.model.layers.3.mlp.q_proj.lora_A.weight",
        "base_model.model.lm_head.lora_A.weight",
        "base_model.model.model.layers.x.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.3.self_attn.q_proj.lora_C.weight",
        "base_model.model.model.layers.3.self_attn.q_proj.lora_A.bias",
    ] {
        assert_eq!(Site::parse_peft_key(bad), None, "{bad}");
    }
}

/// A model that keeps q/k/v fused in one weight, exposing each projection as a narrow view.
struct FusedQkv {
    /// `[q + k + v, hidden]` per layer.
    qkv: Vec<Tensor>,
    q: i64,
    kv: i64,
}

impl flowtune_lora::BaseLinears for FusedQkv {
    fn base_weight(&mut self, site: &Site) -> Option<Tensor> {
        let w = self.qkv.get(site.layer)?;
        match site.module {
            Module::QProj => Some(w.narrow(0, 0, self.q)),
            Module::KProj => Some(w.narrow(0, self.q, self.kv)),
            Module::VProj => Some(w.narrow(0, self.q + self.kv, self.kv)),
            _ => None,
        }
    }
}

#[test]
#[allow(clippy::needless_range_loop)]
fn merge_into_fused_qkv_views_changes_only_the_adapted_slices() {
    let _rng = rng();
    let mut bank = AdapterBank::new(shapes(), Device::Cpu);
    let cfg = LoraConfig::rslora(4, 8.0, &[Module::QProj, Module::VProj]);
    let id = bank.add("m", &cfg, 3).unwrap();
    randomize_b(&mut bank, "m", 8);
    // hidden 16, q 16, k = v = 8.
    let mut model = FusedQkv {
        qkv: (0..2)
            .map(|_| Tensor::randn([32, 16], (Kind::Float, Device::Cpu)))
            .collect(),
        q: 16,
        kv: 8,
    };
    let before: Vec<Tensor> = model.qkv.iter().map(|t| t.copy()).collect();
    bank.merge_into("m", &mut model).unwrap();
    let x = Tensor::randn([2, 3, 16], (Kind::Float, Device::Cpu));
    for layer in 0..2 {
        let merged = x.matmul(&model.qkv[layer].tr());
        let plain = x.matmul(&before[layer].tr());
        let parts = |t: &Tensor| t.split_with_sizes([16, 8, 8], -1);
        let (m, p) = (parts(&merged), parts(&plain));
        let dq = bank
            .delta(
                &Site::new(layer, Module::QProj),
                &x,
                &AdapterSelection::All(id),
            )
            .unwrap()
            .unwrap();
        let dv = bank
            .delta(
                &Site::new(layer, Module::VProj),
                &x,
                &AdapterSelection::All(id),
            )
            .unwrap()
            .unwrap();
        assert!(max_abs_diff(&m[0], &(&p[0] + dq)) < 1e-4);
        assert!(m[1].equal(&p[1]), "k slice untouched");
        assert!(max_abs_diff(&m[2], &(&p[2] + dv)) < 1e-4);
    }
    bank.unmerge_from("m", &mut model).unwrap();
    for (t, b) in model.qkv.iter().zip(&before) {
        assert!(max_abs_diff(t, b) < 1e-6);
    }
}
