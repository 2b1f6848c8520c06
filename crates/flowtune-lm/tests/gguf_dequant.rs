//! Every tensor of the test model dequantised by flowtune equals `gguf.quants.dequantize`
//! (Python `gguf` 0.19, run by `tests/reference/lm_load_ref.py dequant`) bit for bit.
//! Tolerance: exact (F32/F16/BF16/Q8_0/Q4_0/Q4_1 dequantise to f32 with one multiply
//! and at most one add per element, in the same order as numpy).
//! The config built from the metadata is checked against transformers' GGUF config.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod loader_support;

use flowtune_lm::gguf::{ggml_type_name, GgufFile};
use loader_support::{read_json, run_reference, test_model};
use safetensors::SafeTensors;

#[test]
fn dequantisation_matches_gguf_python_exactly_and_config_matches_transformers() {
    let model = test_model();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("deq.safetensors");
    run_reference(&["dequant".as_ref(), model.as_os_str(), out.as_os_str()]);
    let bytes = std::fs::read(&out).expect("reference output");
    let reference = SafeTensors::deserialize(&bytes).expect("reference safetensors");
    let meta = read_json(&dir.path().join("deq.safetensors.json"));

    let file = GgufFile::open(&model).expect("open GGUF");
    assert_eq!(reference.len(), file.header.tensors.len(), "tensor count");
    let mut by_type = std::collections::BTreeMap::<&str, usize>::new();
    for info in &file.header.tensors {
        let (ours, shape) = file.dequantize_tensor(info).expect("dequantise");
        let r = reference
            .tensor(&info.name)
            .unwrap_or_else(|e| panic!("{}: {e}", info.name));
        let rshape: Vec<i64> = r.shape().iter().map(|&d| d as i64).collect();
        assert_eq!(shape, rshape, "{}: shape", info.name);
        let theirs: Vec<f32> = r
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(ours.len(), theirs.len(), "{}", info.name);
        let mismatch = ours
            .iter()
            .zip(&theirs)
            .position(|(a, b)| a.to_bits() != b.to_bits());
        if let Some(i) = mismatch {
            panic!(
                "{} ({}): element {i}: ours {} vs gguf {}",
                info.name,
                ggml_type_name(info.type_id),
                ours[i],
                theirs[i]
            );
        }
        assert_eq!(
            meta["types"][&info.name],
            ggml_type_name(info.type_id),
            "{}: type name",
            info.name
        );
        *by_type.entry(ggml_type_name(info.type_id)).or_default() += 1;
    }
    eprintln!("tensors compared exactly, by type: {by_type:?}");
    assert!(
        by_type.contains_key("Q4_1") && by_type.contains_key("Q8_0") && by_type.contains_key("F32")
    );

    // The config transformers builds from the same metadata.
    let ours = file.hf_config_json().expect("config json");
    let cfg = &meta["config"];
    for key in [
        "model_type",
        "num_hidden_layers",
        "max_position_embeddings",
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "rope_theta",
        "rms_norm_eps",
        "vocab_size",
        "head_dim",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "tie_word_embeddings",
    ] {
        assert_eq!(
            ours[key], cfg[key],
            "config key {key}: ours {} vs transformers {}",
            ours[key], cfg[key]
        );
    }
    flowtune_lm::loader::gguf_config(&file).expect("ModelConfig from GGUF metadata");
}
