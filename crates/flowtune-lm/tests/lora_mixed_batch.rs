//! Property on the real test model (SmolLM2-135M GGUF, f32): a left-padded batch whose rows use
//! random adapters (two rsLoRA adapters of different ranks/targets, or none) gives, row by row,
//! the logits of separate single-row passes — after the prefill (rows of ≥ 16 positions: the
//! gathered per-row path) and after one decode step through the KV cache (1 position: the
//! grouped path). Tolerance: max |Δlogit| <= 2e-3 (f32; padding changes reduction shapes).
//! Each assignment runs twice: through a wrapper delta that keeps the batch layout, and through
//! the bank's own `SelectedAdapters`, whose `for_packed_tokens` lets the prefill run its linears
//! over the real tokens only, each token with its row's adapter, and its last layer's output
//! projection and MLP at the read positions only.
//! Cases: 6 random assignments from proptest (the model run is the expensive part).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use flowtune_lm::loader::{load, LoadOptions};
use flowtune_lm::model::{LinearDelta, LogitsAt, Model};
use flowtune_lm::tokenizer::ChatMessage;
use flowtune_lora::{AdapterBank, AdapterId, AdapterSelection, LoraConfig, Module, Site};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tch::{Device, Kind, Tensor};

const TOL: f64 = 2e-3;

struct BankDelta<'a>(flowtune_lora::SelectedAdapters<'a>);

impl LinearDelta for BankDelta<'_> {
    fn delta(&self, layer: usize, module: &str, x: &Tensor) -> flowtune_lm::Result<Option<Tensor>> {
        self.0
            .delta(layer, module, x)
            .map_err(|e| flowtune_lm::Error::ModelInput(e.to_string()))
    }
}

/// The bank's own delta, recording the token rows the model asked a packed form for.
struct PackedSpy<'a> {
    inner: flowtune_lora::SelectedAdapters<'a>,
    token_rows: std::cell::RefCell<Vec<Vec<usize>>>,
}

impl LinearDelta for PackedSpy<'_> {
    fn delta(&self, layer: usize, module: &str, x: &Tensor) -> flowtune_lm::Result<Option<Tensor>> {
        LinearDelta::delta(&self.inner, layer, module, x)
    }

    fn row_independent(&self) -> bool {
        self.inner.row_independent()
    }

    fn for_packed_tokens(&self, token_rows: &[usize]) -> Option<Box<dyn LinearDelta + '_>> {
        self.token_rows.borrow_mut().push(token_rows.to_vec());
        self.inner.for_packed_tokens(token_rows)
    }
}

/// Prefill `rows` (left padded) then decode `next[i]` per row; returns (prefill, decode) last logits.
fn run(
    model: &Model,
    bank: &AdapterBank,
    rows: &[&Vec<i64>],
    next: &[i64],
    sel: &AdapterSelection,
) -> (Tensor, Tensor) {
    run_with(model, rows, next, &BankDelta(bank.select(sel)))
}

fn run_with(
    model: &Model,
    rows: &[&Vec<i64>],
    next: &[i64],
    delta: &dyn LinearDelta,
) -> (Tensor, Tensor) {
    let t = rows.iter().map(|r| r.len()).max().unwrap();
    let mut flat = vec![];
    let mut valid = vec![];
    for r in rows {
        let pad = t - r.len();
        flat.extend(std::iter::repeat_n(0i64, pad).chain(r.iter().copied()));
        valid.extend(std::iter::repeat_n(false, pad).chain(std::iter::repeat_n(true, r.len())));
    }
    let b = rows.len() as i64;
    let mut cache = model.new_cache(rows.len(), t + 1).unwrap();
    tch::no_grad(|| {
        let pre = model
            .forward_cached(
                &Tensor::from_slice(&flat).view([b, t as i64]),
                Some(&valid),
                &mut cache,
                &LogitsAt::Last,
                Some(delta),
            )
            .unwrap();
        let dec = model
            .forward_cached(
                &Tensor::from_slice(next).view([b, 1]),
                None,
                &mut cache,
                &LogitsAt::Last,
                Some(delta),
            )
            .unwrap();
        (pre, dec)
    })
}

