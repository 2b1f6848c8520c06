//! Print a model's metadata, config and tokenizer summary.
//!
//! `cargo run -p flowtune-lm --example inspect -- [PATH]` (PATH: a `.gguf` file or an
//! HF folder; the test model when omitted).
use std::path::PathBuf;

use flowtune_lm::gguf::{ggml_type_name, GgufFile};
use flowtune_lm::loader::{is_gguf, load, LoadOptions};
use flowtune_lm::tokenizer::ChatMessage;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = match std::env::args_os().nth(1) {
        Some(p) => PathBuf::from(p),
        None => flowtune_lm::locate_test_model()?,
    };
    println!("model: {}", path.display());
    if is_gguf(&path) {
        let f = GgufFile::open(&path)?;
        println!(
            "GGUF v{}, {} tensors, data at byte {}",
            f.header.version,
            f.header.tensors.len(),
            f.header.data_offset
        );
        for (k, v) in &f.header.metadata {
            let s = v.to_json(8).to_string();
            let s: String = s.chars().take(100).collect();
            println!("  {k} = {s}");
        }
        let mut types = std::collections::BTreeMap::<&str, usize>::new();
        for t in &f.header.tensors {
            *types.entry(ggml_type_name(t.type_id)).or_default() += 1;
        }
        println!("tensor types: {types:?}");
        let t0 = std::time::Instant::now();
        let tok = flowtune_lm::Tokenizer::from_gguf(&f.header, &path)?;
        let t1 = std::time::Instant::now();
        let config = flowtune_lm::loader::gguf_config(&f)?;
        let tensors = flowtune_lm::loader::gguf_hf_tensors(&f, &config)?;
        println!(
            "timings: tokenizer {:.2}s ({} tokens), dequantise {} tensors {:.2}s",
            (t1 - t0).as_secs_f64(),
            tok.vocab_size(),
            tensors.len(),
            t1.elapsed().as_secs_f64()
        );
    }
    let start = std::time::Instant::now();
    let m = load(&path, &LoadOptions::default())?;
    println!("loaded in {:.2}s", start.elapsed().as_secs_f64());
    println!("config: {}", serde_json::to_string(&m.config)?);
    println!(
        "{} tensors, {} parameters",
        m.weights.len(),
        m.weights.num_parameters()
    );
    let t = &m.tokenizer;
    println!(
        "vocab {} | specials {:?} | eos ids {:?}",
        t.vocab_size(),
        t.special_tokens(),
        t.eos_token_ids()
    );
    let msgs = [ChatMessage::new("user", "What is the capital of France?")];
    let text = t.apply_chat_template(&msgs, true)?;
    println!("chat template renders:\n{text}");
    println!("ids: {:?}", t.encode(&text)?);
    Ok(())
}
