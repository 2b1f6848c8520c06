//! LoRA interop with Python PEFT on the real test model (SmolLM2-135M-Instruct GGUF, f32).
//!
//! Golden values: `tests/reference/lora_ref.py interop` (one invocation): transformers loads the
//! same GGUF (dequantised, f32), PEFT builds and saves an adapter (r=8, alpha=16, rsLoRA,
//! q_proj+v_proj, nonzero B) and computes last-position logits with it, and with an adapter
//! flowtune saved (loaded by PEFT). Checks, tolerance max |Δlogit| <= 1e-3 (f32):
//! - PEFT's adapter loaded by flowtune gives PEFT's logits;
//! - flowtune's adapter loaded by PEFT gives flowtune's logits;
//! - both adapters really change the logits (|Δ| vs base > 0.05), so the test can fail;
//! - a left-padded batch mixing PEFT's adapter, flowtune's adapter and no adapter gives each
//!   row's single-pass logits (tolerance 2e-3: padding changes the SDPA reduction shapes).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

use flowtune_lm::loader::{load, LoadOptions};
use flowtune_lm::model::{LinearDelta, LogitsAt, Model};
use flowtune_lm::tokenizer::ChatMessage;
use flowtune_lora::{AdapterBank, AdapterSelection, LoraConfig, Module, Site};
use tch::{Device, Kind, Tensor};

const LOGIT_TOL: f64 = 1e-3;
const BATCH_TOL: f64 = 2e-3;

struct BankDelta<'a>(flowtune_lora::SelectedAdapters<'a>);

impl LinearDelta for BankDelta<'_> {
    fn delta(&self, layer: usize, module: &str, x: &Tensor) -> flowtune_lm::Result<Option<Tensor>> {
        self.0
            .delta(layer, module, x)
            .map_err(|e| flowtune_lm::Error::ModelInput(e.to_string()))
    }
}

fn root() -> PathBuf {
    PathBuf::from(std::env::var("FLOWTUNE_ROOT").expect("FLOWTUNE_ROOT unset: run through cargo"))
}

fn prompts() -> Vec<Vec<ChatMessage>> {
    let doc: String = (0..20)
        .map(|i| format!("Paragraph {i}: the river Lys flows through Ghent, and in year {} the mill produced {} sacks of flour. ", 1800 + i, i * 37 % 101))
        .collect();
    vec![
        vec![ChatMessage::new("user", "Hi!")],
        vec![ChatMessage::new("user", format!("Summarise this document in one sentence.\n\n{doc}"))],
        vec![ChatMessage::new("user", "Ünïcödé: 東京は日本の首都です。Привет, как дела? 🙂 Ça va très bien — naïve café.")],
        vec![
            ChatMessage::new("system", "You are a helpful assistant that answers multi-hop questions using the given paragraphs. Answer concisely."),
            ChatMessage::new("user", "Paragraph: The Eiffel Tower is located in Paris, the capital of France.\nQuestion: Who built the landmark in the capital of France?\nIs the paragraph relevant? Answer Yes or No."),
        ],
        vec![
            ChatMessage::new("user", "What is 17 times 3?"),
            ChatMessage::new("assistant", "17 times 3 is 51."),
            ChatMessage::new("user", "And divided by 3 again?"),
        ],
        vec![ChatMessage::new("user", "Write a Python function that returns the n-th Fibonacci number.")],
    ]
}

fn last_logits(model: &Model, ids: &[i64], delta: Option<&dyn LinearDelta>) -> Tensor {
    let mut cache = model.new_cache(1, ids.len()).unwrap();
    tch::no_grad(|| {
        model.forward_cached(
            &Tensor::from_slice(ids).view([1, -1]),
            None,
            &mut cache,
            &LogitsAt::Last,
            delta,
        )
    })
    .unwrap()
    .squeeze_dim(0)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Float) - b.to_kind(Kind::Float))
        .abs()
        .max()
        .double_value(&[])
}