#[test]
fn mixed_adapter_batch_equals_single_passes_on_the_real_model() {
    let model_path = flowtune_lm::locate_test_model().unwrap_or_else(|e| panic!("{e}"));
    let loaded = load(
        &model_path,
        &LoadOptions {
            device: Device::Cpu,
            dtype: Kind::Float,
            ..Default::default()
        },
    )
    .unwrap();
    let c = loaded.config.clone();
    let model = Model::new(&loaded.config, &loaded.weights).unwrap();
    let shapes = c.lora_base_shapes();
    let mut bank = AdapterBank::new(shapes, Device::Cpu);
    let configs = [
        LoraConfig::rslora(8, 16.0, &[Module::QProj, Module::VProj]),
        LoraConfig::rslora(
            4,
            8.0,
            &[
                Module::KProj,
                Module::OProj,
                Module::UpProj,
                Module::DownProj,
            ],
        ),
    ];
    tch::manual_seed(3);
    let mut ids: Vec<Option<AdapterId>> = vec![None];
    for (i, cfg) in configs.iter().enumerate() {
        let name = format!("a{i}");
        ids.push(Some(bank.add(&name, cfg, i as u64).unwrap()));
        bank.modify(&name, |a| {
            let sites: Vec<Site> = a.sites().copied().collect();
            for s in sites {
                let w = a.weights_mut(&s).unwrap();
                w.b.copy_(&(Tensor::randn(w.b.size(), (Kind::Float, Device::Cpu)) * 0.02));
            }
        })
        .unwrap();
    }
    let texts = [
        "Hi!",
        "Is Ghent on the river Lys? Answer Yes or No.",
        "What is 17 times 3? Think step by step and then give the answer.",
        "Write a haiku about adapters.",
        "Paragraph: The Eiffel Tower is in Paris.\nQuestion: Where is the Eiffel Tower?",
    ];
    let prompts: Vec<Vec<i64>> = texts
        .iter()
        .map(|t| {
            let m = [ChatMessage::new("user", *t)];
            loaded
                .tokenizer
                .encode_chat(&m, true)
                .unwrap()
                .into_iter()
                .map(i64::from)
                .collect()
        })
        .collect();
    assert!(
        prompts.iter().all(|p| p.len() >= 16),
        "prefill rows take the gathered path"
    );
    let next: Vec<i64> = (0..prompts.len() as i64).map(|i| 100 + 7 * i).collect();
    // Single-row passes for every (prompt, adapter choice).
    let singles: Vec<Vec<(Tensor, Tensor)>> = prompts
        .iter()
        .enumerate()
        .map(|(p, ids_p)| {
            ids.iter()
                .map(|id| {
                    let sel = match id {
                        Some(id) => AdapterSelection::All(*id),
                        None => AdapterSelection::None,
                    };
                    run(&model, &bank, &[ids_p], &[next[p]], &sel)
                })
                .collect()
        })
        .collect();
    // The adapters matter: single passes with and without differ.
    for s in &singles {
        for choice in 1..3 {
            let effect = (&s[choice].1 - &s[0].1).abs().max().double_value(&[]);
            assert!(
                effect > 0.05,
                "adapter {choice} changes the decode logits ({effect})"
            );
        }
    }
    let strategy = proptest::collection::vec((0usize..prompts.len(), 0usize..3), 2..6);
    let mut runner = TestRunner::new(Config {
        cases: 6,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&strategy, |assignment| {
            let rows: Vec<&Vec<i64>> = assignment.iter().map(|(p, _)| &prompts[*p]).collect();
            let nx: Vec<i64> = assignment.iter().map(|(p, _)| next[*p]).collect();
            let sel = AdapterSelection::PerRow(assignment.iter().map(|(_, a)| ids[*a]).collect());
            let batch_layout = run(&model, &bank, &rows, &nx, &sel);
            let spy = PackedSpy {
                inner: bank.select(&sel),
                token_rows: Default::default(),
            };
            let packed = run_with(&model, &rows, &nx, &spy);
            // Where padding is at least 1/32 of the prefill's slots (the model's packing
            // threshold), the model asks for the packed form with each real token's row (left
            // padding: row j's tokens, in order). Then, for the last layer, it asks for the
            // positions its logits read: each row's last token, one per row.
            let lens: Vec<usize> = rows.iter().map(|r| r.len()).collect();
            let slots = lens.len() * lens.iter().max().unwrap();
            let real: usize = lens.iter().sum();
            let mut want_asks = Vec::new();
            if (slots - real) * 32 >= slots {
                want_asks.push(
                    lens.iter()
                        .enumerate()
                        .flat_map(|(j, &l)| std::iter::repeat_n(j, l))
                        .collect::<Vec<usize>>(),
                );
            }
            want_asks.push((0..lens.len()).collect());
            prop_assert_eq!(spy.token_rows.into_inner(), want_asks);
            for (layout, (pre, dec)) in [("batch", batch_layout), ("packed", packed)] {
                for (j, (p, a)) in assignment.iter().enumerate() {
                    let (sp, sd) = &singles[*p][*a];
                    let dp = (pre.get(j as i64) - sp.squeeze_dim(0))
                        .abs()
                        .max()
                        .double_value(&[]);
                    let dd = (dec.get(j as i64) - sd.squeeze_dim(0))
                        .abs()
                        .max()
                        .double_value(&[]);
                    prop_assert!(
                        dp <= TOL && dd <= TOL,
                        "{layout}: row {j} prompt {p} adapter {a}: prefill {dp}, decode {dd}"
                    );
                }
            }
            Ok(())
        })
        .unwrap();
}
