//! PEFT folder save/load: exact round trip, config round trip with unknown fields kept, atomic
//! writes, and typed errors naming the key for corrupted or mismatched files.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use flowtune_lora::{
    llama_base_shapes, AdapterBank, LoraConfig, LoraError, Module, Site, CONFIG_FILE, WEIGHTS_FILE,
};
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

fn bank() -> AdapterBank {
    AdapterBank::new(llama_base_shapes(3, 16, 4, 2, 4, 24), Device::Cpu)
}

fn saved_adapter(dir: &Path) -> AdapterBank {
    let mut b = bank();
    let cfg = LoraConfig::rslora(4, 16.0, &[Module::QProj, Module::VProj, Module::DownProj]);
    b.add("x", &cfg, 9).unwrap();
    tch::manual_seed(1);
    b.modify("x", |a| {
        let sites: Vec<Site> = a.sites().copied().collect();
        for s in sites {
            let w = a.weights_mut(&s).unwrap();
            w.b.copy_(&Tensor::randn(w.b.size(), (Kind::Float, Device::Cpu)));
        }
    })
    .unwrap();
    b.save_peft("x", dir).unwrap();
    b
}

/// Rewrites the weights file with `edit` applied to the (key → f32 tensor) map.
fn rewrite_weights(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<u8>)>)) {
    let path = dir.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut entries: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut entries);
    let views: Vec<(String, safetensors::tensor::TensorView)> = entries
        .iter()
        .map(|(k, s, d)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                    .unwrap(),
            )
        })
        .collect();
    std::fs::write(
        &path,
        safetensors::serialize(views, None::<HashMap<String, String>>).unwrap(),
    )
    .unwrap();
}

#[test]
fn save_load_round_trip_is_exact_and_atomic() {
    let dir = tempfile::tempdir().unwrap();
    let b = saved_adapter(dir.path());
    let files: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut sorted = files.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        vec![CONFIG_FILE, WEIGHTS_FILE],
        "no temp files left"
    );
    let mut b2 = bank();
    b2.load_peft("y", dir.path()).unwrap();
    let (x, y) = (b.get("x").unwrap(), b2.get("y").unwrap());
    assert_eq!(x.config(), y.config());
    let (tx, ty) = (x.named_tensors(), y.named_tensors());
    assert_eq!(tx.len(), 18);
    for ((kx, vx), (ky, vy)) in tx.iter().zip(&ty) {
        assert_eq!(kx, ky);
        assert!(vx.equal(vy), "{kx} differs");
    }
    // Keys exactly as PEFT writes them.
    let bytes = std::fs::read(dir.path().join(WEIGHTS_FILE)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(st
        .names()
        .contains(&"base_model.model.model.layers.2.mlp.down_proj.lora_B.weight"));
}

#[test]
fn config_round_trips_and_keeps_unknown_fields() {
    let json = r#"{
        "alpha_pattern": {}, "auto_mapping": null, "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "bias": "none", "fan_in_fan_out": false, "inference_mode": true, "init_lora_weights": true,
        "layers_pattern": null, "layers_to_transform": null, "lora_alpha": 16, "lora_dropout": 0.05,
        "modules_to_save": null, "peft_type": "LORA", "r": 8, "rank_pattern": {}, "revision": null,
        "target_modules": ["v_proj", "q_proj"], "task_type": "CAUSAL_LM", "use_dora": false,
        "use_rslora": true, "some_future_field": [1, 2, 3]
    }"#;
    let cfg: LoraConfig = serde_json::from_str(json).unwrap();
    cfg.validate().unwrap();
    assert_eq!(cfg.r, 8);
    assert!((cfg.scale() - 16.0 / 8f64.sqrt()).abs() < 1e-12);
    assert_eq!(cfg.extra["some_future_field"], serde_json::json!([1, 2, 3]));
    let back: LoraConfig = serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
    assert_eq!(back, cfg);
    let v: serde_json::Value = serde_json::to_value(&cfg).unwrap();
    let orig: serde_json::Value = serde_json::from_str(json).unwrap();
    for (k, val) in orig.as_object().unwrap() {
        assert_eq!(&v[k], val, "field {k} preserved");
    }
    // A single string target is accepted too.
    let s: LoraConfig =
        serde_json::from_str(r#"{"r": 4, "target_modules": "all-linear"}"#).unwrap();
    s.validate().unwrap();
}

