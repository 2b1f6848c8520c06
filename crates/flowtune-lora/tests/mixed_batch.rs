//! Property: a batch whose rows use different adapters (or none) gives, row by row, the same
//! result as separate single-adapter passes, through a small random stack of linear layers with
//! LoRA at every site. Tolerance: 1e-5 absolute (f32; grouping only changes which rows share
//! a matmul call, so differences are rounding-level). Both per-row strategies (grouped,
//! gathered) are exercised.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use flowtune_lora::{
    llama_base_shapes, AdapterBank, AdapterSelection, DeltaStrategy, LoraConfig, Module, Site,
};
use proptest::prelude::*;
use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor};

struct Stack {
    bank: AdapterBank,
    base: BTreeMap<Site, Tensor>,
    ids: Vec<flowtune_lora::AdapterId>,
}

fn stack() -> Stack {
    tch::manual_seed(11);
    let shapes = llama_base_shapes(2, 16, 4, 4, 4, 16);
    let mut bank = AdapterBank::new(shapes.clone(), Device::Cpu);
    let mut ids = vec![];
    // Adapters with different ranks, scales and target sets (one misses some sites).
    let configs = [
        LoraConfig::rslora(8, 16.0, &[Module::QProj, Module::UpProj, Module::DownProj]),
        LoraConfig::rslora(4, 8.0, &[Module::QProj, Module::UpProj, Module::DownProj]),
        LoraConfig::rslora(2, 4.0, &[Module::UpProj]),
    ];
    for (i, cfg) in configs.iter().enumerate() {
        let name = format!("a{i}");
        ids.push(bank.add(&name, cfg, i as u64).unwrap());
        bank.modify(&name, |a| {
            let sites: Vec<Site> = a.sites().copied().collect();
            for s in sites {
                let w = a.weights_mut(&s).unwrap();
                w.b.copy_(&(Tensor::randn(w.b.size(), (Kind::Float, Device::Cpu)) * 0.2));
            }
        })
        .unwrap();
    }
    let base = shapes
        .iter()
        .filter(|(s, _)| matches!(s.module, Module::QProj | Module::UpProj | Module::DownProj))
        .map(|(s, sh)| {
            let w = Tensor::randn(
                [sh.out_features as i64, sh.in_features as i64],
                (Kind::Float, Device::Cpu),
            ) * 0.3;
            (*s, w)
        })
        .collect();
    Stack { bank, base, ids }
}

/// Runs x through q → up → down in every layer, adding the selected LoRA deltas.
fn forward(st: &Stack, x: &Tensor, sel: &AdapterSelection) -> Tensor {
    let mut h = x.shallow_clone();
    for layer in 0..2 {
        for m in [Module::QProj, Module::UpProj, Module::DownProj] {
            let site = Site::new(layer, m);
            let mut y = h.matmul(&st.base[&site].tr());
            if let Some(d) = st.bank.delta(&site, &h, sel).unwrap() {
                y += d;
            }
            h = y.tanh();
        }
    }
    h
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn mixed_batch_equals_separate_passes(
        assignment in proptest::collection::vec(proptest::option::of(0usize..3), 1..12),
        seq in 1i64..5,
        gathered in any::<bool>(),
    ) {
        let mut st = stack();
        st.bank.set_delta_strategy(if gathered { DeltaStrategy::Gathered } else { DeltaStrategy::Grouped });
        let rows = assignment.len() as i64;
        let x = Tensor::randn([rows, seq, 16], (Kind::Float, Device::Cpu));
        let sel = AdapterSelection::PerRow(assignment.iter().map(|a| a.map(|i| st.ids[i])).collect());
        let mixed = forward(&st, &x, &sel);
        for (row, a) in assignment.iter().enumerate() {
            let xr = x.narrow(0, row as i64, 1);
            let single = match a {
                Some(i) => AdapterSelection::All(st.ids[*i]),
                None => AdapterSelection::None,
            };
            let alone = forward(&st, &xr, &single);
            let diff = (mixed.narrow(0, row as i64, 1) - alone).abs().max().double_value(&[]);
            prop_assert!(diff < 1e-5, "row {row} adapter {a:?} diff {diff}");
        }
    }
}
