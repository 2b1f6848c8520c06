//! Helpers shared by flowtune-lm's running-side tests: the Python reference
//! (`tests/reference/lm_model_ref.py` in the workspace venv), the test model,
//! golden files. Missing prerequisites fail loudly, never skip.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use tch::Tensor;

/// The workspace root.
pub fn root() -> PathBuf {
    let r = std::env::var_os("FLOWTUNE_ROOT")
        .map(PathBuf::from)
        .or_else(|| option_env!("FLOWTUNE_ROOT").map(PathBuf::from))
        .expect("FLOWTUNE_ROOT is not set: run the tests through cargo in the workspace (.cargo/config.toml sets it)");
    r.canonicalize().unwrap_or(r)
}

/// The venv's Python; panics with a clear message when missing.
pub fn python() -> PathBuf {
    let p = root().join(".venv/bin/python");
    assert!(
        p.exists(),
        "Python reference interpreter missing at {} (run scripts/setup.sh)",
        p.display()
    );
    p
}

/// Run the reference script with `args`; panics with its stderr on failure.
pub fn run_reference(args: &[&str]) {
    let script = root().join("tests/reference/lm_model_ref.py");
    let out = Command::new(python())
        .arg(&script)
        .args(args)
        .output()
        .expect("cannot start the Python reference");
    assert!(
        out.status.success(),
        "reference script {} {:?} failed:\n{}",
        script.display(),
        args,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The SmolLM2 GGUF test model; panics with a clear message when missing.
pub fn test_model() -> PathBuf {
    flowtune_lm::locate_test_model().unwrap_or_else(|e| panic!("{e}"))
}

/// All tensors of a safetensors file by name.
pub fn read_golden(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("cannot read golden file {}: {e}", path.display()))
        .into_iter()
        .collect()
}

/// max |a - b| as f64 (both converted to f32 on CPU).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_kind(tch::Kind::Float).to_device(tch::Device::Cpu);
    let b = b.to_kind(tch::Kind::Float).to_device(tch::Device::Cpu);
    assert_eq!(a.size(), b.size(), "shape mismatch");
    (a - b).abs().max().double_value(&[])
}
