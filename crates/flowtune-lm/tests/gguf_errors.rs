//! Bad input gives typed errors that name the file and the tensor, key or field at
//! fault; the GGUF parser never panics on random or truncated bytes (proptest).
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::path::{Path, PathBuf};

use flowtune_lm::gguf::{encode_gguf, parse_header, GgufFile, GgufTensorData, GgufValue};
use flowtune_lm::loader::{load, LoadOptions};
use flowtune_lm::{Error, Weights};
use proptest::prelude::*;

fn s(v: &str) -> GgufValue {
    GgufValue::String(v.into())
}

/// A tiny but complete llama GGUF (2 layers, hidden 8, vocab of 4 byte-level
/// tokens) whose tensors are F32 except `blk.0.ffn_up.weight` in `up_type`.
fn tiny_gguf(up_type: u32, drop: Option<&str>) -> Vec<u8> {
    let md: Vec<(String, GgufValue)> = vec![
        ("general.architecture".into(), s("llama")),
        ("llama.block_count".into(), GgufValue::U32(1)),
        ("llama.context_length".into(), GgufValue::U32(64)),
        ("llama.embedding_length".into(), GgufValue::U32(8)),
        ("llama.feed_forward_length".into(), GgufValue::U32(32)),
        ("llama.attention.head_count".into(), GgufValue::U32(2)),
        ("llama.attention.head_count_kv".into(), GgufValue::U32(1)),
        ("llama.rope.freq_base".into(), GgufValue::F32(10000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            GgufValue::F32(1e-5),
        ),
        ("tokenizer.ggml.model".into(), s("gpt2")),
        (
            "tokenizer.ggml.tokens".into(),
            GgufValue::Array(vec![s("a"), s("b"), s("ab"), s("<eos>")]),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            GgufValue::Array(vec![
                GgufValue::I32(1),
                GgufValue::I32(1),
                GgufValue::I32(1),
                GgufValue::I32(3),
            ]),
        ),
        (
            "tokenizer.ggml.merges".into(),
            GgufValue::Array(vec![s("a b")]),
        ),
        ("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(3)),
        (
            "tokenizer.chat_template".into(),
            s("{% for m in messages %}{{ m['content'] }}{% endfor %}"),
        ),
    ];
    let f32t = |name: &str, dims: Vec<u64>| {
        let n: u64 = dims.iter().product();
        GgufTensorData {
            name: name.into(),
            dims,
            type_id: 0,
            data: (0..n)
                .flat_map(|i| (i as f32 * 0.01).to_le_bytes())
                .collect(),
        }
    };
    let mut ts = vec![
        f32t("token_embd.weight", vec![8, 4]),
        f32t("output_norm.weight", vec![8]),
        f32t("blk.0.attn_norm.weight", vec![8]),
        f32t("blk.0.ffn_norm.weight", vec![8]),
        f32t("blk.0.attn_q.weight", vec![8, 8]),
        f32t("blk.0.attn_k.weight", vec![8, 4]),
        f32t("blk.0.attn_v.weight", vec![8, 4]),
        f32t("blk.0.attn_output.weight", vec![8, 8]),
        f32t("blk.0.ffn_gate.weight", vec![8, 32]),
        f32t("blk.0.ffn_down.weight", vec![32, 8]),
    ];
    // 256 elements: 8 blocks of 32, 18 bytes each for Q4_0-sized blocks; for an
    // unknown type the size check is never reached.
    ts.push(GgufTensorData {
        name: "blk.0.ffn_up.weight".into(),
        dims: vec![8, 32],
        type_id: up_type,
        data: vec![0u8; 8 * 34],
    });
    if up_type == 0 {
        ts.pop();
        ts.push(f32t("blk.0.ffn_up.weight", vec![8, 32]));
    }
    if let Some(d) = drop {
        ts.retain(|t| t.name != d);
    }
    encode_gguf(&md, &ts)
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
    p
}

#[test]
fn tiny_gguf_loads_and_renames() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "tiny.gguf", &tiny_gguf(0, None));
    let m = load(&p, &LoadOptions::default()).unwrap();
    assert!(m.weights.contains("model.layers.0.mlp.up_proj.weight"));
    assert!(m.weights.contains("model.embed_tokens.weight"));
    assert!(
        !m.weights.contains("lm_head.weight"),
        "tied: no output.weight in the file"
    );
    assert_eq!(
        m.weights
            .get("model.layers.0.self_attn.k_proj.weight")
            .unwrap()
            .size(),
        vec![4, 8]
    );
    assert_eq!(m.config.num_hidden_layers, 1);
    assert!(m.config.tie_word_embeddings());
    assert_eq!(m.tokenizer.encode("ab<eos>").unwrap(), vec![2, 3]);
    assert_eq!(m.tokenizer.eos_token_ids(), &[3]);
}

