//! String `target_modules` are regexes that PEFT matches with Python's `re.fullmatch` against the
//! module path. Golden values: `tests/reference/lora_ref.py regex` (Python's `re`, one
//! invocation for all patterns × paths). Exact agreement required.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use flowtune_lora::{llama_base_shapes, LoraConfig, LoraError, TargetModules};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

const PATTERNS: &[&str] = &[
    r".*\.(q_proj|v_proj)",
    r".*(q_proj|v_proj)$",
    r"^model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj$",
    r"model.layers.1[0-1].mlp.*",
    r"model\.layers\.(?:[02468]|1[02])\..*_proj",
    r".*layers\.[^1]\.self_attn\.[qk]_proj",
    r"model\.layers\.\d{1}\.mlp\.(gate|up)_proj",
    r"model\.layers\.\d{2,}\..*",
    r".*\.\w+_proj",
    r".*mlp\.down_proj|.*self_attn\.o_proj",
    r"q_proj",
    r"model\.layers\.3\.self_attn\.q_proj",
    r".*attn.?\.[a-z]+_pro?j",
    r"(model\.)?.*\.v_proj",
    r".*\.(?:gate|up)_proj+",
];

#[test]
fn string_target_modules_match_like_python_re_fullmatch() {
    let root = PathBuf::from(
        std::env::var("FLOWTUNE_ROOT").expect("FLOWTUNE_ROOT unset: run through cargo"),
    );
    let python = root.join(".venv/bin/python");
    assert!(
        python.exists(),
        "Python reference interpreter missing at {}",
        python.display()
    );
    let base = llama_base_shapes(12, 16, 4, 2, 4, 24);
    let paths: Vec<String> = base.keys().map(|s| s.module_path()).collect();
    let dir = tempfile::tempdir().unwrap();
    let cases = dir.path().join("cases.json");
    let out = dir.path().join("out.json");
    std::fs::write(
        &cases,
        serde_json::json!({"patterns": PATTERNS, "paths": paths}).to_string(),
    )
    .unwrap();
    let script = root.join("tests/reference/lora_ref.py");
    let run = Command::new(&python)
        .arg(&script)
        .args(["regex", "--cases"])
        .arg(&cases)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("cannot start the Python reference");
    assert!(
        run.status.success(),
        "{} failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&run.stderr)
    );
    let golden: BTreeMap<String, Vec<String>> =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    for p in PATTERNS {
        let cfg = LoraConfig {
            target_modules: Some(TargetModules::Pattern(p.to_string())),
            ..LoraConfig::default()
        };
        cfg.validate().unwrap_or_else(|e| panic!("{p}: {e}"));
        let ours: Vec<String> = cfg
            .target_sites(&base)
            .iter()
            .map(|s| s.module_path())
            .collect();
        let mut want = golden[*p].clone();
        want.sort();
        let mut got = ours.clone();
        got.sort();
        assert_eq!(got, want, "pattern {p}");
    }
    // Some patterns match nothing and some everything: the comparison is not vacuous.
    let counts: Vec<usize> = PATTERNS.iter().map(|p| golden[*p].len()).collect();
    assert!(counts.contains(&0) && counts.iter().any(|&c| c > 0 && c < paths.len()));
}

#[test]
fn unsupported_regex_syntax_is_a_typed_error() {
    for p in [
        r"^(?!.*lm_head).*",
        r"(a)\1",
        r"(q_proj",
        r"q_proj)",
        r"[a-",
        r"*q",
        r"\p{L}",
    ] {
        let cfg = LoraConfig {
            target_modules: Some(TargetModules::Pattern(p.to_string())),
            ..LoraConfig::default()
        };
        assert!(
            matches!(cfg.validate(), Err(LoraError::ConfigField { ref field, .. }) if field == "target_modules"),
            "{p} should be rejected"
        );
    }
}
