//! The node learner on the real test model (SmolLM2-135M-Instruct GGUF, f32, CPU).
//!
//! - Completion log-prob parity with transformers + PEFT (`tests/reference/loss_ref.py
//!   parity`): summed log-probs of chat (prompt, chosen, rejected) triples, completion =
//!   assistant content tokens + `<|im_end|>`; base and a PEFT LoRA adapter (r=8, rsLoRA,
//!   q/v, nonzero B) loaded through the LoRA crate; both prompt-sharing strategies.
//!   Tolerance 1e-3 absolute on each summed log-prob.
//! - 20 learner steps: DPO margin from 0 to clearly positive, NLL falls, p(label)
//!   rises; the reference adapter and the base stay bit-identical; every trainable
//!   tensor changes. Exact resume through save/load.
//! - LoRA dropout in supervised steps only (not DPO by default, never in evaluation).
//!
//! These tests FAIL (never skip) when the model or the Python reference is missing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use flowtune::learner::{
    completion_logprobs, LabelRecord, LearnerConfig, NodeLearner, NodeRecords, PreferencePair,
    PromptSharing, TargetRecord,
};
use flowtune_lm::loader::{load, LoadOptions, LoadedModel};
use flowtune_lm::model::Model;
use flowtune_lm::ChatMessage;
use flowtune_lora::{AdapterBank, LoraConfig, Module};
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

