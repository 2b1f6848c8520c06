//! The engine on the real SmolLM2 GGUF (float32, CPU): batching, prefix reuse,
//! scoring, label choice, sampling, beam and diverse beam search.
//!
//! References: our own full forward (`Model::forward`, itself checked against
//! transformers in `parity_gguf` / `arch_tiny`) for score/classify (tolerance
//! 1e-4 on summed log-probs), unbatched runs for batched ones (exact ids), and
//! transformers' beam search (`lm_model_ref.py beam`) for num_beams = 4.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod model_support;

use flowtune_lm::engine::*;
use flowtune_lm::loader::{load, LoadOptions};
use flowtune_lm::tokenizer::ChatMessage;
use model_support::*;
use tch::{Device, Kind, Tensor};

fn engine_with(min_shared_prefix: usize) -> Engine {
    engine_with_config(EngineConfig {
        min_shared_prefix,
        ..Default::default()
    })
}

fn engine_with_config(config: EngineConfig) -> Engine {
    let loaded = load(
        &test_model(),
        &LoadOptions {
            device: Device::Cpu,
            dtype: Kind::Float,
            ..Default::default()
        },
    )
    .unwrap();
    Engine::new(loaded, config).unwrap()
}

/// Tensors are not `Sync`, so every test loads its own engine (about a second).
fn engine() -> Engine {
    engine_with(8)
}

fn chat(e: &Engine, text: &str) -> Vec<u32> {
    e.tokenizer()
        .encode_chat(&[ChatMessage::new("user", text)], true)
        .unwrap()
}

fn greedy(prompt: Vec<u32>, n: usize) -> GenerateRequest {
    GenerateRequest {
        adapter: None,
        prompt,
        params: GenerationParams {
            max_new_tokens: n,
            ..Default::default()
        },
    }
}

#[test]
fn batched_greedy_equals_unbatched_on_ragged_prompts() {
    let e = &engine();
    let texts = [
        "Hi",
        "Name three colours of the rainbow, please.",
        "What is the capital of Italy? Answer in one word.",
        "Tell me a very short story about a cat who learns to swim in the sea near a lighthouse.",
    ];
    let reqs: Vec<_> = texts.iter().map(|t| greedy(chat(e, t), 16)).collect();
    let batched = e.generate(&reqs).unwrap();
    for (r, b) in reqs.iter().zip(&batched) {
        let single = e.generate(std::slice::from_ref(r)).unwrap();
        assert_eq!(
            single[0].sequences[0].ids,
            b.sequences[0].ids,
            "batched != unbatched for prompt of {} tokens",
            r.prompt.len()
        );
        assert!(!b.sequences[0].ids.is_empty());
    }
}

/// Full-forward reference: summed log-softmax of the completion tokens.
fn reference_logprob(e: &Engine, prompt: &[u32], completion: &[u32]) -> f64 {
    let all: Vec<i64> = prompt.iter().chain(completion).map(|&x| x as i64).collect();
    let ids = Tensor::from_slice(&all).view([1, -1]);
    let logits = tch::no_grad(|| e.model().forward(&ids, &ids.ones_like(), None)).unwrap();
    let logp = logits.to_kind(Kind::Float).log_softmax(-1, Kind::Float);
    completion
        .iter()
        .enumerate()
        .map(|(j, &t)| logp.double_value(&[0, (prompt.len() + j - 1) as i64, t as i64]))
        .sum()
}

