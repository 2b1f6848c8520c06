//! Times one label learner step shaped like the MuSiQue relevance node's (for profiling the
//! learner, e.g. under `perf record`): per episode, 19 paragraphs of 100-220 tokens after a
//! 20-token system prompt, each scored under 2-3 queries (one record per paragraph and query:
//! system + paragraph + question + query + instruction), Yes/No labels, random token ids.
//! SmolLM2 (the test model) in bf16, LoRA r=8 on q and v, the default learner config
//! (prefix groups, micro-batch 4; `THREADS` sets `micro_batch_threads`: `serial`, a count, or
//! `auto`, the default; environment: `FLOWTUNE_LEARNER_BACKWARD=autograd` for autograd instead
//! of the recorded backward, `FLOWTUNE_MICRO_BATCH` for the records per micro-batch), with the
//! heap policy the binaries use
//! (`flowtune_lm::heap::retain_freed_memory`). One warm-up step, then `STEPS` timed steps.
//!
//! Run: `cargo run --release -p flowtune --example label_learner_step -- [STEPS [EPISODES
//! [THREADS]]]` (defaults 3, 4, auto; 4 episodes make 208 records, like 4 MuSiQue training
//! episodes' ~226).

use flowtune::learner::{LabelRecord, LearnerConfig, MicroBatchThreads, NodeLearner, NodeRecords};
use flowtune_lm::loader::{load, LoadOptions};
use flowtune_lm::model::Model;
use flowtune_lora::{AdapterBank, LoraConfig, Module};
use rand::{Rng, SeedableRng};
use std::time::Instant;
use tch::{Device, Kind};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let steps: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(3);
    let episodes: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(4);
    let micro_batch_threads = match args.get(3).map(String::as_str) {
        None | Some("auto") => MicroBatchThreads::Auto,
        Some("serial") => MicroBatchThreads::Serial,
        Some(n) => MicroBatchThreads::Threads(n.parse()?),
    };
    flowtune_lm::heap::retain_freed_memory();
    // The test model on the CPU (the default device), in bf16.
    let bf16 = LoadOptions {
        dtype: Kind::BFloat16,
        ..Default::default()
    };
    let loaded = load(&flowtune_lm::locate_test_model()?, &bf16)?;
    let model = Model::new(&loaded.config, &loaded.weights)?;
    let yes_no = [
        loaded.tokenizer.encode("Yes")?[0],
        loaded.tokenizer.encode("No")?[0],
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut tokens =
        |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(100..40000)).collect() };
    let system = tokens(20);
    let mut records = Vec::new();
    for _ in 0..episodes {
        let question = tokens(20);
        let queries: Vec<Vec<u32>> = (0..3).map(|_| tokens(15)).collect();
        let instruction = tokens(15);
        for p in 0..19 {
            let paragraph = tokens(100 + (p * 37) % 120);
            for (qi, query) in queries.iter().enumerate() {
                // Some paragraphs are retrieved before the third round.
                if qi == 2 && p % 4 == 0 {
                    continue;
                }
                let prompt = [&system[..], &paragraph, &question, query, &instruction].concat();
                records.push(LabelRecord {
                    prompt,
                    labels: yes_no.to_vec(),
                    label: usize::from(p % 5 == 0),
                    weight: 1.0,
                });
            }
        }
    }
    eprintln!("{} label records", records.len());
    let records = NodeRecords::Labels(records);
    let mut bank = AdapterBank::new(loaded.config.lora_base_shapes(), Device::Cpu);
    bank.add(
        "node",
        &LoraConfig::rslora(8, 16.0, &[Module::QProj, Module::VProj]),
        1,
    )?;
    // FLOWTUNE_LEARNER_BACKWARD=autograd: label steps through autograd instead of the
    // recorded backward; FLOWTUNE_MICRO_BATCH=n: records per micro-batch (default 4).
    let recorded_backward = std::env::var("FLOWTUNE_LEARNER_BACKWARD").as_deref() != Ok("autograd");
    let micro_batch = match std::env::var("FLOWTUNE_MICRO_BATCH") {
        Ok(v) => v.parse()?,
        Err(_) => LearnerConfig::default().micro_batch,
    };
    let config = LearnerConfig {
        micro_batch_threads,
        recorded_backward,
        micro_batch,
        ..LearnerConfig::default()
    };
    let mut learner = NodeLearner::new(&mut bank, "node", config)?;
    learner.step(&model, &mut bank, &records)?; // warm-up
    for _ in 0..steps {
        let t0 = Instant::now();
        learner.step(&model, &mut bank, &records)?;
        println!("{{\"step_seconds\": {:.3}}}", t0.elapsed().as_secs_f64());
    }
    Ok(())
}