#[test]
fn truncated_gguf_is_a_typed_error_naming_file() {
    let dir = tempfile::tempdir().unwrap();
    let full = tiny_gguf(0, None);
    // Cut inside the metadata, inside the tensor infos, and inside the data.
    for cut in [3, 10, 60, full.len() / 2, full.len() - 1] {
        let p = write(dir.path(), &format!("cut{cut}.gguf"), &full[..cut]);
        let err = GgufFile::open(&p).expect_err("truncated file must not parse");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("cut{cut}.gguf")),
            "error does not name the file: {msg}"
        );
        match &err {
            Error::GgufFormat { .. } => {}
            Error::GgufTensor { tensor, reason, .. } => {
                assert!(
                    !tensor.is_empty() && reason.contains("past the end"),
                    "{msg}"
                )
            }
            other => panic!("unexpected error kind for cut {cut}: {other:?}"),
        }
    }
}

#[test]
fn unknown_quant_type_names_tensor_and_type() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "q4k.gguf", &tiny_gguf(12, None));
    let err = load(&p, &LoadOptions::default()).expect_err("Q4_K is not supported");
    match &err {
        Error::GgufUnsupportedType {
            path,
            tensor,
            type_id,
            type_name,
        } => {
            assert_eq!(path, &p);
            assert_eq!(tensor, "blk.0.ffn_up.weight");
            assert_eq!((*type_id, type_name.as_str()), (12, "Q4_K"));
        }
        other => panic!("expected GgufUnsupportedType, got {other:?}"),
    }
    let err = load(
        &write(dir.path(), "t99.gguf", &tiny_gguf(99, None)),
        &LoadOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::GgufUnsupportedType { type_id: 99, .. }),
        "{err:?}"
    );
}

#[test]
fn missing_tensor_names_tensor_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "noembd.gguf",
        &tiny_gguf(0, Some("token_embd.weight")),
    );
    let err = load(&p, &LoadOptions::default()).expect_err("no embedding");
    match &err {
        Error::MissingTensor { path, tensor } => {
            assert_eq!(path, &p);
            assert_eq!(tensor, "token_embd.weight");
        }
        other => panic!("expected MissingTensor, got {other:?}"),
    }
    // A tensor the model asks for that the file lacks.
    let p = write(
        dir.path(),
        "noq.gguf",
        &tiny_gguf(0, Some("blk.0.attn_q.weight")),
    );
    let m = load(&p, &LoadOptions::default()).unwrap();
    let err = m
        .weights
        .get("model.layers.0.self_attn.q_proj.weight")
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("noq.gguf") && msg.contains("model.layers.0.self_attn.q_proj.weight"),
        "{msg}"
    );
    let w = Weights::from_map(Default::default(), "random-weights");
    assert!(matches!(w.get("x"), Err(Error::MissingTensor { .. })));
}

#[test]
fn missing_metadata_names_key() {
    let bytes = tiny_gguf(0, None);
    let mut h = parse_header(&bytes, Path::new("mem.gguf")).unwrap();
    h.metadata.remove("llama.embedding_length");
    let err = flowtune_lm::gguf::hf_config_json(&h, Path::new("mem.gguf")).unwrap_err();
    match err {
        Error::GgufMetadata { key, path, .. } => {
            assert_eq!(key, "llama.embedding_length");
            assert_eq!(path, Path::new("mem.gguf"));
        }
        other => panic!("expected GgufMetadata, got {other:?}"),
    }
}

/// A minimal HF folder with a valid safetensors file and tokenizer files.
fn hf_folder(dir: &Path, config: &str, template: &str) -> PathBuf {
    let d = dir.join("hf");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("config.json"), config).unwrap();
    let data: Vec<u8> = (0..8).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 4], &data).unwrap();
    safetensors::serialize_to_file(
        [("model.embed_tokens.weight", view)],
        None,
        &d.join("model.safetensors"),
    )
    .unwrap();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null, "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"]]}
    });
    std::fs::write(d.join("tokenizer.json"), tok.to_string()).unwrap();
    let tc = serde_json::json!({"chat_template": template, "eos_token": "b"});
    std::fs::write(d.join("tokenizer_config.json"), tc.to_string()).unwrap();
    d
}

const GOOD_CONFIG: &str = r#"{"model_type": "llama", "vocab_size": 3, "hidden_size": 4, "intermediate_size": 8,
  "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}"#;

#[test]
fn hf_folder_loads() {
    let dir = tempfile::tempdir().unwrap();
    let d = hf_folder(dir.path(), GOOD_CONFIG, "{{ messages[0]['content'] }}");
    let m = load(&d, &LoadOptions::default()).unwrap();
    assert_eq!(
        m.weights.get("model.embed_tokens.weight").unwrap().size(),
        vec![2, 4]
    );
    assert_eq!(m.tokenizer.encode("ab").unwrap(), vec![2]);
    assert_eq!(m.tokenizer.eos_token_ids(), &[1]);
}