fn root() -> PathBuf {
    std::env::var("FLOWTUNE_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

fn load_model() -> (LoadedModel, Model) {
    let path = flowtune_lm::locate_test_model().unwrap_or_else(|e| panic!("{e}"));
    let loaded = load(
        &path,
        &LoadOptions {
            device: Device::Cpu,
            dtype: Kind::Float,
            ..Default::default()
        },
    )
    .expect("load test model");
    let model = Model::new(&loaded.config, &loaded.weights).expect("model");
    (loaded, model)
}

fn bank_for(loaded: &LoadedModel) -> AdapterBank {
    let c = &loaded.config;
    AdapterBank::new(c.lora_base_shapes(), Device::Cpu)
}

fn prompt(loaded: &LoadedModel, user: &str) -> Vec<u32> {
    loaded
        .tokenizer
        .encode_chat(
            &[
                ChatMessage::new("system", "You are a helpful assistant."),
                ChatMessage::new("user", user),
            ],
            true,
        )
        .expect("chat template")
}

fn completion(loaded: &LoadedModel, text: &str) -> Vec<u32> {
    let mut ids = loaded.tokenizer.encode(text).expect("encode");
    ids.push(
        loaded
            .tokenizer
            .token_to_id("<|im_end|>")
            .expect("<|im_end|> in vocab"),
    );
    ids
}

fn snapshot(bank: &AdapterBank, name: &str) -> Vec<(String, Tensor)> {
    bank.get(name)
        .expect("adapter")
        .named_tensors()
        .into_iter()
        .map(|(k, t)| (k, t.detach().copy()))
        .collect()
}

fn base_probe(model: &Model) -> Tensor {
    let ids = Tensor::from_slice(&[1i64, 9690, 198, 2683, 359, 253, 5356]).view([1, 7]);
    tch::no_grad(|| model.forward(&ids, &ids.ones_like(), None)).expect("probe forward")
}

fn new_node(bank: &mut AdapterBank) {
    bank.add(
        "node",
        &LoraConfig::rslora(8, 16.0, &[Module::QProj, Module::VProj]),
        11,
    )
    .expect("add node");
}

/// libtorch's global random generator: the dropout test seeds it and replays its draws, so
/// no other test here may draw while it runs (tests run on parallel threads).
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn rng() -> std::sync::MutexGuard<'static, ()> {
    RNG.lock().unwrap_or_else(|p| p.into_inner())
}

/// A bank whose trainable adapter `node` has B ~ N(0, 0.02²), so gradients reach A too.
fn trainable_node_with_random_b(loaded: &LoadedModel) -> AdapterBank {
    let mut bank = bank_for(loaded);
    new_node(&mut bank);
    let _rng = rng();
    bank.modify("node", |a| {
        let sites: Vec<_> = a.sites().copied().collect();
        for s in sites {
            if let Some(w) = a.weights_mut(&s) {
                w.b.copy_(&(Tensor::randn(w.b.size(), (Kind::Float, Device::Cpu)) * 0.02));
            }
        }
    })
    .expect("modify");
    bank.set_trainable("node").expect("trainable");
    bank
}

#[test]
fn completion_logprobs_match_transformers_peft() {
    let root = root();
    let python = root.join(".venv/bin/python");
    assert!(
        python.exists(),
        "reference Python missing at {} (run scripts/setup.sh)",
        python.display()
    );
    let model_path = flowtune_lm::locate_test_model().unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().expect("tempdir");
    let status = std::process::Command::new(&python)
        .arg(root.join("tests/reference/loss_ref.py"))
        .arg("parity")
        .arg(&model_path)
        .arg(dir.path())
        .status()
        .expect("spawn python");
    assert!(status.success(), "loss_ref.py parity failed: {status}");
    let golden: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("parity.json")).expect("parity.json"),
    )
    .expect("json");
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .expect("ids")
            .iter()
            .map(|x| x.as_u64().expect("id") as u32)
            .collect()
    };
    let records: Vec<(Vec<u32>, Vec<u32>, Vec<u32>)> = golden["records"]
        .as_array()
        .expect("records")
        .iter()
        .map(|r| (ids(&r["prompt"]), ids(&r["chosen"]), ids(&r["rejected"])))
        .collect();
    let (loaded, model) = load_model();
    // Our tokenizer agrees with transformers' on the prompts (token ids are the truth,
    // but a mismatch here would mean the two sides read different inputs elsewhere).
    let first_prompt = prompt(&loaded, "What is the capital of France?");
    assert_eq!(
        first_prompt, records[0].0,
        "chat-template prompt ids differ from transformers'"
    );
    let mut bank = bank_for(&loaded);
    bank.load_peft("peft", dir.path().join("peft_adapter"))
        .expect("load PEFT adapter");
    let peft = flowtune::learner::BankDelta::all(&bank, "peft").expect("delta");
    let groups: Vec<(&[u32], Vec<&[u32]>)> = records
        .iter()
        .map(|(p, c, r)| (p.as_slice(), vec![c.as_slice(), r.as_slice()]))
        .collect();
    let mut worst: f64 = 0.0;
    for sharing in [PromptSharing::SharedKv, PromptSharing::Concatenate] {
        for (key, delta) in [
            ("base", None),
            ("peft", Some(&peft as &dyn flowtune_lm::model::LinearDelta)),
        ] {
            let lp = tch::no_grad(|| completion_logprobs(&model, delta, &groups, sharing))
                .expect("logprobs");
            let got: Vec<f64> = Vec::try_from(lp.to_kind(Kind::Double)).expect("vec");
            let want: Vec<f64> = golden[key]
                .as_array()
                .expect("golden")
                .iter()
                .flat_map(|row| {
                    row.as_array()
                        .expect("row")
                        .iter()
                        .map(|x| x.as_f64().expect("f64"))
                })
                .collect();
            assert_eq!(got.len(), want.len());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let err = (g - w).abs();
                worst = worst.max(err);
                assert!(
                    err <= 1e-3,
                    "{sharing:?} {key} completion {i}: {g} vs transformers {w} (|Δ| {err:e})"
                );
            }
        }
    }
    eprintln!("completion log-prob parity: worst |Δ| = {worst:e}");
}

