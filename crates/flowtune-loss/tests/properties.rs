//! Properties of the losses (proptest): zero weight gives zero gradient, swapping
//! chosen and rejected flips the gradient's sign, losses stay finite at extreme inputs,
//! and the half-precision path equals the f32 path on upcast logits.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use flowtune_loss::{completion_logprobs, dpo_loss, label_nll, nll_loss, Error};
use proptest::prelude::*;
use tch::{Kind, Tensor};

fn leaf(v: &[f64]) -> Tensor {
    Tensor::from_slice(v).set_requires_grad(true)
}

fn logps(n: usize, scale: f64) -> impl Strategy<Value = Vec<f64>> {
    prop::collection::vec(-scale..0.0f64, n)
}

fn grads(
    pc: &[f64],
    pr: &[f64],
    rc: &[f64],
    rr: &[f64],
    w: &[f64],
    beta: f64,
) -> (f64, Tensor, Tensor) {
    let (tpc, tpr) = (leaf(pc), leaf(pr));
    let (loss, _) = dpo_loss(
        &tpc,
        &tpr,
        &Tensor::from_slice(rc),
        &Tensor::from_slice(rr),
        &Tensor::from_slice(w),
        beta,
    )
    .expect("dpo");
    let value = loss.double_value(&[]);
    loss.backward();
    (value, tpc.grad(), tpr.grad())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Pairs with zero weight get exactly zero gradient; others are untouched by them.
    #[test]
    fn zero_weight_zero_gradient(
        pc in logps(6, 100.0), pr in logps(6, 100.0), rc in logps(6, 100.0), rr in logps(6, 100.0),
        w in prop::collection::vec(0.0f64..3.0, 6), zero in 0usize..6, beta in 0.05f64..5.0,
    ) {
        let mut w = w;
        w[zero] = 0.0;
        let (_, gc, gr) = grads(&pc, &pr, &rc, &rr, &w, beta);
        prop_assert_eq!(gc.double_value(&[zero as i64]), 0.0);
        prop_assert_eq!(gr.double_value(&[zero as i64]), 0.0);
    }

    /// Swapping chosen with rejected (policy and reference) flips the sign of the
    /// gradient on each sequence's log-prob: the sequence pushed up becomes pushed down.
    /// When the policy equals the reference (the first step of online DPO) the flip is
    /// exact: the same magnitude.
    #[test]
    fn swap_flips_gradient(
        pc in logps(5, 80.0), pr in logps(5, 80.0), rc in logps(5, 80.0), rr in logps(5, 80.0),
        w in prop::collection::vec(0.0f64..3.0, 5), beta in 0.05f64..5.0,
    ) {
        let (_, gc, gr) = grads(&pc, &pr, &rc, &rr, &w, beta);
        // swapped: the old chosen sequence is now in the rejected slot
        let (_, sgc, sgr) = grads(&pr, &pc, &rr, &rc, &w, beta);
        for i in 0..5i64 {
            let (a, b) = (gc.double_value(&[i]), sgr.double_value(&[i]));
            let (c, d) = (gr.double_value(&[i]), sgc.double_value(&[i]));
            prop_assert!(a <= 0.0 && b >= 0.0 && c >= 0.0 && d <= 0.0, "{} {} {} {}", a, b, c, d);
            let x = beta * ((pc[i as usize] - pr[i as usize]) - (rc[i as usize] - rr[i as usize]));
            if w[i as usize] > 1e-6 && x.abs() < 30.0 {
                prop_assert!(a < 0.0 && b > 0.0, "no strict flip at x = {}", x);
            }
        }
        // policy == reference: exact flip
        let (_, gc0, _) = grads(&pc, &pr, &pc, &pr, &w, beta);
        let (_, _, sgr0) = grads(&pr, &pc, &pr, &pc, &w, beta);
        let e = (&gc0 + &sgr0).abs().max().double_value(&[]);
        prop_assert!(e <= 1e-15, "{}", e);
    }

    /// The DPO loss and its gradients stay finite for extreme log-probs (up to ±1e30).
    #[test]
    fn dpo_finite_at_extremes(
        v in prop::collection::vec(prop_oneof![-1e30f64..1e30, -1e6f64..1e6, Just(0.0)], 16),
        beta in 0.01f64..100.0,
    ) {
        for kind in [Kind::Double, Kind::Float] {
            let t = |i: usize| Tensor::from_slice(&v[i * 4..i * 4 + 4]).to_kind(kind);
            let (pc, pr) = (t(0).set_requires_grad(true), t(1).set_requires_grad(true));
            let (loss, stats) = dpo_loss(&pc, &pr, &t(2), &t(3), &Tensor::ones([4], (kind, tch::Device::Cpu)), beta)
                .expect("dpo");
            loss.backward();
            let finite = |x: &Tensor| x.isfinite().all().int64_value(&[]) == 1;
            // Differences of ±1e30 values overflow f32 to ±inf; the loss may then be inf
            // but never NaN. In f64 everything stays finite.
            if kind == Kind::Double {
                prop_assert!(finite(&loss) && finite(&pc.grad()) && finite(&pr.grad()), "{:?}", stats);
            } else {
                prop_assert!(loss.isnan().int64_value(&[]) == 0, "f32 loss is NaN");
                prop_assert!(pc.grad().isnan().any().int64_value(&[]) == 0, "f32 grad has NaN");
            }
            prop_assert!(loss.double_value(&[]) >= 0.0);
        }
    }

    /// Token log-probs stay finite (and ≤ 0) for extreme logits, f32 and bf16.
    #[test]
    fn logprobs_finite_at_extremes(
        scale in prop_oneof![Just(1.0f64), Just(1e3), Just(1e4), Just(3e4)],
        seed in 0i64..1000,
    ) {
        tch::manual_seed(seed);
        let logits = (Tensor::randn([2, 5, 40], (Kind::Float, tch::Device::Cpu)) * scale).set_requires_grad(true);
        let targets = Tensor::randint(40, [2, 5], (Kind::Int64, tch::Device::Cpu));
        let mask = Tensor::ones([2, 5], (Kind::Bool, tch::Device::Cpu));
        let lp = completion_logprobs(&logits, &targets, &mask).expect("lp");
        prop_assert!(lp.isfinite().all().int64_value(&[]) == 1);
        prop_assert!(lp.max().double_value(&[]) <= 0.0);
        let (nll, _) = nll_loss(&logits, &targets, &mask, &Tensor::ones([2], (Kind::Float, tch::Device::Cpu))).expect("nll");
        nll.backward();
        prop_assert!(logits.grad().isfinite().all().int64_value(&[]) == 1);
        let lp16 = completion_logprobs(&logits.detach().to_kind(Kind::BFloat16), &targets, &mask).expect("bf16");
        prop_assert!(lp16.isfinite().all().int64_value(&[]) == 1);
        let (lab, _) = label_nll(&logits.detach().get(0), &[1, 2, 3], &Tensor::from_slice(&[0i64, 1, 2, 0, 1]), &Tensor::ones([5], (Kind::Float, tch::Device::Cpu))).expect("label");
        prop_assert!(lab.isfinite().all().int64_value(&[]) == 1);
    }

    /// The bf16 path (row-wise upcast) equals the f32 path on the upcast logits.
    #[test]
    fn bf16_path_equals_f32_on_upcast(seed in 0i64..1000) {
        tch::manual_seed(seed);
        let logits = (Tensor::randn([3, 6, 64], (Kind::Float, tch::Device::Cpu)) * 5).to_kind(Kind::BFloat16);
        let targets = Tensor::randint(64, [3, 6], (Kind::Int64, tch::Device::Cpu));
        let mask = Tensor::randint(2, [3, 6], (Kind::Int64, tch::Device::Cpu));
        let a = completion_logprobs(&logits, &targets, &mask).expect("bf16");
        let b = completion_logprobs(&logits.to_kind(Kind::Float), &targets, &mask).expect("f32");
        prop_assert_eq!(a.kind(), Kind::Float);
        let err = (a - b).abs().max().double_value(&[]);
        prop_assert!(err <= 1e-5, "{}", err);
    }
}