#[test]
fn peft_adapters_round_trip_with_python_peft() {
    let model_path = flowtune_lm::locate_test_model().unwrap_or_else(|e| panic!("{e}"));
    let python = root().join(".venv/bin/python");
    assert!(
        python.exists(),
        "Python reference interpreter missing at {}",
        python.display()
    );
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
    let ids: Vec<Vec<i64>> = prompts()
        .iter()
        .map(|p| {
            loaded
                .tokenizer
                .encode_chat(p, true)
                .unwrap()
                .into_iter()
                .map(i64::from)
                .collect()
        })
        .collect();

    // flowtune's adapter: seeded default init, then a nonzero B.
    let mut bank = AdapterBank::new(shapes, Device::Cpu);
    let cfg = LoraConfig::rslora(8, 16.0, &[Module::QProj, Module::VProj]);
    bank.add("ours", &cfg, 1234).unwrap();
    tch::manual_seed(5);
    bank.modify("ours", |a| {
        let sites: Vec<Site> = a.sites().copied().collect();
        for s in sites {
            let w = a.weights_mut(&s).unwrap();
            w.b.copy_(&(Tensor::randn(w.b.size(), (Kind::Float, Device::Cpu)) * 0.02));
        }
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ours_dir = dir.path().join("ours");
    bank.save_peft("ours", &ours_dir).unwrap();
    let ids_path = dir.path().join("ids.json");
    std::fs::write(&ids_path, serde_json::to_string(&ids).unwrap()).unwrap();

    let script = root().join("tests/reference/lora_ref.py");
    let out = Command::new(&python)
        .arg(&script)
        .args(["interop", "--model"])
        .arg(&model_path)
        .arg("--ids")
        .arg(&ids_path)
        .arg("--ours")
        .arg(&ours_dir)
        .arg("--out")
        .arg(dir.path())
        .output()
        .expect("cannot start the Python reference");
    assert!(
        out.status.success(),
        "{} failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let golden: HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.path().join("golden.safetensors"))
            .unwrap()
            .into_iter()
            .collect();

    let peft_id = bank
        .load_peft("peft", dir.path().join("peft_adapter"))
        .unwrap();
    let ours_id = bank.id("ours").unwrap();
    assert!(
        golden["peft_b_norm"].double_value(&[0]) > 0.1,
        "PEFT adapter has nonzero B"
    );
    let (sel_peft, sel_ours) = (
        AdapterSelection::All(peft_id),
        AdapterSelection::All(ours_id),
    );
    let mut singles = vec![];
    for (i, ids) in ids.iter().enumerate() {
        let base = last_logits(&model, ids, None);
        let peft = last_logits(&model, ids, Some(&BankDelta(bank.select(&sel_peft))));
        let ours = last_logits(&model, ids, Some(&BankDelta(bank.select(&sel_ours))));
        let d_base = max_abs_diff(&base, &golden[&format!("base.{i}")]);
        let d_peft = max_abs_diff(&peft, &golden[&format!("peft.{i}")]);
        let d_ours = max_abs_diff(&ours, &golden[&format!("ours.{i}")]);
        let effect_peft = max_abs_diff(&peft, &base);
        let effect_ours = max_abs_diff(&ours, &base);
        println!(
            "prompt {i} ({} tokens): base {d_base:.2e}, PEFT adapter {d_peft:.2e}, flowtune adapter {d_ours:.2e}; adapter effect {effect_peft:.2}/{effect_ours:.2}",
            ids.len()
        );
        assert!(
            d_peft <= LOGIT_TOL,
            "prompt {i}: PEFT adapter in flowtune differs by {d_peft}"
        );
        assert!(
            d_ours <= LOGIT_TOL,
            "prompt {i}: flowtune adapter in PEFT differs by {d_ours}"
        );
        assert!(
            effect_peft > 0.05 && effect_ours > 0.05,
            "prompt {i}: adapters change the logits"
        );
        singles.push([base, peft, ours]);
    }

    // Mixed batch on the real model, left padded: rows use PEFT's, flowtune's or no adapter.
    let rows = [0usize, 2, 3, 4, 5];
    let choice = [1usize, 0, 2, 1, 2]; // 0 = none, 1 = peft, 2 = ours
    let t = rows.iter().map(|&r| ids[r].len()).max().unwrap();
    let mut flat = vec![];
    let mut valid = vec![];
    for &r in &rows {
        let pad = t - ids[r].len();
        flat.extend(std::iter::repeat_n(0i64, pad).chain(ids[r].iter().copied()));
        valid
            .extend(std::iter::repeat_n(false, pad).chain(std::iter::repeat_n(true, ids[r].len())));
    }
    let sel = AdapterSelection::PerRow(
        choice
            .iter()
            .map(|&c| [None, Some(peft_id), Some(ours_id)][c])
            .collect(),
    );
    let mut cache = model.new_cache(rows.len(), t).unwrap();
    let batch = tch::no_grad(|| {
        model.forward_cached(
            &Tensor::from_slice(&flat).view([rows.len() as i64, t as i64]),
            Some(&valid),
            &mut cache,
            &LogitsAt::Last,
            Some(&BankDelta(bank.select(&sel))),
        )
    })
    .unwrap();
    for (j, (&r, &c)) in rows.iter().zip(&choice).enumerate() {
        let d = max_abs_diff(&batch.get(j as i64), &singles[r][c]);
        println!(
            "mixed batch row {j} (prompt {r}, adapter {c}): max |Δlogit| vs single pass = {d:.2e}"
        );
        assert!(
            d <= BATCH_TOL,
            "mixed batch row {j} differs from its single pass by {d}"
        );
    }
}
