//! Merging a LoRA adapter into the real model's base weights (SmolLM2-135M GGUF, f32) gives
//! the logits of running the adapter as a delta, and unmerging restores the base logits.
//! Tolerances: merged vs delta 1e-3 (the same math summed in another order over 30 layers);
//! unmerged vs base 1e-3 (f32 rounding of `w + ΔW − ΔW`); both measured well below that.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use flowtune_lm::loader::{load, LoadOptions};
use flowtune_lm::model::{LinearDelta, Model};
use flowtune_lora::{AdapterBank, AdapterSelection, LoraConfig, Module};
use tch::{Device, Kind, Tensor};

struct BankDelta<'a>(flowtune_lora::SelectedAdapters<'a>);

impl LinearDelta for BankDelta<'_> {
    fn delta(&self, layer: usize, module: &str, x: &Tensor) -> flowtune_lm::Result<Option<Tensor>> {
        self.0
            .delta(layer, module, x)
            .map_err(|e| flowtune_lm::Error::ModelInput(e.to_string()))
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn merge_matches_delta_and_unmerge_restores_the_base() {
    let path = flowtune_lm::locate_test_model().unwrap_or_else(|e| panic!("{e}"));
    let loaded = load(
        &path,
        &LoadOptions {
            device: Device::Cpu,
            dtype: Kind::Float,
            ..Default::default()
        },
    )
    .unwrap();
    let c = loaded.config.clone();
    let mut model = Model::new(&loaded.config, &loaded.weights).unwrap();
    let shapes = c.lora_base_shapes();
    let mut bank = AdapterBank::new(shapes, Device::Cpu);
    // Every module kind, so q/k/v (views of the fused qkv) and gate/up (views of the fused
    // gate_up) are all exercised.
    let all = [
        Module::QProj,
        Module::KProj,
        Module::VProj,
        Module::OProj,
        Module::GateProj,
        Module::UpProj,
        Module::DownProj,
    ];
    let id = bank
        .add("node", &LoraConfig::rslora(8, 16.0, &all), 5)
        .unwrap();
    tch::manual_seed(9);
    bank.modify("node", |a| {
        let sites: Vec<_> = a.sites().copied().collect();
        for s in sites {
            let w = a.weights_mut(&s).unwrap();
            let noise = Tensor::randn(w.b.size(), (Kind::Float, Device::Cpu)) * 0.02;
            w.b.copy_(&noise);
        }
    })
    .unwrap();

    let prompt = loaded
        .tokenizer
        .encode_chat(
            &[flowtune_lm::tokenizer::ChatMessage::new(
                "user",
                "Which river flows through Vienna?",
            )],
            true,
        )
        .unwrap();
    let ids =
        Tensor::from_slice(&prompt.iter().map(|&t| t as i64).collect::<Vec<_>>()).unsqueeze(0);
    let mask = Tensor::ones_like(&ids);
    let last = |t: Tensor| t.select(1, -1);

    let base = tch::no_grad(|| last(model.forward(&ids, &mask, None).unwrap()));
    let sel = AdapterSelection::All(id);
    let delta = BankDelta(bank.select(&sel));
    let adapted = tch::no_grad(|| last(model.forward(&ids, &mask, Some(&delta)).unwrap()));
    let shift = max_abs_diff(&adapted, &base);
    assert!(
        shift > 0.1,
        "the adapter barely changes the logits ({shift}); the test could not fail"
    );

    bank.merge_into("node", &mut model).unwrap();
    let merged = tch::no_grad(|| last(model.forward(&ids, &mask, None).unwrap()));
    let d = max_abs_diff(&merged, &adapted);
    assert!(d < 1e-3, "merged vs delta: max |Δ| = {d}");

    bank.unmerge_from("node", &mut model).unwrap();
    let restored = tch::no_grad(|| last(model.forward(&ids, &mask, None).unwrap()));
    let d = max_abs_diff(&restored, &base);
    assert!(d < 1e-3, "unmerged vs base: max |Δ| = {d}");
}
