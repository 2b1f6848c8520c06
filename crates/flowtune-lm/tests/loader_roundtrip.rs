//! The test model loaded from its GGUF and from the HF folder that transformers
//! exports from the same GGUF (`lm_load_ref.py export`: `from_pretrained(gguf_file=)`,
//! then `save_pretrained`, float32) is the same model: identical tensors by HF name
//! (exact: transformers dequantises with the same formulas and un-permutes Q/K the
//! same way), equivalent configs, the same token ids and chat template output, and
//! bit-identical logits from `model::Model` (same weights, same code path).
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod loader_support;

use flowtune_lm::loader::{load, LoadOptions};
use flowtune_lm::model::Model;
use flowtune_lm::tokenizer::ChatMessage;
use loader_support::{run_reference, test_model};
use tch::{Kind, Tensor};

#[test]
fn gguf_and_exported_hf_folder_are_the_same_model() {
    let model = test_model();
    let dir = tempfile::tempdir().expect("tempdir");
    let hf_dir = dir.path().join("hf");
    run_reference(&["export".as_ref(), model.as_os_str(), hf_dir.as_os_str()]);

    let opts = LoadOptions::default();
    let g = load(&model, &opts).expect("load GGUF");
    let h = load(&hf_dir, &opts).expect("load HF folder");

    // Weights: the same names, shapes and values.
    let gn = g.weights.names();
    let hn = h.weights.names();
    assert_eq!(gn, hn, "tensor names differ");
    for name in &gn {
        let a = g.weights.get(name).expect("gguf tensor");
        let b = h.weights.get(name).expect("hf tensor");
        assert_eq!(a.size(), b.size(), "{name}: shape");
        assert_eq!(a.kind(), Kind::Float);
        let equal = a.equal(&b);
        if !equal {
            let d = (&a - &b).abs().max().double_value(&[]);
            panic!("{name}: values differ (max |Δ| = {d})");
        }
    }
    eprintln!("{} tensors identical", gn.len());

    // Config: the fields the model uses resolve to the same values.
    let (gc, hc) = (&g.config, &h.config);
    assert_eq!(gc.model_type, hc.model_type);
    assert_eq!(
        (
            gc.vocab_size,
            gc.hidden_size,
            gc.intermediate_size,
            gc.num_hidden_layers,
            gc.num_attention_heads
        ),
        (
            hc.vocab_size,
            hc.hidden_size,
            hc.intermediate_size,
            hc.num_hidden_layers,
            hc.num_attention_heads
        )
    );
    assert_eq!(gc.num_key_value_heads(), hc.num_key_value_heads());
    assert_eq!(gc.head_dim(), hc.head_dim());
    assert_eq!(gc.rms_norm_eps(), hc.rms_norm_eps());
    assert_eq!(gc.rope_theta(), hc.rope_theta());
    assert_eq!(gc.tie_word_embeddings(), hc.tie_word_embeddings());
    assert_eq!(gc.max_position_embeddings(), hc.max_position_embeddings());

    // Tokenizer and chat template.
    let conv = [
        ChatMessage::new("system", "Réponds brièvement."),
        ChatMessage::new("user", "Quelle est la capitale du Japon ? 東京？"),
    ];
    for gen in [false, true] {
        let a = g
            .tokenizer
            .apply_chat_template(&conv, gen)
            .expect("gguf template");
        let b = h
            .tokenizer
            .apply_chat_template(&conv, gen)
            .expect("hf template");
        assert_eq!(a, b, "chat template output differs (gen={gen})");
        assert_eq!(
            g.tokenizer.encode(&a).expect("ids"),
            h.tokenizer.encode(&b).expect("ids")
        );
    }
    for text in [
        "Hello world",
        "Straße 東京 🗼",
        " multiple   spaces\n\n",
        "<|im_start|>user\nx<|im_end|>",
    ] {
        assert_eq!(
            g.tokenizer.encode(text).expect("ids"),
            h.tokenizer.encode(text).expect("ids"),
            "{text:?}"
        );
    }
    assert!(
        h.tokenizer.eos_token_ids().contains(&2),
        "{:?}",
        h.tokenizer.eos_token_ids()
    );

    // Logits through the model.
    let ids = g.tokenizer.encode_chat(&conv, true).expect("prompt");
    let ids: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
    let n = ids.len() as i64;
    let x = Tensor::from_slice(&ids).reshape([1, n]);
    let mask = Tensor::ones([1, n], (Kind::Int64, tch::Device::Cpu));
    let mg = Model::new(&g.config, &g.weights).expect("model from GGUF");
    let mh = Model::new(&h.config, &h.weights).expect("model from HF");
    let lg = tch::no_grad(|| mg.forward(&x, &mask, None)).expect("forward gguf");
    let lh = tch::no_grad(|| mh.forward(&x, &mask, None)).expect("forward hf");
    assert_eq!(lg.size(), vec![1, n, g.config.vocab_size as i64]);
    assert!(
        lg.equal(&lh),
        "logits differ: max |Δ| = {}",
        (&lg - &lh).abs().max().double_value(&[])
    );
}

#[test]
fn bf16_load_casts_every_float_tensor() {
    let model = test_model();
    let m = load(
        &model,
        &LoadOptions {
            device: tch::Device::Cpu,
            dtype: Kind::BFloat16,
            ..Default::default()
        },
    )
    .expect("load bf16");
    for name in m.weights.names() {
        assert_eq!(
            m.weights.get(name).expect("tensor").kind(),
            Kind::BFloat16,
            "{name}"
        );
    }
    let f = load(&model, &LoadOptions::default()).expect("load f32");
    let a = f
        .weights
        .get("model.layers.3.mlp.down_proj.weight")
        .expect("f32");
    let b = m
        .weights
        .get("model.layers.3.mlp.down_proj.weight")
        .expect("bf16");
    assert!(
        a.to_kind(Kind::BFloat16).equal(&b),
        "bf16 weights are the f32 ones rounded"
    );
}
