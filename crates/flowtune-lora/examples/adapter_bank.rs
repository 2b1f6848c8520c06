//! Create an adapter, save it in PEFT format, load it back, keep a reference copy and move it
//! halfway to the trained adapter, then compute a mixed per-row delta.
//!
//! Run: `cargo run -p flowtune-lora --example adapter_bank`

use flowtune_lora::{
    llama_base_shapes, AdapterBank, AdapterSelection, LoraConfig, Module, Result, Site,
};
use tch::{Device, Kind, Tensor};

fn main() -> Result<()> {
    // SmolLM2-135M's shapes: 30 layers, hidden 576, 9 heads (3 kv) of 64, MLP 1536.
    let shapes = llama_base_shapes(30, 576, 9, 3, 64, 1536);
    let mut bank = AdapterBank::new(shapes.clone(), Device::Cpu);
    let cfg = LoraConfig::rslora(8, 16.0, &[Module::QProj, Module::VProj]);
    bank.add("query", &cfg, 42)?;
    bank.copy("query", "query.ref")?;
    // Pretend a training step happened: give B some values.
    bank.modify("query", |a| {
        let sites: Vec<Site> = a.sites().copied().collect();
        for s in sites {
            if let Some(w) = a.weights_mut(&s) {
                let _ = w.b.f_fill_(0.01);
            }
        }
    })?;
    let dir = std::env::temp_dir().join(format!("flowtune-lora-example-{}", std::process::id()));
    bank.save_peft("query", &dir)?;
    println!("saved adapter `query` to {}", dir.display());

    let mut other = AdapterBank::new(shapes, Device::Cpu);
    other.load_peft("query", &dir)?;
    println!(
        "loaded: {} sites, scale {:.3}, version {}",
        other.get("query")?.sites().count(),
        other.get("query")?.scale(),
        other.version("query")?
    );

    bank.lerp("query.ref", "query", 0.5)?;
    let site = Site::new(0, Module::QProj);
    let b_ref = &bank
        .get("query.ref")?
        .weights(&site)
        .map(|w| w.b.mean(Kind::Float));
    println!(
        "reference B mean after lerp 0.5: {:?}",
        b_ref.as_ref().map(|t| t.double_value(&[]))
    );

    let x = Tensor::randn([3, 4, 576], (Kind::Float, Device::Cpu));
    let sel = bank.selection(&[Some("query"), None, Some("query.ref")])?;
    if let Some(d) = bank.delta(&site, &x, &sel)? {
        let per_row = d.abs().sum_dim_intlist(&[1i64, 2][..], false, Kind::Float);
        let per_row = Vec::<f64>::try_from(per_row.to_kind(Kind::Double))?;
        println!("per-row |delta| sums (query, none, query.ref): {per_row:?}");
    }
    assert!(matches!(sel, AdapterSelection::PerRow(_)));
    std::fs::remove_dir_all(&dir).map_err(|source| flowtune_lora::LoraError::Io {
        path: dir.clone(),
        source,
    })?;
    Ok(())
}
