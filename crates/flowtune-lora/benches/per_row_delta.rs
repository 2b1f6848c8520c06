//! Per-row (mixed-adapter) LoRA delta on CPU: grouped vs gathered strategies, r=8, batch 1..32,
//! decode (T=1) and prefill (T=64), SmolLM2-135M shapes. Every time is reported as a ratio to
//! baselines measured in the same run: the base linear `x·Wᵀ` of that site, and the delta with
//! one adapter for the whole batch (`all`). `auto` is the default strategy.
//!
//! Run: `cargo bench -p flowtune-lora --bench per_row_delta`

use std::time::Instant;

use flowtune_lora::{
    llama_base_shapes, AdapterBank, AdapterSelection, DeltaStrategy, LoraConfig, Module, Site,
};
use tch::{Device, Kind, Tensor};

/// Median seconds per call of `f` over `reps` calls (after 3 warm-up calls).
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    let mut v: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> flowtune_lora::Result<()> {
    tch::set_num_threads(1);
    let _guard = tch::no_grad_guard();
    let shapes = llama_base_shapes(1, 576, 9, 3, 64, 1536);
    let mut bank = AdapterBank::new(shapes.clone(), Device::Cpu);
    let cfg = LoraConfig::rslora(8, 16.0, &[Module::QProj, Module::UpProj]);
    let mut ids = vec![];
    for k in 0..4 {
        let name = format!("node{k}");
        ids.push(bank.add(&name, &cfg, k)?);
        bank.modify(&name, |a| {
            let sites: Vec<Site> = a.sites().copied().collect();
            for s in sites {
                if let Some(w) = a.weights_mut(&s) {
                    let _ = w.b.f_normal_(0.0, 0.02);
                }
            }
        })?;
    }
    println!("threads=1, r=8, 4 adapters + base-only rows, assignment row i -> (i mod 5)");
    println!(
        "{:<8} {:>3} {:>3} | {:>9} | {:>9} {:>9} {:>9} {:>9}",
        "site", "B", "T", "base µs", "all", "grouped", "gathered", "auto"
    );
    println!("(delta times as ratios to the base linear x·Wᵀ of the same site, same run)");
    for (site, label) in [
        (Site::new(0, Module::QProj), "q_proj"),
        (Site::new(0, Module::UpProj), "up_proj"),
    ] {
        let sh = shapes[&site];
        let w = Tensor::randn(
            [sh.out_features as i64, sh.in_features as i64],
            (Kind::Float, Device::Cpu),
        );
        for t in [1i64, 64] {
            for b in [1i64, 4, 8, 16, 32] {
                let reps = if t == 1 { 400 } else { 40 };
                let x = Tensor::randn([b, t, sh.in_features as i64], (Kind::Float, Device::Cpu));
                let rows: Vec<_> = (0..b as usize)
                    .map(|i| if i % 5 == 4 { None } else { Some(ids[i % 5]) })
                    .collect();
                let per_row = AdapterSelection::PerRow(rows);
                let all = AdapterSelection::All(ids[0]);
                let base = time(reps, || {
                    let _ = x.matmul(&w.tr());
                });
                let t_all = time(reps, || {
                    let _ = bank.delta(&site, &x, &all);
                });
                bank.set_delta_strategy(DeltaStrategy::Grouped);
                let t_grouped = time(reps, || {
                    let _ = bank.delta(&site, &x, &per_row);
                });
                bank.set_delta_strategy(DeltaStrategy::Gathered);
                let t_gathered = time(reps, || {
                    let _ = bank.delta(&site, &x, &per_row);
                });
                bank.set_delta_strategy(DeltaStrategy::Auto);
                let t_auto = time(reps, || {
                    let _ = bank.delta(&site, &x, &per_row);
                });
                println!(
                    "{:<8} {:>3} {:>3} | {:>9.1} | {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                    label,
                    b,
                    t,
                    base * 1e6,
                    t_all / base,
                    t_grouped / base,
                    t_gathered / base,
                    t_auto / base
                );
            }
        }
    }
    Ok(())
}