#[test]
fn score_equals_full_forward_log_softmax_with_and_without_prefix_reuse() {
    let e = &engine();
    let q = "Question: which city hosts the Eiffel Tower? Is the following paragraph relevant?";
    let prompts: Vec<Vec<u32>> = [
        "Paris is in France.",
        "Bananas are yellow.",
        "The tower was built in 1889 for the World's Fair in Paris.",
    ]
    .iter()
    .map(|p| chat(e, &format!("{q}\n{p}")))
    .collect();
    let completions: Vec<Vec<u32>> = ["Yes, it is.", "No.", "Yes, it mentions the tower in Paris."]
        .iter()
        .map(|c| e.tokenizer().encode(c).unwrap())
        .collect();
    let reqs: Vec<ScoreRequest> = prompts
        .iter()
        .zip(&completions)
        .map(|(p, c)| ScoreRequest {
            adapter: None,
            prompt: p.clone(),
            completion: c.clone(),
        })
        .collect();
    let shared = e.score(&reqs).unwrap();
    let unshared = engine_with(usize::MAX).score(&reqs).unwrap();
    for ((r, s), u) in reqs.iter().zip(&shared).zip(&unshared) {
        let want = reference_logprob(e, &r.prompt, &r.completion);
        assert!(
            (s.logprob - want).abs() < 1e-4,
            "shared-prefix score {} vs full forward {want}",
            s.logprob
        );
        assert!(
            (u.logprob - want).abs() < 1e-4,
            "score {} vs full forward {want}",
            u.logprob
        );
        assert_eq!(s.token_logprobs.len(), r.completion.len());
    }
    // A later call with the same prompts and other completions starts from the prefix store
    // and still equals the full forward. The store keeps whole prompts but lets a new one
    // replace an entry it shares more than half of, so here at least the three prompts'
    // common start (the question) is served to every row, and all of the last-stored one.
    let (hits_before, _) = e.prefix_store_stats();
    let again: Vec<ScoreRequest> = reqs
        .iter()
        .rev()
        .map(|r| ScoreRequest {
            completion: e.tokenizer().encode(" Maybe not.").unwrap(),
            ..r.clone()
        })
        .collect();
    let stored = e.score(&again).unwrap();
    let (hits_after, _) = e.prefix_store_stats();
    let common = prompts[1..].iter().fold(prompts[0].len(), |n, p| {
        n.min(
            p.iter()
                .zip(&prompts[0])
                .take_while(|(a, b)| a == b)
                .count(),
        )
    });
    let last = prompts[2].len() - 1;
    let served = hits_after - hits_before;
    assert!(
        served >= 2 * common + last,
        "{served} prompt tokens served from the store, expected at least {}",
        2 * common + last
    );
    for (r, s) in again.iter().zip(&stored) {
        let want = reference_logprob(e, &r.prompt, &r.completion);
        assert!(
            (s.logprob - want).abs() < 1e-4,
            "score from the store {} vs full forward {want}",
            s.logprob
        );
    }
}

#[test]
fn classify_twenty_paragraphs_after_shared_question_matches_full_forward() {
    let e = &engine();
    let yes = e.tokenizer().token_to_id("Yes").unwrap();
    let no = e.tokenizer().token_to_id("No").unwrap();
    let system = ChatMessage::new(
        "system",
        "Decide whether the paragraph helps answer the question. Reply Yes or No.",
    );
    let reqs: Vec<ClassifyRequest> = (0..20)
        .map(|i| {
            let user = format!(
                "Question: Who designed the tower in the capital of France?\nParagraph {i}: {}",
                "lorem ipsum ".repeat(i % 5 + 1)
            );
            ClassifyRequest {
                adapter: None,
                prompt: e
                    .tokenizer()
                    .encode_chat(&[system.clone(), ChatMessage::new("user", user)], true)
                    .unwrap(),
                labels: vec![yes, no],
            }
        })
        .collect();
    let out = e.classify(&reqs).unwrap();
    for (r, o) in reqs.iter().zip(&out) {
        let ids: Vec<i64> = r.prompt.iter().map(|&x| x as i64).collect();
        let ids = Tensor::from_slice(&ids).view([1, -1]);
        let logits = tch::no_grad(|| e.model().forward(&ids, &ids.ones_like(), None)).unwrap();
        let last = logits
            .get(0)
            .get(r.prompt.len() as i64 - 1)
            .to_kind(Kind::Float)
            .log_softmax(-1, Kind::Float);
        let (ly, ln) = (
            last.double_value(&[yes as i64]),
            last.double_value(&[no as i64]),
        );
        let lse = ly.max(ln) + ((ly - ly.max(ln)).exp() + (ln - ly.max(ln)).exp()).ln();
        assert!(
            (o.label_logprobs[0] - (ly - lse)).abs() < 1e-4
                && (o.label_logprobs[1] - (ln - lse)).abs() < 1e-4
        );
        assert!((o.raw_logprobs[0] - ly).abs() < 1e-4);
    }
}

