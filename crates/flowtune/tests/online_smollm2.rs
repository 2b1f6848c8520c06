//! The online loop on the real test model (SmolLM2-135M-Instruct): a two-node flow
//! (a generate node learned by DPO from diverse-beam deviations, a Yes/No node
//! supervised by a gold label) produces feedback whose learner steps change the
//! adapters; and a run stopped after a checkpoint and resumed in fresh objects
//! (new engine, new adapters, state read back from disk) gives exactly the metrics
//! and learner losses of the uninterrupted run.
use std::path::Path;

use flowtune::graph::{EpisodeContext, Flow, FlowSpec, Message, NodeId, NodeSpec, Result};
use flowtune::learner::LearnerConfig;
use flowtune::lm::engine::{Engine, EngineConfig};
use flowtune::lm::loader::{load, LoadOptions};
use flowtune::lora::{LoraConfig, Module};
use flowtune::rollout::{CallSelection, GenerateAlternatives};
use flowtune::rollout::{
    CheckpointConfig, CreditConfig, NodeDeviation, OnlineConfig, OnlineLoop, OnlineState,
};
use flowtune::runtime::LmRuntime;

const COLORS: &[&str] = &[
    "red", "blue", "green", "yellow", "white", "black", "orange", "purple", "brown", "gray", "pink",
];

/// Name a color for a thing; then say whether the answer is a color.
struct ColorFlow;

impl Flow for ColorFlow {
    type Input = String;
    type Output = f64;

    fn spec(&self) -> FlowSpec {
        FlowSpec {
            name: "color".into(),
            nodes: vec![
                NodeSpec::generate("answer", 4),
                NodeSpec::classify("check", &["Yes", "No"]),
            ],
            edges: vec![],
        }
    }

    async fn run(&self, cx: &EpisodeContext, thing: &String) -> Result<f64> {
        let a = cx
            .generate(
                "answer",
                vec![
                    Message::system("Answer with one word."),
                    Message::user(format!("What color is {thing}?")),
                ],
            )
            .await?;
        let text = a.text().to_lowercase();
        let r = if text.contains("blue") { 1.0 } else { 0.0 };
        cx.reward("answer", r);
        let c = cx
            .classify(
                "check",
                vec![Message::user(format!(
                    "Is \"{}\" the name of a color? Answer Yes or No.",
                    a.text().trim()
                ))],
            )
            .await?;
        let is_color = COLORS.iter().any(|k| text.contains(k));
        cx.gold_label(&c, if is_color { 0 } else { 1 });
        cx.reward(
            "check",
            if (c.choice() == 0) == is_color {
                1.0
            } else {
                0.0
            },
        );
        Ok(r)
    }
}

