//! Tiny random-weight GGUF files of each architecture (Llama untied, Mistral,
//! Qwen2 with q/k/v biases, Phi-3 with fused `attn_qkv` and `ffn_up` = gate_up),
//! written by `gguf::encode_gguf` with every supported tensor type (F32, F16, BF16,
//! Q8_0, Q4_0, Q4_1), loaded by flowtune and by transformers
//! (`lm_load_ref.py models`, one Python run for all four):
//! - tensors by HF name identical (exact: same dequantisation, same Q/K un-permutation);
//! - the configs agree on every field the model uses;
//! - logits of `model::Model` on fixed ids within max |Δ| ≤ 1e-4 of transformers' (f32).
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod loader_support;

use std::path::{Path, PathBuf};

use flowtune_lm::gguf::{encode_gguf, GgufTensorData, GgufValue};
use flowtune_lm::loader::{load, LoadOptions};
use flowtune_lm::model::Model;
use half::{bf16, f16};
use loader_support::{read_json, run_reference};
use safetensors::SafeTensors;
use tch::{Kind, Tensor};

const HIDDEN: u64 = 64;
const HEADS: u64 = 4;
const KV_HEADS: u64 = 2;
const FF: u64 = 128;
const VOCAB: u64 = 64;
const LAYERS: u64 = 2;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// Random data of `n` elements in ggml type `ty` (scales kept small and finite).
fn random_data(rng: &mut Rng, ty: u32, n: u64, scale: f32) -> Vec<u8> {
    let mut out = Vec::new();
    let blocks = n / 32;
    match ty {
        0 => (0..n).for_each(|_| out.extend((rng.unit() * scale).to_le_bytes())),
        1 => (0..n).for_each(|_| out.extend(f16::from_f32(rng.unit() * scale).to_le_bytes())),
        30 => (0..n).for_each(|_| out.extend(bf16::from_f32(rng.unit() * scale).to_le_bytes())),
        8 => (0..blocks).for_each(|_| {
            out.extend(f16::from_f32(scale / 127.0 * (0.5 + rng.unit().abs())).to_le_bytes());
            out.extend((0..32).map(|_| rng.next() as u8));
        }),
        2 => (0..blocks).for_each(|_| {
            out.extend(f16::from_f32(scale / 8.0 * (0.5 + rng.unit().abs())).to_le_bytes());
            out.extend((0..16).map(|_| rng.next() as u8));
        }),
        3 => (0..blocks).for_each(|_| {
            out.extend(f16::from_f32(scale / 8.0 * (0.5 + rng.unit().abs())).to_le_bytes());
            out.extend(f16::from_f32(-scale * (0.5 + rng.unit().abs())).to_le_bytes());
            out.extend((0..16).map(|_| rng.next() as u8));
        }),
        _ => unreachable!("test uses supported types only"),
    }
    out
}