#[test]
fn shape_mismatch_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    saved_adapter(dir.path());
    let key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight";
    rewrite_weights(dir.path(), |e| {
        let t = e.iter_mut().find(|t| t.0 == key).unwrap();
        t.1 = vec![4, 8]; // same byte count (32 f32), wrong shape: expected [8, 4]
    });
    let err = bank().load_peft("y", dir.path()).unwrap_err();
    match &err {
        LoraError::ShapeMismatch {
            key: k,
            expected,
            found,
        } => {
            assert_eq!(k, key);
            assert_eq!(expected, &vec![8, 4]);
            assert_eq!(found, &vec![4, 8]);
        }
        other => panic!("wrong error {other}"),
    }
    assert!(err.to_string().contains(key));
}

#[test]
fn adapter_for_another_base_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    saved_adapter(dir.path());
    // A base with a different hidden size: the first key in order (layer 0 down_proj B,
    // [hidden, r]) no longer fits.
    let mut other = AdapterBank::new(llama_base_shapes(3, 32, 4, 2, 8, 24), Device::Cpu);
    let err = other.load_peft("y", dir.path()).unwrap_err();
    assert!(
        matches!(&err, LoraError::ShapeMismatch { key, expected, .. }
            if key == "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight" && expected == &vec![32, 4]),
        "{err}"
    );
    // A base with fewer layers: layer 2 keys are unexpected.
    let mut small = AdapterBank::new(llama_base_shapes(2, 16, 4, 2, 4, 24), Device::Cpu);
    let err = small.load_peft("y", dir.path()).unwrap_err();
    assert!(
        matches!(&err, LoraError::UnexpectedKey { key, .. } if key.contains("layers.2.")),
        "{err}"
    );
}

#[test]
fn missing_and_unexpected_keys_are_named() {
    let dir = tempfile::tempdir().unwrap();
    saved_adapter(dir.path());
    let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    rewrite_weights(dir.path(), |e| e.retain(|t| t.0 != key));
    let err = bank().load_peft("y", dir.path()).unwrap_err();
    assert!(
        matches!(&err, LoraError::MissingKey { key: k, .. } if k == key),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    saved_adapter(dir.path());
    let extra = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight";
    rewrite_weights(dir.path(), |e| {
        e.push((extra.to_string(), vec![4, 16], vec![0u8; 4 * 4 * 16]))
    });
    let err = bank().load_peft("y", dir.path()).unwrap_err();
    assert!(
        matches!(&err, LoraError::UnexpectedKey { key: k, .. } if k == extra),
        "{err}"
    );
}

#[test]
fn corrupted_files_give_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    saved_adapter(dir.path());
    let wpath = dir.path().join(WEIGHTS_FILE);
    let bytes = std::fs::read(&wpath).unwrap();
    std::fs::write(&wpath, &bytes[..bytes.len() - 10]).unwrap();
    let err = bank().load_peft("y", dir.path()).unwrap_err();
    assert!(matches!(err, LoraError::SafeTensors { .. }), "{err}");

    let cpath = dir.path().join(CONFIG_FILE);
    std::fs::write(&cpath, "{\"r\": 8, \"lora_alpha\": ").unwrap();
    let err = bank().load_peft("y", dir.path()).unwrap_err();
    assert!(matches!(err, LoraError::ConfigJson { .. }), "{err}");

    std::fs::write(
        &cpath,
        r#"{"r": 8, "use_dora": true, "target_modules": ["q_proj"]}"#,
    )
    .unwrap();
    let err = bank().load_peft("y", dir.path()).unwrap_err();
    assert!(
        matches!(&err, LoraError::ConfigField { field, .. } if field == "use_dora"),
        "{err}"
    );

    let err = bank().load_peft("y", dir.path().join("nope")).unwrap_err();
    assert!(matches!(err, LoraError::Io { .. }), "{err}");
}

