//! The toy tabular learner: each update moves the policy the way its loss says, references lerp
//! exactly, and state saves and loads losslessly.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use flowtune_graph::{Backend, CallSpec, Message, NodeId, NodeRequest};
use flowtune_rollout::toy::{prompt_text, TabularPolicy};
use flowtune_rollout::{Feedback, Label, Learner, Preference};
use proptest::prelude::*;

const LABELS: [&str; 3] = ["l0", "l1", "l2"];

fn request() -> NodeRequest {
    NodeRequest {
        node: NodeId::from("n"),
        adapter: None,
        messages: vec![Message::user("prompt")],
        call: CallSpec::Classify {
            labels: LABELS.iter().map(|s| s.to_string()).collect(),
        },
    }
}

fn logprobs(policy: &mut TabularPolicy) -> Vec<f64> {
    policy.run_batch(&[request()]).expect("batch")[0]
        .outputs
        .iter()
        .map(|c| c.logprob)
        .collect()
}

fn ids(s: &str) -> Vec<u32> {
    s.bytes().map(u32::from).collect()
}

proptest! {
    #[test]
    fn preference_step_raises_the_chosen_margin(inits in prop::collection::vec(-3.0f64..3.0, 3), c in 0usize..3, d in 1usize..3, w in 0.01f64..2.0) {
        let r = (c + d) % 3;
        let mut p = TabularPolicy::new(0.3, 1.0);
        for (l, v) in LABELS.iter().zip(&inits) { p = p.with_init("n", l, *v); }
        let before = logprobs(&mut p);
        let prompt_ids = ids(&prompt_text(&request().messages));
        let pref = Feedback::Preference(Preference {
            node: "n".into(), episode: 0, step: 0, prompt_ids,
            chosen: ids(LABELS[c]), rejected: ids(LABELS[r]),
            chosen_text: LABELS[c].into(), rejected_text: LABELS[r].into(), weight: w,
        });
        let stats = p.learn(&NodeId::from("n"), &[pref]).expect("learn");
        // At the reference the DPO loss is w·ln 2 (margin 0).
        prop_assert!((stats.loss - w * std::f64::consts::LN_2).abs() < 1e-12);
        let after = logprobs(&mut p);
        prop_assert!(after[c] - after[r] > before[c] - before[r]);
    }

    #[test]
    fn label_step_raises_the_gold_logprob(inits in prop::collection::vec(-3.0f64..3.0, 3), y in 0usize..3) {
        let mut p = TabularPolicy::new(0.3, 1.0);
        for (l, v) in LABELS.iter().zip(&inits) { p = p.with_init("n", l, *v); }
        let before = logprobs(&mut p);
        let label = Feedback::Label(Label {
            node: "n".into(), episode: 0, step: 0, prompt_ids: ids(&prompt_text(&request().messages)),
            labels: LABELS.iter().map(|s| s.to_string()).collect(), label_ids: LABELS.iter().map(|s| ids(s)).collect(),
            label: y, weight: 1.0,
        });
        let stats = p.learn(&NodeId::from("n"), &[label]).expect("learn");
        prop_assert!((stats.loss + before[y]).abs() < 1e-12);
        prop_assert!(logprobs(&mut p)[y] > before[y]);
    }
}

#[test]
fn reference_lerps_and_state_round_trips() {
    let mut p = TabularPolicy::new(0.3, 1.0).with_init("n", "l0", 1.0);
    logprobs(&mut p);
    let key = p.state.borrow().logits.keys().next().expect("row").clone();
    p.state
        .borrow_mut()
        .logits
        .get_mut(&key)
        .expect("row")
        .insert("l0".into(), 3.0);
    p.update_reference(&NodeId::from("n"), 0.5).expect("update");
    assert_eq!(p.state.borrow().reference[&key]["l0"], 2.0);
    let dir = tempfile::tempdir().expect("tempdir");
    p.save(dir.path()).expect("save");
    let mut q = TabularPolicy::new(0.0, 0.0);
    q.load(dir.path()).expect("load");
    assert_eq!(*q.state.borrow(), *p.state.borrow());
    assert!(q.load(&dir.path().join("missing")).is_err());
}
