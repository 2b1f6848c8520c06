//! Properties of COCOB (no reference needed) and exact resume through save/load.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use flowtune_cocob::{Cocob, CocobConfig, Error};
use proptest::prelude::*;
use tch::{Kind, Tensor};

/// Runs COCOB on one parameter with the given gradient sequence (gradients injected
/// through the linear loss `sum(p * g)`); returns the final parameter.
fn run(init: &[f64], grads: &[Vec<f64>], config: CocobConfig) -> Tensor {
    let p = Tensor::from_slice(init).set_requires_grad(true);
    let mut opt = Cocob::new([("p", p.shallow_clone())], config).expect("opt");
    for g in grads {
        opt.zero_grad();
        (&p * Tensor::from_slice(g)).sum(None).backward();
        opt.step().expect("step");
    }
    p.detach().copy()
}

fn vecs(n: usize, steps: usize) -> impl Strategy<Value = (Vec<f64>, Vec<Vec<f64>>)> {
    (
        prop::collection::vec(-3.0f64..3.0, n),
        prop::collection::vec(prop::collection::vec(-5.0f64..5.0, n), 1..steps),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Zero gradients never move the parameters.
    #[test]
    fn zero_gradient_keeps_parameters((init, grads) in vecs(6, 10)) {
        let zeros: Vec<Vec<f64>> = grads.iter().map(|g| vec![0.0; g.len()]).collect();
        let out = run(&init, &zeros, CocobConfig::default());
        let diff = (out - Tensor::from_slice(&init)).abs().max().double_value(&[]);
        prop_assert_eq!(diff, 0.0);
    }

    /// COCOB is scale-free: multiplying every gradient by c > 0 gives the same
    /// trajectory (exactly so up to the eps floor of L and rounding; tolerance 1e-9).
    #[test]
    fn invariant_to_gradient_scale((init, grads) in vecs(5, 12), c in 0.05f64..20.0) {
        // Keep gradients away from the eps floor so that the invariance is exact in theory.
        let grads: Vec<Vec<f64>> = grads
            .iter()
            .map(|g| g.iter().map(|x| if x.abs() < 1e-3 { 1e-3 } else { *x }).collect())
            .collect();
        let scaled: Vec<Vec<f64>> = grads.iter().map(|g| g.iter().map(|x| x * c).collect()).collect();
        let a = run(&init, &grads, CocobConfig::default());
        let b = run(&init, &scaled, CocobConfig::default());
        let diff = (a - b).abs().max().double_value(&[]);
        prop_assert!(diff <= 1e-9, "max |Δ| = {:e}", diff);
    }

    /// Coordinates are independent: permuting coordinates of parameters and gradients
    /// permutes the result.
    #[test]
    fn coordinatewise((init, grads) in vecs(4, 8)) {
        let rev = |v: &[f64]| v.iter().rev().copied().collect::<Vec<_>>();
        let a = run(&init, &grads, CocobConfig::paper());
        let b = run(&rev(&init), &grads.iter().map(|g| rev(g)).collect::<Vec<_>>(), CocobConfig::paper());
        let diff = (a - b.flip([0])).abs().max().double_value(&[]);
        prop_assert_eq!(diff, 0.0);
    }
}

/// Save after 20 steps, load into a fresh optimizer over restored parameters, run 20
/// more: bit-identical to 40 uninterrupted steps (f32, α = 1000, MLP-like shapes).
#[test]
fn save_load_resumes_exactly() {
    tch::manual_seed(3);
    let shapes: [&[i64]; 2] = [&[4, 3], &[5]];
    let init: Vec<Tensor> = shapes
        .iter()
        .map(|s| Tensor::randn(*s, (Kind::Float, tch::Device::Cpu)))
        .collect();
    let targets: Vec<Tensor> = shapes
        .iter()
        .map(|s| Tensor::randn(*s, (Kind::Float, tch::Device::Cpu)))
        .collect();
    let names = ["w", "b"];
    let fresh = || -> Vec<Tensor> {
        init.iter()
            .map(|t| t.detach().copy().set_requires_grad(true))
            .collect()
    };
    let step = |opt: &mut Cocob, ps: &[Tensor]| {
        opt.zero_grad();
        let loss = ps
            .iter()
            .zip(&targets)
            .map(|(p, t)| ((p - t) * (p - t)).sum(None) + (p * p * p).sum(None) * 0.01)
            .fold(Tensor::from(0.0f32), |a, b| a + b);
        loss.backward();
        opt.step().expect("step");
    };
    // uninterrupted
    let ps = fresh();
    let mut opt = Cocob::new(
        names.iter().zip(&ps).map(|(n, p)| (*n, p.shallow_clone())),
        CocobConfig::paper(),
    )
    .expect("opt");
    for _ in 0..40 {
        step(&mut opt, &ps);
    }
    // interrupted
    let dir = tempfile::tempdir().expect("tempdir");
    let ps1 = fresh();
    let mut opt1 = Cocob::new(
        names.iter().zip(&ps1).map(|(n, p)| (*n, p.shallow_clone())),
        CocobConfig::paper(),
    )
    .expect("opt");
    for _ in 0..20 {
        step(&mut opt1, &ps1);
    }
    opt1.save(dir.path()).expect("save");
    let saved_params: Vec<Tensor> = ps1.iter().map(|p| p.detach().copy()).collect();
    drop(opt1);
    let ps2: Vec<Tensor> = saved_params
        .iter()
        .map(|p| p.detach().copy().set_requires_grad(true))
        .collect();
    let mut opt2 = Cocob::new(
        names.iter().zip(&ps2).map(|(n, p)| (*n, p.shallow_clone())),
        CocobConfig::default(),
    )
    .expect("opt");
    opt2.load(dir.path()).expect("load");
    assert_eq!(opt2.steps(), 20);
    assert_eq!(opt2.config(), &CocobConfig::paper());
    for _ in 0..20 {
        step(&mut opt2, &ps2);
    }
    for (a, b) in ps.iter().zip(&ps2) {
        assert!(a.equal(b), "resumed trajectory differs");
    }
    // and the run really moved
    assert!((&ps[0] - &init[0]).abs().max().double_value(&[]) > 1e-3);
}

/// Loading a state for different parameters names the parameter at fault.
#[test]
fn load_mismatch_is_typed_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = Tensor::zeros([3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let mut opt = Cocob::new([("a", p.shallow_clone())], CocobConfig::default()).expect("opt");
    (&p * 2.0).sum(None).backward();
    opt.step().expect("step");
    opt.save(dir.path()).expect("save");
    let q = Tensor::zeros([4], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let mut other = Cocob::new([("a", q)], CocobConfig::default()).expect("opt");
    match other.load(dir.path()) {
        Err(Error::StateMismatch { what, .. }) => assert!(what.contains("`a`"), "{what}"),
        other => panic!("expected StateMismatch, got {other:?}"),
    }
    let bad = CocobConfig {
        alpha: -1.0,
        ..CocobConfig::default()
    };
    assert!(matches!(
        Cocob::new([("a", p)], bad),
        Err(Error::InvalidConfig { field: "alpha", .. })
    ));
}

/// The state metadata round-trips through JSON.
#[test]
fn meta_roundtrip() {
    let meta = flowtune_cocob::CocobStateMeta {
        format: 1,
        config: CocobConfig::paper(),
        steps: 7,
        params: vec![flowtune_cocob::ParamMeta {
            name: "x".into(),
            shape: vec![2, 3],
            initialized: true,
        }],
    };
    let s = serde_json::to_string(&meta).expect("ser");
    let back: flowtune_cocob::CocobStateMeta = serde_json::from_str(&s).expect("de");
    assert_eq!(meta, back);
}