fn runtime() -> LmRuntime {
    let path = flowtune::lm::locate_test_model().unwrap_or_else(|e| panic!("{e}"));
    let loaded = load(
        &path,
        &LoadOptions {
            device: tch::Device::Cpu,
            dtype: tch::Kind::Float,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let engine = Engine::new(loaded, EngineConfig::default()).unwrap_or_else(|e| panic!("{e}"));
    let lora = LoraConfig::rslora(8, 16.0, &[Module::QProj, Module::VProj]);
    let nodes = [NodeId::from("answer"), NodeId::from("check")];
    LmRuntime::new(engine, &nodes, &lora, 11).unwrap_or_else(|e| panic!("{e}"))
}

fn config(dir: &Path, max_episodes: u64) -> OnlineConfig {
    OnlineConfig {
        seed: 3,
        minibatch_episodes: 4,
        episodes_in_flight: 4,
        credit: CreditConfig {
            default_deviation: NodeDeviation {
                enabled: true,
                max_alternatives: 1,
                calls: CallSelection::All,
                generate: GenerateAlternatives::DiverseBeam {
                    num_beams: 4,
                    num_beam_groups: 4,
                    diversity_penalty: 1.0,
                },
            },
            ..CreditConfig::default()
        }
        .route("answer", "answer")
        .route("check", "check")
        .with_deviation(
            "check",
            NodeDeviation {
                enabled: false,
                ..NodeDeviation::default()
            },
        ),
        checkpoint: Some(CheckpointConfig {
            every_episodes: 4,
            dir: dir.to_path_buf(),
        }),
        max_episodes: Some(max_episodes),
        ..OnlineConfig::default()
    }
}

fn stream() -> Vec<String> {
    [
        "the sky",
        "the sea",
        "a sapphire",
        "a blueberry",
        "a clear sky",
        "the ocean",
    ]
    .iter()
    .cycle()
    .take(64)
    .map(|s| s.to_string())
    .collect()
}

fn adapter_b_norm(rt: &LmRuntime, name: &str) -> f64 {
    let engine = rt.engine();
    let engine = engine.borrow();
    let bank = engine.adapter_bank().unwrap_or_else(|| panic!("no bank"));
    let adapter = bank.get(name).unwrap_or_else(|e| panic!("{e}"));
    adapter
        .named_tensors()
        .iter()
        .filter(|(k, _)| k.contains("lora_B"))
        .map(|(_, t)| t.abs().sum(tch::Kind::Double).double_value(&[]))
        .sum()
}

/// What must agree between the two runs: everything but wall-clock accounting.
fn comparable(state: &OnlineState) -> serde_json::Value {
    let metrics: Vec<_> = state
        .metrics
        .iter()
        .map(|m| serde_json::json!({"episode": m.episode, "position": m.position, "rewards": m.rewards, "progressive": m.progressive}))
        .collect();
    serde_json::json!({"metrics": metrics, "learn": serde_json::to_value(&state.learn_log).unwrap_or_default(), "gate": serde_json::to_value(&state.gate).unwrap_or_default()})
}

#[test]
fn online_run_learns_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let flow = ColorFlow;

    // Uninterrupted: 8 episodes (two minibatches, a checkpoint after each).
    let rt = runtime();
    assert_eq!(adapter_b_norm(&rt, "answer"), 0.0, "PEFT init: B is zero");
    let mut run =
        OnlineLoop::new(&flow, config(&tmp.path().join("a"), 8)).unwrap_or_else(|e| panic!("{e}"));
    let full = run
        .run(
            stream(),
            &mut rt.backend(),
            &mut rt.learner(LearnerConfig::default()),
            None,
        )
        .unwrap_or_else(|e| panic!("{e}"))
        .clone();
    assert_eq!(full.episodes_done, 8);
    assert!(
        !full.learn_log.is_empty(),
        "no learner steps: {:?}",
        full.totals
    );
    assert!(
        adapter_b_norm(&rt, "check") > 0.0,
        "the supervised node's adapter did not change"
    );
    if full.totals.preferences > 0 {
        assert!(
            adapter_b_norm(&rt, "answer") > 0.0,
            "the DPO node's adapter did not change"
        );
    }
    drop(rt);

    // Interrupted after the checkpoint at 4, then resumed in fresh objects.
    let dir_b = tmp.path().join("b");
    {
        let rt = runtime();
        let mut run = OnlineLoop::new(&flow, config(&dir_b, 4)).unwrap_or_else(|e| panic!("{e}"));
        run.run(
            stream(),
            &mut rt.backend(),
            &mut rt.learner(LearnerConfig::default()),
            None,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }
    let rt = runtime();
    let mut learner = rt.learner(LearnerConfig::default());
    let mut run = OnlineLoop::resume(&flow, config(&dir_b, 8), &mut learner)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(run.state().episodes_done, 4);
    let resumed = run
        .run(stream(), &mut rt.backend(), &mut learner, None)
        .unwrap_or_else(|e| panic!("{e}"))
        .clone();
    assert_eq!(resumed.episodes_done, 8);
    assert_eq!(comparable(&resumed), comparable(&full));
}