#[test]
fn bf16_bank_saves_bf16_and_loads_f32_files() {
    let dir = tempfile::tempdir().unwrap();
    saved_adapter(dir.path()); // f32 file
    let shapes = llama_base_shapes(3, 16, 4, 2, 4, 24);
    let mut b16 = AdapterBank::with_kind(shapes.clone(), Device::Cpu, Kind::BFloat16);
    b16.load_peft("x", dir.path()).unwrap();
    let f32_bank = {
        let mut b = bank();
        b.load_peft("x", dir.path()).unwrap();
        b
    };
    for ((k, t16), (_, t32)) in b16
        .get("x")
        .unwrap()
        .named_tensors()
        .iter()
        .zip(f32_bank.get("x").unwrap().named_tensors())
    {
        assert_eq!(t16.kind(), Kind::BFloat16);
        // bf16 keeps 8 mantissa bits: relative error <= 2^-8.
        let err = (t16.to_kind(Kind::Float) - &t32)
            .abs()
            .max()
            .double_value(&[]);
        assert!(
            err <= t32.abs().max().double_value(&[]) / 256.0,
            "{k}: {err}"
        );
    }
    let out = tempfile::tempdir().unwrap();
    b16.save_peft("x", out.path()).unwrap();
    let bytes = std::fs::read(out.path().join(WEIGHTS_FILE)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(st
        .tensors()
        .iter()
        .all(|(_, v)| v.dtype() == safetensors::Dtype::BF16));
    let mut again = AdapterBank::with_kind(shapes, Device::Cpu, Kind::BFloat16);
    again.load_peft("x", out.path()).unwrap();
    for ((_, a), (_, b)) in again
        .get("x")
        .unwrap()
        .named_tensors()
        .iter()
        .zip(b16.get("x").unwrap().named_tensors())
    {
        assert!(a.equal(&b), "bf16 round trip is exact");
    }
}

mod config_props {
    use flowtune_lora::{LayersToTransform, LoraConfig, TargetModules};
    use proptest::prelude::*;

    fn config() -> impl Strategy<Value = LoraConfig> {
        (
            1usize..64,
            (1u32..128).prop_map(f64::from),
            any::<bool>(),
            prop_oneof![
                Just(None),
                proptest::collection::vec("[a-z_]{1,10}", 0..5)
                    .prop_map(|v| Some(TargetModules::List(v))),
                Just(Some(TargetModules::Pattern("all-linear".into()))),
            ],
            prop_oneof![
                Just(None),
                (0usize..40).prop_map(|l| Some(LayersToTransform::One(l))),
                proptest::collection::vec(0usize..40, 0..4)
                    .prop_map(|v| Some(LayersToTransform::Many(v))),
            ],
            (0u32..50).prop_map(|d| f64::from(d) / 100.0),
            proptest::option::of("[A-Za-z0-9/_-]{0,20}"),
        )
            .prop_map(
                |(
                    r,
                    lora_alpha,
                    use_rslora,
                    target_modules,
                    layers_to_transform,
                    lora_dropout,
                    base,
                )| LoraConfig {
                    r,
                    lora_alpha,
                    use_rslora,
                    target_modules,
                    layers_to_transform,
                    lora_dropout,
                    base_model_name_or_path: base,
                    ..LoraConfig::default()
                },
            )
    }

    proptest! {
        #[test]
        fn config_json_round_trip(cfg in config()) {
            let text = serde_json::to_string_pretty(&cfg).unwrap();
            let back: LoraConfig = serde_json::from_str(&text).unwrap();
            prop_assert_eq!(back, cfg);
        }
    }
}