/// Masked positions never matter: changing prompt/padding logits or targets (even to
/// out-of-vocabulary ids like -100) leaves the result unchanged.
#[test]
fn masked_positions_are_ignored() {
    tch::manual_seed(0);
    let logits = Tensor::randn([2, 4, 10], (Kind::Double, tch::Device::Cpu));
    let targets = Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6, 7, 8]).reshape([2, 4]);
    let mask = Tensor::from_slice(&[0i64, 1, 1, 0, 0, 0, 1, 1]).reshape([2, 4]);
    let a = completion_logprobs(&logits, &targets, &mask).expect("a");
    let masked = mask.eq(0);
    let targets2 = targets.masked_fill(&masked, -100);
    let logits2 = logits.masked_fill(&masked.unsqueeze(-1), 1e9);
    let b = completion_logprobs(&logits2, &targets2, &mask).expect("b");
    assert!(a.equal(&b));
}

/// Bad inputs are typed errors, not panics.
#[test]
fn bad_inputs_are_typed_errors() {
    let logits = Tensor::zeros([1, 2, 5], (Kind::Float, tch::Device::Cpu));
    let mask = Tensor::ones([1, 2], (Kind::Int64, tch::Device::Cpu));
    let bad = Tensor::from_slice(&[1i64, 9]).reshape([1, 2]);
    assert!(matches!(
        completion_logprobs(&logits, &bad, &mask),
        Err(Error::Index {
            arg: "targets",
            index: 9,
            bound: 5
        })
    ));
    let wrong_shape = Tensor::zeros([1, 3], (Kind::Int64, tch::Device::Cpu));
    assert!(matches!(
        completion_logprobs(&logits, &wrong_shape, &mask),
        Err(Error::Shape { arg: "targets", .. })
    ));
    let v = Tensor::zeros([2], (Kind::Float, tch::Device::Cpu));
    let neg = Tensor::from_slice(&[1.0f32, -1.0]);
    assert!(matches!(
        dpo_loss(&v, &v, &v, &v, &neg, 1.0),
        Err(Error::Value { arg: "weights", .. })
    ));
    assert!(matches!(
        dpo_loss(&v, &v, &v, &v, &v, 0.0),
        Err(Error::Value { arg: "beta", .. })
    ));
    let next = Tensor::zeros([2, 5], (Kind::Float, tch::Device::Cpu));
    let t = Tensor::from_slice(&[0i64, 2]);
    assert!(matches!(
        label_nll(&next, &[1, 2], &t, &v),
        Err(Error::Index {
            arg: "targets",
            index: 2,
            bound: 2
        })
    ));
    assert!(matches!(
        label_nll(&next, &[1, 7], &t, &v),
        Err(Error::Index {
            arg: "label_ids",
            index: 7,
            bound: 5
        })
    ));
}

/// Stats round-trip through serde.
#[test]
fn stats_roundtrip() {
    let s = flowtune_loss::DpoStats {
        loss: 0.5,
        pairs: 3,
        weight_sum: 2.0,
        reward_chosen: 0.1,
        reward_rejected: -0.2,
        reward_margin: 0.3,
        accuracy: 1.0,
    };
    let back: flowtune_loss::DpoStats =
        serde_json::from_str(&serde_json::to_string(&s).expect("ser")).expect("de");
    assert_eq!(s, back);
}