#[test]
fn dpo_steps_raise_margin_and_touch_only_the_node() {
    let (loaded, model) = load_model();
    let mut bank = bank_for(&loaded);
    new_node(&mut bank);
    let pairs = vec![
        PreferencePair {
            prompt: prompt(&loaded, "What is the capital of France?"),
            chosen: completion(&loaded, "Paris."),
            rejected: completion(&loaded, "The capital of France is Lyon."),
            weight: 1.0,
        },
        PreferencePair {
            prompt: prompt(&loaded, "Is 7 a prime number? Answer briefly."),
            chosen: completion(&loaded, "Yes, 7 is prime."),
            rejected: completion(&loaded, "No."),
            weight: 0.5,
        },
        PreferencePair {
            prompt: prompt(&loaded, "Say hello."),
            chosen: completion(&loaded, "Hello!"),
            rejected: completion(&loaded, "Goodbye."),
            weight: 0.0, // dropped
        },
    ];
    let records = NodeRecords::Preferences(pairs);
    let mut learner =
        NodeLearner::new(&mut bank, "node", LearnerConfig::default()).expect("learner");
    let node_before = snapshot(&bank, "node");
    let ref_before = snapshot(&bank, "node.ref");
    let probe_before = base_probe(&model);
    let base_before: Vec<(String, Tensor)> = loaded
        .weights
        .names()
        .iter()
        .map(|n| (n.to_string(), loaded.weights.get(n).expect("w").copy()))
        .collect();
    let before = learner.evaluate(&model, &bank, &records).expect("evaluate");
    let dpo0 = before.dpo.expect("dpo stats");
    assert_eq!(before.records, 2);
    assert_eq!(before.dropped, 1);
    assert!(
        dpo0.reward_margin.abs() < 1e-6,
        "policy == reference at start, margin {}",
        dpo0.reward_margin
    );
    assert!(
        (before.loss - 0.75 * std::f64::consts::LN_2).abs() < 1e-5,
        "loss {} at start",
        before.loss
    );
    let mut margins = vec![];
    for _ in 0..20 {
        let s = learner.step(&model, &mut bank, &records).expect("step");
        assert!(s.loss.is_finite() && s.grad_norm.is_finite());
        margins.push(s.dpo.expect("dpo").reward_margin);
    }
    let after = learner
        .evaluate(&model, &bank, &records)
        .expect("evaluate")
        .dpo
        .expect("dpo");
    eprintln!(
        "DPO margins per step: {margins:.3?}; after 20 steps: margin {:.3}, accuracy {}",
        after.reward_margin, after.accuracy
    );
    assert!(
        after.reward_margin > 1.0,
        "margin after 20 steps {} is not clearly positive",
        after.reward_margin
    );
    assert_eq!(after.accuracy, 1.0);
    // reference and base unchanged, bit for bit
    for ((k, a), (_, b)) in ref_before.iter().zip(snapshot(&bank, "node.ref")) {
        assert!(a.equal(&b), "reference tensor {k} changed");
    }
    for (k, t) in &base_before {
        assert!(
            t.equal(&loaded.weights.get(k).expect("w")),
            "base tensor {k} changed"
        );
    }
    assert!(
        probe_before.equal(&base_probe(&model)),
        "base logits changed"
    );
    // every trainable tensor changed
    for ((k, a), (_, b)) in node_before.iter().zip(snapshot(&bank, "node")) {
        assert!(!a.equal(&b), "trainable tensor {k} did not change");
    }
}

#[test]
fn target_steps_lower_nll() {
    let (loaded, model) = load_model();
    let mut bank = bank_for(&loaded);
    new_node(&mut bank);
    let records = NodeRecords::Targets(vec![
        TargetRecord {
            prompt: prompt(
                &loaded,
                "Give the answer only: which river flows through Paris?",
            ),
            completion: completion(&loaded, "Seine"),
            weight: 1.0,
        },
        TargetRecord {
            prompt: prompt(&loaded, "Give the answer only: who painted the Mona Lisa?"),
            completion: completion(&loaded, "Leonardo da Vinci"),
            weight: 1.0,
        },
    ]);
    let mut learner =
        NodeLearner::new(&mut bank, "node", LearnerConfig::default()).expect("learner");
    let before = learner
        .evaluate(&model, &bank, &records)
        .expect("eval")
        .nll
        .expect("nll");
    for _ in 0..20 {
        learner.step(&model, &mut bank, &records).expect("step");
    }
    let after = learner
        .evaluate(&model, &bank, &records)
        .expect("eval")
        .nll
        .expect("nll");
    eprintln!(
        "mean token NLL: {:.4} -> {:.4}",
        before.mean_token_nll, after.mean_token_nll
    );
    assert!(
        after.mean_token_nll < 0.5 * before.mean_token_nll,
        "NLL did not fall enough: {} -> {}",
        before.mean_token_nll,
        after.mean_token_nll
    );
}

