//! Helpers shared by the loading-side tests: the workspace root, the test model and
//! the Python reference script `tests/reference/lm_load_ref.py`.
#![allow(dead_code)]
use std::path::PathBuf;
use std::process::Command;

/// The workspace root (`FLOWTUNE_ROOT`, set by the workspace's cargo config).
pub fn root() -> PathBuf {
    std::env::var_os("FLOWTUNE_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

/// The test model (fails with a clear message when it is missing).
pub fn test_model() -> PathBuf {
    flowtune_lm::locate_test_model()
        .unwrap_or_else(|e| panic!("this test needs the test model: {e}"))
}

/// Run the reference script with `args`; panics with its stderr when it fails or
/// when the venv is missing.
pub fn run_reference(args: &[&std::ffi::OsStr]) {
    let py = root().join(".venv/bin/python");
    assert!(
        py.exists(),
        "this test needs the Python reference venv at {} (run scripts/setup.sh)",
        py.display()
    );
    let script = root().join("tests/reference/lm_load_ref.py");
    assert!(
        script.exists(),
        "reference script {} is missing",
        script.display()
    );
    let out = Command::new(&py)
        .arg(&script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", py.display()));
    assert!(
        out.status.success(),
        "reference script failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Read a JSON file written by the reference script.
pub fn read_json(path: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
