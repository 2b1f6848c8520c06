//! flowtune-lm side of the benchmark (driven by `scripts/bench-lm.sh`, which
//! also runs `tests/reference/lm_bench.py` and prints ratios): prefill tok/s
//! (512-token prompt), decode tok/s at batch 1 and 8 (200-token prompts, 64
//! greedy new tokens with the KV cache, timed after the prefill). Prints JSON.
//!
//! `cargo run --release -p flowtune-lm --example bench -- --dtype f32 [--model PATH] [--threads N]`
use std::time::Instant;

use flowtune_lm::loader::{load, LoadOptions};
use flowtune_lm::model::{LogitsAt, Model};
use rand::{Rng, SeedableRng};
use tch::{Device, Kind, Tensor};

type R<T> = Result<T, Box<dyn std::error::Error>>;

fn random_ids(rng: &mut rand_chacha::ChaCha8Rng, n: usize, vocab: usize) -> Vec<i64> {
    (0..n).map(|_| rng.random_range(10..vocab as i64)).collect()
}

fn prefill(model: &Model, rng: &mut rand_chacha::ChaCha8Rng, n: usize, repeats: usize) -> R<f64> {
    let ids = Tensor::f_from_slice(&random_ids(rng, n, model.config().vocab_size))?
        .f_view([1, n as i64])?;
    let mut best = f64::INFINITY;
    for _ in 0..repeats {
        let mut cache = model.new_cache(1, n)?;
        let t = Instant::now();
        let l = model.forward_cached(&ids, None, &mut cache, &LogitsAt::Last, None)?;
        let _ = l.f_argmax(-1, false)?.f_int64_value(&[0])?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(n as f64 / best)
}

fn decode(
    model: &Model,
    rng: &mut rand_chacha::ChaCha8Rng,
    batch: usize,
    prompt: usize,
    new: usize,
    repeats: usize,
) -> R<f64> {
    let ids = Tensor::f_from_slice(&random_ids(rng, batch * prompt, model.config().vocab_size))?
        .f_view([batch as i64, prompt as i64])?;
    let mut best = f64::INFINITY;
    for _ in 0..repeats {
        let mut cache = model.new_cache(batch, prompt + new + 1)?;
        let l = model.forward_cached(&ids, None, &mut cache, &LogitsAt::Last, None)?;
        let mut next: Vec<i64> = Vec::try_from(l.f_argmax(-1, false)?)?;
        let t = Instant::now();
        for _ in 0..new {
            let x = Tensor::f_from_slice(&next)?.f_view([batch as i64, 1])?;
            let l = model.forward_cached(&x, None, &mut cache, &LogitsAt::Last, None)?;
            next = Vec::try_from(l.f_argmax(-1, false)?)?;
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok((batch * new) as f64 / best)
}

fn main() -> R<()> {
    // As the flowtune-lm and musique binaries do (see `flowtune_lm::heap`).
    flowtune_lm::heap::retain_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    let arg = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let dtype = arg("--dtype").unwrap_or_else(|| "f32".into());
    let kind = match dtype.as_str() {
        "bf16" => Kind::BFloat16,
        "f32" => Kind::Float,
        other => return Err(format!("--dtype {other}: use f32 or bf16").into()),
    };
    let threads: i32 = arg("--threads")
        .map(|t| t.parse())
        .transpose()?
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get() as i32)
                .unwrap_or(1)
        });
    // `--no-kernels`: libtorch's ops instead of the fused CPU kernels (for A/B comparisons).
    if args.iter().any(|a| a == "--no-kernels") {
        flowtune_lm::cpu_kernels::set_enabled(false);
    }
    let repeats: usize = arg("--repeats")
        .map(|t| t.parse())
        .transpose()?
        .unwrap_or(2);
    tch::set_num_threads(threads);
    let path = match arg("--model") {
        Some(p) => p.into(),
        None => flowtune_lm::locate_test_model()?,
    };
    let loaded = load(
        &path,
        &LoadOptions {
            device: Device::Cpu,
            dtype: kind,
            linear_weights: match arg("--weights").as_deref() {
                Some(w) => w.parse()?,
                None => Default::default(),
            },
        },
    )?;
    let model = Model::new(&loaded.config, &loaded.weights)?;
    drop(loaded);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let _g = tch::no_grad_guard();
    // `--only decode_b1` (or `prefill`, `decode_b8`) runs one measurement, e.g. under `perf`;
    // `--new N` decodes N tokens instead of 64 there (a profile then is mostly decoding).
    if let Some(only) = arg("--only") {
        let new: usize = arg("--new").map(|t| t.parse()).transpose()?.unwrap_or(64);
        let v = match only.as_str() {
            "prefill" => prefill(&model, &mut rng, 512, repeats)?,
            "decode_b1" => decode(&model, &mut rng, 1, 200, new, repeats)?,
            "decode_b8" => decode(&model, &mut rng, 8, 200, new, repeats)?,
            other => return Err(format!("--only {other}: prefill, decode_b1 or decode_b8").into()),
        };
        println!(
            "{}",
            serde_json::json!({ "impl": "flowtune", "dtype": dtype, only: v })
        );
        return Ok(());
    }
    let res = serde_json::json!({
        "impl": "flowtune",
        "dtype": dtype,
        "weights": arg("--weights").unwrap_or_else(|| "dense".into()),
        "threads": threads,
        "prefill_512_tok_s": prefill(&model, &mut rng, 512, repeats)?,
        "decode_b1_tok_s": decode(&model, &mut rng, 1, 200, 64, repeats)?,
        "decode_b8_tok_s": decode(&model, &mut rng, 8, 200, 64, repeats)?,
    });
    println!("{res}");
    Ok(())
}