/// The prefix store: a second round of relevance-style prompts (paragraph first, then a new
/// query) reuses the first round's keys and values and gives the same label log-probs as an
/// engine without the store (tolerance 1e-4, as above).
#[test]
fn classify_reuses_stored_prefixes_across_calls() {
    let with = engine();
    let without = engine_with_config(EngineConfig {
        min_shared_prefix: 8,
        prefix_store_bytes: 0,
        ..Default::default()
    });
    let yes = with.tokenizer().token_to_id("Yes").unwrap();
    let no = with.tokenizer().token_to_id("No").unwrap();
    let round = |e: &Engine, query: &str| -> Vec<ClassifyRequest> {
        (0..6)
            .map(|i| {
                let user = format!(
                    "Paragraph: Tower {i}. {}\nQuestion: Who designed the tower in Paris?\nQuery: {query}\nIs the paragraph needed?",
                    "It stands by the river and was built of iron. ".repeat(i % 3 + 1)
                );
                ClassifyRequest {
                    adapter: None,
                    prompt: e.tokenizer().encode_chat(&[ChatMessage::new("user", user)], true).unwrap(),
                    labels: vec![yes, no],
                }
            })
            .collect()
    };
    let first = with.classify(&round(&with, "tower designer")).unwrap();
    let (hits_before, _) = with.prefix_store_stats();
    let second = with
        .classify(&round(&with, "architect of the iron tower"))
        .unwrap();
    let (hits_after, looked_up) = with.prefix_store_stats();
    assert!(
        hits_after - hits_before >= 6 * 20,
        "second round reused only {} tokens (of {looked_up} looked up)",
        hits_after - hits_before
    );
    for (query, got) in [
        ("tower designer", &first),
        ("architect of the iron tower", &second),
    ] {
        let want = without.classify(&round(&without, query)).unwrap();
        for (a, b) in got.iter().zip(&want) {
            for (x, y) in a.raw_logprobs.iter().zip(&b.raw_logprobs) {
                assert!((x - y).abs() < 1e-4, "{query}: {x} vs {y}");
            }
        }
    }
    assert_eq!(without.prefix_store_stats().0, 0);
}

/// The prefix store serves generation too: a second round of prompts extending the first
/// round's (the query node's "found" paragraphs, one more each round), mixed with a prompt the
/// store has never seen, gives the same greedy ids as an engine without the store, with summed
/// log-probs within 1e-4 (float32), and reuses the first round's keys and values.
#[test]
fn generate_reuses_stored_prompts_across_rounds() {
    let with = engine();
    let without = engine_with_config(EngineConfig {
        min_shared_prefix: 8,
        prefix_store_bytes: 0,
        ..Default::default()
    });
    let facts = [
        "The Iron Tower was designed by Ada Lind.",
        "Ada Lind was born in the town of Varno.",
        "Varno lies on the river Sel.",
    ];
    let prompt = |e: &Engine, q: usize, found: usize| -> Vec<u32> {
        let mut user = format!("Question: Where was the designer of tower {q} born?\n");
        for f in &facts[..found] {
            user.push_str(&format!("Found: {f}\n"));
        }
        user.push_str("Write a search query for the next fact needed.");
        chat(e, &user)
    };
    let round = |e: &Engine, found: usize, fresh: bool| -> Vec<GenerateRequest> {
        let mut reqs: Vec<_> = (0..3).map(|q| greedy(prompt(e, q, found), 10)).collect();
        if fresh {
            reqs.push(greedy(chat(e, "Name a river in a made-up country."), 10));
        }
        reqs
    };
    let first = with.generate(&round(&with, 1, false)).unwrap();
    let (hits_before, _) = with.prefix_store_stats();
    let second = with.generate(&round(&with, 2, true)).unwrap();
    let (hits_after, looked_up) = with.prefix_store_stats();
    assert!(
        hits_after - hits_before >= 3 * 20,
        "second round reused only {} tokens (of {looked_up} looked up)",
        hits_after - hits_before
    );
    for (found, fresh, got) in [(1, false, &first), (2, true, &second)] {
        let want = without.generate(&round(&without, found, fresh)).unwrap();
        for (a, b) in got.iter().zip(&want) {
            assert_eq!(
                a.sequences[0].ids, b.sequences[0].ids,
                "round with {found} found"
            );
            assert!((a.sequences[0].logprob - b.sequences[0].logprob).abs() < 1e-4);
        }
    }
    assert_eq!(without.prefix_store_stats().0, 0);
}