/// A tiny model of `arch`. `mistral` is written as llama.cpp writes Mistral models:
/// architecture `llama` with a Mistral name (transformers, like flowtune, then loads
/// it as Llama; the GGUF carries no sliding window). transformers' own special case,
/// `general.name` exactly "mistral", fails inside gguf-py 0.19, so it is not tested.
fn tiny_model(arch: &str, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let file_arch = if arch == "mistral" { "llama" } else { arch };
    let s = |v: &str| GgufValue::String(v.into());
    let k = |key: &str| format!("{file_arch}.{key}");
    let mut md: Vec<(String, GgufValue)> = vec![
        ("general.architecture".into(), s(file_arch)),
        (
            "general.name".into(),
            s(if arch == "mistral" {
                "Mistral 7B Instruct (tiny)"
            } else {
                "tiny"
            }),
        ),
        (k("block_count"), GgufValue::U32(LAYERS as u32)),
        (k("context_length"), GgufValue::U32(256)),
        (k("embedding_length"), GgufValue::U32(HIDDEN as u32)),
        (k("feed_forward_length"), GgufValue::U32(FF as u32)),
        (k("attention.head_count"), GgufValue::U32(HEADS as u32)),
        (
            k("attention.head_count_kv"),
            GgufValue::U32(KV_HEADS as u32),
        ),
        (
            k("rope.freq_base"),
            GgufValue::F32(if arch == "qwen2" {
                1_000_000.0
            } else {
                10_000.0
            }),
        ),
        (k("attention.layer_norm_rms_epsilon"), GgufValue::F32(1e-6)),
        (
            k("rope.dimension_count"),
            GgufValue::U32((HIDDEN / HEADS) as u32),
        ),
    ];
    let mut tokens = vec![s("<unk>"), s("<s>"), s("</s>")];
    tokens.extend([s("t"), s("1"), s("t1")]);
    tokens.extend((6..VOCAB).map(|i| s(&format!("t{i}"))));
    let types: Vec<GgufValue> = (0..VOCAB)
        .map(|i| GgufValue::I32(if i < 3 { 3 } else { 1 }))
        .collect();
    md.extend([
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.tokens".into(), GgufValue::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), GgufValue::Array(types)),
        (
            "tokenizer.ggml.merges".into(),
            GgufValue::Array(vec![s("t 1")]),
        ),
        ("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(2)),
        ("tokenizer.ggml.padding_token_id".into(), GgufValue::U32(0)),
    ]);
    let mut ts = Vec::new();
    fn push_to(
        ts: &mut Vec<GgufTensorData>,
        rng: &mut Rng,
        name: String,
        dims: Vec<u64>,
        ty: u32,
        scale: f32,
    ) {
        let n: u64 = dims.iter().product();
        ts.push(GgufTensorData {
            name,
            dims,
            type_id: ty,
            data: random_data(rng, ty, n, scale),
        });
    }
    let hd = HIDDEN / HEADS;
    push_to(
        &mut ts,
        &mut rng,
        "token_embd.weight".into(),
        vec![HIDDEN, VOCAB],
        8,
        1.0,
    );
    let norm = |rng: &mut Rng| -> Vec<u8> {
        (0..HIDDEN)
            .flat_map(|_| (1.0 + 0.1 * rng.unit()).to_le_bytes())
            .collect()
    };
    let data = norm(&mut rng);
    ts.push(GgufTensorData {
        name: "output_norm.weight".into(),
        dims: vec![HIDDEN],
        type_id: 0,
        data,
    });
    if arch == "llama" {
        push_to(
            &mut ts,
            &mut rng,
            "output.weight".into(),
            vec![HIDDEN, VOCAB],
            1,
            0.5,
        );
    }
    for l in 0..LAYERS {
        let b = |m: &str| format!("blk.{l}.{m}");
        for m in ["attn_norm.weight", "ffn_norm.weight"] {
            let data = norm(&mut rng);
            ts.push(GgufTensorData {
                name: b(m),
                dims: vec![HIDDEN],
                type_id: 0,
                data,
            });
        }
        let w = 1.0 / (HIDDEN as f32).sqrt() * 2.0;
        if arch == "phi3" {
            push_to(
                &mut ts,
                &mut rng,
                b("attn_qkv.weight"),
                vec![HIDDEN, (HEADS + 2 * KV_HEADS) * hd],
                8,
                w,
            );
            push_to(
                &mut ts,
                &mut rng,
                b("ffn_up.weight"),
                vec![HIDDEN, 2 * FF],
                3,
                w,
            );
        } else {
            push_to(
                &mut ts,
                &mut rng,
                b("attn_q.weight"),
                vec![HIDDEN, HEADS * hd],
                1,
                w,
            );
            push_to(
                &mut ts,
                &mut rng,
                b("attn_k.weight"),
                vec![HIDDEN, KV_HEADS * hd],
                30,
                w,
            );
            push_to(
                &mut ts,
                &mut rng,
                b("attn_v.weight"),
                vec![HIDDEN, KV_HEADS * hd],
                8,
                w,
            );
            push_to(
                &mut ts,
                &mut rng,
                b("ffn_gate.weight"),
                vec![HIDDEN, FF],
                3,
                w,
            );
            push_to(
                &mut ts,
                &mut rng,
                b("ffn_up.weight"),
                vec![HIDDEN, FF],
                2,
                w,
            );
        }
        if arch == "qwen2" {
            push_to(
                &mut ts,
                &mut rng,
                b("attn_q.bias"),
                vec![HEADS * hd],
                0,
                0.2,
            );
            push_to(
                &mut ts,
                &mut rng,
                b("attn_k.bias"),
                vec![KV_HEADS * hd],
                0,
                0.2,
            );
            push_to(
                &mut ts,
                &mut rng,
                b("attn_v.bias"),
                vec![KV_HEADS * hd],
                0,
                0.2,
            );
        }
        push_to(
            &mut ts,
            &mut rng,
            b("attn_output.weight"),
            vec![HEADS * hd, HIDDEN],
            2,
            w,
        );
        push_to(
            &mut ts,
            &mut rng,
            b("ffn_down.weight"),
            vec![FF, HIDDEN],
            8,
            1.0 / (FF as f32).sqrt() * 2.0,
        );
    }
    encode_gguf(&md, &ts)
}

fn f32s(view: &safetensors::tensor::TensorView<'_>) -> Tensor {
    let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
    Tensor::from_data_size(view.data(), &shape, Kind::Float)
}

#[test]
fn tiny_gguf_models_of_each_architecture_match_transformers() {
    let archs = ["llama", "mistral", "qwen2", "phi3"];
    let dir = tempfile::tempdir().expect("tempdir");
    let paths: Vec<PathBuf> = archs
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let p = dir.path().join(format!("tiny-{a}.gguf"));
            std::fs::write(&p, tiny_model(a, 0x9e37_79b9 + i as u64)).expect("write gguf");
            p
        })
        .collect();
    let out = dir.path().join("ref");
    let mut args: Vec<&std::ffi::OsStr> = vec!["models".as_ref(), out.as_os_str()];
    args.extend(paths.iter().map(|p| p.as_os_str()));
    run_reference(&args);

    for (arch, path) in archs.iter().zip(&paths) {
        let stem = format!("tiny-{arch}");
        let bytes =
            std::fs::read(out.join(format!("{stem}.safetensors"))).expect("reference tensors");
        let st = SafeTensors::deserialize(&bytes).expect("safetensors");
        let meta = read_json(&out.join(format!("{stem}.json")));
        let cfg = &meta["config"];
        let m = load(Path::new(path), &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{arch}: {e}"));

        // Tensors.
        let mut n = 0;
        for (name, view) in st.iter() {
            if name == "__logits__" || name.ends_with("rotary_emb.inv_freq") {
                continue;
            }
            if name == "lm_head.weight" && m.config.tie_word_embeddings() {
                assert!(
                    !m.weights.contains(name),
                    "{arch}: tied model has an lm_head"
                );
                continue;
            }
            let theirs = f32s(&view);
            let ours = m
                .weights
                .get(name)
                .unwrap_or_else(|e| panic!("{arch}: {e}"));
            assert_eq!(ours.size(), theirs.size(), "{arch} {name}: shape");
            assert!(
                ours.equal(&theirs),
                "{arch} {name}: max |Δ| {}",
                (&ours - &theirs).abs().max().double_value(&[])
            );
            n += 1;
        }
        assert_eq!(n, m.weights.len(), "{arch}: tensor count");

        // Config.
        let c = &m.config;
        assert_eq!(
            serde_json::to_value(c.model_type).expect("json"),
            cfg["model_type"],
            "{arch}: model_type"
        );
        assert_eq!(
            c.hidden_size as u64,
            cfg["hidden_size"].as_u64().expect("hidden"),
            "{arch}"
        );
        assert_eq!(
            c.num_hidden_layers as u64,
            cfg["num_hidden_layers"].as_u64().expect("layers"),
            "{arch}"
        );
        assert_eq!(
            c.num_key_value_heads() as u64,
            cfg["num_key_value_heads"].as_u64().expect("kv"),
            "{arch}"
        );
        assert_eq!(
            c.intermediate_size as u64,
            cfg["intermediate_size"].as_u64().expect("ff"),
            "{arch}"
        );
        assert_eq!(
            c.tie_word_embeddings(),
            cfg["tie_word_embeddings"].as_bool().expect("tie"),
            "{arch}"
        );
        let theta = cfg["rope_parameters"]["rope_theta"]
            .as_f64()
            .or(cfg["rope_theta"].as_f64())
            .expect("theta");
        assert_eq!(c.rope_theta(), theta, "{arch}: rope_theta");
        assert!(
            (c.rms_norm_eps() - cfg["rms_norm_eps"].as_f64().expect("eps")).abs() < 1e-12,
            "{arch}: eps"
        );

        // Logits through the model (f32; tolerance 1e-4 for kernel-order differences).
        let probe: Vec<i64> = serde_json::from_value(meta["probe_ids"].clone()).expect("ids");
        let t = probe.len() as i64;
        let model = Model::new(&m.config, &m.weights).unwrap_or_else(|e| panic!("{arch}: {e}"));
        let ids = Tensor::from_slice(&probe).reshape([1, t]);
        let mask = Tensor::ones([1, t], (Kind::Int64, tch::Device::Cpu));
        let ours = tch::no_grad(|| model.forward(&ids, &mask, None))
            .expect("forward")
            .squeeze_dim(0);
        let theirs = f32s(&st.tensor("__logits__").expect("logits"));
        let d = (&ours.to_kind(Kind::Float) - &theirs)
            .abs()
            .max()
            .double_value(&[]);
        eprintln!("{arch}: {n} tensors identical, logits max |Δ| = {d:.2e}");
        assert!(d <= 1e-4, "{arch}: logits max |Δ| = {d}");
    }
}
