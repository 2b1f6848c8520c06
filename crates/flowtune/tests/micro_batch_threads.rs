//! Training micro-batches side by side ([`MicroBatchThreads`]) on the real test model
//! (SmolLM2-135M-Instruct GGUF, bf16, CPU), with label steps through the recorded backward
//! and through autograd: label steps (prefix groups and whole prompts),
//! a DPO step and a supervised step give the adapter, the optimizer and the statistics of
//! running the same micro-batches one after another single-threaded, bit for bit (no
//! tolerance: each micro-batch runs single-threaded either way and the gradients are summed
//! in micro-batch order). Against the serial path on two threads, whose products split
//! their sums differently and so round bf16 values elsewhere, the adapter after a label and a
//! DPO step agrees within 1e-2 relative per tensor.
//!
//! Its own test binary: it switches libtorch's thread count, which other tests in the same
//! process would see. Fails (never skips) when the model is missing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use flowtune::learner::{
    LabelRecord, LearnerConfig, MicroBatchThreads, NodeLearner, NodeRecords, PreferencePair,
    StepStats, TargetRecord,
};
use flowtune_lm::loader::{load, LoadOptions};
use flowtune_lm::model::Model;
use flowtune_lm::ChatMessage;
use flowtune_lora::{AdapterBank, LoraConfig, Module};
use tch::{Device, Kind, Tensor};

/// The three kinds of records a node learns from, built from SmolLM2's chat template.
fn records(tok: &flowtune_lm::Tokenizer) -> Vec<NodeRecords> {
    let chat = |system: &str, user: &str| {
        tok.encode_chat(
            &[
                ChatMessage::new("system", system),
                ChatMessage::new("user", user),
            ],
            true,
        )
        .expect("chat template")
    };
    let text = |t: &str| tok.encode(t).expect("encode");
    let (yes, no) = (text("Yes")[0], text("No")[0]);
    let system = "Decide whether the paragraph helps to answer the question.";
    let paragraphs = [
        "The Amazon river flows through Brazil, Peru and Colombia into the Atlantic.",
        "Mount Kilimanjaro is the highest mountain in Africa, in Tanzania.",
        "The violin has four strings tuned in perfect fifths.",
    ];
    let questions = [
        "Which ocean does the Amazon reach?",
        "How many strings has a violin?",
    ];
    let mut labels = Vec::new();
    for (q, question) in questions.iter().enumerate() {
        for (p, paragraph) in paragraphs.iter().enumerate() {
            labels.push(LabelRecord {
                prompt: chat(
                    system,
                    &format!("Paragraph: {paragraph}\nQuestion: {question}"),
                ),
                labels: vec![yes, no],
                label: usize::from(p != 2 * q),
                weight: 1.0 + (p % 2) as f64,
            });
        }
    }
    // One prompt with nothing shared, run whole.
    labels.push(LabelRecord {
        prompt: text("Yes or no?"),
        labels: vec![yes, no],
        label: 0,
        weight: 0.5,
    });
    let prompt = chat("Answer briefly.", "What is the capital of France?");
    let pairs = (0..5)
        .map(|i| PreferencePair {
            prompt: prompt.clone(),
            chosen: text(&format!("Paris{}", ".".repeat(i % 2 + 1))),
            rejected: text(&format!("Lyon, I think{}", "!".repeat(i % 3 + 1))),
            weight: 0.5 + i as f64,
        })
        .collect();
    let targets = (0..5)
        .map(|i| TargetRecord {
            prompt: chat("Answer briefly.", &format!("What is {i} plus {i}?")),
            completion: text(&format!("It is {}.", 2 * i)),
            weight: 1.0,
        })
        .collect();
    vec![
        NodeRecords::Labels(labels.clone()),
        NodeRecords::Preferences(pairs),
        NodeRecords::Targets(targets),
        NodeRecords::Labels(labels),
    ]
}

/// The adapter's tensors and each step's statistics after the steps over `records`, with
/// libtorch on `threads` intra-op threads; label steps through the recorded backward or
/// autograd.
fn train(
    model: &Model,
    shapes: &flowtune_lora::BaseShapes,
    records: &[NodeRecords],
    threads: i32,
    micro_batch_threads: MicroBatchThreads,
    recorded_backward: bool,
) -> (Vec<(String, Tensor)>, Vec<StepStats>) {
    tch::set_num_threads(threads);
    let mut bank = AdapterBank::with_kind(shapes.clone(), Device::Cpu, Kind::BFloat16);
    bank.add(
        "node",
        &LoraConfig::rslora(8, 16.0, &[Module::QProj, Module::VProj]),
        5,
    )
    .expect("add node");
    let config = LearnerConfig {
        micro_batch: 2,
        micro_batch_threads,
        recorded_backward,
        ..LearnerConfig::default()
    };
    let mut learner = NodeLearner::new(&mut bank, "node", config).expect("learner");
    let stats = records
        .iter()
        .map(|r| learner.step(model, &mut bank, r).expect("step"))
        .collect();
    let tensors = bank
        .get("node")
        .expect("node")
        .named_tensors()
        .into_iter()
        .map(|(k, t)| (k, t.detach().copy()))
        .collect();
    (tensors, stats)
}