/// Diverse beam search on a prompt a greedy call just ran (a flow's deviation at a node
/// call) starts from the stored prompt: it reuses its keys and values and returns the same
/// sequences as an engine without the store, scores within 1e-4 (float32).
#[test]
fn beam_search_starts_from_a_stored_prompt() {
    let with = engine();
    let without = engine_with_config(EngineConfig {
        min_shared_prefix: 8,
        prefix_store_bytes: 0,
        ..Default::default()
    });
    let beam = |e: &Engine| {
        let prompt = chat(
            e,
            "Paragraphs: The Iron Tower was designed by Ada Lind. Ada Lind was born in Varno.\n\
             Question: Where was the designer of the Iron Tower born? Think step by step.",
        );
        let _ = e.generate(&[greedy(prompt.clone(), 6)]).unwrap();
        e.generate(&[GenerateRequest {
            adapter: None,
            prompt,
            params: GenerationParams {
                max_new_tokens: 8,
                num_return_sequences: 2,
                decoding: Decoding::Beam {
                    num_beams: 2,
                    num_beam_groups: 2,
                    diversity_penalty: 1.0,
                    length_penalty: 1.0,
                },
                ..Default::default()
            },
        }])
        .unwrap()
    };
    let (hits_before, _) = with.prefix_store_stats();
    let got = beam(&with);
    let (hits_after, looked_up) = with.prefix_store_stats();
    assert!(
        hits_after - hits_before >= 30,
        "beam search reused only {} tokens (of {looked_up} looked up)",
        hits_after - hits_before
    );
    let want = beam(&without);
    assert_eq!(got[0].sequences.len(), 2);
    for (a, b) in got[0].sequences.iter().zip(&want[0].sequences) {
        assert_eq!(a.ids, b.ids);
        assert!(
            (a.score - b.score).abs() < 1e-4,
            "{} vs {}",
            a.score,
            b.score
        );
        assert!((a.logprob - b.logprob).abs() < 1e-4);
    }
}

#[test]
fn seeded_sampling_is_reproducible_and_independent_of_batching() {
    let e = &engine();
    let params = GenerationParams {
        max_new_tokens: 12,
        num_return_sequences: 3,
        decoding: Decoding::Sample {
            temperature: 0.9,
            top_k: 50,
            top_p: 0.95,
            seed: 7,
        },
        ..Default::default()
    };
    let a = GenerateRequest {
        adapter: None,
        prompt: chat(e, "Write a haiku about rain."),
        params: params.clone(),
    };
    let b = GenerateRequest {
        adapter: None,
        prompt: chat(e, "Hi"),
        params,
    };
    let together = e.generate(&[a.clone(), b]).unwrap();
    let alone = e.generate(&[a]).unwrap();
    // Same tokens; log-probs equal up to float noise from the batch shape (1e-3).
    for (x, y) in together[0].sequences.iter().zip(&alone[0].sequences) {
        assert_eq!(x.ids, y.ids);
        assert!((x.logprob - y.logprob).abs() < 1e-3);
    }
    assert_eq!(together[0].sequences.len(), 3);
    let distinct: std::collections::HashSet<_> = together[0]
        .sequences
        .iter()
        .map(|s| s.ids.clone())
        .collect();
    assert!(
        distinct.len() >= 2,
        "three samples at temperature 0.9 were all identical"
    );
}

