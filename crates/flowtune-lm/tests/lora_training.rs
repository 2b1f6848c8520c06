//! Training isolation on the real test model (SmolLM2-135M GGUF, f32): after a forward with a
//! mixed batch, a backward of a next-token NLL and an SGD step on the trainable adapter, only that
//! adapter changed; the base weights and the other adapters are bit-identical, tensor by tensor.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use flowtune_lm::loader::{load, LoadOptions};
use flowtune_lm::model::{LinearDelta, Model};
use flowtune_lora::{AdapterBank, AdapterSelection, LoraConfig, Module, Site};
use tch::{Device, Kind, Tensor};

struct BankDelta<'a>(flowtune_lora::SelectedAdapters<'a>);

impl LinearDelta for BankDelta<'_> {
    fn delta(&self, layer: usize, module: &str, x: &Tensor) -> flowtune_lm::Result<Option<Tensor>> {
        self.0
            .delta(layer, module, x)
            .map_err(|e| flowtune_lm::Error::ModelInput(e.to_string()))
    }
}

#[test]
fn only_the_active_adapter_changes_after_a_step_on_the_real_model() {
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
    let all = [
        Module::QProj,
        Module::KProj,
        Module::VProj,
        Module::OProj,
        Module::GateProj,
        Module::UpProj,
        Module::DownProj,
    ];
    let node = bank
        .add("node", &LoraConfig::rslora(8, 16.0, &all), 1)
        .unwrap();
    bank.copy("node", "node.ref").unwrap();
    let other = bank
        .add(
            "other",
            &LoraConfig::rslora(4, 8.0, &[Module::QProj, Module::VProj]),
            2,
        )
        .unwrap();
    bank.modify("other", |a| {
        let sites: Vec<Site> = a.sites().copied().collect();
        for s in sites {
            let w = a.weights_mut(&s).unwrap();
            w.b.copy_(&(Tensor::randn(w.b.size(), (Kind::Float, Device::Cpu)) * 0.02));
        }
    })
    .unwrap();
    bank.set_trainable("node").unwrap();

    let snapshot = |bank: &AdapterBank| -> Vec<(String, Tensor)> {
        let mut v = vec![];
        for n in bank.names() {
            for (k, t) in bank.get(n).unwrap().named_tensors() {
                v.push((format!("{n}/{k}"), t.detach().copy()));
            }
        }
        v
    };
    let base_names: Vec<String> = loaded
        .weights
        .names()
        .iter()
        .map(|s| s.to_string())
        .collect();
    let base_before: Vec<Tensor> = base_names
        .iter()
        .map(|n| loaded.weights.get(n).unwrap().copy())
        .collect();
    let adapters_before = snapshot(&bank);

    // Two rows train `node`, one uses `other`, one the base: all in one batch.
    let ids = Tensor::from_slice(&[
        1i64, 504, 3458, 314, 253, 1345, 30, 2, //
        1, 504, 3458, 314, 253, 1345, 30, 2, //
        1, 6656, 18, 1277, 17, 2305, 30, 2, //
        1, 2641, 7, 2004, 17, 357, 2203, 2,
    ])
    .view([4, 8]);
    let mask = Tensor::ones([4, 8], (Kind::Int64, Device::Cpu));
    let sel = AdapterSelection::PerRow(vec![Some(node), Some(other), None, Some(node)]);
    let logits = model
        .forward(&ids, &mask, Some(&BankDelta(bank.select(&sel))))
        .unwrap();
    let v = logits.size()[2];
    let nll = logits
        .narrow(1, 0, 7)
        .reshape([-1, v])
        .log_softmax(-1, Kind::Float)
        .gather(1, &ids.narrow(1, 1, 7).reshape([-1, 1]), false)
        .mean(Kind::Float)
        .neg();
    nll.backward();
    let params = bank.get("node").unwrap().named_tensors();
    let mut with_grad = 0;
    tch::no_grad(|| {
        for (_, p) in &params {
            let g = p.grad();
            if g.defined() {
                with_grad += 1;
                let mut p = p.shallow_clone();
                let _ = p.g_sub_(&(g * 1e-2));
            }
        }
    });
    bank.mark_updated("node").unwrap();
    // B of every site gets a gradient (B starts at zero, so A's gradient is zero there).
    assert_eq!(
        with_grad,
        params.len(),
        "every trainable tensor got a gradient"
    );
    for (name, before) in base_names.iter().zip(&base_before) {
        let now = loaded.weights.get(name).unwrap();
        assert!(now.equal(before), "base tensor {name} changed");
        assert!(!now.requires_grad(), "base tensor {name} requires grad");
    }
    let after = snapshot(&bank);
    let mut changed = 0;
    for ((k, b), (_, a)) in adapters_before.iter().zip(&after) {
        if k.starts_with("node/") {
            changed += usize::from(!a.equal(b));
        } else {
            assert!(a.equal(b), "{k} changed");
        }
    }
    // All B factors move (30 layers x 7 modules); A factors only move once B is nonzero.
    assert_eq!(changed, 30 * 7, "every B of the trained adapter moved");
}
