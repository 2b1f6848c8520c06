//! Minimal use of the engine: load a model (GGUF or HF folder), chat-template a
//! question, generate greedily, score a Yes/No label choice.
//!
//! `cargo run -p flowtune-lm --example generate [-- MODEL_PATH]`
use flowtune_lm::engine::{
    ClassifyRequest, Engine, EngineConfig, GenerateRequest, GenerationParams,
};
use flowtune_lm::loader::{load, LoadOptions};
use flowtune_lm::tokenizer::ChatMessage;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = match std::env::args().nth(1) {
        Some(p) => p.into(),
        None => flowtune_lm::locate_test_model()?,
    };
    let engine = Engine::new(
        load(&path, &LoadOptions::default())?,
        EngineConfig::default(),
    )?;
    let tok = engine.tokenizer();
    let prompt = tok.encode_chat(
        &[ChatMessage::new("user", "What is the capital of France?")],
        true,
    )?;
    let out = engine.generate(&[GenerateRequest {
        prompt: prompt.clone(),
        adapter: None,
        params: GenerationParams {
            max_new_tokens: 24,
            ..Default::default()
        },
    }])?;
    println!("answer: {}", out[0].sequences[0].text);
    let labels = vec![
        tok.token_to_id("Yes").unwrap_or(0),
        tok.token_to_id("No").unwrap_or(0),
    ];
    let q = tok.encode_chat(
        &[ChatMessage::new(
            "user",
            "Is Paris in France? Answer Yes or No.",
        )],
        true,
    )?;
    let c = engine.classify(&[ClassifyRequest {
        prompt: q,
        adapter: None,
        labels,
    }])?;
    println!(
        "log p(Yes), log p(No) over the two labels: {:?}",
        c[0].label_logprobs
    );
    Ok(())
}
