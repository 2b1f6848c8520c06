//! flowtune-loss against the project's reference script `tests/reference/loss_ref.py`
//! (TRL 1.16's sigmoid DPO formula from `DPOTrainer._compute_loss` with pair weights,
//! TRL's `selective_log_softmax` for log-probs, torch autograd for gradients; all f64).
//! Tolerance: 1e-6 absolute (relative for values above 1) on losses, log-probs, grads.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use flowtune_loss::{completion_logprobs, dpo_loss, label_logprobs, label_nll, nll_loss};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use tch::{Kind, Tensor};

const TOL: f64 = 1e-6;

fn root() -> PathBuf {
    std::env::var("FLOWTUNE_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

/// Runs the reference script once per test binary; fails clearly when Python is missing.
fn golden_path() -> &'static PathBuf {
    static GOLDEN: OnceLock<PathBuf> = OnceLock::new();
    GOLDEN.get_or_init(|| {
        let root = root();
        let python = root.join(".venv/bin/python");
        let script = root.join("tests/reference/loss_ref.py");
        assert!(
            python.exists(),
            "reference Python interpreter missing at {} (run scripts/setup.sh)",
            python.display()
        );
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("loss_golden_{}.safetensors", std::process::id()));
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

fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.size(), want.size(), "{what}: shape");
    let got = got.to_kind(Kind::Double);
    let want = want.to_kind(Kind::Double);
    let scale = want.abs().clamp_min(1.0);
    let err = ((&got - &want).abs() / scale).max().double_value(&[]);
    assert!(
        err <= TOL,
        "{what}: max relative error {err:e} > {TOL:e}\n got {got}\n want {want}"
    );
}

fn leaf(t: &Tensor) -> Tensor {
    t.detach().copy().set_requires_grad(true)
}

#[test]
fn dpo_loss_and_grads_match_trl_formula() {
    let count = g("dpo/count").double_value(&[0]) as usize;
    assert!(count >= 6);
    for k in 0..count {
        let p = |n: &str| g(&format!("dpo/{k}/{n}"));
        let (pc, pr, rc, rr) = (
            leaf(&p("pc")),
            leaf(&p("pr")),
            leaf(&p("rc")),
            leaf(&p("rr")),
        );
        let beta = p("beta").double_value(&[0]);
        let (loss, stats) = dpo_loss(&pc, &pr, &rc, &rr, &p("w"), beta).expect("dpo_loss");
        assert!(
            loss.double_value(&[]).is_finite(),
            "case {k}: loss not finite"
        );
        assert_close(&format!("case {k} loss"), &loss.reshape([1]), &p("loss"));
        loss.backward();
        assert_close(&format!("case {k} grad chosen"), &pc.grad(), &p("grad_pc"));
        assert_close(
            &format!("case {k} grad rejected"),
            &pr.grad(),
            &p("grad_pr"),
        );
        // The reference is under no_grad.
        assert!(!rc.grad().defined() || rc.grad().abs().max().double_value(&[]) == 0.0);
        let s = p("stats");
        let want = [
            s.double_value(&[0]),
            s.double_value(&[1]),
            s.double_value(&[2]),
            s.double_value(&[3]),
        ];
        let got = [
            stats.reward_chosen,
            stats.reward_rejected,
            stats.reward_margin,
            stats.accuracy,
        ];
        for (i, (a, b)) in got.iter().zip(want.iter()).enumerate() {
            assert!(
                (a - b).abs() <= TOL * b.abs().max(1.0),
                "case {k} stat {i}: {a} vs {b}"
            );
        }
        assert_eq!(stats.pairs, 8);
    }
}

#[test]
fn completion_logprobs_match_trl_selective_log_softmax() {
    let logits = leaf(&g("seq/logits"));
    let targets = g("seq/targets");
    let mask = g("seq/mask");
    let lp = completion_logprobs(&logits, &targets, &mask).expect("logprobs");
    assert_close("summed completion log-probs", &lp, &g("seq/logps"));
    (&lp * g("seq/coef")).sum(None).backward();
    assert_close("grad wrt logits", &logits.grad(), &g("seq/grad_logits"));
    // Same in f32 (looser: f32 rounding, 1e-4).
    let lp32 =
        completion_logprobs(&g("seq/logits").to_kind(Kind::Float), &targets, &mask).expect("f32");
    let err = (lp32.to_kind(Kind::Double) - g("seq/logps"))
        .abs()
        .max()
        .double_value(&[]);
    assert!(err <= 1e-4, "f32 log-probs off by {err:e}");
}

#[test]
fn nll_matches_reference() {
    let logits = leaf(&g("seq/logits"));
    let (loss, stats) =
        nll_loss(&logits, &g("seq/targets"), &g("seq/mask"), &g("nll/w")).expect("nll");
    assert_close("nll loss", &loss.reshape([1]), &g("nll/loss"));
    assert_eq!(stats.tokens, 5 + 3 + 3);
    loss.backward();
    assert_close("nll grad", &logits.grad(), &g("nll/grad_logits"));
}

#[test]
fn label_nll_matches_reference() {
    let logits = leaf(&g("label/logits"));
    let ids: Vec<i64> = Vec::try_from(&g("label/ids")).expect("ids");
    let lp = label_logprobs(&logits, &ids).expect("label logprobs");
    assert_close("label log-probs", &lp, &g("label/logp"));
    let (loss, _stats) =
        label_nll(&logits, &ids, &g("label/targets"), &g("label/w")).expect("label nll");
    assert_close("label loss", &loss.reshape([1]), &g("label/loss"));
    loss.backward();
    assert_close("label grad", &logits.grad(), &g("label/grad_logits"));
}