#[test]
fn beam_search_matches_transformers_and_diverse_beams_are_distinct() {
    let e = &engine();
    let prompts = vec![
        chat(e, "What is the capital of France?"),
        chat(e, "Give me a synonym for happy."),
    ];
    let dir = tempfile::tempdir().unwrap();
    let pj = dir.path().join("beam_prompts.json");
    std::fs::write(&pj, serde_json::to_string(&prompts).unwrap()).unwrap();
    let new_tokens = 10;
    run_reference(&[
        "beam",
        "--out",
        dir.path().to_str().unwrap(),
        "--model",
        test_model().to_str().unwrap(),
        "--prompts",
        pj.to_str().unwrap(),
        "--new-tokens",
        &new_tokens.to_string(),
    ]);
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("beam_golden.json")).unwrap(),
    )
    .unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let out = e
            .generate(&[GenerateRequest {
                adapter: None,
                prompt: p.clone(),
                params: GenerationParams {
                    max_new_tokens: new_tokens,
                    num_return_sequences: 4,
                    decoding: Decoding::Beam {
                        num_beams: 4,
                        num_beam_groups: 1,
                        diversity_penalty: 0.0,
                        length_penalty: 1.0,
                    },
                    ..Default::default()
                },
            }])
            .unwrap();
        let want: Vec<Vec<u32>> = golden[i]["sequences"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let ids: Vec<u32> = s
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect();
                // transformers pads finished beams (pad = EOS here): keep up to the first EOS.
                match ids.iter().position(|t| e.eos_token_ids().contains(t)) {
                    Some(k) => ids[..=k].to_vec(),
                    None => ids,
                }
            })
            .collect();
        let got: Vec<Vec<u32>> = out[0].sequences.iter().map(|s| s.ids.clone()).collect();
        assert_eq!(
            got[0], want[0],
            "prompt {i}: best beam differs from transformers"
        );
        assert_eq!(got, want, "prompt {i}: beams differ from transformers");
        let want_scores: Vec<f64> = golden[i]["scores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        for (s, w) in out[0].sequences.iter().zip(&want_scores) {
            assert!(
                (s.score - w).abs() < 1e-3,
                "prompt {i}: beam score {} vs transformers {w}",
                s.score
            );
        }
    }
    // Diverse beam search (4 beams, 2 groups, penalty 1.0) against the reference script's
    // re-implementation of transformers 4.x group beam search (removed from transformers 5).
    let group_golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("group_beam_golden.json")).unwrap(),
    )
    .unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let out = e
            .generate(&[GenerateRequest {
                adapter: None,
                prompt: p.clone(),
                params: GenerationParams {
                    max_new_tokens: new_tokens,
                    num_return_sequences: 4,
                    decoding: Decoding::Beam {
                        num_beams: 4,
                        num_beam_groups: 2,
                        diversity_penalty: 1.0,
                        length_penalty: 1.0,
                    },
                    ..Default::default()
                },
            }])
            .unwrap();
        let want: Vec<Vec<u32>> = group_golden[i]["sequences"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                s.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect()
            })
            .collect();
        let got: Vec<Vec<u32>> = out[0].sequences.iter().map(|s| s.ids.clone()).collect();
        assert_eq!(
            got, want,
            "prompt {i}: diverse beams differ from the group beam search reference"
        );
        let want_scores: Vec<f64> = group_golden[i]["scores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        for (s, w) in out[0].sequences.iter().zip(&want_scores) {
            assert!(
                (s.score - w).abs() < 1e-3,
                "prompt {i}: diverse beam score {} vs reference {w}",
                s.score
            );
        }
    }
    // Diverse beam search: 4 beams in 2 groups, penalty 1.0: 4 distinct sequences.
    let out = e
        .generate(&[GenerateRequest {
            adapter: None,
            prompt: prompts[1].clone(),
            params: GenerationParams {
                max_new_tokens: 8,
                num_return_sequences: 4,
                decoding: Decoding::Beam {
                    num_beams: 4,
                    num_beam_groups: 2,
                    diversity_penalty: 1.0,
                    length_penalty: 1.0,
                },
                ..Default::default()
            },
        }])
        .unwrap();
    let seqs: std::collections::HashSet<_> =
        out[0].sequences.iter().map(|s| s.ids.clone()).collect();
    assert_eq!(
        seqs.len(),
        4,
        "diverse beam search returned duplicates: {:?}",
        out[0].sequences
    );
}

#[test]
fn stop_strings_and_bad_requests() {
    let e = &engine();
    let out = e
        .generate(&[GenerateRequest {
            adapter: None,
            prompt: chat(e, "Count from 1 to 20 separated by commas."),
            params: GenerationParams {
                max_new_tokens: 40,
                stop: vec!["5".into()],
                ..Default::default()
            },
        }])
        .unwrap();
    let s = &out[0].sequences[0];
    assert!(
        s.finish == FinishReason::Stop && s.text.contains('5'),
        "{s:?}"
    );
    let err = e.generate(&[greedy(vec![], 4)]).unwrap_err();
    assert!(
        matches!(err, flowtune_lm::Error::InvalidRequest { index: 0, .. }),
        "{err}"
    );
    let err = e
        .score(&[ScoreRequest {
            adapter: None,
            prompt: vec![1],
            completion: vec![u32::MAX],
        }])
        .unwrap_err();
    assert!(err.to_string().contains("vocab"), "{err}");
}
