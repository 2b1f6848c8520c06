//! The synthetic generator: deterministic, loader-valid, MuSiQue-shaped, answer spans verbatim.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use musique::data::{hop_distribution, parse_records, to_jsonl};
use musique::metrics::normalize_answer;
use musique::synth::{generate, SynthConfig};
use proptest::prelude::*;

fn config(seed: u64, questions: usize, twins: bool) -> SynthConfig {
    SynthConfig {
        seed,
        questions,
        unanswerable_twins: twins,
        ..SynthConfig::default()
    }
}

#[test]
fn deterministic_and_seed_dependent() {
    let a = generate(&config(3, 50, true)).unwrap();
    assert_eq!(a, generate(&config(3, 50, true)).unwrap());
    assert_ne!(a, generate(&config(4, 50, true)).unwrap());
}

#[test]
fn round_trips_through_the_validating_loader() {
    let records = generate(&config(1, 200, true)).unwrap();
    assert_eq!(records.len(), 400);
    let parsed = parse_records(&to_jsonl(&records).unwrap(), "synthetic.jsonl").unwrap();
    assert_eq!(parsed, records);
}

#[test]
fn questions_look_like_musique() {
    let records = generate(&config(5, 300, false)).unwrap();
    let hops = hop_distribution(&records);
    // Weights 0.5/0.3/0.2 over 300 draws: each within 45 of its expectation (> 4 sigma).
    assert!((hops[&2] as f64 - 150.0).abs() < 45.0, "{hops:?}");
    assert!((hops[&3] as f64 - 90.0).abs() < 45.0, "{hops:?}");
    assert!((hops[&4] as f64 - 60.0).abs() < 45.0, "{hops:?}");
    for r in &records {
        let h = r.hops().unwrap();
        let prefix = r.id.split("__").next().unwrap();
        assert_eq!(
            prefix,
            if h == 2 {
                "2hop".to_string()
            } else {
                format!("{h}hop1")
            }
        );
        assert_eq!(r.id.split("__").nth(1).unwrap().split('_').count(), h);
        assert_eq!(r.paragraphs.len(), 6);
        assert!(r.question.ends_with('?'));
        // Every hop's fact is in its own supporting paragraph that names the step's answer,
        // and (after the first) the previous step's answer as its subject.
        let mut support = Vec::new();
        for (k, step) in r.question_decomposition.iter().enumerate() {
            let idx = step.paragraph_support_idx.unwrap();
            let p = &r.paragraphs[idx];
            assert!(p.is_supporting);
            assert!(
                p.paragraph_text.contains(&step.answer),
                "{}: {}",
                r.id,
                p.paragraph_text
            );
            if k > 0 {
                assert_eq!(step.question.split(" >> ").next().unwrap(), format!("#{k}"));
                assert_eq!(p.title, r.question_decomposition[k - 1].answer);
            } else {
                assert!(
                    r.question.contains(&p.title),
                    "{}: first entity in the question",
                    r.id
                );
            }
            support.push(idx);
        }
        support.sort();
        support.dedup();
        assert_eq!(support.len(), h, "one paragraph per hop");
        // The answer span is verbatim in the last hop's paragraph, and its aliases normalise apart.
        let last = r.question_decomposition.last().unwrap();
        assert_eq!(last.answer, r.answer);
        assert!(r.paragraphs[last.paragraph_support_idx.unwrap()]
            .paragraph_text
            .contains(&r.answer));
        for alias in &r.answer_aliases {
            assert!(r.answer.contains(alias.as_str()));
            assert_ne!(normalize_answer(alias), normalize_answer(&r.answer));
        }
        // Short paragraphs (CPU context cost): at most 40 words.
        assert!(r
            .paragraphs
            .iter()
            .all(|p| p.paragraph_text.split_whitespace().count() <= 40));
    }
    // Some answers have aliases (person surnames, company stems).
    assert!(records.iter().any(|r| !r.answer_aliases.is_empty()));
}

#[test]
fn distractors_never_restate_a_hop() {
    for r in generate(&config(9, 200, false)).unwrap() {
        for step in &r.question_decomposition {
            let idx = step.paragraph_support_idx.unwrap();
            let subject = &r.paragraphs[idx].title;
            for p in r.paragraphs.iter().filter(|p| !p.is_supporting) {
                // A distractor about the hop's object must not name the hop's subject (spouse reversal).
                let states = p.paragraph_text.contains(subject.as_str())
                    && p.paragraph_text.contains(step.answer.as_str());
                assert!(
                    !states,
                    "{}: distractor restates hop: {}",
                    r.id, p.paragraph_text
                );
            }
        }
    }
}

#[test]
fn unanswerable_twins_lack_exactly_one_support() {
    let records = generate(&config(2, 100, true)).unwrap();
    for pair in records.chunks(2) {
        let [a, b] = pair else { panic!("odd count") };
        assert_eq!(a.id, b.id);
        assert_ne!(a.answerable, b.answerable);
        let (yes, no) = if a.answerable { (a, b) } else { (b, a) };
        assert_eq!(yes.question, no.question);
        assert_eq!(no.gold_support().len() + 1, yes.gold_support().len());
        let removed: Vec<_> = no
            .question_decomposition
            .iter()
            .filter(|s| s.paragraph_support_idx.is_none())
            .collect();
        assert_eq!(removed.len(), 1);
        // The removed fact's paragraph is gone: no paragraph of the twin states it.
        let k = no
            .question_decomposition
            .iter()
            .position(|s| s.paragraph_support_idx.is_none())
            .unwrap();
        let original = &yes.paragraphs
            [yes.question_decomposition[k].paragraph_support_idx.unwrap()]
        .paragraph_text;
        assert!(no.paragraphs.iter().all(|p| &p.paragraph_text != original));
        assert_eq!(no.paragraphs.len(), yes.paragraphs.len());
    }
    // Both orders occur within pairs.
    assert!(
        records.chunks(2).any(|p| p[0].answerable) && records.chunks(2).any(|p| !p[0].answerable)
    );
}

#[test]
fn bad_configs_are_typed_errors() {
    let mut c = SynthConfig {
        paragraphs: 3,
        ..SynthConfig::default()
    };
    assert!(matches!(
        generate(&c),
        Err(musique::Error::SynthConfig {
            field: "paragraphs",
            ..
        })
    ));
    c.paragraphs = 6;
    c.hop_weights = [0.0, 0.0, 0.0];
    assert!(matches!(
        generate(&c),
        Err(musique::Error::SynthConfig {
            field: "hop_weights",
            ..
        })
    ));
    let back: SynthConfig =
        serde_json::from_str(&serde_json::to_string(&SynthConfig::default()).unwrap()).unwrap();
    assert_eq!(back, SynthConfig::default());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]
    #[test]
    fn any_seed_and_shape_is_loader_valid(seed in 0u64..1_000_000, paragraphs in 4usize..12, twins: bool, w in proptest::array::uniform3(0.0f64..1.0)) {
        prop_assume!(w.iter().sum::<f64>() > 0.01);
        let records = generate(&SynthConfig { seed, questions: 20, hop_weights: w, paragraphs, unanswerable_twins: twins }).unwrap();
        let parsed = parse_records(&to_jsonl(&records).unwrap(), "p.jsonl").unwrap();
        prop_assert_eq!(parsed, records);
    }
}