#[test]
fn sharded_hf_folder_loads_every_shard() {
    let dir = tempfile::tempdir().unwrap();
    let d = hf_folder(dir.path(), GOOD_CONFIG, "{{ messages[0]['content'] }}");
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    let a: Vec<u8> = (0..8).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let b: Vec<u8> = (0..4)
        .flat_map(|i| half::bf16::from_f32(i as f32 + 0.5).to_le_bytes())
        .collect();
    let va = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 4], &a).unwrap();
    let vb = safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, vec![4], &b).unwrap();
    safetensors::serialize_to_file(
        [("model.embed_tokens.weight", va)],
        None,
        &d.join("model-00001-of-00002.safetensors"),
    )
    .unwrap();
    safetensors::serialize_to_file(
        [("model.norm.weight", vb)],
        None,
        &d.join("model-00002-of-00002.safetensors"),
    )
    .unwrap();
    let index = serde_json::json!({"metadata": {"total_size": 40}, "weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "model.norm.weight": "model-00002-of-00002.safetensors"}});
    std::fs::write(d.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let m = load(&d, &LoadOptions::default()).unwrap();
    assert_eq!(
        m.weights.names(),
        vec!["model.embed_tokens.weight", "model.norm.weight"]
    );
    let norm = m.weights.get("model.norm.weight").unwrap();
    assert_eq!(
        norm.kind(),
        tch::Kind::Float,
        "bf16 on disk cast to the requested f32"
    );
    assert_eq!(
        Vec::<f32>::try_from(norm).unwrap(),
        vec![0.5, 1.5, 2.5, 3.5]
    );
    let m16 = load(
        &d,
        &LoadOptions {
            device: tch::Device::Cpu,
            dtype: tch::Kind::Half,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        m16.weights.get("model.embed_tokens.weight").unwrap().kind(),
        tch::Kind::Half
    );
    // A shard named by the index but absent is an error naming it.
    std::fs::remove_file(d.join("model-00002-of-00002.safetensors")).unwrap();
    let err = load(&d, &LoadOptions::default()).unwrap_err();
    assert!(
        err.to_string().contains("model-00002-of-00002.safetensors"),
        "{err}"
    );
}

#[test]
fn malformed_config_names_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let d = hf_folder(
        dir.path(),
        "{\"model_type\": \"llama\", \"vocab_size\": 3,",
        "x",
    );
    let err = load(&d, &LoadOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Config { .. }), "{err:?}");
    assert!(msg.contains("config.json"), "{msg}");

    let d = hf_folder(
        dir.path(),
        &GOOD_CONFIG.replace("\"hidden_size\": 4", "\"hidden_size\": \"four\""),
        "x",
    );
    let msg = load(&d, &LoadOptions::default()).unwrap_err().to_string();
    assert!(msg.contains("config.json") && msg.contains("line"), "{msg}");

    let d = hf_folder(
        dir.path(),
        &GOOD_CONFIG.replace("\"hidden_size\": 4,", ""),
        "x",
    );
    let msg = load(&d, &LoadOptions::default()).unwrap_err().to_string();
    assert!(
        msg.contains("config.json") && msg.contains("hidden_size"),
        "{msg}"
    );
}

#[test]
fn malformed_template_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = hf_folder(
        dir.path(),
        GOOD_CONFIG,
        "line one\n{% for m in messages %}{{ m.content }\n{% endfor %}",
    );
    let err = load(&d, &LoadOptions::default()).unwrap_err();
    match &err {
        Error::ChatTemplate { path, reason } => {
            assert!(path.ends_with("tokenizer_config.json"), "{path:?}");
            assert!(reason.contains("line 2"), "{reason}");
        }
        other => panic!("expected ChatTemplate, got {other:?}"),
    }
}

#[test]
fn missing_safetensors_names_folder() {
    let dir = tempfile::tempdir().unwrap();
    let d = hf_folder(dir.path(), GOOD_CONFIG, "x");
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    let err = load(&d, &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Safetensors { .. }), "{err:?}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    /// Arbitrary bytes (with and without the GGUF magic) never panic the parser.
    #[test]
    fn random_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..512), magic in any::<bool>()) {
        if magic && bytes.len() >= 8 {
            bytes[..4].copy_from_slice(b"GGUF");
            bytes[4..8].copy_from_slice(&3u32.to_le_bytes());
        }
        let _ = parse_header(&bytes, Path::new("fuzz.gguf"));
    }

    /// A valid file truncated anywhere, or with bytes flipped, never panics the
    /// parser, and the config/tokenizer builders never panic on what parses.
    #[test]
    fn truncated_or_corrupted_never_panic(cut in 0usize..4096, flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6)) {
        let mut bytes = tiny_gguf(0, None);
        for (pos, val) in flips {
            let n = bytes.len();
            bytes[pos % n] = val;
        }
        let cut = cut.min(bytes.len());
        let path = Path::new("fuzz.gguf");
        if let Ok(h) = parse_header(&bytes[..cut], path) {
            let _ = flowtune_lm::gguf::hf_config_json(&h, path);
            let _ = flowtune_lm::tokenizer::gguf_tokenizer_json(&h, path);
        }
    }
}