#[test]
fn label_steps_raise_label_probability() {
    let (loaded, model) = load_model();
    let mut bank = bank_for(&loaded);
    new_node(&mut bank);
    let yes = loaded.tokenizer.encode("Yes").expect("Yes");
    let no = loaded.tokenizer.encode("No").expect("No");
    assert_eq!(
        (yes.len(), no.len()),
        (1, 1),
        "Yes/No must be single tokens"
    );
    let labels = vec![yes[0], no[0]];
    // Deliberately counter-intuitive gold labels, so p(label) starts low.
    let records = NodeRecords::Labels(vec![
        LabelRecord {
            prompt: prompt(&loaded, "Is the sky green? Answer Yes or No."),
            labels: labels.clone(),
            label: 0,
            weight: 1.0,
        },
        LabelRecord {
            prompt: prompt(&loaded, "Is water wet? Answer Yes or No."),
            labels,
            label: 1,
            weight: 1.0,
        },
    ]);
    let mut learner =
        NodeLearner::new(&mut bank, "node", LearnerConfig::default()).expect("learner");
    let before = learner
        .evaluate(&model, &bank, &records)
        .expect("eval")
        .label
        .expect("label");
    for _ in 0..20 {
        learner.step(&model, &mut bank, &records).expect("step");
    }
    let after = learner
        .evaluate(&model, &bank, &records)
        .expect("eval")
        .label
        .expect("label");
    eprintln!(
        "mean p(label): {:.4} -> {:.4}",
        before.mean_target_prob, after.mean_target_prob
    );
    assert!(
        after.mean_target_prob > before.mean_target_prob + 0.2,
        "p(label) {} -> {}",
        before.mean_target_prob,
        after.mean_target_prob
    );
    assert!(after.mean_target_prob > 0.8);
}

#[test]
fn save_load_resumes_exactly() {
    let (loaded, model) = load_model();
    let records = NodeRecords::Preferences(vec![PreferencePair {
        prompt: prompt(&loaded, "Name a color."),
        chosen: completion(&loaded, "Blue."),
        rejected: completion(&loaded, "Seven."),
        weight: 1.0,
    }]);
    let dir = tempfile::tempdir().expect("tempdir");
    // uninterrupted: 4 steps
    let mut bank = bank_for(&loaded);
    new_node(&mut bank);
    let mut learner =
        NodeLearner::new(&mut bank, "node", LearnerConfig::default()).expect("learner");
    for i in 0..4 {
        learner.step(&model, &mut bank, &records).expect("step");
        if i == 1 {
            learner.save(&bank, dir.path()).expect("save");
        }
    }
    // resumed: load after 2 steps into a fresh bank, 2 more steps
    let mut bank2 = bank_for(&loaded);
    let mut learner2 = NodeLearner::load(&mut bank2, dir.path()).expect("load");
    assert_eq!(learner2.steps(), 2);
    for _ in 0..2 {
        learner2.step(&model, &mut bank2, &records).expect("step");
    }
    for ((k, a), (_, b)) in snapshot(&bank, "node").iter().zip(snapshot(&bank2, "node")) {
        assert!(a.equal(&b), "resumed tensor {k} differs");
    }
    for ((k, a), (_, b)) in snapshot(&bank, "node.ref")
        .iter()
        .zip(snapshot(&bank2, "node.ref"))
    {
        assert!(a.equal(&b), "resumed reference {k} differs");
    }
}

/// Gradients flow through the shared prompt's KV cache: the adapter gradients of the
/// summed completion log-probs equal those of the concatenated computation (f32,
/// relative 1e-3 of each tensor's gradient norm).
#[test]
fn shared_kv_gradients_equal_concatenated() {
    let (loaded, model) = load_model();
    let bank = trainable_node_with_random_b(&loaded);
    let p1 = prompt(&loaded, "Name two rivers in Europe.");
    let p2 = prompt(&loaded, "What is 2 + 2?");
    let (c1, r1, c2) = (
        completion(&loaded, "The Rhine and the Danube."),
        completion(&loaded, "Nile."),
        completion(&loaded, "4"),
    );
    let groups: Vec<(&[u32], Vec<&[u32]>)> = vec![
        (p1.as_slice(), vec![c1.as_slice(), r1.as_slice()]),
        (p2.as_slice(), vec![c2.as_slice()]),
    ];
    let params = bank.get("node").expect("node").named_tensors();
    let grads = |sharing: PromptSharing| -> Vec<Tensor> {
        for (_, p) in &params {
            let mut p = p.shallow_clone();
            p.zero_grad();
        }
        let delta = flowtune::learner::BankDelta::all(&bank, "node").expect("delta");
        let lp = completion_logprobs(&model, Some(&delta), &groups, sharing).expect("logprobs");
        (lp * Tensor::from_slice(&[1.0f32, -0.5, 0.7]))
            .sum(None)
            .backward();
        params.iter().map(|(_, p)| p.grad().copy()).collect()
    };
    let shared = grads(PromptSharing::SharedKv);
    let concat = grads(PromptSharing::Concatenate);
    let mut worst: f64 = 0.0;
    for ((k, _), (a, b)) in params.iter().zip(shared.iter().zip(&concat)) {
        let norm = b.norm().double_value(&[]);
        assert!(norm > 0.0, "no gradient on {k}");
        let rel = (a - b).norm().double_value(&[]) / norm;
        worst = worst.max(rel);
        assert!(
            rel <= 1e-3,
            "{k}: shared-KV gradient differs from concatenated by {rel:e} (relative)"
        );
    }
    eprintln!("shared-KV vs concatenated gradients: worst relative difference {worst:e}");
}