#[test]
fn side_by_side_micro_batches_equal_single_threaded_ones_bit_for_bit() {
    let path = flowtune_lm::locate_test_model().unwrap_or_else(|e| panic!("{e}"));
    let opts = LoadOptions {
        dtype: Kind::BFloat16,
        ..LoadOptions::default()
    };
    let loaded = load(&path, &opts).expect("load test model");
    let model = Model::new(&loaded.config, &loaded.weights).expect("model");
    let shapes = loaded.config.lora_base_shapes();
    let records = records(&loaded.tokenizer);

    for recorded in [true, false] {
        let (one, one_stats) = train(
            &model,
            &shapes,
            &records,
            1,
            MicroBatchThreads::Serial,
            recorded,
        );
        for (threads, mbt) in [
            (2, MicroBatchThreads::Auto),
            (2, MicroBatchThreads::Threads(3)),
            (1, MicroBatchThreads::Threads(2)),
        ] {
            let (side, side_stats) = train(&model, &shapes, &records, threads, mbt, recorded);
            assert_eq!(
                side_stats, one_stats,
                "{threads} threads, {mbt:?}, recorded {recorded}"
            );
            for ((k, a), (_, b)) in side.iter().zip(&one) {
                assert!(
                    a.equal(b),
                    "{k}: {threads} threads, {mbt:?}, recorded {recorded}"
                );
            }
        }
    }
    let (one, one_stats) = train(
        &model,
        &shapes,
        &records,
        1,
        MicroBatchThreads::Serial,
        true,
    );
    // Every step trained and reached the adapter's A matrices as well as its B ones.
    for s in &one_stats {
        assert!(s.records > 0 && s.grad_norm > 0.0, "{s:?}");
    }
    for (k, t) in &one {
        assert!(
            t.abs().sum(Kind::Double).double_value(&[]) > 0.0,
            "{k} is zero"
        );
    }

    // The serial path on two threads over the first two steps (labels, DPO), autograd: the
    // same steps up to the products' summation order, which moves bf16 roundings (observed:
    // the label step bit-identical, the adapter after the DPO step within 4.3e-3 relative).
    // COCOB's steps amplify such differences over later steps (observed: 7e-2 after the
    // supervised step), so those are compared single-threaded only, above.
    // The recorded backward's kernels split their work by thread count, so its label step
    // on two threads rounds some small gradient entries differently (deterministically: two
    // runs on two threads are bit-identical). Its loss and gradient norm agree within 1e-2
    // relative (observed: equal in all 16 printed digits), but COCOB's first step turns
    // differences in near-zero entries into whole-step ones (observed: 5.5e-2 relative in
    // layers 0-1's q_proj B factors), so the adapters are compared for autograd only.
    let label = std::slice::from_ref(&records[0]);
    let (_, rec_two) = train(&model, &shapes, label, 2, MicroBatchThreads::Serial, true);
    let (_, rec_one) = train(&model, &shapes, label, 1, MicroBatchThreads::Serial, true);
    let (l2, l1) = (rec_two[0].loss, rec_one[0].loss);
    let (g2, g1) = (rec_two[0].grad_norm, rec_one[0].grad_norm);
    eprintln!(
        "recorded label step, two threads against one: loss {l2} / {l1}, gradient norm {g2} / {g1}"
    );
    assert!((l2 - l1).abs() <= 1e-2 * l1.abs(), "loss {l2} against {l1}");
    assert!(
        (g2 - g1).abs() <= 1e-2 * g1.abs(),
        "gradient norm {g2} against {g1}"
    );
    let (two, _) = train(
        &model,
        &shapes,
        &records[..2],
        2,
        MicroBatchThreads::Serial,
        false,
    );
    let (one, _) = train(
        &model,
        &shapes,
        &records[..2],
        1,
        MicroBatchThreads::Serial,
        false,
    );
    for ((k, a), (_, b)) in two.iter().zip(&one) {
        let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
        let rel = (&a - &b).norm().double_value(&[]) / b.norm().double_value(&[]).max(1e-12);
        assert!(
            rel <= 1e-2,
            "{k}: serial on two threads differs by {rel:e} (relative)"
        );
    }

    // The setting round-trips through serde, and zero threads is rejected.
    for mbt in [
        MicroBatchThreads::Auto,
        MicroBatchThreads::Serial,
        MicroBatchThreads::Threads(4),
    ] {
        let config = LearnerConfig {
            micro_batch_threads: mbt,
            ..LearnerConfig::default()
        };
        let json = serde_json::to_string(&config).unwrap();
        assert_eq!(
            serde_json::from_str::<LearnerConfig>(&json).unwrap(),
            config
        );
    }
    let mut bank = AdapterBank::new(shapes.clone(), Device::Cpu);
    bank.add("node", &LoraConfig::rslora(8, 16.0, &[Module::QProj]), 1)
        .unwrap();
    let zero = LearnerConfig {
        micro_batch_threads: MicroBatchThreads::Threads(0),
        ..LearnerConfig::default()
    };
    let err = NodeLearner::new(&mut bank, "node", zero).unwrap_err();
    assert!(err.to_string().contains("micro_batch_threads"), "{err}");
}
