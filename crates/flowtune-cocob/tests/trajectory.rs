//! COCOB trajectories against the `parameterfree` package (golden values computed by
//! `tests/reference/cocob_ref.py` in the project's `.venv`, run once per test binary).
//! Tolerances: max |Δparam| ≤ 1e-9 in f64, ≤ 1e-5 in f32, over all 50 steps.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use flowtune_cocob::{clip_grad_norm, Cocob, CocobConfig};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use tch::{Kind, Tensor};

fn root() -> PathBuf {
    std::env::var("FLOWTUNE_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

/// Runs the reference script once per test binary (the golden file lands in cargo's
/// target tmp dir); panics with a clear message when Python or the script is missing.
fn golden_path() -> &'static PathBuf {
    static GOLDEN: OnceLock<PathBuf> = OnceLock::new();
    GOLDEN.get_or_init(|| {
        let root = root();
        let python = root.join(".venv/bin/python");
        let script = root.join("tests/reference/cocob_ref.py");
        assert!(
            python.exists(),
            "reference Python interpreter missing at {} (run scripts/setup.sh)",
            python.display()
        );
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("cocob_golden_{}.safetensors", std::process::id()));
        let status = std::process::Command::new(&python)
            .arg(&script)
            .arg(&out)
            .status()
            .expect("spawn reference python");
        assert!(status.success(), "{} failed: {status}", script.display());
        out
    })
}

thread_local! {
    static TENSORS: HashMap<String, Tensor> = Tensor::read_safetensors(golden_path())
        .expect("read golden safetensors")
        .into_iter()
        .collect();
}

fn g(key: &str) -> Tensor {
    TENSORS.with(|t| {
        t.get(key)
            .unwrap_or_else(|| panic!("golden file lacks `{key}`"))
            .shallow_clone()
    })
}

fn quadratic_loss(p: &HashMap<&str, Tensor>, case: &str) -> Tensor {
    let a = g(&format!("{case}/data/A"));
    let c = g(&format!("{case}/data/c"));
    let d = &p["x"] - &c;
    d.dot(&a.mv(&d)) * 0.5
}

fn mlp_loss(p: &HashMap<&str, Tensor>, case: &str) -> Tensor {
    let x = g(&format!("{case}/data/X"));
    let y = g(&format!("{case}/data/y"));
    let h = (x.matmul(&p["w1"].tr()) + &p["b1"]).tanh();
    let out = h.matmul(&p["w2"].tr()) + &p["b2"];
    let d = out - y;
    (&d * &d).mean(None)
}

fn check_case(problem: &str, dtype: &str, alpha: f64) {
    tch::set_num_threads(1);
    let case = format!("{problem}_{dtype}_a{}", alpha as i64);
    let names: &[&str] = if problem == "quadratic" {
        &["x"]
    } else {
        &["w1", "b1", "w2", "b2"]
    };
    let tol = if dtype == "f64" { 1e-9 } else { 1e-5 };
    let trajs: HashMap<&str, Tensor> = names
        .iter()
        .map(|n| (*n, g(&format!("{case}/traj/{n}"))))
        .collect();
    let params: HashMap<&str, Tensor> = names
        .iter()
        .map(|n| (*n, trajs[n].get(0).detach().copy().set_requires_grad(true)))
        .collect();
    let expected_kind = if dtype == "f64" {
        Kind::Double
    } else {
        Kind::Float
    };
    assert_eq!(params[names[0]].kind(), expected_kind);
    let mut opt = Cocob::new(
        names.iter().map(|n| (*n, params[n].shallow_clone())),
        CocobConfig {
            alpha,
            ..CocobConfig::default()
        },
    )
    .expect("optimizer");
    let losses = g(&format!("{case}/loss"));
    for step in 0..50 {
        opt.zero_grad();
        let loss = if problem == "quadratic" {
            quadratic_loss(&params, &case)
        } else {
            mlp_loss(&params, &case)
        };
        let want_loss = losses.double_value(&[step]);
        let got_loss = loss.double_value(&[]);
        assert!(
            (got_loss - want_loss).abs() <= tol * want_loss.abs().max(1.0),
            "{case} step {step}: loss {got_loss} vs reference {want_loss}"
        );
        loss.backward();
        opt.step().expect("step");
        for n in names {
            let want = trajs[n].get(step + 1);
            let diff = (&params[n] - &want).abs().max().double_value(&[]);
            assert!(
                diff <= tol,
                "{case} step {} param {n}: max |Δ| = {diff:e} > {tol:e}",
                step + 1
            );
        }
    }
    // The trajectory must be non-trivial for the comparison to mean anything.
    let moved = names
        .iter()
        .map(|n| {
            (&params[*n] - trajs[n].get(0))
                .abs()
                .max()
                .double_value(&[])
        })
        .fold(0.0, f64::max);
    assert!(moved > 1e-3, "{case}: parameters barely moved ({moved:e})");
}

#[test]
fn quadratic_f64_alpha100() {
    check_case("quadratic", "f64", 100.0);
}
#[test]
fn quadratic_f64_alpha1000() {
    check_case("quadratic", "f64", 1000.0);
}
#[test]
fn quadratic_f32_alpha100() {
    check_case("quadratic", "f32", 100.0);
}
#[test]
fn quadratic_f32_alpha1000() {
    check_case("quadratic", "f32", 1000.0);
}
#[test]
fn mlp_f64_alpha100() {
    check_case("mlp", "f64", 100.0);
}
#[test]
fn mlp_f64_alpha1000() {
    check_case("mlp", "f64", 1000.0);
}
#[test]
fn mlp_f32_alpha100() {
    check_case("mlp", "f32", 100.0);
}
#[test]
fn mlp_f32_alpha1000() {
    check_case("mlp", "f32", 1000.0);
}

/// `clip_grad_norm` equals `torch.nn.utils.clip_grad_norm_` (f64, 1e-12).
#[test]
fn clip_grad_norm_matches_torch() {
    for k in 0..4 {
        let params: Vec<Tensor> = (0..3)
            .map(|i| {
                let gr = g(&format!("clip/{k}/grad_{i}"));
                let p = gr.zeros_like().set_requires_grad(true);
                // Give p the gradient `gr` through a linear function.
                (&p * &gr).sum(None).backward();
                p
            })
            .collect();
        let max_norm = g(&format!("clip/{k}/max_norm")).double_value(&[0]);
        let total = clip_grad_norm(&params, max_norm).expect("clip");
        let want_total = g(&format!("clip/{k}/total_norm")).double_value(&[0]);
        assert!(
            (total - want_total).abs() <= 1e-12 * want_total.max(1.0),
            "case {k}: {total} vs {want_total}"
        );
        for (i, p) in params.iter().enumerate() {
            let want = g(&format!("clip/{k}/clipped_{i}"));
            let diff = (p.grad() - want).abs().max().double_value(&[]);
            assert!(diff <= 1e-12, "case {k} grad {i}: max |Δ| = {diff:e}");
        }
    }
}
