//! How the untrained base model behaves on the MuSiQue prompts: relevance Yes/No on every
//! paragraph of synthetic records, and verbose → concise answers given the gold support.
//! Uses the LM engine directly (no adapters). Prints accuracies, a few answers and timings.
//!
//! Run: `cargo run --release -p musique --example prompt_probe -- [N_RECORDS] [SEED]`
use std::error::Error;
use std::time::Instant;

use flowtune::lm::engine::{
    ClassifyRequest, Decoding, Engine, EngineConfig, GenerateRequest, GenerationParams,
};
use flowtune::lm::{load, locate_test_model, ChatMessage, LoadOptions};
use musique::flow::{default_prompt_dir, ground_answer};
use musique::metrics::answer_scores;
use musique::synth::{generate, SynthConfig};

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(8);
    let seed: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(0);
    let answers_only = args.next().as_deref() == Some("answers");
    let started = Instant::now();
    let engine = Engine::new(
        load(&locate_test_model()?, &LoadOptions::default())?,
        EngineConfig::default(),
    )?;
    println!("model loaded in {:.1}s", started.elapsed().as_secs_f64());
    let tok = engine.tokenizer();
    let prompts = flowtune::graph::PromptSet::load_dir(default_prompt_dir())?;
    let encode = |name: &str, vars: serde_json::Value| -> Result<Vec<u32>, Box<dyn Error>> {
        let msgs: Vec<ChatMessage> = prompts
            .render(name, vars)?
            .into_iter()
            .map(|m| ChatMessage::new(m.role, m.content))
            .collect();
        Ok(tok.encode_chat(&msgs, true)?)
    };
    let yes = tok.encode("Yes")?;
    let no = tok.encode("No")?;
    println!("label ids: Yes {yes:?} No {no:?}");
    let records = generate(&SynthConfig {
        seed,
        questions: n,
        ..SynthConfig::default()
    })?;

    // Relevance on every paragraph (query = the question).
    if !answers_only {
        relevance(&engine, &records, &encode, &yes, &no)?;
    }
    answers(&engine, &records, &encode)
}

type Encode<'a> = dyn Fn(&str, serde_json::Value) -> Result<Vec<u32>, Box<dyn Error>> + 'a;

fn relevance(
    engine: &Engine,
    records: &[musique::data::Record],
    encode: &Encode<'_>,
    yes: &[u32],
    no: &[u32],
) -> Result<(), Box<dyn Error>> {
    let mut requests = Vec::new();
    let mut gold = Vec::new();
    for r in records {
        for p in &r.paragraphs {
            let vars = serde_json::json!({"question": r.question, "query": r.question,
                "paragraph": {"title": p.title, "text": p.paragraph_text}});
            requests.push(ClassifyRequest {
                prompt: encode("relevance", vars)?,
                adapter: None,
                labels: vec![yes[0], no[0]],
            });
            gold.push(p.is_supporting);
        }
    }
    let t = Instant::now();
    let out = engine.classify(&requests)?;
    let secs = t.elapsed().as_secs_f64();
    let p_yes: Vec<f64> = out.iter().map(|o| o.label_logprobs[0].exp()).collect();
    let correct = p_yes
        .iter()
        .zip(&gold)
        .filter(|(p, g)| (**p > 0.5) == **g)
        .count();
    let mean = |f: bool| {
        let v: Vec<f64> = p_yes
            .iter()
            .zip(&gold)
            .filter(|(_, g)| **g == f)
            .map(|(p, _)| *p)
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let mut top_supporting = 0;
    let mut k = 0;
    for r in records {
        let scores = &p_yes[k..k + r.paragraphs.len()];
        let best = (0..scores.len()).fold(0, |b, i| if scores[i] > scores[b] { i } else { b });
        top_supporting += usize::from(r.paragraphs[best].is_supporting);
        k += r.paragraphs.len();
    }
    println!(
        "relevance: {} calls in {secs:.2}s ({:.1} ms/call); accuracy {:.3}; mean p(Yes) supporting {:.3} vs distractor {:.3}; top-1 supporting {}/{}",
        requests.len(),
        1000.0 * secs / requests.len() as f64,
        correct as f64 / gold.len() as f64,
        mean(true),
        mean(false),
        top_supporting,
        records.len()
    );

    Ok(())
}

fn answers(
    engine: &Engine,
    records: &[musique::data::Record],
    encode: &Encode<'_>,
) -> Result<(), Box<dyn Error>> {
    // Verbose then concise, with the gold support retrieved.
    let params = |max_new_tokens: usize, stop: Vec<String>| GenerationParams {
        max_new_tokens,
        decoding: Decoding::Greedy,
        num_return_sequences: 1,
        stop,
        eos_token_ids: vec![],
    };
    let shown = |r: &musique::data::Record| -> Vec<serde_json::Value> {
        r.paragraphs
            .iter()
            .filter(|p| p.is_supporting)
            .map(|p| serde_json::json!({"title": p.title, "text": p.paragraph_text}))
            .collect()
    };
    let mut verbose_requests = Vec::new();
    for r in records {
        let prompt = encode(
            "verbose",
            serde_json::json!({"question": r.question, "retrieved": shown(r)}),
        )?;
        verbose_requests.push(GenerateRequest {
            prompt,
            adapter: None,
            params: params(64, vec![]),
        });
    }
    let t = Instant::now();
    let verbose = engine.generate(&verbose_requests)?;
    let vsecs = t.elapsed().as_secs_f64();
    let mut concise_requests = Vec::new();
    for (r, v) in records.iter().zip(&verbose) {
        let reasoning = v.sequences[0].text.trim().to_string();
        let prompt = encode(
            "concise",
            serde_json::json!({"question": r.question, "reasoning": reasoning}),
        )?;
        concise_requests.push(GenerateRequest {
            prompt,
            adapter: None,
            params: params(16, vec!["\n".into()]),
        });
    }
    let t = Instant::now();
    let concise = engine.generate(&concise_requests)?;
    let csecs = t.elapsed().as_secs_f64();
    let (mut f1_raw, mut f1_grounded) = (0.0, 0.0);
    for (i, ((r, v), c)) in records.iter().zip(&verbose).zip(&concise).enumerate() {
        let raw = c.sequences[0]
            .text
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string();
        let texts: Vec<&str> = r
            .paragraphs
            .iter()
            .filter(|p| p.is_supporting)
            .map(|p| p.paragraph_text.as_str())
            .collect();
        let grounded = ground_answer(&raw, &texts).unwrap_or_else(|| raw.clone());
        f1_raw += answer_scores(&raw, &r.gold_answers()).1;
        f1_grounded += answer_scores(&grounded, &r.gold_answers()).1;
        if i < 4 {
            println!(
                "Q: {}\n  gold: {}\n  verbose: {}\n  concise: {raw:?} -> grounded {grounded:?}",
                r.question,
                r.answer,
                v.sequences[0].text.trim()
            );
        }
    }
    println!(
        "answers (gold support given): F1 raw {:.3}, grounded {:.3}; verbose {vsecs:.2}s, concise {csecs:.2}s for {} records",
        f1_raw / records.len() as f64,
        f1_grounded / records.len() as f64,
        records.len()
    );
    Ok(())
}
