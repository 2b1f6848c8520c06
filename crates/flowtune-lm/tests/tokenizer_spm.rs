//! SentencePiece-style GGUF tokenizers (`tokenizer.ggml.model = "llama"`, no merges
//! in the file: they are derived from the scores) give the same ids and decoded text
//! as transformers' GGUF tokenizer for the same file (`lm_load_ref.py tokenize`), on
//! multilingual strings (characters outside the vocabulary go through byte
//! fallback), for the `llama` (Metaspace) and `phi3` (normalizer) variants. The
//! vocabulary is synthetic: character n-grams of a small corpus, scored by frequency.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod loader_support;

use std::collections::HashMap;

use flowtune_lm::gguf::{encode_gguf, parse_header, GgufValue};
use flowtune_lm::tokenizer::Tokenizer;
use loader_support::{read_json, run_reference};

const CORPUS: &str = "the quick brown fox jumps over the lazy dog. the dog sleeps; the fox runs. \
    a question about the river and the bridge: which river has the longest bridge? \
    Paris is the capital of France, and Tokyo is the capital of Japan. \
    le renard brun saute par-dessus le chien paresseux. der schnelle braune Fuchs.";

fn spm_gguf(arch: &str) -> Vec<u8> {
    let mut counts: HashMap<String, usize> = HashMap::new();
    let text: String = format!("▁{}", CORPUS.replace(' ', "▁"));
    let chars: Vec<char> = text.chars().collect();
    for n in 1..=5 {
        for w in chars.windows(n) {
            *counts.entry(w.iter().collect()).or_default() += 1;
        }
    }
    let mut pieces: Vec<(String, usize)> = counts
        .into_iter()
        .filter(|(p, c)| *c >= 2 || p.chars().count() == 1)
        .collect();
    pieces.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let s = |v: &str| GgufValue::String(v.into());
    let mut tokens = vec![s("<unk>"), s("<s>"), s("</s>")];
    let mut types = vec![GgufValue::I32(2), GgufValue::I32(3), GgufValue::I32(3)];
    let mut scores = vec![GgufValue::F32(0.0); 3];
    for b in 0..=255u8 {
        tokens.push(s(&format!("<0x{b:02X}>")));
        types.push(GgufValue::I32(6));
        scores.push(GgufValue::F32(0.0));
    }
    for (rank, (p, _)) in pieces.iter().enumerate() {
        tokens.push(s(p));
        types.push(GgufValue::I32(1));
        scores.push(GgufValue::F32(-(rank as f32)));
    }
    let n = tokens.len() as u32;
    let md: Vec<(String, GgufValue)> = vec![
        ("general.architecture".into(), s(arch)),
        ("general.name".into(), s("spm-test")),
        (format!("{arch}.block_count"), GgufValue::U32(1)),
        (format!("{arch}.context_length"), GgufValue::U32(128)),
        (format!("{arch}.embedding_length"), GgufValue::U32(64)),
        (format!("{arch}.feed_forward_length"), GgufValue::U32(128)),
        (format!("{arch}.attention.head_count"), GgufValue::U32(4)),
        (format!("{arch}.attention.head_count_kv"), GgufValue::U32(4)),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            GgufValue::F32(1e-5),
        ),
        (format!("{arch}.vocab_size"), GgufValue::U32(n)),
        ("tokenizer.ggml.model".into(), s("llama")),
        ("tokenizer.ggml.tokens".into(), GgufValue::Array(tokens)),
        ("tokenizer.ggml.scores".into(), GgufValue::Array(scores)),
        ("tokenizer.ggml.token_type".into(), GgufValue::Array(types)),
        ("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(2)),
        ("tokenizer.ggml.unknown_token_id".into(), GgufValue::U32(0)),
    ];
    encode_gguf(&md, &[])
}

#[test]
fn sentencepiece_gguf_tokenizer_matches_transformers() {
    let texts: Vec<String> = [
        "the quick brown fox",
        "The Quick Brown Fox!",
        "  two leading spaces and   inner   runs ",
        "Which river has the longest bridge?",
        "le renard saute; der Fuchs läuft. Ça va?",
        "東京 and 北京 are capitals 🗼",
        "line one\nline two\ttabbed",
        "<s>the dog</s>",
        "",
        "x",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let inp = dir.path().join("in.json");
    std::fs::write(&inp, serde_json::to_string(&texts).expect("json")).expect("write");
    let mut distinct = std::collections::HashSet::new();
    for arch in ["llama", "phi3"] {
        let bytes = spm_gguf(arch);
        let gguf = dir.path().join(format!("spm-{arch}.gguf"));
        std::fs::write(&gguf, &bytes).expect("write gguf");
        let out = dir.path().join(format!("out-{arch}.json"));
        run_reference(&[
            "tokenize".as_ref(),
            gguf.as_os_str(),
            inp.as_os_str(),
            out.as_os_str(),
        ]);
        let reference = read_json(&out);
        let header = parse_header(&bytes, &gguf).expect("parse");
        let tok = Tokenizer::from_gguf(&header, &gguf).expect("tokenizer");
        for (i, text) in texts.iter().enumerate() {
            let ours = tok.encode(text).expect("encode");
            let theirs: Vec<u32> =
                serde_json::from_value(reference["ids"][i].clone()).expect("ids");
            assert_eq!(ours, theirs, "{arch}: ids differ for {text:?}");
            if i < 3 {
                eprintln!("{arch} {text:?} -> {ours:?}");
            }
            distinct.insert((arch, ours.clone()));
            let decoded = tok.decode(&ours, false).expect("decode");
            assert_eq!(
                decoded,
                reference["decoded"][i].as_str().expect("decoded"),
                "{arch}: decode of {text:?}"
            );
        }
        // Merges really apply: "the quick brown fox" (19 characters) is at most 10 tokens.
        let few = tok.encode("the quick brown fox").expect("encode").len();
        assert!(
            few <= 10,
            "{arch}: {few} tokens for 19 characters, merges not applied?"
        );
    }
    // The two variants differ on leading spaces (Metaspace vs normalizer).
    assert!(
        distinct.len() > texts.len(),
        "llama and phi3 variants tokenised everything identically"
    );
}