/// Label prompts grouped by shared prefix (MuSiQue relevance shape: a paragraph scored
/// under several queries) give the same next-token logits and adapter gradients as
/// running every prompt whole (f32; logits max |Δ| ≤ 1e-3, gradients relative 1e-3 of
/// each tensor's norm), and the learner's label statistics agree under both settings.
#[test]
fn prefix_grouped_labels_equal_unshared() {
    use flowtune::learner::{
        grouped_next_token_logits, next_token_logits, prefix_groups, LabelSharing,
    };
    let (loaded, model) = load_model();
    let bank = trainable_node_with_random_b(&loaded);
    let paragraphs = [
        "The Rhine rises in the Swiss Alps and flows into the North Sea near Rotterdam.",
        "Mount Kilimanjaro, a dormant volcano in Tanzania, is the highest mountain in Africa.",
    ];
    let queries = [
        "Where does the Rhine end?",
        "highest mountain Africa",
        "Swiss rivers",
    ];
    let mut prompts = Vec::new();
    for q in queries {
        for p in paragraphs {
            prompts.push(prompt(
                &loaded,
                &format!("Paragraph: {p}\nQuestion: Which river reaches Rotterdam?\nQuery: {q}\nIs the paragraph relevant?"),
            ));
        }
    }
    prompts.push(prompt(&loaded, "Is water wet?"));
    let refs: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
    let groups = prefix_groups(&refs);
    assert!(
        groups.iter().any(|g| g.members.len() == 3),
        "each paragraph's three prompts should group: {groups:?}"
    );
    let order: Vec<usize> = groups.iter().flat_map(|g| g.members.clone()).collect();
    let group_refs: Vec<&flowtune::learner::PrefixGroup> = groups.iter().collect();
    let ordered: Vec<&[u32]> = order.iter().map(|&i| refs[i]).collect();
    let yes = loaded.tokenizer.encode("Yes").expect("Yes")[0] as i64;
    let weights = Tensor::from_slice(
        &(0..order.len())
            .map(|i| 0.3 + 0.1 * i as f32)
            .collect::<Vec<_>>(),
    );
    let params = bank.get("node").expect("node").named_tensors();
    let run = |grouped: bool| -> (Tensor, Vec<Tensor>) {
        for (_, p) in &params {
            let mut p = p.shallow_clone();
            p.zero_grad();
        }
        let delta = flowtune::learner::BankDelta::all(&bank, "node").expect("delta");
        let logits = if grouped {
            grouped_next_token_logits(&model, Some(&delta), &refs, &group_refs)
        } else {
            next_token_logits(&model, Some(&delta), &ordered)
        }
        .expect("logits");
        (logits.select(1, yes) * &weights).sum(None).backward();
        (
            logits.detach(),
            params.iter().map(|(_, p)| p.grad().copy()).collect(),
        )
    };
    let (l_grouped, g_grouped) = run(true);
    let (l_whole, g_whole) = run(false);
    let max_diff = (&l_grouped - &l_whole).abs().max().double_value(&[]);
    eprintln!("grouped vs whole prompts: logits max |Δ| {max_diff:e}");
    assert!(max_diff <= 1e-3, "logits differ by {max_diff}");
    for ((k, _), (a, b)) in params.iter().zip(g_grouped.iter().zip(&g_whole)) {
        let norm = b.norm().double_value(&[]);
        assert!(norm > 0.0, "no gradient on {k}");
        let rel = (a - b).norm().double_value(&[]) / norm;
        assert!(
            rel <= 1e-3,
            "{k}: grouped gradient differs by {rel:e} (relative)"
        );
    }
    // Through the learner: same label statistics under both settings.
    let records = NodeRecords::Labels(
        prompts
            .iter()
            .enumerate()
            .map(|(i, p)| LabelRecord {
                prompt: p.clone(),
                labels: vec![yes as u32, loaded.tokenizer.encode("No").expect("No")[0]],
                label: i % 2,
                weight: 1.0 + (i % 3) as f64,
            })
            .collect(),
    );
    let stats = |sharing: LabelSharing| {
        let mut b = bank_for(&loaded);
        new_node(&mut b);
        let config = LearnerConfig {
            label_sharing: sharing,
            micro_batch: 2,
            ..LearnerConfig::default()
        };
        let learner = NodeLearner::new(&mut b, "node", config).expect("learner");
        learner.evaluate(&model, &b, &records).expect("eval")
    };
    let (a, b) = (
        stats(LabelSharing::PrefixGroups),
        stats(LabelSharing::Unshared),
    );
    assert_eq!(a.records, b.records);
    let (la, lb) = (a.label.expect("label"), b.label.expect("label"));
    approx::assert_abs_diff_eq!(a.loss, b.loss, epsilon = 1e-5);
    approx::assert_abs_diff_eq!(la.mean_target_prob, lb.mean_target_prob, epsilon = 1e-5);
    approx::assert_abs_diff_eq!(la.accuracy, lb.accuracy, epsilon = 1e-9);
}

