//! `ModelConfig` mirrors HF `config.json`: serde round trips for each
//! architecture's real-world key set (transformers 4 `rope_scaling` and 5
//! `rope_parameters` forms), defaults as transformers sets them, and typed
//! errors naming the file and field; `Model` errors name the tensor.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::collections::HashMap;
use std::path::Path;

use flowtune_lm::config::{Architecture, ModelConfig, RopeKind};
use flowtune_lm::model::Model;
use flowtune_lm::Error;
use tch::{Device, Kind, Tensor};

fn configs() -> Vec<serde_json::Value> {
    let long: Vec<f64> = (0..48).map(|i| 1.0 + i as f64 * 0.1).collect();
    vec![
        serde_json::json!({"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "rms_norm_eps": 1e-5,
            "rope_theta": 100000.0, "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}),
        serde_json::json!({"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0,
            "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "eos_token_id": [128001, 128008, 128009], "max_position_embeddings": 131072}),
        serde_json::json!({"model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "sliding_window": 4096}),
        serde_json::json!({"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
            "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "use_sliding_window": false,
            "sliding_window": 32768, "max_window_layers": 21, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}),
        serde_json::json!({"model_type": "phi3", "vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192,
            "num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 131072,
            "original_max_position_embeddings": 4096, "rope_scaling": {"type": "su", "long_factor": long, "short_factor": long},
            "eos_token_id": 32000, "sliding_window": 262144}),
    ]
}

#[test]
fn configs_round_trip_and_resolve_like_transformers() {
    for v in configs() {
        let c: ModelConfig = serde_json::from_value(v.clone()).unwrap();
        c.validate(Path::new("config.json")).unwrap();
        let back: ModelConfig = serde_json::from_value(serde_json::to_value(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        // Every key of the input survives (unknown keys are kept in `extra`).
        let out = serde_json::to_value(&c).unwrap();
        for k in v.as_object().unwrap().keys() {
            assert!(out.get(k).is_some(), "key {k} lost in round trip");
        }
    }
    let cs: Vec<ModelConfig> = configs()
        .into_iter()
        .map(|v| serde_json::from_value(v).unwrap())
        .collect();
    assert_eq!(cs[0].head_dim(), 64);
    assert_eq!(cs[0].rope_theta(), 100000.0);
    assert!(cs[0].tie_word_embeddings());
    assert!(matches!(
        cs[1].rope_kind().unwrap(),
        RopeKind::Llama3 {
            original_max_position_embeddings: 8192,
            ..
        }
    ));
    assert_eq!(cs[1].eos_token_ids(), vec![128001, 128008, 128009]);
    assert!(
        !cs[1].tie_word_embeddings(),
        "HF default for llama is untied"
    );
    assert_eq!(cs[2].sliding_window_for_layer(0), Some(4096));
    assert_eq!(cs[3].model_type, Architecture::Qwen2);
    assert!(cs[3].qkv_bias() && !cs[3].o_bias());
    assert_eq!(cs[3].rope_theta(), 1e6);
    assert_eq!(
        cs[3].sliding_window_for_layer(23),
        None,
        "use_sliding_window false"
    );
    assert_eq!(cs[4].rms_norm_eps(), 1e-5, "phi3 default eps");
    match cs[4].rope_kind().unwrap() {
        RopeKind::LongRope {
            attention_factor,
            original_max_position_embeddings,
            ..
        } => {
            assert_eq!(original_max_position_embeddings, 4096);
            // transformers: sqrt(1 + ln(131072/4096) / ln(4096))
            let want = (1.0 + (32f64).ln() / (4096f64).ln()).sqrt();
            assert!((attention_factor - want).abs() < 1e-12);
        }
        other => panic!("phi3 su scaling resolved to {other:?}"),
    }
}

#[test]
fn malformed_configs_give_typed_errors_naming_file_and_field() {
    let err = ModelConfig::from_json_str(
        r#"{"model_type": "llama", "hidden_size": 8}"#,
        Path::new("/m/config.json"),
    )
    .unwrap_err();
    assert!(
        matches!(&err, Error::Config { file, .. } if file == Path::new("/m/config.json")),
        "{err}"
    );
    assert!(err.to_string().contains("vocab_size"), "{err}");
    let err = ModelConfig::from_json_str(
        r#"{"model_type": "gpt2", "vocab_size": 1}"#,
        Path::new("c.json"),
    )
    .unwrap_err();
    assert!(err.to_string().contains("gpt2"), "{err}");
    let mut v = configs()[0].clone();
    v["num_key_value_heads"] = 4.into();
    let err = ModelConfig::from_json_str(&v.to_string(), Path::new("c.json")).unwrap_err();
    assert!(
        matches!(&err, Error::ConfigField { field, .. } if field == "num_key_value_heads"),
        "{err}"
    );
    let mut v = configs()[0].clone();
    v["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0});
    let err = ModelConfig::from_json_str(&v.to_string(), Path::new("c.json")).unwrap_err();
    assert!(
        matches!(&err, Error::ConfigField { field, .. } if field == "rope_scaling"),
        "{err}"
    );
    assert!(err.to_string().contains("low_freq_factor"), "{err}");
}

fn tiny() -> (ModelConfig, HashMap<String, Tensor>) {
    let c: ModelConfig = serde_json::from_value(serde_json::json!({"model_type": "llama", "vocab_size": 32, "hidden_size": 16,
        "intermediate_size": 24, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": true}))
    .unwrap();
    let o = (Kind::Float, Device::Cpu);
    let mut w = HashMap::new();
    w.insert(
        "model.embed_tokens.weight".into(),
        Tensor::randn([32, 16], o),
    );
    w.insert("model.norm.weight".into(), Tensor::ones([16], o));
    let p = "model.layers.0";
    for (n, s) in [
        ("self_attn.q_proj", [16, 16]),
        ("self_attn.k_proj", [8, 16]),
        ("self_attn.v_proj", [8, 16]),
        ("self_attn.o_proj", [16, 16]),
        ("mlp.gate_proj", [24, 16]),
        ("mlp.up_proj", [24, 16]),
        ("mlp.down_proj", [16, 24]),
    ] {
        w.insert(format!("{p}.{n}.weight"), Tensor::randn(s, o) * 0.2);
    }
    w.insert(format!("{p}.input_layernorm.weight"), Tensor::ones([16], o));
    w.insert(
        format!("{p}.post_attention_layernorm.weight"),
        Tensor::ones([16], o),
    );
    (c, w)
}

#[test]
fn missing_or_misshapen_tensors_are_named() {
    let (c, w) = tiny();
    assert!(Model::from_tensors(&c, &w).is_ok());
    let mut w2: HashMap<String, Tensor> = w
        .iter()
        .map(|(k, v)| (k.clone(), v.shallow_clone()))
        .collect();
    w2.remove("model.layers.0.mlp.up_proj.weight");
    let err = Model::from_tensors(&c, &w2).unwrap_err();
    assert!(
        err.to_string()
            .contains("model.layers.0.mlp.up_proj.weight"),
        "{err}"
    );
    let mut w3 = w;
    w3.insert(
        "model.layers.0.self_attn.k_proj.weight".into(),
        Tensor::zeros([9, 16], (Kind::Float, Device::Cpu)),
    );
    let err = Model::from_tensors(&c, &w3).unwrap_err();
    assert!(
        matches!(&err, Error::TensorShape { tensor, .. } if tensor == "model.layers.0.self_attn.k_proj.weight"),
        "{err}"
    );
}

#[test]
fn bad_forward_inputs_are_errors_not_panics() {
    let (c, w) = tiny();
    let m = Model::from_tensors(&c, &w).unwrap();
    let ids = Tensor::from_slice(&[1i64, 2, 3]).view([1, 3]);
    let err = m
        .forward(
            &ids,
            &Tensor::ones([1, 2], (Kind::Int64, Device::Cpu)),
            None,
        )
        .unwrap_err();
    assert!(matches!(err, Error::ModelInput(_)), "{err}");
    let mut cache = m.new_cache(2, 4).unwrap();
    assert!(m
        .forward_cached(
            &ids,
            None,
            &mut cache,
            &flowtune_lm::model::LogitsAt::Last,
            None
        )
        .is_err());
    assert!(cache.select_rows(&[5]).is_err());
}
