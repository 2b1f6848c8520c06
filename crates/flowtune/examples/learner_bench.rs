//! The Rust side of the learner benchmark (see `scripts/bench-learner.sh`): one DPO
//! learner step (4 pairs, 240-token prompts, 60-token completions, LoRA r=8 on q,v,
//! bf16 base, f32 adapters, COCOB α=1000, clip 1.0) timed for both prompt-sharing
//! strategies. Warm-up 1 step, then the median of `--steps` (default 3).
//!
//! Run: `cargo run --release -p flowtune --example learner_bench -- IDS.json [--steps 3]`
//! (IDS.json is written by `tests/reference/learner_bench.py`).

use flowtune::learner::{LearnerConfig, NodeLearner, NodeRecords, PreferencePair, PromptSharing};
use flowtune_lm::loader::{load, LoadOptions};
use flowtune_lm::model::Model;
use flowtune_lora::{AdapterBank, LoraConfig, Module};
use std::time::Instant;
use tch::{Device, Kind};

#[derive(serde::Deserialize)]
struct Workload {
    pairs: Vec<PreferencePair>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let ids_path = args
        .get(1)
        .ok_or("usage: learner_bench IDS.json [--steps N]")?;
    let steps: usize = match (args.get(2).map(String::as_str), args.get(3)) {
        (Some("--steps"), Some(n)) => n.parse()?,
        _ => 3,
    };
    let workload: Workload = serde_json::from_slice(&std::fs::read(ids_path)?)?;
    let path = flowtune_lm::locate_test_model()?;
    let loaded = load(
        &path,
        &LoadOptions {
            device: Device::Cpu,
            dtype: Kind::BFloat16,
            ..Default::default()
        },
    )?;
    let model = Model::new(&loaded.config, &loaded.weights)?;
    let shapes = loaded.config.lora_base_shapes();
    let records = NodeRecords::Preferences(workload.pairs);
    let mut out = serde_json::Map::new();
    out.insert("threads".into(), tch::get_num_threads().into());
    for (key, sharing) in [
        ("rust_shared_kv_step_s", PromptSharing::SharedKv),
        ("rust_concat_step_s", PromptSharing::Concatenate),
    ] {
        let mut bank = AdapterBank::new(shapes.clone(), Device::Cpu);
        bank.add(
            "node",
            &LoraConfig::rslora(8, 16.0, &[Module::QProj, Module::VProj]),
            1,
        )?;
        let config = LearnerConfig {
            prompt_sharing: sharing,
            ..LearnerConfig::default()
        };
        let mut learner = NodeLearner::new(&mut bank, "node", config)?;
        learner.step(&model, &mut bank, &records)?; // warm-up
        let mut times = Vec::new();
        for _ in 0..steps {
            let t0 = Instant::now();
            learner.step(&model, &mut bank, &records)?;
            times.push(t0.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        out.insert(key.into(), times[times.len() / 2].into());
    }
    println!("{}", serde_json::Value::Object(out));
    Ok(())
}