/// LoRA dropout (`lora_dropout` 0.3): supervised (label) steps drop LoRA inputs, DPO steps
/// do not by default (TRL's `disable_dropout`), evaluation never does, and each step leaves
/// the bank out of training mode. Comparisons are exact: the same computation twice in one
/// process, from the same libtorch seed.
#[test]
fn lora_dropout_in_supervised_steps_only() {
    let (loaded, model) = load_model();
    let _rng = rng();
    let after_step = |p: f64, records: &NodeRecords, seed: i64| -> Vec<(String, Tensor)> {
        let mut bank = bank_for(&loaded);
        let mut cfg = LoraConfig::rslora(8, 16.0, &[Module::QProj, Module::VProj]);
        cfg.lora_dropout = p;
        bank.add("node", &cfg, 11).expect("add node");
        let mut learner =
            NodeLearner::new(&mut bank, "node", LearnerConfig::default()).expect("learner");
        let first = learner.evaluate(&model, &bank, records).expect("eval").loss;
        let second = learner.evaluate(&model, &bank, records).expect("eval").loss;
        assert_eq!(first, second, "evaluation must not drop anything");
        tch::manual_seed(seed);
        learner.step(&model, &mut bank, records).expect("step");
        assert!(
            !bank.is_training(),
            "the step left the bank in training mode"
        );
        snapshot(&bank, "node")
    };
    let same = |a: &[(String, Tensor)], b: &[(String, Tensor)]| {
        a.len() == b.len() && a.iter().zip(b).all(|((_, x), (_, y))| x.equal(y))
    };
    let yes = loaded.tokenizer.encode("Yes").expect("Yes")[0];
    let no = loaded.tokenizer.encode("No").expect("No")[0];
    let labels = NodeRecords::Labels(vec![
        LabelRecord {
            prompt: prompt(&loaded, "Is the sky green? Answer Yes or No."),
            labels: vec![yes, no],
            label: 0,
            weight: 1.0,
        },
        LabelRecord {
            prompt: prompt(&loaded, "Is water wet? Answer Yes or No."),
            labels: vec![yes, no],
            label: 1,
            weight: 1.0,
        },
    ]);
    let dropped = after_step(0.3, &labels, 1);
    assert!(!same(&after_step(0.0, &labels, 1), &dropped));
    assert!(same(&after_step(0.3, &labels, 1), &dropped));
    assert!(!same(&after_step(0.3, &labels, 2), &dropped));

    let pairs = NodeRecords::Preferences(vec![PreferencePair {
        prompt: prompt(&loaded, "What is the capital of France?"),
        chosen: completion(&loaded, "Paris."),
        rejected: completion(&loaded, "The capital of France is Lyon."),
        weight: 1.0,
    }]);
    assert!(same(
        &after_step(0.0, &pairs, 1),
        &after_step(0.3, &pairs, 1)
    ));
}
